"""depthdp (Kim et al., ICML 2023, on DepthShrinker's merged network): the exact DP against brute force, the
MPC latency table against the cost model of the deployed network, the plan stage end to end (its mask read by
finetuning) and the error paths."""
import csv
import itertools
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from depthshrinker.base.checkpoint import load, save
from depthshrinker.base.config import ConfigError, load_config
from depthshrinker.base.data import build_datasets
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.mpc import cost as mpc_cost
from depthshrinker.deploy.plan import apply_keep, apply_mask_spec, merge_policy
from depthshrinker.deploy.tables import block_inputs, shrunk
from depthshrinker.methods import depthdp
from depthshrinker.methods.baselines import train_dense
from depthshrinker.methods.finetune import finetune, mask_spec, read_mask
from depthshrinker.methods.pruning import scorer
from depthshrinker.nets.counting import nonlinear
from depthshrinker.nets.gates import num_kept
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

TEST_CONFIG = Path(__file__).resolve().parents[1] / "config" / "test.yaml"
TOL = 1e-9  # solve's documented relative (and absolute) slack on the budget


# ---------------------------------------------------------------------------------------------------------------
# solve: exact DP


def _brute(blocks, budget):
    """Every choice within solve's limit: (latency, importance, choice), sums in block order as solve adds."""
    limit = budget * (1 + TOL) + TOL
    feasible = []
    for choice in itertools.product(*(range(len(options)) for options in blocks)):
        lat = sum(blocks[b][o][0] for b, o in enumerate(choice))
        imp = sum(blocks[b][o][1] for b, o in enumerate(choice))
        if lat <= limit:
            feasible.append((lat, imp, choice))
    return feasible


def _staircase(feasible):
    """Size of the Pareto front (latency up, importance strictly up) of the feasible choices."""
    size, best = 0, None
    for lat, imp, _ in sorted(feasible, key=lambda c: (c[0], -c[1])):
        if best is None or imp > best:
            size, best = size + 1, imp
    return size


@st.composite
def _instances(draw, integer: bool, kept: bool = False):
    n = draw(st.integers(1, 5))
    if integer:
        lat, imp = st.integers(0, 20), st.integers(-10, 10)
    else:
        lat = st.floats(0, 1e3, allow_nan=False, allow_infinity=False)
        imp = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
    option = st.tuples(lat, imp, st.integers(0, 2)) if kept else st.tuples(lat, imp)
    blocks = [draw(st.lists(option, min_size=1, max_size=4)) for _ in range(n)]
    cheapest = sum(min(o[0] for o in options) for options in blocks)
    dearest = sum(max(o[0] for o in options) for options in blocks)
    how = draw(st.sampled_from(["between", "a choice", "infeasible"]))
    if how == "infeasible":
        budget = cheapest - 1 if integer else cheapest * (1 - 1e-6) - 1e-6
    elif how == "a choice":  # exactly some choice's total: the boundary is inclusive
        choice = [draw(st.integers(0, len(options) - 1)) for options in blocks]
        budget = sum(options[o][0] for options, o in zip(blocks, choice))
    elif integer:
        budget = draw(st.integers(cheapest, dearest))
    else:
        budget = cheapest + draw(st.floats(0, 1)) * (dearest - cheapest)
    return blocks, budget


def _check_against_brute_force(blocks, budget, integer):
    feasible = _brute(blocks, budget)
    if not feasible:
        with pytest.raises(ConfigError, match="no choice fits the budget"):
            depthdp.solve(blocks, budget)
        return
    choice, total, gained, front = depthdp.solve(blocks, budget)
    assert len(choice) == len(blocks) and all(0 <= o < len(options) for o, options in zip(choice, blocks))
    # the totals are the chosen options' sums
    assert total == pytest.approx(sum(blocks[b][o][0] for b, o in enumerate(choice)), rel=1e-12, abs=1e-12)
    assert gained == pytest.approx(sum(blocks[b][o][1] for b, o in enumerate(choice)), rel=1e-12, abs=1e-12)
    if integer:
        assert total <= budget
    else:
        assert total <= budget * (1 + TOL) + TOL
    best = max(imp for _, imp, _ in feasible)
    assert gained == pytest.approx(best, abs=1e-9)
    fastest_best = min(lat for lat, imp, _ in feasible if imp == best)
    assert total == pytest.approx(fastest_best, abs=1e-9), "ties go to the lower latency"
    assert front == _staircase(feasible)


