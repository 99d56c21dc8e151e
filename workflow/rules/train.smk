# Training stages: the dense teacher, the uniform-width and channel-pruned baselines; each job also writes its
# network's deploy form (merged.pt: BN folded, nothing to merge), so a start-up is paid once.


rule train_dense:
    output:
        model=DENSE,
        metrics=DENSE.replace(".pt", ".json"),
        merged=DENSE.replace("model.pt", "merged.pt"),
        report=DENSE.replace("model.pt", "merge.json"),
    log:
        f"{RESULTS}/dense/full/1.0/seed{{seed}}/logs/train_dense.log",
    benchmark:
        f"{RESULTS}/dense/full/1.0/seed{{seed}}/benchmarks/train_dense.tsv"
    params:
        config=reads("train-dense", "merge-full"),
        # the teacher, then its deploy form (BN folded; nothing merges), in one job (one process start-up)
        argv=lambda w, output: [
            ["train-dense", "--out", output.model],
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


rule train_uniform:
    input:
        dense=DENSE,
    output:
        model=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/model.json",
        merged=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/merged.pt",
        report=f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/merge.json",
    log:
        f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/logs/train_uniform.log",
    benchmark:
        f"{RESULTS}/uniform/width/{{keep}}/seed{{seed}}/benchmarks/train_uniform.tsv"
    params:
        config=reads("train-uniform", "merge-full"),
        argv=lambda w, input, output: [
            ["train-uniform", "--width", w.keep, "--dense", input.dense, "--out", output.model],
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
        config=reads("metaprune", "merge-full"),
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
