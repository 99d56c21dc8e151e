"""Supervision of ``engine``'s child processes from the caller: start them with their logs, wait for all of
them, and turn any failure (a raise, a signal, a clean exit before the result file exists, a hang past the
deadline, a missing or unreadable result) into one ``MPCError`` that names the process and quotes its log."""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from .compat import MPCError
from .party import ENTRY, NAMES, ROLES

WAITING = re.compile(r"/torch/distributed/|/crypten/communicator/| in (wait|barrier|_setup_generators)$")


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")  # the parties run on CPU
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep the traffic on loopback
    return env


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    text = [line.strip() for line in text if line.strip()]
    return " | ".join(text[-lines:])[-400:] or "(empty log)"


class Processes:
    """The child processes of one call, their logs and results, and why they failed."""

    def __init__(self, tmp: Path, ranks: tuple[int, ...]):
        self.tmp, self.ranks, self.procs, self.ended = tmp, ranks, {}, {}

    def log(self, rank: int) -> Path:
        return self.tmp / f"{ROLES[rank]}.log"

    def out(self, rank: int) -> Path:
        return self.tmp / f"{ROLES[rank]}.pt"

    def start(self, rank: int, args: dict, threads: int) -> None:
        args = {"rank": rank, "out": str(self.out(rank)), **args}
        with open(self.log(rank), "w") as log:
            self.procs[rank] = subprocess.Popen([sys.executable, "-c", ENTRY, json.dumps(args)], env=_env(threads),
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def why(self, rank: int) -> str:
        code = self.procs[rank].returncode
        if code == 0:
            how = "exited with code 0 before writing its result"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"{NAMES[rank]} {how}: {_tail(self.log(rank))}"

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for rank, proc in self.procs.items():
                if rank not in self.ended and proc.poll() is not None:
                    self.ended[rank] = time.monotonic()
            failed = [r for r in self.ended if self.procs[r].returncode != 0 or not self.out(r).exists()]
            if failed:   # the first to fail is the cause; a peer that lost its connection only follows it
                cause = min(failed, key=lambda r: (bool(re.search(r"[Cc]onnection|[Pp]eer|[Bb]roken pipe",
                                                                  _tail(self.log(r), 1))), self.ended[r]))
                raise MPCError(f"CrypTen {self.why(cause)}")
            if len(self.ended) == len(self.procs):
                return
            if time.monotonic() > deadline:
                raise MPCError(f"CrypTen run timed out after {timeout:g} s: {self.stuck()}")
            time.sleep(0.02)

    def stuck(self) -> str:
        """Which running process is hung (not waiting in a communication call), from its stack dump."""
        running = [r for r in self.procs if r not in self.ended]
        for rank in running:
            self.procs[rank].send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        waiting, busy = [], []
        for rank in running:
            path, frame = _main_frame(self.log(rank).read_text(errors="replace"))
            in_comm = frame is None or WAITING.search(f"{path} in {frame.split()[0]}")
            (waiting if in_comm else busy).append((rank, frame))
        if not busy:
            return ", ".join(NAMES[r] for r, _ in waiting) + " still running, all waiting for each other (stopped)"
        hung = "; ".join(f"{NAMES[r]} hung in {frame}" for r, frame in busy)
        return hung + (f"; {', '.join(NAMES[r] for r, _ in waiting)} waiting for it" if waiting else "") + " (stopped)"

    def reap(self) -> None:
        """Stop every process still running: SIGTERM, then SIGKILL after 5 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def result(self, rank: int) -> dict:
        try:
            return torch.load(self.out(rank), weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise MPCError(f"CrypTen {NAMES[rank]} left no readable result ({type(err).__name__}: {err})") from None


def _main_frame(log: str) -> tuple[str, str | None]:
    """(path, "function (file:line)") of the main thread's innermost frame in the last faulthandler dump of
    ``log``; (``""``, None) without a dump."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", log)
    for block in reversed(blocks):
        frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', block)
        if frames and frames[-1][0] == "<string>":
            path, line, func = frames[0]
            return path, f"{func} ({Path(path).name}:{line})"
    return "", None
