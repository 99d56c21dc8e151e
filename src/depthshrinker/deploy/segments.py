"""Candidate merge segments over a network's conv sequence, as Kim et al. enumerate them ("Efficient Latency-Aware
CNN Depth Compression via Two-Stage Dynamic Programming", ICML 2023, Sec. 3; LayerMerge, ICML 2024, Sec. 3), read
from the network IR so that any supported CNN has them.

The *body* is the convs of the network's blocks (the stem's and head's own convs are not in it), numbered
1..n in forward order, projection shortcuts not counted; position ``p`` is the output of conv ``p`` (0: the
stem's output). A segment ``(s, e)`` is convs ``s+1..e`` merged into one, every activation strictly inside
removed. Its validity (the reference code's ``valid_blks``):

* a residual block spans positions ``(src, tgt)``; a segment that starts before ``src`` and reaches it either
  ends there or swallows the whole block (its shortcut folded into the kernel: identity at the centre, a
  projection as a 1x1 kernel); a segment starting strictly inside a block ends inside it or at ``tgt``;
* a segment does not run past a stride *break*: a strided conv ends its segment, except that a strided
  depthwise conv may take the 1x1 conv right after it in its block (MobileNetV2's rule in the reference);
  a max-pool between blocks is a break too.

On MobileNetV2-1.0 this gives the reference's 171 segments (72 of them across blocks), on ResNet-34 its 62.

LayerMerge also lets a segment *drop* convs: a conv is reducible when it keeps its channel count and has stride
1 (it may become the identity); an option of a segment is a count of kept convs per (kernel, depthwise) kind,
at least one conv in all; its merged kernel is ``Σ n_k·(k − 1) + 1``. Where several counts give the same merged
conv, the reference keeps the last in its enumeration (the most convs of the kinds that do not grow the kernel);
which convs of a kind are kept is ``kept_convs``: the irreducible ones and the reducible ones of largest L1 norm.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from depthshrinker.nets.ir import Net, extract
from depthshrinker.nets.plain import Layout, act_spec, layout

__all__ = ["BodyConv", "Body", "body", "valid_segments", "segment_options", "Option", "kept_convs"]


@dataclass(frozen=True)
class BodyConv:
    """One conv of the body: where it is in the deploy form (``block``, ``index`` into its convs), its shape, and
    the activation after it in the dense network (``act``: relu, relu6 or none; at a residual block's end: the
    one after the add)."""
    block: int
    index: int
    kernel: int
    stride: int
    depthwise: bool
    channels: tuple[int, int]
    act: str

    @property
    def reducible(self) -> bool:
        """LayerMerge: a conv that may be dropped (replaced by the identity) keeps its width and has stride 1."""
        return self.channels[0] == self.channels[1] and self.stride == 1


@dataclass(frozen=True)
class Body:
    """The conv sequence ``convs[p - 1]`` = conv ``p``; ``residuals`` src -> tgt positions; ``breaks`` positions
    no segment runs past; ``block_ends`` the positions that end a block."""
    convs: tuple[BodyConv, ...]
    residuals: dict[int, int]
    breaks: frozenset[int]
    block_ends: frozenset[int]

    def __len__(self) -> int:
        return len(self.convs)

    def crosses_blocks(self, s: int, e: int) -> bool:
        return self.convs[s].block != self.convs[e - 1].block


def body(model: nn.Module, net: Net | None = None, lay: Layout | None = None) -> Body:
    """The body of ``model`` (module docstring): the convs of the blocks that are activation units of their own
    (not the stem or head), in forward order."""
    net = net or extract(model)
    lay = lay or layout(model, net)
    unit_blocks = {u.block for u in net.units("block") if u.block is not None}
    convs, residuals, breaks, ends = [], {}, set(), set()
    inside = [i for i, b in enumerate(lay.blocks) if b.name in unit_blocks]
    if not inside:
        return Body((), {}, frozenset(), frozenset())
    for i in range(inside[0], inside[-1] + 1):
        block = lay.blocks[i]
        if block.pool:  # a max-pool: no segment crosses it
            breaks.add(len(convs))
            continue
        src = len(convs)
        for j, c in enumerate(block.convs):
            spec = c.spec()
            last = j == len(block.convs) - 1
            act = act_spec(c.act if not (last and block.residual) else block.free_act)["act"]
            convs.append(BodyConv(i, j, spec["kernel"], spec["stride"], spec["groups"] == spec["in"] > 1,
                                  (spec["in"], spec["out"]), act))
        for j, c in enumerate(convs[src:], start=src + 1):
            if c.stride > 1:
                after = convs[j] if j < len(convs) else None
                takes_1x1 = c.depthwise and after is not None and after.block == c.block and after.kernel == 1
                breaks.add(j + 1 if takes_1x1 else j)
        if block.residual:
            residuals[src] = len(convs)
        ends.add(len(convs))
    return Body(tuple(convs), residuals, frozenset(breaks), frozenset(ends))


def valid_segments(b: Body) -> list[tuple[int, int]]:
    """Every valid segment ``(s, e)`` of the body (module docstring), in the reference's order (by start, then
    end)."""
    n = len(b)
    breaks = sorted(p for p in b.breaks if 0 < p < n) + [n]
    out = []
    for s in range(n):
        limit = next(p for p in breaks if p > s)           # the next break after s
        owner = next((src for src, tgt in b.residuals.items() if src < s < tgt), None)
        if owner is not None:                              # inside a residual block: stay in it
            limit = min(limit, b.residuals[owner])
        e = s + 1
        while e <= limit:
            out.append((s, e))
            e = b.residuals[e] if e in b.residuals else e + 1
    return out


@dataclass(frozen=True)
class Option:
    """One LayerMerge option of a segment: the merged conv's ``kernel`` and whether it is ``depthwise``, and the
    count of convs kept per (kernel, depthwise) kind."""
    kernel: int
    depthwise: bool
    counts: tuple[tuple[tuple[int, bool], int], ...]

    @property
    def label(self) -> str:
        """``k<kernel>`` and ``d`` when depthwise: the option's name in entry keys and tables."""
        return f"k{self.kernel}{'d' if self.depthwise else ''}"


