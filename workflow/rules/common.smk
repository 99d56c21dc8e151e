# Grid helpers: validate the config (schema defaults filled in) and expand the cells.
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
CELL = RESULTS + "/{method}/{granularity}/{keep}"


wildcard_constraints:
    method="dense|depthshrinker|snl",
    granularity="[a-z]+",
    keep=r"[0-9]+\.[0-9]+",


def cells():
    """(method, granularity, keep) of every cell the config asks for; keep formatted as a float string."""
    grid = config["grid"]
    out = [("dense", "full", "1.0")] if grid["dense"] else []
    for method in ("depthshrinker", "snl"):
        cell = grid[method]
        out += [(method, g, str(float(k))) for g in cell["granularity"] for k in cell["keep"]]
    return out


def cell_files(name):
    """The file ``name`` of every cell."""
    return [f"{RESULTS}/{m}/{g}/{k}/{name}" for m, g, k in cells()]


DENSE = f"{RESULTS}/dense/full/1.0/model.pt"
