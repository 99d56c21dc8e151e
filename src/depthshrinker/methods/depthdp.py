"""depthdp: Kim et al., "Efficient Latency-Aware CNN Depth Compression via Two-Stage Dynamic Programming" (ICML
2023), as the authors run it, on any network the IR takes.

Three stages, each one CLI subcommand:

* ``latency_table``: Kim et al.'s table ``T`` under the deploy target, one row per valid merge segment
  (``deploy.segments``, the reference's ``valid_blks``) as one conv, one per LayerMerge option of a segment
  (``layermerge``), one per kept activation, and the fixed rest of the network (``deploy.segment_cost``; ``mpc``:
  the CrypTen cost model at ``mpc.network``, exact).
* ``importance`` (``methods.importance``), one job per *extended segment* ``(s, e, a, b)`` (``entries``): the
  dense network with only that segment linear (its activations removed, pad-first, ``segment_form``), finetuned
  and scored on the selection split against the dense network.
* ``plan``: ``Δ − α·mean(Δ of the single convs)`` (uncapped, the reference's ``norm single``), the extended
  importance and the second DP (``segment_dp.kim_dp``) under the budget; writes the cell's mask: the segments
  (every chosen span cut at its fastest split) and the positions that keep an activation.
* ``diagnose``: the DepthShrinker mask of the same budget scored in the DP's own table (its activations fixed,
  the best segments for them) against the DP's optimum: does the table rank the two as their finetuned
  accuracies do? And, where the table was measured twice, how well the two measurements agree.

``a``/``b`` say whether an activation is kept at the span's start/end. Where the dense network has one it is
kept; at a block end without one (MobileNetV2's projections) it is 0, or, with ``depthdp.add_relu``, 0 or 1
(the reference's optional ReLU6 after the add; doubles the entries there). The budget is the latency of the
DepthShrinker block cell's deployed network at the same keep ratio under the same cost model (``budget:
match``), or ``keep`` × the dense network's (``fraction``).
"""
from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.base.stats import spearman
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.segment_cost import segment_costs
from depthshrinker.deploy.segment_timing import measured_ratio, measured_table
from depthshrinker.deploy.segments import Body, body, valid_segments
from depthshrinker.deploy.tables import write_csv
from depthshrinker.methods.finetune import read_mask
from depthshrinker.methods.segment_dp import kim_dp, kim_normalised
from depthshrinker.nets.plain import layout, to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

Entry = tuple[int, int, int, int]


def dense_acts(b: Body) -> set[int]:
    """Body positions where the dense network has an activation."""
    return {p for p in range(1, len(b) + 1) if b.convs[p - 1].act != "none"}


def entries(b: Body, add_relu: bool = False) -> list[Entry]:
    """The extended segments whose importance is measured (module docstring), in the reference's order."""
    dense = dense_acts(b) | {0}

    def options(p: int) -> list[int]:
        if p in dense:
            return [1]
        return [1, 0] if add_relu and p in b.block_ends else [0]

    return [(s, e, a, z) for s, e in valid_segments(b) for a, z in itertools.product(options(s), options(e))]


def entry_key(entry: Entry) -> str:
    return "-".join(map(str, entry))


def parse_entry(text: str) -> Entry:
    try:
        s, e, a, z = (int(v) for v in text.split("-"))
    except ValueError:
        raise ConfigError(f"depthdp entry '{text}': expected s-e-a-b (four integers)") from None
    return s, e, a, z


def entry_form(b: Body, entry: Entry) -> tuple[list[tuple[int, int]], set[int]]:
    """The segments and kept activations of the dense network with only ``entry`` linear."""
    s, e, a, z = entry
    segments = [(p, p + 1) for p in range(s)] + [(s, e)] + [(p, p + 1) for p in range(e, len(b))]
    acts = {p for p in dense_acts(b) if not s < p < e} - {s, e}
    acts |= {p for p, keep in ((s, a), (e, z)) if keep and p > 0}
    return segments, acts


def model_of(config: dict) -> nn.Module:
    """The configured backbone, randomly initialised, with a 10-class head (its structure is what the tables need)."""
    m = config["model"]
    return create_model(m["arch"], 10, m["small_input"])


def _device(config: dict, target: str) -> tuple[str, int]:
    """(device, batch) of a measured table: batch 1 on the CPU, the configured batch on a GPU."""
    if target == "gpu" and not torch.cuda.is_available():
        raise ConfigError("depthdp.target: 'gpu' needs a CUDA device")
    return ("cuda", config["data"]["batch_size"]) if target == "gpu" else ("cpu", 1)