@settings(max_examples=300, deadline=None)
@given(_instances(integer=False))
def test_solve_equals_brute_force_on_float_instances(instance):
    _check_against_brute_force(*instance, integer=False)


@settings(max_examples=300, deadline=None)
@given(_instances(integer=True))
def test_solve_equals_brute_force_on_integer_instances(instance):
    """Small integers: many ties in importance, so the lower-latency rule is exercised."""
    _check_against_brute_force(*instance, integer=True)


@settings(max_examples=300, deadline=None)
@given(_instances(integer=True, kept=True))
def test_solve_is_lexicographic_in_importance_kept_latency_against_brute_force(instance):
    """Options with a count of kept activations: the optimum is lexicographic (most important, then keeps the
    most, then fastest), as brute force finds it."""
    blocks, budget = instance
    feasible = [(lat, imp, sum(blocks[b][o][2] for b, o in enumerate(choice)), choice)
                for lat, imp, choice in _brute(blocks, budget)]
    if not feasible:
        with pytest.raises(ConfigError):
            depthdp.solve(blocks, budget)
        return
    choice, total, gained, _ = depthdp.solve(blocks, budget)
    kept = sum(blocks[b][o][2] for b, o in enumerate(choice))
    best = max((imp, k, -lat) for lat, imp, k, _ in feasible)
    assert (gained, kept, -total) == best
    assert total == sum(blocks[b][o][0] for b, o in enumerate(choice)) <= budget


def test_solve_finds_the_optimum_where_greedy_fails():
    """Greedy by importance lost per latency saved takes A's middle option first (5 saved for 1 point) and then
    has to give 3 or 3.5 more points; the optimum leaves A whole and removes B (3.5 points in all)."""
    a = [(10.0, 0.0), (5.0, -1.0), (0.0, -4.0)]
    b = [(10.0, 0.0), (0.0, -3.5)]
    assert depthdp.solve([a, b], 10.0)[:3] == ([0, 1], 10.0, -3.5)
    assert depthdp.solve([a, b], 9.99)[:3] == ([1, 1], 5.0, -4.5)
    assert depthdp.solve([a, b], 20.0)[:3] == ([0, 0], 20.0, 0.0)
    assert depthdp.solve([a, b], 0.0)[:3] == ([2, 1], 0.0, -7.5)
    with pytest.raises(ConfigError, match="no choice fits the budget -1 .the cheapest costs 0."):
        depthdp.solve([a, b], -1.0)


def test_solve_breaks_ties_by_activations_kept_then_latency():
    assert depthdp.solve([[(3.0, 1.0), (1.0, 1.0)]], 5.0)[:3] == ([1], 1.0, 1.0)
    assert depthdp.solve([[(2.0, 1.0), (2.0, 1.0)]], 5.0)[:3] == ([0], 2.0, 1.0)
    # a positive importance beats keeping the block whole, even at a higher latency than needed
    assert depthdp.solve([[(1.0, 0.0), (4.0, 0.5)]], 5.0)[:3] == ([1], 4.0, 0.5)
    # equally important: the option that keeps more activations, though slower, while the budget allows it
    both = [[(4.0, 0.0, 2), (1.0, 0.0, 1), (0.5, 0.0, 0)], [(3.0, 0.0, 1), (0.0, 0.0, 0)]]
    assert depthdp.solve(both, 7.0)[:3] == ([0, 0], 7.0, 0.0)
    assert depthdp.solve(both, 6.0)[:3] == ([1, 0], 4.0, 0.0)  # 2 kept at 4.0 (as 2 + 0 kept, found later)
    assert depthdp.solve(both, 3.9)[:3] == ([1, 1], 1.0, 0.0)  # 1 kept: the faster of the two ways


# ---------------------------------------------------------------------------------------------------------------
# options, keep-lists


def test_block_options_cover_every_layer_unit_once(mbv2):
    options = depthdp.block_options(mbv2)
    assert [b for b, _, _ in options] == list(range(19))
    assert [u for _, units, _ in options for u in units] == list(range(35)) == \
        list(range(len(activation_units(mbv2, "layer"))))
    assert [len(units) for _, units, _ in options] == [1, 1] + [2] * 16 + [1]
    for _, units, opts in options:
        assert len(opts) == len(set(opts)) == 2 ** len(units)
        assert opts[0] == (1,) * len(units) and opts[-1] == (0,) * len(units)
    assert [depthdp.bits_key(o) for o in options[2][2]] == ["11", "10", "01", "00"]
    assert depthdp.keep_list(6, [2, 3], (1, 0)) == [1, 1, 1, 0, 1, 1]
    assert depthdp.keep_list(3, [0], (0,)) == [0, 1, 1]


