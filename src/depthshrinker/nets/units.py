"""Activation units (what one DepthShrinker gate controls, Fu et al., "DepthShrinker", ICML 2022, Sec. 3.1): at
``block`` granularity one unit per block, both ReLU6s of an inverted-residual (IR) block sharing it, plus the
stem and head activations (19 units for MobileNetV2); at ``layer`` granularity every activation is a unit
(35 for MobileNetV2). Units are found on the network's IR (``nets.ir``).
"""
from __future__ import annotations

from torch import nn

from depthshrinker.nets.ir import Unit, extract


def activation_units(model: nn.Module, granularity: str = "block") -> list[Unit]:
    """The activation units of ``model`` in forward order, at ``block`` or ``layer`` granularity, found on its
    traced IR (``nets.ir``), so any supported CNN has them, not only timm's inverted-residual family."""
    return extract(model).units(granularity)
