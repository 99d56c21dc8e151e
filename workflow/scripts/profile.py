from depthshrinker.report import profile_cell
from depthshrinker.train import configure

configure(snakemake.threads, snakemake.log[0])
w = snakemake.wildcards
profile_cell(snakemake.input.model, w.method, w.granularity, float(w.keep),
             snakemake.config["data"]["image_size"], snakemake.output[0])
