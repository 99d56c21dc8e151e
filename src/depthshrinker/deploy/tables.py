"""Per-unit cost tables for the platform-aware search (what upstream users measured by hand and typed into
YAML as ``LAT_BEFORE`` / ``LAT_AFTER``): for every activation unit of the configured model and input size, the
cost of its block as it is (``before``) and as it will be deployed with the unit's activations removed
(``after``): the free activation (``model.free_act``) included, the block merged by the same merge plan the
merge stage will use (``plan.merge_policy(config)``, decided by ``plan.apply_keep`` as in finetuning).

Targets: ``cpu`` and ``gpu`` are measured (batch 1 on the CPU, the configured batch on the GPU; interleaved
repeats, median), ``mpc`` is the two-party cost model (bytes and rounds exact for CrypTen; latency under the
configured network preset).
"""
from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import torch

from depthshrinker.base.config import ConfigError
from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.merge import merge_plain
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.plan import apply_keep, merge_policy
from depthshrinker.nets.plain import PlainNet, act_positions, to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

UNITS = {"cpu": "ms", "gpu": "ms", "mpc": "s"}


def unit_blocks(model, granularity: str) -> list[int]:
    """The PlainNet block each unit of ``model`` lives in."""
    where = act_positions(model)
    return [where[unit.acts[0]][0] for unit in activation_units(model, granularity)]


def shrunk(model, granularity: str, keep: list[int], policy: dict, free_act: str = "none") -> PlainNet:
    """``model`` (timm) as deployed with the keep-list ``keep`` over its ``granularity`` units: the free
    activation added where a block became linear, BN folded, merged by the plan ``apply_keep`` decides under
    ``policy`` (pad-first only where that plan merges)."""
    model = copy.deepcopy(model)
    apply_keep(model, activation_units(model, granularity), keep, free_act, policy)
    return merge_plain(to_plain(model))


def block_inputs(net: PlainNet, input_size: int) -> list[torch.Tensor]:
    """The input (batch 1) of every block of ``net``."""
    inputs, x = [], torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        for block in net.blocks:
            inputs.append(x)
            x = block(x)
    return inputs


def table_model(config: dict, target: str, key: str, table: str) -> tuple[torch.nn.Module, PlainNet]:
    """The configured model with a 10-class head (tables do not depend on the dataset) and its PlainNet, after
    checking ``target`` (a ConfigError naming ``key`` and the ``table`` otherwise, or when ``gpu`` has no CUDA)."""
    if target not in UNITS:
        raise ConfigError(f"{key}: no {table} for target '{target}' (one of {', '.join(UNITS)})")
    if target == "gpu" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: target 'gpu' needs a CUDA device")
    m = config["model"]
    model = create_model(m["arch"], 10, m["small_input"]).eval()
    return model, to_plain(model)


def cost_table(config: dict, target: str, granularity: str, out: str | Path, repeats: int = 7) -> list[dict]:
    """Write ``out`` (CSV with a ``#`` header naming the target and the unit of measure): one row per unit with
    ``before`` and ``after`` costs."""
    model, net = table_model(config, target, "stages.search.latency_target", "cost table")
    m, size = config["model"], config["data"]["image_size"]
    names = [u.name for u in activation_units(model, granularity)]
    blocks = unit_blocks(model, granularity)
    inputs = block_inputs(net, size)
    policy = merge_policy(config)
    after = [shrunk(model, granularity, [int(i != unit) for i in range(len(names))], policy, m["free_act"])
             for unit in range(len(names))]
    rows = []
    if target == "mpc":
        network = config["mpc"]["network"]
        for unit, (block, name) in enumerate(zip(blocks, names)):
            shape = tuple(inputs[block].shape[1:])
            before, _ = mpc_cost.block_cost(net.spec["blocks"][block], shape)
            cut, _ = mpc_cost.block_cost(after[unit].spec["blocks"][block], shape)
            rows.append({"name": name, "before": mpc_cost.latency(before, network),
                         "after": mpc_cost.latency(cut, network), "before_bytes": before.bytes,
                         "after_bytes": cut.bytes, "before_rounds": before.rounds, "after_rounds": cut.rounds})
        note = f"two-party CrypTen cost model, {network} preset"
    else:
        device = "cuda" if target == "gpu" else "cpu"
        batch = config["data"]["batch_size"] if target == "gpu" else 1
        for unit, (block, name) in enumerate(zip(blocks, names)):
            pair = {"before": net.blocks[block], "after": after[unit].blocks[block]}
            x = inputs[block].expand(batch, -1, -1, -1).contiguous().to(device)
            times = time_interleaved({k: v.to(device).eval() for k, v in pair.items()}, x, repeats, 3, 20)
            rows.append({"name": name, **{k: 1e3 * quartiles(t)[0] for k, t in times.items()}})
        note = f"measured on {device}, batch {batch}, {torch.get_num_threads()} threads, median of {repeats}"
    write_csv(out, [{"unit": i, **row} for i, row in enumerate(rows)],
              f"# {target} cost per unit of {m['arch']} at {size}x{size}, {granularity} granularity; "
              f"unit of measure: {UNITS[target]}; {note}; after = deployed: free_act {m['free_act']}, "
              f"merge policy {policy['name']}")
    return rows


def write_csv(out: str | Path, rows: list[dict], header: str) -> None:
    """Write ``rows`` to the CSV ``out`` under the comment line ``header``, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(header + "\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
