"""Latency-aware DepthShrinker search and the SNL baselines: budgets, exact per-layer ratios, determinism, SNL
element's λ schedule, its own mask optimiser, its α-threshold binarization and its finetuning from the search."""
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from depthshrinker.base.bits import decode_bits
from depthshrinker.base.checkpoint import load
from depthshrinker.deploy.load import load_model
from depthshrinker.methods.baselines import train_dense
from depthshrinker.methods.finetune import finetune
from depthshrinker.methods.search import extract, land_on_budget, search
from depthshrinker.nets.counting import nonlinear
from depthshrinker.nets.gates import SNLBudget, SoftMaskAct
from depthshrinker.train import Recipe, fit

# SNL element on 128 digits at 16x16 (8 steps per epoch): a large λ₀ and mask lr reach the budget in 2 epochs.
FAST_SNL = {"snl_lambda": 0.1, "snl_mask_lr": 0.1, "snl_warmup": 0, "snl_epochs": 3}


@pytest.fixture(scope="module")
def dense(tmp_path_factory, request):
    from depthshrinker.base.config import validate

    tmp = tmp_path_factory.mktemp("dense")
    cfg = validate({"data": {"image_size": 16, "batch_size": 16, "eval_batch_size": 64, "limit": 128},
                    "model": {"pretrained": "none"},
                    "stages": {"dense": {"epochs": 1, "lr": 2.0}, "search": {"epochs": 1, "lr": 2.0},
                               "finetune": {"epochs": 1, "lr": 2.0}}})
    train_dense(cfg, tmp / "dense.pt")
    return cfg, tmp / "dense.pt"


def _with_search(cfg, **keys):
    return {**cfg, "stages": {**cfg["stages"], "search": {**cfg["stages"]["search"], **keys}}}


def test_large_latency_weight_removes_the_biggest_saving_first(dense, tmp_path):
    cfg, ckpt = dense
    table = tmp_path / "costs.csv"
    rows = ["# unit of measure: ms", "unit,name,before,after"]
    rows += [f"{i},u{i},{10.0 if i == 7 else 1.0},{0.0 if i == 7 else 0.5}" for i in range(19)]
    table.write_text("\n".join(rows) + "\n")
    search(_with_search(cfg, latency_weight=1e4), ckpt, tmp_path / "s.pt", "depthshrinker", "block", 18 / 19, table)
    mask = extract(tmp_path / "s.pt", tmp_path / "m.json")
    assert [i for i, k in enumerate(mask["keep"]) if not k] == [7]


@pytest.mark.parametrize("granularity", ["channel", "pixel"])
def test_snl_keep_ratio_is_exact_in_every_layer_and_seeded(dense, tmp_path, granularity):
    cfg, ckpt = dense
    for run in ("a", "b"):
        search(cfg, ckpt, tmp_path / f"{run}.pt", "snl", granularity, 0.4)
    a, b = extract(tmp_path / "a.pt", tmp_path / "a.json"), extract(tmp_path / "b.pt", tmp_path / "b.json")
    assert a == b
    assert len(a["layers"]) == 35
    for layer in a["layers"]:
        mask = decode_bits(layer["bits"], layer["shape"])
        n = mask.numel()
        assert mask.sum() == max(0, min(n, round(0.4 * n))), layer["name"]
        assert (mask.shape[1] == 1) == (granularity == "pixel")
    finetune(cfg, ckpt, tmp_path / "a.json", tmp_path / "ft.pt")
    model, _ = load_model(tmp_path / "ft.pt")
    counts = nonlinear(model, 16)
    assert counts["nonlinear_units"] == a["nonlinear_units"]
    # SNL keeps every layer that has an entry left after rounding (at 16x16, 1x1 pixel maps round to 0 at 0.4)
    assert counts["nonlinear_layers"] == sum(layer["kept"] > 0 for layer in a["layers"])
    assert granularity == "pixel" or counts["nonlinear_layers"] == 35


def test_snl_budget_schedule_warmup_growth_and_stop():
    snl = SNLBudget(budget=100, lam=1.0, growth=2.0, warmup=2, total=1000)
    assert not snl.end_epoch(0, 1000) and float(snl.lam) == 1.0, "no new low, but still warming up"
    assert not snl.end_epoch(1, 900) and float(snl.lam) == 1.0 and int(snl.best) == 900, "a new low"
    assert not snl.end_epoch(2, 900) and float(snl.lam) == 2.0, "past the warm-up, no new low: grow"
    assert not snl.end_epoch(3, 950) and float(snl.lam) == 4.0 and int(snl.best) == 900
    assert not snl.end_epoch(4, 500) and float(snl.lam) == 4.0, "a new low does not grow λ"
    assert snl.end_epoch(5, 100) and snl.end_epoch(6, 40), "at or under the budget: stop"
    assert not SNLBudget(100, 1.0, 2.0).end_epoch(0, 101)