def test_layer_keep_of_expands_block_masks(mbv2):
    keep = [1] * 10 + [0] * 9
    layer = depthdp.layer_keep_of({"granularity": "block", "keep": keep}, mbv2)
    assert layer == [1] * 18 + [0] * 17  # stem, block 1 and blocks 2..9 (2 each) kept
    mixed = [1, 0, 0, 1] * 8 + [1, 1, 0]
    assert depthdp.layer_keep_of({"granularity": "layer", "keep": mixed}, mbv2) == mixed


# ---------------------------------------------------------------------------------------------------------------
# the MPC latency table


@pytest.fixture(scope="module")
def mpc_table(tmp_path_factory):
    """config/test.yaml (results in a temporary folder) deployed for MPC, and its depthdp latency table."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("depthdp_table")
    config = load_config(TEST_CONFIG, {"results": str(tmp / "results")})
    config = {**config, "stages": {**config["stages"],
                                   "search": {**config["stages"]["search"], "latency_target": "mpc"}}}
    rows = depthdp.latency_table(config, "mpc", tmp / "latency.csv")
    return config, tmp / "latency.csv", rows


def _csv_rows(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("# depthdp latency") and "unit of measure: s" in lines[0]
    return list(csv.DictReader(lines[1:]))


def test_mpc_latency_table_is_the_cost_model_of_each_deployed_option(mpc_table):
    config, path, rows = mpc_table
    size, network = config["data"]["image_size"], config["mpc"]["network"]
    model = create_model("mobilenetv2_100", 10, True).eval()
    options = depthdp.block_options(model)
    expected_keys = [(b, depthdp.bits_key(bits)) for b, _, opts in options for bits in opts]
    assert len(rows) == 70 == sum(2 ** len(units) for _, units, _ in options)
    assert [(r["block"], r["bits"]) for r in rows] == expected_keys
    # the CSV holds the same numbers, exactly (floats round-trip)
    written = _csv_rows(path)
    assert [(int(r["block"]), r["bits"], float(r["latency"]), int(r["bytes"]), int(r["rounds"])) for r in written] \
        == [(r["block"], r["bits"], r["latency"], r["bytes"], r["rounds"]) for r in rows]
    assert depthdp.read_latency_table(path) == {(r["block"], r["bits"]): r["latency"] for r in rows}

    # all kept: the dense PlainNet block
    dense = to_plain(create_model("mobilenetv2_100", 10, True).eval())
    inputs = block_inputs(dense, size)
    first = {r["block"]: r for r in rows if "0" not in r["bits"]}
    assert sorted(first) == list(range(19))
    for b, row in first.items():
        c, _ = mpc_cost.block_cost(dense.spec["blocks"][b], tuple(inputs[b].shape[1:]))
        assert (row["bytes"], row["rounds"]) == (c.bytes, c.rounds)
        assert row["latency"] == pytest.approx(mpc_cost.latency(c, network), rel=1e-12)
        assert row["segments"] == " ".join(str(i) for i in range(len(dense.spec["blocks"][b]["convs"])))
    # the segments column is the deployed block's: one round per conv, ACT_ROUNDS per activation kept
    # (free_act none); with every activation removed a block merges into one conv (one round) at this size
    for r in rows:
        segments = r["segments"].split(" ")
        assert r["rounds"] == len(segments) + mpc_cost.ACT_ROUNDS * r["bits"].count("1"), r
        assert sorted(int(i) for seg in segments for i in seg.split("-")) == \
            list(range(len(dense.spec["blocks"][r["block"]]["convs"]))), r
        if "1" not in r["bits"]:
            assert len(segments) == 1 and r["rounds"] == 1, r

    # one option per block, deployed as one network, costs the table's rows plus the classifier
    dense_cost = mpc_cost.count(dense, size)
    extra_bytes = dense_cost.bytes - sum(r["bytes"] for r in first.values())
    extra_rounds = dense_cost.rounds - sum(r["rounds"] for r in first.values())
    table = {(r["block"], r["bits"]): r for r in rows}
    policy, free_act = merge_policy(config), config["model"]["free_act"]
    rng = random.Random(0)
    choices = [[len(opts) - 1 for _, _, opts in options],  # everything removed
               [b % len(opts) for b, _, opts in options],
               [rng.randrange(len(opts)) for _, _, opts in options]]
    for choice in choices:
        keep = [1] * 35
        for (_, units, opts), o in zip(options, choice):
            for u, k in zip(units, opts[o]):
                keep[u] = k
        deployed = mpc_cost.count(shrunk(model, "layer", keep, policy, free_act), size)
        picked = [table[b, depthdp.bits_key(opts[o])] for (b, _, opts), o in zip(options, choice)]
        assert sum(r["bytes"] for r in picked) + extra_bytes == deployed.bytes
        assert sum(r["rounds"] for r in picked) + extra_rounds == deployed.rounds


def test_latency_table_rejects_unknown_targets(tmp_path, micro_config):
    with pytest.raises(ConfigError, match="no latency table for target 'tpu'"):
        depthdp.latency_table(micro_config, "tpu", tmp_path / "t.csv")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'gpu' needs a CUDA device"):
            depthdp.latency_table(micro_config, "gpu", tmp_path / "t.csv")
    assert not (tmp_path / "t.csv").exists()


def test_read_latency_table_names_a_file_that_is_not_one(tmp_path):
    (tmp_path / "x.csv").write_text("# a comment\nblock,bits,cost\n0,1,0.5\n")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "x.csv")) + ": not a depthdp latency table"):
        depthdp.read_latency_table(tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------------------------
# plan


def _synthetic_reports(folder, options, gains, base=50.0):
    """importance reports as the importance stage writes them, with ``gains[b, bits]`` over the reference."""
    write_json(folder / "dense.json", {"block": "dense", "options": [{"bits": "", "top1": base, "loss": 1.0}]})
    paths = []
    for b, _, opts in options:
        keys = [depthdp.bits_key(bits) for bits in opts[1:]]
        report = {"block": str(b), "options": [{"bits": k, "top1": base + gains[b, k], "loss": 1.0} for k in keys]}
        write_json(folder / f"{b}.json", report)
        paths.append(folder / f"{b}.json")
    return folder / "dense.json", paths


def _independent_table(options, csv_path, gains):
    latency = {(int(r["block"]), r["bits"]): float(r["latency"]) for r in _csv_rows(csv_path)}
    return [[(latency[b, depthdp.bits_key(bits)], gains.get((b, depthdp.bits_key(bits)), 0.0), sum(bits))
             for bits in opts] for b, _, opts in options]


def _check_mask(mask, out, options, table, config):
    """The mask JSON: its fields agree with each other, with the tables and with what finetuning applies."""
    model = create_model("mobilenetv2_100", 10, True).eval()
    units = activation_units(model, "layer")
    assert read_json(out) == mask
    assert read_mask(out) == mask  # finetuning's reader accepts it
    assert mask["method"] == "depthdp" and mask["granularity"] == "layer"
    assert mask["num_units"] == len(mask["keep"]) == len(units) == 35
    assert mask["num_kept"] == sum(mask["keep"]) and set(mask["keep"]) <= {0, 1}
    assert [u["name"] for u in mask["units"]] == [u.name for u in units]
    assert [u["keep"] for u in mask["units"]] == mask["keep"]
    dp = mask["dp"]
    assert dp["target"] == "mpc"
    # the chosen options are the keep-list's bits, with the tables' numbers
    assert [o["block"] for o in dp["options"]] == list(range(19))
    chosen = []
    for (b, units_b, opts), row, entry in zip(options, table, dp["options"]):
        bits = "".join(str(mask["keep"][u]) for u in units_b)
        assert entry["bits"] == bits
        o = [depthdp.bits_key(x) for x in opts].index(bits)
        assert (entry["latency"], entry["importance"]) == row[o][:2]
        chosen.append(row[o])
    assert dp["latency"] == pytest.approx(sum(o[0] for o in chosen), rel=1e-12)
    assert dp["importance"] == pytest.approx(sum(o[1] for o in chosen), rel=1e-12, abs=1e-12)
    assert dp["latency"] <= dp["budget_latency"] * (1 + TOL)
    assert dp["dense_latency"] == pytest.approx(sum(row[0][0] for row in table), rel=1e-12)
    assert mask["row"] == {"dp_budget_fraction": pytest.approx(dp["budget_latency"] / dp["dense_latency"]),
                           "dp_latency_fraction": pytest.approx(dp["latency"] / dp["dense_latency"]),
                           "dp_importance": dp["importance"]}
    # as finetuning applies it: exactly the mask's zeros become identities, the rest stay activation layers
    spec = mask_spec(read_mask(out), config["model"]["free_act"])
    apply_mask_spec(model, spec, merge_policy(config))
    identities = [isinstance(model.get_submodule(u.acts[0]), nn.Identity) for u in units]
    assert identities == [not k for k in mask["keep"]]
    assert nonlinear(model, config["data"]["image_size"])["nonlinear_layers"] == mask["num_kept"]


def _ds_mask(folder, keep_ratio=0.5):
    keep = [1] * num_kept(keep_ratio, 19) + [0] * (19 - num_kept(keep_ratio, 19))
    ds = {"method": "depthshrinker", "granularity": "block", "keep_ratio": keep_ratio, "num_units": 19,
          "num_kept": sum(keep), "keep": keep}
    write_json(folder / "ds.json", ds)
    return folder / "ds.json", keep


def _plan_fraction(config, csv_path, reference, blocks, folder, options, table):
    """plan at half the dense latency, its mask checked; (mask, dense latency)."""
    dense_latency = sum(row[0][0] for row in table)
    fraction = {**config, "depthdp": {**config["depthdp"], "budget": "fraction"}}
    mask = depthdp.plan(fraction, 0.5, csv_path, reference, blocks, folder / "frac.json")
    _check_mask(mask, folder / "frac.json", options, table, fraction)
    assert mask["dp"]["budget_latency"] == pytest.approx(0.5 * dense_latency, rel=1e-12)
    return mask, dense_latency


def _plan_match(config, csv_path, reference, blocks, folder, options, table):
    """plan matched to a DepthShrinker block mask, its mask checked; (mask, DS mask path, DS latency, DS
    importance), the DepthShrinker pattern's sums in the same tables."""
    match = {**config, "depthdp": {**config["depthdp"], "budget": "match"}}
    ds_path, ds_keep = _ds_mask(folder)
    mask = depthdp.plan(match, 0.5, csv_path, reference, blocks, folder / "match.json", match=ds_path)
    _check_mask(mask, folder / "match.json", options, table, match)
    ds_latency = sum(row[0 if k else -1][0] for row, k in zip(table, ds_keep))
    ds_importance = sum(row[0 if k else -1][1] for row, k in zip(table, ds_keep))
    assert mask["dp"]["budget_latency"] == pytest.approx(ds_latency, rel=1e-12)
    return mask, ds_path, ds_latency, ds_importance


