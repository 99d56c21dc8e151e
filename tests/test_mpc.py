"""MPC: the closed-form cost model (hand-computed nets, no CrypTen) and the CrypTen engine (two local parties):
measured bytes and rounds equal the model exactly, outputs match plaintext, failures leave no process behind."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from depthshrinker import checkpoint
from depthshrinker.counting import nonlinear
from depthshrinker.gates import apply_keep
from depthshrinker.models import activation_units, create_model
from depthshrinker.mpc import MPCError, Network, bench_mpc, block_cost, count, estimate, import_crypten, measure, \
    measure_many, unit_table
from depthshrinker.mpc import compat
from depthshrinker.mpc.cost import merged_conv
from depthshrinker.plain import PlainNet, to_plain

needs_crypten = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="CrypTen not installed")
SIZE = 8  # 8x8 keeps a CrypTen MobileNetV2 inference at ~1 s; bytes and rounds are exact at any size
KEEPS = {"dense": None, "A": [0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1], "F": [1] + [0] * 17 + [1]}


def conv(cin, cout, act="none", kernel=1, stride=1, padding=0, groups=1):
    return {"in": cin, "out": cout, "kernel": kernel, "stride": stride, "padding": padding, "groups": groups,
            "act": act}


def plain(blocks, features, classes=2):
    return PlainNet({"kind": "plain", "num_classes": classes, "blocks": blocks,
                     "classifier": {"in": features, "out": classes}}).eval()


def tiny():
    """Every op the engine mirrors: stride, padding, groups, ReLU, ReLU6, residual, free activation."""
    return plain([{"convs": [conv(3, 8, "relu", 3, 2, 1)]},
                  {"convs": [conv(8, 16, "relu6"), conv(16, 16, "relu6", 3, 1, 1, 16), conv(16, 8)],
                   "residual": True, "free_act": "relu6"}], 8, 3)


def mobilenet(keep):
    model = create_model("mobilenetv2_100", 10, small_input=True)
    if keep is not None:
        apply_keep(model, activation_units(model), keep)
    return to_plain(model.eval())


def snl_mobilenet(granularity="channel"):
    """MobileNetV2 with random SNL masks (about half kept) on every activation layer."""
    from depthshrinker.gates import SNL_SHAPES, activation_shapes, apply_masks

    model = create_model("mobilenetv2_100", 10, small_input=True).eval()
    paths = [p for u in activation_units(model, "layer") for p in u.acts]
    g = torch.Generator().manual_seed(1)
    shapes = activation_shapes(model, paths, SIZE)
    apply_masks(model, {p: (torch.rand(SNL_SHAPES[granularity](*shapes[p]), generator=g) < 0.5).float()
                        for p in paths})
    return model, to_plain(model)


def test_snl_masks_survive_to_plain_and_count_only_kept_elements():
    model, net = snl_mobilenet("pixel")
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.allclose(model(x), net(x), atol=1e-4)
    counts = nonlinear(model, SIZE)
    assert count(net, SIZE).relu6 == nonlinear(net, SIZE)["relu6_elements"] == counts["relu6_elements"]
    rebuilt = checkpoint.build(net.spec)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), net(x))


# ---- cost model, by hand ----

def test_one_conv_relu_by_hand():
    net = plain([{"convs": [conv(3, 4, "relu", 3, 1, 1)]}], 4)
    c = count(net, 4)
    conv_bytes = 16 * (3 * 4 * 4 + 4 * 3 * 3 * 3)   # input + weight
    relu_bytes = 464 * 4 * 4 * 4
    linear_bytes = 16 * (4 + 4 * 2)
    assert c.bytes == conv_bytes + relu_bytes + linear_bytes + 8 * 2   # + revealing 2 logits
    assert c.rounds == 1 + 9 + 1 + 1
    assert (c.relu, c.relu6, c.act_layers, c.linear_layers) == (64, 0, 1, 2)
    assert c.macs == 4 * 4 * 4 * 27 + 8


def test_relu6_is_two_comparisons_in_one_layer_and_residual_is_free():
    relu = count(plain([{"convs": [conv(3, 3, "relu")]}], 3), 4)
    relu6 = count(plain([{"convs": [conv(3, 3, "relu6")]}], 3), 4)
    assert relu6.bytes - relu.bytes == 464 * 3 * 16 and relu6.rounds == relu.rounds
    residual = count(plain([{"convs": [conv(3, 3, "relu6")], "residual": True}], 3), 4)
    assert residual == relu6
    free = count(plain([{"convs": [conv(3, 3, "relu6")], "residual": True, "free_act": "relu6"}], 3), 4)
    assert free.bytes - relu6.bytes == 928 * 3 * 16 and free.rounds - relu6.rounds == 9


def test_block_cost_without_activations_and_merged():
    block = {"convs": [conv(8, 48, "relu6"), conv(48, 48, "relu6", 3, 2, 1, 48), conv(48, 16)]}
    before, out = block_cost(block, (8, 8, 8))
    linear, _ = block_cost(block, (8, 8, 8), acts=False)
    merged, merged_out = block_cost(block, (8, 8, 8), acts=False, merged=True)
    assert out == merged_out == (16, 4, 4)
    assert before.bytes - linear.bytes == 928 * (48 * 64 + 48 * 16) and before.rounds - linear.rounds == 18
    assert merged.bytes == 16 * (8 * 64 + 16 * 8 * 9) and merged.rounds == 1
    with pytest.raises(ValueError, match="activation-free"):
        block_cost(block, (8, 8, 8), merged=True)


def test_merged_conv_shape():
    ir = [conv(8, 48), conv(48, 48, "none", 3, 2, 1, 48), conv(48, 16)]
    assert merged_conv(ir) == conv(8, 16, "none", 3, 2, 1)
    pad_first = [conv(8, 48, padding=1), conv(48, 48, "none", 3, 1, 0, 48), conv(48, 16)]
    assert merged_conv(pad_first) == conv(8, 16, "none", 3, 1, 1)
    assert merged_conv([conv(3, 4, "relu", 3, 2, 2), conv(4, 4, "none", 3, 2, 1)]) == conv(3, 4, "none", 7, 4, 4)


def test_latency_formula_and_presets():
    net = plain([{"convs": [conv(3, 4, "relu", 3, 1, 1)]}], 4)
    c = count(net, 4)
    link = Network(rtt_s=0.01, bandwidth_bit_s=8e6)
    est = estimate(net, 4, link, compute_s=0.5)
    assert est["rtt_s"] == pytest.approx(c.rounds * 0.01)
    assert est["transfer_s"] == pytest.approx(c.bytes / 2 / 1e6)      # each party sends half, both at once
    assert est["latency_s"] == pytest.approx(0.5 + est["rtt_s"] + est["transfer_s"])
    lan, wan = estimate(net, 4, "lan"), estimate(net, 4, "wan")
    assert lan["compute_s"] == wan["compute_s"] > 0 and wan["latency_s"] > lan["latency_s"]


def test_mobilenet_counts_agree_with_counting_and_wan_pays_rounds():
    dense, removed = mobilenet(None), mobilenet(KEEPS["F"])
    for net in (dense, removed):
        c, n = count(net, 32), nonlinear(net, 32)
        assert (c.relu6, c.relu, c.act_layers) == (n["relu6_elements"], n["relu_elements"], n["nonlinear_layers"])
    assert count(dense, 32).relu6 == 498_432 and count(dense, 32).rounds == 35 * 9 + 53 + 1
    saved = estimate(dense, 32, "wan")["rtt_s"] - estimate(removed, 32, "wan")["rtt_s"]
    assert saved == pytest.approx(9 * 0.04 * (35 - 2))
    rows = unit_table(dense, 32)
    assert len(rows) == 19 and all(r["after_s"] < r["before_s"] for r in rows)


def test_missing_crypten_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "crypten" else real(name, *a))
    with pytest.raises(MPCError, match=r"pip install --no-deps crypten==0\.4\.1"):
        compat.import_crypten()


# ---- CrypTen, two local parties ----

def parties():
    """Child processes running a CrypTen party (other tests may leave e.g. multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("_party_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_no_parties_left(timeout=10.0):
    deadline = time.monotonic() + timeout
    while parties() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not parties()


@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    nets = {name: mobilenet(keep) for name, keep in KEEPS.items()} | {"tiny": tiny(), "snl": snl_mobilenet()[1]}
    return nets, measure_many(nets, SIZE, runs=1, warmup=0, timeout=600)


@needs_crypten
@pytest.mark.slow
@pytest.mark.parametrize("name", list(KEEPS) + ["tiny", "snl"])
def test_cost_model_equals_crypten_exactly(measured, name):
    nets, results = measured
    c = count(nets[name], SIZE)
    assert (results[name]["mpc_bytes"], results[name]["mpc_rounds"]) == (c.bytes, c.rounds)


@needs_crypten
@pytest.mark.slow
def test_crypten_matches_plaintext(measured):
    nets, results = measured
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))  # measure's default image
    assert results["tiny"]["max_abs_err"] < 1e-3
    for name, net in nets.items():   # 16 fractional bits: ~0.3 % of the largest logit after 53 layers
        with torch.no_grad():
            assert results[name]["max_abs_err"] < 1e-2 * max(1.0, float(net(x).abs().max()))
    assert results["F"]["mpc_rounds"] < results["A"]["mpc_rounds"] < results["dense"]["mpc_rounds"]