def test_snl_masks_train_in_their_own_adam_outside_the_clip(tmp_path):
    """A clip of 1e-9 freezes the weights, not the masks: Adam's first step moves every α by exactly its lr."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    gate = SoftMaskAct(torch.nn.ReLU(), (1, 4, 8, 8))
    model = torch.nn.Sequential(conv, gate, torch.nn.Flatten(), torch.nn.Linear(256, 2))
    w0 = conv.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])), batch_size=4)
    recipe = Recipe(epochs=1, lr=0.5, grad_clip=1e-9, mask_lr=0.01, label_smoothing=0.0, weight_decay=0.0)
    fit(model, data, data, recipe, tmp_path / "x.last", regularizer=lambda m: 1e-3 * m[1].alpha.abs().sum())
    step = (gate.alpha.detach() - 1).abs()
    assert torch.allclose(step, torch.full_like(step, 0.01), atol=1e-4)
    assert (conv.weight.detach() - w0).abs().max() < 1e-8


def test_land_on_budget_shortens_the_last_step():
    gate = SoftMaskAct(torch.nn.ReLU(), (1, 1000))
    before = [torch.linspace(0.5, 1.0, 1000).view(1, 1000)]
    with torch.no_grad():
        gate.alpha.copy_(before[0] - 0.9)  # a full step removes all 1000 elements
    count = land_on_budget([gate], before, budget=400)
    assert 396 <= count <= 400 and count == SNLBudget.count([gate])


def test_snl_element_reaches_its_budget_and_finetunes_the_searched_weights(dense, tmp_path):
    cfg, ckpt = dense
    total = nonlinear(load_model(ckpt)[0], 16)["nonlinear_units"]
    metrics = search(_with_search(cfg, **FAST_SNL), ckpt, tmp_path / "e.pt", "snl", "element", 0.3)
    budget = round(0.3 * total)
    assert metrics["budget"] == budget and metrics["budget_reached"] and metrics["epochs"] < 3
    mask = extract(tmp_path / "e.pt", tmp_path / "e.json")
    assert 0.99 * budget <= mask["nonlinear_units"] <= budget and mask["budget_reached"]
    searched = load(tmp_path / "e.pt")["state_dict"]
    for layer in mask["layers"]:  # binarized at α > 0.01, not the budget's largest α
        alpha = searched[f"{layer['name']}.alpha"]
        assert torch.equal(decode_bits(layer["bits"], layer["shape"]).bool(), alpha > 0.01), layer["name"]

    cfg_ft = {**cfg, "stages": {**cfg["stages"], "finetune": {"epochs": 1, "lr": 1e-12}}}
    finetune(cfg_ft, ckpt, tmp_path / "e.json", tmp_path / "ft.pt")
    tuned, dense_state = load(tmp_path / "ft.pt")["state_dict"], load(ckpt)["state_dict"]
    weight = "blocks.3.0.conv_pw.weight"
    assert torch.allclose(tuned[weight], searched[weight]) and not torch.allclose(tuned[weight], dense_state[weight])
    assert nonlinear(load_model(tmp_path / "ft.pt")[0], 16)["nonlinear_units"] == mask["nonlinear_units"]
    assert json.loads((tmp_path / "ft.json").read_text())["row"] == {"budget": budget, "budget_reached": True,
                                                                      "search_epochs": metrics["epochs"]}


def test_snl_element_that_misses_its_budget_says_so(dense, tmp_path):
    """The published schedule (λ₀ 1e-5, mask lr 1e-3) cannot reach 30 % in one epoch of 8 steps: the mask keeps
    what α > 0.01 keeps (no fallback to the budget's largest α) and the metrics say the budget was missed."""
    cfg, ckpt = dense
    metrics = search(_with_search(cfg, snl_epochs=1), ckpt, tmp_path / "e.pt", "snl", "element", 0.3)
    mask = extract(tmp_path / "e.pt", tmp_path / "e.json")
    assert not metrics["budget_reached"] and not mask["budget_reached"]
    assert mask["nonlinear_units"] == metrics["active_elements"] > metrics["budget"]


def test_land_on_budget_splits_ties_in_layer_order():
    gates = [SoftMaskAct(torch.nn.ReLU(), (1, 300)) for _ in range(2)]
    before = [torch.full((1, 300), 0.02), torch.full((1, 300), 0.02)]
    for gate in gates:
        with torch.no_grad():
            gate.alpha.fill_(0.0)  # 600 elements cross the threshold at exactly the same point
    assert land_on_budget(gates, before, budget=400) == 400
    assert (gates[0].alpha > 0.01).all() and (gates[1].alpha > 0.01).sum() == 100
    assert (gates[1].alpha[0, :100] > 0.01).all(), "the first in layer order"
