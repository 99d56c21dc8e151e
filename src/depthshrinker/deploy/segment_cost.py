"""Kim et al.'s latency table under the two-party cost model (``mpc.cost``): the exact CrypTen cost of every
valid merge segment as one conv, and of keeping an activation at each body position (Kim et al., ICML 2023,
Sec. 4: the table ``T``; here the activation's cost is its own entry, since under MPC it dominates).

Costs add up: a network in ``segment_form`` merged by ``merge_segments`` costs ``outside`` + Σ its segments +
Σ its kept activations, exactly (``tests/test_depthdp.py`` checks it against ``cost.count`` of the merged
network). A residual block's projection shortcut is paid by the segment that ends at the block's end from inside
it (the block is not swallowed, so the shortcut stays a conv); a swallowed block's shortcut is folded, free.
``option[(s, e, label)]`` is segment ``(s, e)`` under each of its LayerMerge options (``segments.segment_options``:
some reducible convs dropped, so a smaller merged kernel), paid likewise.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from depthshrinker.deploy.mpc.cost import Cost, activation, block_cost, count, merged_conv
from depthshrinker.deploy.segments import Body, body, kept_convs, segment_options, valid_segments
from depthshrinker.nets.ir import extract
from depthshrinker.nets.plain import layout, plain_spec

__all__ = ["SegmentCosts", "segment_costs", "Pieces", "segment_pieces", "act_kind"]


@dataclass(frozen=True)
class SegmentCosts:
    """``segment[(s, e)]``: convs ``s+1..e`` as one conv; ``act[p]``: the activation kept at position ``p``;
    ``outside``: everything not in the body (stem, head, pools, classifier, revealing the logits); ``option[(s, e,
    label)]``: segment ``(s, e)`` under a LayerMerge option (module docstring)."""
    body: Body
    segment: dict[tuple[int, int], Cost]
    act: dict[int, Cost]
    outside: Cost
    option: dict[tuple[int, int, str], Cost]


def act_kind(b: Body, p: int, added: str = "relu6") -> str:
    """The activation kept at body position ``p``: the dense network's, or ``added`` at a block end without one."""
    return b.convs[p - 1].act if b.convs[p - 1].act != "none" else added


def _single(conv: dict, shape: tuple[int, int, int]) -> tuple[Cost, tuple[int, int, int]]:
    return block_cost({"convs": [{**conv, "act": "none"}], "residual": False, "free_act": "none"}, shape)


@dataclass(frozen=True)
class Pieces:
    """What each row of the table runs: ``segment``/``option`` rows a list of (conv spec, input shape) (the merged
    conv, then a kept projection shortcut), ``act[p]`` (kind, shape); ``spec`` the dense network's plain spec and
    ``inside`` its blocks in the body."""
    body: Body
    segment: dict[tuple[int, int], list[tuple[dict, tuple[int, int, int]]]]
    option: dict[tuple[int, int, str], list[tuple[dict, tuple[int, int, int]]]]
    act: dict[int, tuple[str, tuple[int, int, int]]]
    spec: dict
    inside: frozenset[int]


def segment_pieces(model: nn.Module, input_size: int, added: str = "relu6") -> Pieces:
    """The ``Pieces`` of ``model`` on a ``(3, input_size, input_size)`` image (module docstring)."""
    net = extract(model)
    lay = layout(model, net)
    b = body(model, net, lay)
    spec = plain_spec(model, lay)
    shape, block_in = (3, input_size, input_size), []
    for block in spec["blocks"]:
        block_in.append(shape)
        shape = block_cost(block, shape)[1]
    conv_in, conv_out, first = [], [], {}
    for p, c in enumerate(b.convs):
        shape = block_in[c.block] if first.setdefault(c.block, p) == p else conv_out[-1]
        conv_in.append(shape)
        conv_out.append(_single(spec["blocks"][c.block]["convs"][c.index], shape)[1])
    owner = {t: src for src, t in b.residuals.items()}

    def merged(positions, depthwise: bool | None = None) -> dict:
        conv = merged_conv([spec["blocks"][b.convs[p - 1].block]["convs"][b.convs[p - 1].index] for p in positions])
        return conv if depthwise is None else {**conv, "groups": conv["in"] if depthwise else 1}

    segment, option = {}, {}
    for s, e in valid_segments(b):
        shortcut = spec["blocks"][b.convs[e - 1].block].get("shortcut")
        kept = e in owner and owner[e] < s and shortcut  # the block ends here, not swallowed: its shortcut stays
        extra = [(shortcut, conv_in[owner[e]])] if kept else []
        segment[s, e] = [(merged(range(s + 1, e + 1)), conv_in[s]), *extra]
        for o in segment_options(b, s, e):
            positions = kept_convs(b, s, e, o, {p: 0.0 for p in range(s + 1, e + 1)})  # any choice: the same shape
            option[s, e, o.label] = [(merged(positions, o.depthwise), conv_in[s]), *extra]
    acts = {p: (act_kind(b, p, added), conv_out[p - 1]) for p in range(1, len(b) + 1)}
    return Pieces(b, segment, option, acts, spec, frozenset(c.block for c in b.convs))


def segment_costs(model: nn.Module, input_size: int, added: str = "relu6") -> SegmentCosts:
    """The table of ``model`` on a ``(3, input_size, input_size)`` image (module docstring)."""
    t = segment_pieces(model, input_size, added)
    outside, shape = count(t.spec, input_size), (3, input_size, input_size)
    for i, block in enumerate(t.spec["blocks"]):
        step, shape = block_cost(block, shape)
        if i in t.inside:
            outside -= step

    def price(pieces: list) -> Cost:
        return sum((_single(conv, shape)[0] for conv, shape in pieces), Cost())

    return SegmentCosts(t.body, {k: price(v) for k, v in t.segment.items()},
                        {p: activation(kind, _numel(shape)) for p, (kind, shape) in t.act.items()}, outside,
                        {k: price(v) for k, v in t.option.items()})


def _numel(shape: tuple[int, int, int]) -> int:
    return shape[0] * shape[1] * shape[2]
