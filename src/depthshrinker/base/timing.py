"""Timing discipline for speed claims: networks timed interleaved in one run (order rotated every repeat,
warm-up first, CUDA synchronised), reported as median and interquartile range (nanoGPT's ``bench.py``
discipline), so that machine-wide slowdowns cancel in every ratio taken per repeat.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn
from torch.utils import benchmark


@torch.inference_mode()
def time_interleaved(nets: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
                     iters: int) -> dict[str, list[float]]:
    """Seconds per call: ``repeats`` samples per network, each the mean of ``iters`` calls
    (``torch.utils.benchmark.Timer``, which synchronises CUDA and keeps this process's thread count), in an order
    rotated every repeat so that a machine-wide slowdown hits every network alike."""
    timers = {name: benchmark.Timer("net(x)", globals={"net": net, "x": x}, num_threads=torch.get_num_threads())
              for name, net in nets.items()}
    for timer in timers.values():
        timer.timeit(warmup)
    names, times = list(nets), {name: [] for name in nets}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timers[name].timeit(iters).mean)
    return times


def quartiles(values: list[float]) -> tuple[float, float]:
    """(median, interquartile range)."""
    if len(values) < 2:
        return values[0], 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q3 - q1
