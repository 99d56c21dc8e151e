"""Any valid set of merge segments (Kim et al. 2023), across residual blocks: trainable form and exact merge."""
from __future__ import annotations

import random

import pytest
import torch

from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.merge import merge_segments
from depthshrinker.deploy.segment_form import segment_form
from depthshrinker.deploy.segments import body, valid_segments
from depthshrinker.nets.chain import ChainNet
from depthshrinker.nets.registry import create_model
from test_backbones import USER, random_bn_stats

ARCHS = [("mobilenetv2_100", 32), ("resnet34", 64), ("resnet50", 64), ("resnet18_cifar", 32),
         ("efficientnet_lite0", 32)]


def random_choice(b, rng: random.Random) -> tuple[list[tuple[int, int]], set[int]]:
    """A random partition of the body into valid segments, and random activations at their ends (kept where the
    dense network has one, or added at a block end that has none)."""
    starts: dict[int, list[int]] = {}
    for s, e in valid_segments(b):
        starts.setdefault(s, []).append(e)
    segments, p = [], 0
    while p < len(b):
        segments.append((p, rng.choice(starts[p])))
        p = segments[-1][1]
    acts = {e for _, e in segments if (b.convs[e - 1].act != "none" and rng.random() < 0.7)
            or (b.convs[e - 1].act == "none" and e in b.block_ends and rng.random() < 0.5)}
    return segments, acts


@pytest.mark.parametrize("arch, size", ARCHS + [(USER, 32)])
def test_chain_net_computes_what_the_model_computes(arch, size):
    model = create_model(arch, 10)
    random_bn_stats(model, 0)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(ChainNet(model).eval()(x), model(x))


@pytest.mark.parametrize("arch, size, seed", [("mobilenetv2_100", 32, 0), ("mobilenetv2_100", 32, 1),
                                              ("resnet34", 32, 0), ("resnet18_cifar", 32, 0)])
def test_any_segment_set_merges_exactly(arch, size, seed):
    """Segments that swallow residual blocks (shortcut at the kernel centre) and cross block boundaries: in
    float64 the merged network equals the segment form to rounding (1e-10), and in float32 to 1e-4 relative (15x15
    kernels of up to 21 convs)."""
    rng = random.Random(seed)
    model = create_model(arch, 10)
    random_bn_stats(model, seed)
    b = body(model)
    segments, acts = random_choice(b, rng)
    chain = segment_form(model.eval(), segments, acts).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        merged32 = merge_segments(chain)
        ref32, got32 = chain.forward_features(x), x
        for block in merged32.blocks:
            got32 = block(got32)
        assert (got32 - ref32).abs().max() <= 1e-4 * ref32.abs().max()
        chain.double()
        merged = merge_segments(chain)
        ref, got = chain.forward_features(x.double()), x.double()
        for block in merged.blocks:
            got = block(got)
        assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
        assert torch.allclose(merged(x.double()), chain(x.double()), rtol=0, atol=1e-9)


def test_a_segment_over_two_basic_blocks_is_one_9x9_conv():
    """ResNet-34: segment (0, 4) swallows the first two basic blocks (both identity shortcuts folded) into one 9x9
    conv; every other block keeps its boundary, so stays a residual block (14 of 16)."""
    model = create_model("resnet34", 10)
    b = body(model)
    segments = [(0, 4)] + [(p, p + 1) for p in range(4, len(b))]
    spec = merge_segments(segment_form(model.eval(), segments, {e for _, e in segments})).spec
    body_blocks = spec["blocks"][2:]  # after the stem conv and the max-pool
    assert [c["kernel"] for c in body_blocks[0]["convs"]] == [9] and not body_blocks[0]["residual"]
    assert sum(blk["residual"] for blk in body_blocks) == 14
    assert sum(len(blk["convs"]) + ("shortcut" in blk) for blk in spec["blocks"]) == 1 + 1 + 28 + 3


def test_bad_segment_sets_are_refused_by_name():
    model = create_model("resnet34", 10)
    b = body(model)
    singles = [(p, p + 1) for p in range(len(b))]
    with pytest.raises(ConfigError, match=r"\[\(0, 3\)\] are not valid segments"):
        segment_form(model, [(0, 3)] + singles[3:], set())
    with pytest.raises(ConfigError, match="do not cover"):
        segment_form(model, singles[1:], set())
    with pytest.raises(ConfigError, match=r"positions \[1\] keep an activation but are not segment ends"):
        segment_form(model, [(0, 2)] + singles[2:], {1})
