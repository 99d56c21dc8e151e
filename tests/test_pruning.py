"""Channel-pruning baseline: coupled cuts, budget fit, checkpoints, plain form, BN recalibration, the search
scored on the selection split, the MPC budget, raised budgets flagged."""
import dataclasses
import json

import pytest
import torch

from depthshrinker.base.checkpoint import load, save
from depthshrinker.base.config import ConfigError, validate
from depthshrinker.deploy.load import load_model
from depthshrinker.methods import pruning
from depthshrinker.methods.pruning import SearchConfig, fit_budget, search
from depthshrinker.nets.counting import macs, params
from depthshrinker.nets.cut import dense_convs, kept_channels, prune, pruned_spec, stages
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.train import evaluate

BASE = {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": True}
UNEVEN = {"stem": 0.5, "stage1": 0.3, "stage3": 0.6, "stage5": 0.4, "head": 0.25}


def _random_bn_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_prune_cuts_coupled_channels_to_multiples_of_8(mbv2):
    prune(mbv2, {"stage3": 0.5, "head": 0.3, "blocks.5.0.conv_pw": 0.2})
    stage3 = mbv2.blocks[3]
    assert {b.conv_pwl.out_channels for b in stage3} == {32}  # residual-tied outputs stay equal
    assert [b.conv_pw.out_channels for b in stage3] == [96, 192, 192, 192]  # expansions 192, 384, 384, 384
    assert mbv2.blocks[4][0].conv_pw.in_channels == 32
    assert all(b.conv_dw.out_channels == b.conv_pw.out_channels for b in stage3)
    assert mbv2.blocks[5][0].conv_pw.out_channels == kept_channels(0.2, 576) == 120
    assert mbv2.classifier.in_features == mbv2.conv_head.out_channels == 384
    assert mbv2.blocks[5][1].conv_pw.out_channels == 960 and mbv2.classifier.out_features == 10
    assert all(c.out_channels % 8 == 0 for c in dense_convs(mbv2).values())
    assert mbv2(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="stage9"):
        prune(mbv2, {"stage9": 0.5})


def test_prune_keeps_the_largest_channels(mbv2):
    with torch.no_grad():  # head channels 0..639 get zero importance in every coupled layer
        mbv2.conv_head.weight[:640] = 0
        mbv2.bn2.weight[:640] = 0
        mbv2.classifier.weight[:, :640] = 0
    kept = mbv2.classifier.weight[:, 640:].clone()
    prune(mbv2, {"head": 0.5})
    assert torch.equal(mbv2.classifier.weight, kept)


@pytest.mark.parametrize("budget", [0.3, 0.6])
@pytest.mark.parametrize("profile", ["uniform", "uneven"])
def test_fit_budget_hits_macs_budget_within_5_percent(mbv2, budget, profile):
    genes = dict.fromkeys(stages(mbv2), 1.0) | (UNEVEN if profile == "uneven" else {})
    dense = macs(mbv2, 32)
    model, widths, cost = fit_budget(mbv2, genes, budget * dense, lambda m: macs(m, 32))
    assert cost == macs(model, 32)
    assert 0.95 * budget * dense <= cost <= budget * dense
    assert set(widths) == set(stages(mbv2)) and mbv2.conv_head.out_channels == 1280  # the dense one is intact


def test_pruned_checkpoint_roundtrip(mbv2, tmp_path):
    prune(mbv2, UNEVEN)
    _random_bn_stats(mbv2)
    save(tmp_path / "p.pt", mbv2, pruned_spec(BASE, mbv2))
    raw = torch.load(tmp_path / "p.pt", weights_only=True)  # plain tensors and a JSON string, no modules
    assert json.loads(raw["spec"])["kind"] == "pruned" and load(tmp_path / "p.pt")["spec"]["channels"]
    model, _ = load_model(tmp_path / "p.pt")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), mbv2(x))
    assert {type(m) for m in model.modules()} <= {type(m) for m in create_model("mobilenetv2_100", 10).modules()}


