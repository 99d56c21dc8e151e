from depthshrinker.launch import launch

launch(["finetune", "--dense", snakemake.input.dense, "--mask", snakemake.input.mask, "--out", snakemake.output.model],
       snakemake.config, snakemake.threads, snakemake.resources.get("gpu", 0), snakemake.log[0])
