from depthshrinker.search import extract
from depthshrinker.train import configure

configure(snakemake.threads, snakemake.log[0])
extract(snakemake.input.search, snakemake.output.mask)
