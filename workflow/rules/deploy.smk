# Deployment and measurement of every cell: merge (BN folded, linear convs merged), device and MPC benchmarks;
# and the per-unit cost tables of the platform-aware search. Timing jobs take every core the run has, so no
# other job shares the machine while they time. One timing job per seed measures every cell whose architecture
# depends on the seed, and one more the seed-free architectures (common.smk SEED_FREE) once: each in one process
# and one set of CrypTen parties, so the start-up is paid once per job, not per cell (every cell still gets its
# own bench.json and mpc.json).


rule merge:
    input:
        model=f"{CELL}/model.pt",
    output:
        merged=f"{CELL}/merged.pt",
        report=f"{CELL}/merge.json",
    log:
        f"{CELL}/logs/merge.log",
    wildcard_constraints:
        method="dense|uniform|metapruning",  # the finetune job merges its own cells
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


for seed_free, name in ((True, "bench_seed_free"), (False, "bench")):
    models, dense, device, mpc = bench_job(seed_free)
    if not models:
        continue
    tag = f"seed{SEEDS[0]}-seed-free" if seed_free else "seed{seed}"

    rule:
        name:
            name
        input:
            models=models,
            dense=dense,
        output:
            device=device,
            mpc=mpc,
        log:
            f"{RESULTS}/logs/bench/{tag}.log",
        benchmark:
            f"{RESULTS}/benchmarks/bench/{tag}.tsv"
        params:
            config=bench_reads,
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