@needs_crypten
@pytest.mark.slow
def test_killed_party_is_reported_and_reaped():
    def kill_client_once_connected():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            client = [p for p in psutil.Process().children() if '"rank": 1' in " ".join(p.cmdline())]
            if client and client[0].net_connections():   # it has joined the rendezvous
                time.sleep(0.5)
                client[0].send_signal(signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_client_once_connected)
    killer.start()
    with pytest.raises(MPCError, match=r"party 1 \(client\) was killed by SIGKILL") as error:
        measure(tiny(), SIZE, runs=100_000, timeout=120)
    killer.join()
    assert "\n" not in str(error.value)
    assert_no_parties_left()


@needs_crypten
@pytest.mark.slow
def test_failing_party_is_reported_in_one_line():
    net = tiny()
    net.spec["blocks"][0]["convs"][0]["act"] = "swish"   # the parties run the spec: both fail on it
    with pytest.raises(MPCError, match=r"party [01] \(\w[\w ]*\) exited with code 1: .*KeyError: 'swish'") as error:
        measure(net, SIZE, timeout=120)
    assert "\n" not in str(error.value)
    assert_no_parties_left()


@needs_crypten
@pytest.mark.slow
def test_timeout_stops_both_parties():
    with pytest.raises(MPCError, match=r"timed out after 1 s \(party 0 \(model owner\), party 1 \(client\) still"):
        measure(tiny(), SIZE, timeout=1)
    assert_no_parties_left()


