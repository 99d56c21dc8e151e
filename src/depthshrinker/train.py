"""The one training engine behind dense training, search and finetuning.

SGD (Nesterov) with weight decay on weights only (never 1-D parameters or gate scores), linear warm-up then a
per-step cosine schedule, label smoothing, global gradient-norm clipping, optional knowledge distillation
(``alpha * T² * KL(teacher ‖ student) + (1 - alpha) * CE``, Hinton et al. 2015), optional autocast and
channels_last, DistributedDataParallel when torch.distributed is initialised (torchrun). Seeded per epoch,
so a run resumed from its last checkpoint (written atomically after every epoch) follows the same trajectory.

Each epoch ends with an evaluation on the selection split (never on the test split); with ``patience`` the
run stops once the selection loss has not improved for that many epochs, and the weights of its best epoch
are the result (early stopping, Prechelt 1998). The test split is evaluated once, on the final weights,
together with the agreement with the dense teacher (top-1 agreement and KL).

SNL's soft masks (parameters named ``alpha``) train in their own Adam optimiser at a constant ``mask_lr``
(Cho et al. 2022, Algorithm 1), outside the weights' gradient clip and schedule, when the recipe sets one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from depthshrinker.base.checkpoint import atomic_save
from depthshrinker.nets.gates import is_gate_param

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    epochs: int
    lr: float  # actual peak learning rate (already scaled by the global batch)
    lr_min: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    grad_clip: float | None = 5.0
    warmup_epochs: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    mask_lr: float | None = None  # SNL masks (``alpha``) in their own Adam at this lr; None: with the weights
    patience: int | None = None  # stop after this many epochs without a lower selection loss; None: never

    @classmethod
    def from_config(cls, config: dict, stage: str, distill: bool = False) -> "Recipe":
        """The recipe of ``stages.<stage>`` with the shared ``train`` keys; lr scaled to the global batch."""
        train, st = config["train"], config["stages"][stage]
        world = dist.get_world_size() if dist.is_initialized() else 1
        lr = st["lr"] * config["data"]["batch_size"] * world / train["lr_reference_batch"]
        kd = config["stages"]["distill"]
        return cls(epochs=st["epochs"], lr=lr, lr_min=train["lr_min"], momentum=train["momentum"],
                   nesterov=train["nesterov"], weight_decay=train["weight_decay"],
                   label_smoothing=train["label_smoothing"], grad_clip=train["grad_clip"],
                   warmup_epochs=train["warmup_epochs"], amp=train["amp"], channels_last=train["channels_last"],
                   distill_alpha=kd["alpha"] if distill and kd["enabled"] else 0.0,
                   distill_temperature=kd["temperature"], patience=st.get("patience"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def init_distributed():
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), and leave it afterwards."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_mask_param(name: str) -> bool:
    """SNL's soft masks, the parameters a recipe with ``mask_lr`` trains in their own Adam optimiser."""
    return name.rsplit(".", 1)[-1] == "alpha"


def param_groups(model: nn.Module, weight_decay: float, exclude: Callable[[str], bool] = lambda name: False
                 ) -> list[dict]:
    """Weight decay on weight matrices and kernels only: 1-D parameters (biases, BN) and gate scores are exempt;
    parameters whose name ``exclude`` accepts are left out. Hand-written rather than timm's
    ``param_groups_weight_decay``: that filter exempts only 1-D and ``.bias`` parameters, while SNL's channel/pixel
    gate scores are 4-D (1×C×1×1, 1×1×H×W) and SNL element's masks must leave the SGD groups for their own Adam."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and not exclude(name):
            (no_decay if p.ndim <= 1 or is_gate_param(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizers(model: nn.Module, recipe: Recipe) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(SGD over the weights, Adam over SNL's masks or None): without ``recipe.mask_lr`` everything is in SGD."""
    split = recipe.mask_lr is not None
    groups = param_groups(model, recipe.weight_decay, is_mask_param if split else lambda name: False)
    sgd = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0)
    masks = [p for name, p in model.named_parameters() if p.requires_grad and is_mask_param(name)]
    return sgd, (torch.optim.Adam(masks, lr=recipe.mask_lr) if split and masks else None)


