"""``depthshrinker`` command line: one subcommand per pipeline stage, each calling the same public function
as the Snakemake rule (so a stage run by hand writes the same file)."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


def _config(args) -> dict:
    return args.config_dict if args.config_dict is not None else load_config(args.config)


def cmd_train_dense(args):
    from .baselines import train_dense

    return {"top1": train_dense(_config(args), args.out)["top1"]}


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


def cmd_profile(args):
    from .report import profile_cell

    config = _config(args)
    return profile_cell(args.model, args.method, args.granularity, args.keep, config["data"]["image_size"], args.out)


def cmd_summarize(args):
    from .report import summarize

    return {"rows": len(summarize(args.rows, args.out)), "out": args.out}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="depthshrinker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        return s

    def with_config(s):
        s.add_argument("--config", help="YAML config (validated against the schema; defaults filled)")
        s.add_argument("--threads", type=int, default=None, help="CPU threads (default: config `threads`)")
        return s

    s = with_config(add("train-dense", cmd_train_dense, "train the dense teacher"))
    s.add_argument("--out", required=True, help="checkpoint to write (metrics go next to it as .json)")
    s = with_config(add("search", cmd_search, "stage 1: search which activation units to keep"))
    s.add_argument("--dense", required=True, help="dense checkpoint")
    s.add_argument("--method", choices=["depthshrinker", "snl"], default="depthshrinker")
    s.add_argument("--granularity", choices=["block", "layer", "channel", "pixel", "element"], default="block")
    s.add_argument("--costs", default=None, help="cost table CSV for a latency-aware DepthShrinker search")
    s.add_argument("--keep", type=float, required=True, help="keep ratio: fraction of units that KEEP their act")
    s.add_argument("--out", required=True)
    s = with_config(add("extract", cmd_extract, "extract the keep-list of a search checkpoint to JSON"))
    s.add_argument("--search", required=True, help="search checkpoint")
    s.add_argument("--out", required=True, help="mask JSON to write")
    s = with_config(add("finetune", cmd_finetune, "stage 2: finetune the shrunk network with distillation"))
    s.add_argument("--dense", required=True, help="dense checkpoint (student init and teacher)")
    s.add_argument("--mask", required=True, help="mask JSON from `extract`")
    s.add_argument("--out", required=True)
    s = with_config(add("profile", cmd_profile, "top-1, params, MACs and nonlinear counts of a cell's model"))
    s.add_argument("--model", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--granularity", required=True)
    s.add_argument("--keep", type=float, required=True)
    s.add_argument("--out", default=None)
    s = with_config(add("summarize", cmd_summarize, "collect cell rows (JSON) into a summary CSV"))
    s.add_argument("rows", nargs="+", help="per-cell row JSON files")
    s.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None, config: dict | None = None, log_file: str | None = None) -> int:
    """Run one subcommand; ``config`` (a validated dict) replaces ``--config`` when called from Python.
    Under torchrun (WORLD_SIZE > 1) the process group is set up first (NCCL on GPUs, gloo on CPUs)."""
    args = parser().parse_args(argv)
    args.config_dict = config
    from .train import configure, init_distributed

    configure(getattr(args, "threads", None), log_file)
    try:
        with init_distributed():
            result = args.fn(args)
    except ConfigError as err:
        print(f"depthshrinker {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
