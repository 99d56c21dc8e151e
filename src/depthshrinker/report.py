"""The summary table: one row per grid cell, built from the files of that cell."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .checkpoint import load, load_model, read_json, write_json
from .counting import profile

COLUMNS = ["method", "granularity", "keep_ratio", "top1", "params", "macs", "nonlinear_units", "nonlinear_layers",
           "relu_elements", "relu6_elements", "merge_max_abs_err", "cpu_latency_ms", "gpu_throughput_img_s",
           "mpc_latency_s", "mpc_comm_mb", "mpc_rounds", "checkpoint"]


def profile_cell(model_path: str | Path, method: str, granularity: str, keep_ratio: float, image_size: int,
                 out: str | Path | None = None) -> dict:
    """The summary row of one cell from its finetuned checkpoint: top-1 and the cost counts."""
    model, _ = load_model(model_path)
    metrics = json.loads(load(model_path).get("metrics", "{}"))
    row = {"method": method, "granularity": granularity, "keep_ratio": float(keep_ratio),
           "top1": metrics.get("top1"), **profile(model, image_size), "checkpoint": str(model_path)}
    if out is not None:
        write_json(out, row)
    return row


def cell_row(method: str, granularity: str, keep_ratio: float, model: str | Path, parts: list[str | Path],
             out: str | Path) -> dict:
    """One cell's row: its name, top-1 from the trained checkpoint's metrics (``model`` with suffix .json),
    then the JSON dicts of its later stages (merge: the deployed network's counts; benchmarks)."""
    row = {"method": method, "granularity": granularity, "keep_ratio": float(keep_ratio),
           "top1": read_json(Path(model).with_suffix(".json"))["top1"], "checkpoint": str(model)}
    for part in parts:
        row.update(read_json(part))
    write_json(out, row)
    return row


def summarize(row_files: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate the per-cell rows into a CSV with the contract columns first."""
    table = pd.DataFrame([read_json(f) for f in row_files])
    for column in COLUMNS:
        if column not in table:
            table[column] = pd.NA
    table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
    table = table.sort_values(["method", "granularity", "keep_ratio"], kind="stable")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    return table


# Published ImageNet rows (Fu et al. 2022, Table: top-1 of the longest schedule, MFLOPs, V100 img/s).
PUBLISHED = pd.DataFrame([
    ("MBV2-1.4", "dense", 75.30, 630, 2127), ("MetaPruning-1.0x", "metapruning", 73.20, 332, 3159),
    ("DS-A", "depthshrinker", 75.65, 519, 3827), ("DS-B", "depthshrinker", 75.13, 502, 4778),
    ("DS-C", "depthshrinker", 74.91, 492, 4597), ("Uniform-0.65x", "uniform", 67.20, 182, 4004),
    ("MetaPruning-0.65x", "metapruning", 71.70, 160, 4336), ("DS-D", "depthshrinker", 74.50, 484, 5560),
    ("DS-E", "depthshrinker", 74.43, 474, 5317), ("Uniform-0.35x", "uniform", 54.60, 68, 6266),
    ("MetaPruning-0.35x", "metapruning", 64.50, 52, 7044), ("DS-F", "depthshrinker", 70.13, 415, 10804),
], columns=["name", "method", "top1", "mflops", "v100_img_s"])

COLORS = {"dense": "black", "depthshrinker": "tab:blue", "snl": "tab:orange", "metapruning": "tab:green",
          "uniform": "tab:purple"}
MARKERS = {"full": "*", "block": "o", "layer": "p", "channel": "s", "pixel": "D", "element": "X", "width": "v",
           "mpc": "^", "macs": "<", "params": ">"}
AXES = [  # (column, label, file, lower is better)
    ("mpc_latency_s", "two-party (CrypTen) latency per image [s]", "accuracy_vs_mpc_latency.png", True),
    ("mpc_comm_mb", "two-party communication per image [MB]", "accuracy_vs_mpc_comm.png", True),
    ("nonlinear_units", "nonlinear (ReLU/ReLU6) elements per image", "accuracy_vs_nonlinear_units.png", True),
    ("cpu_latency_ms", "CPU latency, batch 1 [ms]", "accuracy_vs_cpu_latency.png", True),
    ("gpu_throughput_img_s", "GPU throughput, batch 128 [images/s]", "accuracy_vs_gpu_throughput.png", False),
]


def pareto(points: pd.DataFrame, x: str, lower: bool) -> pd.DataFrame:
    """The points no other point beats on both ``x`` (lower or higher is better) and top-1."""
    ordered = points.sort_values([x, "top1"], ascending=[lower, False])
    return ordered[ordered["top1"] > ordered["top1"].cummax().shift(fill_value=-1.0)]


def _scatter(ax, table: pd.DataFrame, x: str, lower: bool) -> None:
    for method, points in table.groupby("method"):
        color = COLORS.get(method, "gray")
        label = method if method == "dense" else f"{method} (Pareto front)"
        for granularity, cell in points.groupby("granularity"):
            dense = method == "dense"
            ax.scatter(cell[x], cell["top1"], color=color, marker=MARKERS.get(granularity, "x"), s=160 if dense else 48,
                       alpha=0.85, edgecolor="white", zorder=3 if dense else 2,
                       label="dense" if dense else f"{method} {granularity}")
        front = pareto(points, x, lower)
        if len(front) > 1:
            ax.plot(front[x], front["top1"], color=color, linewidth=1.2, alpha=0.7, label=label)
        for _, row in points.iterrows():
            if method != "dense":
                ax.annotate(f"{row['keep_ratio']:g}", (row[x], row["top1"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=color)


def plots(summary: str | Path, out: str | Path, config: dict | None = None) -> list[Path]:
    """PNG plots of top-1 against each cost in ``summary`` (skipping costs with no values), Pareto front per
    method, keep ratios (widths, matched keeps) annotated; with the ImageNet config, the paper's published
    points on a separate, labelled panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = (config or {}).get("data", {}).get("dataset", "")
    written = []
    for column, label, name, lower in AXES:
        points = table.dropna(subset=[column, "top1"]) if column in table else table.iloc[:0]
        if points.empty:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        _scatter(ax, points, column, lower)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy [%] (measured)")
        ax.set_title(f"{dataset or 'dataset'}: top-1 vs {label.split(' [')[0]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    if dataset == "imagenet":
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for method, points in PUBLISHED.groupby("method"):
            color = COLORS[method]
            ax.scatter(points["v100_img_s"], points["top1"], edgecolor=color, marker="o", facecolor="none", s=60,
                       label=f"{method} (published, Fu et al. 2022)")
            for _, row in points.iterrows():
                ax.annotate(row["name"], (row["v100_img_s"], row["top1"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("V100 throughput, batch 128 [images/s] (published)")
        ax.set_ylabel("ImageNet top-1 [%] (published)")
        ax.set_title("Published points (not measured here)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / "published_imagenet.png")
        plt.close(fig)
        written.append(out / "published_imagenet.png")
    return written
