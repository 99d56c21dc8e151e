rule profile:
    input:
        model=CELL + "/model.pt",
    output:
        CELL + "/profile.json",
    log:
        CELL + "/logs/profile.log",
    script:
        "../scripts/profile.py"


rule row:
    input:
        CELL + "/profile.json",
    output:
        CELL + "/row.json",
    log:
        CELL + "/logs/row.log",
    script:
        "../scripts/row.py"


rule summarize:
    input:
        cell_files("row.json"),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/summarize.log",
    script:
        "../scripts/summarize.py"
