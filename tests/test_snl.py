"""Latency-aware DepthShrinker search and the SNL baselines: budgets, exact per-layer ratios, determinism."""
import pytest
import torch

from depthshrinker.baselines import train_dense
from depthshrinker.counting import nonlinear
from depthshrinker.finetune import finetune
from depthshrinker.bits import decode_bits
from depthshrinker.search import extract, search


@pytest.fixture(scope="module")
def dense(tmp_path_factory, request):
    from depthshrinker.config import validate

    tmp = tmp_path_factory.mktemp("dense")
    cfg = validate({"data": {"image_size": 16, "batch_size": 16, "eval_batch_size": 64, "limit": 128},
                    "model": {"pretrained": "none"},
                    "stages": {"dense": {"epochs": 1, "lr": 2.0}, "search": {"epochs": 1, "lr": 2.0},
                               "finetune": {"epochs": 1, "lr": 2.0}}})
    train_dense(cfg, tmp / "dense.pt")
    return cfg, tmp / "dense.pt"


def test_large_latency_weight_removes_the_biggest_saving_first(dense, tmp_path):
    cfg, ckpt = dense
    cfg = {**cfg, "stages": {**cfg["stages"], "search": {**cfg["stages"]["search"], "latency_weight": 1e4}}}
    table = tmp_path / "costs.csv"
    rows = ["# unit of measure: ms", "unit,name,before,after"]
    rows += [f"{i},u{i},{10.0 if i == 7 else 1.0},{0.0 if i == 7 else 0.5}" for i in range(19)]
    table.write_text("\n".join(rows) + "\n")
    search(cfg, ckpt, tmp_path / "s.pt", "depthshrinker", "block", 18 / 19, table)
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
    out = finetune(cfg, ckpt, tmp_path / "a.json", tmp_path / "ft.pt")
    from depthshrinker.checkpoint import load_model

    model, _ = load_model(tmp_path / "ft.pt")
    counts = nonlinear(model, 16)
    assert counts["nonlinear_units"] == a["nonlinear_units"]
    # SNL keeps every layer that has an entry left after rounding (at 16x16, 1x1 pixel maps round to 0 at 0.4)
    assert counts["nonlinear_layers"] == sum(layer["kept"] > 0 for layer in a["layers"])
    assert granularity == "pixel" or counts["nonlinear_layers"] == 35
    assert out["top1"] >= 0


def test_snl_element_search_ends_on_its_global_budget(dense, tmp_path):
    cfg, ckpt = dense
    from depthshrinker.checkpoint import load_model

    total = nonlinear(load_model(ckpt)[0], 16)["nonlinear_units"]
    search(cfg, ckpt, tmp_path / "e.pt", "snl", "element", 0.3)
    mask = extract(tmp_path / "e.pt", tmp_path / "e.json")
    assert abs(mask["nonlinear_units"] - round(0.3 * total)) <= 0.01 * round(0.3 * total)
    history = torch.load(tmp_path / "e.pt", weights_only=True)["metrics"]
    assert "snl_lambda" in history
