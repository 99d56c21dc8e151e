"""Device latency and throughput, measured the way a speed claim must be: networks timed interleaved in one run
(order rotated every repeat, warm-up first, CUDA synchronised), reported as median and interquartile range,
and every speed-up as the per-repeat ratio to a reference timed in the same repeat, so that machine-wide
slowdowns cancel (nanoGPT's ``bench.py`` discipline; upstream DepthShrinker: batch 128, 50 + 30 iterations).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from .checkpoint import load_model
from .jsonio import write_json
from .mpc.engine import as_plain


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


def cpu_latency(nets: dict[str, nn.Module], input_size: int, reference: str, batch: int = 1, repeats: int = 7,
                warmup: int = 3, iters: int = 5) -> dict[str, dict]:
    """Batch-``batch`` CPU latency (ms, median and IQR) of each network and its speed-up over ``reference``."""
    x = torch.randn(batch, 3, input_size, input_size)
    times = time_interleaved({k: v.cpu().eval() for k, v in nets.items()}, x, repeats, warmup, iters)
    out = {}
    for name, t in times.items():
        ms, ms_iqr = quartiles([s * 1e3 for s in t])
        ratio, ratio_iqr = quartiles([r / s for r, s in zip(times[reference], t)])
        out[name] = {"cpu_latency_ms": ms, "cpu_latency_iqr_ms": ms_iqr, "cpu_speedup": ratio,
                     "cpu_speedup_iqr": ratio_iqr}
    return out


def gpu_throughput(nets: dict[str, nn.Module], input_size: int, reference: str, batch: int = 128,
                   warmup: int = 50, iters: int = 30, repeats: int = 3) -> dict[str, dict]:
    """Images/s at batch ``batch`` on the GPU: eager fp32 (upstream's setting), plus channels_last and bf16
    autocast+channels_last columns; each with its ratio to ``reference``."""
    x = torch.randn(batch, 3, input_size, input_size, device="cuda")
    variants = {"fp32": (torch.contiguous_format, None), "cl": (torch.channels_last, None),
                "bf16_cl": (torch.channels_last, torch.bfloat16)}
    out: dict[str, dict] = {name: {} for name in nets}
    for variant, (fmt, dtype) in variants.items():
        models = {k: v.cuda().eval().to(memory_format=fmt) for k, v in nets.items()}
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            times = time_interleaved(models, x.contiguous(memory_format=fmt), repeats, warmup, iters)
        suffix = "" if variant == "fp32" else f"_{variant}"
        for name, t in times.items():
            speed, speed_iqr = quartiles([batch / s for s in t])
            ratio, ratio_iqr = quartiles([r / s for r, s in zip(times[reference], t)])
            out[name] |= {f"gpu_throughput_img_s{suffix}": speed, f"gpu_throughput_iqr{suffix}": speed_iqr,
                          f"gpu_speedup{suffix}": ratio, f"gpu_speedup_iqr{suffix}": ratio_iqr}
    return out


def bench_device(model_paths: list[str | Path], dense_path: str | Path, outs: list[str | Path], input_size: int,
                 repeats: int = 7, gpu: bool = True) -> list[dict]:
    """Stage: CPU batch-1 latency (and GPU throughput where CUDA is available) of cells' deployed networks
    (merged PlainNets), all timed interleaved with the dense one (BN folded) in one run, each ratio from the
    same repeats; writes one JSON per model to the matching ``outs`` entry."""
    if len(model_paths) != len(outs):
        raise ValueError(f"bench-device: {len(model_paths)} models but {len(outs)} outputs")
    cells = [str(p) for p in model_paths]
    nets = {"dense": as_plain(load_model(dense_path)[0]), **{c: as_plain(load_model(c)[0]) for c in cells}}
    rows = cpu_latency(nets, input_size, "dense", repeats=repeats)
    if gpu and torch.cuda.is_available():
        for name, extra in gpu_throughput(nets, input_size, "dense").items():
            rows[name] |= extra | {"gpu": torch.cuda.get_device_name()}
    out = []
    for cell, path in zip(cells, outs):
        row = {"gpu_throughput_img_s": None, **rows[cell], "cpu_threads": torch.get_num_threads(),
               "repeats": repeats, "timed_with": len(cells)}
        write_json(path, row)
        out.append(row)
    return out
