"""Backbones and their activation units."""
import pytest
import torch

from depthshrinker.config import ConfigError
from depthshrinker.counting import profile
from depthshrinker.gates import apply_keep
from depthshrinker.models import activation_units, create_model, offline_weights_path


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
    with pytest.raises(ConfigError, match="model.arch"):
        create_model("resnet50", 10)


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
