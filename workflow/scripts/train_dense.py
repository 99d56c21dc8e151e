from depthshrinker.launch import launch

launch(["train-dense", "--out", snakemake.output.model], snakemake.config, snakemake.threads,
       snakemake.resources.get("gpu", 0), snakemake.log[0])
