"""depthdp: Kim et al. (ICML 2023) as the authors run it: entries, the exact MPC latency table, the importance
stage, the plan, and a depthdp cell finetuned and merged."""
from __future__ import annotations

import random

import pytest
import torch

from depthshrinker.base.checkpoint import load, save
from depthshrinker.base.config import ConfigError
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.merge import merge_checkpoint, merge_segments
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.segment_cost import segment_costs
from depthshrinker.deploy.segment_form import segment_form
from depthshrinker.deploy.segments import body, valid_segments
from depthshrinker.methods import depthdp
from depthshrinker.methods.baselines import train_dense
from depthshrinker.methods.finetune import finetune
from depthshrinker.methods.importance import importance, reinit
from depthshrinker.nets.chain import ChainNet
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from test_backbones import random_bn_stats
from test_segment_form import random_choice


def test_entries_are_one_per_segment_or_the_reference_block_end_options(mbv2):
    b = body(mbv2)
    plain = depthdp.entries(b)
    assert len(plain) == 171 and [(s, e) for s, e, _, _ in plain] == valid_segments(b)
    assert (3, 5, 1, 0) in plain and (3, 5, 1, 1) not in plain       # MobileNetV2's block ends have no activation
    extended = depthdp.entries(b, add_relu=True)
    assert set(plain) < set(extended) and (3, 5, 1, 1) in extended
    assert all(p in b.block_ends for s, e, a, z in extended for p, k in ((s, a), (e, z)) if not k)
    resnet = body(create_model("resnet18_cifar", 10))
    assert depthdp.entries(resnet) == depthdp.entries(resnet, add_relu=True)  # every position has a ReLU
    assert all(a == z == 1 for *_, a, z in depthdp.entries(resnet))


def test_entry_form_makes_only_that_segment_linear(mbv2):
    b = body(mbv2)
    segments, acts = depthdp.entry_form(b, (3, 5, 1, 0))
    assert (3, 5) in segments and len(segments) == len(b) - 1
    assert acts == depthdp.dense_acts(b) - {4}
    with pytest.raises(ConfigError, match="expected s-e-a-b"):
        depthdp.parse_entry("3-5-1")


def test_a_single_conv_entry_reinitialises_that_conv_and_its_norm_only(mbv2):
    """The reference measures a single conv with its weights re-initialised (what the normalisation averages)."""
    b = body(mbv2)
    random_bn_stats(mbv2, 0)
    before = {k: v.clone() for k, v in mbv2.state_dict().items()}
    reinit(mbv2, b, 4, seed=0)
    changed = {k.rsplit(".", 1)[0] for k, v in mbv2.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"blocks.1.0.conv_dw", "blocks.1.0.bn2"}


@pytest.mark.parametrize("arch, size", [("mobilenetv2_100", 16), ("resnet18_cifar", 16), ("resnet34", 32)])
def test_latency_table_adds_up_to_the_cost_of_the_merged_network(arch, size):
    """outside + Σ segments + Σ kept activations is exactly the cost model's count of the deployed network, for
    random segment sets (swallowed residual blocks, projection shortcuts, added ReLU6s)."""
    model = create_model(arch, 10, small_input=True).eval()
    table = segment_costs(model, size)
    for seed in range(3):
        segments, acts = random_choice(table.body, random.Random(seed))
        merged = merge_segments(segment_form(create_model(arch, 10, small_input=True).eval(), segments, acts).eval())
        total = table.outside
        for seg in segments:
            total += table.segment[seg]
        for p in acts:
            total += table.act[p]
        assert total == mpc_cost.count(merged.spec, size)


def _synthetic(tmp_path, b, seed=0, skip=()):
    """Importance reports of every entry: each conv linearised or re-initialised loses 20-30 points, so that
    after the normalisation (+1.6 x 25 per segment) keeping every activation is the best choice."""
    rng, paths = random.Random(seed), []
    for entry in depthdp.entries(b):
        if entry in skip:
            continue
        s, e = entry[:2]
        delta = -rng.uniform(20, 30) * (e - s)
        paths.append(tmp_path / f"imp{seed}" / f"{depthdp.entry_key(entry)}.json")
        write_json(paths[-1], {"entry": list(entry), "delta_top1": delta, "delta_loss": -delta / 100})
    return paths


