"""A network from its checkpoint spec: every spec kind's builder, imported downward (no registration).

Spec of a timm-based network::

    {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": true,
     "gates": null | {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, ...},  # stage 1
     "mask":  null | {"granularity": "block", "keep": [0, 1, ...], "free_act": "none"}     # stage 2
                   | {"method": "snl", "granularity": "pixel", "shapes": {act path: shape}}
                   | {"method": "segments", "segments": [[s, e], ...], "acts": [p, ...], "added": "relu6",
                      "dropped": [p, ...]}}

A ``segments`` mask (Kim et al.'s merge segments) builds the network as its ``segment_form``, a ``ChainNet``.

``kind: "plain"`` is a merged network (``nets.plain``), ``kind: "pruned"`` a channel-pruned one (``nets.cut``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from depthshrinker.base.checkpoint import load
from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.plan import apply_mask_spec
from depthshrinker.deploy.segment_form import segment_form
from depthshrinker.nets.cut import build_pruned
from depthshrinker.nets.gates import install_search_gates
from depthshrinker.nets.plain import PlainNet
from depthshrinker.nets.registry import create_model


def apply_mask(model: nn.Module, mask: dict, policy: str | dict = "macs") -> nn.Module:
    """A checkpoint spec's ``mask`` applied to ``model``: in place (``plan.apply_mask_spec``), or, for
    ``segments``, the model's ``segment_form``."""
    if mask.get("method") == "segments":
        return segment_form(model, [tuple(s) for s in mask["segments"]], set(mask["acts"]), mask["added"],
                            set(mask.get("dropped", ())))
    return apply_mask_spec(model, mask, policy)


def build_timm(spec: dict) -> nn.Module:
    model = create_model(spec["arch"], spec["num_classes"], spec.get("small_input", False), width=spec.get("width"))
    if spec.get("gates"):
        install_search_gates(model, {"method": "depthshrinker", **spec["gates"]})
    return apply_mask(model, spec["mask"]) if spec.get("mask") else model


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
