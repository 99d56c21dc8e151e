"""Figures: files, resolution, the overall front, the readable top-1 axis, labels explained in the legend."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from depthshrinker.figures import _panel, pareto, plots, setup_line  # noqa: E402
from depthshrinker.report import by_cell  # noqa: E402

CONFIG = {"data": {"dataset": "digits", "image_size": 32}, "model": {"arch": "mobilenetv2_100"},
          "stages": {"dense": {"epochs": 3}, "finetune": {"epochs": 1}, "distill": {"enabled": True}},
          "grid": {"seeds": [0, 1]}}


def _summary(seeds=(0, 1)):
    cells = [("dense", "full", 1.0, 99.72, 3.7, 369, 1.0), ("depthshrinker", "block", 0.4, 98.33, 1.3, 171, 2.8),
             ("snl", "pixel", 0.4, 98.89, 2.8, 369, 0.9), ("uniform", "width", 0.35, 88.58, 2.1, 369, 2.0),
             ("metapruning", "mpc", 0.4, 58.22, 1.5, 369, 2.1)]
    return pd.DataFrame([{"method": m, "granularity": g, "keep_ratio": k, "seed": s, "test_images": 359,
                          "top1": round(t * 3.59 - s) / 3.59, "mpc_latency_s": lat + 0.1 * s, "mpc_latency_iqr_s": 0.1,
                          "mpc_rounds": r, "mpc_comm_mb": 100.0, "mpc_est_wan_s": 20.0, "cpu_speedup": sp,
                          "cpu_speedup_iqr": 0.1, "nonlinear_units": 1000}
                         for m, g, k, t, lat, r, sp in cells for s in seeds])


def test_pareto_front():
    points = pd.DataFrame({"x": [1, 2, 3, 4], "top1": [50, 70, 60, 80]})
    assert list(pareto(points, "x", lower=True)["x"]) == [1, 2, 4]
    assert list(pareto(points, "x", lower=False)["x"]) == [4]


def test_plots_are_png_at_200_dpi_and_pdf_for_every_measured_cost(tmp_path):
    _summary().to_csv(tmp_path / "s.csv", index=False)
    written = plots(tmp_path / "s.csv", tmp_path / "plots", CONFIG)
    stems = ["accuracy_vs_mpc_latency", "accuracy_vs_mpc_rounds", "accuracy_vs_mpc_comm", "accuracy_vs_mpc_est_wan",
             "accuracy_vs_nonlinear_units", "accuracy_vs_cpu_speedup"]
    assert [p.name for p in written] == [f"{s}.{ext}" for s in stems for ext in ("png", "pdf")]
    for png in written[::2]:
        assert Image.open(png).info["dpi"] == pytest.approx((200, 200), abs=0.1)
    assert all(p.read_bytes().startswith(b"%PDF") for p in written[1::2])


def test_published_points_come_with_the_imagenet_config(tmp_path):
    _summary(seeds=(0,))[["method", "granularity", "keep_ratio", "seed", "top1", "mpc_rounds"]].to_csv(
        tmp_path / "s.csv", index=False)
    written = plots(tmp_path / "s.csv", tmp_path / "plots", {"data": {"dataset": "imagenet"}})
    assert [p.name for p in written] == ["accuracy_vs_mpc_rounds.png", "accuracy_vs_mpc_rounds.pdf",
                                         "published_imagenet.png", "published_imagenet.pdf",
                                         "published_imagenet_speedup.png", "published_imagenet_speedup.pdf"]


def test_title_names_dataset_model_size_epochs_and_seeds():
    assert setup_line(CONFIG, []) == ("digits · mobilenetv2_100 · 32×32 px · epochs: dense 3, finetune 1 · "
                                      "seeds 0, 1 (n = 2)")
    assert setup_line(CONFIG, [4]).endswith("seeds 4 (n = 1)")  # the seeds in the results win


def test_panel_keeps_the_high_accuracy_region_readable_and_explains_labels():
    seeds = _summary()
    cells = by_cell(seeds)
    fig, ax = plt.subplots()
    _panel(ax, cells, seeds, "mpc_latency_s", True, floor=50 / 359)
    bottom, top = ax.get_ylim()  # the error axis, inverted: best top-1 on top
    assert ax.get_yscale() == "log" and bottom > top
    assert bottom < 100 and top > 50 / 359 / 2
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    assert ticks[1.0] == "99" and ticks[50.0] == "50"
    # 96-100 % gets at least as much height as everything from 50 % to 96 %
    pixel = lambda error: ax.transData.transform((0, error))[1]  # noqa: E731
    assert abs(pixel(0.2) - pixel(4.0)) > abs(pixel(4.0) - pixel(50.0))
    labels = ax.get_legend_handles_labels()[1]
    assert "Pareto front (all methods)" in labels
    assert "depthshrinker block (label: keep ratio)" in labels and "uniform width (label: width ×)" in labels
    assert "metapruning mpc (label: matched DS keep)" in labels and "dense full" in labels
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front (all methods)"][0]
    assert list(front.get_xdata()) == pytest.approx([1.35, 2.85, 3.75])  # DS 0.4, SNL 0.4, dense
    assert sorted(t.get_text() for t in ax.texts) == ["0.35", "0.4", "0.4", "0.4"]
    plt.close(fig)
