"""Kim et al.'s latency table measured on a device (ICML 2023, Sec. 4: the table ``T``, timed per segment as the
reference times it): every valid merge segment and LayerMerge option as its one merged conv (then a kept projection
shortcut), every activation, on its real input shape, at batch 1 on the CPU or the configured batch on a GPU;
seconds per call, the median of interleaved repeats (``base.timing``), pieces of one input shape timed in one
rotation so that a machine-wide slowdown hits them alike.

Measured times do not add up exactly as the cost model's counts do; ``outside`` is set so that the dense network
sums to its own measured time (the dense deployed network minus its single-conv segments and activations), which
is the constant the reference leaves out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.segment_cost import segment_pieces
from depthshrinker.nets.plain import ACTS, to_plain

__all__ = ["MeasuredTable", "measured_table", "measured_ratio"]


@dataclass(frozen=True)
class MeasuredTable:
    """Seconds per call: ``segment[(s, e)]``, ``option[(s, e, label)]``, ``act[p]``, ``outside``, and ``dense`` (the
    whole deployed dense network)."""
    segment: dict[tuple[int, int], float]
    option: dict[tuple[int, int, str], float]
    act: dict[int, float]
    outside: float
    dense: float


def _conv(c: dict) -> nn.Conv2d:
    return nn.Conv2d(c["in"], c["out"], c["kernel"], c["stride"], c["padding"], groups=c["groups"], bias=True)


def _medians(modules: dict, device: str, batch: int, repeats: int) -> dict:
    """Median seconds per call of every (key -> (module, input shape)), grouped by input shape."""
    shapes: dict[tuple, dict] = {}
    for key, (module, shape) in modules.items():
        shapes.setdefault(shape, {})[key] = module.to(device).eval()
    out = {}
    for shape, group in shapes.items():
        x = torch.randn(batch, *shape, device=device)
        out |= {k: quartiles(t)[0] for k, t in time_interleaved(group, x, repeats, 3, 20).items()}
    return out


def measured_table(model: nn.Module, input_size: int, added: str, device: str, batch: int,
                   repeats: int = 7) -> MeasuredTable:
    """The table of ``model`` on a ``(3, input_size, input_size)`` image, measured (module docstring)."""
    t = segment_pieces(model, input_size, added)
    modules = {("conv", tuple(sorted(c.items())), shape): (_conv({**c, "act": "none"}), shape)
               for pieces in (*t.segment.values(), *t.option.values()) for c, shape in pieces}
    modules |= {("act", kind, shape): (ACTS[kind](), shape) for kind, shape in t.act.values()}
    dense = to_plain(model)
    modules[("dense",)] = (dense, (3, input_size, input_size))
    time = _medians(modules, device, batch, repeats)

    def price(pieces: list) -> float:
        return sum(time["conv", tuple(sorted(c.items())), shape] for c, shape in pieces)

    segment = {k: price(v) for k, v in t.segment.items()}
    act = {p: time["act", kind, shape] for p, (kind, shape) in t.act.items()}
    dense_acts = [p for p in act if t.body.convs[p - 1].act != "none"]
    body = sum(segment[p - 1, p] for p in range(1, len(t.body) + 1)) + sum(act[p] for p in dense_acts)
    return MeasuredTable(segment, {k: price(v) for k, v in t.option.items()}, act, time["dense",] - body,
                         time["dense",])


def measured_ratio(net: nn.Module, reference: nn.Module, input_size: int, device: str, batch: int,
                   repeats: int = 7) -> float:
    """Median over interleaved repeats of ``net``'s time per call over ``reference``'s (the speed ratio a budget
    is scaled by)."""
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    times = time_interleaved({"net": net.to(device).eval(), "ref": reference.to(device).eval()}, x, repeats, 3, 20)
    return quartiles([a / b for a, b in zip(times["net"], times["ref"])])[0]
