"""Stage 1 search and mask extraction."""
import json

import torch

from depthshrinker.baselines import train_dense
from depthshrinker.checkpoint import load, save
from depthshrinker.finetune import finetune
from depthshrinker.gates import install_topk_gates
from depthshrinker.models import activation_units, create_model
from depthshrinker.search import extract, search


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
    b = extract(path, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert [i for i, k in enumerate(a["keep"]) if k] == [0, 3, 5, 7, 11, 13, 17, 18]
    assert a["num_kept"] == sum(a["keep"]) == 8
    assert [u["name"] for u in a["units"]][:3] == ["stem", "blocks.0.0", "blocks.1.0"]


def test_search_then_finetune_end_to_end(micro_config, tmp_path):
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
    assert spec["mask"]["keep"] == m1["keep"] and metrics["top1"] >= 0
    assert json.loads((tmp_path / "ft.json").read_text())["stage"] == "finetune"
