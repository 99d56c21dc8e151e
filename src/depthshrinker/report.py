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


def combine(parts: list[str | Path], out: str | Path) -> dict:
    """One cell's row: the union of the JSON dicts its stages wrote (profile, merge, benchmarks)."""
    row = {}
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
