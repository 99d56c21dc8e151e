"""CrypTen two-party latency of dense vs DepthShrinker-style activation-removed MobileNetV2 (and merged, when
``depthshrinker.deploy.merge`` is importable), interleaved in one set of processes (model owner, client, dealer).
Online (party-to-party) and preprocessing (dealer) phases are timed and counted separately; ``--provider tfp``
(or ``both``) adds CrypTen's trusted-first-party mode, a cost simulation in which the owner deals.

Keep ratio 0.4 of the 19 block units keeps round(0.4·19) = 8 activations, chosen two ways: ``upstream``
(stem, blocks 4-5 and the last five units, like upstream patterns B/D) and ``mpc`` (the 8 units whose removal
saves least under the cost model, ``cost.unit_table``). Weights are the offline ImageNet ones (random when
their package is missing), BatchNorm folded, not finetuned: latency, bytes and rounds do not depend on the
values. Speed-ups are medians (and IQR) of per-run ratios to the dense network timed in the same run.

    python benchmarks/bench_mpc.py --input-size 32 --runs 5 --provider both
    python benchmarks/bench_mpc.py --rate 100mbit --runs 1   # bandwidth-limited loopback (needs root + unshare)
    python benchmarks/bench_mpc.py --calibrate      # fit cost.SECONDS_PER_* on synthetic nets

``--rate`` re-runs this script in a private network namespace (``unshare -n``), measures the networks on the
free loopback, then adds a token bucket to it (``tc qdisc add dev lo root tbf rate R burst 1mbit latency
400ms``; this kernel has tbf, not netem) and measures again. The bucket must hold one loopback segment (64 KB):
with ``burst 32kbit`` (4 KB) gloo's TCP streams stall for good. The loopback's one queue carries both directions
and the dealer's traffic, so the estimate of the limited run is the free run's time + bytes·8/R (online: the
per-party sent + received count B; preprocessing: the dealer's randomness + control bytes). Where namespaces
are not allowed the run is skipped with a message (exit code 0).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import torch

from depthshrinker.deploy.mpc import cost
from depthshrinker.deploy.mpc.engine import PROVIDERS, measure_many
from depthshrinker.deploy.plan import apply_keep
from depthshrinker.nets.gates import num_kept
from depthshrinker.nets.plain import PlainNet, to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

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
        from depthshrinker.deploy.merge import merge_plain
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
    """One row per network: counts (measured, and whether the cost model predicts them exactly), online and
    preprocessing medians [IQR], the online speed-up over dense (median [IQR] of per-run ratios) and estimates."""
    dense = np.array(results["dense"]["mpc_latency_runs_s"])
    print(f"{'network':<22}{'ReLU6 el.':>10}{'act':>4}{'MB':>8}{'rounds':>7}{'pre MB':>8}{'req':>5}{'exact':>6}"
          f"{'online s [IQR]':>16}{'speed-up [IQR]':>16}{'preproc s [IQR]':>17}{'LAN est':>8}{'WAN est':>8}"
          f"{'rel err':>9}")
    for name, r in results.items():
        c = cost.count(nets[name], input_size)
        ratios = dense / np.array(r["mpc_latency_runs_s"])
        ok = (c.bytes, c.rounds) == (r["mpc_bytes"], r["mpc_rounds"]) and (
            not r["mpc_private"] or (c.preproc_bytes, c.preproc_requests) == (r["mpc_preproc_bytes"],
                                                                             r["mpc_preproc_requests"]))
        est = {n: cost.estimate(nets[name], input_size, n)["latency_s"] for n in ("lan", "wan")}
        print(f"{name:<22}{c.relu6:>10}{c.act_layers:>4}{r['mpc_comm_mb']:>8.1f}{r['mpc_rounds']:>7}"
              f"{r['mpc_preproc_mb']:>8.1f}{r['mpc_preproc_requests']:>5}{str(ok):>6}"
              f"{r['mpc_latency_s']:>9.2f} [{r['mpc_latency_iqr_s']:.2f}]{np.median(ratios):>9.2f}x [{iqr(ratios):.2f}]"
              f"{r['mpc_preproc_s']:>10.2f} [{r['mpc_preproc_iqr_s']:.2f}]"
              f"{est['lan']:>7.2f}s{est['wan']:>7.1f}s{r['mpc_rel_err']:>9.1e}")


def run(nets: dict, args, provider: str, label: str = "loopback") -> dict:
    results = measure_many(nets, args.input_size, runs=args.runs, threads=args.threads, timeout=3600,
                           provider=provider, tol=1.0)
    print(f"\nCrypTen 0.4.1, provider {provider} ({PROVIDERS[provider]}), {label}, {args.threads} thread(s) per "
          f"process, {args.input_size}x{args.input_size}, {args.runs} runs after the tracing pass, interleaved; "
          "MB and rounds per party (online), MB and requests dealer -> owner (preprocessing)")
    report(nets, results, args.input_size)
    return results


def rate_limited(nets: dict, args) -> None:
    """Inside a private network namespace: free loopback, then a token bucket of ``args.rate`` on it."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    free = run(nets, args, "ttp", "free loopback in a private namespace")
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", args.rate, "burst", args.burst,
                    "latency", "400ms"], check=True)
    rate = parse_rate(args.rate)
    limited = run(nets, args, "ttp", f"loopback limited to {args.rate} (tbf, burst {args.burst})")
    print(f"\nmeasured at {args.rate} vs estimate = free-loopback time + bytes*8/{rate:.3g} bit/s (one queue, both "
          "directions)")
    print(f"{'network':<22}{'online s':>9}{'est.':>8}{'ratio':>7}{'preproc s':>10}{'est.':>8}{'ratio':>7}")
    for name, r in limited.items():
        c = cost.count(nets[name], args.input_size)
        online = cost.latency(c, cost.Network(0.0, rate / 2), compute_s=free[name]["mpc_latency_s"])
        dealer_bytes = r["mpc_preproc_bytes"] + r["mpc_preproc_control_bytes"]
        pre = free[name]["mpc_preproc_s"] + dealer_bytes * 8 / rate
        print(f"{name:<22}{r['mpc_latency_s']:>9.2f}{online:>8.2f}{r['mpc_latency_s'] / online:>7.2f}"
              f"{r['mpc_preproc_s']:>10.2f}{pre:>8.2f}{r['mpc_preproc_s'] / pre:>7.2f}")


