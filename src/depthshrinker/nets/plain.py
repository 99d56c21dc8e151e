"""The plain network: BatchNorm folded into biased convolutions, described by a JSON spec.

Every backbone (timm MobileNetV2 / EfficientNet-Lite, masked, pruned or not) converts to this one form, and
merging, the device benchmarks and the MPC engine all work on it::

    stem block -> blocks ... -> head block -> global average pool -> linear classifier

A block is a chain of convolutions, each followed by its activation (``relu6`` or ``none``), an optional
residual add of the block input, and an optional activation after the add (``free_act``); an SNL-masked
activation carries its public mask in the spec (``"mask": {"shape", "ones", "bits"}``), and one whose mask keeps
nothing is written as ``act: none`` (DESIGN "One set of counts": it counts, costs and merges as linear)::

    {"convs": [{"in": 16, "out": 96, "kernel": 1, "stride": 1, "padding": 1, "groups": 1, "act": "none"}, ...],
     "residual": true, "free_act": "none"}

BatchNorm folding (Ioffe & Szegedy 2015, inference form): ``W' = W·γ/√(σ²+ε)``, ``b' = β − μ·γ/√(σ²+ε)``.
A pad-first block (see ``units.set_pad_first``) keeps its padding on the 1x1 expansion. The merge plan a keep-list
was applied with (``plan.apply_keep``) is carried in the spec as ``merge_plan`` for ``merge.merge_plain``.
"""
from __future__ import annotations

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from depthshrinker.base.bits import decode_bits, encode_bits
from depthshrinker.base.config import ConfigError
from depthshrinker.nets.gates import MaskedAct

ACTS = {"none": nn.Identity, "relu6": nn.ReLU6, "relu": nn.ReLU}


def conv_spec(conv: nn.Conv2d, act: nn.Module) -> dict:
    """A conv and its activation; an SNL-masked activation carries its (public) mask as packed bits, and one whose
    mask keeps nothing is linear (``act: none``): it costs nothing and merges like any linear run."""
    if isinstance(conv.padding, str):
        raise ConfigError(f"plain network: string padding '{conv.padding}' is not supported")
    spec = {"in": conv.in_channels, "out": conv.out_channels, "kernel": conv.kernel_size[0],
            "stride": conv.stride[0], "padding": conv.padding[0], "groups": conv.groups, "act": _act_name(act)}
    if isinstance(act, MaskedAct):
        ones = int(act.mask.sum())
        if ones:
            spec["mask"] = {"shape": list(act.mask.shape), "ones": ones, "bits": encode_bits(act.mask)}
        else:
            spec["act"] = "none"
    return spec


def act_module(conv: dict) -> nn.Module:
    """The activation of a conv spec: plain, or masked (its mask from the spec, not the state_dict)."""
    if not conv.get("mask"):
        return ACTS[conv["act"]]()
    mask = conv["mask"]
    gate = MaskedAct(ACTS[conv["act"]](), tuple(mask["shape"]), persistent=False)
    gate.mask.copy_(decode_bits(mask["bits"], mask["shape"]))
    return gate


class PlainBlock(nn.Module):
    """Convolutions (with bias) and activations in a chain, plus the residual add and the free activation."""

    def __init__(self, spec: dict):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c["in"], c["out"], c["kernel"], c["stride"], c["padding"], groups=c["groups"], bias=True)
            for c in spec["convs"])
        self.acts = nn.ModuleList(act_module(c) for c in spec["convs"])
        self.residual = bool(spec.get("residual", False))
        self.free_act = ACTS[spec.get("free_act", "none")]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv, act in zip(self.convs, self.acts):
            y = act(conv(y))
        if self.residual:
            y = y + x
        return self.free_act(y)


