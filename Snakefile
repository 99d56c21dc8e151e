# DepthShrinker pipeline: dense -> search -> extract -> finetune -> merge -> benchmarks -> results/summary.csv
# Run from this folder (the default profile, profiles/default, is picked up automatically):
#   snakemake --cores all                      the embedded default grid (config/config.yaml)
#   snakemake --cores all --configfile config/imagenet-mbv2-140.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/shrink.smk"
include: "workflow/rules/depthdp.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/summary_by_cell.csv",
        [f"{RESULTS}/paired.md"] if pairs() else [],
        [f for f in cell_files("diagnostics.json") if f.startswith(f"{RESULTS}/depthdp/segment/")],
        f"{RESULTS}/plots",