def parse_rate(text: str) -> float:
    """tc's rate syntax (``100mbit``, ``1gbit``, ``500kbit``) in bit/s."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise SystemExit(f"--rate {text!r}: use tc's syntax, e.g. 100mbit")


def in_namespace(argv: list[str]) -> None:
    """Re-run this script in a private network namespace, or say why it cannot."""
    command = ["unshare", "-n", sys.executable, *argv]
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    except FileNotFoundError:
        probe = None
    if probe is None or probe.returncode != 0:
        why = "unshare not found" if probe is None else probe.stderr.strip() or f"exit code {probe.returncode}"
        print(f"SKIPPED: the bandwidth-limited run needs a private network namespace (root and `unshare -n`); "
              f"here: {why}")
        return
    raise SystemExit(subprocess.run(command, env=dict(os.environ, DEPTHSHRINKER_NETNS="1")).returncode)


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
    # (online phase only: the tuples come from the preprocessing, timed apart)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--provider", choices=["ttp", "tfp", "both"], default="ttp",
                        help="ttp: separate dealer (private); tfp: the owner deals (cost simulation); both: one then "
                             "the other, with the dealer's overhead")
    parser.add_argument("--rate", help="also measure on a loopback limited to this rate (tc syntax, e.g. 100mbit)")
    parser.add_argument("--burst", default="1mbit", help="tbf bucket (>= 64 KB, loopback's segment size)")
    parser.add_argument("--only", nargs="+", help="measure only these networks (e.g. dense 'mpc 0.4 merged')")
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    if args.calibrate:
        calibrate(args.input_size, args.runs)
        return
    if args.rate and not os.environ.get("DEPTHSHRINKER_NETNS"):
        in_namespace(sys.argv)
        return
    nets = networks(args.input_size, args.keep_ratio)
    if args.only:
        nets = {name: net for name, net in nets.items() if name in args.only}
        assert "dense" in nets, "--only must keep dense (the reference of the speed-ups)"
    if args.rate:
        rate_limited(nets, args)
        return
    results = {p: run(nets, args, p) for p in (["ttp", "tfp"] if args.provider == "both" else [args.provider])}
    if len(results) == 2:
        print("\ndealer overhead, TTP / TFP (medians): online, preprocessing, online + preprocessing")
        for name in nets:
            ttp, tfp = results["ttp"][name], results["tfp"][name]
            print(f"{name:<22}{ttp['mpc_latency_s'] / tfp['mpc_latency_s']:>6.2f}x"
                  f"{ttp['mpc_preproc_s'] / tfp['mpc_preproc_s']:>8.2f}x{ttp['mpc_e2e_s'] / tfp['mpc_e2e_s']:>8.2f}x")


if __name__ == "__main__":
    main()
