"""A network from its checkpoint spec: every spec kind's builder, imported downward (no registration).

Spec of a timm-based network::

    {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": true,
     "gates": null | {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, ...},  # stage 1
     "mask":  null | {"granularity": "block", "keep": [0, 1, ...], "free_act": "none"}     # stage 2
                   | {"method": "snl", "granularity": "pixel", "shapes": {act path: shape}}}

``kind: "plain"`` is a merged network (``nets.plain``), ``kind: "pruned"`` a channel-pruned one (``nets.cut``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from depthshrinker.base.checkpoint import load
from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.plan import apply_mask_spec
from depthshrinker.nets.cut import build_pruned
from depthshrinker.nets.gates import install_search_gates
from depthshrinker.nets.plain import PlainNet
from depthshrinker.nets.registry import create_model


def build_timm(spec: dict) -> nn.Module:
    model = create_model(spec["arch"], spec["num_classes"], spec.get("small_input", False), width=spec.get("width"))
    if spec.get("gates"):
        install_search_gates(model, {"method": "depthshrinker", **spec["gates"]})
    if spec.get("mask"):
        apply_mask_spec(model, spec["mask"])
    return model


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {"timm": build_timm, "plain": PlainNet, "pruned": build_pruned}


def build(spec: dict) -> nn.Module:
    """A fresh network (random weights) from its spec."""
    kind = spec.get("kind", "timm")
    if kind not in BUILDERS:
        raise ConfigError(f"checkpoint spec: unknown kind '{kind}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](spec)


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, spec) from a checkpoint."""
    ckpt = load(path)
    model = build(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["spec"]
