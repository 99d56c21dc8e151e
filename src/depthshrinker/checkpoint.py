"""Checkpoints: a state_dict plus a JSON-able spec that rebuilds the architecture (never a pickled module),
loadable with ``torch.load(weights_only=True)``, written atomically.

Spec of a timm-based network::

    {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": true,
     "gates": null | {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4, ...},  # stage 1
     "mask":  null | {"granularity": "block", "keep": [0, 1, ...], "free_act": "none"}     # stage 2
                   | {"method": "snl", "granularity": "pixel", "shapes": {act path: shape}}}

Other kinds (the merged network) register a builder in ``BUILDERS``.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ConfigError
from .gates import apply_mask_spec, install_search_gates
from .models import create_model


def build_timm(spec: dict) -> nn.Module:
    model = create_model(spec["arch"], spec["num_classes"], spec.get("small_input", False), width=spec.get("width"))
    if spec.get("gates"):
        install_search_gates(model, {"method": "depthshrinker", **spec["gates"]})
    if spec.get("mask"):
        apply_mask_spec(model, spec["mask"])
    return model


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {"timm": build_timm}
BUILDER_MODULES = {"plain": "depthshrinker.plain", "pruned": "depthshrinker.pruning"}  # higher layers register their kinds when imported


def build(spec: dict) -> nn.Module:
    """A fresh network (random weights) from its spec."""
    kind = spec.get("kind", "timm")
    if kind not in BUILDERS and kind in BUILDER_MODULES:
        importlib.import_module(BUILDER_MODULES[kind])
    if kind not in BUILDERS:
        raise ConfigError(f"checkpoint spec: unknown kind '{kind}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](spec)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: str | Path, model: nn.Module, spec: dict, **extra) -> None:
    """Save ``{"state_dict", "spec" (JSON text), **extra}``; extras must be tensors or plain Python values."""
    json.dumps(spec)  # fail early on a spec that is not JSON-able
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"state_dict": state, "spec": json.dumps(spec), **extra}, path)


def load(path: str | Path) -> dict:
    """The raw checkpoint dict with ``spec`` parsed; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["spec"] = json.loads(ckpt["spec"])
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ConfigError(f"checkpoint {path} is not a DepthShrinker checkpoint ({type(err).__name__}: {err})") \
            from None
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, spec) from a checkpoint."""
    ckpt = load(path)
    model = build(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["spec"]
