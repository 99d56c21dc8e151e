rule search:
    input:
        dense=DENSE,
    output:
        model=CELL + "/search.pt",
        metrics=CELL + "/search.json",
    log:
        CELL + "/logs/search.log",
    threads: config["threads"]
    resources:
        gpu=1,
    script:
        "../scripts/search.py"


rule extract:
    input:
        search=CELL + "/search.pt",
    output:
        mask=CELL + "/mask.json",
    log:
        CELL + "/logs/extract.log",
    script:
        "../scripts/extract.py"


rule finetune:
    input:
        dense=DENSE,
        mask=CELL + "/mask.json",
    output:
        model=CELL + "/model.pt",
        metrics=CELL + "/model.json",
    log:
        CELL + "/logs/finetune.log",
    threads: config["threads"]
    resources:
        gpu=1,
    script:
        "../scripts/finetune.py"
