"""LayerMerge (Kim, Lee & Song, "LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging",
ICML 2024) as the authors run it, on Kim et al.'s tables (``depthdp``): a segment may also *drop* convs.

* Entries, one importance job each: every valid segment ``(s, e)`` under each of its options
  (``segments.segment_options``: the merged (kernel, depthwise) reachable by dropping reducible convs), named
  ``s-e-k<kernel>[d]``; the convs it keeps are the irreducible ones and the reducible ones of largest L1 norm in
  the dense network (``segments.kept_convs``, the reference's ``find_max_importance_candidate``). An entry is
  measured as the dense network with only that segment changed: its inner activations removed, its dropped convs
  the identity, an activation at its end (the dense one, or ``depthdp.added_act`` where a merged segment of more
  than one conv ends without one: the reference's rule), a single conv re-initialised; then the same finetune and
  score as Kim et al.'s entries (``importance``).
* Importance: ``exp(Δ top-1 / 100)`` (the reference's ``normalize_imp``), or with ``depthdp.importance: loss``
  ``exp(−Δ loss / base loss)`` (its loss-ratio form), uncapped.
* The DP (``segment_dp.layermerge_dp``): one segment per edge, its option's latency plus the activation it keeps
  at its end, Σ importance maximised under the budget; the mask lists the segments, the kept activations and the
  dropped convs, and the cell finetunes in that ``segment_form``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.deploy.segments import Body, body, kept_convs, segment_options, valid_segments
from depthshrinker.methods import depthdp
from depthshrinker.methods.segment_dp import layermerge_dp
from depthshrinker.nets.plain import layout

Entry = tuple[int, int, str]
ENTRY = re.compile(r"(\d+)-(\d+)-(k\d+d?)")


def entries(b: Body) -> list[Entry]:
    """Every (segment, option) of the body, in the reference's order (391 on MobileNetV2-1.0, 150 on ResNet-34)."""
    return [(s, e, o.label) for s, e in valid_segments(b) for o in segment_options(b, s, e)]


def entry_key(entry: Entry) -> str:
    return "-".join(map(str, entry))


def parse_entry(text: str) -> Entry | None:
    """A LayerMerge entry ``s-e-k<kernel>[d]``, or None where ``text`` is not one."""
    match = ENTRY.fullmatch(text)
    return (int(match[1]), int(match[2]), match[3]) if match else None


def ends_with_act(b: Body, s: int, e: int) -> bool:
    """Does segment ``(s, e)`` keep an activation at its end: the dense network has one there, or it merges more
    than one conv (the reference adds one)."""
    return e - s > 1 or b.convs[e - 1].act != "none"


@torch.no_grad()
def l1_norms(model: nn.Module, b: Body) -> dict[int, float]:
    """Body position -> L1 norm of its conv's weight (which reducible convs an option keeps)."""
    lay = layout(model)
    return {p: lay.blocks[c.block].convs[c.index].conv.weight.abs().sum().item() for p, c in enumerate(b.convs, 1)}


def entry_form(b: Body, entry: Entry, norms: dict[int, float]) -> tuple[list[tuple[int, int]], set[int], set[int]]:
    """The segments, kept activations and dropped convs of the dense network with only ``entry`` changed."""
    s, e, label = entry
    option = next((o for o in segment_options(b, s, e) if o.label == label), None)
    if (s, e) not in set(valid_segments(b)) or option is None:
        raise ConfigError(f"layermerge entry '{entry_key(entry)}' is not a segment option of this network "
                          f"({len(entries(b))} are)")
    segments, acts = depthdp.entry_form(b, (s, e, int(s in depthdp.dense_acts(b)), int(ends_with_act(b, s, e))))
    dropped = set(range(s + 1, e + 1)) - set(kept_convs(b, s, e, option, norms))
    return segments, acts, dropped


def scores(paths: list[str | Path], metric: str, b: Body) -> dict[Entry, tuple[float, list[int]]]:
    """Entry -> (LayerMerge importance, dropped positions) of ``importance`` reports (module docstring); a report
    whose dropped convs do not fit its option is refused by name."""
    out = {}
    for path in paths:
        r = read_json(path)
        s, e, label = key = tuple(r["entry"])
        option = next(o for o in segment_options(b, s, e) if o.label == label)
        if len(r["dropped"]) != e - s - sum(n for _, n in option.counts) or not set(r["dropped"]) <= set(range(s + 1, e + 1)):
            raise ConfigError(f"{path}: drops {r['dropped']} convs, not what option {entry_key(key)} drops")
        gain = r["delta_top1"] / 100 if metric == "top1" else -r["delta_loss"] / r["base_loss"]
        out[key] = (math.exp(gain), r["dropped"])
    return out


def plan(config: dict, keep: float, latency_csv: str | Path, importance_paths: list[str | Path], out: str | Path,
         match: str | Path | None = None) -> dict:
    """Stage: LayerMerge's DP at the budget (``depthdp.budget``, as ``depthdp.plan``); writes the mask ``out``."""
    cfg = config["depthdp"]
    b = body(depthdp.model_of(config))
    table = depthdp.read_latency_table(latency_csv)
    score = scores(importance_paths, cfg["importance"], b)
    missing = [entry_key(k) for k in entries(b) if k not in score]
    if missing:
        raise ConfigError(f"layermerge: no importance for entries {', '.join(missing[:5])} ({len(missing)} missing)")
    total, dense_latency, source = depthdp.budget(config, keep, b, table, match)
    graph = {(s, e, label): (table.option[s, e, label] + (table.act[e] if ends_with_act(b, s, e) else 0.0),
                             score[s, e, label][0]) for s, e, label in score}
    try:
        chosen = layermerge_dp(graph, len(b), total - table.outside)
    except ValueError as err:
        raise ConfigError(f"layermerge: {err} (body latencies in s; the rest of the network adds {table.outside:.6g})") from None
    segments = [(s, e) for s, e, _ in chosen["segments"]]
    acts = [e for s, e in segments if ends_with_act(b, s, e)]
    dropped = sorted(p for key in chosen["segments"] for p in score[key][1])
    latency = chosen["latency"] + table.outside
    mask = {"method": "depthdp", "granularity": "layermerge", "keep_ratio": keep,
            "segments": [list(s) for s in segments], "acts": acts, "dropped": dropped, "added": cfg["added_act"],
            "num_segments": len(segments), "num_acts": len(acts), "num_dropped": len(dropped),
            "dp": {**source, "target": cfg["target"], "network": config["mpc"]["network"], "metric": cfg["importance"],
                   "budget_latency": total, "latency": latency, "dense_latency": dense_latency,
                   "importance": chosen["importance"], "options": [entry_key(k) for k in chosen["segments"]],
                   "entries": len(score)},
            "row": {"dp_budget_fraction": total / dense_latency, "dp_latency_fraction": latency / dense_latency,
                    "dp_importance": chosen["importance"]}}
    write_json(out, mask)
    return mask