@pytest.mark.parametrize("arch", ["mobilenetv2_100", "efficientnet_lite0"])
def test_to_plain_matches_pruned(arch):
    model = create_model(arch, 10, small_input=True)
    prune(model, UNEVEN)
    _random_bn_stats(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(to_plain(model)(x), model(x), atol=1e-4)


def test_recalibrate_bn_is_the_cumulative_average(mbv2):
    batches = [(torch.randn(8, 3, 32, 32), None) for _ in range(3)]
    pruning.recalibrate_bn(mbv2, batches)
    with torch.no_grad():
        stem = torch.cat([mbv2.conv_stem(x) for x, _ in batches])
    assert torch.allclose(mbv2.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert mbv2.bn1.momentum == 0.1 and not mbv2.training and mbv2.bn1.num_batches_tracked == 3


def _search(model, seed):
    x, y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10

    def score(candidate):
        pruning.recalibrate_bn(candidate, [(x, y)])
        return evaluate(candidate, [(x, y)])

    cost = pruning.COSTS["params"](validate({}))
    cfg = SearchConfig(population=4, generations=2, parents=2, mutation_prob=0.3)
    return search(model, 0.4 * cost(model), score, cost, cfg, seed)


def test_search_is_reproducible_and_returns_the_best_it_saw(mbv2):
    best_model, best, history = _search(mbv2, seed=3)
    again = _search(mbv2, seed=3)[2]
    assert history == again
    assert history[0]["genes"] == [1.0] * len(stages(mbv2)) and {r["generation"] for r in history} == {0, 1}
    assert best == max(history, key=lambda r: (r["top1"], -r["loss"]))
    budget = 0.4 * params(mbv2)
    assert all(r["cost"] <= budget for r in history) and params(best_model) == best["cost"]


def test_infeasible_budget_is_a_config_error(mbv2, tmp_path):
    with pytest.raises(ConfigError, match=r"budget 1000 \(0\.00% of the dense"):
        search(mbv2, 1000.0, lambda m: {"top1": 0.0, "loss": 0.0}, pruning.COSTS["macs"](validate({})))
    with pytest.raises(ConfigError, match="budget 1.5"):
        pruning.metaprune({}, tmp_path / "none.pt", tmp_path / "out.pt", 1.5)
    with pytest.raises(ConfigError, match="metapruning.populaton"):
        SearchConfig.from_config({"metapruning": {"populaton": 4}})


def _constant_splits(n: int, train: int, select: int):
    """Splits of random 3x4x4 images whose labels are constant per split: ``train``, ``select``, and 2 (test)."""
    from depthshrinker.base.data import Splits

    def images(label):
        return torch.utils.data.TensorDataset(torch.randn(n, 3, 4, 4), torch.full((n,), label))

    return Splits(train=images(train), select=images(select), test=images(2), num_classes=3)


def _class_biased_linear(bias: list[float]) -> torch.nn.Module:
    """A linear classifier of 3x4x4 images whose bias favours one class."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor(bias))
    return model


def test_candidates_are_scored_on_the_selection_split():
    """A network that always answers class 1: 100 % on a selection split of ones, 0 % on the others."""
    splits = _constant_splits(8, train=0, select=1)
    model = _class_biased_linear([0.0, 1.0, 0.0])
    with torch.no_grad():
        model[1].weight.zero_()
    data = validate({})["data"]
    score = pruning.scorer(splits, SearchConfig(holdout_images=5, calibration_batches=1, adapt_steps=0), data, 0)
    assert score(model)["top1"] == 100.0


def test_adaptation_trains_a_copy_on_training_batches():
    """Adapting on training images of class 0 turns a class-1 network into a class-0 one for scoring only."""
    splits = _constant_splits(64, train=0, select=0)
    model = _class_biased_linear([0.0, 5.0, 0.0])
    before = model[1].bias.clone()
    cfg = SearchConfig(holdout_images=64, calibration_batches=1, adapt_steps=20, adapt_lr=0.5)
    data = {**validate({})["data"], "batch_size": 16}
    assert pruning.scorer(splits, cfg, data, 0)(model)["top1"] > 90
    assert torch.equal(model[1].bias, before), "the candidate keeps its cut dense weights"
    unadapted = dataclasses.replace(cfg, adapt_steps=0)
    assert pruning.scorer(splits, unadapted, data, 0)(model)["top1"] == 0.0


def test_mpc_cost_is_crypten_bytes_and_rounds_without_compute(mbv2):
    from depthshrinker.deploy.mpc.cost import NETWORKS, count
    from depthshrinker.deploy.mpc.engine import as_plain

    cost = pruning.COSTS["mpc"](validate({"data": {"image_size": 16}, "mpc": {"network": "wan"}}))(mbv2)
    counts, wan = count(as_plain(mbv2), 16), NETWORKS["wan"]
    assert cost == pytest.approx(counts.rounds * wan.rtt_s + counts.bytes / 2 * 8 / wan.bandwidth_bit_s)
    with pytest.raises(ConfigError, match="mpc.network"):
        pruning.COSTS["mpc"](validate({"mpc": {"network": "loopback"}}))


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.5, 0.01])
def test_metaprune_end_to_end(micro_config, tmp_path, budget):
    from depthshrinker.methods.baselines import train_dense

    train_dense(micro_config, tmp_path / "dense.pt")
    config = {**micro_config, "metapruning": {"population": 3, "generations": 2, "holdout_images": 32,
                                              "calibration_batches": 1, "adapt_steps": 2}}
    metrics = pruning.metaprune(config, tmp_path / "dense.pt", tmp_path / "mp.pt", budget, at_least_narrowest=True)
    search_result, raised = metrics["search"], budget == 0.01
    dense_cost = search_result["dense_cost"]
    assert search_result["winner_cost"] <= search_result["budget_cost"]
    assert (search_result["budget_cost"] == 0.5 * dense_cost) != raised
    assert search_result["uniform_select_top1"] == search_result["history"][0]["top1"] <= search_result["select_top1"]
    assert list(search_result["genes"]) == stages(create_model("mobilenetv2_100", 10))
    written = json.loads((tmp_path / "mp.json").read_text())
    assert written["search"]["genes"] == search_result["genes"]
    assert written["row"] == {"budget_raised": raised, "budget_requested": budget,
                              "budget_used": pytest.approx(search_result["budget_cost"] / dense_cost)}
    model, spec = load_model(tmp_path / "mp.pt")
    assert spec["kind"] == "pruned" and macs(model, 16) == search_result["winner_cost"]
