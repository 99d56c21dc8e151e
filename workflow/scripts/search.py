from depthshrinker.search import search
from depthshrinker.train import configure

configure(snakemake.threads, snakemake.log[0])
w = snakemake.wildcards
search(snakemake.config, snakemake.input.dense, snakemake.output.model, w.method, w.granularity, float(w.keep),
       snakemake.input.get("costs"))
