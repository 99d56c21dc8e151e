# Measurement of every cell's deployed network (merged by the job that trained it): device and MPC benchmarks;
# and the per-unit cost tables of the platform-aware search. One timing job measures every cell, with every core
# the run has, so no other job shares the machine while it times: the seed-free architectures (common.smk
# SEED_FREE) once, the others for every seed, in one process and one set of CrypTen parties, so the start-up is
# paid once, not per cell (every cell still gets its own bench.json and mpc.json).


BENCH_MODELS, BENCH_DENSE, BENCH_DEVICE, BENCH_MPC = bench_job()


rule bench:
    input:
        models=BENCH_MODELS,
        dense=BENCH_DENSE,
    output:
        device=BENCH_DEVICE,
        mpc=BENCH_MPC,
    log:
        f"{RESULTS}/logs/bench.log",
    benchmark:
        f"{RESULTS}/benchmarks/bench.tsv"
    params:
        config=reads("bench-device", "bench-mpc"),
        argv=bench_argv,
    threads: all_cores
    resources:
        gpu=1,
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
