"""Activation units (what one DepthShrinker gate controls, Fu et al., "DepthShrinker", ICML 2022, Sec. 3.1): at
``block`` granularity one unit per block, both ReLU6s of an inverted-residual (IR) block sharing it, plus the
stem and head activations (19 units for MobileNetV2); at ``layer`` granularity every activation is a unit
(35 for MobileNetV2). Units are found on the network's IR (``nets.ir``); pad-first form of a block.
"""
from __future__ import annotations

from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from depthshrinker.nets.ir import Unit, extract


def activation_units(model: nn.Module, granularity: str = "block") -> list[Unit]:
    """The activation units of ``model`` in forward order, at ``block`` or ``layer`` granularity, found on its
    traced IR (``nets.ir``), so any supported CNN has them, not only timm's inverted-residual family."""
    return extract(model).units(granularity)


def set_pad_first(block: InvertedResidual) -> None:
    """Move the depthwise conv's zero padding in front of the 1x1 expansion (pad-first form).

    With the activation after the expansion removed, ``dw(pad(pw(x)))`` differs from the merged dense conv at
    the borders by the expansion's bias; ``dw_nopad(pw(pad(x)))`` equals it exactly (a 1x1 conv of the zero
    padding followed by BatchNorm yields the folded bias, as in the merged conv)."""
    pad = block.conv_dw.padding
    if isinstance(pad, str) or tuple(block.conv_pw.kernel_size) != (1, 1):
        raise ValueError("pad-first needs a 1x1 expansion and a numeric depthwise padding")
    if tuple(pad) == (0, 0):
        return
    block.conv_pw.padding = tuple(pad)
    block.conv_dw.padding = (0, 0)
