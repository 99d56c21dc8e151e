"""Channel-pruning baseline in the spirit of MetaPruning (Liu et al., ICCV 2019): an evolutionary search over
per-stage widths under a cost budget, every candidate cut from the trained dense network, scored after
BatchNorm recalibration on the selection split (training images never trained on; DESIGN "Three splits"),
the winner trained with the ``pruned`` recipe.

Instead of MetaPruning's PruningNet (a hypernetwork that generates the weights of any candidate), candidates
inherit the dense weights: torch-pruning's DependencyGraph (Fang et al., CVPR 2023) finds the coupled channels
(residual-tied block outputs, an expansion and its depthwise conv, the head conv and the classifier input) and
every group keeps its channels of largest L2 magnitude. A gene is a stage's *relative* width; each candidate
is scaled uniformly to spend the budget (the largest scale whose cost fits), so all candidates are feasible and
compete at the same cost. The uniform profile (MetaPruning's own baseline) is in the first generation.

A pruned network stays a timm EfficientNet-family model; its spec is the base spec with ``kind: "pruned"`` and
``channels`` (output channels of every dense convolution), from which ``build_pruned`` recreates the shapes.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_datasets, build_loaders
from depthshrinker.base.jsonio import write_json
from depthshrinker.deploy.load import load_model
from depthshrinker.nets.counting import macs, params
from depthshrinker.nets.cut import dense_convs, genes, kept_channels, prune, pruned_spec, stages, width_of
from depthshrinker.train import Recipe, device, evaluate, is_main, train_stage

log = logging.getLogger(__name__)

def _mpc_comm(config: dict) -> Callable[[nn.Module], float]:
    """Two-party communication time of a timm or plain network: CrypTen's exact bytes B and rounds R (the cost
    model) at the ``mpc.network`` preset, ``R·RTT + (B/2)·8/bandwidth`` seconds, without the cost model's
    fitted compute term (the budget matches the bytes and rounds the plots show, not a box-specific fit)."""
    from depthshrinker.deploy.mpc.cost import NETWORKS, estimate
    from depthshrinker.deploy.mpc.engine import as_plain

    size, network = config["data"]["image_size"], config["mpc"]["network"]
    if NETWORKS[network].rtt_s == 0 and math.isinf(NETWORKS[network].bandwidth_bit_s):
        raise ConfigError(f"mpc.network: '{network}' costs no communication; the mpc budget needs lan or wan")
    return lambda model: estimate(as_plain(copy.deepcopy(model).cpu()), size, network, compute_s=0.0)["latency_s"]


COSTS: dict[str, Callable[[dict], Callable[[nn.Module], float]]] = {
    "macs": lambda config: lambda model: float(macs(model, config["data"]["image_size"])),
    "params": lambda config: lambda model: float(params(model)),
    "mpc": _mpc_comm,
}
COST_NAMES = {"macs": "multiply-accumulates at data.image_size", "params": "parameters",
              "mpc": "CrypTen cost model: rounds x RTT + bytes / bandwidth at mpc.network {network}, no compute term"}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> None:
    """Re-estimate every BatchNorm's running statistics as the cumulative average over ``batches`` of
    (images, labels) (``torch.optim.swa_utils.update_bn``: train-mode forward without gradients, momentum None),
    as MetaPruning does for each candidate."""
    update_bn(batches, model, device=next(model.parameters()).device)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The ``metapruning`` config section: evolution, gene grid, budget fit and scoring data."""
    population: int = 8  # candidates per generation
    generations: int = 4  # the first is the uniform profile plus random ones
    parents: int = 3  # best candidates so far that breed the next generation
    mutation_prob: float = 0.2  # chance that a gene of a mutated child is redrawn
    min_width: float = 0.1  # gene grid: min_width, min_width + width_step, ..., 1.0
    width_step: float = 0.1
    round_to: int = 8  # kept channels are multiples of this
    tolerance: float = 0.03  # a candidate's cost lands in [(1 - tolerance) * budget, budget] when it can
    holdout_images: int = 256  # images of the selection split that score candidates (the first ones)
    calibration_batches: int = 2  # training batches that recalibrate BatchNorm
    adapt_steps: int = 20  # SGD steps on training batches before scoring (a stand-in for PruningNet's weights)
    adapt_lr: float | None = None  # None: the ``pruned`` stage's (batch-scaled) learning rate

    @classmethod
    def from_config(cls, config: dict) -> "SearchConfig":
        section = config.get("metapruning") or {}
        known = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in known:
                raise ConfigError(f"config key 'metapruning.{key}': unknown (known: {', '.join(known)})")
        return cls(**section)

    def choices(self) -> list[float]:
        return [round(self.min_width + k * self.width_step, 6)
                for k in range(math.floor((1 - self.min_width) / self.width_step + 1e-9) + 1)]