def segment_options(b: Body, s: int, e: int) -> list[Option]:
    """LayerMerge's options of segment ``(s, e)``: per (kernel, depthwise) kind, keep between its irreducible
    count and all its convs, not none in all; combinations with the same merged (kernel, depthwise) are one option
    (the last found, as the reference's ``get_possible_merged_conv``), in order of merged kernel."""
    kinds: dict[tuple[int, bool], list[int]] = {}
    for c in b.convs[s:e]:
        low_high = kinds.setdefault((c.kernel, c.depthwise), [0, 0])
        low_high[0] += not c.reducible
        low_high[1] += 1
    keys = list(kinds)
    options: dict[tuple[int, bool], Option] = {}
    for counts in itertools.product(*(range(kinds[k][0], kinds[k][1] + 1) for k in keys)):
        if not any(counts):
            continue
        kernel = sum((k - 1) * n for (k, _), n in zip(keys, counts)) + 1
        depthwise = all(dw for (_, dw), n in zip(keys, counts) if n)
        options[kernel, depthwise] = Option(kernel, depthwise, tuple(zip(keys, counts)))
    return [options[k] for k in sorted(options)]


def kept_convs(b: Body, s: int, e: int, option: Option, norms: dict[int, float]) -> list[int]:
    """The body positions of segment ``(s, e)`` that ``option`` keeps: per kind every irreducible conv and the
    reducible ones of largest ``norms[p]`` (the reference's ``find_max_importance_candidate``: L1 norm of the
    pretrained weight; ties to the earlier conv), in forward order."""
    kept = []
    for (kernel, depthwise), n in option.counts:
        kind = [p for p in range(s + 1, e + 1) if (b.convs[p - 1].kernel, b.convs[p - 1].depthwise) == (kernel, depthwise)]
        fixed = [p for p in kind if not b.convs[p - 1].reducible]
        free = sorted((p for p in kind if b.convs[p - 1].reducible), key=lambda p: (-norms[p], p))
        kept += fixed + free[:n - len(fixed)]
    return sorted(kept)
