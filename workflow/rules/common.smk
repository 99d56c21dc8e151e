# Grid helpers: validate the config (schema defaults filled in) and expand the cells.
import sys

from snakemake.utils import validate

from depthshrinker.config import ConfigError, validate as check

try:  # the library's check first: one line naming the key, instead of jsonschema's report
    check(config)
except ConfigError as err:
    sys.exit(f"depthshrinker: {err}")
validate(config, "../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
CELL = RESULTS + "/{method}/{granularity}/{keep}"
DENSE = f"{RESULTS}/dense/full/1.0/model.pt"
GPU = 1  # GPUs per training job; a profile raises it (set-resources) to train with DDP under torchrun


wildcard_constraints:
    method="dense|depthshrinker|snl|uniform|metapruning",
    granularity="[a-z]+",
    keep=r"[0-9]+\.[0-9]+",


def cells():
    """(method, granularity, keep) of every cell the config asks for; numbers formatted as floats."""
    grid = config["grid"]
    out = [("dense", "full", "1.0")] if grid["dense"] else []
    for method in ("depthshrinker", "snl"):
        out += [(method, g, str(float(k))) for g in grid[method]["granularity"] for k in grid[method]["keep"]]
    out += [("uniform", "width", str(float(w))) for w in grid["uniform"]["width"]]
    mp = grid["metapruning"]
    out += [("metapruning", c, str(float(k))) for c in mp["cost"] for k in mp["match"]]
    return out


def cell_files(name):
    """The file ``name`` of every cell."""
    return [f"{RESULTS}/{m}/{g}/{k}/{name}" for m, g, k in cells()]


def cost_table(wildcards):
    """The cost table a DepthShrinker search is made platform-aware with (none when latency_target is none)."""
    target = config["stages"]["search"]["latency_target"]
    if wildcards.method != "depthshrinker" or target == "none":
        return []
    return [f"{RESULTS}/latency/{target}-{wildcards.granularity}.csv"]

