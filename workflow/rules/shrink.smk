# DepthShrinker and SNL cells: search -> extract -> finetune.


rule search:
    input:
        dense=DENSE,
        costs=cost_table,
    output:
        model=CELL + "/search.pt",
        metrics=CELL + "/search.json",
    log:
        CELL + "/logs/search.log",
    wildcard_constraints:
        method="depthshrinker|snl",
    benchmark:
        CELL + "/benchmarks/search.tsv"
    params:
        argv=lambda w, input, output: ["search", "--dense", input.dense, "--out", output.model, "--method", w.method,
                                       "--granularity", w.granularity, "--keep", w.keep]
        + (["--costs", input.costs[0]] if input.costs else []),
    threads: config["threads"]
    resources:
        gpu=GPU,
    script:
        "../scripts/stage.py"


rule extract:
    input:
        search=CELL + "/search.pt",
    output:
        mask=CELL + "/mask.json",
    log:
        CELL + "/logs/extract.log",
    wildcard_constraints:
        method="depthshrinker|snl",
    params:
        argv=lambda w, input, output: ["extract", "--search", input.search, "--out", output.mask],
    script:
        "../scripts/stage.py"


rule finetune:
    input:
        dense=DENSE,
        mask=CELL + "/mask.json",
    output:
        model=CELL + "/model.pt",
        metrics=CELL + "/model.json",
    log:
        CELL + "/logs/finetune.log",
    wildcard_constraints:
        method="depthshrinker|snl",
    benchmark:
        CELL + "/benchmarks/finetune.tsv"
    params:
        argv=lambda w, input, output: ["finetune", "--dense", input.dense, "--mask", input.mask, "--out", output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
    script:
        "../scripts/stage.py"
