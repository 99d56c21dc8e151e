"""The merge plan (DepthShrinker, Fu et al. 2022, Sec. 3.3): which linear convolutions of each block merge,
decided once per network under the policy of the cell's deploy target and recorded with the network, so that
finetuning (which blocks train in pad-first form), the merge stage and the search's cost tables agree.

A *run* is a maximal chain of a block's convs with no activation between them; a *segment* ``[s, e)`` of a run
becomes one conv. Each run is split by a shortest path over its split points,

    min over the cuts of  Σ_segments cost(segment)            (ties: the shortest last segment, fewer merges)

where ``cost`` follows the policy (``merge_policy``):

* ``macs``: multiply-accumulates per pixel of the block input, ``out·in/groups·k² / (stride from the block
  input)²`` (borders ignored);
* ``mpc``: the two-party cost model's latency of the segment as one conv at its input shape under
  ``mpc.network`` (``mpc.cost.latency``: compute + R·RTT + B/2·8/bandwidth, bytes and rounds exact for CrypTen);
* ``cpu`` / ``gpu``: measured seconds of the segment as one conv (batch 1 on the CPU, ``data.batch_size`` on
  CUDA; median of interleaved repeats);
* ``latency``: a given table ``segment_key`` -> seconds (``candidate_segments`` lists what it must hold);
* ``all``: every segment costs 1, so every run merges into as few convs as merge exactly (DepthShrinker as
  published: merging is never declined, even where a 3x3∘3x3 → 5x5 costs more MACs).

A segment is a candidate only where merging it is exact (REFERENCE §1, the padding trap): no conv after its first
pads, or the network may still be put in pad-first form, so the padding moves to the segment's front
(``plain.set_pad_first``).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.nets.gates import apply_masks, remove_units
from depthshrinker.nets.ir import Unit
from depthshrinker.nets.plain import apply_plan, plain_spec
from depthshrinker.nets.units import activation_units

POLICIES = ("macs", "mpc", "cpu", "gpu", "latency", "all")


def merge_policy(config: dict, input_size: int | None = None) -> dict:
    """The merge policy of a config's cells: its deploy target ``stages.search.latency_target`` (``cpu``, ``gpu``
    or ``mpc``, with the input size (``data.image_size`` unless given), the MPC network preset or the GPU batch
    it is costed at), ``macs`` when that is ``none``. JSON-able: it is recorded in every merge plan, merged spec
    and merge.json."""
    target = config["stages"]["search"]["latency_target"]
    if target == "none":
        return {"name": "macs"}
    policy = {"name": target, "input_size": input_size or config["data"]["image_size"]}
    if target == "mpc":
        policy["network"] = config["mpc"]["network"]
    if target == "gpu":
        policy["batch"] = config["data"]["batch_size"]
    return policy


def as_policy(policy: str | dict) -> dict:
    """A policy dict from a name (``macs``, ``latency``) or a dict; ConfigError for an unknown one."""
    policy = {"name": policy} if isinstance(policy, str) else dict(policy)
    if policy.get("name") not in POLICIES:
        raise ConfigError(f"merge: policy '{policy.get('name')}' is not one of {', '.join(POLICIES)}")
    needs = {"mpc": ("input_size", "network"), "cpu": ("input_size",), "gpu": ("input_size", "batch")}
    missing = [k for k in needs.get(policy["name"], ()) if k not in policy]
    if missing:
        raise ConfigError(f"merge: policy '{policy['name']}' needs {', '.join(missing)} (see merge_policy)")
    return policy


def composed_spec(a: dict, b: dict) -> dict:
    """Spec of conv ``a`` followed by conv ``b`` as one convolution; ``padding`` None when not exact."""
    groups = a["groups"] if a["groups"] in (1, b["groups"]) else 1
    return {"in": a["in"], "out": b["out"], "kernel": a["kernel"] + (b["kernel"] - 1) * a["stride"],
            "stride": a["stride"] * b["stride"], "padding": None if b["padding"] else a["padding"],
            "groups": groups, "act": b["act"], **({"mask": b["mask"]} if "mask" in b else {})}


def _spec(net) -> dict:
    return net if isinstance(net, dict) else net.spec


def stride_of(convs: list[dict]) -> int:
    return math.prod(c["stride"] for c in convs)


def needs_pad_first(convs: list[dict]) -> bool:
    """Whether merging the chain ``convs`` exactly needs its padding moved to the front."""
    return any(c["padding"] for c in convs[1:])


def merged_spec(convs: list[dict], pad_first: bool = False) -> dict | None:
    """The one conv a chain merges into (padding ``Σ_j p_j·s_1⋯s_{j−1}``), or None when that is not exact (a
    later conv pads and the chain may not go pad-first)."""
    if needs_pad_first(convs) and not pad_first:
        return None
    spec = functools.reduce(composed_spec, convs)
    return {**spec, "padding": sum(c["padding"] * stride_of(convs[:j]) for j, c in enumerate(convs))}


def linear_runs(convs: list[dict]) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of a block's convs with no activation between them (length >= 2)."""
    runs, start = [], 0
    for j, c in enumerate(convs):
        if c["act"] != "none" or j == len(convs) - 1:
            if j > start:
                runs.append((start, j + 1))
            start = j + 1
    return runs


