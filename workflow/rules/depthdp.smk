# depthdp cells (Kim et al., ICML 2023, granularity segment; LayerMerge, ICML 2024, granularity layermerge; as the
# authors run them): the latency table of every merge segment and option, the importance of every table entry (one
# job each, so the table fans out over cores and cluster nodes and an interrupted table resumes where it stopped),
# then the DP writes the cell's mask.json (and, for Kim et al., diagnostics.json: the DepthShrinker mask of the
# same budget in the DP's table, the retest); finetune (in the segment form), merge, benchmarks and row are a
# DepthShrinker cell's. Input functions: common.smk.
IMPORTANCE = f"{RESULTS}/depthdp/importance/seed{{seed}}/rep{{rep}}"


rule latency_table:
    output:
        f"{RESULTS}/latency/{{target}}-segments.csv",
    log:
        f"{RESULTS}/latency/logs/{{target}}-segments.log",
    wildcard_constraints:
        target="mpc|cpu|gpu",
    params:
        config=reads("latency-table"),
        argv=lambda w, output: ["latency-table", "--target", w.target, "--out", output[0]],
    threads: timing_threads
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule importance:
    input:
        dense=DENSE,
    output:
        f"{IMPORTANCE}/{{entry}}.json",
    log:
        f"{IMPORTANCE}/logs/{{entry}}.log",
    benchmark:
        f"{IMPORTANCE}/benchmarks/{{entry}}.tsv"
    wildcard_constraints:
        entry=r"\d+-\d+-([01]-[01]|k\d+d?)",
        rep="0|1",
    params:
        config=reads("importance"),
        argv=lambda w, input, output: ["importance", "--dense", input.dense, "--entry", w.entry, "--rep", w.rep,
                                       "--out", output[0]],
    threads: config["threads"]
    resources:
        gpu=GPU,
        **resources("train"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule depthdp:
    input:
        latency=latency_of_target,
        entries=importance_entries(0),
        match=matched_network,
    output:
        mask=f"{CELL}/mask.json",
    log:
        f"{CELL}/logs/depthdp.log",
    wildcard_constraints:
        method="depthdp",
    params:
        config=lambda w: reads("depthdp-layermerge" if w.granularity == "layermerge" else "depthdp")(w),
        argv=lambda w, input, output: ["depthdp", "--granularity", w.granularity, "--keep", w.keep, "--latency",
                                       input.latency, "--entries", *input.entries, "--out", output.mask]
        + (["--match", input.match] if input.match else []),
    threads: timing_threads
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule depthdp_diagnostics:
    input:
        mask=f"{CELL}/mask.json",
        ds_mask=f"{RESULTS}/depthshrinker/block/{{keep}}/seed{{seed}}/mask.json",
        latency=latency_of_target,
        entries=importance_entries(0),
        retest=importance_entries(1),
    output:
        f"{CELL}/diagnostics.json",
    log:
        f"{CELL}/logs/diagnostics.log",
    wildcard_constraints:
        method="depthdp",
        granularity="segment",
    params:
        config=reads("depthdp-diagnose"),
        argv=lambda w, input, output: ["depthdp-diagnose", "--mask", input.mask, "--ds-mask", input.ds_mask,
                                       "--latency", input.latency, "--entries", *input.entries, "--out", output[0]]
        + (["--retest", *input.retest] if input.retest else []),
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
