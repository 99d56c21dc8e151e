"""Rows, the summary table, the per-cell aggregate and the README table."""
import math

import pandas as pd
import pytest

from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import write_json
from depthshrinker.base.stats import wilson
from depthshrinker.cli import main
from depthshrinker.report import (
    COLUMNS,
    END,
    START,
    CountMismatch,
    aggregate,
    by_cell,
    cell_row,
    compare,
    compare_wide,
    iqr_column,
    render_table,
    rerun_check,
    summarize,
    table,
    verdict,
)

T2 = 4.302653  # Student t 97.5 % quantile, 2 degrees of freedom
WILSON_350_359 = (95.3049, 98.6756)  # tests/test_stats.py, in %


def test_summary_has_the_contract_columns_and_one_row_per_cell_and_seed(tmp_path):
    write_json(tmp_path / "model.json", {"top1": 99.0, "history": [], "test_images": 359})
    write_json(tmp_path / "mpc.json", {"mpc_latency_s": 3.0, "extra": 1, "provenance": {"config_hash": "x"}})
    write_json(tmp_path / "b.json", {"method": "snl", "granularity": "pixel", "keep_ratio": 0.4, "top1": 98.0,
                                     "seed": 0})
    write_json(tmp_path / "c.json", {"method": "dense", "granularity": "full", "keep_ratio": 1.0, "top1": 98.5,
                                     "seed": 0})
    row = cell_row("dense", "full", "1.0", tmp_path / "model.pt", [tmp_path / "mpc.json"], tmp_path / "a.json",
                   seed=1, config_hash="0123456789ab")
    assert row == {"method": "dense", "granularity": "full", "keep_ratio": 1.0, "top1": 99.0, "test_images": 359,
                   "checkpoint": str(tmp_path / "model.pt"), "mpc_latency_s": 3.0, "extra": 1, "seed": 1,
                   "config_hash": "0123456789ab"}
    table = summarize([tmp_path / "b.json", tmp_path / "a.json", tmp_path / "c.json"], tmp_path / "s.csv")
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert list(zip(table["method"], table["seed"])) == [("dense", 0), ("dense", 1), ("snl", 0)]
    assert pd.read_csv(tmp_path / "s.csv").loc[1, "mpc_latency_s"] == 3.0
    with pytest.raises(ConfigError, match="2 rows for cell snl/pixel/0.4 seed 0"):
        summarize([tmp_path / "b.json", tmp_path / "b.json"], tmp_path / "s.csv")


@pytest.fixture
def parts(tmp_path):
    write_json(tmp_path / "model.json", {"top1": 98.0})
    merge = {"nonlinear_units": 1000, "nonlinear_layers": 5, "relu6_elements": 1000, "macs": 10}
    mpc = {"nonlinear_units": 1000, "mpc_bytes": 700, "mpc_rounds": 40, "model_bytes": 700, "model_rounds": 40}

    def cell(merge_changes=None, mpc_changes=None):
        write_json(tmp_path / "merge.json", {**merge, **(merge_changes or {})})
        write_json(tmp_path / "mpc.json", {**mpc, **(mpc_changes or {})})
        return cell_row("depthshrinker", "block", 0.4, tmp_path / "model.pt",
                        [tmp_path / "merge.json", tmp_path / "mpc.json"], tmp_path / "row.json", seed=2)
    return cell


def test_row_with_one_set_of_counts_passes(parts):
    assert parts()["mpc_rounds"] == 40
    assert parts(mpc_changes={"model_relu6": 1000, "model_macs": 10, "model_act_layers": 5})["macs"] == 10
    # without a dealer (TFP) the preprocessing is not measured, so only the online figures are compared
    tfp = {"mpc_private": False, "mpc_preproc_bytes": 0, "model_preproc_bytes": 8}
    assert parts(mpc_changes=tfp)["mpc_preproc_bytes"] == 0


