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
    run = subprocess.run([*SNAKEMAKE, "-n", "--workflow-profile", f"profiles/{profile}",
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
    dense = results / "dense/full/1.0/seed0"
    cell = results / "depthshrinker/block/0.4/seed0"
    for path in (dense / "model.pt", dense / "model.json", results / "latency/mpc-block.csv", cell / "search.pt",
                 cell / "mask.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
    targets = [str(results / "depthshrinker/block/0.8/seed0/search.pt"), str(cell / "model.pt")]
    proc = subprocess.Popen([*SNAKEMAKE, *targets, "--workflow-profile", "profiles/slurm",
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
        # memory and time from config `resources.train` (the default's 4000 MB, 60 min), first attempt
        assert "-t 60" in line or "--time 60" in line or "--time=60" in line, line
        assert "--mem 4000" in line or "--mem=4000" in line, line
        assert "--cpus-per-gpu=8" in line or "--cpus-per-gpu 8" in line, line
    (tmp_path / "submit-lines.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_cluster_generic_reports_a_job_the_scheduler_killed_as_failed(micro_config, tmp_path):
    """The shipped submit/status scripts (SUBMIT=local) as the scheduler: kill the running job's process group
    from outside, as a scheduler would; Snakemake must report the job failed and stop, not wait for it."""
    import yaml

    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config))
    target = f"{micro_config['results']}/dense/full/1.0/seed0/model.pt"
    proc = subprocess.Popen([*SNAKEMAKE, target, "--workflow-profile", "profiles/cluster-generic", "--configfile",
                             str(config), "--retries", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    jobs = ROOT / ".snakemake/cluster-jobs"
    deadline = time.time() + 120
    pid_files = []
    while time.time() < deadline and not pid_files:
        pid_files = [p for p in jobs.glob("local-train_dense-*.pid") if p.stat().st_mtime > time.time() - 120]
        time.sleep(0.5)
    assert pid_files, "no job was submitted"
    time.sleep(2)
    os.killpg(int(pid_files[0].read_text()), 9)
    try:
        output = proc.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("snakemake kept waiting for a job the scheduler killed")
    assert proc.returncode != 0
    assert "Error in rule train_dense" in output, output[-3000:]
