# Run one `depthshrinker` subcommand for a rule: in process, or under torchrun when the rule has gpu > 1.
from depthshrinker.launch import launch

launch(snakemake.params.argv, snakemake.config, snakemake.threads, snakemake.resources.get("gpu", 0),
       snakemake.log[0])
