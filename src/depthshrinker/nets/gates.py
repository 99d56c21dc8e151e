"""Activation gates: DepthShrinker's top-k unit gate, the SNL baselines (channel/pixel top-k, element soft
masks), and the fixed masks of stage 2.

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
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.nets.ir import ActModule, Unit
from depthshrinker.nets.units import activation_units


def _act_at(model: nn.Module, path: str) -> nn.Module:
    """The module of activation ``path``; refused in one line where ``path`` names none (an activation module
    called at several sites, e.g. torchvision ResNet's shared ``relu``, cannot be gated apart)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"activation {path!r} is one of several calls of a shared module: give each activation "
                          "its own module to gate it (e.g. timm's resnet, not torchvision's)") from None


def replace_act(model: nn.Module, path: str, make) -> nn.Module:
    """Put ``make(act)`` where activation ``path`` is, and return it."""
    new = make(_act_at(model, path))
    model.set_submodule(path, new)
    return new


def num_kept(keep_ratio: float, num_units: int) -> int:
    """Units that keep their activation: round(keep_ratio * L), at least 0 and at most L."""
    return max(0, min(num_units, round(keep_ratio * num_units)))


def keep_from_scores(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Bool mask, True = keep: the ``num_kept`` smallest scores, ties broken by unit index (stable sort)."""
    order = torch.argsort(scores.detach(), stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[: num_kept(keep_ratio, scores.numel())]] = True
    return keep


def is_gate_param(name: str) -> bool:
    """Gate scores and SNL masks: trained with the weights, but never weight-decayed or counted as weights."""
    return name.rsplit(".", 1)[-1] in ("scores", "alpha")


def straight_through(hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``b - ŝ.detach() + ŝ`` with ŝ = clamp(s, 0, 1) whose gradient is passed straight through: the forward
    value is exactly ``b``. With torch's own clamp, scores that start at 0 get no gradient and a score that
    once leaves [0, 1] is frozen for good; passing it keeps every score a running sum of its gradient signal,
    which is what the top-k ranks."""
    return hard.to(scores.dtype) + (scores - scores.detach())


class GateAct(ActModule):
    """An activation blended with the identity: ``y = act(x) + (x - act(x)) * r`` where ``r`` (the removal
    indicator, broadcast over the input) is 0 to keep the activation and 1 to remove it."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.kind = "relu6" if isinstance(act, nn.ReLU6) else "relu"

    def removal(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu6(x) if self.kind == "relu6" else F.relu(x)  # never in place: x is needed afterwards
        return a + (x - a) * self.removal()

    @torch.no_grad()
    def active_elements(self, x: torch.Tensor) -> int:
        """Elements of one input ``x`` (C, H, W) that still pass through the activation."""
        return int((self.removal().detach().expand(1, *x.shape) < 0.5).sum())


class TopKGates(nn.Module):
    """The L unit scores of a DepthShrinker search; calling it gives the removal indicators r (1 = identity)."""

    def __init__(self, num_units: int, keep_ratio: float):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.scores = nn.Parameter(torch.zeros(num_units))

    def keep(self) -> torch.Tensor:
        return keep_from_scores(self.scores, self.keep_ratio)

    def forward(self) -> torch.Tensor:
        return straight_through(~self.keep(), self.scores)


class GatedAct(GateAct):
    """One activation of a DepthShrinker unit, switched by the model's shared ``TopKGates``."""

    def __init__(self, act: nn.Module, gates: TopKGates, unit: int):
        super().__init__(act)
        self._gates = (gates,)  # a plain reference: the gates are registered once, on the model
        self.unit = unit

    def removal(self) -> torch.Tensor:
        return self._gates[0]()[self.unit]


class LayerTopKGate(GateAct):
    """SNL baseline of the private-inference fork: one score per channel (1, C, 1, 1) or per pixel shared across
    channels (1, 1, H, W); the same keep ratio in every layer, the same hard top-k straight-through gate."""

    def __init__(self, act: nn.Module, shape: tuple[int, ...], keep_ratio: float):
        super().__init__(act)
        self.keep_ratio = keep_ratio
        self.scores = nn.Parameter(torch.zeros(shape))

    def removal(self) -> torch.Tensor:
        keep = keep_from_scores(self.scores.flatten(), self.keep_ratio).view(self.scores.shape)
        return straight_through(~keep, self.scores)


class SoftMaskAct(GateAct):
    """SNL (Cho et al., ICML 2022): a continuous mask per element, ``y = relu(x)·α + (1 − α)·x``, α from 1."""

    threshold = 0.01  # SNL binarizes α > 0.01

    def __init__(self, act: nn.Module, shape: tuple[int, ...]):
        super().__init__(act)
        self.alpha = nn.Parameter(torch.ones(shape))

    def removal(self) -> torch.Tensor:
        return 1 - self.alpha

    @torch.no_grad()
    def active_elements(self, x: torch.Tensor) -> int:
        return int((self.alpha.expand(1, *x.shape) > self.threshold).sum())


class MaskedAct(GateAct):
    """A fixed binary keep-mask (1 = keep the activation) of any shape broadcastable to the input (SNL stage 2)."""

    def __init__(self, act: nn.Module, shape: tuple[int, ...], persistent: bool = True):
        super().__init__(act)
        self.register_buffer("mask", torch.ones(shape), persistent=persistent)

    def removal(self) -> torch.Tensor:
        return 1 - self.mask


def install_topk_gates(model: nn.Module, units: list[Unit], keep_ratio: float) -> TopKGates:
    """Replace every activation of ``units`` by a GatedAct sharing one TopKGates, registered as
    ``model.ds_gates`` (so its scores train with the weights, without weight decay)."""
    gates = TopKGates(len(units), keep_ratio)
    model.ds_gates = gates
    for i, unit in enumerate(units):
        for path in unit.acts:
            replace_act(model, path, lambda act: GatedAct(act, gates, i))
    return gates


SNL_SHAPES = {"channel": lambda c, h, w: (1, c, 1, 1), "pixel": lambda c, h, w: (1, 1, h, w),
              "element": lambda c, h, w: (1, c, h, w)}


@torch.no_grad()
def activation_shapes(model: nn.Module, paths: list[str], input_size: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of the input of each activation module in ``paths``, from one forward pass."""
    shapes, handles = {}, []
    for path in paths:
        hook = (lambda p: lambda _m, inputs, _o: shapes.__setitem__(p, tuple(inputs[0].shape[1:])))(path)
        handles.append(_act_at(model, path).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def install_layer_gates(model: nn.Module, units: list[Unit], granularity: str, keep_ratio: float,
                        input_size: int) -> dict[str, GateAct]:
    """SNL gates on every activation: ``channel``/``pixel`` top-k gates at ``keep_ratio`` in every layer, or
    ``element`` soft masks (their global budget is enforced by the search)."""
    paths = [path for unit in units for path in unit.acts]
    shapes = activation_shapes(model, paths, input_size)
    gates = {}
    for path in paths:
        shape = SNL_SHAPES[granularity](*shapes[path])
        gates[path] = replace_act(model, path, lambda act: SoftMaskAct(act, shape) if granularity == "element"
                                  else LayerTopKGate(act, shape, keep_ratio))
    return gates


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Stage-2 form of SNL masks: each named activation becomes a MaskedAct holding its binary mask."""
    for path, mask in masks.items():
        replace_act(model, path, lambda act: MaskedAct(act, tuple(mask.shape))).mask.copy_(mask)
    return model


class SNLBudget(nn.Module):
    """SNL's λ schedule and stop rule (Cho et al., ICML 2022, Algorithm 1), kept as buffers so that a resumed
    search continues it: the loss gets ``λ Σ_l ‖α_l‖₁``; after an epoch whose count of active elements
    (α > ``SoftMaskAct.threshold``) is not a new low, λ grows ×``growth`` unless that epoch is one of the first
    ``warmup`` (SNL: 5); the search stops once the count is within ``budget``."""

    def __init__(self, budget: int, lam: float, growth: float, warmup: int = 0, total: int | None = None):
        super().__init__()
        self.growth, self.warmup = growth, warmup
        self.register_buffer("budget", torch.tensor(budget))
        self.register_buffer("lam", torch.tensor(lam, dtype=torch.float64))
        self.register_buffer("best", torch.tensor(torch.iinfo(torch.int64).max if total is None else total))

    def penalty(self, masks: list[SoftMaskAct]) -> torch.Tensor:
        return self.lam.float() * sum(m.alpha.abs().sum() for m in masks)

    @staticmethod
    @torch.no_grad()
    def count(masks: list[SoftMaskAct]) -> int:
        """Active elements: α above SNL's binarization threshold (element masks have the input's shape)."""
        return int(sum((m.alpha > m.threshold).sum() for m in masks))

    def reached(self, count: int) -> bool:
        return count <= int(self.budget)

    def end_epoch(self, epoch: int, count: int) -> bool:
        """After epoch ``epoch`` (0-based) with ``count`` active elements: record a new low, or else grow λ
        once past the warm-up; True once the budget is met."""
        if count < int(self.best):
            self.best.fill_(count)
        elif epoch >= self.warmup:
            self.lam *= self.growth
        return self.reached(count)


def install_search_gates(model: nn.Module, gates: dict) -> None:
    """Put the search gates described by a checkpoint spec's ``gates`` entry on ``model``."""
    if gates["method"] == "depthshrinker":
        install_topk_gates(model, activation_units(model, gates["granularity"]), gates["keep_ratio"])
        return
    install_layer_gates(model, activation_units(model, "layer"), gates["granularity"], gates["keep_ratio"],
                        gates["input_size"])
    if gates["granularity"] == "element":
        model.snl = SNLBudget(gates["budget"], gates["lambda"], gates["growth"], gates.get("warmup", 0),
                              gates.get("total"))


def _free_act_hook(block: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return block.free_act(output)


def add_free_act(block: nn.Module) -> None:
    """ReLU6 after the residual add of a block whose activations were all removed (upstream ADD_FINAL_ACT),
    applied by a forward hook so that the block's state_dict keys do not change."""
    block.free_act = nn.ReLU6()
    block.register_forward_hook(_free_act_hook)


def remove_units(model: nn.Module, units: list[Unit], keep: list[int], free_act: str = "none") -> nn.Module:
    """Stage-2 form of a mask: removed units become ``nn.Identity``; with ``free_act='relu6'`` a fully linear
    block gets a ReLU6 after its residual add."""
    if len(keep) != len(units):
        raise ValueError(f"mask has {len(keep)} entries, the model {len(units)} units")
    removed = {path for unit, k in zip(units, keep) if not k for path in unit.acts}
    for path in removed:
        replace_act(model, path, lambda act: nn.Identity())
    for path in sorted({unit.block for unit in units if unit.block is not None}):
        acts = [p for unit in units if unit.block == path for p in unit.acts]
        if free_act == "relu6" and acts and all(p in removed for p in acts):
            add_free_act(model.get_submodule(path))
    return model