def cosine_lambda(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at step t: linear warm-up, then cosine down to lr_min."""
    total, warm = recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch)
    floor = recipe.lr_min / recipe.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                 recipe: Recipe) -> torch.Tensor:
    """CE with label smoothing, mixed with ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T))`` given a teacher."""
    ce = F.cross_entropy(logits, targets, label_smoothing=recipe.label_smoothing)
    if teacher_logits is None or recipe.distill_alpha == 0:
        return ce
    t = recipe.distill_temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean",
                  log_target=True)
    return recipe.distill_alpha * t * t * kl + (1 - recipe.distill_alpha) * ce


def _autocast(recipe: Recipe, dev: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.amp)
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


def _sum_across_ranks(*values: float) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader, recipe: Recipe | None = None, reference: nn.Module | None = None) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy (``loss``, the NLL) over ``loader``; with a ``reference``
    network (the dense teacher) also ``agreement``, the % of images where both predict the same class, and
    ``kl``, the mean KL(reference ‖ model) of their softmax outputs in nats (sums across ranks under DDP)."""
    dev = next(model.parameters()).device
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    correct = loss = count = agree = kl = 0.0
    for images, targets in loader:
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        if recipe is not None and recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(recipe or Recipe(1, 1.0), dev):
            logits = model(images).float()
            ref = reference(images).float() if reference is not None else None
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += targets.numel()
        if ref is not None:
            agree += (logits.argmax(1) == ref.argmax(1)).sum().item()
            kl += F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref, 1), reduction="sum", log_target=True).item()
    for m, training in modes:
        m.train(training)
    correct, loss, count, agree, kl = _sum_across_ranks(correct, loss, count, agree, kl)
    n = max(count, 1)
    out = {"top1": 100.0 * correct / n, "loss": loss / n}
    return out | ({"agreement": 100.0 * agree / n, "kl": kl / n} if reference is not None else {})


def fingerprint(recipe: Recipe, identity: dict) -> str:
    """What a resumable checkpoint must match: the recipe and whatever the caller says defines the run."""
    return hashlib.sha256(json.dumps([asdict(recipe), identity], sort_keys=True).encode()).hexdigest()[:16]


