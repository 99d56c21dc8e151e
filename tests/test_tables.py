"""Per-unit cost tables and the device benchmark stage."""
import csv
import json

import pytest
import torch

from depthshrinker.base.checkpoint import save
from depthshrinker.base.config import validate
from depthshrinker.base.timing import quartiles
from depthshrinker.deploy.device import bench_device, cpu_latency, onnx_runtime
from depthshrinker.deploy.merge import merge_plain
from depthshrinker.deploy.mpc.cost import count, unit_table
from depthshrinker.deploy.plan import apply_mask_spec, conv_inputs, merge_policy
from depthshrinker.deploy.tables import cost_table
from depthshrinker.methods.search import read_cost_table
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model


def _rows(path):
    lines = open(path).read().splitlines()
    assert lines[0].startswith("#") and "unit of measure" in lines[0]
    return list(csv.DictReader(lines[1:]))


def test_mpc_block_table_equals_the_cost_model_per_block(tmp_path):
    config = validate({"data": {"image_size": 16}})
    cost_table(config, "mpc", "block", tmp_path / "t.csv")
    rows = _rows(tmp_path / "t.csv")
    expected = unit_table(to_plain(create_model("mobilenetv2_100", 10, True).eval()), 16, "lan")
    assert len(rows) == len(expected) == 19
    for unit, (row, exp) in enumerate(zip(rows, expected)):
        assert int(row["before_bytes"]) == exp["before_bytes"]
        assert float(row["before"]) == pytest.approx(exp["before_s"])
        # unit_table merges every block into one conv; the table merges as deployed, here by the MACs policy
        # (latency_target none), which keeps the depthwise-separable block (unit 1) as two convs: one dense 3x3
        # would cost 5.8x the MACs, though fewer MPC bytes (one opened input instead of two)
        if unit == 1:
            assert int(row["after_bytes"]) > exp["after_bytes"]
        else:
            assert int(row["after_bytes"]) == exp["after_bytes"]
    assert int(rows[18]["before_rounds"]) == 10 and int(rows[18]["after_rounds"]) == 1
    savings = read_cost_table(tmp_path / "t.csv", 19)
    assert (savings > 0).all() and savings.sum() < 1


@pytest.mark.parametrize("free_act", ["none", "relu6"])
def test_mpc_table_savings_equal_the_deployed_networks(tmp_path, free_act):
    """Each unit's saving in the MPC table equals what the deployed network saves: the keep-list applied as
    finetuning does (free activation, merge plan under the config's policy), merged as the merge stage does,
    counted whole by the cost model. The MPC-aware config merges the depthwise-separable block (unit 1)."""
    config = validate({"data": {"image_size": 8}, "model": {"free_act": free_act},
                       "stages": {"search": {"latency_target": "mpc"}}})
    rows = cost_table(config, "mpc", "block", tmp_path / "t.csv")
    dense = count(to_plain(create_model("mobilenetv2_100", 10, True).eval()), 8)
    for unit, row in enumerate(rows):
        model = create_model("mobilenetv2_100", 10, True).eval()
        mask = {"granularity": "block", "keep": [int(i != unit) for i in range(19)], "free_act": free_act}
        apply_mask_spec(model, mask, merge_policy(config))
        deployed = count(merge_plain(to_plain(model)), 8)
        assert (row["before_bytes"] - row["after_bytes"], row["before_rounds"] - row["after_rounds"]) == \
            (dense.bytes - deployed.bytes, dense.rounds - deployed.rounds)
        if unit == 1:
            assert mask["merge_plan"]["blocks"][1]["segments"] == [[0, 1]]
    # a block shrunk with the free activation still pays one activation layer: 1 merged conv + 9 rounds
    assert {row["after_rounds"] for row in rows[1:18]} == ({10} if free_act == "relu6" else {1})


def test_layer_table_has_one_row_per_activation_and_cpu_is_measured(tmp_path):
    config = validate({"data": {"image_size": 16}})
    cost_table(config, "mpc", "layer", tmp_path / "mpc.csv")
    assert len(_rows(tmp_path / "mpc.csv")) == 35
    cost_table(config, "cpu", "block", tmp_path / "cpu.csv", repeats=2)
    rows = _rows(tmp_path / "cpu.csv")
    assert len(rows) == 19 and all(float(r["before"]) > 0 and float(r["after"]) > 0 for r in rows)


def test_cpu_latency_reports_ratios_to_the_reference():
    net = to_plain(create_model("mobilenetv2_100", 10, True).eval())
    out = cpu_latency({"a": net, "b": net}, 16, "a", repeats=3, iters=1)
    assert out["a"]["cpu_speedup"] == 1.0 and out["b"]["cpu_latency_ms"] > 0 and "ort_cpu_speedup" not in out["a"]
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0)
    out = cpu_latency({"a": net, "b": net}, 16, "a", repeats=3, iters=1, onnxruntime=True)
    assert out["a"]["ort_cpu_speedup"] == 1.0 and out["b"]["ort_cpu_latency_ms"] > 0 and out["b"]["ort_over_eager"] > 0


@torch.no_grad()
def test_the_onnx_runtime_session_serves_the_same_network(tmp_path):
    net = to_plain(create_model("mobilenetv2_100", 10, True).eval())
    x = torch.randn(2, 3, 16, 16)
    (logits,) = onnx_runtime(net, tmp_path, 16)(x)
    assert torch.allclose(torch.from_numpy(logits), net(x), atol=1e-4)


def test_bench_device_stage_writes_json(tmp_path):
    net = to_plain(create_model("mobilenetv2_100", 10, True).eval())
    save(tmp_path / "m.pt", net, net.spec)
    save(tmp_path / "n.pt", net, net.spec)
    rows = bench_device([tmp_path / "m.pt", tmp_path / "n.pt"], tmp_path / "m.pt",
                        [tmp_path / "b.json", tmp_path / "c.json"], 16, repeats=2)
    assert len(rows) == 2 and json.loads((tmp_path / "c.json").read_text()) == rows[1]
    row = json.loads((tmp_path / "b.json").read_text())
    assert row == rows[0] and row["timed_with"] == 2
    assert row["cpu_latency_ms"] > 0 and row["ort_cpu_latency_ms"] > 0 and row["ort_cpu_speedup"] > 0
    assert (row["gpu_throughput_img_s"] is None) == (not torch.cuda.is_available())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_conv_inputs_are_the_shapes_the_network_sees(arch):
    """The measured tables time each conv on its own input shape: after ResNet's max-pool too."""
    net = to_plain(create_model(arch, 10).eval())
    seen = []
    hooks = [b.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[1:])))
             for b in net.blocks]
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert [shapes[0] for shapes in conv_inputs(net.spec, 64)] == seen