def latency_table(config: dict, target: str, out: str | Path) -> list[dict]:
    """Stage: write ``out`` (CSV, ``#`` header naming the target): rows ``kind`` = ``segment`` (``s``, ``e``),
    ``option`` (``s``, ``e``, ``option``), ``act`` (position ``e``), ``outside`` (once), each with ``latency`` (s);
    ``mpc``: the cost model (with ``bytes`` and ``rounds``), ``cpu``/``gpu``: measured (``deploy.segment_timing``);
    a 10-class head."""
    if target not in ("mpc", "cpu", "gpu"):
        raise ConfigError(f"depthdp.target: '{target}' is not one of mpc, cpu, gpu")
    size, added = config["data"]["image_size"], config["depthdp"]["added_act"]
    if target == "mpc":
        network = config["mpc"]["network"]
        t = segment_costs(model_of(config), size, added)
        note = f"two-party CrypTen cost model, {network} preset"

        def cells(c: mpc_cost.Cost) -> dict:
            return {"latency": mpc_cost.latency(c, network), "bytes": c.bytes, "rounds": c.rounds}
    else:
        device, batch = _device(config, target)
        t = measured_table(model_of(config), size, added, device, batch)
        note = f"measured on {device}, batch {batch}, {torch.get_num_threads()} threads, median of 7"

        def cells(v: float) -> dict:
            return {"latency": v, "bytes": "", "rounds": ""}
    rows = [{"kind": "segment", "s": s, "e": e, "option": "", **cells(v)} for (s, e), v in t.segment.items()]
    rows += [{"kind": "option", "s": s, "e": e, "option": label, **cells(v)} for (s, e, label), v in t.option.items()]
    rows += [{"kind": "act", "s": "", "e": p, "option": "", **cells(v)} for p, v in t.act.items()]
    rows += [{"kind": "outside", "s": "", "e": "", "option": "", **cells(t.outside)}]
    write_csv(out, rows, f"# depthdp latency table of {config['model']['arch']} at {size}x{size}: {note}; "
                         "latency in seconds per call, bytes per party")
    return rows


@dataclass(frozen=True)
class LatencyTable:
    """A read ``latency_table``: ``segment[(s, e)]``, ``option[(s, e, label)]`` (LayerMerge), ``act[p]`` and
    ``outside`` latencies (s)."""
    segment: dict[tuple[int, int], float]
    option: dict[tuple[int, int, str], float]
    act: dict[int, float]
    outside: float


def read_latency_table(path: str | Path) -> LatencyTable:
    """The ``LatencyTable`` of a ``latency_table`` CSV."""
    if not Path(path).is_file():
        raise ConfigError(f"file not found: {path}")
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    try:
        return LatencyTable(
            segment={(int(r["s"]), int(r["e"])): float(r["latency"]) for r in rows if r["kind"] == "segment"},
            option={(int(r["s"]), int(r["e"]), r["option"]): float(r["latency"]) for r in rows if r["kind"] == "option"},
            act={int(r["e"]): float(r["latency"]) for r in rows if r["kind"] == "act"},
            outside=next(float(r["latency"]) for r in rows if r["kind"] == "outside"))
    except (KeyError, ValueError, StopIteration) as err:
        raise ConfigError(f"{path}: not a depthdp latency table ({type(err).__name__}: {err})") from None


SIGN = {"top1": ("delta_top1", 1.0), "loss": ("delta_loss", -1.0)}  # importance = sign · Δ metric


def measured(paths: list[str | Path], metric: str) -> dict[Entry, float]:
    """Entry -> Δ (top-1 points gained, or selection loss saved) of ``importance`` reports."""
    field, sign = SIGN[metric]
    out = {}
    for path in paths:
        report = read_json(path)
        out[tuple(report["entry"])] = sign * report[field]
    return out


def _deployed(chosen: dict) -> tuple[list[tuple[int, int]], list[int]]:
    """The segments (each span cut at its fastest split) and kept activations of a ``kim_dp`` result."""
    points = [0, *chosen["merges"]]
    return [(s, e) for s, e in zip(points, points[1:])], chosen["acts"]


def budget(config: dict, keep: float, b: Body, table: LatencyTable,
           match: str | Path | None) -> tuple[float, float, dict]:
    """(budget latency, dense latency, how the budget was set) of a DP cell: with ``depthdp.budget: match`` the
    latency of ``match`` (the DepthShrinker cell's merged checkpoint): under ``mpc`` its cost-model latency, on a
    measured target the table's dense latency × the speed ratio of the two networks timed side by side; else
    ``keep`` × dense."""
    if (config["depthdp"]["budget"] == "match") != (match is not None):
        raise ConfigError("depthdp.budget: 'match' needs the DepthShrinker cell to match (--match), and only it")
    dense = (table.outside + sum(table.segment[p - 1, p] for p in range(1, len(b) + 1))
             + sum(table.act[p] for p in dense_acts(b)))
    if match is None:
        return keep * dense, dense, {"budget": "fraction"}
    merged, _ = load_model(match)
    size, target = config["data"]["image_size"], config["depthdp"]["target"]
    if target == "mpc":
        return (mpc_cost.latency(mpc_cost.count(merged.spec, size), config["mpc"]["network"]), dense,
                {"budget": "match", "match": str(match)})
    ratio = measured_ratio(merged, to_plain(model_of(config)), size, *_device(config, target))
    return ratio * dense, dense, {"budget": "match", "match": str(match), "measured_ratio": ratio}


