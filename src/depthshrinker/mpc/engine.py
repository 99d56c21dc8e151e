"""Two-party secure inference of a PlainNet under CrypTen 0.4.1, without ONNX (REFERENCE.md §2, "MPC cost").

The two parties are two local processes on loopback (gloo backend, a free TCP port per call) running
CrypTen's default trusted-first-party (TFP) provider: rank 0 deals the Beaver triples and other correlated
randomness without communicating, as a trusted dealer would offline, so what is measured is the online
phase. The model owner (rank 0) secret-shares the parameters once; in every run the client (rank 1)
secret-shares its image, both parties evaluate each layer with CrypTen's own ops (Beaver ``conv2d``/``matmul``,
public additions, ``relu``, ReLU6 as ``hardtanh(0, 6)`` = two comparisons stacked into one call, mean pooling
by a public divisor) and the logits are revealed to the client only.

One run spans input sharing to revealed logits. Its latency is the slower party's wall time after a common
barrier; bytes and rounds are CrypTen's per-party counters over the same window (a party's sent + received
bytes; equal for both parties: for two parties, all the traffic on the link). Runs of several networks are
interleaved (order rotated every run) in one pair of processes, so their ratios share the machine state.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bits import decode_bits
from . import cost
from .compat import MPCError, import_crypten

OWNER, CLIENT = 0, 1
PARTIES = ("model owner", "client")
SECURE_ACTS = {"none": lambda x: x, "relu": lambda x: x.relu(), "relu6": lambda x: x.hardtanh(0, 6)}
ENTRY = "from depthshrinker.mpc.engine import _party_main; _party_main()"


def as_plain(model: nn.Module) -> nn.Module:
    """The PlainNet form of ``model`` (a PlainNet, or a timm EfficientNet-family model folded by ``to_plain``)."""
    from ..plain import PlainNet, to_plain  # not at import time: the parties must not pay timm's import

    if isinstance(model, PlainNet):
        return model.eval()
    if hasattr(model, "conv_stem"):
        return to_plain(model.eval())
    raise MPCError(f"cannot run {type(model).__name__} under MPC: expected a PlainNet or a timm MobileNetV2/"
                   "EfficientNet-Lite model")


def secure_act(y, conv: dict):
    """The activation of a conv spec on a CrypTensor; with an SNL mask (public), only the kept elements go
    through it: gather them by index, activate, add the difference back."""
    act = SECURE_ACTS[conv["act"]]
    if not conv.get("mask") or conv["act"] == "none":
        return act(y)
    mask = conv["mask"]
    keep = decode_bits(mask["bits"], mask["shape"]).expand(1, *y.shape[1:]).flatten().nonzero().flatten()
    flat = y.flatten()
    kept = flat.index_select(0, keep)
    return flat.index_add(0, keep, act(kept) - kept).view(y.shape)


def secure_forward(spec: dict, params: dict, x):
    """Mirror ``PlainNet.forward`` on CrypTensors; ``params`` maps state_dict names to shared parameters."""
    for i, block in enumerate(spec["blocks"]):
        y = x
        for j, conv in enumerate(block["convs"]):
            name = f"blocks.{i}.convs.{j}."
            y = y.conv2d(params[name + "weight"], stride=conv["stride"], padding=conv["padding"],
                         groups=conv["groups"])
            y = secure_act(y + params[name + "bias"].view(1, -1, 1, 1), conv)
        if block.get("residual"):
            y = y + x
        x = SECURE_ACTS[block.get("free_act", "none")](y)
    return x.mean((2, 3)).matmul(params["classifier.weight"].t()) + params["classifier.bias"]


# ---- one party (a child process) ----

def _exit_with_parent(parent: int, workdir: Path) -> None:
    """Exit when the caller (pid ``parent``) dies, even by SIGKILL, so that no party outlives it, and remove the
    caller's working folder that it could not."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _party(rank: int, port: int, job: str, out: str, runs: int, warmup: int, threads: int, parent: int) -> None:
    _exit_with_parent(parent, Path(job).parent)
    torch.set_num_threads(threads)
    crypten = import_crypten()
    data = torch.load(job, weights_only=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=f"tcp://127.0.0.1:{port}",
                      DISTRIBUTED_BACKEND="gloo")
    crypten.init()
    crypten.cfg.communicator.verbose = True  # CrypTen counts bytes and rounds only when verbose
    comm = crypten.communicator.get()
    nets = []
    for i, spec in enumerate(json.loads(data["specs"])):
        values = data["state_dicts"][i] if rank == OWNER else {k: torch.zeros(s) for k, s in data["shapes"][i].items()}
        nets.append((spec, {k: crypten.cryptensor(v, src=OWNER) for k, v in values.items()}))
    image = data["x"] if rank == CLIENT else torch.zeros(data["input_shape"].tolist())
    times = [[] for _ in nets]
    stats = [[] for _ in nets]
    logits = [None for _ in nets]
    for step in range(warmup + runs):
        for i in [(step + k) % len(nets) for k in range(len(nets))]:  # order rotated every run
            spec, params = nets[i]
            comm.barrier()
            comm.reset_communication_stats()
            start = time.perf_counter()
            logits[i] = secure_forward(spec, params, crypten.cryptensor(image, src=CLIENT)).get_plain_text(dst=CLIENT)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                counted = comm.get_communication_stats()
                times[i].append(elapsed)
                stats[i].append([counted["bytes"], counted["rounds"]])
    crypten.uninit()
    result = {"times": torch.tensor(times, dtype=torch.float64), "stats": torch.tensor(stats, dtype=torch.int64)}
    if rank == CLIENT:
        result["logits"] = logits
    torch.save(result, out)


