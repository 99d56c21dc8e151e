"""MPC: the closed-form cost model (hand-computed nets, no CrypTen) and the CrypTen engine (model owner, client and
a separate dealer process): online and preprocessing bytes and rounds equal the model exactly, outputs match
plaintext, neither party's view rebuilds the other's secret, failures name the process and leave nothing behind."""
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from depthshrinker.base import checkpoint
from depthshrinker.deploy import load
from depthshrinker.deploy.mpc import compat, engine
from depthshrinker.deploy.mpc.compat import MPCError, import_crypten
from depthshrinker.deploy.mpc.cost import Network, block_cost, count, estimate, merged_conv, preproc_latency, unit_table
from depthshrinker.deploy.mpc.engine import bench_mpc, measure, measure_many
from depthshrinker.deploy.plan import apply_keep
from depthshrinker.nets.counting import nonlinear
from depthshrinker.nets.plain import PlainNet, to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

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
    from depthshrinker.nets.gates import SNL_SHAPES, activation_shapes, apply_masks

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
    rebuilt = load.build(net.spec)
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
    # preprocessing: 8 B per output element of each conv/linear (its triple's c), 15 ring elements per ReLU element
    assert c.preproc_bytes == 8 * (4 * 4 * 4 + 2) + 8 * 15 * 64 == 8208
    assert c.preproc_requests == 1 + 9 + 1


def test_preprocessing_of_relu6_and_its_latency():
    relu, relu6 = (count(plain([{"convs": [conv(3, 4, act, 3, 1, 1)]}], 4), 4) for act in ("relu", "relu6"))
    assert relu6.preproc_bytes - relu.preproc_bytes == 8 * 15 * 64 and relu6.preproc_requests == relu.preproc_requests
    link = Network(rtt_s=0.01, bandwidth_bit_s=8e6)
    assert preproc_latency(relu6, link, compute_s=1.0) == pytest.approx(1.0 + 0.01 + 15888 / 1e6)   # 1 round trip


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
    assert merged.preproc_bytes == 8 * 16 * 16 and merged.preproc_requests == 1
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


# ---- CrypTen: owner, client and dealer processes ----

ROLE_NAMES = dict(zip(engine.ROLES, engine.NAMES))


