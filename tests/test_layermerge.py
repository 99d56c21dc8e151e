"""LayerMerge (Kim et al., ICML 2024) on the network IR: its options drop convs, the dropped form merges exactly and
costs what its table says, the entries and their forms, the plan, and a LayerMerge cell finetuned and merged."""
from __future__ import annotations

import random

import pytest
import torch

from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.merge import head_input, merge_checkpoint, merge_segments
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.segment_cost import segment_costs
from depthshrinker.deploy.segment_form import segment_form
from depthshrinker.deploy.segments import body, kept_convs, segment_options
from depthshrinker.methods import depthdp, layermerge
from depthshrinker.methods.baselines import train_dense
from depthshrinker.methods.finetune import finetune
from depthshrinker.methods.importance import importance
from depthshrinker.nets.registry import create_model
from test_backbones import random_bn_stats
from test_segment_form import random_choice


def random_options(b, rng: random.Random):
    """A random partition into valid segments, a random option of each (random norms choose the kept convs),
    LayerMerge's activations at the segment ends; (segments, acts, dropped, option per segment)."""
    segments, _ = random_choice(b, rng)
    norms = {p: rng.random() for p in range(1, len(b) + 1)}
    options = [rng.choice(segment_options(b, s, e)) for s, e in segments]
    dropped = {p for (s, e), o in zip(segments, options) for p in set(range(s + 1, e + 1)) - set(kept_convs(b, s, e, o, norms))}
    acts = {e for s, e in segments if layermerge.ends_with_act(b, s, e)}
    return segments, acts, dropped, options


@pytest.mark.parametrize("arch, size, seed", [("resnet18_cifar", 16, 0), ("resnet18_cifar", 16, 1),
                                              ("resnet34", 32, 0), ("mobilenetv2_100", 32, 0)])
def test_dropped_convs_merge_exactly_and_cost_what_the_table_says(arch, size, seed):
    """Random options (convs dropped, residual branches emptied, shortcuts folded): in float64 the merged network
    equals the trained form to rounding, each segment is one conv of its option's kernel, and outside + Σ options
    + Σ kept activations is exactly the cost model's count of the merged network."""
    rng = random.Random(seed)
    model = create_model(arch, 10, small_input=True)
    random_bn_stats(model, seed)
    b = body(model)
    table = segment_costs(create_model(arch, 10, small_input=True), size)
    for _ in range(3):
        segments, acts, dropped, options = random_options(b, rng)
        chain = segment_form(create_model(arch, 10, small_input=True), segments, acts, dropped=dropped)
        chain.model.load_state_dict(model.state_dict())
        chain = chain.eval().double()
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            merged = merge_segments(chain)
            assert torch.allclose(merged(x), chain(x), rtol=0, atol=1e-9)
        total = table.outside
        for (s, e), o in zip(segments, options):
            total += table.option[s, e, o.label]
        for p in acts:
            total += table.act[p]
        assert total == mpc_cost.count(merged.spec, size)
        with torch.no_grad():  # the features before the head, also where the last block's first conv is dropped
            assert torch.allclose(head_input(merged, x), head_input(chain, x), rtol=0, atol=1e-9)
        kernels = {tuple(f): c["kernel"] for blk in merged.spec["blocks"] if "merged_from" in blk
                   for f, c in zip(blk["merged_from"], blk["convs"])}
        assert all(kernels[tuple(range(s + 1, e + 1))] == o.kernel for (s, e), o in zip(segments, options))
    assert dropped  # the draws did drop convs


def test_options_keep_the_convs_of_largest_norm_and_the_reference_combination():
    """ResNet-18's first basic block (positions 1, 2, both reducible 3x3s) and MobileNetV2's block 2 (1x1 expand,
    3x3 depthwise, 1x1 project: only the depthwise conv reducible)."""
    b = body(create_model("resnet18_cifar", 10))
    options = segment_options(b, 0, 2)
    assert [o.label for o in options] == ["k3", "k5"]
    assert kept_convs(b, 0, 2, options[0], {1: 5.0, 2: 7.0}) == [2]
    assert kept_convs(b, 0, 2, options[0], {1: 7.0, 2: 5.0}) == [1]
    mb = body(create_model("mobilenetv2_100", 10))
    s = next(p for p in range(len(mb)) if mb.convs[p].kernel == 1 and mb.convs[p + 1].depthwise
             and mb.convs[p + 1].reducible)
    labels = [o.label for o in segment_options(mb, s, s + 3)]
    assert labels == ["k1", "k3"]  # the depthwise conv dropped, or kept
    assert kept_convs(mb, s, s + 3, segment_options(mb, s, s + 3)[0], {s + 2: 1.0}) == [s + 1, s + 3]
    with pytest.raises(ConfigError, match=r"cannot be dropped"):
        segment_form(create_model("mobilenetv2_100", 10), [(p, p + 1) for p in range(len(mb))], set(), dropped={s + 1})
    with pytest.raises(ConfigError, match=r"would drop every conv"):
        segment_form(create_model("resnet18_cifar", 10), [(0, 2)] + [(p, p + 1) for p in range(2, len(b))], set(),
                     dropped={1, 2})


