"""``depthshrinker`` command line: one subcommand per pipeline stage, each calling the same public function
as the Snakemake rule (the rule runs this very command line), so a stage run by hand writes the same file."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from depthshrinker.base.config import ConfigError, load_config
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.base.provenance import provenance, search_stage


def _config(args) -> dict:
    return args.config_dict if args.config_dict is not None else load_config(args.config)


def _size(args) -> int:
    return args.input_size or _config(args)["data"]["image_size"]


def cmd_train_dense(args):
    from depthshrinker.methods.baselines import train_dense

    return {"top1": train_dense(_config(args), args.out)["top1"]}


def cmd_train_uniform(args):
    from depthshrinker.methods.baselines import train_uniform

    return {"top1": train_uniform(_config(args), args.width, args.dense, args.out)["top1"]}


def cmd_metaprune(args):
    from depthshrinker.methods.pruning import matched_budget, metaprune

    config = _config(args)
    budget = args.budget if args.budget is not None else matched_budget(config, args.cost, args.dense, args.match)
    result = metaprune(config, args.dense, args.out, budget, args.cost, at_least_narrowest=args.budget is None)
    return {"top1": result["top1"], **result["row"], **{k: v for k, v in result["search"].items() if k != "history"}}


def cmd_search(args):
    from depthshrinker.methods.search import search

    metrics = search(_config(args), args.dense, args.out, args.method, args.granularity, args.keep, args.costs)
    return {k: metrics[k] for k in ("top1", "budget", "active_elements", "budget_reached") if k in metrics}


def cmd_extract(args):
    from depthshrinker.methods.search import extract

    return {k: v for k, v in extract(args.search, args.out).items() if k not in ("units", "layers")}


def cmd_finetune(args):
    from depthshrinker.methods.finetune import finetune

    return {"top1": finetune(_config(args), args.dense, args.mask, args.out)["top1"]}


def cmd_merge(args):
    from depthshrinker.base.jsonio import write_json
    from depthshrinker.deploy.merge import export_onnx, merge_checkpoint, merge_pattern, onnx_max_abs_err
    from depthshrinker.deploy.plan import merge_policy

    config = _config(args)
    if args.checkpoint:
        if not args.out:
            raise ConfigError("merge: --out is required with --checkpoint")
        report = merge_checkpoint(args.checkpoint, args.out, config, args.input_size, samples=args.samples)
        if args.onnx:
            from depthshrinker.deploy.load import load_model

            merged = load_model(args.out)[0]
            export_onnx(merged, args.onnx, _size(args))
            report["onnx_max_abs_err"] = onnx_max_abs_err(merged, args.onnx, _size(args))
    else:
        keep = args.pattern or [int(k) for k in args.keep.split(",")]
        size = args.input_size or 224
        report = merge_pattern(args.arch, keep, size, pretrained=args.pretrained, small_input=args.small_input,
                               free_act=config["model"]["free_act"], policy=merge_policy(config, size),
                               samples=args.samples)
    if args.report:
        write_json(args.report, report)
    return report


def cmd_bench_device(args):
    from depthshrinker.deploy.device import bench_device

    config = _config(args)
    _same_length(args)
    rows = bench_device(args.model, args.dense, args.out, config["data"]["image_size"],
                        repeats=config["bench"]["repeats"], gpu=config["bench"]["gpu"],
                        onnxruntime=config["bench"]["onnxruntime"])
    return rows[0] if len(rows) == 1 else {"models": len(rows), "out": args.out}


def cmd_bench_mpc(args):
    from depthshrinker.deploy.mpc.engine import bench_mpc

    config = _config(args)
    mpc = config["mpc"]
    _same_length(args)
    rows = bench_mpc(args.model, args.out, config["data"]["image_size"], runs=mpc["runs"], warmup=mpc["warmup"],
                     timeout=mpc["timeout"], tol=mpc["tolerance"], provider=mpc.get("provider", "ttp"))
    return rows[0] if len(rows) == 1 else {"models": len(rows), "out": args.out}


def _same_length(args) -> None:
    if len(args.model) != len(args.out):
        raise ConfigError(f"{args.command}: {len(args.model)} --model files but {len(args.out)} --out files")


def cmd_cost_table(args):
    from depthshrinker.deploy.tables import cost_table

    return {"units": len(cost_table(_config(args), args.target, args.granularity, args.out)), "out": args.out}


def cmd_latency_table(args):
    from depthshrinker.methods.depthdp import latency_table

    return {"rows": len(latency_table(_config(args), args.target, args.out)), "out": args.out}


def cmd_importance(args):
    from depthshrinker.methods.importance import importance

    return importance(_config(args), args.dense, args.entry, args.out, args.rep)


def cmd_depthdp(args):
    from depthshrinker.methods import depthdp, layermerge

    plan = layermerge.plan if args.granularity == "layermerge" else depthdp.plan
    mask = plan(_config(args), args.keep, args.latency, args.entries, args.out, args.match)
    return {"num_segments": mask["num_segments"], "num_acts": mask["num_acts"],
            **{k: v for k, v in mask["dp"].items() if k != "spans"}}


def cmd_depthdp_diagnose(args):
    from depthshrinker.methods.depthdp import diagnose

    return diagnose(_config(args), args.mask, args.ds_mask, args.latency, args.entries, args.out, args.retest)


def cmd_profile(args):
    from depthshrinker.report import profile_cell

    return profile_cell(args.model, args.method, args.granularity, args.keep, _size(args), args.out)


def cmd_row(args):
    from depthshrinker.base.provenance import config_hash, sections
    from depthshrinker.report import cell_row

    config = _config(args)
    return cell_row(args.method, args.granularity, args.keep, args.model, args.parts, args.out, seed=config["seed"],
                    config_hash=config_hash(sections(config, f"row:{args.method}")))


def cmd_summarize(args):
    from depthshrinker.report import summarize

    return {"rows": len(summarize(args.rows, args.out)), "out": args.out}


def cmd_aggregate(args):
    from depthshrinker.report import aggregate

    return {"cells": len(aggregate(args.summary, args.out, args.test_images)), "out": args.out}


def cmd_compare(args):
    from depthshrinker.report import PAIRED_MARKERS, compare, compare_wide, replace_block

    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    bad = next((p for p, pair in zip(args.pairs, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise ConfigError(f"compare: pair '{bad}' is not A:B (e.g. depthshrinker/block:snl/channel)")
    text = compare(args.summary, pairs, args.out)
    if args.readme:
        replace_block(args.readme, PAIRED_MARKERS, compare_wide(args.summary, pairs))
    return {"rows": len(text.splitlines()) - 2, "out": args.out}


def cmd_rerun_check(args):
    from depthshrinker.report import rerun_check

    text = rerun_check(args.reference, args.rerun, out=args.out)
    print(text)
    return {"inside": text.rsplit("\n\n", 1)[1].strip()}


def cmd_plots(args):
    from depthshrinker.figures import plots

    return {"plots": [str(p) for p in plots(args.summary, args.out, _config(args), args.test_images)]}


def cmd_table(args):
    from depthshrinker.report import table

    table(args.by_cell, args.readme, args.out)
    return {"readme": args.readme, "out": args.out}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="depthshrinker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        s.add_argument("--config", help="YAML config (validated against the schema; defaults filled)")
        s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
        return s

    s = add("train-dense", cmd_train_dense, "train the dense teacher")
    s.add_argument("--out", required=True, help="checkpoint to write (metrics go next to it as .json)")
    s = add("train-uniform", cmd_train_uniform, "train a uniform-width baseline (distilled from the dense teacher)")
    s.add_argument("--width", type=float, required=True, help="channel multiplier")
    s.add_argument("--dense", required=True, help="dense checkpoint (the teacher)")
    s.add_argument("--out", required=True)
    s = add("metaprune", cmd_metaprune, "searched channel pruning under a budget, then finetune the winner")
    s.add_argument("--dense", required=True, help="dense checkpoint")
    s.add_argument("--cost", choices=["mpc", "macs", "params"], default="mpc",
                   help="mpc: CrypTen bytes and rounds as communication time at mpc.network (no compute term)")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=float, help="fraction of the dense network's cost")
    budget.add_argument("--match", help="checkpoint whose cost sets the budget (e.g. a merged DepthShrinker cell)")
    s.add_argument("--out", required=True)
    s = add("search", cmd_search, "stage 1: search which activations to keep")
    s.add_argument("--dense", required=True, help="dense checkpoint")
    s.add_argument("--method", choices=["depthshrinker", "snl"], default="depthshrinker")
    s.add_argument("--granularity", choices=["block", "layer", "channel", "pixel", "element"], default="block")
    s.add_argument("--keep", type=float, required=True, help="keep ratio: the fraction that KEEPS its activation")
    s.add_argument("--costs", default=None, help="cost table CSV for a latency-aware DepthShrinker search")
    s.add_argument("--out", required=True)
    s = add("extract", cmd_extract, "extract the mask of a search checkpoint to JSON")
    s.add_argument("--search", required=True, help="search checkpoint")
    s.add_argument("--out", required=True, help="mask JSON to write")
    s = add("finetune", cmd_finetune, "stage 2: finetune the shrunk network with distillation")
    s.add_argument("--dense", required=True,
                   help="dense checkpoint (the teacher; the student's init, except SNL element: its search's)")
    s.add_argument("--mask", required=True, help="mask JSON from `extract`")
    s.add_argument("--out", required=True)
    s = add("merge", cmd_merge, "fold BatchNorm and merge linear convolutions under the config's merge policy "
            "(plan.merge_policy; a finetuned checkpoint's recorded plan wins); print MACs, params, layers, errors")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a finetuned checkpoint")
    src.add_argument("--arch", help="a model name, with --pattern or --keep (e.g. mobilenetv2_140)")
    keep = s.add_mutually_exclusive_group()
    keep.add_argument("--pattern", choices=list("ABCDEF"), help="upstream MBV2-1.4 pattern")
    keep.add_argument("--keep", help="comma-separated keep-list, 1 = keep (19 block or 35 layer units)")
    s.add_argument("--pretrained", default="none", help="none | auto | weights path (with --arch)")
    s.add_argument("--small-input", action="store_true", help="stride-1 stem (with --arch)")
    s.add_argument("--input-size", type=int, default=None, help="default: config data.image_size (224 with --arch)")
    s.add_argument("--samples", type=int, default=8,
                   help="images of the error check: held-out test images (--checkpoint), seeded noise (--arch)")
    s.add_argument("--out", default=None, help="merged checkpoint to write (with --checkpoint)")
    s.add_argument("--report", default=None, help="JSON report to write")
    s.add_argument("--onnx", default=None, help="also export ONNX here and check it with onnxruntime")
    s = add("bench-device", cmd_bench_device, "CPU latency (and GPU throughput) against the dense network")
    s.add_argument("--model", nargs="+", required=True, help="deployed (merged) checkpoints, timed interleaved")
    s.add_argument("--dense", required=True, help="dense deployed checkpoint, timed in the same run")
    s.add_argument("--out", nargs="+", required=True, help="one JSON per --model, in the same order")
    s = add("bench-mpc", cmd_bench_mpc, "two-party CrypTen inference: latency, bytes, rounds")
    s.add_argument("--model", nargs="+", required=True, help="deployed (merged) checkpoints, run in one set of "
                   "party processes")
    s.add_argument("--out", nargs="+", required=True, help="one JSON per --model, in the same order")
    s = add("cost-table", cmd_cost_table, "per-unit cost table (cpu, gpu measured; mpc cost model)")
    s.add_argument("--target", choices=["cpu", "gpu", "mpc"], required=True)
    s.add_argument("--granularity", choices=["block", "layer"], default="block")
    s.add_argument("--out", required=True)
    s = add("latency-table", cmd_latency_table,
            "depthdp latency table (Kim et al.): every valid merge segment, option and kept activation (mpc cost "
            "model; cpu, gpu measured)")
    s.add_argument("--target", choices=["cpu", "gpu", "mpc"], required=True)
    s.add_argument("--out", required=True, help="CSV to write")
    s = add("importance", cmd_importance, "depthdp importance of one table entry (selection split)")
    s.add_argument("--dense", required=True, help="dense checkpoint")
    s.add_argument("--entry", required=True, help="Kim et al.'s extended segment s-e-a-b (body positions, "
                   "activations kept), or LayerMerge's segment option s-e-k<kernel>[d]")
    s.add_argument("--rep", type=int, default=0, help="1: the retest (adaptation seed + 1000)")
    s.add_argument("--out", required=True, help="JSON to write")
    s = add("depthdp", cmd_depthdp, "depthdp: Kim et al.'s DP (or LayerMerge's) under the budget; writes the mask JSON")
    s.add_argument("--granularity", choices=["segment", "layermerge"], default="segment",
                   help="segment: Kim et al. 2023; layermerge: LayerMerge 2024 (segments that may drop convs)")
    s.add_argument("--keep", type=float, required=True, help="budget: fraction of the dense latency, or the "
                   "DepthShrinker keep ratio whose merged network (--match) sets it")
    s.add_argument("--latency", required=True, help="latency table CSV from `latency-table`")
    s.add_argument("--entries", nargs="+", required=True, help="importance JSON of every extended segment")
    s.add_argument("--match", default=None, help="merged DepthShrinker checkpoint whose latency is the budget")
    s.add_argument("--out", required=True, help="mask JSON to write")
    s = add("depthdp-diagnose", cmd_depthdp_diagnose,
            "depthdp: the DepthShrinker mask of the same budget scored in the DP's table, beside the DP's choice")
    s.add_argument("--mask", required=True, help="the depthdp cell's mask JSON")
    s.add_argument("--ds-mask", required=True, help="the DepthShrinker cell's mask JSON")
    s.add_argument("--latency", required=True, help="latency table CSV from `latency-table`")
    s.add_argument("--entries", nargs="+", required=True, help="importance JSON of every extended segment")
    s.add_argument("--retest", nargs="*", default=None, help="the same entries measured again (--rep 1)")
    s.add_argument("--out", required=True, help="JSON to write")
    s = add("profile", cmd_profile, "top-1, params, MACs and nonlinear counts of a cell's model")
    s.add_argument("--model", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--granularity", required=True)
    s.add_argument("--keep", type=float, required=True)
    s.add_argument("--input-size", type=int, default=None)
    s.add_argument("--out", default=None)
    s = add("row", cmd_row, "one cell's summary row (JSON) from its checkpoint metrics and stage reports")
    s.add_argument("--method", required=True)
    s.add_argument("--granularity", required=True)
    s.add_argument("--keep", type=float, required=True)
    s.add_argument("--model", required=True, help="the cell's trained checkpoint (its metrics: model.json)")
    s.add_argument("parts", nargs="+", help="stage reports merged into the row (merge, bench, mpc JSON)")
    s.add_argument("--out", required=True)
    s = add("summarize", cmd_summarize, "collect cell rows (JSON) into a summary CSV")
    s.add_argument("rows", nargs="+", help="per-cell row JSON files")
    s.add_argument("--out", required=True)
    s = add("aggregate", cmd_aggregate, "per-cell mean, std, n and 95 %% interval over seeds of a summary CSV")
    s.add_argument("--summary", required=True, help="summary CSV, one row per cell and seed")
    s.add_argument("--out", required=True, help="aggregate CSV to write (e.g. results/summary_by_cell.csv)")
    s.add_argument("--test-images", type=int, default=None,
                   help="held-out images behind top-1, where the rows lack a test_images column")
    s = add("compare", cmd_compare, "paired per-seed differences of methods' cells, with 95 %% t-intervals")
    s.add_argument("--summary", required=True, help="summary CSV, one row per cell and seed")
    s.add_argument("--pairs", nargs="+", required=True,
                   help="A:B pairs of method/granularity cells, e.g. depthshrinker/block:snl/channel (A − B)")
    s.add_argument("--out", required=True, help="Markdown table to write")
    s.add_argument("--readme", default=None, help="also rewrite the block between the paired-table markers here "
                   "(one line per pair and keep ratio: mean [95 %% interval], bold where it excludes 0)")
    s = add("rerun-check", cmd_rerun_check, "does every cell of a rerun land inside the reference's 95 %% interval?")
    s.add_argument("--reference", required=True, help="summary_by_cell.csv whose intervals are the reference")
    s.add_argument("--rerun", required=True, help="summary_by_cell.csv of the rerun (another machine, thread count)")
    s.add_argument("--out", default=None, help="also write the Markdown table here")
    s = add("plots", cmd_plots, "accuracy vs cost figures (PNG and PDF) with intervals and the Pareto front")
    s.add_argument("--summary", required=True, help="summary CSV, one row per cell and seed")
    s.add_argument("--out", required=True, help="folder for the PNGs and PDFs")
    s.add_argument("--test-images", type=int, default=None, help="as for aggregate")
    s = add("table", cmd_table, "Markdown results table (with its caption) from the aggregate CSV")
    s.add_argument("--by-cell", required=True, help="aggregate CSV from `aggregate`")
    s.add_argument("--readme", default=None, help="rewrite the block between the results-table markers here")
    s.add_argument("--out", default=None, help="also write the table to this Markdown file")
    return p


def _json_outputs(args) -> list[Path]:
    """The JSON files a stage wrote (its metrics or reports), which get the provenance block."""
    outs = getattr(args, "report", None) or getattr(args, "out", None)
    paths = []
    for out in outs if isinstance(outs, list) else [outs] if outs else []:
        out = Path(out).with_suffix(".json") if Path(out).suffix == ".pt" else Path(out)
        if out.suffix == ".json" and out.is_file():
            paths.append(out)
    return paths


def _stage(args, result) -> str:
    """The READS entry (``provenance``) a finished subcommand answers to."""
    if args.command == "row":
        return f"row:{args.method}"
    if args.command == "search":
        return search_stage(args.method, args.granularity)
    if args.command == "merge" and not result.get("masked", True):
        return "merge-full"  # a network that keeps every activation
    if args.command == "depthdp" and args.granularity == "layermerge":
        return "depthdp-layermerge"
    return args.command


def stamp(path: Path, config: dict, stage: str) -> None:
    """Add ``provenance(config, stage)`` to the JSON object in ``path`` (rewritten atomically)."""
    data = read_json(path)
    if isinstance(data, dict):
        write_json(path, {**data, "provenance": provenance(config, stage)})


# Stages that read and write JSON/CSV only: they run without torch (a quicker start for the many row jobs).
LIGHT = {"row", "summarize", "aggregate", "compare", "table", "rerun-check", "plots"}


@contextlib.contextmanager
def _runtime(args):
    """Yields ``is_main``: the stage's process set-up (torch threads, and the torchrun process group under
    torchrun); JSON/CSV-only stages (``LIGHT``) skip it."""
    if args.command in LIGHT:
        yield lambda: True
        return
    from depthshrinker.train import init_distributed, is_main, set_threads

    set_threads(args.threads)
    with init_distributed():
        yield is_main


def main(argv: list[str] | None = None, config: dict | None = None, log_file: str | None = None) -> int:
    """Run one subcommand; ``config`` (a validated dict) replaces ``--config`` when called from Python.
    Under torchrun (WORLD_SIZE > 1) the process group is set up first (NCCL on GPUs, gloo on CPUs).
    The stage's JSON output gets a provenance block (the config sections it read, their hash, versions) and
    its result goes to stdout and to ``log_file``."""
    args = parser().parse_args(argv)
    args.config_dict = config
    configure_logging(log_file)
    try:
        with _runtime(args) as is_main:
            result = args.fn(args)
            if is_main():
                for output in _json_outputs(args):
                    stamp(output, _config(args), _stage(args, result))
    except ConfigError as err:
        line = f"depthshrinker {args.command}: error: {err}"
        print(line, file=sys.stderr)
        if log_file:
            with open(log_file, "a") as log:
                log.write(line + "\n")
        return 2
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if log_file:
        logging.getLogger("depthshrinker").info(f"{args.command} result:\n{text}")
    return 0


def configure_logging(log_file: str | Path | None = None) -> None:
    """Log lines to stderr (and appended to ``log_file``)."""
    handlers = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


if __name__ == "__main__":
    sys.exit(main())
