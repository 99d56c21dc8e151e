"""CrypTen two-party latency of dense vs DepthShrinker-style activation-removed MobileNetV2 (and merged, when
``depthshrinker.merge`` is importable), interleaved in one pair of party processes.

Keep ratio 0.4 of the 19 block units keeps round(0.4·19) = 8 activations, chosen two ways: ``upstream``
(stem, blocks 4-5 and the last five units, like upstream patterns B/D) and ``mpc`` (the 8 units whose removal
saves least under the cost model, ``cost.unit_table``). Weights are the offline ImageNet ones (random when
their package is missing), BatchNorm folded, not finetuned: latency, bytes and rounds do not depend on the
values. Speed-ups are medians (and IQR) of per-run ratios to the dense network timed in the same run.

    python benchmarks/bench_mpc.py --input-size 32 --runs 5
    python benchmarks/bench_mpc.py --calibrate      # fit cost.SECONDS_PER_* on synthetic nets
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from depthshrinker.gates import apply_keep, num_kept
from depthshrinker.models import activation_units, create_model
from depthshrinker.mpc import cost, measure_many
from depthshrinker.plain import PlainNet, to_plain

UPSTREAM_04 = [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def mobilenet(keep: list[int] | None) -> PlainNet:
    """MobileNetV2-1.0 (stride-1 stem, 10 classes), activations kept per ``keep``, as a PlainNet."""
    torch.manual_seed(0)
    model = create_model("mobilenetv2_100", 10, small_input=True, pretrained="auto")
    if keep is not None:
        apply_keep(model, activation_units(model), keep)
    return to_plain(model.eval())


def mpc_aware_keep(dense: PlainNet, input_size: int, keep_ratio: float) -> list[int]:
    """Keep the units whose removal (and merging) saves the least estimated LAN latency."""
    saving = [row["before_s"] - row["after_s"] for row in cost.unit_table(dense, input_size, "lan")]
    kept = set(np.argsort(saving, kind="stable")[:num_kept(keep_ratio, len(saving))].tolist())
    return [int(i in kept) for i in range(len(saving))]


def networks(input_size: int, keep_ratio: float) -> dict[str, PlainNet]:
    dense = mobilenet(None)
    nets = {"dense": dense}
    keeps = {"upstream": UPSTREAM_04, "mpc": mpc_aware_keep(dense, input_size, keep_ratio)}
    try:
        from depthshrinker.merge import merge_plain
    except ImportError:
        merge_plain = None
    for name, keep in keeps.items():
        assert sum(keep) == num_kept(keep_ratio, len(keep)), keep
        nets[f"{name} {keep_ratio}"] = mobilenet(keep)
        if merge_plain is not None:
            nets[f"{name} {keep_ratio} merged"] = merge_plain(nets[f"{name} {keep_ratio}"])
    return nets


def iqr(values: np.ndarray) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def report(nets: dict, results: dict, input_size: int) -> None:
    dense = np.array(results["dense"]["mpc_latency_runs_s"])
    print(f"{'network':<22}{'ReLU6 el.':>10}{'act lay.':>9}{'MB':>9}{'rounds':>7}{'model ok':>9}"
          f"{'latency s [IQR]':>18}{'speed-up [IQR]':>17}{'loopback est':>13}{'LAN est':>9}{'WAN est':>9}"
          f"{'max err':>9}")
    for name, r in results.items():
        c = cost.count(nets[name], input_size)
        ratios = dense / np.array(r["mpc_latency_runs_s"])
        ok = c.bytes == r["mpc_bytes"] and c.rounds == r["mpc_rounds"]
        est = {n: cost.estimate(nets[name], input_size, n)["latency_s"] for n in ("loopback", "lan", "wan")}
        print(f"{name:<22}{c.relu6:>10}{c.act_layers:>9}{r['mpc_comm_mb']:>9.1f}{r['mpc_rounds']:>7}{str(ok):>9}"
              f"{r['mpc_latency_s']:>9.2f} [{r['mpc_latency_iqr_s']:.2f}]"
              f"{np.median(ratios):>10.2f}x [{iqr(ratios):.2f}]"
              f"{est['loopback']:>12.2f}s{est['lan']:>8.2f}s{est['wan']:>8.1f}s{r['max_abs_err']:>9.1e}")


def synthetic(kind: str) -> PlainNet:
    """Calibration nets: many ReLU6 elements (``act``), many MACs (``mac``) or many tiny layers (``round``)."""
    def conv(cin, cout, act, kernel=1, stride=1, padding=0):
        return {"convs": [{"in": cin, "out": cout, "kernel": kernel, "stride": stride, "padding": padding,
                           "groups": 1, "act": act}]}

    blocks = {"act": [conv(3, 64, "relu6")] + [conv(64, 64, "relu6")] * 3,
              "mac": [conv(3, 128, "none")] + [conv(128, 128, "none", 3, 1, 1)] * 2,
              "round": [conv(3, 4, "relu6", 8, 8)] + [conv(4, 4, "relu6")] * 60}[kind]
    spec = {"kind": "plain", "num_classes": 10, "blocks": blocks,
            "classifier": {"in": blocks[-1]["convs"][-1]["out"], "out": 10}}
    return PlainNet(spec).eval()


def calibrate(input_size: int, runs: int) -> None:
    """Least-squares fit of compute seconds = a·comparisons + b·MACs + c·rounds on loopback (1 thread/party)."""
    nets = {kind: synthetic(kind) for kind in ("act", "mac", "round")}
    nets["dense mbv2"] = mobilenet(None)
    results = measure_many(nets, input_size, runs=runs)
    rows = [cost.count(net, input_size) for net in nets.values()]
    a = np.array([[c.relu + 2 * c.relu6, c.macs, c.rounds] for c in rows], dtype=float)
    t = np.array([r["mpc_latency_s"] for r in results.values()])
    coef, *_ = np.linalg.lstsq(a, t, rcond=None)
    print(f"SECONDS_PER_COMPARISON = {coef[0]:.3g}\nSECONDS_PER_MAC = {coef[1]:.3g}\nSECONDS_PER_ROUND = {coef[2]:.3g}")
    for (name, r), fit in zip(results.items(), a @ coef):
        print(f"{name:<12} measured {r['mpc_latency_s']:.2f} s [IQR {r['mpc_latency_iqr_s']:.2f}], fit {fit:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per party")
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    if args.calibrate:
        calibrate(args.input_size, args.runs)
        return
    nets = networks(args.input_size, args.keep_ratio)
    results = measure_many(nets, args.input_size, runs=args.runs, threads=args.threads, timeout=3600)
    print(f"CrypTen 0.4.1, 2 parties on loopback, {args.threads} thread(s) each, {args.input_size}x{args.input_size}, "
          f"{args.runs} runs + 1 warm-up, interleaved; MB and rounds per party")
    report(nets, results, args.input_size)


if __name__ == "__main__":
    main()
