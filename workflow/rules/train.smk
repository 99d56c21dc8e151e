# Training stages: the dense teacher, the uniform-width and channel-pruned baselines.


rule train_dense:
    output:
        model=DENSE,
        metrics=DENSE.replace(".pt", ".json"),
    log:
        f"{RESULTS}/dense/full/1.0/seed{{seed}}/logs/train_dense.log",
    benchmark:
        f"{RESULTS}/dense/full/1.0/seed{{seed}}/benchmarks/train_dense.tsv"
    params:
        config=reads("train-dense"),
        argv=lambda w, output: ["train-dense", "--out", output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule train_uniform:
    input:
        dense=DENSE,
    output:
        model=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/model.json",
    log:
        f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/logs/train_uniform.log",
    benchmark:
        f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/benchmarks/train_uniform.tsv"
    params:
        config=reads("train-uniform"),
        argv=lambda w, input, output: ["train-uniform", "--width", w.keep, "--dense", input.dense, "--out",
                                       output.model],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule metaprune:
    input:
        dense=DENSE,
        match=f"{RESULTS}/depthshrinker/block/{{keep}}/seed{{seed}}/merged.pt",
    output:
        model=f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/model.json",
        merged=f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/merged.pt",
        report=f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/merge.json",
    log:
        f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/logs/metaprune.log",
    benchmark:
        f"{RESULTS}/metapruning/{{granularity}}/{{keep}}/seed{{seed}}/benchmarks/metaprune.tsv"
    params:
        config=reads("metaprune", "merge"),
        # the search for the winner, its training, then its merge, in one job (one process start-up)
        argv=lambda w, input, output: [
            ["metaprune", "--dense", input.dense, "--cost", w.granularity, "--match", input.match, "--out",
             output.model],
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
