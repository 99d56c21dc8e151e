"""Cluster profiles: dry-runs, and the real submit lines of the SLURM executor plugin captured by a fake
`sbatch` on PATH (the rules' GPUs, partition, time and memory must reach the scheduler)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
FAKE = {  # the SLURM client commands the plugin calls; sbatch records its arguments
    "sbatch": 'echo "$@" >> "$FAKE_SLURM_LOG"; echo "4242$RANDOM"',
    "squeue": "exit 0",
    "sacct": "exit 0",
    "sacctmgr": 'echo "account|user"; echo "testaccount|$USER"',
    "scontrol": "exit 0",
    "sinfo": "echo gpu",
    "scancel": "exit 0",
}


@pytest.mark.parametrize("profile", ["default", "slurm", "cluster-generic"])
def test_dry_run_with_profile(profile, tmp_path):
    run = subprocess.run([*SNAKEMAKE, "-n", "--workflow-profile", f"workflow/profiles/{profile}",
                          "--config", f"results={tmp_path}/r"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "sbatch.log"),
            "USER": os.environ.get("USER", "tester")}


@pytest.mark.slow
def test_slurm_submit_lines_request_what_the_rules_declare(tmp_path):
    results = tmp_path / "r"
    # a finished dense model and one finished mask: the next jobs are a search and a finetune
    dense = results / "dense/full/1.0"
    cell = results / "depthshrinker/block/0.4"
    for path in (dense / "model.pt", dense / "model.json", results / "latency/mpc-block.csv", cell / "mask.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
    targets = [str(results / "depthshrinker/block/0.6/search.pt"), str(cell / "model.pt")]
    proc = subprocess.Popen([*SNAKEMAKE, *targets, "--workflow-profile", "workflow/profiles/slurm",
                             "--config", f"results={results}", "--rerun-triggers", "mtime"],
                            cwd=ROOT, env=_fake_slurm(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = tmp_path / "sbatch.log"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.kill()
    output = proc.communicate()[0]
    lines = log.read_text().splitlines() if log.exists() else []
    assert len(lines) == 2, output[-3000:]
    for rule in ("search", "finetune"):
        line = next(line for line in lines if f"rule_{rule}" in line or f"--allowed-rules {rule}" in line
                    or f"'{rule}'" in line)
        assert "-p gpu" in line or "--partition gpu" in line or "--partition=gpu" in line, line
        assert "--gpus=1" in line or "--gpus 1" in line or "--gres=gpu:1" in line, line
        assert "-t 4320" in line or "--time 4320" in line or "--time=4320" in line, line
        assert "--mem 64000" in line or "--mem=64000" in line, line
        assert "--cpus-per-gpu=8" in line or "--cpus-per-gpu 8" in line, line
    (tmp_path / "submit-lines.txt").write_text("\n".join(lines) + "\n")
