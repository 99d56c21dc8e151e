"""A chosen set of merge segments (``deploy.segments``; Kim et al., ICML 2023) applied to a network: its trainable
form (its exact merge: ``merge.merge_segments``).

``segment_form`` takes a partition of the body into valid segments and the positions that keep an activation
(segment ends only): every other body activation is removed, an activation the dense network lacks at a kept
block end is added (Kim et al.'s optional ReLU6 after the add), and every multi-conv segment goes pad-first
(``plain.set_pad_first``), so the network computes what its merge computes; it runs as a ``ChainNet`` (residual
blocks inside a segment fit their shortcut to the padded branch). ``dropped`` body positions (LayerMerge, ICML
2024: reducible convs pruned) run as the identity; the pad-first form then spans the segment's kept convs.
"""
from __future__ import annotations

from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.segments import Body, body, valid_segments
from depthshrinker.nets.chain import ChainNet
from depthshrinker.nets.gates import replace_act
from depthshrinker.nets.ir import extract
from depthshrinker.nets.plain import ACTS, layout, set_pad_first

__all__ = ["segment_form"]


def _check(b: Body, segments: list[tuple[int, int]], acts: set[int], dropped: set[int]) -> None:
    ends = [e for _, e in segments]
    if [s for s, _ in segments] != [0, *ends[:-1]] or (ends and ends[-1] != len(b)):
        raise ConfigError(f"segments: {segments} do not cover the body's positions 0..{len(b)} in order")
    invalid = sorted(set(segments) - set(valid_segments(b)))
    if invalid:
        raise ConfigError(f"segments: {invalid} are not valid segments of this network")
    inside = sorted(acts - set(ends))
    if inside:
        raise ConfigError(f"segments: positions {inside} keep an activation but are not segment ends")
    wrong = sorted(p for p in dropped if not 0 < p <= len(b) or not b.convs[p - 1].reducible)
    if wrong:
        raise ConfigError(f"segments: positions {wrong} cannot be dropped (only a stride-1 conv that keeps its width)")
    empty = [(s, e) for s, e in segments if set(range(s + 1, e + 1)) <= dropped]
    if empty:
        raise ConfigError(f"segments: {empty} would drop every conv of the segment")


def segment_form(model: nn.Module, segments: list[tuple[int, int]], acts: set[int], added: str = "relu6",
                 dropped: set[int] = frozenset()) -> ChainNet:
    """``model`` (changed in place) with ``segments``, the activations at ``acts`` and the convs at ``dropped``
    removed (module docstring), as a ChainNet that records them and the body; ``added``: the activation put at a
    kept block end that has none."""
    net = extract(model)
    lay = layout(model, net)
    b = body(model, net, lay)
    dropped = set(dropped)
    _check(b, segments, set(acts), dropped)
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
        convs = [lay.blocks[c.block].convs[c.index] for p, c in enumerate(b.convs[s:e], start=s + 1)
                 if p not in dropped]
        if e - s > 1:
            if any(c.conv is None for c in convs):
                raise ConfigError(f"segments: ({s}, {e}) merges an average pool; not supported")
            set_pad_first([c.conv for c in convs])
    chain.dropped = {(b.convs[p - 1].block, b.convs[p - 1].index) for p in dropped}
    chain.segments, chain.acts, chain.body, chain.added = list(segments), set(acts), b, added
    return chain
