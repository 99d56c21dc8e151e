from depthshrinker.report import combine

combine(snakemake.input, snakemake.output[0])
