"""Any CNN the IR supports goes through the deploy form: ResNets (CIFAR stem, timm 7x7 stem with max-pool and
projection shortcuts, bottlenecks), MobileNetV2 and a user's own module merge exactly for random keep-lists at
both granularities, and the cost model equals CrypTen's counters on them, merged and unmerged."""
import importlib.util

import pytest
import torch
from torch import nn

from depthshrinker.base.config import ConfigError, validate
from depthshrinker.deploy.merge import head_input, held_out_images, merge_plain
from depthshrinker.deploy.mpc.cost import block_cost, count
from depthshrinker.deploy.plan import apply_keep
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

USER = "module:user_nets:build"


def random_bn_stats(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def shrunk(arch: str, granularity: str, seed: int, policy: str = "all"):
    """(model with a random keep-list applied, its merged PlainNet)."""
    torch.manual_seed(seed)
    model = create_model(arch, 10)
    random_bn_stats(model, seed)
    units = activation_units(model, granularity)
    keep = torch.randint(0, 2, (len(units),), generator=torch.Generator().manual_seed(seed)).tolist()
    apply_keep(model, units, keep, "none", policy)
    return model.eval(), merge_plain(to_plain(model.eval()))


@pytest.mark.parametrize("arch, size", [("resnet18_cifar", 32), ("resnet18", 64), ("resnet34", 64),
                                        ("resnet50", 64), ("mobilenetv2_140", 32), (USER, 32)])
@pytest.mark.parametrize("granularity, seed", [("block", 0), ("layer", 1)])
def test_every_backbone_merges_exactly_on_held_out_images(arch, size, granularity, seed):
    """Policy 'all' merges every linear run (3x3∘3x3 → 5x5 in basic blocks, across strides, shortcuts folded
    where a branch became one conv): the features before the head agree to 1e-5 relative."""
    model, merged = shrunk(arch, granularity, seed)
    x = held_out_images(validate({}), size, 4)
    with torch.no_grad():
        ref, got = head_input(model, x), head_input(merged, x)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (merged(x) - model(x)).abs().max() <= 1e-4 * (1 + model(x).abs().max())


def test_resnet18_cifar_counts_and_what_merging_does():
    """The private-inference literature's ResNet-18: 557,056 ReLUs at 32x32, 17 layer / 9 block units; a basic
    block without its activations merges into one 5x5 conv (7x7 stride 2 where it downsamples) with its identity
    or projection shortcut folded in, and the MACs policy declines that merge (25/18 the MACs)."""
    model = create_model("resnet18_cifar", 10)
    assert count(to_plain(model.eval()), 32).relu == 557_056
    assert [len(activation_units(model, g)) for g in ("block", "layer")] == [9, 17]
    keep = [1] + [0] * 8
    for policy, convs in (("all", 9), ("macs", 20)):
        m = create_model("resnet18_cifar", 10)
        apply_keep(m, activation_units(m, "block"), keep, "none", policy)
        merged = merge_plain(to_plain(m.eval()))
        blocks = merged.spec["blocks"]
        assert sum(len(b["convs"]) + ("shortcut" in b) for b in blocks) == convs
    assert [(c["kernel"], c["stride"]) for b in blocks[1:] for c in b["convs"]][:4] == [(3, 1)] * 4
    m = create_model("resnet18_cifar", 10)
    apply_keep(m, activation_units(m, "block"), keep, "none", "all")
    blocks = merge_plain(to_plain(m.eval())).spec["blocks"]
    assert [(b["convs"][0]["kernel"], b["convs"][0]["stride"], b["residual_folded"]) for b in blocks[1:4]] == [
        (5, 1, True), (5, 1, True), (7, 2, True)]
    assert all(not b["residual"] and "shortcut" not in b for b in blocks[1:])


def test_max_pool_cost_by_hand():
    """3x3 stride-2 max-pool, padding 1, on (2, 5, 5): rows then columns, two ReLU layers each:
    2·(2·5·3) + 2·(2·3·3) = 96 compared elements, 4 layers of 9 rounds, nothing else."""
    cost, out = block_cost({"convs": [], "pool": {"kind": "max", "kernel": 3, "stride": 2, "padding": 1}}, (2, 5, 5))
    assert out == (2, 3, 3)
    assert (cost.relu, cost.act_layers, cost.rounds, cost.bytes, cost.linear_layers) == (96, 4, 36, 464 * 96, 0)
    assert cost.preproc_bytes == 120 * 96 and cost.preproc_requests == 36


def test_projection_shortcut_is_one_more_conv():
    block = {"convs": [{"in": 4, "out": 8, "kernel": 3, "stride": 2, "padding": 1, "groups": 1, "act": "relu"}],
             "residual": True, "free_act": "relu",
             "shortcut": {"in": 4, "out": 8, "kernel": 1, "stride": 2, "padding": 0, "groups": 1, "act": "none"}}
    cost, out = block_cost(block, (4, 6, 6))
    assert out == (8, 3, 3)
    assert cost.linear_layers == 2 and cost.act_layers == 2 and cost.relu == 2 * 72
    assert cost.bytes == 16 * (144 + 288) + 16 * (144 + 32) + 464 * 144 and cost.rounds == 2 + 18


class ReadsEarlier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        a = self.a(x)
        self.b(a)
        return self.fc(self.c(a).mean((2, 3)))


class MLPHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc1, self.fc2 = nn.Conv2d(3, 4, 1), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.c(x).mean((2, 3)))))