@pytest.mark.parametrize("merge_changes, mpc_changes, message", [
    (None, {"model_rounds": 41}, "row depthshrinker/block/0.4 seed 2: mpc_rounds is 40 but the cost model predicts "
                                 "model_rounds = 41"),
    (None, {"mpc_bytes": 699}, "mpc_bytes is 699 but the cost model predicts model_bytes = 700"),
    (None, {"mpc_preproc_bytes": 9, "model_preproc_bytes": 8}, "mpc_preproc_bytes is 9 but .* model_preproc_bytes = 8"),
    (None, {"model_relu6": 999}, "relu6_elements is 1000 but the cost model predicts model_relu6 = 999"),
    ({"nonlinear_units": 1200}, None, "nonlinear_units is 1200 in merge.json but 1000 in mpc.json"),
    ({"input_size": 32}, {"mpc_input_size": 64}, "input_size is 32 in merge.json but 64 in mpc.json"),
    (None, {"mpc_private": True, "mpc_preproc_bytes": 0, "model_preproc_bytes": 8}, "mpc_preproc_bytes is 0"),
])
def test_row_whose_counts_disagree_fails_naming_cell_and_figure(parts, merge_changes, mpc_changes, message):
    with pytest.raises(CountMismatch, match=message) as err:
        parts(merge_changes, mpc_changes)
    assert "\n" not in str(err.value)