def _party_main() -> None:
    _party(**json.loads(sys.argv[1]))


# ---- the caller ----

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _party_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")  # the parties run on CPU
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep the parties' traffic on loopback
    return env


def _why(proc: subprocess.Popen, log: Path) -> str:
    code = proc.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return how + (f": {lines[-1].strip()[:300]}" if lines else "")


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise MPCError("CrypTen " + "; ".join(f"party {r} ({PARTIES[r]}) {_why(procs[r], logs[r])}"
                                                  for r in failed))
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            running = ", ".join(f"party {r} ({PARTIES[r]})" for r, code in enumerate(codes) if code is None)
            raise MPCError(f"CrypTen run timed out after {timeout:g} s ({running} still running, stopped)")
        time.sleep(0.05)


def _reap(procs: list[subprocess.Popen]) -> None:
    """Stop every party still running: SIGTERM, then SIGKILL after 5 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(rank: int, port: int, tmp: Path, runs: int, warmup: int, threads: int) -> subprocess.Popen:
    args = {"rank": rank, "port": port, "job": str(tmp / f"job{rank}.pt"), "out": str(tmp / f"out{rank}.pt"),
            "runs": runs, "warmup": warmup, "threads": threads, "parent": os.getpid()}
    with open(tmp / f"party{rank}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", ENTRY, json.dumps(args)], env=_party_env(threads),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _run_parties(nets: list[nn.Module], x: torch.Tensor, runs: int, warmup: int, threads: int,
                 timeout: float) -> list[dict]:
    specs = json.dumps([net.spec for net in nets])
    jobs = [{"specs": specs, "state_dicts": [net.state_dict() for net in nets],
             "input_shape": torch.tensor(x.shape)},   # the owner sees the input's shape, not its values
            {"specs": specs, "x": x,                  # the client sees the parameters' shapes, not their values
             "shapes": [{k: list(v.shape) for k, v in net.state_dict().items()} for net in nets]}]
    with tempfile.TemporaryDirectory(prefix="depthshrinker-mpc-") as tmp:
        tmp = Path(tmp)
        for rank, job in enumerate(jobs):
            torch.save(job, tmp / f"job{rank}.pt")
        port, procs = _free_port(), []
        try:
            for rank in (OWNER, CLIENT):
                procs.append(_start(rank, port, tmp, runs, warmup, threads))
            _wait(procs, [tmp / f"party{rank}.log" for rank in (OWNER, CLIENT)], timeout)
        finally:
            _reap(procs)
        return [torch.load(tmp / f"out{rank}.pt", weights_only=True) for rank in (OWNER, CLIENT)]


def _spread(times: np.ndarray) -> dict:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"mpc_latency_s": float(median), "mpc_latency_iqr_s": float(q3 - q1),
            "mpc_latency_min_s": float(times.min()), "mpc_latency_max_s": float(times.max()),
            "mpc_latency_runs_s": [float(t) for t in times]}


def measure_many(models: dict[str, nn.Module], input_size: int, runs: int = 3, warmup: int = 1,
                 timeout: float = 900.0, threads: int = 1, x: torch.Tensor | None = None, seed: int = 0,
                 tol: float = 1e-2) -> dict[str, dict]:
    """Secure inference of one image through each model, runs interleaved in one pair of party processes.

    Per model: ``mpc_latency_s`` (median of ``runs`` after ``warmup``), its IQR, min, max and every run,
    ``mpc_bytes`` / ``mpc_comm_mb`` (per party, MB = 1e6 B) and ``mpc_rounds``, and ``max_abs_err`` of the
    revealed logits against the plaintext forward. Raises MPCError when a party fails or is killed,
    on ``timeout`` (seconds, whole call) and when the error exceeds ``tol · max(1, max |logit|)``."""
    if runs < 1 or warmup < 0:
        raise MPCError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    names, nets = list(models), [as_plain(model) for model in models.values()]
    if x is None:
        x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    owner, client = _run_parties(nets, x, runs, warmup, threads, timeout)
    results = {}
    for i, (name, net) in enumerate(zip(names, nets)):
        with torch.no_grad():
            reference = net(x)
        err, bound = float((client["logits"][i] - reference).abs().max()), tol * max(1.0, float(reference.abs().max()))
        if not err <= bound:
            raise MPCError(f"CrypTen output of '{name}' differs from plaintext by {err:.3g} > {bound:.3g}: values too "
                           "large for 16-bit fixed point? (BatchNorm statistics of an untrained network)")
        bytes_, rounds = (int(v) for v in torch.cat([owner["stats"][i], client["stats"][i]]).amax(0))
        results[name] = {**_spread(np.maximum(owner["times"][i].numpy(), client["times"][i].numpy())),
                         "mpc_bytes": bytes_, "mpc_comm_mb": bytes_ / 1e6, "mpc_rounds": rounds,
                         "max_abs_err": err, "input_size": input_size, "runs": runs, "threads_per_party": threads}
    return results


def measure(model: nn.Module, input_size: int, runs: int = 3, **kwargs) -> dict:
    """``measure_many`` for one model."""
    return measure_many({"model": model}, input_size, runs, **kwargs)["model"]


def bench_mpc(ckpt_path: str | Path, out_json: str | Path, input_size: int, runs: int = 3, **kwargs) -> dict:
    """Pipeline stage: measure a checkpoint (PlainNet or timm) under CrypTen and write the JSON, with the cost
    model's bytes/rounds next to the measured ones and its LAN/WAN latency estimates."""
    from ..checkpoint import load_model, write_json

    net = as_plain(load_model(ckpt_path)[0])
    result = {"mpc_checkpoint": str(ckpt_path), **measure(net, input_size, runs, **kwargs)}
    predicted = cost.count(net, input_size)
    result.update(model_bytes=predicted.bytes, model_rounds=predicted.rounds,
                  **{f"mpc_est_{name}_s": cost.estimate(net, input_size, name)["latency_s"] for name in cost.NETWORKS})
    write_json(out_json, result)
    return result
