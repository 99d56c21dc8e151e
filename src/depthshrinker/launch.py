"""Run a CLI stage the way a workflow rule asks for it: in this process, or under ``torchrun`` with one
process per GPU (DistributedDataParallel) when the rule was given more than one GPU (``resources: gpu=N``)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def launch(argv: list, config: dict, threads: int = 1, gpus: int = 0, log: str | None = None) -> None:
    """``depthshrinker <argv>`` with ``config`` (an already validated dict); ``gpus > 1`` uses torchrun.
    A list of argv lists runs those stages one after the other in this one job (one process start-up), their
    output in one ``log``."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text("")
    for stage in argv if argv and isinstance(argv[0], (list, tuple)) else [argv]:
        _launch_one([str(a) for a in stage] + ["--threads", str(threads)], config, gpus, log)


def _launch_one(argv: list[str], config: dict, gpus: int, log: str | None) -> None:
    if gpus <= 1:
        from depthshrinker.cli import main

        if main(argv, config=config, log_file=log) != 0:
            raise SystemExit(f"depthshrinker {argv[0]} failed (see {log or 'stderr'})")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "depthshrinker.cli", *argv, "--config", f.name]
    try:
        with open(log or os.devnull, "a") as out:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    finally:
        Path(f.name).unlink(missing_ok=True)