def fit_budget(dense: nn.Module, profile: dict[str, float], budget: float, cost_fn: Callable[[nn.Module], float],
               round_to: int = 8, tolerance: float = 0.03, floor: float = 0.0, steps: int = 16
               ) -> tuple[nn.Module, dict, float]:
    """(pruned copy of ``dense``, widths, cost) for the largest scale ``s`` of ``profile`` (widths
    ``min(1, s * gene)``) whose cost fits ``budget``. Secant steps on ``log(cost - floor)`` against ``log s``
    (``floor``: the narrowest network's cost), aimed at the middle of ``[(1 - tolerance) * budget, budget]`` and
    kept inside the bracket by bisection, stop inside that window or after ``steps`` probes (scales that give
    the same channel counts are cut once); the narrowest network is the fallback."""
    convs, gene = dense_convs(dense), genes(dense)
    cache: dict[tuple, tuple[nn.Module, dict, float]] = {}  # many scales give the same channel counts

    def cut(s: float):
        widths = {k: round(min(1.0, s * g), 4) for k, g in profile.items()}
        plan = tuple(kept_channels(width_of(widths, name, gene), m.out_channels, round_to) for name, m in convs.items())
        if plan not in cache:
            model = prune(copy.deepcopy(dense), widths, round_to)
            cache[plan] = model, widths, cost_fn(model)
        return cache[plan]

    target, tiny = (1 - tolerance / 2) * budget, 1e-9 * budget
    lo, hi, best = 0.0, 1.0 / min(profile.values()), None
    s, previous, power = 1.0 / max(profile.values()), None, 2.0  # cost grows about quadratically with width
    for _ in range(steps):
        model, widths, cost = cut(s)
        if cost <= budget:
            lo, best = s, (model, widths, cost)
            if cost >= (1 - tolerance) * budget or s >= hi:
                break
        else:
            hi = s
        if previous and previous[0] != s and previous[1] != cost:
            ratio = max(cost - floor, tiny) / max(previous[1] - floor, tiny)
            power = max(0.5, math.log(ratio) / math.log(s / previous[0]))
        previous = s, cost
        guess = s * (max(target - floor, tiny) / max(cost - floor, tiny)) ** (1 / power)
        s = guess if lo < guess < hi else (lo + hi) / 2
    return best or cut(0.0)


def _fitness(record: dict) -> tuple[float, float]:
    return record["top1"], -record["loss"]


def narrowest_cost(dense: nn.Module, cost_fn: Callable[[nn.Module], float], round_to: int = 8) -> float:
    """Cost of the narrowest network the search can reach (``round_to`` channels per group)."""
    return cost_fn(prune(copy.deepcopy(dense), dict.fromkeys(stages(dense), 0.0), round_to))


