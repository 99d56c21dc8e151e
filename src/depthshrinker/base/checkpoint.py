"""Checkpoints: a state_dict plus a JSON-able spec that rebuilds the architecture (never a pickled module),
loadable with ``torch.load(weights_only=True)``, written atomically. ``deploy.load`` builds a network from a
spec (the spec kinds are documented there).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from depthshrinker.base.config import ConfigError


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
