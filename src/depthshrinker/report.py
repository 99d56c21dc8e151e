"""The result tables: one row per (grid cell, seed) built from the files of that cell (``cell_row``,
``summarize``), the per-cell aggregate over seeds with 95 % intervals (``aggregate``), and the README table
rendered from that aggregate (``table``). The figures are in ``figures``."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import pandas as pd

from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.base.provenance import software
from depthshrinker.base.stats import prediction_interval, t_interval, wilson

CELL = ["method", "granularity", "keep_ratio"]
QUALITY = ("nll", "teacher_agreement", "teacher_kl")  # test-split figures beyond top-1 (train.train_stage)
PERCENTS = ("top1", "teacher_agreement")  # % of the held-out images: one seed gets a Wilson interval
COLUMNS = [*CELL, "seed", "top1", "params", "macs", "nonlinear_units", "nonlinear_layers", "relu_elements",
           "relu6_elements", "merge_max_abs_err", "cpu_latency_ms", "gpu_throughput_img_s", "mpc_latency_s",
           "mpc_comm_mb", "mpc_rounds", "checkpoint"]
# Counts that two stages may both report (the merge report, the MPC benchmark): they must agree.
SHARED_COUNTS = ("params", "macs", "nonlinear_units", "nonlinear_layers", "relu_elements", "relu6_elements",
                 "input_size")
SAME = {"mpc_input_size": "input_size"}  # one figure under two names
# The cost model's predicted ``model_<name>`` is checked against the measured ``mpc_<name>`` and these.
PREDICTED_AS = {"relu": "relu_elements", "relu6": "relu6_elements", "macs": "macs", "act_layers": "nonlinear_layers"}


class CountMismatch(ConfigError):
    """Two stages of one cell report different numbers for the same count (DESIGN "One set of counts"); a
    ConfigError, so the CLI stops with its one-line message."""


def profile_cell(model_path: str | Path, method: str, granularity: str, keep_ratio: float, image_size: int,
                 out: str | Path | None = None) -> dict:
    """The summary row of one cell from its finetuned checkpoint: top-1 and the cost counts."""
    from depthshrinker.base.checkpoint import load
    from depthshrinker.deploy.load import load_model
    from depthshrinker.nets.counting import profile

    model, _ = load_model(model_path)
    metrics = json.loads(load(model_path).get("metrics", "{}"))
    row = {"method": method, "granularity": granularity, "keep_ratio": float(keep_ratio),
           "top1": metrics.get("top1"), **profile(model, image_size), "checkpoint": str(model_path)}
    if out is not None:
        write_json(out, row)
    return row


def _check_counts(row: dict, parts: list[tuple[str, dict]], cell: str) -> None:
    """Raise CountMismatch (one line, naming ``cell`` and the figure) where the parts or the cost model
    disagree on a count; preprocessing figures only where a dealer ran (``mpc_private``)."""
    seen: dict[str, tuple[str, object]] = {}
    for name, part in parts:
        for key, value in part.items():
            key = SAME.get(key, key)
            if key not in SHARED_COUNTS:
                continue
            if key in seen and value != seen[key][1]:
                raise CountMismatch(f"{cell}: {key} is {seen[key][1]} in {seen[key][0]} but {value} in {name}")
            seen.setdefault(key, (name, value))
    for key, predicted in row.items():
        if not key.startswith("model_") or predicted is None:
            continue
        name = key.removeprefix("model_")
        if name.startswith("preproc") and row.get("mpc_private") is False:
            continue  # no dealer (CrypTen's TFP): only the online figures are measured
        for measured in (f"mpc_{name}", PREDICTED_AS.get(name)):
            if measured in row and row[measured] is not None and row[measured] != predicted:
                raise CountMismatch(f"{cell}: {measured} is {row[measured]} but the cost model predicts "
                                    f"{key} = {predicted}")


def cell_row(method: str, granularity: str, keep_ratio: float, model: str | Path, parts: list[str | Path],
             out: str | Path, seed: int | None = None, config_hash: str | None = None) -> dict:
    """One (cell, seed) row: its name, ``seed`` and ``config_hash`` (of every config section the cell was built
    from), top-1 (and ``test_images``) from the trained checkpoint's metrics (``model`` with suffix .json), then
    the JSON dicts of its later stages (merge: the deployed network's counts; benchmarks), without their
    provenance blocks. Raises CountMismatch when two parts, or the MPC benchmark's measured bytes/rounds (online
    and preprocessing) and its cost model's prediction, disagree on a count."""
    metrics_path = Path(model).with_suffix(".json")
    metrics = read_json(metrics_path)
    if not isinstance(metrics, dict) or "top1" not in metrics:
        raise ConfigError(f"{metrics_path}: no 'top1' (not the metrics of a trained model)")
    row = {"method": method, "granularity": granularity, "keep_ratio": float(keep_ratio), "seed": seed,
           "config_hash": config_hash, "top1": metrics["top1"],
           **{k: metrics[k] for k in QUALITY if k in metrics},
           **{f"train_{k}": metrics[k] for k in ("epochs", "best_epoch") if k in metrics},  # how training ended
           **({"test_images": metrics["test_images"]} if "test_images" in metrics else {}), "checkpoint": str(model),
           **metrics.get("row", {})}  # what a training stage flags for the summary (a raised budget, a missed one)
    loaded = []
    for part in parts:
        data = read_json(part)
        if not isinstance(data, dict):
            raise ConfigError(f"{part}: not a JSON object")
        data.pop("provenance", None)
        loaded.append((Path(part).name, data))
        row.update(data)
    cell = f"row {method}/{granularity}/{float(keep_ratio):g}" + (f" seed {seed}" if seed is not None else "")
    _check_counts(row, loaded, cell)
    write_json(out, row)
    return row


