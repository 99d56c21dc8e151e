"""The Snakemake workflow: dry-runs of the default grid, one cell rebuilt by naming its file, lint, a tiny real run,
and config-aware reruns (a changed key reruns exactly the jobs whose stage reads it, and their dependants)."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from depthshrinker.base.jsonio import read_json

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(*args, cwd=ROOT):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


def planned(*args) -> dict[str, int]:
    """{rule: job count} of a dry-run (empty when nothing is to be done)."""
    run = _snakemake(*args, "-n", "--quiet", "rules")
    assert run.returncode == 0, run.stdout + run.stderr
    counts = {}
    for line in (run.stdout + run.stderr).splitlines():
        match = re.fullmatch(r"([a-z_]+)\s+(\d+)", line.strip())
        if match and match[1] not in ("job", "total"):
            counts[match[1]] = int(match[2])
    return counts


def test_dry_run_of_the_default_grid_from_the_top_level_snakefile(tmp_path):
    """11 cells x 3 seeds: DepthShrinker block, SNL channel and pixel and MetaPruning at 2 keep ratios, uniform at
    2 widths, dense. One timing job: the 7 seed-free cells (dense, uniform, SNL channel/pixel) once, DepthShrinker
    and MetaPruning for every seed; every training job merges its own network; the cost table once."""
    jobs = planned("--config", f"results={tmp_path}/r")
    assert jobs == {"train_dense": 3, "cost_table": 1, "search": 18, "finetune": 18, "train_uniform": 6,
                    "metaprune": 6, "bench": 1, "row": 33,
                    "summarize": 1, "aggregate": 1, "paired": 1, "plots": 1, "all": 1}


def test_depthdp_config_adds_its_tables_and_cells_beside_depthshrinker(tmp_path):
    jobs = planned("--configfile", str(ROOT / "config" / "depthdp.yaml"), "--config", f"results={tmp_path}/r")
    # one latency table; one importance job per extended segment of MobileNetV2-1.0 (171) per seed, and the
    # retest of the first seed; the DP and its diagnostics per cell; the DepthShrinker cells whose networks set the budgets are the
    # grid's own (no extra search)
    assert jobs == {"train_dense": 3, "cost_table": 1, "latency_table": 1, "importance": 4 * 171, "search": 6,
                    "depthdp": 6, "depthdp_diagnostics": 6, "finetune": 12, "bench": 1,
                    "row": 15, "summarize": 1, "aggregate": 1, "paired": 1, "plots": 1, "all": 1}


def test_the_resnet18_config_runs_the_three_methods_side_by_side(tmp_path):
    jobs = planned("--configfile", str(ROOT / "config" / "depthdp-resnet18.yaml"), "--config", f"results={tmp_path}/r")
    # per seed: Kim et al.'s 22 extended segments and LayerMerge's 30 segment options of ResNet-18 (CIFAR stem);
    # diagnostics only for Kim et al.'s cells; rows: dense, DS block at 2 budgets, depthdp segment and layermerge at
    # the one within their reach (0.8)
    assert jobs == {"train_dense": 3, "cost_table": 1, "latency_table": 1, "importance": 3 * (22 + 30), "search": 6,
                    "depthdp": 6, "depthdp_diagnostics": 3, "finetune": 12, "bench": 1,
                    "row": 15, "summarize": 1, "aggregate": 1, "paired": 1, "plots": 1, "all": 1}


def test_seeds_multiply_only_the_work_that_depends_on_them(tmp_path):
    one = planned("--configfile", str(ROOT / "config" / "quick.yaml"), "--config", f"results={tmp_path}/r")
    three = planned("--config", f"results={tmp_path}/r")
    for rule in ("train_dense", "search", "finetune", "train_uniform", "metaprune", "row"):
        assert three[rule] == 3 * one[rule], rule
    for rule in ("cost_table", "bench", "summarize", "aggregate", "paired", "plots"):
        assert three[rule] == one[rule] == 1, rule


def test_one_cell_is_rebuilt_by_naming_its_file(tmp_path):
    jobs = planned(f"{tmp_path}/r/depthshrinker/block/0.4/seed0/mask.json", "--config", f"results={tmp_path}/r")
    assert jobs == {"train_dense": 1, "cost_table": 1, "search": 1}


@pytest.mark.parametrize("target", ["depthshrinker/block/1.7/seed0/model.pt", "depthshrinker/block/0.4/seed9/mpc.json",
                                    "dense/full/1.0/seed0/nothing.json"])
def test_a_target_outside_the_grid_plans_nothing(tmp_path, target):
    run = _snakemake("-n", f"{tmp_path}/r/{target}", "--config", f"results={tmp_path}/r")
    assert run.returncode != 0
    assert "MissingRuleException" in run.stdout + run.stderr or "No rule to produce" in run.stdout + run.stderr


def test_bad_config_is_rejected_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"depthshrinker": {"keep": [1.5]}}}))
    run = _snakemake("-n", "--configfile", str(bad))
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "depthshrinker: config key 'grid.depthshrinker.keep.0': 1.5 is greater than the maximum of 1" \
        in out.splitlines()


def test_lint_is_clean():
    run = _snakemake("--lint")
    assert run.returncode == 0, run.stdout + run.stderr


# What a one-key change must rerun on the finished tiny grid (dense, DS block 0.5, SNL channel 0.5, uniform 0.5,
# MetaPruning mpc 0.5: 5 cells, 1 seed). Every change ends in the summary, the aggregate, the paired table and the
# plots. The timing job measures every cell at once: a changed network reruns it, and so every row.
END = {"summarize": 1, "aggregate": 1, "paired": 1, "plots": 1, "all": 1}
TIMED = {"bench": 1, "row": 5}
SHRUNK = {"metaprune": 1, **TIMED}  # MetaPruning's budget is the DepthShrinker cell's cost
RERUNS = [
    ({"stages": {"finetune": {"epochs": 2}}}, {"finetune": 2, **SHRUNK, **END}),
    ({"stages": {"search": {"epochs": 2}}}, {"search": 2, "finetune": 2, **SHRUNK, **END}),
    ({"stages": {"uniform": {"epochs": 2}}}, {"train_uniform": 1, **TIMED, **END}),
    ({"metapruning": {"population": 3}}, {"metaprune": 1, **TIMED, **END}),
    ({"mpc": {"runs": 2}}, {**TIMED, **END}),
    ({"bench": {"repeats": 3}}, {**TIMED, **END}),
]


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_reruns_what_a_config_change_affects(micro_config, tmp_path):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config))
    run = _snakemake("--cores", "2", "--configfile", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Shell command: None" not in run.stdout + run.stderr
    results = Path(micro_config["results"])
    table = pd.read_csv(results / "summary.csv").set_index("method")
    assert sorted(table.index) == ["dense", "depthshrinker", "metapruning", "snl", "uniform"]
    assert table.loc["depthshrinker", "keep_ratio"] == 0.5 and (table["seed"] == 0).all()
    assert table["config_hash"].str.fullmatch(r"[0-9a-f]{12}").all()
    assert table.loc["depthshrinker", "nonlinear_layers"] < table.loc["dense", "nonlinear_layers"] == 35
    assert table.loc["snl", "nonlinear_layers"] == 35 > table.loc["depthshrinker", "nonlinear_layers"]
    columns = ["top1", "params", "macs", "merge_max_abs_err", "cpu_latency_ms", "mpc_latency_s", "mpc_comm_mb",
               "mpc_rounds"]
    assert table[columns].notna().all().all()
    assert (table["merge_max_abs_err"] < 1e-3).all()
    assert table.loc["depthshrinker", "mpc_rounds"] < table.loc["dense", "mpc_rounds"]
    assert (results / "latency" / "mpc-block.csv").is_file() and (results / "summary_by_cell.csv").is_file()
    assert (results / "plots" / "accuracy_vs_mpc_latency.png").is_file()
    # every job left a non-empty log, and every stage's JSON names the config it answers
    cell = results / "depthshrinker/block/0.5/seed0"
    logs = [log for log in results.rglob("logs/**/*.log")]  # one per job (18), none for `all`
    assert len(logs) == 18 and all(log.stat().st_size > 0 for log in logs), [str(l) for l in logs if not l.stat().st_size]
    for name, stage in [("model.json", "finetune"), ("merge.json", "merge"), ("mpc.json", "bench-mpc"),
                        ("bench.json", "bench-device"), ("mask.json", "extract"), ("row.json", "row:depthshrinker")]:
        block = read_json(cell / name)["provenance"]
        assert block["stage"] == stage and re.fullmatch(r"[0-9a-f]{12}", block["config_hash"]), name
        assert block["torch"] and block["depthshrinker"]

    assert planned("--configfile", str(config)) == {}  # finished: nothing to do
    for change, expected in RERUNS:
        overlay = tmp_path / "change.yaml"
        overlay.write_text(yaml.safe_dump(change))
        assert planned("--configfile", str(config), str(overlay)) == expected, change
    overlay.write_text(yaml.safe_dump({"data": {"dataset": "fake"}}))
    everything = planned("--configfile", str(config), str(overlay))
    forced = planned("--configfile", str(config), "--forceall")
    assert everything == {rule: n for rule, n in forced.items() if rule != "cost_table"}  # its head has 10 classes
