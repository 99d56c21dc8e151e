"""Summary table and plots."""
import pandas as pd

from depthshrinker.report import COLUMNS, cell_row, pareto, plots, summarize
from depthshrinker.checkpoint import write_json


def test_summary_has_the_contract_columns_and_one_row_per_cell(tmp_path):
    write_json(tmp_path / "model.json", {"top1": 99.0, "history": []})
    write_json(tmp_path / "mpc.json", {"mpc_latency_s": 3.0, "extra": 1})
    write_json(tmp_path / "b.json", {"method": "snl", "granularity": "pixel", "keep_ratio": 0.4, "top1": 98.0})
    row = cell_row("dense", "full", "1.0", tmp_path / "model.pt", [tmp_path / "mpc.json"], tmp_path / "a.json")
    assert row == {"method": "dense", "granularity": "full", "keep_ratio": 1.0, "top1": 99.0,
                   "checkpoint": str(tmp_path / "model.pt"), "mpc_latency_s": 3.0, "extra": 1}
    table = summarize([tmp_path / "b.json", tmp_path / "a.json"], tmp_path / "s.csv")
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert list(table["method"]) == ["dense", "snl"]
    assert pd.read_csv(tmp_path / "s.csv").loc[0, "mpc_latency_s"] == 3.0


def test_pareto_front():
    points = pd.DataFrame({"x": [1, 2, 3, 4], "top1": [50, 70, 60, 80]})
    assert list(pareto(points, "x", lower=True)["x"]) == [1, 2, 4]
    assert list(pareto(points, "x", lower=False)["x"]) == [4]


def test_plots_are_written_for_measured_costs_and_published_points(tmp_path):
    rows = [{"method": m, "granularity": g, "keep_ratio": k, "top1": t, "mpc_latency_s": l, "nonlinear_units": n}
            for m, g, k, t, l, n in [("dense", "full", 1.0, 99, 4.0, 5e5), ("depthshrinker", "block", 0.4, 97, 1.6, 3e5),
                                     ("depthshrinker", "block", 0.8, 98, 2.5, 4e5), ("snl", "pixel", 0.4, 96, 2.0, 2e5)]]
    pd.DataFrame(rows).to_csv(tmp_path / "s.csv", index=False)
    written = plots(tmp_path / "s.csv", tmp_path / "plots", {"data": {"dataset": "imagenet"}})
    names = sorted(p.name for p in written)
    assert names == ["accuracy_vs_mpc_latency.png", "accuracy_vs_nonlinear_units.png", "published_imagenet.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