def test_plan_with_synthetic_importances_is_the_dp_optimum(mpc_table, tmp_path):
    """Importances known exactly (multiples of 1/4, so their sums are exact): the plan is solve's choice on the
    tables read independently, and with budget match at least as good as DepthShrinker's own pattern."""
    config, csv_path, _ = mpc_table
    model = create_model("mobilenetv2_100", 10, True)
    options = depthdp.block_options(model)
    rng = random.Random(1)
    gains = {(b, depthdp.bits_key(bits)): -rng.randrange(0, 40) / 4 for b, _, opts in options for bits in opts[1:]}
    reference, blocks = _synthetic_reports(tmp_path, options, gains)
    table = _independent_table(options, csv_path, gains)

    mask, dense_latency = _plan_fraction(config, csv_path, reference, blocks, tmp_path, options, table)
    assert mask["keep_ratio"] == 0.5
    assert mask["dp"]["budget"] == "fraction"
    choice, total, gained, front = depthdp.solve(table, 0.5 * dense_latency)
    assert [o["bits"] for o in mask["dp"]["options"]] == [depthdp.bits_key(opts[o])
                                                          for (_, _, opts), o in zip(options, choice)]
    assert (mask["dp"]["latency"], mask["dp"]["importance"], mask["dp"]["pareto_front"]) == (total, gained, front)

    mask, ds_path, ds_latency, ds_importance = _plan_match(config, csv_path, reference, blocks, tmp_path, options,
                                                           table)
    assert mask["dp"]["budget"] == "match" and mask["dp"]["match"] == str(ds_path)
    assert mask["dp"]["latency"] <= ds_latency * (1 + TOL)
    assert mask["dp"]["importance"] >= ds_importance
    assert mask["dp"]["importance"] == depthdp.solve(table, ds_latency)[2]


