"""The network IR (nets/ir.py): traced structure, residuals and activation units of any supported CNN, and a
one-line refusal naming the module for anything else."""
import pytest
import timm
import torch
import torchvision
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.nets.ir import extract
from depthshrinker.nets.registry import create_model


def test_mobilenetv2_units_are_the_inverted_residual_blocks():
    net = extract(create_model("mobilenetv2_100", 10, True))
    block, layer = net.units("block"), net.units("layer")
    assert [len(block), len(layer)] == [19, 35]
    assert block[0].name == "stem" and block[-1].name == "head" and block[0].block is None
    assert block[2].name == "blocks.1.0" and block[2].acts == ["blocks.1.0.bn1.act", "blocks.1.0.bn2.act"]
    assert layer[2].name == "blocks.1.0.bn1" and layer[2].block == "blocks.1.0"
    assert len(net.residuals) == 10 and all(r.shortcut is None for r in net.residuals)
    assert {n.kind for n in net.acts} == {"relu6"}


@pytest.mark.parametrize("build, acts", [
    (lambda: timm.create_model("resnet18", num_classes=10), ["layer1.0.act1", "layer1.0.act2"]),
    (lambda: torchvision.models.resnet18(num_classes=10), ["layer1_0_relu", "layer1_0_relu_1"]),
])
def test_resnet18_blocks_include_the_activation_after_the_add(build, acts):
    """timm's ResNet-18: stem + 8 basic blocks (act2 follows the add), 17 ReLUs, 3 projection shortcuts
    (1x1 conv + BN, stride 2), a max-pool after the stem. torchvision's calls one `relu` module twice per block:
    each call is its own activation, named by its fx node."""
    net = extract(build())
    block = net.units("block")
    assert [len(block), len(net.units("layer"))] == [9, 17]
    assert block[1].name == "layer1.0" and block[1].acts == acts and block[0].name == "stem"
    projections = [r for r in net.residuals if r.shortcut is not None]
    assert len(net.residuals) == 8 and [r.block for r in projections] == ["layer2.0", "layer3.0", "layer4.0"]
    assert [n.kind for n in net.nodes.values() if n.op == "pool"] == ["max", "mean"]


def test_resnet50_bottlenecks():
    net = extract(timm.create_model("resnet50", num_classes=10))
    assert [len(net.units("block")), len(net.units("layer"))] == [17, 49]
    assert sum(r.shortcut is not None for r in net.residuals) == 4  # layer1.0 widens 64 -> 256 too


class Own(nn.Module):
    """A user's network: functional ReLUs, an identity residual written as `a + b`, no block classes."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = nn.functional.relu(self.c3(torch.relu(self.c2(y))) + y)
        return self.fc(y.mean((2, 3)))


def test_a_users_own_network_gets_units_without_any_class_name():
    net = extract(Own())
    assert [(u.name, u.acts) for u in net.units("block")] == [("stem", ["relu"]), ("res0", ["relu_1", "relu_2"])]
    assert len(net.units("layer")) == 3 and net.residuals[0].branch == ("c2", "relu_1", "c3")


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.c(x), x], 1)


@pytest.mark.parametrize("build, message", [
    (lambda: timm.create_model("efficientnet_b0", num_classes=10), "network IR: bn1.act: SiLU is not supported"),
    (lambda: timm.create_model("resnet18d", num_classes=10),
     "network IR: layer2.0: a residual whose shortcut is not the identity or conv(+BN) is not supported"),
    (Concat, "network IR: Concat.forward: cat is not supported"),
])
def test_unsupported_constructs_are_refused_by_name(build, message):
    with pytest.raises(ConfigError) as err:
        extract(build())
    assert str(err.value).startswith(message)