def plan(config: dict, keep: float, latency_csv: str | Path, importance_paths: list[str | Path], out: str | Path,
         match: str | Path | None = None) -> dict:
    """Stage: normalise the measured table, solve Kim et al.'s DP at the budget (``budget``) and write the mask
    ``out``."""
    cfg = config["depthdp"]
    b = body(model_of(config))
    lat = read_latency_table(latency_csv)
    delta = measured(importance_paths, cfg["importance"])
    missing = [entry_key(k) for k in entries(b, cfg["add_relu"]) if k not in delta]
    if missing:
        raise ConfigError(f"depthdp: no importance for entries {', '.join(missing[:5])} ({len(missing)} missing)")
    table = kim_normalised(delta, cfg["alpha"])
    total, dense_latency, source = budget(config, keep, b, lat, match)
    try:
        chosen = kim_dp(lat.segment, table, len(b), total - lat.outside, lat.act)
    except ValueError as err:
        raise ConfigError(f"depthdp: {err} (body latencies in s; the rest of the network adds {lat.outside:.6g})") from None
    segments, acts = _deployed(chosen)
    diagnostics = {"entries": len(delta), "delta_min": min(delta.values()), "delta_max": max(delta.values()),
                   "single_mean": (sum(v for (s, e, _, _), v in delta.items() if e - s == 1)
                                   / max(1, sum(e - s == 1 for s, e, _, _ in delta)))}
    latency = chosen["latency"] + lat.outside
    mask = {"method": "depthdp", "granularity": "segment", "keep_ratio": keep, "segments": [list(s) for s in segments],
            "acts": acts, "added": cfg["added_act"], "num_segments": len(segments), "num_acts": len(acts),
            "dp": {**source, "target": cfg["target"], "network": config["mpc"]["network"], "metric": cfg["importance"],
                   "alpha": cfg["alpha"], "budget_latency": total, "latency": latency,
                   "dense_latency": dense_latency, "importance": chosen["importance"],
                   "spans": [list(span) for span in chosen["spans"]], **diagnostics},
            "row": {"dp_budget_fraction": total / dense_latency, "dp_latency_fraction": latency / dense_latency,
                    "dp_importance": chosen["importance"]}}
    write_json(out, mask)
    return mask


def kept_positions(model: nn.Module, b: Body, mask: dict) -> set[int]:
    """Body positions whose activation a DepthShrinker mask keeps (the stem's and head's are not in the body)."""
    units = activation_units(model, mask["granularity"])
    where = layout(model).act_positions()
    position = {(c.block, c.index): p for p, c in enumerate(b.convs, start=1)}
    return {position[where[a]] for u, k in zip(units, mask["keep"]) if k for a in u.acts
            if where.get(a) in position}


def diagnose(config: dict, mask_path: str | Path, ds_mask_path: str | Path, latency_csv: str | Path,
             importance_paths: list[str | Path], out: str | Path, retest: list[str | Path] | None = None) -> dict:
    """Stage: the DepthShrinker mask ``ds_mask_path`` in the DP's own table: the most important segments that keep
    exactly its activations within the DP's budget, their Σ importance and latency, beside the DP's choice
    ``mask_path`` (``ds_importance`` None where its activations fit no segmentation within the budget);
    with ``retest`` (the same entries measured with another adaptation seed) the Spearman rank correlation of the
    two measurements (``retest_spearman``); writes ``out`` (JSON)."""
    cfg = config["depthdp"]
    model = model_of(config)
    b = body(model)
    lat = read_latency_table(latency_csv)
    delta = measured(importance_paths, cfg["importance"])
    table = kim_normalised(delta, cfg["alpha"])
    kept = kept_positions(model, b, read_mask(ds_mask_path))
    same = {(s, e, a, z): v for (s, e, a, z), v in table.items()
            if a == (s == 0 or s in kept) and z == (e in kept) and not kept & set(range(s + 1, e))}
    mask = read_json(mask_path)
    dp = mask["dp"]
    try:
        ds = kim_dp(lat.segment, same, len(b), dp["budget_latency"] - lat.outside, lat.act)
    except ValueError:
        ds = {"importance": None, "latency": math.nan}
    report = {"ds_mask": str(ds_mask_path), "ds_acts": len(kept), "ds_importance": ds["importance"],
              "ds_latency": ds["latency"] + lat.outside, "dp_acts": len(mask["acts"]),
              "dp_importance": dp["importance"], "dp_latency": dp["latency"], "budget_latency": dp["budget_latency"],
              "dp_minus_ds_importance": None if ds["importance"] is None else dp["importance"] - ds["importance"]}
    if retest:
        again = measured(retest, cfg["importance"])
        common = sorted(set(delta) & set(again))
        report |= {"retest_spearman": spearman([delta[k] for k in common], [again[k] for k in common]),
                   "retest_entries": len(common)}
    write_json(out, report)
    return report
