"""Backbones, their activation units, and one set of counts (counting == cost model == CrypTen)."""
import importlib.util

import pytest
import torch

from depthshrinker.base.config import ConfigError
from depthshrinker.deploy.merge import candidate_segments, conv_layers, merge_plain
from depthshrinker.deploy.mpc.cost import count
from depthshrinker.deploy.plan import apply_keep
from depthshrinker.nets.counting import nonlinear, profile
from depthshrinker.nets.gates import activation_shapes, apply_masks, num_kept
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model, offline_weights_path
from depthshrinker.nets.units import activation_units


@pytest.mark.parametrize("arch,block,layer", [("mobilenetv2_100", 19, 35), ("mobilenetv2_140", 19, 35),
                                              ("efficientnet_lite0", 18, 33)])
def test_unit_counts(arch, block, layer):
    model = create_model(arch, 10)
    units = activation_units(model, "block")
    assert len(units) == block
    assert len(activation_units(model, "layer")) == layer
    assert units[0].name == "stem" and units[-1].name == "head"
    assert sum(len(u.acts) for u in units) == layer


def test_ir_blocks_share_one_unit(mbv2):
    units = activation_units(mbv2, "block")
    assert units[1].acts == ["blocks.0.0.bn1.act"]  # the depthwise-separable block has one activation
    assert units[2].acts == ["blocks.1.0.bn1.act", "blocks.1.0.bn2.act"]


def test_mbv2_counts_match_reference():
    """MobileNetV2-1.0: 300.8 MMACs at 224 (the paper's 300M); CIFAR stem at 32x32: 498,432 ReLU6 elements."""
    big = profile(create_model("mobilenetv2_100", 1000), 224)
    assert big["macs"] == 300_774_272 and big["params"] == 3_504_872
    small = profile(create_model("mobilenetv2_100", 10, small_input=True), 32)
    assert small["nonlinear_units"] == small["relu6_elements"] == 498_432
    assert small["nonlinear_layers"] == 35


def test_removing_a_block_removes_its_layers_from_the_count(mbv2):
    units = activation_units(mbv2, "block")
    keep = [1] * 19
    keep[2] = 0
    before = profile(mbv2, 32)
    apply_keep(mbv2, units, keep)
    after = profile(mbv2, 32)
    assert after["nonlinear_layers"] == before["nonlinear_layers"] - 2
    # blocks.1.0 at 32x32 (stem stride 1): 96 channels at 32x32 after the expansion, 16x16 after the dw stride 2
    assert before["nonlinear_units"] - after["nonlinear_units"] == 96 * 32 * 32 + 96 * 16 * 16


def test_unknown_arch_names_the_key():
    with pytest.raises(ConfigError, match="model.arch: unknown arch 'resnet51'"):
        create_model("resnet51", 10)
    with pytest.raises(ConfigError, match="model.arch: resnet18 has no width multiplier"):
        create_model("resnet18", 10, width=0.5)
    with pytest.raises(ConfigError, match="model.arch: cannot import 'no_such_pkg.nets:build'"):
        create_model("module:no_such_pkg.nets:build", 10)


