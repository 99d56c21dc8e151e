# Deployment and measurement of every cell: merge (BN folded, linear convs merged), device and MPC benchmarks;
# and the per-unit cost tables of the platform-aware search.


rule merge:
    input:
        model=CELL + "/model.pt",
    output:
        merged=CELL + "/merged.pt",
        report=CELL + "/merge.json",
    log:
        CELL + "/logs/merge.log",
    params:
        argv=lambda w, input, output: ["merge", "--checkpoint", input.model, "--out", output.merged,
                                       "--report", output.report],
    script:
        "../scripts/stage.py"


rule bench_device:
    input:
        model=CELL + "/merged.pt",
        dense=RESULTS + "/dense/full/1.0/merged.pt",
    output:
        CELL + "/bench.json",
    log:
        CELL + "/logs/bench_device.log",
    params:
        argv=lambda w, input, output: ["bench-device", "--model", input.model, "--dense", input.dense, "--out", output[0]],
    resources:
        gpu=1,
    script:
        "../scripts/stage.py"


rule bench_mpc:
    input:
        model=CELL + "/merged.pt",
    output:
        CELL + "/mpc.json",
    log:
        CELL + "/logs/bench_mpc.log",
    params:
        argv=lambda w, input, output: ["bench-mpc", "--model", input.model, "--out", output[0]],
    threads: 2  # the two parties (on a 2-core machine: alone while they time)
    benchmark:
        CELL + "/benchmarks/bench_mpc.tsv"
    script:
        "../scripts/stage.py"


rule cost_table:
    output:
        RESULTS + "/latency/{target}-{granularity}.csv",
    log:
        RESULTS + "/latency/logs/{target}-{granularity}.log",
    wildcard_constraints:
        target="cpu|gpu|mpc",
    params:
        argv=lambda w, output: ["cost-table", "--target", w.target, "--granularity", w.granularity, "--out", output[0]],
    resources:
        gpu=lambda w: int(w.target == "gpu"),
    script:
        "../scripts/stage.py"
