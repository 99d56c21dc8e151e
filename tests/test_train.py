"""The training engine: resume after a kill, distillation loss, weight-decay groups, schedule."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from depthshrinker.base.checkpoint import load
from depthshrinker.methods.baselines import train_dense
from depthshrinker.nets.gates import install_topk_gates
from depthshrinker.nets.units import activation_units
from depthshrinker.train import Recipe, cosine_lambda, distill_loss, param_groups


def test_distill_loss_formula():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    r = Recipe(1, 0.1, label_smoothing=0.0, distill_alpha=0.7, distill_temperature=2.0)
    ps, pt = torch.softmax(s / 2, 1), torch.softmax(t / 2, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    expected = 0.7 * 4 * kl + 0.3 * torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distill_loss(s, y, t, r), expected, atol=1e-6)
    assert torch.allclose(distill_loss(s, y, None, r), torch.nn.functional.cross_entropy(s, y))


def test_no_weight_decay_on_1d_params_or_scores(mbv2):
    install_topk_gates(mbv2, activation_units(mbv2), 0.5)
    decay, no_decay = param_groups(mbv2, 1e-5)
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is mbv2.ds_gates.scores for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0


def test_cosine_schedule_ends_at_lr_min_after_warmup():
    f = cosine_lambda(Recipe(epochs=10, lr=0.1, lr_min=0.001, warmup_epochs=1), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.01)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_dense_training_learns_and_writes_outputs(micro_config, tmp_path):
    cfg = {**micro_config, "stages": {**micro_config["stages"], "dense": {"epochs": 2, "lr": 2.0}}}
    out = tmp_path / "dense.pt"
    metrics = train_dense(cfg, out)
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not out.with_name("dense.pt.last").exists()
    assert len(metrics["history"]) == 2 and metrics["test_images"] == 128
    assert metrics["history"][1]["train_loss"] < metrics["history"][0]["train_loss"]
    ckpt = load(out)
    assert ckpt["spec"]["arch"] == "mobilenetv2_100" and "state_dict" in ckpt


def _cli(config_path, out, **kw):
    cmd = [sys.executable, "-m", "depthshrinker.cli", "train-dense", "--config", str(config_path), "--out", str(out),
           "--threads", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_killed_run_resumes_without_losing_epochs(micro_config, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the rerun resumes and ends bit-identical to a clean run."""
    cfg = {**micro_config, "stages": {**micro_config["stages"], "dense": {"epochs": 3, "lr": 2.0}}}
    cfg["data"] = {**cfg["data"], "limit": 256}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    clean, resumed = tmp_path / "clean.pt", tmp_path / "resumed.pt"
    assert _cli(config_path, clean).wait() == 0

    last = tmp_path / "resumed.pt.last"
    proc = _cli(config_path, resumed)
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not resumed.exists(), "the kill should land after epoch 1, before the end"
    assert torch.load(last, weights_only=True)["epoch"] < 3
    run = _cli(config_path, resumed)
    _, err = run.communicate()
    assert run.returncode == 0
    assert b"resumed from" in err
    a, b = load(clean)["state_dict"], load(resumed)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_nll_and_teacher_agreement_against_a_hand_computed_case():
    """Two images, three classes, logits fixed by hand: NLL, top-1, agreement and KL(teacher ‖ student)."""
    from depthshrinker.train import evaluate

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.tensor(logits))

        def forward(self, x):
            return self.logits[x.long().flatten()]

    student = Fixed([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = Fixed([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    loader = [(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 2]))]
    m = evaluate(student, loader, reference=teacher)
    nll = (-math.log(math.e ** 2 / (math.e ** 2 + 2)) - math.log(1 / (math.e + 2))) / 2
    assert m["top1"] == 50.0 and m["loss"] == pytest.approx(nll, rel=1e-6)
    assert m["agreement"] == 50.0  # image 0: both say 0; image 1: student 1, teacher 2

    def kl(t, s):
        p, q = torch.softmax(torch.tensor(t), 0), torch.softmax(torch.tensor(s), 0)
        return float((p * (p.log() - q.log())).sum())

    assert m["kl"] == pytest.approx((kl([1.0, 0, 0], [2.0, 0, 0]) + kl([0, 0, 3.0], [0, 1.0, 0])) / 2, rel=1e-5)
    assert evaluate(student, loader, reference=student)["kl"] == 0.0
    assert "kl" not in evaluate(student, loader)


def test_early_stopping_keeps_the_weights_of_the_best_selection_loss(tmp_path):
    """A learning rate too large to converge: the selection loss rises after some epoch; with patience the run
    stops `patience` epochs after its best and returns the best epoch's weights (the selection loss they give
    is the best recorded)."""
    from depthshrinker.train import evaluate, fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    select = [(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))]
    net = torch.nn.Linear(4, 3)
    recipe = Recipe(epochs=30, lr=5.0, momentum=0.9, label_smoothing=0.0, grad_clip=None, patience=2)
    history = fit(net, train, select, recipe, tmp_path / "x.last")
    losses = [r["select_loss"] for r in history]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert len(history) == best + 1 + 2 < 30, "stops two epochs after its best"
    assert [r["best"] for r in history] == [i == best for i in range(len(history))]
    assert evaluate(net, select)["loss"] == pytest.approx(losses[best], rel=1e-6)
    assert all(later >= losses[best] for later in losses[best + 1:])