def test_plan_meets_the_budget_and_its_latency_is_the_deployed_networks(table_config, tmp_path):
    config, lat = table_config
    b = body(create_model("mobilenetv2_100", 10, True))
    paths = _synthetic(tmp_path, b)
    mask = depthdp.plan(config, 0.5, lat, paths, tmp_path / "mask.json")
    dp = mask["dp"]
    assert dp["latency"] <= dp["budget_latency"] == pytest.approx(0.5 * dp["dense_latency"])
    assert dp["entries"] == 171 and read_json(tmp_path / "mask.json") == mask
    model = segment_form(create_model("mobilenetv2_100", 10, True).eval(), [tuple(s) for s in mask["segments"]],
                         set(mask["acts"]))
    merged = merge_segments(model.eval())
    size, network = config["data"]["image_size"], config["mpc"]["network"]
    assert mpc_cost.latency(mpc_cost.count(merged.spec, size), network) == pytest.approx(dp["latency"], rel=1e-12)
    loose = depthdp.plan(config, 1.0, lat, paths, tmp_path / "loose.json")
    assert set(loose["acts"]) == depthdp.dense_acts(b)  # every activation kept; only linear chains merge
    assert all(not depthdp.dense_acts(b) & set(range(s + 1, e)) for s, e in loose["segments"])
    assert loose["num_segments"] < len(b)


def test_diagnose_scores_a_depthshrinker_mask_in_the_dp_table(table_config, tmp_path):
    """Keeping every activation: the DepthShrinker mask is the DP's loose optimum, to the last digit; removing
    block units leaves fewer activations and less importance (each linearised conv costs 20-30 points)."""
    config, lat = table_config
    b = body(create_model("mobilenetv2_100", 10, True))
    paths = _synthetic(tmp_path, b)
    depthdp.plan(config, 1.0, lat, paths, tmp_path / "loose.json")
    write_json(tmp_path / "all.json", {"method": "depthshrinker", "granularity": "block", "keep_ratio": 1.0,
                                       "keep": [1] * 19})
    report = depthdp.diagnose(config, tmp_path / "loose.json", tmp_path / "all.json", lat, paths, tmp_path / "d.json",
                              retest=_synthetic(tmp_path, b, seed=1))
    assert 0.5 < report["retest_spearman"] < 1 and report["retest_entries"] == 171  # the same shape, new draws
    assert report["ds_acts"] == report["dp_acts"] == len(depthdp.dense_acts(b))
    assert report["ds_importance"] == report["dp_importance"] and report["ds_latency"] == report["dp_latency"]
    write_json(tmp_path / "some.json", {"method": "depthshrinker", "granularity": "block", "keep_ratio": 0.5,
                                        "keep": [1, 0, 1, 0, 1] + [1] * 14})
    fewer = depthdp.diagnose(config, tmp_path / "loose.json", tmp_path / "some.json", lat, paths, tmp_path / "e.json")
    assert fewer["ds_acts"] == report["ds_acts"] - 3  # unit 1: one activation; unit 3: two
    assert fewer["ds_importance"] < report["ds_importance"] and fewer["ds_latency"] < report["ds_latency"]


