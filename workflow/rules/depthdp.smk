# depthdp cells (Kim et al., ICML 2023): the latency table of every block option, the importance table (one job
# per block, so it fans out and an interrupted table resumes where it stopped), then the DP writes the cell's
# mask.json; finetune, merge, benchmarks and row are a DepthShrinker cell's. Input functions: common.smk.
IMPORTANCE = f"{RESULTS}/depthdp/importance/seed{{seed}}"


rule latency_table:
    output:
        f"{RESULTS}/latency/{{target}}-options.csv",
    log:
        f"{RESULTS}/latency/logs/{{target}}-options.log",
    benchmark:
        f"{RESULTS}/latency/benchmarks/{{target}}-options.tsv"
    wildcard_constraints:
        target="cpu|gpu|mpc",
    params:
        config=reads("latency-table"),
        argv=lambda w, output: ["latency-table", "--target", w.target, "--out", output[0]],
    threads: lambda w: 1 if w.target == "mpc" else all_cores(w)  # measured tables time alone
    resources:
        gpu=lambda w: int(w.target == "gpu"),
        **resources("bench"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule importance:
    input:
        dense=DENSE,
    output:
        f"{IMPORTANCE}/{{block}}.json",
    log:
        f"{IMPORTANCE}/logs/{{block}}.log",
    benchmark:
        f"{IMPORTANCE}/benchmarks/{{block}}.tsv"
    wildcard_constraints:
        block=r"dense|\d+",
    params:
        config=reads("importance"),
        argv=lambda w, input, output: ["importance", "--dense", input.dense, "--block", w.block, "--out", output[0]],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule depthdp:
    input:
        latency=latency_of_target,
        reference=f"{IMPORTANCE}/dense.json",
        blocks=importance_blocks,
        match=matched_mask,
    output:
        mask=f"{CELL}/mask.json",
    log:
        f"{CELL}/logs/depthdp.log",
    wildcard_constraints:
        method="depthdp",
    params:
        config=reads("depthdp"),
        argv=lambda w, input, output: ["depthdp", "--keep", w.keep, "--latency", input.latency, "--reference",
                                       input.reference, "--blocks", *input.blocks, "--out", output.mask]
        + (["--match", input.match] if input.match else []),
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
