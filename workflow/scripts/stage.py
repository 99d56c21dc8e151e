# Run one `depthshrinker` subcommand for a rule, with its job's config (the seed wildcard applied): in process,
# or under torchrun when the rule has gpu > 1.
from depthshrinker.base.config import for_seed
from depthshrinker.launch import launch

launch(snakemake.params.argv, for_seed(snakemake.config, snakemake.wildcards.get("seed")), snakemake.threads,
       snakemake.resources.get("gpu", 0), snakemake.log[0])