class PlainNet(nn.Module):
    """Blocks (stem and head included), global average pooling and a linear classifier."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(PlainBlock(b) for b in spec["blocks"])
        self.classifier = nn.Linear(spec["classifier"]["in"], spec["classifier"]["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean((2, 3)))




@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one biased convolution: ``W·γ/√(σ²+ε)``, ``β + (b − μ)·γ/√(σ²+ε)``
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``)."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias)
    return weight.detach(), bias.detach()


def _act_name(module: nn.Module) -> str:
    if isinstance(module, MaskedAct):
        return module.kind
    if isinstance(module, nn.Identity):
        return "none"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.ReLU):
        return "relu"
    raise ConfigError(f"plain network: activation {type(module).__name__} is not supported (only ReLU/ReLU6; "
                      "a search checkpoint must be finetuned first)")


def _convs_of(module: nn.Module) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, BatchNormAct) pairs of a timm stem, block or head, in forward order."""
    if isinstance(module, InvertedResidual):
        return [(module.conv_pw, module.bn1), (module.conv_dw, module.bn2), (module.conv_pwl, module.bn3)]
    if isinstance(module, DepthwiseSeparableConv):
        return [(module.conv_dw, module.bn1), (module.conv_pw, module.bn2)]
    raise ConfigError(f"plain network: block type {type(module).__name__} is not supported")


def _check_plain(module: nn.Module) -> None:
    for name in ("se", "aa"):
        if not isinstance(getattr(module, name, nn.Identity()), nn.Identity):
            raise ConfigError(f"plain network: {type(module).__name__}.{name} is not supported")


def _layout(model: nn.Module) -> list[tuple[list[tuple[nn.Conv2d, nn.Module]], bool, str]]:
    """The PlainNet blocks of a timm model: ((conv, BatchNormAct) pairs, residual, free activation) each."""
    pairs: list[tuple[list[tuple[nn.Conv2d, nn.Module]], bool, str]] = [([(model.conv_stem, model.bn1)], False, "none")]
    for stage in model.blocks:
        for block in stage:
            _check_plain(block)
            free = _act_name(block.free_act) if hasattr(block, "free_act") else "none"
            pairs.append((_convs_of(block), bool(getattr(block, "has_skip", False)), free))
    pairs.append(([(model.conv_head, model.bn2)], False, "none"))
    return pairs


def act_positions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path of each activation of a timm model -> (PlainNet block, conv) it follows."""
    where = {id(bn.act): (i, j) for i, (convs, _, _) in enumerate(_layout(model)) for j, (_, bn) in enumerate(convs)}
    return {path: where[id(m)] for path, m in model.named_modules() if id(m) in where}


def plain_spec(model: nn.Module) -> dict:
    """The PlainNet spec of a timm EfficientNet-family model (no weights folded): what merge plans are made on.
    A merge plan recorded on the model (``plan.apply_keep``) travels with it as ``merge_plan``."""
    spec = {"kind": "plain", "num_classes": model.classifier.out_features,
            "blocks": [{"convs": [conv_spec(c, bn.act) for c, bn in convs], "residual": res,
                        "free_act": free} for convs, res, free in _layout(model)],
            "classifier": {"in": model.classifier.in_features, "out": model.classifier.out_features}}
    if getattr(model, "merge_plan", None) is not None:
        spec["merge_plan"] = model.merge_plan
    return spec


def to_plain(model: nn.Module) -> PlainNet:
    """Fold a timm EfficientNet-family model (MobileNetV2, EfficientNet-Lite; masked or pruned) into a PlainNet
    that computes the same function in eval mode."""
    pairs = _layout(model)
    net = PlainNet(plain_spec(model))
    with torch.no_grad():
        for (convs, _, _), block in zip(pairs, net.blocks):
            for (conv, bn), target in zip(convs, block.convs):
                weight, bias = fold_bn(conv, bn)
                target.weight.copy_(weight)
                target.bias.copy_(bias)
        net.classifier.load_state_dict(model.classifier.state_dict())
    return net.eval()