def children():
    """Child processes running an MPC role (other tests may leave e.g. multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("_process_main" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_no_children_left(timeout=10.0):
    deadline = time.monotonic() + timeout
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not children()


def exact_net(classes=3):
    """Zero weights and biases of 1/2: the logits are exactly representable, the error is 0."""
    net = plain([{"convs": [conv(3, 4, "relu", 3, 1, 1)]}], 4, classes)
    with torch.no_grad():
        for name, value in net.state_dict().items():
            value.copy_(torch.full_like(value, 0.5) if name == "classifier.bias" else torch.zeros_like(value))
    return net


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
    c, r = count(nets[name], SIZE), results[name]
    assert (r["mpc_bytes"], r["mpc_rounds"]) == (c.bytes, c.rounds)                           # online
    assert (r["mpc_preproc_bytes"], r["mpc_preproc_requests"]) == (c.preproc_bytes, c.preproc_requests)
    assert r["mpc_preproc_p2p_bytes"] == 0 and r["mpc_preproc_control_bytes"] > 0
    assert r["mpc_provider"] == "ttp" and r["mpc_private"] is True


@needs_crypten
@pytest.mark.slow
def test_crypten_matches_plaintext(measured):
    nets, results = measured
    assert results["tiny"]["mpc_rel_err"] < 1e-3   # truncation errors are random: seen 2e-5 to 1.2e-4
    for name, net in nets.items():   # 16 fractional bits: ~0.1 % of the largest logit after 53 layers
        r = results[name]
        assert r["mpc_rel_err"] < 1e-2 and r["mpc_error_exceeded"] is False and r["mpc_tolerance"] == 1e-2
    assert results["F"]["mpc_rounds"] < results["A"]["mpc_rounds"] < results["dense"]["mpc_rounds"]


@needs_crypten
@pytest.mark.slow
def test_cost_simulation_has_the_same_online_cost_and_flags_errors_without_discarding(measured):
    nets, private = measured
    results = measure_many({"tiny": nets["tiny"], "exact": exact_net()}, SIZE, runs=1, warmup=0, timeout=300,
                           tol=1e-7, provider="tfp")
    tiny_ = results["tiny"]
    assert (tiny_["mpc_bytes"], tiny_["mpc_rounds"]) == (private["tiny"]["mpc_bytes"], private["tiny"]["mpc_rounds"])
    assert tiny_["mpc_provider"] == "tfp" and tiny_["mpc_private"] is False and "NOT private" in tiny_["mpc_setting"]
    assert (tiny_["mpc_preproc_bytes"], tiny_["mpc_preproc_requests"]) == (0, 0)
    assert tiny_["mpc_error_exceeded"] is True and tiny_["mpc_rel_err"] > 1e-7      # flagged, and still reported
    assert results["exact"]["mpc_max_abs_err"] == 0 and results["exact"]["mpc_error_exceeded"] is False


def rebuild_error(view, opened: int, secret: torch.Tensor) -> float:
    """Smallest max-abs error of rebuilding ``secret`` (scale 2^16) as opened value + a tensor the party drew."""
    opened_value = view["opened"][opened]
    candidates = [d for d in view["drawn"] if d.shape == opened_value.shape]
    assert candidates or opened == 1
    return min([float(((opened_value + d).double() / 2 ** 16 - secret.double()).abs().max()) for d in candidates],
               default=float("inf"))


@needs_crypten
@pytest.mark.slow
def test_neither_party_rebuilds_the_others_secret_with_a_dealer(monkeypatch):
    """The first conv opens x − a (the client's image) and W − b (the owner's weights). With TFP the owner drew
    ``a`` itself and rebuilds the image to 1e-4; with the dealer its only draws are its shares, and the rebuild
    is off by ~2^47 (uniform on the ring). The client never rebuilds the weights."""
    monkeypatch.setenv(engine.SPY_ENV, "1")
    net = tiny()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    weight = net.state_dict()["blocks.0.convs.0.weight"]
    views = {}
    for provider in ("tfp", "ttp"):
        owner, client, *_ = engine._run([net], x, runs=1, warmup=0, threads=1, timeout=300, provider=provider)
        views[provider] = owner["view"], client["view"]
        assert torch.equal(owner["view"]["opened"][0], client["view"]["opened"][0])   # both see the same opening
    assert rebuild_error(views["tfp"][0], 0, x) < 1e-4            # the attack works: TFP is not private
    assert rebuild_error(views["ttp"][0], 0, x) > 1e6             # owner vs image, with the dealer
    assert rebuild_error(views["ttp"][1], 1, weight) > 1e6        # client vs weights
    assert rebuild_error(views["tfp"][1], 1, weight) > 1e6
    for provider in ("tfp", "ttp"):   # what is opened is uniform on the ring: no trace of the image's scale
        top = views[provider][0]["opened"][0].flatten().double() / 2 ** 63
        assert top.abs().max() > 0.5 and abs(float(top.mean())) < 0.25


# "raise": exit code 1, or, when a native (gloo) thread is still running as the interpreter exits (seen under heavy
# load), SIGABRT after the traceback; either way the message names the party and carries the exception
FAULTS = {"raise": r"(exited with code 1|was killed by SIGABRT): .*RuntimeError: injected fault in the {role}",
          "exit0": r"exited with code 0 before writing its result",
          "kill": r"was killed by SIGKILL",
          "hang": r"hung in _fault \(party\.py"}


@needs_crypten
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FAULTS))
@pytest.mark.parametrize("role", engine.ROLES)
def test_a_faulty_process_is_named_and_nothing_is_left(monkeypatch, tmp_path, role, kind):
    monkeypatch.setenv(engine.FAULT_ENV, f"{role}:{kind}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(MPCError) as error:
        measure(tiny(), SIZE, runs=1, warmup=0, timeout=30 if kind == "hang" else 120)
    message = str(error.value)
    assert message.startswith("CrypTen ") and "\n" not in message
    expected = re.escape(ROLE_NAMES[role]) + " " + FAULTS[kind].format(role=role)
    assert re.search(expected, message), message
    others = [name for r, name in ROLE_NAMES.items() if r != role]
    if kind == "hang":
        assert "waiting for it" in message and all(name in message for name in others)
    else:
        assert not any(name in message for name in others)   # a peer that lost its connection is not blamed
        assert time.monotonic() - start < 60
    assert_no_children_left()
    assert not list(tmp_path.iterdir())


@needs_crypten
@pytest.mark.slow
def test_parallel_runs_do_not_collide():
    results = {}

    def run(name):
        results[name] = measure(tiny(), SIZE, runs=1, warmup=0, timeout=300)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["a"]["mpc_bytes"] == results["b"]["mpc_bytes"] == count(tiny(), SIZE).bytes


@needs_crypten
@pytest.mark.slow
def test_processes_exit_when_the_caller_is_killed():
    script = ("from depthshrinker.deploy.mpc.engine import measure; from depthshrinker.nets.plain import PlainNet; "
              f"measure(PlainNet({tiny().spec!r}), {SIZE}, runs=100_000)")
    caller = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(caller.pid).children()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = psutil.Process(caller.pid).children()
        assert len(procs) == 3
        workdir = Path(json.loads(procs[0].cmdline()[-1])["workdir"])
        assert workdir.exists()
    finally:
        caller.kill()   # SIGKILL: no cleanup of its own
        caller.wait()
    gone, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive and not workdir.exists()


@needs_crypten
@pytest.mark.slow
def test_bench_mpc_stage_writes_one_exact_json_per_network_from_one_set_of_parties(tmp_path):
    """Two networks (pattern F and dense) measured in one call: each JSON holds its own counts, equal to the cost
    model's prediction for that network."""
    paths = []
    for name, keep in (("f", KEEPS["F"]), ("dense", [1] * 19)):
        model = create_model("mobilenetv2_100", 10, small_input=True)
        spec = {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": True,
                "mask": {"granularity": "block", "keep": keep}}
        apply_keep(model, activation_units(model), keep)
        checkpoint.save(tmp_path / f"{name}.pt", model, spec)
        paths.append(tmp_path / f"{name}.pt")
    outs = [tmp_path / "f.json", tmp_path / "dense.json"]
    results = bench_mpc(paths, outs, SIZE, runs=1, warmup=0)
    for out, result in zip(outs, results):
        written = json.loads(out.read_text())
        assert written == result and written["mpc_measured_with"] == 2
        assert (written["mpc_bytes"], written["mpc_rounds"]) == (written["model_bytes"], written["model_rounds"])
        assert (written["mpc_preproc_bytes"], written["mpc_preproc_requests"]) == \
            (written["model_preproc_bytes"], written["model_preproc_requests"])
        assert written["mpc_model_exact"] is True and written["mpc_provider"] == "ttp"
        assert written["mpc_est_wan_s"] > written["mpc_est_lan_s"] > 0 and written["mpc_latency_s"] > 0
        assert written["mpc_preproc_s"] > 0 and written["mpc_preproc_mb"] == written["mpc_preproc_bytes"] / 1e6
    assert results[0]["mpc_rounds"] < results[1]["mpc_rounds"]  # pattern F removed activation layers
    with pytest.raises(MPCError, match="2 models but 1 outputs"):
        bench_mpc(paths, outs[:1], SIZE)


def test_unknown_provider_is_an_mpc_error():
    with pytest.raises(MPCError, match="unknown MPC provider 'he'"):
        engine._run([tiny()], torch.zeros(1, 3, SIZE, SIZE), 1, 0, 1, 10, provider="he")


@needs_crypten
def test_import_crypten_returns_the_module():
    assert import_crypten().__version__ == "0.4.1"
