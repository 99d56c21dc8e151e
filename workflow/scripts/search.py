from depthshrinker.launch import launch

w = snakemake.wildcards
costs = ["--costs", snakemake.input.costs] if "costs" in snakemake.input.keys() else []
launch(["search", "--dense", snakemake.input.dense, "--out", snakemake.output.model, "--method", w.method,
        "--granularity", w.granularity, "--keep", w.keep, *costs],
       snakemake.config, snakemake.threads, snakemake.resources.get("gpu", 0), snakemake.log[0])
