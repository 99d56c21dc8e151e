# One row per cell and seed, the summary tables, the plots.


localrules:
    depthdp,
    row,
    summarize,
    aggregate,
    paired,
    plots,


rule row:
    input:
        model=f"{CELL}/model.pt",
        merge=f"{CELL}/merge.json",
        bench=measured("bench.json"),
        mpc=measured("mpc.json"),
    output:
        f"{CELL}/row.json",
    log:
        f"{CELL}/logs/row.log",
    params:
        config=reads("row:{method}"),
        argv=lambda w, input, output: ["row", "--method", w.method, "--granularity", w.granularity, "--keep", w.keep,
                                       "--model", input.model, "--out", output[0], input.merge, input.bench,
                                       input.mpc],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule summarize:
    input:
        cell_files("row.json"),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/summarize.log",
    params:
        config=reads("summarize"),
        argv=lambda w, input, output: ["summarize", *input, "--out", output[0]],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule aggregate:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/summary_by_cell.csv", caption="../report/summary_by_cell.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/aggregate.log",
    params:
        config=reads("aggregate"),
        argv=lambda w, input, output: ["aggregate", "--summary", input[0], "--out", output[0]],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule paired:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(f"{RESULTS}/paired.md", caption="../report/paired.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/paired.log",
    params:
        config=reads("compare"),
        argv=lambda w, input, output: ["compare", "--summary", input[0], "--pairs", *pairs(), "--out", output[0]],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule plots:
    input:
        summary=f"{RESULTS}/summary.csv",
    output:
        report(
            directory(f"{RESULTS}/plots"),
            patterns=["{name}.png", "{name}.pdf"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        f"{RESULTS}/logs/plots.log",
    params:
        config=reads("plots"),
        argv=lambda w, input, output: ["plots", "--summary", input.summary, "--out", output[0]],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
