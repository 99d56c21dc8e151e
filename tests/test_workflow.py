"""The Snakemake workflow: dry-run of the default grid, one cell rebuilt by naming its file, a tiny real run."""
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(*args, cwd=ROOT):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


def test_dry_run_of_the_default_grid(tmp_path):
    run = _snakemake("-n", "--quiet", "rules", "--config", f"results={tmp_path}/r")
    assert run.returncode == 0, run.stderr
    jobs = run.stdout + run.stderr
    for rule, count in [("train_dense", 1), ("search", 3), ("extract", 3), ("finetune", 3), ("summarize", 1)]:
        assert any(line.split()[:2] == [rule, str(count)] for line in jobs.splitlines()), (rule, jobs)


def test_one_cell_is_rebuilt_by_naming_its_file(tmp_path):
    target = f"{tmp_path}/r/depthshrinker/block/0.6/mask.json"
    run = _snakemake(target, "-n", "--quiet", "rules", "--config", f"results={tmp_path}/r")
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert "search" in out and "finetune" not in out and "summarize" not in out


def test_bad_config_is_rejected_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"depthshrinker": {"keep": [1.5]}}}))
    run = _snakemake("-n", "--configfile", str(bad))
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "1.5 is greater than the maximum of 1" in out and "['grid']['depthshrinker']['keep']" in out


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end(micro_config, tmp_path):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config))
    run = _snakemake("--cores", "2", "--configfile", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(Path(micro_config["results"]) / "summary.csv")
    assert list(table["method"]) == ["dense", "depthshrinker"]
    assert table.loc[1, "keep_ratio"] == 0.5
    assert table.loc[1, "nonlinear_layers"] < table.loc[0, "nonlinear_layers"] == 35
    assert table["top1"].notna().all()
