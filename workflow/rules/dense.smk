rule train_dense:
    output:
        model=DENSE,
        metrics=DENSE.replace(".pt", ".json"),
    log:
        f"{RESULTS}/dense/full/1.0/logs/train_dense.log",
    threads: config["threads"]
    resources:
        gpu=1,
    script:
        "../scripts/train_dense.py"
