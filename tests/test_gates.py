"""The DepthShrinker top-k gate: exact keep ratio, straight-through gradients, exact forward."""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from depthshrinker.gates import GatedAct, TopKGates, apply_keep, install_topk_gates, keep_from_scores, num_kept
from depthshrinker.models import activation_units


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