def test_plan_error_paths(mpc_table, tmp_path):
    config, csv_path, _ = mpc_table
    options = depthdp.block_options(create_model("mobilenetv2_100", 10, True))
    gains = {(b, depthdp.bits_key(bits)): -1.0 for b, _, opts in options for bits in opts[1:]}
    reference, blocks = _synthetic_reports(tmp_path, options, gains)
    match = {**config, "depthdp": {**config["depthdp"], "budget": "match"}}
    fraction = {**config, "depthdp": {**config["depthdp"], "budget": "fraction"}}
    ds_path, _ = _ds_mask(tmp_path)
    with pytest.raises(ConfigError, match="'match' needs the DepthShrinker mask"):
        depthdp.plan(match, 0.5, csv_path, reference, blocks, tmp_path / "m.json")
    with pytest.raises(ConfigError, match="'match' needs the DepthShrinker mask"):
        depthdp.plan(fraction, 0.5, csv_path, reference, blocks, tmp_path / "m.json", match=ds_path)
    # a latency table without one of the rows
    lines = csv_path.read_text().splitlines(keepends=True)
    missing = [line for line in lines if not line.startswith("7,12 13,01,")]
    assert len(missing) == len(lines) - 1
    (tmp_path / "short.csv").write_text("".join(missing))
    message = re.escape(str(tmp_path / "short.csv")) + ": no latency for block 7 option 01"
    with pytest.raises(ConfigError, match=message):
        depthdp.plan(fraction, 0.5, tmp_path / "short.csv", reference, blocks, tmp_path / "m.json")
    # an importance report missing
    with pytest.raises(ConfigError, match="no importance for block 3 option 10"):
        depthdp.plan(fraction, 0.5, csv_path, reference, blocks[:3] + blocks[4:], tmp_path / "m.json")
    # a budget below the cheapest choice
    with pytest.raises(ConfigError, match="no choice fits the budget"):
        depthdp.plan(fraction, 0.0, csv_path, reference, blocks, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_importance_rejects_a_block_without_options(micro_config, tmp_path):
    model = create_model("mobilenetv2_100", 10, True)
    save(tmp_path / "dense.pt", model, {"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10,
                                        "small_input": True})
    for block in ("19", "99", "-1", "stem"):
        with pytest.raises(ConfigError, match=f"block '{block}' has no activations"):
            depthdp.importance(micro_config, tmp_path / "dense.pt", block, tmp_path / "imp.json")
    assert not (tmp_path / "imp.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# end to end: a trained dense network, the importance stage for every block, plan, finetune


@pytest.fixture(scope="module")
def importances(mpc_table, tmp_path_factory):
    config, _, _ = mpc_table
    config = {**config, "depthdp": {**config["depthdp"], "adapt_steps": 0}}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("depthdp_importance")
    train_dense(config, tmp / "dense.pt")
    reference = depthdp.importance(config, tmp / "dense.pt", "dense", tmp / "imp" / "dense.json")
    blocks = [tmp / "imp" / f"{b}.json" for b, _, _ in depthdp.block_options(create_model("mobilenetv2_100", 10))]
    reports = [depthdp.importance(config, tmp / "dense.pt", str(b), path) for b, path in enumerate(blocks)]
    return config, tmp / "dense.pt", reference, tmp / "imp" / "dense.json", blocks, reports


@pytest.mark.slow
def test_importance_reports_score_each_option_against_the_dense_reference(importances, tmp_path):
    config, dense, reference, reference_path, paths, reports = importances
    options = depthdp.block_options(create_model("mobilenetv2_100", 10, True))
    assert reference["block"] == "dense" and [r["bits"] for r in reference["options"]] == [""]
    assert reference["adapt"]["adapt_steps"] == 0 and reference["adapt"]["adapt_lr"] > 0
    for (b, _, opts), path, report in zip(options, paths, reports):
        assert read_json(path) == report and report["block"] == str(b)
        assert [r["bits"] for r in report["options"]] == [depthdp.bits_key(bits) for bits in opts[1:]]
        assert all(0 <= r["top1"] <= 100 for r in report["options"])
    table = depthdp.importance_table(reference_path, paths)
    assert len(table) == 70 - 19
    base = reference["options"][0]["top1"]
    for report in reports:
        for r in report["options"]:
            assert table[int(report["block"]), r["bits"]] == min(0.0, r["top1"] - base)
    # block 5, bits "10": only the second activation of block 5 (layer unit 9) removed, scored as the stage does
    model, _ = load_model(dense)
    keep = [1] * 35
    keep[9] = 0
    apply_keep(model, activation_units(model, "layer"), keep, config["model"]["free_act"], merge_policy(config))
    cfg = depthdp.ImportanceConfig(adapt_steps=0, adapt_lr=reference["adapt"]["adapt_lr"],
                                   holdout_images=config["depthdp"]["holdout_images"],
                                   calibration_batches=config["depthdp"]["calibration_batches"])
    score = scorer(build_datasets(config["data"], config["seed"]), cfg, config["data"], config["seed"])(model)
    assert reports[5]["options"][0]["bits"] == "10" and reports[5]["options"][0]["top1"] == score["top1"]
    # with adaptation steps: the same block again, deterministic
    adapted = {**config, "depthdp": {**config["depthdp"], "adapt_steps": 1}}
    a = depthdp.importance(adapted, dense, "1", tmp_path / "a.json")
    b = depthdp.importance(adapted, dense, "1", tmp_path / "b.json")
    assert a == b and a["adapt"]["adapt_steps"] == 1 and [r["bits"] for r in a["options"]] == ["0"]


@pytest.mark.slow
def test_plan_end_to_end_then_finetune(importances, mpc_table, tmp_path):
    config, dense, _, reference_path, paths, _ = importances
    _, csv_path, _ = mpc_table
    options = depthdp.block_options(create_model("mobilenetv2_100", 10, True))
    gains = depthdp.importance_table(reference_path, paths)
    table = _independent_table(options, csv_path, gains)

    mask, dense_latency = _plan_fraction(config, csv_path, reference_path, paths, tmp_path, options, table)
    assert mask["dp"]["latency"] <= mask["dp"]["budget_latency"]
    assert mask["dp"]["importance"] == depthdp.solve(table, 0.5 * dense_latency)[2]

    matched, _, _, ds_importance = _plan_match(config, csv_path, reference_path, paths, tmp_path, options, table)
    assert matched["dp"]["importance"] >= ds_importance

    # finetuning takes the mask: the student has exactly its activations, and the summary row comes along
    metrics = finetune(config, dense, tmp_path / "frac.json", tmp_path / "ft.pt")
    spec = load(tmp_path / "ft.pt")["spec"]
    assert spec["mask"]["granularity"] == "layer" and spec["mask"]["keep"] == mask["keep"]
    assert metrics["row"] == mask["row"]


def test_importance_is_top1_gained_or_loss_saved_over_dense(tmp_path):
    write_json(tmp_path / "dense.json", {"block": "dense", "options": [{"bits": "", "top1": 90.0, "loss": 0.5}]})
    write_json(tmp_path / "3.json", {"block": "3", "options": [{"bits": "10", "top1": 88.0, "loss": 0.75},
                                                             {"bits": "00", "top1": 91.0, "loss": 0.25}]})
    paths = (tmp_path / "dense.json", [tmp_path / "3.json"])
    # a gain over the dense network (noise of the short finetune) counts as none: keeping the block whole
    assert depthdp.importance_table(*paths) == {(3, "10"): -2.0, (3, "00"): 0.0}
    assert depthdp.importance_table(*paths, "loss") == {(3, "10"): -0.25, (3, "00"): 0.0}


def test_cpu_latency_table_times_every_deployed_option(mpc_table, tmp_path):
    config, _, mpc_rows = mpc_table
    rows = depthdp.latency_table(config, "cpu", tmp_path / "cpu.csv", repeats=2)
    header = (tmp_path / "cpu.csv").read_text().splitlines()[0]
    assert "unit of measure: ms" in header and "measured on cpu, batch 1" in header
    assert all(r["latency"] > 0 for r in rows)
    # the same deployed networks as the MPC table: the merge plan is the config's deploy target's, not the table's
    assert [(r["block"], r["bits"], r["segments"]) for r in rows] == \
        [(r["block"], r["bits"], r["segments"]) for r in mpc_rows]
