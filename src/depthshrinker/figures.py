"""Figures a paper prints: top-1 against each cost of private (CrypTen) and plaintext inference, one point per
grid cell at its mean over seeds with 95 % interval bars (``report.aggregate``), each seed as a faint dot, one
Pareto front over all methods, and point labels placed by adjustText. The top-1 axis is logarithmic in the error
(100 − top-1) and labelled in accuracy, so 96–100 % stays readable next to a 58 % outlier."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from depthshrinker.deploy.mpc.cost import NETWORKS
from depthshrinker.report import by_cell

_WAN = NETWORKS["wan"]
AXES = [  # (column, x label, file stem, lower is better)
    ("mpc_latency_s", "CrypTen online latency per image, two parties on loopback [s]", "accuracy_vs_mpc_latency", True),
    ("mpc_rounds", "CrypTen communication rounds per image", "accuracy_vs_mpc_rounds", True),
    ("mpc_comm_mb", "CrypTen online communication per image and party [MB]", "accuracy_vs_mpc_comm", True),
    ("mpc_preproc_mb", "CrypTen preprocessing (dealer) communication per image [MB]", "accuracy_vs_mpc_preproc", True),
    ("mpc_est_wan_s", f"cost-model latency on a WAN ({_WAN.bandwidth_bit_s / 1e6:g} Mbit/s, {_WAN.rtt_s * 1e3:g} ms "
                      "RTT) [s]", "accuracy_vs_mpc_est_wan", True),
    ("nonlinear_units", "nonlinear (ReLU/ReLU6) elements per image", "accuracy_vs_nonlinear_units", True),
    ("cpu_speedup", "CPU speed-up over dense, batch 1, same run [×]", "accuracy_vs_cpu_speedup", False),
    ("gpu_speedup", "GPU speed-up over dense, batch 128, same run [×]", "accuracy_vs_gpu_speedup", False),
]
COLORS = {"dense": "black", "depthshrinker": "tab:blue", "snl": "tab:orange", "metapruning": "tab:green",
          "uniform": "tab:purple", "depthdp": "tab:red", "layermerge": "tab:red"}
MARKERS = {"full": "*", "block": "o", "layer": "p", "channel": "s", "pixel": "D", "element": "X", "width": "v",
           "mpc": "^", "macs": "<", "params": ">", "merge": "h", "segment": "d", "layermerge": "P"}
LABEL_MEANS = {"depthshrinker": "keep ratio", "snl": "keep ratio", "uniform": "width ×",
               "metapruning": "matched DS keep", "depthdp": "budget: DS keep"}
ERROR_TICKS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
DPI = 200

# Published ImageNet rows (Fu et al. 2022, Table: top-1 of the longest schedule, MFLOPs, V100 img/s).
PUBLISHED = pd.DataFrame([
    ("MBV2-1.4", "dense", 75.30, 630, 2127), ("MetaPruning-1.0x", "metapruning", 73.20, 332, 3159),
    ("DS-A", "depthshrinker", 75.65, 519, 3827), ("DS-B", "depthshrinker", 75.13, 502, 4778),
    ("DS-C", "depthshrinker", 74.91, 492, 4597), ("Uniform-0.65x", "uniform", 67.20, 182, 4004),
    ("MetaPruning-0.65x", "metapruning", 71.70, 160, 4336), ("DS-D", "depthshrinker", 74.50, 484, 5560),
    ("DS-E", "depthshrinker", 74.43, 474, 5317), ("Uniform-0.35x", "uniform", 54.60, 68, 6266),
    ("MetaPruning-0.35x", "metapruning", 64.50, 52, 7044), ("DS-F", "depthshrinker", 70.13, 415, 10804),
], columns=["name", "method", "top1", "mflops", "v100_img_s"])
# Published ImageNet speed-ups over each paper's own dense network on a GPU: LayerMerge (Kim et al. 2024, PyTorch,
# 180-epoch finetune, dense = the pretrained network) and DepthShrinker (Fu et al. 2022, V100 throughput ratio
# over MBV2-1.4, from PUBLISHED).
LAYERMERGE = pd.DataFrame([
    ("MBV2-1.0", "1.0", 72.89, 1.00), ("LM-55%", "1.0", 72.99, 1.63), ("LM-46%", "1.0", 72.46, 1.90),
    ("LM-38%", "1.0", 71.74, 2.18), ("LM-33%", "1.0", 70.99, 2.49), ("MBV2-1.4", "1.4", 76.28, 1.00),
    ("LM-43%", "1.4", 74.91, 1.99), ("LM-42%", "1.4", 74.48, 2.07), ("LM-35%", "1.4", 73.99, 2.39),
    ("LM-30%", "1.4", 73.29, 2.72),
], columns=["name", "width", "top1", "speedup"])


def pareto(points: pd.DataFrame, x: str, lower: bool) -> pd.DataFrame:
    """The points no other point beats on both ``x`` (lower or higher is better) and top-1."""
    ordered = points.sort_values([x, "top1"], ascending=[lower, False])
    return ordered[ordered["top1"] > ordered["top1"].cummax().shift(fill_value=-1.0)]


def setup_line(config: dict | None, seeds: list[int]) -> str:
    """Dataset, model, input size, epochs per stage and seeds (those in the results, else the config's), for a
    figure title."""
    config = config or {}
    data, stages = config.get("data", {}), config.get("stages", {})
    size = data.get("image_size")
    epochs = ", ".join(f"{name} {stage['epochs']}" for name, stage in stages.items()
                       if isinstance(stage, dict) and "epochs" in stage)
    seeds = seeds or config.get("grid", {}).get("seeds", [])
    parts = [data.get("dataset", "dataset ?"), config.get("model", {}).get("arch", "model ?"),
             f"{size}×{size} px" if size else "", f"epochs: {epochs}" if epochs else "",
             f"seeds {', '.join(map(str, seeds))} (n = {len(seeds)})" if seeds else ""]
    return " · ".join(p for p in parts if p)


def _bars(cells: pd.DataFrame, column: str) -> list[pd.Series]:
    """[below, above] the mean for ``errorbar`` (0 where there is no interval)."""
    mean = cells[f"{column}_mean"]
    return [(mean - cells[f"{column}_lo"]).clip(lower=0).fillna(0),
            (cells[f"{column}_hi"] - mean).clip(lower=0).fillna(0)]


def _panel(ax, cells: pd.DataFrame, seeds: pd.DataFrame, x: str, lower: bool, floor: float) -> None:
    """Per-seed dots, mean points with interval bars, the overall front, and labels on the top-1-error axis."""
    from adjustText import adjust_text

    err = lambda top1: (100 - top1).clip(lower=floor)  # noqa: E731
    texts = []
    for (method, granularity), group in cells.groupby(["method", "granularity"]):
        color, marker = COLORS.get(method, "gray"), MARKERS.get(granularity, "x")
        raw = seeds[(seeds["method"] == method) & (seeds["granularity"] == granularity)]
        if (group["n"] > 1).any():
            ax.scatter(raw[x], err(raw["top1"]), color=color, marker=marker, s=10, alpha=0.3, linewidths=0)
        below, above = _bars(group, "top1")  # error = 100 - top-1: the top-1 bounds swap ends
        y = err(group["top1_mean"])
        yerr = [y - err(group["top1_mean"] + above), err(group["top1_mean"] - below) - y]
        ax.errorbar(group[f"{x}_mean"], y, xerr=_bars(group, x), yerr=yerr, fmt="none", ecolor=color,
                    elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)
        means = LABEL_MEANS.get(method)
        ax.scatter(group[f"{x}_mean"], y, color=color, marker=marker, s=150 if method == "dense" else 45,
                   edgecolor="white", linewidths=0.6, zorder=3.5 if method == "dense" else 3,
                   label=f"{method} {granularity}" + (f" (label: {means})" if means else ""))
        if means:
            texts += [ax.text(px, py, f"{k:g}", fontsize=7, color=color, ha="center", va="center", zorder=4,
                              bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                    "alpha": 0.7})
                      for px, py, k in zip(group[f"{x}_mean"], y, group["keep_ratio"])]
    front = pareto(cells.rename(columns={f"{x}_mean": "x", "top1_mean": "top1"}), "x", lower)
    ax.plot(front["x"], err(front["top1"]), color="0.25", linestyle="--", linewidth=1, zorder=1,
            label="Pareto front (all methods)")
    ax.set_yscale("log")
    low = err(cells["top1_hi"].fillna(cells["top1_mean"])).min() / 1.6
    high = min(err(cells["top1_lo"].fillna(cells["top1_mean"])).max() * 1.6, 100)
    ax.set_ylim(high, low)  # inverted: the smallest error (best top-1) on top
    ticks = [t for t in ERROR_TICKS if low <= t <= high]
    ax.set_yticks(ticks, [f"{100 - t:g}" for t in ticks])
    ax.minorticks_off()
    if texts:
        adjust_text(texts, x=cells[f"{x}_mean"].to_numpy(), y=err(cells["top1_mean"]).to_numpy(), ax=ax,
                    expand=(1.4, 1.8), force_text=(0.3, 0.6), force_static=(0.4, 0.8), min_arrow_len=8,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5})


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return paths


def _published(plt, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, points in PUBLISHED.groupby("method"):
        color = COLORS[method]
        ax.scatter(points["v100_img_s"], points["top1"], edgecolor=color, marker="o", facecolor="none", s=60,
                   label=f"{method} (published, Fu et al. 2022)")
        for _, row in points.iterrows():
            ax.annotate(row["name"], (row["v100_img_s"], row["top1"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    paths = _finish_published(plt, fig, ax, out, "published_imagenet", "V100 throughput, batch 128 [images/s]",
                              "Published points (not measured here)", legend_size=7)
    return paths + _published_speedup(plt, out)


def _finish_published(plt, fig, ax, out: Path, stem: str, xlabel: str, title: str, legend_size: int) -> list[Path]:
    """Labels (marked published), grid and legend of a published-points figure; saved as ``stem`` and closed."""
    ax.set_xlabel(f"{xlabel} (published)")
    ax.set_ylabel("ImageNet top-1 [%] (published)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower left")
    paths = _save(fig, out, stem)
    plt.close(fig)
    return paths


def _published_speedup(plt, out: Path) -> list[Path]:
    """ImageNet top-1 against the published GPU speed-up over each paper's dense network (not measured here)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for width, points in LAYERMERGE.groupby("width"):
        ax.plot(points["speedup"], points["top1"], marker="h", color=COLORS["layermerge"], markerfacecolor="none",
                linestyle="-" if width == "1.0" else ":", label=f"LayerMerge MBV2-{width} (published, Kim et al. "
                "2024; PyTorch)")
    ds = PUBLISHED[PUBLISHED["method"].isin(["dense", "depthshrinker"])]
    ds = ds.assign(speedup=ds["v100_img_s"] / ds.loc[ds["method"] == "dense", "v100_img_s"].iloc[0])
    ax.scatter(ds["speedup"], ds["top1"], edgecolor=COLORS["depthshrinker"], facecolor="none", marker="o", s=50,
               label="DepthShrinker MBV2-1.4 (published, Fu et al. 2022; V100 throughput ratio)")
    for _, row in pd.concat([LAYERMERGE, ds]).iterrows():
        ax.annotate(row["name"], (row["speedup"], row["top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    return _finish_published(plt, fig, ax, out, "published_imagenet_speedup",
                             "GPU speed-up over the paper's dense network [×]",
                             "Published depth compression (not measured here)", legend_size=6)


def plots(summary: str | Path, out: str | Path, config: dict | None = None,
          test_images: int | None = None) -> list[Path]:
    """Stage: PNG (200 dpi) and PDF of top-1 against each cost in ``summary`` (per-seed rows; costs without
    values are skipped), aggregated per cell as in ``report.aggregate`` (``test_images`` as there); with the
    ImageNet config also the paper's published points, on their own labelled figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = pd.read_csv(summary)
    cells = by_cell(seeds, test_images)
    images = pd.to_numeric(cells.get("test_images", pd.Series(dtype=float)), errors="coerce").dropna()
    floor = 50 / images.max() if len(images) else (50 / test_images if test_images else 0.05)  # half an image
    bars = ("95 % t-interval over seeds" if (cells["n"] >= 2).all()
            else "top-1: 95 % interval; timings: IQR or t-interval" if (cells["n"] >= 2).any()
            else "top-1: 95 % Wilson interval; timings: IQR")
    title = setup_line(config, sorted(seeds["seed"].dropna().astype(int).unique()) if "seed" in seeds else [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for column, label, stem, lower in AXES:
        if f"{column}_mean" not in cells or cells[f"{column}_mean"].isna().all():
            continue
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        _panel(ax, cells.dropna(subset=[f"{column}_mean", "top1_mean"]), seeds, column, lower, floor)
        ax.set_xlabel(label + ("  (lower is better)" if lower else "  (higher is better)"))
        ax.set_ylabel("top-1 on the held-out split [%]\n(log scale of the error 100 − top-1"
                      + ("; 100 % at half an image)" if (cells["top1_mean"] >= 100).any() else ")"))
        ax.set_title(f"top-1 vs {label.split(' [')[0]}\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=f"bars: {bars}",
                  title_fontsize=7)
        written += _save(fig, out, stem)
        plt.close(fig)
    if (config or {}).get("data", {}).get("dataset") == "imagenet":
        written += _published(plt, out)
    return written