def search(dense: nn.Module, budget: float, score: Callable[[nn.Module], dict],
           cost_fn: Callable[[nn.Module], float], cfg: SearchConfig = SearchConfig(), seed: int = 0
           ) -> tuple[nn.Module, dict, list[dict]]:
    """Evolutionary search over per-stage width profiles (MetaPruning Sec. 3.3: top-k parents, mutation and
    crossover, each half of a generation) under ``cost_fn(model) <= budget``; ``score(model)`` returns
    ``{"top1", "loss"}`` (higher top-1, then lower loss, is better; it may recalibrate the model in place).
    Returns (best model, its record, the history of every evaluated candidate); seeded by ``seed``."""
    floor = narrowest_cost(dense, cost_fn, cfg.round_to)
    if floor > budget:
        dense_cost = cost_fn(dense)
        raise ConfigError(f"metapruning: budget {budget:.4g} ({budget / dense_cost:.2%} of the dense network's "
                          f"{dense_cost:.4g}) is below {floor:.4g}, the cost of the narrowest network "
                          f"({cfg.round_to} channels per group)")
    rng, names, choices = random.Random(seed), stages(dense), cfg.choices()
    history: list[dict] = []
    seen: set[tuple] = set()
    best: tuple[nn.Module, dict] | None = None

    def key(genes: tuple) -> tuple:  # profiles equal up to scale give the same candidate
        return tuple(round(g / max(genes), 4) for g in genes)

    def child(generation: int, i: int) -> tuple:
        if generation == 0:
            return (1.0,) * len(names) if i == 0 else tuple(rng.choice(choices) for _ in names)
        top = sorted(history, key=_fitness, reverse=True)[:cfg.parents]
        if i < cfg.population // 2:
            return tuple(rng.choice(choices) if rng.random() < cfg.mutation_prob else g
                         for g in rng.choice(top)["genes"])
        a, b = rng.choices(top, k=2)
        return tuple(rng.choice(pair) for pair in zip(a["genes"], b["genes"]))

    for generation in range(cfg.generations):
        for i in range(cfg.population):
            genes = next((g for g in (child(generation, i) for _ in range(20)) if key(g) not in seen), None)
            if genes is None:
                continue
            seen.add(key(genes))
            model, widths, cost = fit_budget(dense, dict(zip(names, genes)), budget, cost_fn, cfg.round_to,
                                             cfg.tolerance, floor)
            record = {"generation": generation, "genes": list(genes), "widths": widths, "cost": cost,
                      **score(model)}
            history.append(record)
            log.info("metapruning gen %d: %s cost %.4g top-1 %.2f", generation, genes, cost, record["top1"])
            if best is None or _fitness(record) > _fitness(best[1]):
                best = model, record
    return best[0], best[1], history


