"""Activation gates: the DepthShrinker stage-1 top-k gate and the fixed keep-masks of stage 2.

Search (Fu et al. 2022, Sec. 3.2): one score ``s_i`` per unit, ``ŝ = clamp(s, 0, 1)``; every step the
``round(keep_ratio * L)`` units with the SMALLEST scores keep their activation (``b_i = 0``), the others are
replaced by the identity (``b_i = 1``). The straight-through estimator

    y = act(x) + (x - act(x)) * (b - ŝ.detach() + ŝ)

is exactly ``act(x)`` or exactly ``x`` in the forward pass and passes ``∂L/∂b`` to the scores.
``keep_ratio`` is what upstream calls ``L0_SPARSITY``: the fraction of units that KEEP their activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from .models import Unit, set_pad_first


def num_kept(keep_ratio: float, num_units: int) -> int:
    """Units that keep their activation: round(keep_ratio * L), at least 0 and at most L."""
    return max(0, min(num_units, round(keep_ratio * num_units)))


def keep_from_scores(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Bool mask, True = keep: the ``num_kept`` smallest scores, ties broken by unit index (stable sort)."""
    order = torch.argsort(scores.detach(), stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[: num_kept(keep_ratio, scores.numel())]] = True
    return keep


class TopKGates(nn.Module):
    """The L unit scores of a DepthShrinker search; calling it gives the removal indicator r (1 = identity)."""

    def __init__(self, num_units: int, keep_ratio: float):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.scores = nn.Parameter(torch.zeros(num_units))

    def keep(self) -> torch.Tensor:
        return keep_from_scores(self.scores, self.keep_ratio)

    def soft(self) -> torch.Tensor:
        """ŝ = clamp(s, 0, 1) whose gradient is passed straight through. With torch's clamp, scores that start
        at 0 get no gradient, and a score that once leaves [0, 1] is frozen there for good; passing it keeps
        every score a running sum of its gradient signal, which is what the top-k ranks."""
        s = self.scores
        return s + (s.clamp(0, 1) - s).detach()

    def forward(self) -> torch.Tensor:
        soft = self.soft()
        hard = (~self.keep()).to(soft.dtype)
        return hard - soft.detach() + soft


class GatedAct(nn.Module):
    """An activation whose unit is switched on or off by ``TopKGates`` (the straight-through form above)."""

    def __init__(self, act: nn.Module, gates: TopKGates, unit: int):
        super().__init__()
        self.fn = F.relu6 if isinstance(act, nn.ReLU6) else F.relu  # never in place: x is needed afterwards
        self._gates = (gates,)  # a plain reference: the gates are registered once, on the model
        self.unit = unit

    def removal(self) -> torch.Tensor:
        return self._gates[0]()[self.unit]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fn(x)
        return a + (x - a) * self.removal()

    def active_fraction(self) -> float:
        """Fraction of this activation's elements that are nonlinear (counted by ``counting``)."""
        return 1.0 - float(self.removal().detach())


def install_topk_gates(model: nn.Module, units: list[Unit], keep_ratio: float) -> TopKGates:
    """Replace every activation of ``units`` by a GatedAct sharing one TopKGates, registered as
    ``model.ds_gates`` (so its scores train with the weights, without weight decay)."""
    gates = TopKGates(len(units), keep_ratio)
    model.ds_gates = gates
    for i, unit in enumerate(units):
        for path in unit.acts:
            model.set_submodule(path, GatedAct(model.get_submodule(path), gates, i))
    return gates


def _free_act_hook(block: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return block.free_act(output)


def add_free_act(block: nn.Module) -> None:
    """ReLU6 after the residual add of a block whose activations were all removed (upstream ADD_FINAL_ACT),
    applied by a forward hook so that the block's state_dict keys do not change."""
    block.free_act = nn.ReLU6()
    block.register_forward_hook(_free_act_hook)


def apply_keep(model: nn.Module, units: list[Unit], keep: list[int], free_act: str = "none") -> nn.Module:
    """Stage-2 form of a mask: removed units become ``nn.Identity``; an IR block whose expansion activation is
    removed is put in pad-first form (so it merges exactly, see ``models.set_pad_first``); with
    ``free_act='relu6'`` a fully linear block gets a ReLU6 after its residual add."""
    if len(keep) != len(units):
        raise ValueError(f"mask has {len(keep)} entries, the model {len(units)} units")
    removed = {path for unit, k in zip(units, keep) if not k for path in unit.acts}
    for path in removed:
        model.set_submodule(path, nn.Identity())
    blocks = {unit.block for unit in units if unit.block is not None}
    for path in sorted(blocks):
        block = model.get_submodule(path)
        acts = [p for unit in units if unit.block == path for p in unit.acts]
        if isinstance(block, InvertedResidual) and f"{path}.bn1.act" in removed:
            set_pad_first(block)
        if free_act == "relu6" and acts and all(p in removed for p in acts):
            add_free_act(block)
    return model
