# DepthShrinker and SNL cells: search (with its mask extraction) -> finetune (with its merge); depthdp cells:
# depthdp.smk -> finetune.


rule search:
    input:
        dense=DENSE,
        costs=cost_table,
    output:
        model=f"{CELL}/search.pt",
        metrics=f"{CELL}/search.json",
        mask=f"{CELL}/mask.json",
    log:
        f"{CELL}/logs/search.log",
    wildcard_constraints:
        method="depthshrinker|snl",
    benchmark:
        f"{CELL}/benchmarks/search.tsv"
    params:
        config=lambda w: reads(search_stage(w.method, w.granularity))(w),
        # search, then extract its mask, in one job (one process start-up)
        argv=lambda w, input, output: [
            ["search", "--dense", input.dense, "--out", output.model, "--method", w.method, "--granularity",
             w.granularity, "--keep", w.keep] + (["--costs", input.costs[0]] if input.costs else []),
            ["extract", "--search", output.model, "--out", output.mask],
        ],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule finetune:
    input:
        dense=DENSE,
        mask=f"{CELL}/mask.json",
        # SNL element finetunes from the searched weights (mask.json's `init`); depthdp has no search
        search=searched,
    output:
        model=f"{CELL}/model.pt",
        metrics=f"{CELL}/model.json",
        merged=f"{CELL}/merged.pt",
        report=f"{CELL}/merge.json",
    log:
        f"{CELL}/logs/finetune.log",
    wildcard_constraints:
        method="depthshrinker|snl|depthdp",
    benchmark:
        f"{CELL}/benchmarks/finetune.tsv"
    params:
        config=reads("finetune", "merge"),
        # finetune, then merge the result, in one job (one process start-up)
        argv=lambda w, input, output: [
            ["finetune", "--dense", input.dense, "--mask", input.mask, "--out", output.model],
            ["merge", "--checkpoint", output.model, "--out", output.merged, "--report", output.report],
        ],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
