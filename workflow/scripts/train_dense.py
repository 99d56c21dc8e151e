from depthshrinker.baselines import train_dense
from depthshrinker.train import configure

configure(snakemake.threads, snakemake.log[0])
train_dense(snakemake.config, snakemake.output.model)
