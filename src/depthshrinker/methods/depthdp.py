"""depthdp: latency-optimal depth compression by dynamic programming (Kim et al., "Efficient Latency-Aware CNN
Depth Compression via Two-Stage Dynamic Programming", ICML 2023), on the network DepthShrinker merges.

Kim et al. pick the merged segments (convs i..j, their activations removed, merged into one conv) that maximise
the summed importance under a latency budget T₀, from two look-up tables over the candidate segments. Here a
merge never crosses a block (residual additions and block boundaries stay, as in DepthShrinker), so the
segments of a block are fixed by which of its activations stay: an *option* of a block is a keep pattern of its
activations (``2^k`` for ``k`` activations: 4 per inverted-residual block of MobileNetV2, 2 for the stem, the
first block and the head), and its segments are the linear runs that pattern leaves, merged by the cell's merge
plan. The tables, one row per (block, option):

* latency (``latency_table``): the block as deployed with that option (activations removed, the free activation
  where the block became linear, BN folded, merged by ``plan.merge_policy``), under the deploy target:
  ``mpc``, the CrypTen cost model's latency at ``mpc.network`` (bytes and rounds exact); ``cpu`` / ``gpu``,
  measured as the cost table measures (interleaved repeats, median);
* importance (``importance``, one job per block): selection-split top-1 (%) of the dense network with only that
  option applied, after a short finetune (``depthdp.adapt_steps`` SGD steps, BN recalibrated), minus the same
  for the dense network (``block = "dense"``), so that keeping every activation scores 0; or, with
  ``depthdp.importance: loss``, the cross-entropy it saves over the dense network (where top-1 saturates);
  at most 0 (``importance_table``). Never the test split.

``solve`` is the DP: one option per block maximising Σ importance with Σ latency ≤ T₀, exact (a front of
non-dominated (latency, importance, activations kept) over the blocks instead of Kim et al.'s latency grid, so no
rounding of latencies); ties go to more activations kept, then to the lower latency. ``plan`` writes the choice
as a mask in the format ``finetune`` reads (``keep`` over the ``layer`` units), so the rest of the cell is
DepthShrinker's. The budget is ``keep`` × the dense blocks' latency,
or, with ``depthdp.budget: match``, the latency of the DepthShrinker block cell at the same keep ratio under the
same table (equal cost by construction). Not done: LayerMerge's pruned conv layers (Kim et al., ICML 2024).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import itertools
import math
from pathlib import Path

import torch

from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_datasets
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.plan import apply_keep, merge_policy
from depthshrinker.deploy.tables import UNITS, block_inputs, shrunk, table_model, unit_blocks, write_csv
from depthshrinker.methods.finetune import read_mask
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

TOLERANCE = 1e-9  # relative: a sum of the same latencies in another order still meets its own budget


def solve(blocks: list[list[tuple]], budget: float) -> tuple[list[int], float, float, int]:
    """Exact DP over blocks: ``blocks[b][o] = (latency, importance[, kept])`` of option ``o`` of block ``b``;
    returns (option per block, Σ latency, Σ importance, size of the last front) maximising Σ importance subject to
    Σ latency ≤ ``budget`` (latencies ≥ 0); ties go to more Σ kept (an integer, 0 when not given: activations
    kept, so that removals the importance cannot tell from free are made only as far as the budget needs), then
    to the lower latency (exact ties: the first found, deterministic). Raises ConfigError when no choice fits.

    A partial choice is dropped when another is no slower, no less important and keeps no fewer: every
    completion of the dropped one is at best matched by the same completion of the other."""
    limit = budget * (1 + TOLERANCE) + TOLERANCE
    kept_of = lambda option: option[2] if len(option) > 2 else 0  # noqa: E731
    top = sum(max(kept_of(o) for o in options) for options in blocks)
    front: list[tuple[float, float, int, tuple[int, ...]]] = [(0.0, 0.0, 0, ())]
    for options in blocks:
        grown = sorted(((t + o[0], i + o[1], k + kept_of(o), choice + (n,)) for t, i, k, choice in front
                        for n, o in enumerate(options) if t + o[0] <= limit), key=lambda c: (c[0], -c[1], -c[2]))
        front, best = [], [-math.inf] * (top + 1)  # best[k]: the most important kept state keeping exactly k
        for candidate in grown:  # in order of latency: kept unless a kept one keeps ≥ as many and is ≥ as important
            if max(best[candidate[2]:]) < candidate[1]:
                front.append(candidate)
                best[candidate[2]] = candidate[1]
        if not front:
            cheapest = sum(min(o[0] for o in options) for options in blocks)
            raise ConfigError(f"depthdp: no choice fits the budget {budget:.6g} (the cheapest costs {cheapest:.6g})")
    latency, importance, _, choice = max(front, key=lambda c: (c[1], c[2], -c[0]))
    return list(choice), latency, importance, len(front)


def block_options(model) -> list[tuple[int, list[int], list[tuple[int, ...]]]]:
    """Per PlainNet block with activations: (block, its ``layer`` unit indices, its options as keep bits, all
    kept first)."""
    where = unit_blocks(model, "layer")
    out = []
    for block in sorted(set(where)):
        units = [u for u, b in enumerate(where) if b == block]
        out.append((block, units, list(itertools.product((1, 0), repeat=len(units)))))
    return out


def bits_key(bits) -> str:
    """``(1, 0)`` -> ``"10"``: how an option is named in the tables."""
    return "".join(str(int(k)) for k in bits)


def keep_list(num_units: int, units: list[int], bits: tuple[int, ...]) -> list[int]:
    """The ``layer`` keep-list with only ``units`` set to ``bits``."""
    keep = [1] * num_units
    for u, k in zip(units, bits):
        keep[u] = k
    return keep


def latency_table(config: dict, target: str, out: str | Path, repeats: int = 7) -> list[dict]:
    """Stage: write ``out`` (CSV, ``#`` header naming the target and unit): per block and option its keep
    ``bits``, the deployed ``segments`` (original conv indices per conv) and ``latency`` (plus bytes and rounds
    for ``mpc``); a 10-class head, as the cost table."""
    model, net = table_model(config, target, "depthdp", "latency table")
    m, size = config["model"], config["data"]["image_size"]
    inputs = block_inputs(net, size)
    policy, num_units = merge_policy(config), len(activation_units(model, "layer"))
    device = "cuda" if target == "gpu" else "cpu"
    batch = config["data"]["batch_size"] if target == "gpu" else 1
    rows = []
    deployed = functools.cache(lambda keep: shrunk(model, "layer", list(keep), policy, m["free_act"]))
    for block, units, options in block_options(model):  # the all-kept network is deployed once, not per block
        nets = {bits: deployed(tuple(keep_list(num_units, units, bits))) for bits in options}
        shape = tuple(inputs[block].shape[1:])
        if target == "mpc":
            costs = {bits: mpc_cost.block_cost(net.spec["blocks"][block], shape)[0] for bits, net in nets.items()}
            measured = {bits: {"latency": mpc_cost.latency(c, config["mpc"]["network"]), "bytes": c.bytes,
                               "rounds": c.rounds} for bits, c in costs.items()}
        else:
            x = inputs[block].expand(batch, -1, -1, -1).contiguous().to(device)
            times = time_interleaved({bits: net.blocks[block].to(device).eval() for bits, net in nets.items()},
                                     x, repeats, 3, 20)
            measured = {bits: {"latency": 1e3 * quartiles(t)[0]} for bits, t in times.items()}
        segments = {bits: " ".join("-".join(map(str, seg)) for seg in net.spec["blocks"][block]["merged_from"])
                    for bits, net in nets.items()}
        rows += [{"block": block, "units": " ".join(map(str, units)), "bits": bits_key(bits),
                  "segments": segments[bits], **measured[bits]} for bits in options]
    note = (f"two-party CrypTen cost model, {config['mpc']['network']} preset" if target == "mpc" else
            f"measured on {device}, batch {batch}, {torch.get_num_threads()} threads, median of {repeats}")
    write_csv(out, rows, f"# depthdp latency per block option of {m['arch']} at {size}x{size}; unit of measure: "
                          f"{UNITS[target]}; {note}; deployed: free_act {m['free_act']}, merge policy {policy['name']}")
    return rows


def read_latency_table(path: str | Path) -> dict[tuple[int, str], float]:
    """(block, bits) -> latency of a ``latency_table`` CSV."""
    if not Path(path).is_file():
        raise ConfigError(f"file not found: {path}")
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    try:
        return {(int(r["block"]), r["bits"]): float(r["latency"]) for r in rows}
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{path}: not a depthdp latency table ({err})") from None


@dataclasses.dataclass(frozen=True)
class ImportanceConfig:
    """The ``depthdp`` config section's scoring keys (read by ``pruning.scorer`` as MetaPruning's are)."""
    adapt_steps: int = 20
    adapt_lr: float | None = None
    holdout_images: int = 256
    calibration_batches: int = 2


def importance(config: dict, dense_ckpt: str | Path, block: str, out: str | Path) -> dict:
    """Stage: selection-split top-1 and loss of the dense network with each option of PlainNet block ``block`` that
    removes an activation (``"dense"``: the dense network itself, the reference), each after the same short finetune;
    writes ``out`` (JSON: ``{"block", "options": [{"bits", "top1", "loss"}]}``)."""
    from depthshrinker.methods.pruning import scorer
    from depthshrinker.train import Recipe

    block = str(block)
    section = config["depthdp"]
    cfg = ImportanceConfig(**{f.name: section[f.name] for f in dataclasses.fields(ImportanceConfig)})
    if cfg.adapt_lr is None:
        cfg = dataclasses.replace(cfg, adapt_lr=Recipe.from_config(config, "finetune").lr)
    dense, _ = load_model(dense_ckpt)
    score = scorer(build_datasets(config["data"], config["seed"]), cfg, config["data"], config["seed"])
    policy, free_act = merge_policy(config), config["model"]["free_act"]
    num_units = len(activation_units(dense, "layer"))
    if block == "dense":
        options = [([], ())]
    else:
        options = [(units, bits) for b, units, opts in block_options(dense) if str(b) == block for bits in opts[1:]]
        if not options:
            raise ConfigError(f"depthdp importance: block '{block}' has no activations (or does not exist)")
    rows = []
    for units, bits in options:
        model = copy.deepcopy(dense)
        if units:
            apply_keep(model, activation_units(model, "layer"), keep_list(num_units, units, bits), free_act, policy)
        result = score(model)
        rows.append({"bits": bits_key(bits), "top1": result["top1"], "loss": result["loss"]})
    report = {"block": block, "options": rows, "adapt": dataclasses.asdict(cfg)}
    write_json(out, report)
    return report


METRICS = {"top1": 1.0, "loss": -1.0}  # importance = min(0, sign · (metric of the option − metric of dense))


def importance_table(reference: str | Path, blocks: list[str | Path], metric: str = "top1"
                     ) -> dict[tuple[int, str], float]:
    """(block, bits) -> importance from ``importance`` reports: top-1 points over the dense reference
    (``top1``, Kim et al.), or the selection split's cross-entropy saved over it (``loss``: finer where top-1
    saturates, as on the embedded digits); at most 0. Removing activations does not make the network better
    than keeping them: a gain over dense is noise of the short finetune, and counting it made the DP buy that
    noise with budget, stopping below it (seed 1 of the first 3-seed run chose one network, at 36 % of the dense
    latency, for the budgets 38 %, 49 % and 69 %)."""
    sign, base = METRICS[metric], read_json(reference)["options"][0][metric]
    table = {}
    for path in blocks:
        report = read_json(path)
        for row in report["options"]:
            table[int(report["block"]), row["bits"]] = min(0.0, sign * (row[metric] - base))
    return table


def layer_keep_of(mask: dict, model) -> list[int]:
    """A DepthShrinker mask's keep-list at ``layer`` granularity (a ``block`` unit keeps all its activations)."""
    units = activation_units(model, mask["granularity"])
    if len(mask["keep"]) != len(units):
        raise ConfigError(f"depthdp: the mask to match has {len(mask['keep'])} entries, the model {len(units)} "
                          f"{mask['granularity']} units")
    kept = {path for unit, k in zip(units, mask["keep"]) if k for path in unit.acts}
    return [int(unit.acts[0] in kept) for unit in activation_units(model, "layer")]


