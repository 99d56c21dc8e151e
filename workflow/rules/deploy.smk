# Deployment and measurement of every cell: merge (BN folded, linear convs merged), device and MPC benchmarks;
# and the per-unit cost tables of the platform-aware search. Timing jobs take every core the run has, so no
# other job shares the machine while they time.


rule merge:
    input:
        model=f"{CELL}/model.pt",
    output:
        merged=f"{CELL}/merged.pt",
        report=f"{CELL}/merge.json",
    log:
        f"{CELL}/logs/merge.log",
    benchmark:
        f"{CELL}/benchmarks/merge.tsv"
    params:
        config=reads("merge"),
        argv=lambda w, input, output: ["merge", "--checkpoint", input.model, "--out", output.merged,
                                       "--report", output.report],
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule bench_device:
    input:
        model=f"{CELL}/merged.pt",
        dense=f"{RESULTS}/dense/full/1.0/seed{{seed}}/merged.pt",
    output:
        f"{CELL}/bench.json",
    log:
        f"{CELL}/logs/bench_device.log",
    benchmark:
        f"{CELL}/benchmarks/bench_device.tsv"
    params:
        config=reads("bench-device"),
        argv=lambda w, input, output: ["bench-device", "--model", input.model, "--dense", input.dense, "--out",
                                       output[0]],
    threads: all_cores
    resources:
        gpu=1,
        **resources("bench"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule bench_mpc:
    input:
        model=f"{CELL}/merged.pt",
    output:
        f"{CELL}/mpc.json",
    log:
        f"{CELL}/logs/bench_mpc.log",
    benchmark:
        f"{CELL}/benchmarks/bench_mpc.tsv"
    params:
        config=reads("bench-mpc"),
        argv=lambda w, input, output: ["bench-mpc", "--model", input.model, "--out", output[0]],
    threads: all_cores
    resources:
        **resources("bench"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule cost_table:
    output:
        f"{RESULTS}/latency/{{target}}-{{granularity}}.csv",
    log:
        f"{RESULTS}/latency/logs/{{target}}-{{granularity}}.log",
    benchmark:
        f"{RESULTS}/latency/benchmarks/{{target}}-{{granularity}}.tsv"
    wildcard_constraints:
        target="cpu|gpu|mpc",
    params:
        config=reads("cost-table"),
        argv=lambda w, output: ["cost-table", "--target", w.target, "--granularity", w.granularity, "--out",
                                output[0]],
    threads: lambda w: 1 if w.target == "mpc" else all_cores(w)  # measured tables time alone
    resources:
        gpu=lambda w: int(w.target == "gpu"),
        **resources("bench"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
