"""Stage 1 search and mask extraction: deterministic extraction, the latency regulariser's sign, the end-to-end
search -> extract -> finetune path."""
import json
import re

import pytest
import torch

from depthshrinker.base.checkpoint import load, save
from depthshrinker.base.config import validate
from depthshrinker.methods.baselines import train_dense
from depthshrinker.methods.finetune import finetune
from depthshrinker.methods.search import Settling, extract, hard_decisions, latency_regularizer, search
from depthshrinker.nets.gates import install_topk_gates
from depthshrinker.nets.registry import create_model, offline_weights_path
from depthshrinker.nets.units import activation_units


def _search_ckpt(tmp_path, scores):
    model = create_model("mobilenetv2_100", 10, small_input=True)
    gates = install_topk_gates(model, activation_units(model), 0.4)
    with torch.no_grad():
        gates.scores.copy_(torch.tensor(scores))
    spec = {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": True,
            "gates": {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4}}
    save(tmp_path / "search.pt", model, spec)
    return tmp_path / "search.pt"


def test_extract_keeps_the_smallest_scores_deterministically(tmp_path):
    scores = [0.5] * 19
    for i in (0, 3, 5, 7, 11, 13, 17, 18):
        scores[i] = -1.0 + i / 100
    path = _search_ckpt(tmp_path, scores)
    a = extract(path, tmp_path / "a.json")
    extract(path, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert [i for i, k in enumerate(a["keep"]) if k] == [0, 3, 5, 7, 11, 13, 17, 18]
    assert a["num_kept"] == sum(a["keep"]) == 8
    assert [u["name"] for u in a["units"]][:3] == ["stem", "blocks.0.0", "blocks.1.0"]


def test_latency_regularizer_removes_the_units_with_the_largest_savings(mbv2):
    """``− λ Σ Δ_i ŝ_i``: a descent step raises each score by lr·λ·Δ_i, and a larger score means "remove", so
    from equal scores the units that save the most are removed first (the upstream sign kept them)."""
    gates = install_topk_gates(mbv2, activation_units(mbv2), 0.6)
    savings = torch.rand(19, generator=torch.Generator().manual_seed(0))
    latency_regularizer(savings, 2.0)(mbv2).backward()
    assert torch.allclose(gates.scores.grad, -2.0 * savings)
    torch.optim.SGD([gates.scores], lr=1.0).step()
    removed = sorted(i for i, keep in enumerate(gates.keep().tolist()) if not keep)
    assert removed == sorted(torch.topk(savings, 19 - round(0.6 * 19)).indices.tolist())


def test_search_then_finetune_end_to_end(micro_config, tmp_path):
    """From the offline ImageNet weights (installed by `make setup`), 128 digits at 16x16 learn far above
    chance."""
    if offline_weights_path("mobilenetv2_100") is None:
        pytest.skip("the offline ImageNet weights package is not installed")
    stages = {stage: {**micro_config["stages"][stage], "lr": 1.0} for stage in ("dense", "search", "finetune")}
    stages["dense"]["epochs"] = stages["finetune"]["epochs"] = 3
    micro_config = {**micro_config, "model": {**micro_config["model"], "pretrained": "auto"},
                    "stages": {**micro_config["stages"], **stages}}
    dense = tmp_path / "dense.pt"
    train_dense(micro_config, dense)
    search(micro_config, dense, tmp_path / "s1.pt", "depthshrinker", "block", 0.5)
    search(micro_config, dense, tmp_path / "s2.pt", "depthshrinker", "block", 0.5)
    m1, m2 = extract(tmp_path / "s1.pt", tmp_path / "m1.json"), extract(tmp_path / "s2.pt", tmp_path / "m2.json")
    assert m1 == m2, "same seed, same mask"
    scores = load(tmp_path / "s1.pt")["state_dict"]["ds_gates.scores"]
    assert scores.abs().sum() > 0, "the scores trained"
    metrics = finetune(micro_config, dense, tmp_path / "m1.json", tmp_path / "ft.pt")
    spec = load(tmp_path / "ft.pt")["spec"]
    assert spec["mask"]["keep"] == m1["keep"] and sum(m1["keep"]) == 10
    # what training must do on any machine (the figure itself moves with the CPU's floating-point sums): the
    # loss falls, and top-1 on 128 held-out images is far above chance (10 %; 25 % is p < 1e-4 by chance)
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["top1"] > 25 and metrics["teacher_agreement"] > 25
    assert m1["row"]["search_epochs"] == 1 and m1["row"]["search_mask_changes_last_epoch"] >= 0
    assert json.loads((tmp_path / "ft.json").read_text())["stage"] == "finetune"
    again = finetune(micro_config, dense, tmp_path / "m2.json", tmp_path / "ft2.pt")  # same seed, same numbers
    assert again["top1"] == metrics["top1"]
    assert again["history"][-1]["train_loss"] == metrics["history"][-1]["train_loss"]
    first, second = load(tmp_path / "ft.pt")["state_dict"], load(tmp_path / "ft2.pt")["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("content, message", [
    ({"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.4}, "depthshrinker mask without 'keep'"),
    ({"granularity": "block"}, "not a mask file"),
    ({"method": "snl", "granularity": "pixel", "keep_ratio": 0.4, "layers": [{"name": "a", "shape": [1]}]},
     r"layers\[0\] without 'bits'"),
])
def test_a_malformed_mask_stops_with_one_line_naming_the_file(tmp_path, capsys, content, message):
    from depthshrinker.base.jsonio import write_json
    from depthshrinker.cli import main

    write_json(tmp_path / "bad.json", content)
    assert main(["finetune", "--dense", "d.pt", "--mask", str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "m.pt")], config=validate({})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(f"bad.json: {message}", err), err
    assert not (tmp_path / "m.pt").exists()


def test_settling_counts_the_decisions_changed_over_an_epoch(mbv2):
    """Net change from the start to the end of the epoch; an epoch without one ends a settling search (and only
    then)."""
    gates = install_topk_gates(mbv2, activation_units(mbv2), 0.4)  # 8 of 19 keep; zeros: units 0-7 keep
    settling = Settling(mbv2, stop=True)
    with torch.no_grad():
        gates.scores[0] = 1.0  # unit 0 removed, unit 8 kept
        gates.scores[1] = 1.0  # unit 1 removed, unit 9 kept
    record = {}
    assert settling.epoch_end(0, mbv2, record) is False and record["mask_changes"] == 4
    with torch.no_grad():
        gates.scores[1] = -1.0  # back: unit 1 kept, unit 9 removed
    assert settling.epoch_end(1, mbv2, record) is False and record["mask_changes"] == 2
    assert settling.epoch_end(2, mbv2, record) is True and record["mask_changes"] == 0
    assert Settling.summary([record]) == {"mask_changes_last_epoch": 0, "mask_settled": True}
    assert Settling(mbv2, stop=False).epoch_end(0, mbv2, {}) is False
    assert hard_decisions(mbv2).sum() == 8
