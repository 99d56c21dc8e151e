"""Two-party secure inference of a PlainNet under CrypTen 0.4.1, without ONNX (REFERENCE.md §2, "MPC cost").

Threat model (``provider="ttp"``, the default): semi-honest two-party inference. The model owner (rank 0)
holds the weights, the client (rank 1) holds the image, and a **separate dealer process** (rank 2, CrypTen's
trusted-third-party provider, never a party) deals the correlated randomness (Beaver triples, B2A bits). Each
party shares a PRNG seed with the dealer; the dealer sends the owner the correction share of every tuple, the
client derives its shares from its seed alone. Neither party sees a mask the other uses: the owner's view of an
opened ``x − a`` is masked by the client's share of ``a`` (and the client's view of ``W − b`` by the owner's),
so neither can rebuild the other's secret, as long as the dealer colludes with neither. The owner learns the
input's shape, the client the network's architecture (the spec, public); only the client gets the logits.

``provider="tfp"`` is a **cost simulation, not private inference**: CrypTen's trusted-first-party provider lets
rank 0, the model owner, generate every tuple in plaintext, so it knows ``a`` in every opened ``x − a`` and
learns the client's image. Its online bytes, rounds and time are the same as with the dealer.

Each run has two timed phases, with a barrier before each:

* **preprocessing**: the tuples one inference needs (traced once per network in an untimed first pass) are
  generated into CrypTen's tuple cache: with TTP, the owner sends the dealer all of one inference's tuple
  requests in one message and gets every correction share back in one reply (CrypTen's own TTP code makes
  the requests and the tuples; only their transport is batched), the client draws its shares from its seed;
  no party-to-party traffic. Counted: tuple requests, the bytes of randomness the dealer sends (8 B per ring
  element) and the control bytes (pickled requests and replies). The tracing pass uses CrypTen's
  one-round-trip-per-request transport.
* **online**: the client secret-shares its image, both parties evaluate each layer with CrypTen's own ops
  (Beaver ``conv2d``/``matmul``, public additions, ``relu``, ReLU6 as ``hardtanh(0, 6)``, mean pooling by a
  public divisor) using only cached tuples (checked: no dealer contact, no tuple left over), and the logits
  are revealed to the client. Bytes and rounds are CrypTen's per-party counters (sent + received; equal for
  both parties: for two parties, all the traffic on the link).

A phase's latency is the slower party's wall time. Several networks are interleaved (order rotated every run)
in one set of processes, so their ratios share the machine state. The processes meet through a rendezvous
file in a private temporary folder (no port is reserved; gloo binds its own), exit when their caller dies, and
every failure (a raise, a signal, a clean exit before writing the result, a hang past ``timeout``) becomes one
``MPCError`` that names the process and quotes its log.

The child processes' code is in ``party``, their supervision in ``processes``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import cost
from .compat import MPCError
from .party import CLIENT, DEALER, FAULT_ENV, NAMES, OWNER, ROLES, SPY_ENV, secure_act, secure_forward
from .processes import Processes

PROVIDERS = {"ttp": "private: a separate dealer process deals the correlated randomness",
             "tfp": "cost simulation, NOT private: the model owner deals the randomness and can see the input"}
__all__ = ["PROVIDERS", "as_plain", "measure", "measure_many", "bench_mpc", "secure_forward", "secure_act",
           "NAMES", "ROLES", "FAULT_ENV", "SPY_ENV"]


def as_plain(model: nn.Module) -> nn.Module:
    """The PlainNet form of ``model``: a PlainNet as it is, any other CNN folded from its IR by ``to_plain``."""
    from depthshrinker.base.config import ConfigError
    from depthshrinker.nets.plain import (  # not at import time: the parties must not pay timm's import
        PlainNet,
        to_plain,
    )

    if isinstance(model, PlainNet):
        return model.eval()
    try:
        return to_plain(model.eval())
    except ConfigError as e:
        raise MPCError(f"cannot run {type(model).__name__} under MPC: {e}") from e


def _run(nets: list[nn.Module], x: torch.Tensor, runs: int, warmup: int, threads: int, timeout: float,
         provider: str = "ttp") -> list[dict]:
    """Run the processes and return their results (owner, client[, dealer])."""
    if provider not in PROVIDERS:
        raise MPCError(f"unknown MPC provider {provider!r}: expected one of {sorted(PROVIDERS)}")
    specs = json.dumps([net.spec for net in nets])
    jobs = {OWNER: {"specs": specs, "state_dicts": [net.state_dict() for net in nets],
                    "input_shape": torch.tensor(x.shape)},   # the owner gets the input's shape, not its values
            CLIENT: {"specs": specs, "x": x,                 # the client gets the parameters' shapes only
                     "shapes": [{k: list(v.shape) for k, v in net.state_dict().items()} for net in nets]}}
    ranks = (OWNER, CLIENT, DEALER) if provider == "ttp" else (OWNER, CLIENT)
    with tempfile.TemporaryDirectory(prefix="depthshrinker-mpc-") as tmp:
        tmp = Path(tmp)
        processes = Processes(tmp, ranks)
        common = {"rendezvous": f"file://{tmp / 'rendezvous'}", "provider": provider, "threads": threads,
                  "parent": os.getpid(), "workdir": str(tmp)}
        try:
            for rank in ranks:
                args = dict(common)
                if rank != DEALER:
                    torch.save(jobs[rank], tmp / f"job{rank}.pt")
                    args.update(job=str(tmp / f"job{rank}.pt"), runs=runs, warmup=warmup)
                processes.start(rank, args, threads)
            processes.wait(timeout)
        finally:
            processes.reap()
        return [processes.result(rank) for rank in ranks]


def _spread(prefix: str, times: np.ndarray) -> dict:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {f"{prefix}_s": float(median), f"{prefix}_iqr_s": float(q3 - q1), f"{prefix}_min_s": float(times.min()),
            f"{prefix}_max_s": float(times.max()), f"{prefix}_runs_s": [float(t) for t in times]}


def measure_many(models: dict[str, nn.Module], input_size: int, runs: int = 3, warmup: int = 1,
                 timeout: float = 900.0, threads: int = 1, x: torch.Tensor | None = None, seed: int = 0,
                 tol: float = 1e-2, provider: str = "ttp") -> dict[str, dict]:
    """Secure inference of one image through each model, runs interleaved in one set of processes.

    Per model (see docs/mpc.md for every key): the online phase's ``mpc_latency_s`` (median of ``runs`` after
    ``warmup``; the first, tracing pass counts as a warm-up), its IQR, min, max and runs, ``mpc_bytes`` /
    ``mpc_comm_mb`` (per party, MB = 1e6 B) and ``mpc_rounds``; the preprocessing phase's ``mpc_preproc_s``
    (median...), ``mpc_preproc_bytes`` / ``mpc_preproc_mb`` (randomness the dealer sent),
    ``mpc_preproc_requests`` and ``mpc_preproc_control_bytes``; ``mpc_max_abs_err`` and ``mpc_rel_err`` (its
    ratio to the largest |plaintext logit|) and ``mpc_error_exceeded`` (``mpc_rel_err > tol``: flagged, not
    raised, so one network does not discard the others). Raises MPCError when a process fails, hangs past
    ``timeout`` (seconds, whole call) or is killed."""
    if runs < 1 or warmup < 0:
        raise MPCError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    names, nets = list(models), [as_plain(model) for model in models.values()]
    if x is None:
        x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    owner, client, *_ = _run(nets, x, runs, warmup, threads, timeout, provider)
    results = {}
    for i, (name, net) in enumerate(zip(names, nets)):
        with torch.no_grad():
            reference = net(x)
        err, scale = float((client["logits"][i] - reference).abs().max()), float(reference.abs().max())
        rel = err / scale if scale > 0 else err
        bytes_, rounds = (int(v) for v in torch.cat([owner["online"][i], client["online"][i]]).amax(0))
        pre_bytes, requests, control = (int(v) for v in owner["preproc"][i][:, :3].amax(0))
        dealer_s = float(np.median(owner["preproc"][i][:, 3].numpy()))
        online_s = np.maximum(owner["online_s"][i].numpy(), client["online_s"][i].numpy())
        preproc_s = np.maximum(owner["preproc_s"][i].numpy(), client["preproc_s"][i].numpy())
        results[name] = {
            "mpc_provider": provider, "mpc_private": provider == "ttp", "mpc_setting": PROVIDERS[provider],
            **_spread("mpc_latency", online_s), "mpc_bytes": bytes_, "mpc_comm_mb": bytes_ / 1e6,
            "mpc_rounds": rounds,
            **_spread("mpc_preproc", preproc_s), "mpc_preproc_bytes": pre_bytes, "mpc_preproc_mb": pre_bytes / 1e6,
            "mpc_preproc_requests": requests, "mpc_preproc_control_bytes": control, "mpc_preproc_dealer_s": dealer_s,
            "mpc_preproc_p2p_bytes": int(torch.cat([owner["preproc_p2p"][i], client["preproc_p2p"][i]])[:, 0].max()),
            "mpc_e2e_s": float(np.median(online_s + preproc_s)),
            "mpc_max_abs_err": err, "mpc_rel_err": rel, "mpc_tolerance": tol, "mpc_error_exceeded": bool(rel > tol),
            "mpc_input_size": input_size, "mpc_runs": runs, "mpc_threads_per_party": threads}
    return results


def measure(model: nn.Module, input_size: int, runs: int = 3, **kwargs) -> dict:
    """``measure_many`` for one model."""
    return measure_many({"model": model}, input_size, runs, **kwargs)["model"]


def bench_mpc(ckpt_paths: list[str | Path], outs: list[str | Path], input_size: int, runs: int = 3,
              **kwargs) -> list[dict]:
    """Pipeline stage: measure checkpoints (PlainNet or timm) under CrypTen, interleaved in one set of party
    processes (``measure_many``), and write one JSON per checkpoint to the matching ``outs`` entry, with the
    cost model's online and preprocessing predictions next to the measured ones and its latency estimates."""
    from depthshrinker.base.jsonio import write_json
    from depthshrinker.deploy.load import load_model

    if len(ckpt_paths) != len(outs):
        raise MPCError(f"bench-mpc: {len(ckpt_paths)} models but {len(outs)} outputs")
    nets = {str(p): as_plain(load_model(p)[0]) for p in ckpt_paths}
    measured = measure_many(nets, input_size, runs, **kwargs)
    results = []
    for (path, net), out in zip(nets.items(), outs):
        result = {"mpc_checkpoint": path, **measured[path], "mpc_measured_with": len(nets)}
        predicted = cost.count(net, input_size)
        got = (result["mpc_bytes"], result["mpc_rounds"], result["mpc_preproc_bytes"],
               result["mpc_preproc_requests"])
        model = (predicted.bytes, predicted.rounds, predicted.preproc_bytes, predicted.preproc_requests)
        result.update(model_bytes=predicted.bytes, model_rounds=predicted.rounds,
                      model_preproc_bytes=predicted.preproc_bytes, model_preproc_requests=predicted.preproc_requests,
                      # with TFP (no dealer) only the online figures can be compared
                      mpc_model_exact=got == model if result["mpc_private"] else got[:2] == model[:2],
                      **{f"mpc_est_{name}_s": cost.estimate(net, input_size, name)["latency_s"]
                         for name in cost.NETWORKS})
        write_json(out, result)
        results.append(result)
    return results
