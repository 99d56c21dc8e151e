"""The DepthShrinker top-k gate: exact keep ratio, straight-through gradients, exact forward; the stage-2 form
with its merge plan (pad-first only where the plan merges)."""
import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from depthshrinker.deploy.load import build
from depthshrinker.deploy.merge import merge_plain
from depthshrinker.deploy.mpc.cost import count
from depthshrinker.deploy.plan import apply_keep, apply_mask_spec
from depthshrinker.nets.counting import macs
from depthshrinker.nets.gates import GatedAct, TopKGates, install_topk_gates, keep_from_scores, num_kept
from depthshrinker.nets.plain import to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units


@given(L=st.integers(1, 60), ratio=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_keep_ratio_is_exact_for_any_scores(L, ratio, seed):
    scores = torch.randn(L, generator=torch.Generator().manual_seed(seed))
    scores[: L // 3] = 0.0  # ties
    keep = keep_from_scores(scores, ratio)
    assert int(keep.sum()) == num_kept(ratio, L) == max(0, min(L, round(ratio * L)))
    # the kept units are exactly the smallest scores
    if 0 < keep.sum() < L:
        assert scores[keep].max() <= scores[~keep].min()


def test_keep_ratio_stays_exact_during_training(mbv2):
    units = activation_units(mbv2, "block")
    gates = install_topk_gates(mbv2, units, 0.4)
    opt = torch.optim.SGD([gates.scores], lr=1.0)
    for _ in range(3):
        r = gates()
        assert int((r.detach() == 0).sum()) == round(0.4 * 19) == 8
        mbv2(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_gradients_reach_every_score(mbv2):
    gates = install_topk_gates(mbv2, activation_units(mbv2, "layer"), 0.5)
    mbv2.train()
    mbv2(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    assert gates.scores.grad is not None
    assert (gates.scores.grad != 0).all()


def test_gated_forward_is_exactly_relu6_or_identity():
    gates = TopKGates(2, 0.5)
    with torch.no_grad():
        gates.scores.copy_(torch.tensor([0.3, 0.7]))  # unit 0 keeps, unit 1 removed
    x = torch.linspace(-10, 10, 101)
    assert torch.equal(GatedAct(nn.ReLU6(), gates, 0)(x), torch.clamp(x, 0, 6))
    assert torch.equal(GatedAct(nn.ReLU6(), gates, 1)(x), x)


def test_apply_keep_removes_activations_and_counts(mbv2):
    units = activation_units(mbv2, "block")
    keep = [1] * len(units)
    keep[3] = 0
    apply_keep(mbv2, units, keep)
    for path in units[3].acts:
        assert isinstance(mbv2.get_submodule(path), nn.Identity)
    assert isinstance(mbv2.get_submodule(units[4].acts[0]), nn.ReLU6)


def _expansion_units(model, units):
    return [u.acts[0].endswith("bn1.act") and isinstance(model.get_submodule(u.block), InvertedResidual)
            if u.block else False for u in units]


def test_pad_first_only_where_the_plan_merges(mbv2):
    """Removing the 16 expansion ReLU6s (layer granularity) leaves every run pw -> dw(ReLU6) unmerged under the
    MACs policy (a dense 3x3 costs ~9x), so no block goes pad-first and the deployed network has exactly the dense
    MACs (pad-first everywhere made it 1.50x: 16 1x1 convs on padded maps, merged into dense 3x3s). Removing a
    whole block merges it, in pad-first form."""
    dense = macs(to_plain(mbv2), 32)
    units = activation_units(mbv2, "layer")
    expansion = _expansion_units(mbv2, units)
    assert sum(expansion) == 16
    apply_keep(mbv2, units, [int(not e) for e in expansion])
    irs = [m for m in mbv2.modules() if isinstance(m, InvertedResidual)]
    assert all(tuple(m.conv_pw.padding) == (0, 0) and tuple(m.conv_dw.padding) == (1, 1) for m in irs)
    assert not any(b["pad_first"] for b in mbv2.merge_plan["blocks"])
    assert macs(merge_plain(to_plain(mbv2)), 32) == dense
    model = create_model("mobilenetv2_100", 10, small_input=True).eval()
    apply_keep(model, activation_units(model, "block"), [int(i != 3) for i in range(19)])
    assert tuple(model.blocks[1][1].conv_pw.padding) == (1, 1) and tuple(model.blocks[1][1].conv_dw.padding) == (0, 0)
    assert sum(b["pad_first"] for b in model.merge_plan["blocks"]) == 1


def test_mpc_policy_merges_expansion_into_depthwise_in_pad_first_form(mbv2):
    """Only block 2's expansion ReLU6 removed: under MPC one dense 3x3 16->96 at 32x32 opens the 16-channel input
    instead of it and the 96-channel expanded map (1.39 MB less, one round less), so it merges, pad-first; the
    MACs policy keeps it unmerged."""
    units = activation_units(mbv2, "layer")
    keep = [int(u.acts[0] != "blocks.1.0.bn1.act") for u in units]
    policy = {"name": "mpc", "input_size": 32, "network": "lan"}
    apply_keep(mbv2, units, keep, policy=policy)
    assert mbv2.merge_plan["blocks"][2]["segments"] == [[0, 1], [2]] and mbv2.merge_plan["blocks"][2]["pad_first"]
    assert tuple(mbv2.blocks[1][0].conv_pw.padding) == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    merged = merge_plain(to_plain(mbv2))
    with torch.no_grad():
        assert (merged(x) - mbv2(x)).abs().max() <= 1e-4 * (1 + mbv2(x).abs().max())
    macs_model = create_model("mobilenetv2_100", 10, small_input=True).eval()
    apply_keep(macs_model, activation_units(macs_model, "layer"), keep)
    assert macs_model.merge_plan["blocks"][2]["segments"] == [[0], [1], [2]]
    assert tuple(macs_model.blocks[1][0].conv_pw.padding) == (0, 0)
    mpc, unmerged = (count(merge_plain(to_plain(m)), 32) for m in (mbv2, macs_model))
    assert (unmerged.bytes - mpc.bytes, unmerged.rounds - mpc.rounds) == (1_390_080, 1)


def test_apply_mask_spec_records_the_plan_and_a_checkpoint_rebuilds_it(mbv2):
    """The plan decided in finetuning is written into the mask spec; rebuilding the checkpoint reuses it (no
    policy needed, none re-decided), so the trained form and the merged form cannot drift apart."""
    units = activation_units(mbv2, "layer")
    keep = [int(u.acts[0] != "blocks.1.0.bn1.act") for u in units]
    mask = {"granularity": "layer", "keep": keep, "free_act": "none"}
    apply_mask_spec(mbv2, mask, {"name": "mpc", "input_size": 32, "network": "lan"})
    recorded = json.loads(json.dumps(mask))
    assert recorded["merge_plan"] == mbv2.merge_plan
    rebuilt = build({"kind": "timm", "arch": "mobilenetv2_100", "num_classes": 10, "small_input": True,
                     "mask": recorded})
    assert rebuilt.merge_plan == mbv2.merge_plan
    assert tuple(rebuilt.blocks[1][0].conv_pw.padding) == (1, 1)
    assert to_plain(rebuilt).spec["merge_plan"]["policy"]["name"] == "mpc"