def fit(model: nn.Module, train_loader, select_loader, recipe: Recipe, resume_path: str | Path, *,
        teacher: nn.Module | None = None, regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
        on_epoch_end: Callable[[int, nn.Module, dict], bool] | None = None,
        stop_step: Callable[[nn.Module], bool] | None = None, identity: dict | None = None,
        seed: int = 0, desc: str = "train") -> list[dict]:
    """Train ``model`` in place for ``recipe.epochs`` (fewer with ``recipe.patience``: see the module docstring)
    and return the per-epoch history, each epoch scored on ``select_loader`` (``select_top1``, ``select_loss``).

    ``resume_path`` holds the last finished epoch (written atomically each epoch, removed by the caller when
    the stage's output is written); a run with the same recipe and ``identity`` resumes from it.
    ``regularizer(model)`` is added to the loss; ``on_epoch_end(epoch, model, record)`` may return True to
    stop early (SNL's budget); ``stop_step(model)``, asked after every step, may end the epoch there (the
    record gets ``stopped_at_step``) and then the run once ``on_epoch_end`` agrees."""
    dev = device()
    model.to(dev)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
        if recipe.channels_last:
            teacher.to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    optimizer, mask_optimizer = optimizers(model, recipe)
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    steps = len(train_loader)
    if steps == 0:
        raise ValueError("the training set has fewer images than one batch (data.batch_size)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(recipe, steps))
    scaler = torch.amp.GradScaler(dev.type, enabled=recipe.amp == "fp16")
    key = fingerprint(recipe, identity or {})
    history: list[dict] = []
    best = {"loss": math.inf, "epoch": 0, "state": None}  # the best selection loss so far (early stopping)
    start = 0
    resume_path = Path(resume_path)
    if resume_path.is_file():
        state = torch.load(resume_path, map_location=dev, weights_only=True)
        if state.get("fingerprint") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if mask_optimizer is not None:
                mask_optimizer.load_state_dict(state["mask_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start, history, best = state["epoch"], state["history"], state.get("best", best)
            if state.get("stopped"):
                start = recipe.epochs
            log.info("%s: resumed from %s after epoch %d", desc, resume_path, start)
        else:
            log.warning("%s: ignoring %s (it belongs to another run)", desc, resume_path)

    for epoch in range(start, recipe.epochs):
        torch.manual_seed(seed + epoch)
        if getattr(train_loader, "generator", None) is not None:
            train_loader.generator.manual_seed(seed + epoch)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        net.train()
        total = torch.zeros((), device=dev)
        seen, step_stop, tic = 0, None, time.perf_counter()
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{recipe.epochs}", leave=False, disable=None,
                   mininterval=1.0)
        for step, (images, targets) in enumerate(bar, 1):
            images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            if recipe.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(recipe, dev):
                teacher_logits = None
                if teacher is not None and recipe.distill_alpha > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(images).float()
                loss = distill_loss(net(images).float(), targets, teacher_logits, recipe)
                if regularizer is not None:
                    loss = loss + regularizer(model)
            optimizer.zero_grad(set_to_none=True)
            if mask_optimizer is not None:
                mask_optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(clipped, recipe.grad_clip)
            scaler.step(optimizer)
            if mask_optimizer is not None:
                scaler.step(mask_optimizer)
            scaler.update()
            scheduler.step()
            total += loss.detach()
            seen += targets.numel()
            if stop_step is not None and stop_step(model):
                step_stop = step
                break
        loss_sum = total.item()  # waits for queued GPU work, so that the elapsed time is the real one
        elapsed = time.perf_counter() - tic
        batches_run = step_stop or steps
        train_loss, batches, seen_all = _sum_across_ranks(loss_sum, batches_run, seen)
        record = {"epoch": epoch + 1, "train_loss": train_loss / batches,
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen_all / elapsed,
                  **{f"select_{k}": v for k, v in evaluate(model, select_loader, recipe).items()}}
        if step_stop is not None:
            record["stopped_at_step"] = step_stop
        stop = bool(on_epoch_end(epoch, model, record)) if on_epoch_end else False
        if recipe.patience is not None:
            if record["select_loss"] < best["loss"]:
                best = {"loss": record["select_loss"], "epoch": epoch + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            stop = stop or epoch + 1 - best["epoch"] >= recipe.patience
        history.append(record)
        log.info("%s epoch %d/%d: loss %.4f, selection top-1 %.2f %% (loss %.4f), %.0f img/s", desc, epoch + 1,
                 recipe.epochs, record["train_loss"], record["select_top1"], record["select_loss"],
                 record["images_per_s"])
        if is_main():
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         **({"mask_optimizer": mask_optimizer.state_dict()} if mask_optimizer else {}),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "history": history, "fingerprint": key, "stopped": stop,
                         "best": best},
                        resume_path)
        if dist.is_initialized():
            dist.barrier()
        if stop:
            break
    if best["state"] is not None:  # early stopping: the weights of the best selection loss
        model.load_state_dict(best["state"])
        for record in history:
            record["best"] = record["epoch"] == best["epoch"]
    if recipe.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history


def train_stage(config: dict, stage: str, model: nn.Module, spec: dict, out: str | Path, loaders, *,
                teacher: nn.Module | None = None, reference: nn.Module | None = None, regularizer=None,
                on_epoch_end=None, stop_step=None, distill: bool = False, desc: str | None = None,
                recipe_overrides: dict | None = None, extra_metrics: Callable[[list[dict]], dict] | None = None
                ) -> dict:
    """Train one stage (``stages.<stage>`` recipe, with ``recipe_overrides``) on ``loaders`` (``data.Loaders``),
    then write ``out`` (state_dict + spec + history) and ``out`` with suffix ``.json`` (the metrics, below), and
    drop the resume file ``<out>.last``.

    Metrics on the test split, of the final weights: ``top1``, ``nll`` (mean cross-entropy) and, against
    ``reference`` (the dense teacher; ``teacher`` when not given), ``teacher_agreement`` (% same top-1 class)
    and ``teacher_kl`` (mean KL(teacher ‖ model), nats); ``test_images``, ``epochs`` run, ``best_epoch`` (early stopping), the recipe,
    ``extra_metrics(history)`` and the history."""
    from depthshrinker.base.checkpoint import save
    from depthshrinker.base.jsonio import write_json

    out = Path(out)
    recipe = replace(Recipe.from_config(config, stage, distill=distill), **(recipe_overrides or {}))
    resume = out.with_name(out.name + ".last")
    identity = {"stage": stage, "spec": spec, "data": config["data"], "seed": config["seed"]}
    history = fit(model, loaders.train, loaders.select, recipe, resume, teacher=teacher, regularizer=regularizer,
                  on_epoch_end=on_epoch_end, stop_step=stop_step, identity=identity, seed=config["seed"],
                  desc=desc or stage)
    reference = reference if reference is not None else teacher
    if reference is not None:
        reference.to(next(model.parameters()).device)
    test = evaluate(model, loaders.test, recipe, reference)
    best = next((r["epoch"] for r in history if r.get("best")), history[-1]["epoch"])
    metrics = {"stage": stage, "top1": test["top1"], "nll": test["loss"],
               **({"teacher_agreement": test["agreement"], "teacher_kl": test["kl"]} if "kl" in test else {}),
               "test_images": len(loaders.test.dataset), "epochs": len(history), "best_epoch": best,
               "recipe": asdict(recipe), **(extra_metrics(history) if extra_metrics else {}), "history": history}
    if is_main():
        save(out, model.cpu(), spec, metrics=json.dumps(metrics))
        write_json(out.with_suffix(".json"), metrics)
        resume.unlink(missing_ok=True)
    return metrics


def set_threads(threads: int | None) -> None:
    """CPU threads of this process's torch (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
