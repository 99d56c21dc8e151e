"""Device latency and throughput of deployed networks: each timed interleaved with the dense reference in one
run (``base.timing``), every speed-up the per-repeat ratio to the reference timed in the same repeat
(upstream DepthShrinker: batch 128, 50 + 30 iterations).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from depthshrinker.base.jsonio import write_json
from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.merge import export_onnx
from depthshrinker.deploy.mpc.engine import as_plain


def onnx_runtime(net: nn.Module, folder: str | Path, input_size: int) -> Callable[[torch.Tensor], list]:
    """``net`` exported to ONNX (``merge.export_onnx``) and served by an ONNX Runtime CPU session with this
    process's torch thread count (intra-op, sequential execution, no spin-waiting: an idle session's spinning
    threads would steal the cores from whichever network is timed next): a callable on an image batch."""
    import onnxruntime

    path = export_onnx(net, Path(folder) / "net.onnx", input_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})


def _latency_columns(times: dict[str, list[float]], name: str, reference: str, prefix: str) -> dict[str, float]:
    ms, ms_iqr = quartiles([s * 1e3 for s in times[name]])
    ratio, ratio_iqr = quartiles([r / s for r, s in zip(times[reference], times[name])])
    return {f"{prefix}cpu_latency_ms": ms, f"{prefix}cpu_latency_iqr_ms": ms_iqr, f"{prefix}cpu_speedup": ratio,
            f"{prefix}cpu_speedup_iqr": ratio_iqr}


def cpu_latency(nets: dict[str, nn.Module], input_size: int, reference: str, batch: int = 1, repeats: int = 7,
                warmup: int = 3, iters: int = 5, onnxruntime: bool = False) -> dict[str, dict]:
    """Batch-``batch`` CPU latency (ms, median and IQR) of each network and its speed-up over ``reference``,
    in eager PyTorch and, with ``onnxruntime``, also as an ONNX Runtime session (``ort_`` columns: its latency,
    its speed-up over the reference's session, and ``ort_over_eager``, the eager/ONNX Runtime ratio of the same
    network); every timing interleaved in one run."""
    x = torch.randn(batch, 3, input_size, input_size)
    timed: dict[str, Callable] = {k: v.cpu().eval() for k, v in nets.items()}
    with tempfile.TemporaryDirectory() as folder:
        if onnxruntime:
            timed |= {f"ort:{k}": onnx_runtime(v, Path(folder) / str(i), input_size) for i, (k, v) in
                      enumerate(timed.items())}
        times = time_interleaved(timed, x, repeats, warmup, iters)
    out = {}
    for name in nets:
        out[name] = _latency_columns(times, name, reference, "")
        if onnxruntime:
            out[name] |= _latency_columns(times, f"ort:{name}", f"ort:{reference}", "ort_")
            ratio, ratio_iqr = quartiles([e / o for e, o in zip(times[name], times[f"ort:{name}"])])
            out[name] |= {"ort_over_eager": ratio, "ort_over_eager_iqr": ratio_iqr}
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
                 repeats: int = 7, gpu: bool = True, onnxruntime: bool = True) -> list[dict]:
    """Stage: CPU batch-1 latency, eager and (``onnxruntime``) under ONNX Runtime, and GPU throughput where
    CUDA is available, of cells' deployed networks (merged PlainNets), all timed interleaved with the dense one
    (BN folded) in one run, each ratio from the same repeats; writes one JSON per model to ``outs``."""
    if len(model_paths) != len(outs):
        raise ValueError(f"bench-device: {len(model_paths)} models but {len(outs)} outputs")
    cells = [str(p) for p in model_paths]
    nets = {"dense": as_plain(load_model(dense_path)[0]), **{c: as_plain(load_model(c)[0]) for c in cells}}
    rows = cpu_latency(nets, input_size, "dense", repeats=repeats, onnxruntime=onnxruntime)
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
