# Training stages: the dense teacher, the uniform-width and channel-pruned baselines.


rule train_dense:
    output:
        model=DENSE,
        metrics=DENSE.replace(".pt", ".json"),
    log:
        f"{RESULTS}/dense/full/1.0/logs/train_dense.log",
    benchmark:
        f"{RESULTS}/dense/full/1.0/benchmarks/train_dense.tsv"
    params:
        argv=lambda w, output: ["train-dense", "--out", output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
    script:
        "../scripts/stage.py"


rule train_uniform:
    input:
        dense=DENSE,
    output:
        model=RESULTS + "/uniform/width/{keep}/model.pt",
        metrics=RESULTS + "/uniform/width/{keep}/model.json",
    log:
        RESULTS + "/uniform/width/{keep}/logs/train_uniform.log",
    benchmark:
        RESULTS + "/uniform/width/{keep}/benchmarks/train_uniform.tsv"
    params:
        argv=lambda w, input, output: ["train-uniform", "--width", w.keep, "--dense", input.dense, "--out", output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
    script:
        "../scripts/stage.py"


rule metaprune:
    input:
        dense=DENSE,
        match=RESULTS + "/depthshrinker/block/{keep}/merged.pt",
    output:
        model=RESULTS + "/metapruning/{granularity}/{keep}/model.pt",
        metrics=RESULTS + "/metapruning/{granularity}/{keep}/model.json",
    log:
        RESULTS + "/metapruning/{granularity}/{keep}/logs/metaprune.log",
    benchmark:
        RESULTS + "/metapruning/{granularity}/{keep}/benchmarks/metaprune.tsv"
    params:
        argv=lambda w, input, output: ["metaprune", "--dense", input.dense, "--cost", w.granularity,
                                       "--match", input.match, "--out", output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
    script:
        "../scripts/stage.py"