def segment_key(block: int, start: int, stop: int) -> str:
    """Key of the convs [start, stop) of a block in a latency table."""
    return f"{block}:{start}-{stop}"


def conv_inputs(spec: dict, input_size: int) -> list[list[tuple[int, int, int]]]:
    """(C, H, W) of the input of every conv of every block (plus the block output last), batch 1."""
    shape, out = (3, input_size, input_size), []
    for block in spec["blocks"]:
        shapes = [shape]
        pool = block.get("pool")
        if pool:  # a max-pool block: no convs, a smaller map
            k, s, p = pool["kernel"], pool["stride"], pool["padding"]
            shape = (shape[0], (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1)
        for c in block["convs"]:
            k, s, p = c["kernel"], c["stride"], c["padding"]
            shape = (c["out"], (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1)
            shapes.append(shape)
        out.append(shapes)
    return out


class _Fixed(nn.Module):
    """A conv run on its own stored input, so that segments of different input shapes time interleaved."""

    def __init__(self, conv: dict, shape: tuple[int, ...], device: str):
        super().__init__()
        self.conv = nn.Conv2d(conv["in"], conv["out"], conv["kernel"], conv["stride"], conv["padding"],
                              groups=conv["groups"]).to(device).eval()
        self.x = torch.randn(*shape, device=device)

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.x)


def _measured(segments: dict[str, tuple[dict, tuple[int, int, int]]], policy: dict) -> dict[str, float]:
    """Median seconds of each segment (as one conv) on the policy's device, timed interleaved. Under DDP rank 0's
    timings are broadcast, so that every rank trains the same pad-first form."""
    if not segments:
        return {}
    device = "cuda" if policy["name"] == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("merge: policy 'gpu' needs a CUDA device")
    batch = policy.get("batch", 1)
    nets = {k: _Fixed(conv, (batch, *shape), device) for k, (conv, shape) in segments.items()}
    times = time_interleaved(nets, torch.empty(0, device=device), repeats=5, warmup=2, iters=5)
    medians = [{k: quartiles(t)[0] for k, t in times.items()}]
    if dist.is_initialized():
        dist.broadcast_object_list(medians, src=0)
    return medians[0]


def _costs(block: int, convs: list[dict], shapes: list[tuple[int, int, int]] | None, policy: dict,
           latency: dict | None, pad_first: bool) -> dict[tuple[int, int], float]:
    """Cost of every exact segment (s, e) of the block's runs under ``policy`` (module docstring)."""
    segments = {(s, e): merged_spec(convs[s:e], pad_first) for start, stop in linear_runs(convs)
                for s in range(start, stop) for e in range(s + 1, stop + 1)}
    segments = {se: spec for se, spec in segments.items() if spec is not None}
    name = policy["name"]
    if name == "latency":
        missing = [segment_key(block, *se) for se in segments if segment_key(block, *se) not in latency]
        if missing:
            raise ConfigError(f"merge: latency table has no entry '{missing[0]}' (see merge.candidate_segments)")
        return {se: float(latency[segment_key(block, *se)]) for se in segments}
    if name == "all":
        return dict.fromkeys(segments, 1.0)
    if name == "macs":
        return {(s, e): c["out"] * c["in"] // c["groups"] * c["kernel"] ** 2 / stride_of(convs[:e]) ** 2
                for (s, e), c in segments.items()}
    if name == "mpc":
        return {(s, e): mpc_cost.latency(mpc_cost.block_cost({"convs": [c]}, shapes[s])[0], policy["network"])
                for (s, e), c in segments.items()}
    timed = _measured({segment_key(block, *se): (c, shapes[se[0]]) for se, c in segments.items()}, policy)
    return {se: timed[segment_key(block, *se)] for se in segments}


def plan_merges(net, policy: str | dict = "macs", latency: dict | None = None, pad_first: bool = False) -> dict:
    """The merge plan of a PlainNet spec: ``{"policy", "blocks": [{"segments", "pad_first", "decisions"}]}``.
    ``segments`` lists the conv indices of each conv of the merged block; ``pad_first`` says whether the block
    must be put in pad-first form (only when ``pad_first`` allows it); ``decisions`` gives per run the segments
    chosen, ``cost_unmerged`` and ``cost_chosen``. ``net``: a PlainNet or its spec."""
    spec, policy = _spec(net), as_policy(policy)
    if (policy["name"] == "latency") != (latency is not None):
        raise ConfigError("merge: a latency table goes with policy 'latency', and only with it")
    shapes = conv_inputs(spec, policy["input_size"]) if "input_size" in policy else None
    blocks = []
    for i, block in enumerate(spec["blocks"]):
        convs = block["convs"]
        costs = _costs(i, convs, shapes and shapes[i], policy, latency, pad_first)
        segments, decisions, done = [], [], 0
        for start, stop in linear_runs(convs):
            best = {start: (0.0, [])}  # cut -> (cost, segments up to it)
            for e in range(start + 1, stop + 1):
                options = [(best[s][0] + costs[s, e], best[s][1] + [list(range(s, e))])
                           for s in range(e - 1, start - 1, -1) if (s, e) in costs]
                best[e] = min(options, key=lambda option: option[0])
            decisions.append({"run": [start, stop - 1], "segments": best[stop][1],
                              "cost_unmerged": sum(costs[s, s + 1] for s in range(start, stop)),
                              "cost_chosen": best[stop][0]})
            segments += [[j] for j in range(done, start)] + best[stop][1]
            done = stop
        segments += [[j] for j in range(done, len(convs))]
        blocks.append({"segments": segments, "decisions": decisions,
                       "pad_first": any(needs_pad_first([convs[j] for j in seg]) for seg in segments)})
    return {"policy": policy, "blocks": blocks}


def candidate_segments(net) -> dict[str, dict]:
    """Every segment a policy may compare (single convs included), as ``segment_key`` -> merged spec with
    ``stride_in``, the stride from the block input to the segment input: what a latency table must time.
    ``net``: a PlainNet or its spec."""
    spec = _spec(net)
    return {segment_key(i, s, e): {**merged_spec(convs[s:e], True), "stride_in": stride_of(convs[:s])}
            for i, convs in enumerate(b["convs"] for b in spec["blocks"])
            for start, stop in linear_runs(convs) for s in range(start, stop) for e in range(s + 1, stop + 1)
            if merged_spec(convs[s:e], True) is not None}


def apply_keep(model: nn.Module, units: list[Unit], keep: list[int], free_act: str = "none",
               policy: str | dict = "macs", plan: dict | None = None) -> nn.Module:
    """Stage-2 form of a keep-list (``gates.remove_units``) with its merge plan: the recorded ``plan`` of a
    checkpoint, or the one ``plan_merges`` decides under ``policy`` for the network as it now stands; the
    segments the plan merges into a padded conv go pad-first (``plain.apply_plan``)."""
    remove_units(model, units, keep, free_act)
    return apply_plan(model, plan or plan_merges(plain_spec(model), policy, pad_first=True))


def apply_mask_spec(model: nn.Module, mask: dict, policy: str | dict = "macs") -> nn.Module:
    """Apply a checkpoint spec's ``mask`` entry: a DepthShrinker keep-list (its merge plan decided under
    ``policy`` and recorded in ``mask["merge_plan"]``, or the one already recorded there), or SNL mask shapes
    (all-ones buffers, filled by the state_dict that follows)."""
    if mask.get("method", "depthshrinker") == "depthshrinker":
        apply_keep(model, activation_units(model, mask["granularity"]), mask["keep"], mask.get("free_act", "none"),
                   policy, mask.get("merge_plan"))
        mask["merge_plan"] = model.merge_plan
        return model
    return apply_masks(model, {path: torch.ones(shape) for path, shape in mask["shapes"].items()})
