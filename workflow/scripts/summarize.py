from depthshrinker.report import summarize

summarize(snakemake.input, snakemake.output[0])