def _write_csv(table: pd.DataFrame, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)


def _flat(row: dict) -> dict:
    """A row without its provenance block (``config_hash`` already says which config it answers), keeping the
    code revision that made it as ``git_revision`` (``-dirty`` when the tree had uncommitted changes)."""
    block = row.pop("provenance", None) or {}
    if block.get("git_revision"):
        row["git_revision"] = block["git_revision"][:12] + ("-dirty" if block.get("git_dirty") else "")
    return row


def summarize(row_files: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate the per-(cell, seed) rows into a CSV with the contract columns first, sorted by method,
    granularity, keep ratio and seed; two rows for the same cell and seed are an error."""
    table = pd.DataFrame([_flat(read_json(f)) for f in row_files])
    for column in COLUMNS:
        if column not in table:
            table[column] = pd.NA
    table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
    twice = table[table.duplicated([*CELL, "seed"], keep=False)]
    if not twice.empty:
        first = twice.iloc[0]
        raise ConfigError(f"summarize: {len(twice)} rows for cell {first['method']}/{first['granularity']}/"
                          f"{first['keep_ratio']:g} seed {first['seed']} (one row per cell and seed)")
    table = table.sort_values([*CELL, "seed"], kind="stable")
    _write_csv(table, out)
    return table


# Aggregated columns: top-1, the counts and every timing/cost (not their IQR/min/max/per-run companions).
METRIC = re.compile(r"top1|nll|teacher_agreement|teacher_kl|params|macs|nonlinear_units|nonlinear_layers"
                    r"|relu6?_elements|layers_after|merge_max_abs_err"
                    r"|(ort_)?cpu_latency_ms|(ort_)?cpu_speedup|ort_over_eager|gpu_throughput_img_s\w*|gpu_speedup\w*|mpc_latency_s|mpc_comm_mb"
                    r"|mpc_bytes|mpc_rounds|mpc_e2e_s|mpc_est_\w+_s|mpc_preproc_\w+")
COMPANION = re.compile(r"_iqr|_(min|max|runs)_s$")
CARRY = ("test_images", "git_revision", "gpu", "cpu_threads")  # per-cell facts, copied (values joined by ';')


def iqr_column(column: str) -> str:
    """The name of the interquartile-range column that ``bench``/``mpc`` write next to a timing."""
    if column.startswith(("gpu_throughput", "gpu_speedup")):
        return re.sub(r"^gpu_(throughput|speedup)(_img_s)?", r"gpu_\1_iqr", column)
    return re.sub(r"_(s|ms)$", r"_iqr_\1", column) if re.search(r"_(s|ms)$", column) else f"{column}_iqr"


def _interval(column: str, rows: pd.DataFrame, test_images: int | None) -> tuple[float, float]:
    values = rows[column].dropna().astype(float).tolist()
    if len(values) >= 2:
        lo, hi = t_interval(values)
    elif column in PERCENTS:
        if not test_images:
            return float("nan"), float("nan")
        correct = round(values[0] * test_images / 100)
        if abs(values[0] * test_images / 100 - correct) > 1e-3:
            raise ConfigError(f"aggregate: {column} {values[0]} is not a whole number of {test_images} held-out "
                              "images")
        lo, hi = (100 * v for v in wilson(correct, test_images))
    elif column in QUALITY:
        return float("nan"), float("nan")  # one seed: a mean over images, no interval over training runs
    elif iqr_column(column) in rows and rows[iqr_column(column)].notna().any():
        spread = float(rows[iqr_column(column)].dropna().iloc[0])
        lo, hi = values[0] - spread / 2, values[0] + spread / 2
    elif re.search(r"_m?s$", column) and not column.startswith("mpc_est_"):
        return float("nan"), float("nan")  # a timing without its spread
    else:
        lo = hi = values[0]  # counts and the cost model's estimates are exact
    return max(lo, 0.0), (min(hi, 100.0) if column in PERCENTS else hi)


def _joined(values: pd.Series):
    unique = list(dict.fromkeys(values.dropna().tolist()))
    return unique[0] if len(unique) == 1 else ";".join(map(str, unique)) if unique else pd.NA


def by_cell(table: pd.DataFrame, test_images: int | None = None) -> pd.DataFrame:
    """The aggregate of a per-(cell, seed) table: one row per cell; see ``aggregate``."""
    metrics = [c for c in table.columns if METRIC.fullmatch(c) and not COMPANION.search(c)
               and pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
    out = []
    for cell, rows in table.groupby(CELL, sort=True, dropna=False):
        n = len(rows)
        row = dict(zip(CELL, cell), n=n, seeds=",".join(str(s) for s in sorted(rows["seed"].dropna().astype(int)))
                   if "seed" in rows else "", interval="t95" if n >= 2 else "wilson95/iqr")
        row |= {c: _joined(rows[c]) for c in CARRY if c in rows}
        images = row.get("test_images") if isinstance(row.get("test_images"), (int, float)) else test_images
        if images:
            row["test_images"] = images
        for column in metrics:
            values = rows[column].dropna().astype(float)
            lo, hi = _interval(column, rows, images) if len(values) else (float("nan"), float("nan"))
            row |= {f"{column}_mean": values.mean(), f"{column}_std": values.std(ddof=1) if len(values) > 1
                    else float("nan"), f"{column}_lo": lo, f"{column}_hi": hi}
        out.append(row)
    return pd.DataFrame(out)


def aggregate(summary: str | Path, out: str | Path, test_images: int | None = None) -> pd.DataFrame:
    """Stage: ``summary.csv`` (one row per cell and seed) to one row per (method, granularity, keep_ratio).

    Columns: the cell, ``n`` (seeds), ``seeds``, ``interval`` (which one, below), the per-cell facts ``test_images``,
    ``git_revision``, ``gpu``, ``cpu_threads`` where present, and for top-1 and every count and timing/cost column
    ``<col>_mean``, ``<col>_std`` (ddof 1; empty with one seed), ``<col>_lo``, ``<col>_hi``. The interval:
    - n >= 2 seeds (``t95``): Student's t 95 % interval of the mean over seeds;
    - one seed (``wilson95/iqr``): top-1 gets the Wilson 95 % score interval of the held-out count (needs
      ``test_images``, from the rows or this argument; otherwise empty); a timing with an IQR column is median
      ∓ IQR/2 of its repeats (a spread, not a 95 % interval; empty where no IQR is recorded); counts and the
      cost model's estimates are exact.
    Bounds are clipped to >= 0 (and top-1 to <= 100)."""
    table = by_cell(pd.read_csv(summary), test_images)
    _write_csv(table, out)
    return table


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def _value(row: pd.Series, column: str, digits: int, scale: float = 1.0) -> str:
    """``mean ± half-interval``; top-1 with one seed ``mean (lo–hi)`` (Wilson is asymmetric); a timing with one
    seed ``median (IQR)``; exact values alone (whole numbers without decimals)."""
    mean = row.get(f"{column}_mean")
    if mean is None or pd.isna(mean):
        return "–"
    mean, lo, hi = mean * scale, row[f"{column}_lo"] * scale, row[f"{column}_hi"] * scale
    if pd.isna(lo) or hi - lo <= abs(mean) * 1e-9:
        return f"{mean:,.{0 if float(mean).is_integer() else digits}f}"
    text = f"{mean:,.{digits}f}"
    if row["n"] < 2 and column in PERCENTS:
        return f"{text} ({lo:.{digits}f}–{hi:.{digits}f})"
    if row["n"] < 2:
        return f"{text} ({hi - lo:.{digits}f})"
    return f"{text} ± {max(hi - mean, mean - lo):.{digits}f}"  # the half-width, also where a bound was clipped


TABLE = [  # (header, column, digits, scale)
    ("top-1 %", "top1", 2, 1), ("NLL", "nll", 3, 1), ("agrees with dense %", "teacher_agreement", 1, 1),
    ("MMACs", "macs", 1, 1e-6), ("ReLU/ReLU6 elements", "nonlinear_units", 0, 1),
    ("nonlinear layers", "nonlinear_layers", 1, 1), ("convs", "layers_after", 1, 1),
    ("CrypTen s", "mpc_latency_s", 2, 1), ("MB", "mpc_comm_mb", 0, 1), ("preproc. MB", "mpc_preproc_mb", 0, 1),
    ("rounds", "mpc_rounds", 0, 1), ("est. WAN s", "mpc_est_wan_s", 1, 1),
    ("CPU × dense", "cpu_speedup", 2, 1), ("GPU × dense", "gpu_speedup", 2, 1),
]
RERUN_HEADER = "a rerun lands in (top-1 %)"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
PAIRED_MARKERS = ("<!-- paired-table:start -->", "<!-- paired-table:end -->")


def _rerun_interval(row: pd.Series) -> str:
    """The 95 % prediction interval for the mean top-1 of a rerun with as many seeds (``stats.prediction_interval``),
    clipped to 0-100; empty with one seed."""
    if row["n"] < 2 or pd.isna(row["top1_std"]):
        return ""
    lo, hi = prediction_interval(row["top1_mean"], row["top1_std"], int(row["n"]), int(row["n"]))
    return f"{max(lo, 0.0):.2f}–{min(hi, 100.0):.2f}"


def _machine(cells: pd.DataFrame) -> str:
    """This machine (OS, CPU model and count, torch) and the GPU the results name, for the caption."""
    gpus = cells["gpu"].dropna().astype(str).unique() if "gpu" in cells else []
    return (f"{platform.system()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} CPUs"
            f"{', GPU ' + ' / '.join(gpus) if len(gpus) else ''}, torch {importlib.metadata.version('torch')}")


def render_table(cells: pd.DataFrame, date: str, commit: str | None) -> str:
    """The Markdown table of an aggregate (columns without values are left out) and its caption."""
    shown = [spec for spec in TABLE if f"{spec[1]}_mean" in cells and cells[f"{spec[1]}_mean"].notna().any()]
    rerun = bool((cells["n"] >= 2).any()) and "top1_std" in cells
    headers = [h for h, *_ in shown]
    if rerun:
        headers.insert(1, RERUN_HEADER)
    lines = ["| cell | n | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for _, row in cells.iterrows():
        name = f"{row['method']} {row['granularity']} {row['keep_ratio']:g}"
        values = [_value(row, c, d, s) for _, c, d, s in shown]
        if rerun:
            values.insert(1, _rerun_interval(row))
        lines.append(f"| {name} | {row['n']} | " + " | ".join(values) + " |")
    seeds = sorted({int(s) for text in cells["seeds"].dropna().astype(str) for s in text.split(",") if s})
    images = cells["test_images"].dropna() if "test_images" in cells else pd.Series(dtype=float)
    how = []
    if (cells["n"] >= 2).any():
        how.append("n ≥ 2 seeds: mean ± half-width of the 95 % t-interval over seeds; *a rerun lands in*: the "
                   "95 % prediction interval for the mean top-1 of a rerun with as many seeds (on another machine)")
    if (cells["n"] < 2).any():
        how.append("n = 1: top-1 (95 % Wilson interval of the held-out count), timings median (IQR of the repeats)")
    held_out = f"; {int(images.iloc[0])} held-out images (one is {100 / images.iloc[0]:.2g} % top-1)" if len(images) \
        else ""
    caption = (f"*{date}, commit {commit or 'unknown'}, {_machine(cells)}; seeds {', '.join(map(str, seeds)) or 'n/a'}"
               f"{held_out}; " + "; ".join(how) + ".*")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table(by_cell_csv: str | Path, readme: str | Path | None = None, out: str | Path | None = None) -> str:
    """Stage: render ``summary_by_cell.csv`` as a Markdown table with a caption naming the date (of the CSV),
    commit (the results' ``git_revision``, else ``git rev-parse`` here), machine, seeds and the intervals; write
    it to ``out`` and/or replace the block between ``<!-- results-table:start -->`` and
    ``<!-- results-table:end -->`` in ``readme``. Returns the Markdown."""
    if readme is None and out is None:
        raise ConfigError("table: give --readme and/or --out")
    path = Path(by_cell_csv)
    cells = pd.read_csv(path)
    date = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d")
    revisions = cells["git_revision"].dropna().astype(str).unique() if "git_revision" in cells else []
    commit = ", ".join(r[:7] + ("-dirty" if r.endswith("-dirty") else "") for r in revisions) \
        or (software()["git_revision"] or "")[:7] or None
    text = render_table(cells, date, commit)
    if out is not None:
        Path(out).write_text(text)
    if readme is not None:
        replace_block(readme, (START, END), text)
    return text


def replace_block(path: str | Path, markers: tuple[str, str], text: str) -> None:
    """Rewrite the lines between the two ``markers`` lines of ``path`` with ``text``."""
    path, (start, end) = Path(path), markers
    old = path.read_text()
    if old.count(start) != 1 or old.count(end) != 1 or old.index(start) > old.index(end):
        raise ConfigError(f"{path} needs one '{start}' line followed by one '{end}' line")
    head, rest = old.split(start)
    path.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")


PAIRED = ("top1", "nll", "teacher_agreement", "mpc_latency_s", "mpc_comm_mb", "mpc_rounds", "mpc_est_wan_s",
          "cpu_speedup")
LOWER_IS_BETTER = re.compile(r"nll|teacher_kl|mpc_\w+")


def _cell_rows(rows: pd.DataFrame, name: str, summary) -> pd.DataFrame:
    method, _, granularity = name.partition("/")
    cell = rows[(rows["method"] == method) & (rows["granularity"] == granularity)]
    if cell.empty:
        raise ConfigError(f"compare: no rows of '{name}' in {summary}")
    return cell


def verdict(column: str, lo: float, hi: float, a: str, b: str) -> str:
    """The cell that the 95 % interval ``[lo, hi]`` of ``a − b`` favours in ``column`` (lower is better for
    NLL, KL and MPC costs), or "no detectable difference" when the interval holds 0."""
    if pd.isna(lo) or lo <= 0 <= hi:
        return "no detectable difference"
    a_better = (lo > 0) != bool(LOWER_IS_BETTER.fullmatch(column))
    return f"{a if a_better else b} better"


def paired(rows: pd.DataFrame, a: str, b: str, columns: tuple[str, ...] = PAIRED, summary="summary") -> list[dict]:
    """Cell ``a`` minus cell ``b`` (``method/granularity``) per keep ratio and column, seed by seed: the
    differences, their mean, 95 % t-interval and verdict. Paired: the same seed shares the dense teacher, the
    split and the held-out images, so the seed-to-seed spread common to both cells cancels. Only seeds that
    both cells ran are paired."""
    left_cells, right_cells = _cell_rows(rows, a, summary), _cell_rows(rows, b, summary)
    out = []
    for keep in sorted(set(left_cells["keep_ratio"]) & set(right_cells["keep_ratio"])):
        left, right = (c[c["keep_ratio"] == keep].set_index("seed") for c in (left_cells, right_cells))
        for column in (c for c in columns if c in rows):
            diff = (left[column] - right[column]).dropna().sort_index()
            if diff.empty:
                continue
            lo, hi = t_interval(diff.tolist()) if len(diff) >= 2 else (float("nan"), float("nan"))
            out.append({"a": a, "b": b, "keep": keep, "column": column, "seeds": diff.index.tolist(),
                        "diffs": diff.tolist(), "mean": diff.mean(), "lo": lo, "hi": hi,
                        "verdict": verdict(column, lo, hi, a, b)})
    return out


def compare_wide(summary: str | Path, pairs: list[tuple[str, str]], columns: tuple[str, ...] = PAIRED) -> str:
    """Markdown: one line per pair and keep ratio, one column per metric: the mean of ``a − b`` over seeds and
    its 95 % t-interval, in bold where the interval excludes 0 (the README's form of ``compare``)."""
    rows = pd.read_csv(summary)
    found = [(a, b, paired(rows, a, b, columns, summary)) for a, b in pairs]
    shown = [c for c in columns if any(d["column"] == c for _, _, ds in found for d in ds)]
    lines = ["| keep | a − b | n | " + " | ".join(shown) + " |", "|---" * (len(shown) + 3) + "|"]
    for a, b, diffs in found:
        for keep in sorted({d["keep"] for d in diffs}):
            at = {d["column"]: d for d in diffs if d["keep"] == keep}
            cells = []
            for c in shown:
                d = at.get(c)
                text = "–" if d is None else f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]"
                cells.append(f"**{text}**" if d is not None and d["verdict"] != "no detectable difference" else text)
            n = max(len(d["diffs"]) for d in at.values())
            lines.append(f"| {keep:g} | {a} − {b} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(summary: str | Path, pairs: list[tuple[str, str]], out: str | Path | None = None,
            columns: tuple[str, ...] = PAIRED) -> str:
    """Markdown: for each pair ``(a, b)`` of ``method/granularity`` cells, ``a − b`` per keep ratio and
    column (``paired``), with the per-seed differences, the mean, its 95 % t-interval and the verdict
    ("no detectable difference" when the interval holds 0). ``out``: also write it there."""
    rows = pd.read_csv(summary)
    lines = ["| keep | a − b | column | per seed | mean | 95 % interval | verdict |", "|---" * 7 + "|"]
    for a, b in pairs:
        for d in paired(rows, a, b, columns, summary):
            per_seed = ", ".join(f"{v:+.3g}" for v in d["diffs"])
            lines.append(f"| {d['keep']:g} | {a} − {b} | {d['column']} | {per_seed} | {d['mean']:+.3g} | "
                         f"[{d['lo']:+.3g}, {d['hi']:+.3g}] | {d['verdict']} |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        Path(out).write_text(text)
    return text


def rerun_check(reference: str | Path, rerun: str | Path, columns: tuple[str, ...] = ("top1", "nll", "teacher_agreement"),
                out: str | Path | None = None) -> str:
    """Markdown: does every cell of a rerun (its ``summary_by_cell.csv``: another machine, another thread count)
    land inside the 95 % interval printed for it by the ``reference`` aggregate? One line per cell and column:
    the reference mean and its confidence interval, the rerun mean, and whether it lies inside that interval and
    inside the 95 % prediction interval for the mean of a rerun of ``m`` seeds, ``mean ± t(n-1)·s·√(1/n + 1/m)``
    (``stats.prediction_interval``: the interval a rerun's mean should land in; the confidence interval is
    narrower, being about the reference's own mean only); counts at the end."""
    ref, new = (pd.read_csv(p).set_index(CELL) for p in (reference, rerun))
    lines = ["| cell | column | reference mean [95 % interval] | rerun mean | inside | 95 % prediction interval "
             "| inside |", "|---" * 7 + "|"]
    inside = predicted = total = 0
    for cell in ref.index.intersection(new.index):
        for column in columns:
            if f"{column}_mean" not in ref or pd.isna(ref.loc[cell, f"{column}_lo"]):
                continue
            lo, hi, mean = ref.loc[cell, f"{column}_lo"], ref.loc[cell, f"{column}_hi"], new.loc[cell, f"{column}_mean"]
            plo, phi = prediction_interval(ref.loc[cell, f"{column}_mean"], ref.loc[cell, f"{column}_std"],
                                           int(ref.loc[cell, "n"]), int(new.loc[cell, "n"]))
            ok, pok = bool(lo <= mean <= hi), bool(plo <= mean <= phi)
            inside, predicted, total = inside + ok, predicted + pok, total + 1
            lines.append(f"| {cell[0]} {cell[1]} {cell[2]:g} | {column} | {ref.loc[cell, f'{column}_mean']:.4g} "
                         f"[{lo:.4g}, {hi:.4g}] | {mean:.4g} | {'yes' if ok else '**no**'} | [{plo:.4g}, {phi:.4g}] | "
                         f"{'yes' if pok else '**no**'} |")
    text = "\n".join(lines) + (f"\n\n{inside} of {total} inside the confidence interval, {predicted} of {total} "
                               f"inside the prediction interval.\n")
    if out is not None:
        Path(out).write_text(text)
    return text
