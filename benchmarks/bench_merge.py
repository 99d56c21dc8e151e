"""Latency of a backbone (BN folded) dense vs linearized-unmerged vs merged: MobileNetV2-1.4 with DepthShrinker's
patterns A-F; any other arch with two keep-lists over its block units, every other block linear (``alternate``)
and every block but the stem linear (``stem only``).

All networks are timed interleaved in one run, the order rotated every repeat; each speed is reported as the
median (and interquartile range) over repeats of the per-repeat ratio to the dense network timed in the same
repeat, so that machine-wide slowdowns cancel.

    python benchmarks/bench_merge.py --repeats 5 --threads 1 --batch 1 32     # CPU
    python benchmarks/bench_merge.py --repeats 7 --threads 1 --batch 1 --onnxruntime   # + ONNX Runtime sessions
    python benchmarks/bench_merge.py --gpu                                    # batch 128, 50 warm-up, 30 timed
    python benchmarks/bench_merge.py --arch resnet18 --policy all --repeats 7 --threads 1 --batch 1 --onnxruntime
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from depthshrinker.base.timing import quartiles, time_interleaved
from depthshrinker.deploy.device import onnx_runtime
from depthshrinker.deploy.merge import PATTERNS, conv_layers, merge_plain
from depthshrinker.deploy.plan import apply_keep
from depthshrinker.nets.counting import macs
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units


def patterns(arch: str) -> dict[str, list[int]]:
    """DepthShrinker's patterns for MobileNetV2, else ``alternate`` and ``stem only`` over the block units."""
    n = len(activation_units(create_model(arch, 1000)))
    if n == len(PATTERNS["A"]):
        return PATTERNS
    return {"alternate": [1] + [i % 2 for i in range(n - 1)], "stem only": [1] + [0] * (n - 1)}


def networks(arch: str, policy: str) -> dict[str, torch.nn.Module]:
    """dense, then for each pattern its linearized (pad-first, unmerged) and merged PlainNets."""
    nets = {"dense": to_plain(create_model(arch, 1000).eval())}
    for name, keep in patterns(arch).items():
        model = create_model(arch, 1000).eval()
        nets[f"{name} unmerged"] = to_plain(apply_keep(model, activation_units(model), keep, policy=policy))
        nets[f"{name} merged"] = merge_plain(nets[f"{name} unmerged"])
    return nets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenetv2_140")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--policy", default="macs", choices=["macs", "all"],
                        help="merge plan: merge where MACs drop (default), or every linear run")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="calls per network before timing (CPU)")
    parser.add_argument("--iters", type=int, default=0, help="calls per sample (default: 32 // batch, at least 1)")
    parser.add_argument("--gpu", action="store_true", help="CUDA fp32, batch 128, 50 warm-up, 30 timed calls")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time every network as an ONNX Runtime CPU session ('ORT' rows, '× dense' "
                             "against dense's session)")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: CUDA is not available")
    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    batches, warmup = ([128], 50) if args.gpu else (args.batch, args.warmup)
    nets = networks(args.arch, args.policy)
    costs = {name: (macs(net, args.input_size) / 1e6, conv_layers(net)) for name, net in nets.items()}
    nets = {name: net.to(device) for name, net in nets.items()}
    folder = tempfile.TemporaryDirectory()
    if args.onnxruntime and not args.gpu:
        for name in list(nets):
            costs[f"{name} ORT"] = costs[name]
            nets[f"{name} ORT"] = onnx_runtime(nets[name], Path(folder.name) / name.replace(" ", "_"),
                                               args.input_size)
    header = "| network | MMACs | convs |" + "".join(
        f" b{b} ms (IQR) | b{b} × dense (IQR) |" for b in batches)
    print(f"{args.arch} {args.input_size}x{args.input_size}, {device}, policy {args.policy}, threads={args.threads}, "
          f"repeats={args.repeats}, batches={batches}\n\n{header}\n|{'---|' * (3 + 2 * len(batches))}")
    cells = {name: [] for name in nets}
    for batch in batches:
        x = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
        iters = 30 if args.gpu else args.iters or max(1, 32 // batch)
        times = time_interleaved(nets, x, args.repeats, warmup, iters)
        for name in nets:
            ms, ms_iqr = quartiles([t * 1e3 for t in times[name]])
            reference = "dense ORT" if name.endswith(" ORT") else "dense"
            ratio, ratio_iqr = quartiles([d / t for d, t in zip(times[reference], times[name])])
            extra = f", {batch / ms * 1e3:.0f} img/s" if args.gpu else ""
            cells[name] += [f"{ms:.1f} ({ms_iqr:.1f}){extra}", f"{ratio:.2f} ({ratio_iqr:.2f})"]
    for name in nets:
        print(f"| {name} | {costs[name][0]:.1f} | {costs[name][1]} | " + " | ".join(cells[name]) + " |")
    print("\n'× dense' = dense latency / network latency in the same repeat (>1: faster than dense); ORT rows: "
          "against dense's ONNX Runtime session.")
    folder.cleanup()


if __name__ == "__main__":
    main()