def test_missing_weights_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.pth"):
        create_model("mobilenetv2_100", 10, pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.skipif(offline_weights_path("mobilenetv2_100") is None, reason="offline weights package not installed")
def test_offline_imagenet_weights_classify_a_real_photo():
    """torchvision's ImageNet MobileNetV2 weights, loaded by position into timm: a cat photo is a cat."""
    skimage = pytest.importorskip("skimage.data")
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = create_model("mobilenetv2_100", 1000, pretrained="auto").eval()
    img = torch.tensor(skimage.chelsea()).permute(2, 0, 1).float().div(255)[None]
    img = torch.nn.functional.interpolate(img, size=224, mode="bilinear", antialias=True)
    img = (img - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert 281 <= model(img).argmax().item() <= 285  # ImageNet's domestic cats


def pixel_masked(size, keep_ratio, seed=0):
    """MobileNetV2-1.0 with SNL pixel masks (1x1xHxW) keeping round(keep_ratio·H·W) random pixels per layer: a
    layer of H·W = 1 keeps none at 0.4."""
    model = create_model("mobilenetv2_100", 10, small_input=True).eval()
    paths = [p for u in activation_units(model, "layer") for p in u.acts]
    shapes, gen, masks = activation_shapes(model, paths, size), torch.Generator().manual_seed(seed), {}
    for path in paths:
        _, h, w = shapes[path]
        mask = torch.zeros(h * w)
        mask[torch.randperm(h * w, generator=gen)[:num_kept(keep_ratio, h * w)]] = 1
        masks[path] = mask.view(1, 1, h, w)
    return apply_masks(model, masks)


def one_count(model, size):
    """(nonlinear layers, ReLU6 elements, cost-model rounds, bytes) of the deployed (BN-folded, merged) form;
    ``counting`` on the trained model, on the plain net and on the merged net must agree."""
    net = to_plain(model)
    merged = merge_plain(net, {"name": "mpc", "input_size": size, "network": "lan"})
    counts = [nonlinear(m, size) for m in (model, net, merged)]
    assert all((c["nonlinear_layers"], c["relu6_elements"]) == (counts[0]["nonlinear_layers"],
                                                                counts[0]["relu6_elements"]) for c in counts)
    c = count(merged, size)
    assert (c.act_layers, c.relu6) == (counts[0]["nonlinear_layers"], counts[0]["relu6_elements"])
    return counts[0]["nonlinear_layers"], counts[0]["relu6_elements"], c.rounds, c.bytes, merged


def test_empty_snl_layers_are_linear_everywhere():
    """SNL pixel keep 0.4 at 16x16: the 8 layers at 1x1 keep nothing. They become ``act: none`` in the plain
    network, so counting, the cost model (no 9 rounds for them) and merging agree: 27 nonlinear layers (the
    cost model charged 35 layers, 369 rounds, before). The emptied layers make linear runs that the plan
    considers; at 1x1 a merged dense 3x3 opens more weights than it saves, so MPC keeps them apart, and a plan
    that merges every exact run is exact and saves one round per merged conv."""
    model = pixel_masked(16, 0.4)
    net = to_plain(model)
    linear = [c for b in net.spec["blocks"] for c in b["convs"] if c["act"] == "none"]
    assert len(linear) == 17 + 8  # the 17 projections (never an activation) and the 8 emptied layers
    assert not any("mask" in c for c in linear)
    layers, _, rounds, _, merged = one_count(model, 16)
    assert layers == 27 and count(net, 16).rounds == 9 * 27 + 52 + 2 == 297
    runs = [d for b in merged.spec["blocks"] for d in b["decisions"]]
    assert len(runs) == 4 and rounds == 297 and all(d["cost_chosen"] == d["cost_unmerged"] for d in runs)
    table = {k: 1.0 if k.split(":")[1] in ("0-1", "1-2", "2-3") else 0.5 for k in candidate_segments(net)}
    forced = merge_plain(net, "latency", table)
    merged_away = conv_layers(net) - conv_layers(forced)
    assert merged_away == 4 and count(forced, 16).rounds == 297 - merged_away
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (forced(x) - model(x)).abs().max() <= 1e-4 * (1 + model(x).abs().max())


@pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="CrypTen not installed")
def test_empty_snl_layers_cost_nothing_under_crypten():
    """At 8x8 the same masks empty more layers; CrypTen's measured bytes and rounds equal the one count."""
    from depthshrinker.deploy.mpc.engine import measure

    model = pixel_masked(8, 0.4)
    layers, _, rounds, bytes_, merged = one_count(model, 8)
    assert layers < 27
    measured = measure(merged, 8, runs=1, warmup=0)
    assert (measured["mpc_bytes"], measured["mpc_rounds"]) == (bytes_, rounds)