@pytest.mark.parametrize("net, message", [
    (ReadsEarlier, "plain network: c: reads a tensor other than the previous block's output"),
    (MLPHead, "plain network: relu: act after the global pool"),
])
def test_what_is_not_a_chain_of_blocks_is_refused_by_name(net, message):
    with pytest.raises(ConfigError, match=message):
        to_plain(net().eval())


def test_a_shared_activation_module_is_refused_not_silently_ungated():
    """torchvision's ResNet calls one ``relu`` twice per block: removing one call must stop with a clear line,
    not set an unused attribute and leave both activations in place."""
    import torchvision

    from depthshrinker.nets.gates import remove_units

    model = torchvision.models.resnet18(num_classes=10)
    units = activation_units(model, "layer")
    with pytest.raises(ConfigError, match="'layer[1-4]_[01]_relu(_1)?' is one of several calls of a shared module"):
        remove_units(model, units, [1] + [0] * (len(units) - 1))


needs_crypten = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="CrypTen not installed")


@needs_crypten
@pytest.mark.slow
def test_cost_model_equals_crypten_on_resnets_merged_and_unmerged():
    """ResNet-18 with the CIFAR stem at 32x32, timm's ResNet-18 (7x7 stride-2 stem, max-pool, projection
    shortcuts) at 64x64 and the user's network at 16x16 (max-pool of negative values, average pool), dense and
    merged: online bytes and rounds, dealer bytes and requests equal the cost model; outputs match plaintext."""
    from depthshrinker.deploy.mpc.engine import measure_many

    nets, sizes = {}, {"resnet18_cifar": 32, "resnet18": 64, USER: 16}
    for arch in sizes:
        nets[f"{arch}/dense"] = to_plain(create_model(arch, 10).eval())
        nets[f"{arch}/merged"] = shrunk(arch, "block", 0)[1]
    results = {}
    for arch, size in sizes.items():
        results |= measure_many({k: v for k, v in nets.items() if k.startswith(arch + "/")}, size, runs=1,
                                warmup=0, timeout=900)
    for name, net in nets.items():
        c, r = count(net, sizes[name.split("/")[0]]), results[name]
        assert (r["mpc_bytes"], r["mpc_rounds"]) == (c.bytes, c.rounds), name
        assert (r["mpc_preproc_bytes"], r["mpc_preproc_requests"]) == (c.preproc_bytes, c.preproc_requests), name
        assert r["mpc_rel_err"] < 1e-2 and not r["mpc_error_exceeded"], name
    assert results["resnet18/merged"]["mpc_rounds"] < results["resnet18/dense"]["mpc_rounds"]
