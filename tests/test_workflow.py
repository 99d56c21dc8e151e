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
    expected = [("train_dense", 1), ("cost_table", 1), ("search", 9), ("extract", 9), ("finetune", 9),
                ("train_uniform", 3), ("metaprune", 3), ("merge", 16), ("bench_device", 16), ("bench_mpc", 16),
                ("row", 16), ("summarize", 1), ("plots", 1)]
    for rule, count in expected:
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
    assert "depthshrinker: config key 'grid.depthshrinker.keep.0': 1.5 is greater than the maximum of 1" \
        in out.splitlines()


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end(micro_config, tmp_path):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config))
    run = _snakemake("--cores", "2", "--configfile", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    results = Path(micro_config["results"])
    table = pd.read_csv(results / "summary.csv").set_index("method")
    assert sorted(table.index) == ["dense", "depthshrinker", "metapruning", "snl", "uniform"]
    assert table.loc["depthshrinker", "keep_ratio"] == 0.5
    assert table.loc["depthshrinker", "nonlinear_layers"] < table.loc["dense", "nonlinear_layers"] == 35
    assert table.loc["snl", "nonlinear_layers"] == 35 > table.loc["depthshrinker", "nonlinear_layers"]
    columns = ["top1", "params", "macs", "merge_max_abs_err", "cpu_latency_ms", "mpc_latency_s", "mpc_comm_mb",
               "mpc_rounds"]
    assert table[columns].notna().all().all()
    assert (table["merge_max_abs_err"] < 1e-3).all()
    assert table.loc["depthshrinker", "mpc_rounds"] < table.loc["dense", "mpc_rounds"]
    assert (results / "latency" / "mpc-block.csv").is_file()
    assert (results / "plots" / "accuracy_vs_mpc_latency.png").is_file()