def adapt(model: nn.Module, batches, lr: float) -> None:
    """A few SGD steps (momentum 0.9, cross-entropy) on ``batches``: MetaPruning scores each candidate with the
    weights its trained PruningNet generates; cut dense weights far from the dense width score near chance
    until they have adapted a little."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    dev = next(model.parameters()).device
    model.train()
    for images, targets in batches:
        loss = nn.functional.cross_entropy(model(images.to(dev)), targets.to(dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def scorer(splits, cfg, data: dict, seed: int) -> Callable[[nn.Module], dict]:
    """Score a candidate: a copy adapts for ``adapt_steps`` seeded training batches (the same for every
    candidate), BatchNorm is recalibrated on ``calibration_batches`` training batches, then top-1 on the first
    ``holdout_images`` of the selection split (carved from the training data, never trained on; never the test
    split that results report). The candidate itself keeps its cut dense weights. ``cfg``: the four scoring
    keys (``SearchConfig``)."""
    select = Subset(splits.select, range(min(cfg.holdout_images, len(splits.select))))
    holdout = DataLoader(select, batch_size=data["eval_batch_size"], num_workers=data["workers"])
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed)).tolist()
    calibration = DataLoader(Subset(splits.train, order[:cfg.calibration_batches * data["batch_size"]]),
                             batch_size=data["batch_size"], num_workers=data["workers"])
    adapt_images = [order[i % len(order)] for i in range(cfg.adapt_steps * data["batch_size"])]
    adaptation = DataLoader(Subset(splits.train, adapt_images), batch_size=data["batch_size"],
                            num_workers=data["workers"])

    def score(model: nn.Module) -> dict:
        torch.manual_seed(seed)  # random training transforms draw the same for every candidate
        if cfg.adapt_steps:
            model = copy.deepcopy(model)
            adapt(model, adaptation, cfg.adapt_lr)
        recalibrate_bn(model, calibration)
        return evaluate(model, holdout)

    return score


def metaprune(config: dict, dense_ckpt: str | Path, out: str | Path, budget: float, cost: str = "macs",
              at_least_narrowest: bool = False) -> dict:
    """Search the widths of the dense network under ``budget`` (a fraction of the dense ``cost``: ``macs`` at
    ``data.image_size``, ``params`` or ``mpc``, the two-party communication time of CrypTen's bytes and rounds
    at ``mpc.network``, see ``_mpc_comm``), then train the winner with
    the ``pruned`` recipe (distilled from the dense teacher when ``stages.distill.enabled``); writes ``out``
    and its ``.json`` with the search result. A budget below the narrowest network's cost is an error, or,
    with ``at_least_narrowest`` (a budget matched to another method's network), is raised to that cost and
    recorded (``budget_raised``, ``budget_requested``, also under ``row``, the summary's extra columns):
    channel pruning keeps every activation layer, so under MPC it may not get as cheap at all."""
    if not 0 < budget <= 1:
        raise ConfigError(f"metapruning budget {budget}: must be a fraction of the dense cost in (0, 1]")
    if cost not in COSTS:
        raise ConfigError(f"metapruning cost '{cost}': unknown (known: {', '.join(COSTS)})")
    cfg = SearchConfig.from_config(config)
    if cfg.adapt_lr is None:
        cfg = dataclasses.replace(cfg, adapt_lr=Recipe.from_config(config, "pruned").lr)
    teacher, spec = load_model(dense_ckpt)
    teacher.to(device())
    cost_fn = COSTS[cost](config)
    dense_cost = cost_fn(teacher)
    score = scorer(build_datasets(config["data"], config["seed"]), cfg, config["data"], config["seed"])
    budget_cost = budget * dense_cost
    floor = narrowest_cost(teacher, cost_fn, cfg.round_to) if at_least_narrowest else 0.0
    raised = budget_cost < floor
    if raised:
        log.warning("metapruning: budget %.4g is below the narrowest network's cost %.4g; searching at that cost",
                    budget_cost, floor)
        budget_cost = floor * (1 + cfg.tolerance)
    tic = time.perf_counter()
    student, best, history = search(teacher, budget_cost, score, cost_fn, cfg, config["seed"])
    seconds = time.perf_counter() - tic
    distill = config["stages"]["distill"]["enabled"]
    metrics = train_stage(config, "pruned", student, pruned_spec(spec, student), out,
                          build_loaders(config["data"], config["seed"]), teacher=teacher if distill else None,
                          reference=teacher, distill=distill, desc=f"metapruning {budget}")
    flags = {"budget_raised": raised, "budget_requested": budget,
             "budget_used": budget_cost / dense_cost}  # a raised budget reaches summary.csv through "row"
    metrics |= {**flags, "row": flags}
    metrics["search"] = {"cost": cost, "cost_definition": COST_NAMES[cost].format(network=config["mpc"]["network"]),
                         "budget": budget, "budget_cost": budget_cost, "raised_to_narrowest": raised,
                         "dense_cost": dense_cost, "winner_cost": best["cost"],
                         "uniform_select_top1": history[0]["top1"],  # the first candidate: the uniform profile
                         "genes": dict(zip(stages(teacher), best["genes"])), "widths": best["widths"],
                         "select_top1": best["top1"], "candidates": len(history), "seconds": seconds,
                         "search_config": dataclasses.asdict(cfg),
                         "history": history}
    if is_main():
        write_json(Path(out).with_suffix(".json"), metrics)
    return metrics


def matched_budget(config: dict, cost: str, dense_ckpt: str | Path, target_ckpt: str | Path) -> float:
    """The budget (fraction of the dense cost) that matches another cell's deployed network, e.g. the merged
    DepthShrinker network at the same keep ratio, so that the baseline is compared at equal cost."""
    cost_fn = COSTS[cost](config)
    return min(1.0, cost_fn(load_model(target_ckpt)[0]) / cost_fn(load_model(dense_ckpt)[0]))