def test_entries_and_their_forms():
    b = body(create_model("resnet18_cifar", 10))
    entries = layermerge.entries(b)
    assert len(entries) == 30 and entries[:3] == [(0, 1, "k3"), (0, 2, "k3"), (0, 2, "k5")]
    assert layermerge.parse_entry("0-2-k5") == (0, 2, "k5") and layermerge.parse_entry("0-2-1-1") is None
    segments, acts, dropped = layermerge.entry_form(b, (0, 2, "k3"), {1: 1.0, 2: 2.0})
    assert segments[0] == (0, 2) and 1 not in acts and 2 in acts and dropped == {1}
    with pytest.raises(ConfigError, match="'0-3-k3' is not a segment option"):
        layermerge.entry_form(b, (0, 3, "k3"), {})
    mb = body(create_model("mobilenetv2_100", 10))
    assert len(layermerge.entries(mb)) == 391
    assert mb.convs[1].act == "none"  # block 1 (depthwise, projection) ends without an activation
    assert layermerge.ends_with_act(mb, 0, 2) and not layermerge.ends_with_act(mb, 1, 2)
    assert [o.label for o in segment_options(mb, 0, 2)] == ["k1", "k3"]
    segments, acts, dropped = layermerge.entry_form(mb, (2, 5, "k3"), {})  # from a projection: none added there
    assert acts == depthdp.dense_acts(mb) - {3, 4} | {5} and segments[2] == (2, 5) and not dropped


def _synthetic(tmp_path, b, skip=()):
    """Reports of every entry: a segment of n convs loses 20-30 points per conv merged or dropped beyond the
    first, so that with exp(Δ/100) per segment keeping every activation is the best choice."""
    rng, paths = random.Random(0), []
    norms = {p: rng.random() for p in range(1, len(b) + 1)}
    for entry in layermerge.entries(b):
        if entry in skip:
            continue
        s, e, label = entry
        delta = -rng.uniform(20, 30) * (e - s - 1) - rng.uniform(0, 1)
        paths.append(tmp_path / "lm" / f"{layermerge.entry_key(entry)}.json")
        write_json(paths[-1], {"entry": list(entry), "delta_top1": delta, "delta_loss": -delta / 100,
                               "base_loss": 1.0, "dropped": sorted(layermerge.entry_form(b, entry, norms)[2])})
    return paths


def test_plan_meets_the_budget_and_its_latency_is_the_deployed_networks(table_config, tmp_path):
    config, lat = table_config
    b = body(create_model("mobilenetv2_100", 10, True))
    paths = _synthetic(tmp_path, b)
    mask = layermerge.plan(config, 0.6, lat, paths, tmp_path / "mask.json")
    dp = mask["dp"]
    assert dp["latency"] <= dp["budget_latency"] == pytest.approx(0.6 * dp["dense_latency"])
    assert dp["entries"] == 391 and mask["granularity"] == "layermerge"
    chain = segment_form(create_model("mobilenetv2_100", 10, True).eval(), [tuple(s) for s in mask["segments"]],
                         set(mask["acts"]), dropped=set(mask["dropped"]))
    merged = merge_segments(chain.eval())
    size, network = config["data"]["image_size"], config["mpc"]["network"]
    assert mpc_cost.latency(mpc_cost.count(merged.spec, size), network) == pytest.approx(dp["latency"], rel=1e-12)
    loose = layermerge.plan(config, 1.0, lat, paths, tmp_path / "loose.json")
    assert loose["num_segments"] == len(b) and set(loose["acts"]) == depthdp.dense_acts(b)
    bad = read_json(paths[5]) | {"dropped": []}
    write_json(tmp_path / "bad" / paths[5].name, bad)
    with pytest.raises(ConfigError, match=rf"{paths[5].name}: drops \[\] convs, not what option"):
        layermerge.plan(config, 0.6, lat, [*paths[:5], tmp_path / "bad" / paths[5].name, *paths[6:]], tmp_path / "m.json")
    with pytest.raises(ConfigError, match=r"no importance for entries 0-1-k3d \(1 missing\)"):
        layermerge.plan(config, 0.6, lat, _synthetic(tmp_path, b, skip={(0, 1, "k3d")}), tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_importance_of_an_option_then_a_layermerge_cell_finetunes_and_merges_exactly(table_config, tmp_path):
    """An option that drops a conv is measured with that conv the identity (the report names it); a planned
    LayerMerge mask that drops convs finetunes, reloads and merges exactly, at the latency the DP planned."""
    config, lat = table_config
    train_dense(config, tmp_path / "dense.pt")
    mb = body(create_model("mobilenetv2_100", 10, True))
    s = next(p for p in range(len(mb)) if mb.convs[p].kernel == 1 and mb.convs[p + 1].reducible)
    report = importance(config, tmp_path / "dense.pt", f"{s}-{s + 3}-k1", tmp_path / "one.json")
    assert report["entry"] == [s, s + 3, "k1"] and report["dropped"] == [s + 2]
    paths = _synthetic(tmp_path, mb)
    write_json(paths[layermerge.entries(mb).index((s, s + 3, "k1"))], {**report, "delta_top1": 50.0})
    mask = layermerge.plan(config, 0.6, lat, paths, tmp_path / "mask.json")
    assert f"{s}-{s + 3}-k1" in mask["dp"]["options"] and s + 2 in mask["dropped"]  # the one option that gains
    finetune(config, tmp_path / "dense.pt", tmp_path / "mask.json", tmp_path / "ft.pt")
    model, spec = load_model(tmp_path / "ft.pt")
    assert spec["mask"]["dropped"] == mask["dropped"]
    out = merge_checkpoint(tmp_path / "ft.pt", tmp_path / "merged.pt", config)
    assert out["merge_feature_rel_err"] < 1e-5
    merged, _ = load_model(tmp_path / "merged.pt")
    size = config["data"]["image_size"]
    assert mpc_cost.latency(mpc_cost.count(merged.spec, size), config["mpc"]["network"]) == \
        pytest.approx(mask["dp"]["latency"], rel=1e-12)
