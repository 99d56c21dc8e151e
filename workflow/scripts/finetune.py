from depthshrinker.finetune import finetune
from depthshrinker.train import configure

configure(snakemake.threads, snakemake.log[0])
finetune(snakemake.config, snakemake.input.dense, snakemake.input.mask, snakemake.output.model)
