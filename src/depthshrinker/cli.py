"""``depthshrinker`` command line: one subcommand per pipeline stage, each calling the same public function
as the Snakemake rule (the rule runs this very command line), so a stage run by hand writes the same file."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


def _config(args) -> dict:
    return args.config_dict if args.config_dict is not None else load_config(args.config)


def _size(args) -> int:
    return args.input_size or _config(args)["data"]["image_size"]


def cmd_train_dense(args):
    from .baselines import train_dense

    return {"top1": train_dense(_config(args), args.out)["top1"]}


def cmd_train_uniform(args):
    from .baselines import train_uniform

    return {"top1": train_uniform(_config(args), args.width, args.dense, args.out)["top1"]}


def cmd_metaprune(args):
    from .pruning import matched_budget, metaprune

    config = _config(args)
    budget = args.budget if args.budget is not None else matched_budget(config, args.cost, args.dense, args.match)
    result = metaprune(config, args.dense, args.out, budget, args.cost, at_least_narrowest=args.budget is None)
    return {"top1": result["top1"], **{k: v for k, v in result["search"].items() if k != "history"}}


def cmd_search(args):
    from .search import search

    return {"top1": search(_config(args), args.dense, args.out, args.method, args.granularity, args.keep,
                           args.costs)["top1"]}


def cmd_extract(args):
    from .search import extract

    return {k: v for k, v in extract(args.search, args.out).items() if k not in ("units", "layers")}


def cmd_finetune(args):
    from .finetune import finetune

    return {"top1": finetune(_config(args), args.dense, args.mask, args.out)["top1"]}


def cmd_merge(args):
    from .checkpoint import write_json
    from .merge import export_onnx, merge_checkpoint, merge_pattern, onnx_max_abs_err

    if args.checkpoint:
        if not args.out:
            raise ConfigError("merge: --out is required with --checkpoint")
        report = merge_checkpoint(args.checkpoint, args.out, _size(args), samples=args.samples)
        if args.onnx:
            from .checkpoint import load_model

            merged = load_model(args.out)[0]
            export_onnx(merged, args.onnx, _size(args))
            report["onnx_max_abs_err"] = onnx_max_abs_err(merged, args.onnx, _size(args))
    else:
        keep = args.pattern or [int(k) for k in args.keep.split(",")]
        report = merge_pattern(args.arch, keep, args.input_size or 224, pretrained=args.pretrained,
                               small_input=args.small_input, samples=args.samples)
    if args.report:
        write_json(args.report, report)
    return report


def cmd_bench_device(args):
    from .bench import bench_device

    config = _config(args)
    return bench_device(args.model, args.dense, args.out, config["data"]["image_size"],
                        repeats=config["bench"]["repeats"], gpu=config["bench"]["gpu"])


def cmd_bench_mpc(args):
    from .mpc import bench_mpc

    config = _config(args)
    mpc = config["mpc"]
    return bench_mpc(args.model, args.out, config["data"]["image_size"], runs=mpc["runs"], warmup=mpc["warmup"],
                     timeout=mpc["timeout"], tol=mpc["tolerance"])


def cmd_cost_table(args):
    from .tables import cost_table

    return {"units": len(cost_table(_config(args), args.target, args.granularity, args.out)), "out": args.out}


def cmd_profile(args):
    from .report import profile_cell

    return profile_cell(args.model, args.method, args.granularity, args.keep, _size(args), args.out)


def cmd_summarize(args):
    from .report import summarize

    return {"rows": len(summarize(args.rows, args.out)), "out": args.out}


def cmd_plots(args):
    from .report import plots

    return {"plots": [str(p) for p in plots(args.summary, args.out, _config(args))]}


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
    s.add_argument("--cost", choices=["mpc", "macs", "params"], default="mpc")
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
    s.add_argument("--dense", required=True, help="dense checkpoint (student init and teacher)")
    s.add_argument("--mask", required=True, help="mask JSON from `extract`")
    s.add_argument("--out", required=True)
    s = add("merge", cmd_merge, "fold BatchNorm and merge linear convolutions; print MACs, params, layers, error")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a finetuned checkpoint")
    src.add_argument("--arch", help="a model name, with --pattern or --keep (e.g. mobilenetv2_140)")
    keep = s.add_mutually_exclusive_group()
    keep.add_argument("--pattern", choices=list("ABCDEF"), help="upstream MBV2-1.4 pattern")
    keep.add_argument("--keep", help="comma-separated keep-list, 1 = keep (19 block or 35 layer units)")
    s.add_argument("--pretrained", default="none", help="none | auto | weights path (with --arch)")
    s.add_argument("--small-input", action="store_true", help="stride-1 stem (with --arch)")
    s.add_argument("--input-size", type=int, default=None, help="default: config data.image_size (224 with --arch)")
    s.add_argument("--samples", type=int, default=8, help="random inputs of the error check")
    s.add_argument("--out", default=None, help="merged checkpoint to write (with --checkpoint)")
    s.add_argument("--report", default=None, help="JSON report to write")
    s.add_argument("--onnx", default=None, help="also export ONNX here and check it with onnxruntime")
    s = add("bench-device", cmd_bench_device, "CPU latency (and GPU throughput) against the dense network")
    s.add_argument("--model", required=True, help="deployed (merged) checkpoint")
    s.add_argument("--dense", required=True, help="dense deployed checkpoint, timed in the same run")
    s.add_argument("--out", required=True)
    s = add("bench-mpc", cmd_bench_mpc, "two-party CrypTen inference: latency, bytes, rounds")
    s.add_argument("--model", required=True, help="deployed (merged) checkpoint")
    s.add_argument("--out", required=True)
    s = add("cost-table", cmd_cost_table, "per-unit cost table (cpu, gpu measured; mpc cost model)")
    s.add_argument("--target", choices=["cpu", "gpu", "mpc"], required=True)
    s.add_argument("--granularity", choices=["block", "layer"], default="block")
    s.add_argument("--out", required=True)
    s = add("profile", cmd_profile, "top-1, params, MACs and nonlinear counts of a cell's model")
    s.add_argument("--model", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--granularity", required=True)
    s.add_argument("--keep", type=float, required=True)
    s.add_argument("--input-size", type=int, default=None)
    s.add_argument("--out", default=None)
    s = add("summarize", cmd_summarize, "collect cell rows (JSON) into a summary CSV")
    s.add_argument("rows", nargs="+", help="per-cell row JSON files")
    s.add_argument("--out", required=True)
    s = add("plots", cmd_plots, "accuracy vs cost plots with Pareto fronts from a summary CSV")
    s.add_argument("--summary", required=True)
    s.add_argument("--out", required=True, help="folder for the PNGs")
    return p


def main(argv: list[str] | None = None, config: dict | None = None, log_file: str | None = None) -> int:
    """Run one subcommand; ``config`` (a validated dict) replaces ``--config`` when called from Python.
    Under torchrun (WORLD_SIZE > 1) the process group is set up first (NCCL on GPUs, gloo on CPUs)."""
    args = parser().parse_args(argv)
    args.config_dict = config
    from .train import configure, init_distributed

    configure(args.threads, log_file)
    try:
        with init_distributed():
            result = args.fn(args)
    except ConfigError as err:
        print(f"depthshrinker {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
