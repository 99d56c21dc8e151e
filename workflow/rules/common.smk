# Grid helpers: validate the config (schema defaults filled in), expand the cells, and hand each rule the config
# sections its stage reads (as params, so a change there reruns exactly that job and what depends on it).
import functools
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from depthshrinker.base.config import ConfigError, for_seed, validate as check
from depthshrinker.base.provenance import search_stage, sections

try:  # the library's check first: one line naming the key; `--config` strings become the schema's numbers
    config.update(check(config))
except ConfigError as err:
    sys.exit(f"depthshrinker: {err}")
validate(config, "../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
CELL = f"{RESULTS}/{{method}}/{{granularity}}/{{keep}}/seed{{seed}}"
DENSE = f"{RESULTS}/dense/full/1.0/seed{{seed}}/model.pt"
SEEDS = config["grid"]["seeds"]
GPU = 1  # GPUs per training job; a profile raises it (set-resources) to train with DDP under torchrun
ENV = "../../envs/depthshrinker.yaml"


def _keeps(values):
    return "|".join(str(float(v)).replace(".", r"\.") for v in values) or "none"


GRID = config["grid"]

wildcard_constraints:  # only the values the config asks for: a mistyped target fails at once, naming no job
    method="dense|depthshrinker|snl|uniform|metapruning|depthdp",
    granularity="full|block|layer|channel|pixel|element|width|mpc|macs|params|segment|layermerge",
    keep=_keeps({1.0, *GRID["depthshrinker"]["keep"], *GRID["snl"]["keep"], *GRID["uniform"]["width"],
                 *GRID["metapruning"]["match"], *GRID["depthdp"]["keep"]}),
    seed="|".join(str(s) for s in SEEDS),


def cells():
    """(method, granularity, keep) of every cell the config asks for; numbers formatted as floats."""
    out = [("dense", "full", "1.0")] if GRID["dense"] else []
    for method in ("depthshrinker", "snl"):
        out += [(method, g, str(float(k))) for g in GRID[method]["granularity"] for k in GRID[method]["keep"]]
    out += [("uniform", "width", str(float(w))) for w in GRID["uniform"]["width"]]
    mp = GRID["metapruning"]
    out += [("metapruning", c, str(float(k))) for c in mp["cost"] for k in mp["match"]]
    dp = GRID["depthdp"]
    out += [("depthdp", g, str(float(k))) for g in dp["granularity"] for k in dp["keep"]]
    return out


def pairs():
    """The paired comparisons of the README (A:B, A − B per seed): DepthShrinker against each SNL granularity at
    the same keep ratio, against MetaPruning at the cost of the DepthShrinker block cell it matches, and depthdp
    against DepthShrinker at its budget."""
    ds = [f"depthshrinker/{g}" for g in GRID["depthshrinker"]["granularity"] if GRID["depthshrinker"]["keep"]]
    out = [f"{a}:snl/{g}" for a in ds for g in GRID["snl"]["granularity"] if GRID["snl"]["keep"]]
    mp, dp = GRID["metapruning"], GRID["depthdp"]
    if "depthshrinker/block" in ds and mp["match"]:
        out += [f"depthshrinker/block:metapruning/{c}" for c in mp["cost"]]
    if "depthshrinker/block" in ds and dp["keep"]:
        out += [f"depthdp/{g}:depthshrinker/block" for g in dp["granularity"]]
    if {"segment", "layermerge"} <= set(dp["granularity"]) and dp["keep"]:
        out += ["depthdp/layermerge:depthdp/segment"]
    return out


def cell_files(name):
    """The file ``name`` of every cell and seed."""
    return [f"{RESULTS}/{m}/{g}/{k}/seed{s}/{name}" for m, g, k in cells() for s in SEEDS]


def reads(*stages):
    """Params function: the config sections the job's ``stages`` read (``row:<method>`` for a row)."""

    def params(wildcards):
        job = for_seed(config, wildcards.get("seed"))
        return {k: v for stage in stages for k, v in sections(job, stage.format(**dict(wildcards.items()))).items()}

    return params


def cost_table(wildcards):
    """The cost table a DepthShrinker search is made platform-aware with (none when latency_target is none)."""
    target = config["stages"]["search"]["latency_target"]
    if wildcards.method != "depthshrinker" or target == "none":
        return []
    return [f"{RESULTS}/latency/{target}-{wildcards.granularity}.csv"]


def all_cores(wildcards):
    """Threads of a timing job: every core of a local run, so no other job shares the machine while it times;
    on a cluster (no total core count) one, unless the profile's set-threads asks for more."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def resources(kind):
    """mem_mb and runtime (minutes) of a rule class from config ``resources``, scaled by the attempt."""
    base = config["resources"][kind]
    return {"mem_mb": lambda wildcards, attempt: base["mem_mb"] * attempt,
            "runtime": lambda wildcards, attempt: base["runtime"] * attempt}


SEED_FREE = {"dense", "uniform", "snl/channel", "snl/pixel"}


def is_seed_free(method, granularity):
    """Does the deployed architecture (so its timings, MACs and MPC costs) not depend on the seed? Dense and
    uniform widths; SNL channel/pixel keep the same count in every layer (only which ones differs)."""
    return bool({method, f"{method}/{granularity}"} & SEED_FREE)


def measured(name):
    """Input function of a row: the cell's benchmark file ``name`` (bench.json, mpc.json); a seed-free
    architecture is measured once, for the first seed, and every seed reads that (bytes, rounds and MACs are
    exact; one timing per architecture is not repeated)."""

    def part(wildcards):
        seed = SEEDS[0] if is_seed_free(wildcards.method, wildcards.granularity) else wildcards.seed
        return f"{RESULTS}/{wildcards.method}/{wildcards.granularity}/{wildcards.keep}/seed{seed}/{name}"

    return part


def bench_job():
    """The inputs and outputs of the timing job: the deployed network of every measured cell (``measured``: a
    seed-free architecture once, for the first seed; the others for every seed), and the dense reference."""
    where = [f"{RESULTS}/{m}/{g}/{k}/seed{seed}" for m, g, k in cells()
             for seed in ([SEEDS[0]] if is_seed_free(m, g) else SEEDS)]
    return ([f"{w}/merged.pt" for w in where], f"{RESULTS}/dense/full/1.0/seed{SEEDS[0]}/merged.pt",
            [f"{w}/bench.json" for w in where], [f"{w}/mpc.json" for w in where])


def bench_argv(w, input, output):
    """Both benchmarks in one process: device latency vs dense, then CrypTen (every network in one set of parties)."""
    return [["bench-device", "--model", *input.models, "--dense", input.dense, "--out", *output.device],
            ["bench-mpc", "--model", *input.models, "--out", *output.mpc]]


def searched(wildcards):
    """The search checkpoint a finetune depends on (SNL element starts from its weights); depthdp has none."""
    return [] if wildcards.method == "depthdp" else f"{CELL}/search.pt".format(**dict(wildcards.items()))


@functools.cache
def depthdp_entries(granularity):
    """The importance entries of the configured model (each a job): Kim et al.'s extended segments s-e-a-b
    (``segment``) or LayerMerge's segment options s-e-k<kernel>[d] (``layermerge``); built once."""
    from depthshrinker.deploy.segments import body
    from depthshrinker.methods import depthdp, layermerge
    from depthshrinker.nets.registry import create_model

    b = body(create_model(config["model"]["arch"], 10, config["model"]["small_input"]))
    if granularity == "layermerge":
        return [layermerge.entry_key(e) for e in layermerge.entries(b)]
    return [depthdp.entry_key(e) for e in depthdp.entries(b, config["depthdp"]["add_relu"])]


def importance_entries(rep):
    """Input function: every importance report of the cell's seed and table (``rep`` 1: the retest, first seed
    only)."""

    def files(wildcards):
        if rep and not (config["depthdp"]["retest"] and int(wildcards.seed) == SEEDS[0]):
            return []
        return [f"{RESULTS}/depthdp/importance/seed{wildcards.seed}/rep{rep}/{e}.json"
                for e in depthdp_entries(wildcards.granularity)]

    return files


def matched_network(wildcards):
    """The DepthShrinker block cell whose deployed network's latency is the budget (``depthdp.budget: match``)."""
    if config["depthdp"]["budget"] != "match":
        return []
    return f"{RESULTS}/depthshrinker/block/{wildcards.keep}/seed{wildcards.seed}/merged.pt"


def latency_of_target(wildcards):
    """The depthdp latency table of the deploy target (``depthdp.target``)."""
    return f"{RESULTS}/latency/{config['depthdp']['target']}-segments.csv"


def timing_threads(wildcards):
    """Threads of a depthdp job that times (a measured table; a measured budget): every core, else one."""
    measured = wildcards.get("target", config["depthdp"]["target"]) != "mpc"
    return all_cores(wildcards) if measured else 1
