# depthdp cells (Kim et al., ICML 2023): the latency table of every block option, the importance table (one job
# per block, so it fans out and an interrupted table resumes where it stopped), then the DP writes the cell's
# mask.json; finetune, merge, benchmarks and row are a DepthShrinker cell's.
DP = config["depthdp"]
IMPORTANCE = f"{RESULTS}/depthdp/importance/seed{{seed}}"


def option_blocks():
    """PlainNet blocks of the configured model that have activations (each an importance job)."""
    from depthshrinker.depthdp import block_options
    from depthshrinker.models import create_model

    model = create_model(config["model"]["arch"], 10, config["model"]["small_input"])
    return [block for block, _, _ in block_options(model)]


def importance_blocks(wildcards):
    return [f"{IMPORTANCE}/{block}.json".format(seed=wildcards.seed) for block in option_blocks()]


def matched_mask(wildcards):
    """The DepthShrinker block cell whose mask's latency is the budget (``depthdp.budget: match``)."""
    if DP["budget"] != "match":
        return []
    return f"{RESULTS}/depthshrinker/block/{wildcards.keep}/seed{wildcards.seed}/mask.json"


def latency_of_target(wildcards):
    target = config["stages"]["search"]["latency_target"]
    if target == "none":
        raise ValueError("depthdp needs stages.search.latency_target cpu, gpu or mpc (its latency table)")
    return f"{RESULTS}/latency/{target}-options.csv"


rule latency_table:
    output:
        f"{RESULTS}/latency/{{target}}-options.csv",
    log:
        f"{RESULTS}/latency/logs/{{target}}-options.log",
    benchmark:
        f"{RESULTS}/latency/benchmarks/{{target}}-options.tsv"
    wildcard_constraints:
        target="cpu|gpu|mpc",
    params:
        config=reads("latency-table"),
        argv=lambda w, output: ["latency-table", "--target", w.target, "--out", output[0]],
    threads: lambda w: 1 if w.target == "mpc" else all_cores(w)  # measured tables time alone
    resources:
        gpu=lambda w: int(w.target == "gpu"),
        **resources("bench"),
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule importance:
    input:
        dense=DENSE,
    output:
        f"{IMPORTANCE}/{{block}}.json",
    log:
        f"{IMPORTANCE}/logs/{{block}}.log",
    benchmark:
        f"{IMPORTANCE}/benchmarks/{{block}}.tsv"
    wildcard_constraints:
        block=r"dense|\d+",
    params:
        config=reads("importance"),
        argv=lambda w, input, output: ["importance", "--dense", input.dense, "--block", w.block, "--out", output[0]],
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
        reference=f"{IMPORTANCE}/dense.json",
        blocks=importance_blocks,
        match=matched_mask,
    output:
        mask=f"{CELL}/mask.json",
    log:
        f"{CELL}/logs/depthdp.log",
    wildcard_constraints:
        method="depthdp",
    params:
        config=reads("depthdp"),
        argv=lambda w, input, output: ["depthdp", "--keep", w.keep, "--latency", input.latency, "--reference",
                                       input.reference, "--blocks", *input.blocks, "--out", output.mask]
        + (["--match", input.match] if input.match else []),
    resources:
        **resources("light"),
    conda:
        ENV
    script:
        "../scripts/stage.py"