def plan(config: dict, keep: float, latency_csv: str | Path, reference: str | Path, blocks: list[str | Path],
         out: str | Path, match: str | Path | None = None) -> dict:
    """Stage: solve the DP at budget ``keep`` × the dense blocks' latency, or the latency of the DepthShrinker
    mask ``match`` (``depthdp.budget: match``), and write the choice as a ``layer`` keep-list mask ``out``."""
    if (config["depthdp"]["budget"] == "match") != (match is not None):
        raise ConfigError("depthdp.budget: 'match' needs the DepthShrinker mask to match (--match), and only it")
    m = config["model"]
    model = create_model(m["arch"], 10, m["small_input"])
    latency = read_latency_table(latency_csv)
    gain = importance_table(reference, blocks, config["depthdp"]["importance"])
    options, table = block_options(model), []  # table[b][o]: (latency, importance, kept) of option o of b
    for b, _, opts in options:
        for bits in opts:
            if (b, bits_key(bits)) not in latency:
                raise ConfigError(f"{latency_csv}: no latency for block {b} option {bits_key(bits)}")
            if 0 in bits and (b, bits_key(bits)) not in gain:
                raise ConfigError(f"depthdp: no importance for block {b} option {bits_key(bits)}")
        table.append([(latency[b, bits_key(bits)], gain[b, bits_key(bits)] if 0 in bits else 0.0, sum(bits))
                      for bits in opts])
    dense_latency = sum(row[0][0] for row in table)
    if match is not None:
        ds = layer_keep_of(read_mask(match), model)
        budget = sum(latency[b, bits_key(ds[u] for u in units)] for b, units, _ in options)
        source = {"budget": "match", "match": str(match)}
    else:
        budget, source = keep * dense_latency, {"budget": "fraction"}
    choice, total, gained, front = solve(table, budget)
    keep_bits = [1] * len(activation_units(model, "layer"))
    for (_, units, opts), o in zip(options, choice):
        for u, k in zip(units, opts[o]):
            keep_bits[u] = k
    units = activation_units(model, "layer")
    mask = {"method": "depthdp", "granularity": "layer", "keep_ratio": keep, "num_units": len(units),
            "num_kept": sum(keep_bits), "keep": keep_bits,
            "units": [{"name": u.name, "keep": k} for u, k in zip(units, keep_bits)],
            "dp": {**source, "target": config["stages"]["search"]["latency_target"],
                   "importance_metric": config["depthdp"]["importance"], "budget_latency": budget,
                   "latency": total, "dense_latency": dense_latency, "importance": gained, "pareto_front": front,
                   "options": [{"block": b, "bits": bits_key(opts[o]), "latency": row[o][0], "importance": row[o][1]}
                               for (b, _, opts), o, row in zip(options, choice, table)]},
            "row": {"dp_budget_fraction": budget / dense_latency, "dp_latency_fraction": total / dense_latency,
                    "dp_importance": gained}}
    write_json(out, mask)
    return mask