def test_row_command_prints_the_mismatch_on_one_line(parts, tmp_path, capsys):
    parts()
    write_json(tmp_path / "mpc.json", {"mpc_rounds": 40, "model_rounds": 39})
    code = main(["row", "--method", "snl", "--granularity", "pixel", "--keep", "0.6", "--model",
                 str(tmp_path / "model.pt"), str(tmp_path / "mpc.json"), "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("depthshrinker row: error: row snl/pixel/0.6 seed 0: mpc_rounds is 40 but the "
                                               "cost model predicts model_rounds = 39")


def test_iqr_columns_are_the_ones_the_benchmarks_write():
    assert iqr_column("cpu_latency_ms") == "cpu_latency_iqr_ms"
    assert iqr_column("cpu_speedup") == "cpu_speedup_iqr"
    assert iqr_column("mpc_latency_s") == "mpc_latency_iqr_s"
    assert iqr_column("gpu_throughput_img_s") == "gpu_throughput_iqr"
    assert iqr_column("gpu_throughput_img_s_bf16_cl") == "gpu_throughput_iqr_bf16_cl"
    assert iqr_column("gpu_speedup_cl") == "gpu_speedup_iqr_cl"


def _summary(seeds_of_ds=(0, 1, 2)):
    one = {"method": "dense", "granularity": "full", "keep_ratio": 1.0, "seed": 0, "top1": 100 * 350 / 359,
           "mpc_latency_s": 3.0, "mpc_latency_iqr_s": 0.4, "mpc_rounds": 369, "cpu_speedup": 1.0,
           "cpu_speedup_iqr": 0.0, "mpc_latency_runs_s": "[2.9, 3.0, 3.3]", "checkpoint": "x.pt"}
    three = [{"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, "seed": s, "top1": t,
              "mpc_latency_s": m, "mpc_latency_iqr_s": 0.1, "mpc_rounds": 171, "cpu_speedup": 1.5,
              "cpu_speedup_iqr": 0.1, "checkpoint": "y.pt"}
             for s, t, m in zip(seeds_of_ds, [96.0, 97.0, 98.0], [2.0, 3.0, 4.0])]
    return pd.DataFrame([*three[::-1], one])


def test_aggregate_gives_t_intervals_over_seeds_and_wilson_or_iqr_with_one_seed(tmp_path):
    _summary().to_csv(tmp_path / "s.csv", index=False)
    cells = aggregate(tmp_path / "s.csv", tmp_path / "by_cell.csv", test_images=359).set_index("method")
    assert list(pd.read_csv(tmp_path / "by_cell.csv").columns) == [
        "method", "granularity", "keep_ratio", "n", "seeds", "interval", "test_images",
        *(f"{c}_{s}" for c in ["top1", "mpc_latency_s", "mpc_rounds", "cpu_speedup"]
          for s in ["mean", "std", "lo", "hi"])]
    ds, dense = cells.loc["depthshrinker"], cells.loc["dense"]
    assert (ds["n"], ds["seeds"], ds["interval"]) == (3, "0,1,2", "t95")
    half = T2 / math.sqrt(3)  # s = 1 for both columns
    assert (ds["top1_mean"], ds["top1_std"]) == (97.0, 1.0)
    assert (ds["top1_lo"], ds["top1_hi"]) == pytest.approx((97 - half, 97 + half), abs=1e-5)
    assert (ds["mpc_latency_s_lo"], ds["mpc_latency_s_hi"]) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    assert (ds["mpc_rounds_lo"], ds["mpc_rounds_hi"]) == (171, 171)
    assert (dense["n"], dense["interval"]) == (1, "wilson95/iqr") and math.isnan(dense["top1_std"])
    assert (dense["top1_lo"], dense["top1_hi"]) == pytest.approx(WILSON_350_359, abs=1e-3)
    assert (dense["mpc_latency_s_lo"], dense["mpc_latency_s_hi"]) == pytest.approx((2.8, 3.2))
    assert (dense["mpc_rounds_lo"], dense["mpc_rounds_hi"]) == (369, 369)
    no_iqr = by_cell(_summary().drop(columns="mpc_latency_iqr_s")).set_index("method").loc["dense"]
    assert math.isnan(no_iqr["mpc_latency_s_lo"])  # a timing without its spread gets no interval


def test_aggregate_reads_test_images_from_rows_and_checks_it():
    rows = _summary().assign(test_images=359)
    assert by_cell(rows).set_index("method").loc["dense", "top1_lo"] == pytest.approx(WILSON_350_359[0], abs=1e-3)
    assert math.isnan(by_cell(_summary()).set_index("method").loc["dense", "top1_lo"])  # no count, no interval
    with pytest.raises(ConfigError, match="not a whole number of 360"):
        by_cell(_summary(), test_images=360)


def test_intervals_are_clipped_to_the_possible_range():
    rows = _summary().assign(top1=[99.0, 100.0, 100.0, 350 / 3.59], mpc_latency_s=[0.1, 1.0, 0.1, 3.0])
    ds = by_cell(rows, 359).set_index("method").loc["depthshrinker"]
    assert ds["top1_hi"] == 100.0 and ds["mpc_latency_s_lo"] == 0.0


def test_table_renders_intervals_and_rewrites_the_readme_block(tmp_path):
    by_cell(_summary(), 359).to_csv(tmp_path / "by_cell.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    text = table(tmp_path / "by_cell.csv", readme=readme)
    lines = text.splitlines()
    # a 3-seed rerun's mean: 97 ± t(2)·1·√(1/3 + 1/3) = 97 ± 3.51, clipped at 100
    assert "| depthshrinker block 0.4 | 3 | 97.00 ± 2.48 | 93.49–100.00 |" in text
    assert "| dense full 1 | 1 | 97.49 (95.30–98.68) |  |" in text
    assert "| 3.00 ± 2.48 | 171 |" in text and "| 3.00 (0.40) | 369 |" in text
    assert "seeds 0, 1, 2; 359 held-out images (one is 0.28 % top-1)" in lines[-1] and "CPUs" in lines[-1]
    assert "95 % t-interval" in lines[-1] and "Wilson" in lines[-1]
    first = readme.read_text()
    assert first.startswith(f"# Title\n\nbefore\n{START}\n| cell |") and first.endswith(f"{END}\nafter\n")
    assert "old table" not in first
    table(tmp_path / "by_cell.csv", readme=readme)
    assert readme.read_text() == first  # regenerating from the same CSV changes nothing
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="results-table:start"):
        table(tmp_path / "by_cell.csv", readme=readme)


def test_table_command_writes_the_markdown(tmp_path):
    by_cell(_summary(), 359).to_csv(tmp_path / "by_cell.csv", index=False)
    assert main(["table", "--by-cell", str(tmp_path / "by_cell.csv"), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().startswith("| cell | n | top-1 % |")
    assert main(["table", "--by-cell", str(tmp_path / "by_cell.csv")]) == 2


def test_render_table_names_the_commit_and_leaves_out_empty_columns():
    text = render_table(by_cell(_summary(), 359), "2026-01-02", "abc1234")
    assert text.splitlines()[0] == ("| cell | n | top-1 % | a rerun lands in (top-1 %) | CrypTen s | rounds "
                                      "| CPU × dense |")
    assert text.splitlines()[-1].startswith("*2026-01-02, commit abc1234, ")


def test_row_from_malformed_metrics_names_the_file(tmp_path):
    write_json(tmp_path / "model.json", {"loss": 1.0})
    with pytest.raises(ConfigError, match=r"model.json: no 'top1'"):
        cell_row("dense", "full", 1.0, tmp_path / "model.pt", [], tmp_path / "row.json")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model.json is not valid JSON"):
        cell_row("dense", "full", 1.0, tmp_path / "model.pt", [], tmp_path / "row.json")
    assert not (tmp_path / "row.json").exists()


def test_compare_pairs_by_seed_number_with_a_t_interval_and_a_verdict(tmp_path):
    rows = pd.DataFrame([
        {"method": "depthdp", "granularity": "segment", "keep_ratio": 0.4, "seed": 0, "top1": 90.0, "mpc_rounds": 160},
        {"method": "depthdp", "granularity": "segment", "keep_ratio": 0.4, "seed": 1, "top1": 80.0, "mpc_rounds": 150},
        {"method": "depthdp", "granularity": "segment", "keep_ratio": 0.4, "seed": 2, "top1": 85.0, "mpc_rounds": 150},
        {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, "seed": 1, "top1": 84.0,
         "mpc_rounds": 170},
        {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, "seed": 0, "top1": 92.0,
         "mpc_rounds": 170},
        {"method": "snl", "granularity": "pixel", "keep_ratio": 0.4, "seed": 0, "top1": 91.0, "mpc_rounds": 369},
        {"method": "snl", "granularity": "pixel", "keep_ratio": 0.4, "seed": 1, "top1": 82.0, "mpc_rounds": 369},
    ])
    rows.to_csv(tmp_path / "s.csv", index=False)
    text = compare(tmp_path / "s.csv", [("depthdp/segment", "depthshrinker/block"), ("depthshrinker/block", "snl/pixel")],
                   tmp_path / "c.md")
    lines = text.splitlines()
    assert (tmp_path / "c.md").read_text() == text
    # seeds matched by number, not row order, and only the seeds both ran (depthdp's seed 2 has no partner);
    # mean ± t(0.975, 1) · s / √2 = 12.706 · s / √2
    assert lines[2] == "| 0.4 | depthdp/segment − depthshrinker/block | top1 | -2, -4 | -3 | [-15.7, +9.71] | " \
                       "no detectable difference |"  # s = √2
    assert lines[3] == "| 0.4 | depthdp/segment − depthshrinker/block | mpc_rounds | -10, -20 | -15 | [-78.5, +48.5] | " \
                       "no detectable difference |"  # s = √50
    assert lines[5].endswith("| mpc_rounds | -199, -199 | -199 | [-199, -199] | depthshrinker/block better |")
    with pytest.raises(ConfigError, match="no rows of 'snl/channel'"):
        compare(tmp_path / "s.csv", [("snl/channel", "depthshrinker/block")])


@pytest.mark.parametrize("column, lo, hi, expected", [
    ("top1", 0.5, 2.0, "a/x better"), ("top1", -2.0, -0.5, "b/y better"), ("top1", -1.0, 1.0, "no detectable difference"),
    ("nll", 0.1, 0.2, "b/y better"), ("mpc_rounds", -20, -10, "a/x better"), ("cpu_speedup", 0.1, 0.3, "a/x better"),
    ("teacher_agreement", float("nan"), float("nan"), "no detectable difference"),
])
def test_the_verdict_follows_the_interval_and_which_way_is_better(column, lo, hi, expected):
    assert verdict(column, lo, hi, "a/x", "b/y") == expected


def test_quality_columns_reach_the_row_and_get_intervals(tmp_path):
    write_json(tmp_path / "model.json", {"top1": 100 * 350 / 359, "nll": 0.11, "teacher_agreement": 100 * 351 / 359,
                                         "teacher_kl": 0.02, "test_images": 359})
    row = cell_row("snl", "pixel", 0.4, tmp_path / "model.pt", [], tmp_path / "row.json", seed=0)
    assert (row["nll"], row["teacher_kl"]) == (0.11, 0.02) and row["teacher_agreement"] == 100 * 351 / 359
    one = by_cell(pd.DataFrame([row])).iloc[0]
    assert (one["teacher_agreement_lo"], one["teacher_agreement_hi"]) == pytest.approx(
        tuple(100 * v for v in wilson(351, 359)))
    assert math.isnan(one["nll_lo"]) and one["nll_mean"] == 0.11  # one seed: no interval over training runs
    three = by_cell(pd.DataFrame([{**row, "seed": s, "nll": v} for s, v in enumerate([1.0, 1.1, 1.2])])).iloc[0]
    half = T2 * 0.1 / math.sqrt(3)
    assert (three["nll_lo"], three["nll_hi"]) == pytest.approx((1.1 - half, 1.1 + half))


def test_rerun_check_counts_the_cells_inside_the_reference_intervals(tmp_path):
    ref = by_cell(_summary())  # depthshrinker: top1 97 ± 2.48 over 3 seeds; dense: one seed, no test_images
    ref.to_csv(tmp_path / "ref.csv", index=False)
    rerun = ref.copy()
    ds = rerun["method"] == "depthshrinker"
    rerun.loc[ds, "top1_mean"] = 99.7  # outside
    rerun.to_csv(tmp_path / "rerun.csv", index=False)
    text = rerun_check(tmp_path / "ref.csv", tmp_path / "rerun.csv")
    # s = 1: the prediction interval of a 3-seed rerun's mean is 97 ± t(2)·√(1/3 + 1/3) = ± 3.51
    assert "| depthshrinker block 0.4 | top1 | 97 [94.52, 99.48] | 99.7 | **no** | [93.49, 100.5] | yes |" in text
    # dense has no interval without its held-out count
    assert text.endswith("0 of 1 inside the confidence interval, 1 of 1 inside the prediction interval.\n")
    for top1, counts in ((96.0, (1, 1)), (101.0, (0, 0))):
        rerun.loc[ds, "top1_mean"] = top1
        rerun.to_csv(tmp_path / "rerun.csv", index=False)
        assert rerun_check(tmp_path / "ref.csv", tmp_path / "rerun.csv").endswith(
            f"{counts[0]} of 1 inside the confidence interval, {counts[1]} of 1 inside the prediction interval.\n")


def test_compare_wide_puts_one_pair_and_keep_per_line_with_bold_where_the_interval_excludes_0(tmp_path):
    rows = pd.DataFrame([{"method": m, "granularity": g, "keep_ratio": 0.4, "seed": s, "top1": t, "mpc_rounds": r}
                         for m, g, r in (("depthshrinker", "block", 170), ("snl", "pixel", 369))
                         for s, t in zip((0, 1, 2), (98.0, 99.0, 97.0) if m == "snl" else (98.5, 98.0, 98.0))])
    rows.to_csv(tmp_path / "s.csv", index=False)
    lines = compare_wide(tmp_path / "s.csv", [("depthshrinker/block", "snl/pixel")]).splitlines()
    assert lines[0] == "| keep | a − b | n | top1 | mpc_rounds |"
    assert lines[2].startswith("| 0.4 | depthshrinker/block − snl/pixel | 3 | +0.167 [")  # holds 0: plain
    assert lines[2].endswith("| **-199 [-199, -199]** |")
