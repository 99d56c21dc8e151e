"""Provenance: the config sections each stage reads, their hash, and the software that produced a result.

``READS`` is the one list of what every stage reads from the config. The workflow passes
``sections(config, stage)`` as each rule's ``params`` (Snakemake reruns a job whose params changed, and then
everything downstream of it), and the CLI stamps ``provenance(config, stage)`` into the stage's JSON output,
so a result always names the config it answers and a config change never leaves an old result standing."""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

from depthshrinker.base.config import ConfigError

_MERGE_PLAN = ("stages.search.latency_target", "mpc.network", "model.free_act")  # what decides the merge plan
# what trains a network whose activations are all kept: not `model.free_act` (only a stage-2 network has one)
_TRAIN = ("seed", "data", "model.arch", "model.small_input", "model.pretrained", "train")
READS: dict[str, tuple[str, ...]] = {
    "train-dense": (*_TRAIN, "stages.dense"),
    "train-uniform": (*_TRAIN, "stages.uniform", "stages.distill"),
    "metaprune": (*_TRAIN, "stages.pruned", "stages.distill", "metapruning", "mpc.network"),
    "cost-table": ("data.image_size", "data.batch_size", "model", *_MERGE_PLAN),  # 10-class head: no dataset
    "search": (*_TRAIN, "stages.search"),  # DepthShrinker's and SNL's channel/pixel searches do not distil
    "search-distilled": (*_TRAIN, "stages.search", "stages.distill"),  # SNL element
    "extract": (),
    "latency-table": ("data.image_size", "data.batch_size", "model.arch", "model.small_input", "mpc.network",
                      "depthdp.added_act"),
    # an entry is measured alike whatever depthdp.add_relu (which only decides which entries exist)
    "importance": (*_TRAIN, "stages.finetune", "stages.distill", "depthdp.epochs", "depthdp.lr", "depthdp.added_act"),
    "depthdp": ("data.image_size", "data.batch_size", "model.arch", "model.small_input", "mpc.network",
                "depthdp.target", "depthdp.budget", "depthdp.importance", "depthdp.alpha", "depthdp.add_relu",
                "depthdp.added_act"),  # Kim et al.'s DP; depthdp.retest decides only the diagnostics
    "depthdp-layermerge": ("data.image_size", "data.batch_size", "model.arch", "model.small_input", "mpc.network",
                           "depthdp.target", "depthdp.budget", "depthdp.importance", "depthdp.added_act"),
    "depthdp-diagnose": ("model.arch", "model.small_input", "depthdp"),
    "finetune": (*_TRAIN, "model.free_act", "stages.search.latency_target", "stages.finetune", "stages.distill",
                 "mpc.network"),
    "merge": ("seed", "data", *_MERGE_PLAN),
    "merge-full": ("seed", "data"),  # a network that keeps every activation: nothing merges, no plan key is read
    "bench-device": ("data.image_size", "bench"),
    "bench-mpc": ("data.image_size", "mpc"),
    "summarize": (),
    "aggregate": (),
    "compare": ("grid",),  # the workflow's pairs come from the grid
    "plots": ("data", "model.arch", "stages", "grid.seeds"),
}

_DEPLOY = ("merge", "bench-device", "bench-mpc")
_KEPT = ("merge-full", "bench-device", "bench-mpc")  # networks that keep every activation
CHAINS: dict[str, tuple[str, ...]] = {  # the stages a cell's row depends on, by method
    "dense": ("train-dense", *_KEPT),
    "depthshrinker": ("train-dense", "cost-table", "search", "extract", "finetune", *_DEPLOY),
    "snl": ("train-dense", "search-distilled", "extract", "finetune", *_DEPLOY),  # the union over granularities
    "uniform": ("train-dense", "train-uniform", *_KEPT),
    "metapruning": ("train-dense", "cost-table", "search", "extract", "finetune", "metaprune", "merge", *_KEPT),
    "depthdp": ("train-dense", "latency-table", "importance", "depthdp", "depthdp-layermerge", "cost-table",
                "search", "extract", "finetune", *_DEPLOY),  # with depthdp.budget match, the DepthShrinker mask sets the budget
}


def search_stage(method: str, granularity: str) -> str:
    """The READS entry of a search: only SNL's element search distils from the dense network."""
    return "search-distilled" if (method, granularity) == ("snl", "element") else "search"


def _get(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"config key '{dotted}' is missing")
        node = node[key]
    return node


def reads(stage: str) -> tuple[str, ...]:
    """The dotted config keys ``stage`` reads; ``row:<method>`` is the union over the method's whole chain."""
    if stage.startswith("row:") and stage[4:] in CHAINS:
        return tuple(dict.fromkeys(key for s in CHAINS[stage[4:]] for key in READS[s]))
    if stage not in READS:
        raise ConfigError(f"unknown stage '{stage}' (known: {', '.join(READS)}, row:<method>)")
    return READS[stage]


def sections(config: dict, stage: str) -> dict:
    """``{dotted key: value}`` of every config section ``stage`` reads (a copy, JSON-able)."""
    return {key: copy.deepcopy(_get(config, key)) for key in reads(stage)}


def config_hash(values: dict) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``values``."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def software() -> dict:
    """Versions of the project, torch, timm and CrypTen, and the git revision (and dirty flag) of this checkout."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    dirty = None if revision is None else bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"depthshrinker": _version("depthshrinker"), "git_revision": revision, "git_dirty": dirty,
            **{name: _version(name) for name in ("torch", "timm", "crypten")}}


def provenance(config: dict, stage: str) -> dict:
    """The block a stage stamps into its JSON output: stage, the sections it read and their hash, versions."""
    read = sections(config, stage)
    return {"stage": stage, "config_hash": config_hash(read), "config": read, **software()}
