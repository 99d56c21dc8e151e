# One row per cell, the summary table, the plots.


rule row:
    input:
        model=CELL + "/model.pt",
        parts=[CELL + "/merge.json", CELL + "/bench.json", CELL + "/mpc.json"],
    output:
        CELL + "/row.json",
    localrule: True
    run:
        from depthshrinker.report import cell_row

        cell_row(wildcards.method, wildcards.granularity, wildcards.keep, input.model, input.parts, output[0])


rule summarize:
    input:
        cell_files("row.json"),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/summarize.log",
    params:
        argv=lambda w, input, output: ["summarize", *input, "--out", output[0]],
    script:
        "../scripts/stage.py"


rule plots:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(
            directory(f"{RESULTS}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        f"{RESULTS}/logs/plots.log",
    params:
        argv=lambda w, input, output: ["plots", "--summary", input[0], "--out", output[0]],
    script:
        "../scripts/stage.py"
