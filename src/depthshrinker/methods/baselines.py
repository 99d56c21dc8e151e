"""Baselines trained through the same engine: the dense teacher and the uniform width multipliers (the searched
channel pruning lives in ``pruning``)."""
from __future__ import annotations

from pathlib import Path

import torch

from depthshrinker.base.data import build_loaders
from depthshrinker.deploy.load import load_model
from depthshrinker.nets.registry import create_model
from depthshrinker.train import train_stage


def train_dense(config: dict, out: str | Path) -> dict:
    """Train (or finetune from ImageNet weights) the dense network that every cell starts from and distils
    from; writes ``out`` and its metrics ``.json``."""
    loaders = build_loaders(config["data"], config["seed"])
    m = config["model"]
    torch.manual_seed(config["seed"])  # the random init (and a new classifier) is part of the run
    model = create_model(m["arch"], loaders.num_classes, m["small_input"], m["pretrained"])
    spec = {"kind": "timm", "arch": m["arch"], "num_classes": loaders.num_classes, "small_input": m["small_input"]}
    return train_stage(config, "dense", model, spec, out, loaders, reference=model)  # agrees with itself


def train_uniform(config: dict, width: float, dense_ckpt: str | Path, out: str | Path) -> dict:
    """Train ``model.arch`` at channel multiplier ``width`` from random init with the ``stages.uniform`` recipe,
    distilled from the dense teacher when ``stages.distill.enabled``; writes ``out`` and its ``.json``."""
    loaders = build_loaders(config["data"], config["seed"])
    m = config["model"]
    torch.manual_seed(config["seed"])
    model = create_model(m["arch"], loaders.num_classes, m["small_input"], width=width)
    spec = {"kind": "timm", "arch": m["arch"], "num_classes": loaders.num_classes, "small_input": m["small_input"],
            "width": width}
    distill = config["stages"]["distill"]["enabled"]
    teacher = load_model(dense_ckpt)[0]
    return train_stage(config, "uniform", model, spec, out, loaders, teacher=teacher if distill else None,
                       reference=teacher, distill=distill, desc=f"uniform {width}")
