"""A chosen set of merge segments (``deploy.segments``; Kim et al., ICML 2023) applied to a network: its trainable
form and its exact merge.

``segment_form`` takes a partition of the body into valid segments and the positions that keep an activation
(segment ends only): every other body activation is removed, an activation the dense network lacks at a kept
block end is added (Kim et al.'s optional ReLU6 after the add), and every multi-conv segment goes pad-first
(``plain.set_pad_first``), so the network computes what its merge computes; it runs as a ``ChainNet`` (residual
blocks inside a segment fit their shortcut to the padded branch).

``merge_segments`` turns that network into a PlainNet: each segment one conv (BN folded; a residual block it
swallows merged first, its shortcut folded at the block kernel's centre, then composed with its neighbours); a
residual block with a segment boundary inside stays a residual block of its segments' convs.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.merge import Conv, build_plain, compose, fold_residual
from depthshrinker.deploy.segments import Body, body, valid_segments
from depthshrinker.nets.chain import ChainNet
from depthshrinker.nets.gates import replace_act
from depthshrinker.nets.ir import extract
from depthshrinker.nets.plain import ACTS, LayoutConv, PlainNet, layout, set_pad_first

__all__ = ["segment_form", "merge_segments"]


def _check(b: Body, segments: list[tuple[int, int]], acts: set[int]) -> None:
    ends = [e for _, e in segments]
    if [s for s, _ in segments] != [0, *ends[:-1]] or (ends and ends[-1] != len(b)):
        raise ConfigError(f"segments: {segments} do not cover the body's positions 0..{len(b)} in order")
    invalid = sorted(set(segments) - set(valid_segments(b)))
    if invalid:
        raise ConfigError(f"segments: {invalid} are not valid segments of this network")
    inside = sorted(acts - set(ends))
    if inside:
        raise ConfigError(f"segments: positions {inside} keep an activation but are not segment ends")


def segment_form(model: nn.Module, segments: list[tuple[int, int]], acts: set[int], added: str = "relu6") -> ChainNet:
    """``model`` (changed in place) with ``segments`` and the activations at ``acts`` (module docstring), as a
    ChainNet that records ``segments``, ``acts`` and the body; ``added``: the activation put at a kept block end
    that has none."""
    net = extract(model)
    lay = layout(model, net)
    b = body(model, net, lay)
    _check(b, segments, set(acts))
    chain = ChainNet(model, lay)
    for p, conv in enumerate(b.convs, start=1):
        block = lay.blocks[conv.block]
        at_add = block.residual and conv.index == len(block.convs) - 1
        act_id = block.free_id if at_add else block.convs[conv.index].act_id
        if conv.act != "none" and p not in acts:
            replace_act(model, act_id, lambda _: nn.Identity())
        elif conv.act == "none" and p in acts:
            if conv.index != len(block.convs) - 1:
                raise ConfigError(f"segments: position {p} has no activation to keep (only a block end may get one)")
            chain.added_acts[str(conv.block)] = ACTS[added]()
    for s, e in segments:
        convs = [lay.blocks[c.block].convs[c.index] for c in b.convs[s:e]]
        if e - s > 1:
            if any(c.conv is None for c in convs):
                raise ConfigError(f"segments: ({s}, {e}) merges an average pool; not supported")
            set_pad_first([c.conv for c in convs])
    chain.segments, chain.acts, chain.body, chain.added = list(segments), set(acts), b, added
    return chain


def _folded(c: LayoutConv) -> Conv:
    weight, bias = c.folded()
    return Conv({**c.spec(), "act": "none"}, weight.to(torch.float64), bias.to(torch.float64))


def _merged(chain: ChainNet, lay, s: int, e: int) -> Conv:
    """Segment ``(s, e)`` as one float64 conv: swallowed residual blocks first, shortcut at the kernel centre."""
    b, items, p = chain.body, [], s
    while p < e:
        block = lay.blocks[b.convs[p].block]
        tgt = b.residuals.get(p)
        if tgt is None or tgt > e:  # a conv of its own, not a residual block the segment swallows
            items.append(_folded(block.convs[b.convs[p].index]))
            p += 1
            continue
        merged = functools.reduce(functools.partial(compose, where=f"segment ({s}, {e})"),
                                  [_folded(c) for c in block.convs])
        shortcut = _folded(block.shortcut) if block.shortcut else None
        if not fold_residual(merged, shortcut, offset=(merged.spec["kernel"] - 1) // 2):
            raise ConfigError(f"segments: ({s}, {e}) cannot fold the shortcut of block {block.name}")
        items.append(merged)
        p = tgt
    return functools.reduce(functools.partial(compose, where=f"segment ({s}, {e})"), items)


def _act_at(chain: ChainNet, p: int) -> str:
    """The activation the deployed network has at body position ``p``."""
    if p not in chain.acts:
        return "none"
    kind = chain.body.convs[p - 1].act
    return chain.added if kind == "none" else kind


def _weights(block) -> list[Conv]:
    """A block outside the body as it stands: its convs and shortcut, BN folded."""
    return [_folded(c) for c in block.convs] + ([_folded(block.shortcut)] if block.shortcut else [])


@torch.no_grad()
def merge_segments(chain: ChainNet) -> PlainNet:
    """The PlainNet of a ``segment_form`` network (module docstring), the same function in eval mode."""
    b = chain.body
    lay = layout(chain.model)
    span: dict[int, list[int]] = {}
    for p, c in enumerate(b.convs):
        span.setdefault(c.block, [p, p + 1])[1] = p + 1
    first, last = b.convs[0].block, b.convs[-1].block
    start_of = {s: (s, e) for s, e in chain.segments}
    blocks: list[tuple[dict, list[Conv]]] = [(block.spec(), _weights(block)) for block in lay.blocks[:first]]
    p = 0
    for i in range(first, last + 1):
        block = lay.blocks[i]
        if block.pool:
            blocks.append((block.spec(), []))
            continue
        src, tgt = span[i]
        if p >= tgt:  # swallowed by a segment that started before it
            continue
        if block.residual and start_of[src][1] < tgt:  # a boundary inside: stays a residual block of its segments
            convs = []
            while p < tgt:
                s, e = start_of[p]
                convs.append(_merged(chain, lay, s, e))
                convs[-1].spec["act"] = _act_at(chain, e) if e < tgt else "none"
                p = e
            shortcut = [_folded(block.shortcut)] if block.shortcut else []
            blocks.append(({"convs": [c.spec for c in convs], "residual": True, "free_act": _act_at(chain, tgt),
                            **({"shortcut": shortcut[0].spec} if shortcut else {})}, convs + shortcut))
            continue
        while p < tgt:
            s, e = start_of[p]
            conv = _merged(chain, lay, s, e)
            conv.spec["act"] = _act_at(chain, e)
            blocks.append(({"convs": [conv.spec], "residual": False, "free_act": "none"}, [conv]))
            p = e
    blocks += [(block.spec(), _weights(block)) for block in lay.blocks[last + 1:]]
    classifier = lay.classifier
    spec = {"kind": "plain", "num_classes": classifier.out_features, "blocks": [bs for bs, _ in blocks],
            "classifier": {"in": classifier.in_features, "out": classifier.out_features},
            "segments": [list(seg) for seg in chain.segments]}
    return build_plain(spec, [convs for _, convs in blocks], classifier)
