"""Kim et al.'s and LayerMerge's merge segments on the IR, and their DPs against brute force."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from depthshrinker.deploy.segments import Body, BodyConv, body, segment_options, valid_segments
from depthshrinker.methods.segment_dp import (
    extended_importance,
    fastest_split,
    kim_dp,
    kim_normalised,
    layermerge_dp,
    layermerge_normalised,
)
from depthshrinker.nets.registry import create_model

# (convs, residual blocks, stride breaks, valid segments, of them across blocks, LayerMerge options): the reference
# code's tables (snu-mllab/Efficient-CNN-Depth-Compression: 171 rows for MobileNetV2-1.0; LayerMerge's DP.md:
# --to_blk 391 for MobileNetV2-1.0 and 150 for ResNet-34; its ResNet-50 str_pos 11, 23, 41)
REFERENCE = {
    "mobilenetv2_100": (50, 10, {5, 11, 20, 41}, 171, 72, 391),
    "resnet34": (32, 16, {7, 15, 27}, 62, 17, 150),
    "resnet50": (48, 16, {11, 23, 41}, 107, 17, 192),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def arch_body(request):
    return request.param, body(create_model(request.param, 10))


def test_segments_follow_the_reference_counts(arch_body):
    arch, b = arch_body
    convs, residuals, breaks, segments, across, options = REFERENCE[arch]
    segs = valid_segments(b)
    assert (len(b), len(b.residuals), set(b.breaks)) == (convs, residuals, breaks)
    assert len(segs) == segments and len(set(segs)) == segments
    assert sum(b.crosses_blocks(s, e) for s, e in segs) == across
    assert sum(len(segment_options(b, s, e)) for s, e in segs) == options


def test_mobilenetv2_residual_positions_are_the_reference_skips():
    b = body(create_model("mobilenetv2_100", 10))
    assert b.residuals == {5: 8, 11: 14, 14: 17, 20: 23, 23: 26, 26: 29, 32: 35, 35: 38, 41: 44, 44: 47}
    assert [c.act for c in b.convs[:5]] == ["relu6", "none", "relu6", "relu6", "none"]  # linear bottlenecks at block ends


def test_every_segment_obeys_the_rules(arch_body):
    """No segment runs past a break, leaves a residual block it starts inside, or ends inside one it enters."""
    _, b = arch_body
    for s, e in valid_segments(b):
        assert not any(s < p < e for p in b.breaks)
        for src, tgt in b.residuals.items():
            if src < s < tgt:
                assert e <= tgt
            if s < src < e:
                assert e >= tgt


def test_resnet_segments_fold_whole_blocks_and_strided_convs_end_them():
    b = body(create_model("resnet34", 10))
    segs = set(valid_segments(b))
    assert {(0, 2), (0, 4), (0, 6), (1, 2), (6, 7)} <= segs           # stage 1: whole blocks; into a strided block
    assert not {(0, 3), (1, 3), (6, 8), (7, 9)} & segs                 # inside a block, past a stride
    assert [o.kernel for o in segment_options(b, 0, 2)] == [3, 5]      # LayerMerge: drop one of the two 3x3s


def test_strided_depthwise_takes_the_next_1x1_only():
    b = body(create_model("mobilenetv2_100", 10))
    segs = set(valid_segments(b))
    assert (3, 5) in segs and (3, 6) not in segs and (2, 5) in segs


def _random_body(rng: random.Random) -> Body:
    """A small valid body: blocks of 1-3 convs, some residual, some strided."""
    convs, residuals, breaks, ends = [], {}, set(), set()
    for block in range(rng.randint(2, 4)):
        src = len(convs)
        for j in range(rng.randint(1, 3)):
            stride = 2 if rng.random() < 0.15 else 1
            convs.append(BodyConv(block, j, rng.choice([1, 3]), stride, rng.random() < 0.3, (8, 8), "relu6"))
            if stride > 1:
                breaks.add(len(convs))
        if rng.random() < 0.5 and len(convs) - src > 1:
            residuals[src] = len(convs)
        ends.add(len(convs))
    return Body(tuple(convs), residuals, frozenset(breaks), frozenset(ends))


def _partitions(segments: set, start: int, stop: int):
    """Every way to cover [start, stop] with consecutive segments."""
    if start == stop:
        yield []
        return
    for s, e in sorted(segments):
        if s == start and e <= stop:
            for rest in _partitions(segments, e, stop):
                yield [(s, e)] + rest


@pytest.mark.parametrize("seed", range(40))
def test_dps_equal_brute_force(seed):
    rng = random.Random(seed)
    b = _random_body(rng)
    segs = valid_segments(b)
    n = len(b)
    latency = {k: rng.uniform(0.1, 3.0) for k in segs}
    # first DP: the fastest cover of each valid span by valid segments
    split = fastest_split(latency)
    for s, e in segs:
        assert split[s, e][0] == pytest.approx(min(sum(latency[p] for p in part)
                                                   for part in _partitions(set(segs), s, e)))
    # second DP: extended entries as the reference makes them (0 activations only at block ends)
    importance = {}
    for s, e in segs:
        starts = [1, 0] if s in b.block_ends else [1]
        finals = [1, 0] if e in b.block_ends and s not in b.block_ends else [1]
        for a, z in itertools.product(starts, finals):
            importance[s, e, a, z] = rng.uniform(-2.0, 1.0)
    ext = extended_importance(importance)
    act_latency = {p: rng.uniform(0.0, 1.0) for p in range(1, n + 1)}  # keeping an activation costs (MPC)
    budget = rng.uniform(0.3, 1.0) * sum(split[s, e][0] + act_latency[e]
                                         for s, e in _partitions(set(segs), 0, n).__next__())
    best = (-math.inf, 0.0)
    for part in _partitions(set(segs), 0, n):
        for acts in itertools.product([0, 1], repeat=len(part)):
            chain = [1, *acts]
            keys = [(s, e, chain[i], chain[i + 1]) for i, (s, e) in enumerate(part)]
            if all(k in ext for k in keys):
                t = sum(split[s, e][0] + act_latency[e] * z for s, e, _, z in keys)
                if t <= budget * (1 + 1e-9):
                    best = max(best, (sum(ext[k] for k in keys), -t))
    if best[0] == -math.inf:
        with pytest.raises(ValueError, match="no choice fits"):
            kim_dp(latency, importance, n, budget, act_latency)
    else:
        got = kim_dp(latency, importance, n, budget, act_latency)
        assert (got["importance"], got["latency"]) == pytest.approx((best[0], -best[1]))
        assert [s for s, *_ in got["spans"]][0] == 0 and got["spans"][-1][1] == n
    # LayerMerge: every option of every segment
    entries = {(s, e, o): (rng.uniform(0.1, 3.0), rng.uniform(0.5, 1.5))
               for s, e in segs for o in segment_options(b, s, e)}
    lm_best, fastest = (-math.inf, 0.0), math.inf
    for part in _partitions(set(segs), 0, n):
        for opts in itertools.product(*(segment_options(b, s, e) for s, e in part)):
            t = sum(entries[s, e, o][0] for (s, e), o in zip(part, opts))
            fastest = min(fastest, t)
            if t <= budget * (1 + 1e-9):
                lm_best = max(lm_best, (sum(entries[s, e, o][1] for (s, e), o in zip(part, opts)), -t))
    if lm_best[0] > -math.inf:
        got = layermerge_dp(entries, n, budget)
        assert (got["importance"], got["latency"]) == pytest.approx((lm_best[0], -lm_best[1]))
    else:  # the refusal names the fastest choice's latency
        with pytest.raises(ValueError, match=rf"the fastest takes {fastest:.6g}\)"):
            layermerge_dp(entries, n, budget)


def test_extended_importance_takes_the_best_split_at_a_linear_block_end():
    importance = {(0, 2, 1, 1): -5.0, (0, 1, 1, 0): -1.0, (1, 2, 0, 1): -1.5, (0, 1, 1, 1): -0.5}
    assert extended_importance(importance)[0, 2, 1, 1] == -2.5


def test_normalisations_by_hand():
    delta = {(0, 1, 1, 1): -2.0, (1, 2, 1, 1): -4.0, (0, 2, 1, 1): -1.0}
    assert kim_normalised(delta, 1.6) == pytest.approx({(0, 1, 1, 1): 2.8, (1, 2, 1, 1): 0.8, (0, 2, 1, 1): 3.8})
    assert layermerge_normalised({"a": -10.0})["a"] == pytest.approx(math.exp(-0.1))


def test_segment_options_drop_only_reducible_convs():
    b = Body((BodyConv(0, 0, 1, 1, False, (8, 16), "relu6"), BodyConv(0, 1, 3, 1, True, (16, 16), "relu6"),
              BodyConv(0, 2, 1, 1, False, (16, 8), "none")), {}, frozenset(), frozenset({3}))
    options = segment_options(b, 0, 3)
    assert [(o.kernel, o.depthwise) for o in options] == [(1, False), (3, False)]  # the depthwise 3x3 may go