def test_plan_refuses_missing_entries_an_impossible_budget_and_a_wrong_match(table_config, tmp_path):
    config, lat = table_config
    b = body(create_model("mobilenetv2_100", 10, True))
    with pytest.raises(ConfigError, match=r"no importance for entries 0-1-1-1 \(1 missing\)"):
        depthdp.plan(config, 0.5, lat, _synthetic(tmp_path, b, 1, skip={(0, 1, 1, 1)}), tmp_path / "m.json")
    with pytest.raises(ConfigError, match=r"no choice fits the latency budget \S+ \(the fastest takes \S+\) \(body latencies"):
        depthdp.plan(config, 0.01, lat, _synthetic(tmp_path, b, 2), tmp_path / "m.json")
    with pytest.raises(ConfigError, match="needs the DepthShrinker cell"):
        depthdp.plan({**config, "depthdp": {**config["depthdp"], "budget": "match"}}, 0.5, lat,
                     _synthetic(tmp_path, b, 3), tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(ConfigError, match="'tpu' is not one of mpc, cpu, gpu"):
        depthdp.latency_table(config, "tpu", tmp_path / "tpu.csv")


def test_a_measured_cpu_table_has_every_row_and_sets_a_budget_by_the_measured_ratio(table_config, tmp_path):
    """The CPU table times every row of the cost-model table (each > 0); Kim et al.'s DP and LayerMerge's plan
    on it; ``budget: match`` against the dense network itself is the dense latency times a ratio near 1."""
    config, mpc = table_config
    config = {**config, "depthdp": {**config["depthdp"], "target": "cpu"}}
    depthdp.latency_table(config, "cpu", tmp_path / "cpu.csv")
    cpu, ref = depthdp.read_latency_table(tmp_path / "cpu.csv"), depthdp.read_latency_table(mpc)
    assert cpu.segment.keys() == ref.segment.keys() and cpu.option.keys() == ref.option.keys()
    assert cpu.act.keys() == ref.act.keys()
    assert min([*cpu.segment.values(), *cpu.option.values(), *cpu.act.values()]) > 0
    b = body(create_model("mobilenetv2_100", 10, True))
    mask = depthdp.plan(config, 1.0, tmp_path / "cpu.csv", _synthetic(tmp_path, b), tmp_path / "mask.json")
    assert mask["dp"]["target"] == "cpu" and mask["dp"]["latency"] <= mask["dp"]["budget_latency"]
    dense = to_plain(create_model("mobilenetv2_100", 10, True).eval())
    save(tmp_path / "dense.pt", dense, dense.spec)
    total, dense_latency, source = depthdp.budget({**config, "depthdp": {**config["depthdp"], "budget": "match"}},
                                                  0.4, b, cpu, tmp_path / "dense.pt")
    assert 0.5 < source["measured_ratio"] < 2 and total == pytest.approx(source["measured_ratio"] * dense_latency)


@pytest.mark.slow
def test_importance_then_a_depthdp_cell_finetunes_and_merges_exactly(table_config, tmp_path):
    """The importance stage on a trained network (against the same base; a rerun is identical; a bad entry is
    refused), then a planned mask finetunes as a ChainNet whose
    checkpoint reloads and merges exactly."""
    config, lat = table_config
    train_dense(config, tmp_path / "dense.pt")
    single = importance(config, tmp_path / "dense.pt", "3-4-1-1", tmp_path / "single.json")
    linear = importance(config, tmp_path / "dense.pt", "3-5-1-0", tmp_path / "linear.json")
    again = importance(config, tmp_path / "dense.pt", "3-5-1-0", tmp_path / "again.json")
    assert linear["delta_top1"] == linear["top1"] - linear["base_top1"] and linear["entry"] == [3, 5, 1, 0]
    assert {k: v for k, v in again.items() if k != "provenance"} == {k: v for k, v in linear.items()
                                                                     if k != "provenance"}
    assert single["entry"] == [3, 4, 1, 1] and single["base_loss"] == linear["base_loss"]
    with pytest.raises(ConfigError, match="'3-6-1-0' is not an extended segment"):
        importance(config, tmp_path / "dense.pt", "3-6-1-0", tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()

    b = body(create_model("mobilenetv2_100", 10, True))
    mask = depthdp.plan(config, 0.4, lat, _synthetic(tmp_path, b), tmp_path / "mask.json")
    metrics = finetune(config, tmp_path / "dense.pt", tmp_path / "mask.json", tmp_path / "ft.pt")
    assert metrics["row"] == mask["row"]
    spec = load(tmp_path / "ft.pt")["spec"]
    assert spec["mask"] == {"method": "segments", "segments": mask["segments"], "acts": mask["acts"],
                            "added": "relu6", "dropped": []}
    model, _ = load_model(tmp_path / "ft.pt")
    assert isinstance(model, ChainNet)
    report = merge_checkpoint(tmp_path / "ft.pt", tmp_path / "merged.pt", config)
    assert report["merge_feature_rel_err"] < 1e-5 and report["merge_policy"] == "segments"
    merged, _ = load_model(tmp_path / "merged.pt")
    size = config["data"]["image_size"]
    assert mpc_cost.latency(mpc_cost.count(merged.spec, size), config["mpc"]["network"]) == \
        pytest.approx(mask["dp"]["latency"], rel=1e-12)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-4)