@needs_crypten
@pytest.mark.slow
def test_parties_exit_when_the_caller_is_killed():
    script = ("from depthshrinker.mpc import measure; from depthshrinker.plain import PlainNet; "
              f"measure(PlainNet({tiny().spec!r}), {SIZE}, runs=100_000)")
    caller = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(caller.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        parties = psutil.Process(caller.pid).children()
        assert len(parties) == 2
        workdir = Path(json.loads(parties[0].cmdline()[-1])["job"]).parent
    finally:
        caller.kill()   # SIGKILL: no cleanup of its own
        caller.wait()
    gone, alive = psutil.wait_procs(parties, timeout=60)
    assert not alive and not workdir.exists()


@needs_crypten
@pytest.mark.slow
def test_bench_mpc_stage_writes_json(tmp_path):
    model = create_model("mobilenetv2_100", 10, small_input=True)
    spec = {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": True,
            "mask": {"granularity": "block", "keep": KEEPS["F"]}}
    apply_keep(model, activation_units(model), KEEPS["F"])
    checkpoint.save(tmp_path / "ckpt.pt", model, spec)
    result = bench_mpc(tmp_path / "ckpt.pt", tmp_path / "mpc.json", SIZE, runs=1, warmup=0)
    written = json.loads((tmp_path / "mpc.json").read_text())
    assert written == result
    assert (written["mpc_bytes"], written["mpc_rounds"]) == (written["model_bytes"], written["model_rounds"])
    assert written["mpc_est_wan_s"] > written["mpc_est_lan_s"] > 0 and written["mpc_latency_s"] > 0


@needs_crypten
def test_import_crypten_returns_the_module():
    assert import_crypten().__version__ == "0.4.1"
