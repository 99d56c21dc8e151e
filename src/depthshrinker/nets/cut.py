"""Channel surgery on any registered network with torch-pruning's DependencyGraph (Fang et al., CVPR 2023): it
finds the coupled channels (residual-tied block outputs, projection shortcuts, an expansion and its depthwise
conv, the head conv and the classifier input) and every group keeps its channels of largest L2 magnitude.

A pruned network keeps its module tree; its spec is the base spec with ``kind: "pruned"`` and ``channels``
(output channels of every dense convolution), from which ``build_pruned`` recreates the shapes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.nets.registry import create_model


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def genes(model: nn.Module) -> dict[str, str]:
    """The stage (a MetaPruning gene) of every dense conv: a stage is a container whose children are blocks
    (MobileNetV2's ``blocks.3``, ResNet's ``layer2``), named ``stage{i}`` in order; convs outside every stage are
    ``stem`` before the first one and ``head`` after it."""
    modules = dict(model.named_modules())
    found: list[str] = []
    out = {}
    for name in dense_convs(model):
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        stage = next((a for a, b in zip(prefixes, prefixes[1:])
                      if isinstance(modules[a], CONTAINERS) and not isinstance(modules[b], CONTAINERS)), None)
        if stage is not None and stage not in found:
            found.append(stage)
        out[name] = f"stage{found.index(stage)}" if stage is not None else "head" if found else "stem"
    return out


def stages(model: nn.Module) -> list[str]:
    """Gene names of ``model`` in order (``genes``): ``stem``, ``stage0`` ... and ``head`` where it has one."""
    return list(dict.fromkeys(genes(model).values()))


def dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}


def cut(model: nn.Module, keep: Callable[[str, int], int], importance=None) -> set[str]:
    """Prune every output-channel group of ``model`` in place to ``keep(name, channels)`` channels, where
    ``name`` is the group's first dense convolution. ``importance(group)`` ranks the channels (largest kept);
    without it the first channels stay. Returns the group names."""
    example = torch.zeros(1, 3, 16, 16, device=next(model.parameters()).device)  # shapes only: any size traces
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    convs = dense_convs(model)
    order = {m: i for i, m in enumerate(convs.values())}
    names = {m: name for name, m in convs.items()}
    plan, seen = [], set()
    for group in dg.get_all_groups(ignored_layers=[model.get_classifier()], root_module_types=[nn.Conv2d]):
        owners = [dep.target.module for dep, _ in group
                  if dep.target.module in order and dg.is_out_channel_pruning_fn(dep.handler)]
        name = names[min(owners, key=order.get)]
        seen.add(name)
        channels = len(group[0].idxs)
        n = keep(name, channels)
        if n < channels:
            ranked = torch.argsort(importance(group), descending=True) if importance else torch.arange(channels)
            plan.append((group, sorted(ranked[n:].tolist())))
    for group, drop in plan:  # groups are disjoint: indices stay valid while the others are cut
        group.prune(drop)
    return seen


def kept_channels(width: float, channels: int, round_to: int = 8) -> int:
    """``ceil(width * channels)`` rounded up to a multiple of ``round_to``, at least ``round_to``, at most all."""
    return min(channels, max(round_to, round_to * math.ceil(width * channels / round_to)))


def width_of(widths: dict[str, float], name: str, gene: dict[str, str]) -> float:
    """The width of conv ``name``: its own entry, else its stage's (``gene``: ``genes(model)``), else 1."""
    return widths.get(name, widths.get(gene[name], 1.0))


def prune(model: nn.Module, widths: dict[str, float], round_to: int = 8) -> nn.Module:
    """Cut ``model`` in place and return it: each channel group keeps ``kept_channels(width, channels)`` of its
    channels, ranked by torch-pruning's group L2 magnitude (``MagnitudeImportance(p=2)``); the classifier's
    outputs stay. ``widths`` maps stage names (see ``stages``) or a group's first convolution (per layer,
    overriding its stage) to the kept fraction."""
    gene = genes(model)
    seen = cut(model, lambda name, channels: kept_channels(width_of(widths, name, gene), channels, round_to),
               tp.importance.MagnitudeImportance(p=2))
    unknown = set(widths) - seen - set(stages(model))
    if unknown:
        raise ConfigError(f"pruning widths: unknown stage or layer {sorted(unknown)} (stages: {stages(model)})")
    return model


def pruned_spec(base: dict, model: nn.Module) -> dict:
    """The checkpoint spec of a pruned ``model`` cut from the network of spec ``base``."""
    if base.get("gates") or base.get("mask"):
        raise ConfigError("pruning: the base network must be dense (no gates or mask)")
    return {**base, "kind": "pruned", "channels": {name: m.out_channels for name, m in dense_convs(model).items()}}


def build_pruned(spec: dict) -> nn.Module:
    """The base timm network cut to the shapes of ``spec["channels"]`` (random weights, loaded afterwards)."""
    model = create_model(spec["arch"], spec["num_classes"], spec.get("small_input", False), width=spec.get("width"))
    cut(model, lambda name, channels: spec["channels"].get(name, channels))
    return model
