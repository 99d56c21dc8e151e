"""Stage 1: find the activations to keep, then extract the mask.

* DepthShrinker (Fu et al. 2022, Sec. 3.2): one score per unit trained jointly with the weights under the hard
  top-k straight-through gate. Latency-aware: the loss gets ``− λ Σ_i Δ_i ŝ_i`` where ``Δ_i`` is unit i's
  saving from a cost table (normalised by the dense total). A larger score means "remove", so this term
  prefers removing the units that save the most; the upstream ``+ λ Σ Δ_i s_i`` pushed them to be kept.
* SNL channel/pixel (the private-inference fork's baseline): per-layer top-k gates, same keep ratio everywhere.
* SNL element (Cho et al., ICML 2022, Algorithm 1): a continuous mask α per element (init 1), trained with the
  weights under ``CE/KD(dense teacher) + λ Σ‖α‖₁``, the masks in their own Adam optimiser (``snl_mask_lr``,
  outside the weights' gradient clip); λ starts at ``snl_lambda`` and grows ×``snl_growth`` after every epoch
  past ``snl_warmup`` that did not reach a new low count of active elements (α > 0.01). The search stops as
  soon as the count is within the global budget, or after ``snl_epochs``; extraction binarizes at α > 0.01,
  and the metrics say whether the budget was met. Two deliberate differences from SNL's code, which checks the
  budget once per epoch: the count is checked after every step, and the step that crosses the budget has its
  mask update shortened (``land_on_budget``) so that the count lands within 1 % below the budget. Under Adam a
  dominant L1 term moves many masks at the same speed, so that one full step can remove 10 % of the elements;
  masks that cross 0.01 at exactly the same point (ties) are kept in layer order up to the budget.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from depthshrinker.base.bits import encode_bits
from depthshrinker.base.checkpoint import load
from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_loaders
from depthshrinker.base.jsonio import write_json
from depthshrinker.deploy.load import build, load_model
from depthshrinker.nets.counting import nonlinear
from depthshrinker.nets.gates import (
    LayerTopKGate,
    SNLBudget,
    SoftMaskAct,
    install_search_gates,
    keep_from_scores,
    num_kept,
)
from depthshrinker.nets.units import activation_units
from depthshrinker.train import train_stage

METHODS = {"depthshrinker": ("block", "layer"), "snl": ("channel", "pixel", "element")}


def read_cost_table(path: str | Path, num_units: int) -> torch.Tensor:
    """Per-unit savings ``(before − after) / Σ before`` from a cost table CSV (columns unit, before, after)."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    if len(rows) != num_units:
        raise ConfigError(f"{path}: {len(rows)} units in the cost table, the model has {num_units}")
    before = torch.tensor([float(r["before"]) for r in rows])
    after = torch.tensor([float(r["after"]) for r in rows])
    return (before - after) / before.sum()


def latency_regularizer(savings: torch.Tensor, weight: float):
    """``model -> − λ Σ_i Δ_i ŝ_i`` over the model's DepthShrinker scores (ŝ's gradient passes straight
    through, see ``gates.straight_through``): every step pushes unit i towards removal by λ·Δ_i."""
    def regularizer(model):
        scores = model.ds_gates.scores
        return -weight * (savings.to(scores.device) * scores).sum()

    return regularizer


def search(config: dict, dense_ckpt: str | Path, out: str | Path, method: str, granularity: str,
           keep_ratio: float, cost_table: str | Path | None = None) -> dict:
    """Search which activations keep at ``keep_ratio`` from the dense weights; writes the gated checkpoint
    ``out`` and its metrics ``.json``."""
    if granularity not in METHODS.get(method, ()):
        raise ConfigError(f"granularity: '{granularity}' is not one of {method}'s {METHODS.get(method)}")
    st = config["stages"]["search"]
    size = config["data"]["image_size"]
    loaders = build_loaders(config["data"], config["seed"])
    model, spec = load_model(dense_ckpt)
    gates = {"method": method, "granularity": granularity, "keep_ratio": keep_ratio, "input_size": size}
    if granularity == "element":
        gates |= snl_gates(st, model, keep_ratio, size)
    install_search_gates(model, gates)
    spec = {**spec, "gates": gates}
    desc = f"search {method} {granularity} {keep_ratio}"
    if granularity == "element":
        return _snl_element(config, model, spec, out, loaders, dense_ckpt, desc)
    regularizer = None
    if method == "depthshrinker" and cost_table is not None and st["latency_weight"] > 0:
        regularizer = latency_regularizer(read_cost_table(cost_table, model.ds_gates.scores.numel()),
                                          st["latency_weight"])
    settling = Settling(model, stop=st["settle"])
    return train_stage(config, "search", model, spec, out, loaders, regularizer=regularizer, desc=desc,
                       on_epoch_end=settling.epoch_end, extra_metrics=settling.summary)


def hard_decisions(model) -> torch.Tensor:
    """Every keep (True) / remove decision of a top-k search, flattened: the DepthShrinker units, or the
    channels/pixels of every SNL layer."""
    parts = [model.ds_gates.keep()] if hasattr(model, "ds_gates") else []
    parts += [keep_from_scores(m.scores.flatten(), m.keep_ratio) for m in model.modules()
              if isinstance(m, LayerTopKGate)]
    return torch.cat(parts)


class Settling:
    """Has the searched mask settled? Counts, per epoch, the decisions (units; SNL: channels or pixels) whose
    keep/remove state at the end of the epoch differs from the start (``mask_changes``). With ``stop``, the
    search ends after the first epoch without a change: only the mask of a search is used (finetuning starts
    from the dense weights), so more epochs could not change the result."""

    def __init__(self, model, stop: bool):
        self.stop, self.start = stop, hard_decisions(model)

    def epoch_end(self, epoch, model, record) -> bool:
        now = hard_decisions(model)
        record["mask_changes"] = int((now != self.start.to(now.device)).sum())
        self.start = now
        return self.stop and record["mask_changes"] == 0

    @staticmethod
    def summary(history: list[dict]) -> dict:
        changes = history[-1]["mask_changes"]
        return {"mask_changes_last_epoch": changes, "mask_settled": changes == 0}


def snl_gates(st: dict, model, keep_ratio: float, size: int) -> dict:
    """The checkpoint-spec ``gates`` entries of an SNL element search: its global budget (``keep_ratio`` of the
    dense model's nonlinear elements) and λ schedule."""
    total = nonlinear(model, size)["nonlinear_units"]
    return {"budget": round(keep_ratio * total), "total": total, "lambda": st["snl_lambda"],
            "growth": st["snl_growth"], "warmup": st["snl_warmup"]}


@torch.no_grad()
def land_on_budget(masks: list[SoftMaskAct], before: list[torch.Tensor], budget: int, tolerance: float = 0.01,
                   steps: int = 40) -> int:
    """Shorten the masks' last update (``before`` → current α) by bisection on its length so that the count of
    α > threshold lands in ``[(1 - tolerance) · budget, budget]``; returns the count.

    Elements whose α cross the threshold at the same point of the step (ties: typically elements whose input was
    positive on every training image, so that only the L1 term moved them, all alike) cannot be split by the
    bisection: the first of them in layer order keep their α from just before the crossing, up to the budget."""
    after = [m.alpha.detach().clone() for m in masks]

    def at(t: float) -> list[torch.Tensor]:
        return [b + t * (a - b) for a, b in zip(after, before)]

    def count_at(t: float) -> int:
        for m, alpha in zip(masks, at(t)):
            m.alpha.copy_(alpha)
        return SNLBudget.count(masks)

    lo, hi = 0.0, 1.0  # count(lo) > budget >= count(hi)
    count = count_at(hi)
    for _ in range(steps):
        if count >= (1 - tolerance) * budget:
            return count
        mid = (lo + hi) / 2
        if count_at(mid) > budget:
            lo = mid
        else:
            hi = mid
        count = count_at(hi)
    need = budget - count
    for m, high in zip(masks, at(lo)):  # count_at(hi) set the masks; re-admit tied elements in layer order
        alpha, high = m.alpha.detach().reshape(-1).clone(), high.reshape(-1)
        tied = ((high > m.threshold) & (alpha <= m.threshold)).nonzero().flatten()[:need]
        alpha[tied] = high[tied]
        m.alpha.copy_(alpha.view(m.alpha.shape))
        need -= tied.numel()
    return SNLBudget.count(masks)


def _snl_element(config: dict, model, spec: dict, out, loaders, dense_ckpt, desc: str) -> dict:
    """SNL's mask search (see the module docstring), distilled from the dense network when distillation is on."""
    st = config["stages"]["search"]
    masks = [m for m in model.modules() if isinstance(m, SoftMaskAct)]
    before = [m.alpha.detach().clone() for m in masks]  # the masks before the last step

    def stop_step(m) -> bool:
        if before[0].device != masks[0].alpha.device:  # the engine moved the model to its device
            before[:] = [b.to(masks[0].alpha.device) for b in before]
        if m.snl.reached(SNLBudget.count(masks)):
            land_on_budget(masks, before, int(m.snl.budget))
            return True
        for b, mask in zip(before, masks):
            b.copy_(mask.alpha.detach())
        return False

    def on_epoch_end(epoch, m, record):
        count = SNLBudget.count(masks)
        record |= {"active_elements": count, "snl_lambda": float(m.snl.lam)}
        return m.snl.end_epoch(epoch, count)

    def summary(history):
        count, budget = history[-1]["active_elements"], spec["gates"]["budget"]
        return {"budget": budget, "active_elements": count, "budget_reached": count <= budget,
                "total_elements": spec["gates"]["total"]}

    distill = config["stages"]["distill"]["enabled"]
    return train_stage(config, "search", model, spec, out, loaders, regularizer=lambda m: m.snl.penalty(masks),
                       on_epoch_end=on_epoch_end, stop_step=stop_step,
                       teacher=load_model(dense_ckpt)[0] if distill else None, distill=distill, desc=desc,
                       recipe_overrides={"mask_lr": st["snl_mask_lr"], "epochs": st["snl_epochs"] or st["epochs"]},
                       extra_metrics=summary)


def extract(search_ckpt: str | Path, out: str | Path) -> dict:
    """The mask of a finished search, as a small JSON.

    DepthShrinker: the ``round(keep_ratio · L)`` smallest scores keep (1) their activation, ties broken by unit
    index; the JSON lists the units with names and scores. SNL: a per-layer binary mask (packed bits, base64),
    from the per-layer top-k (channel/pixel) or SNL's binarization α > 0.01 (element; the JSON also gives the
    budget, whether the kept count meets it, and ``init``: the search checkpoint, relative to the JSON's
    folder, whose weights the finetuning starts from). ``row``: how the search ended (epochs, mask changes in
    its last epoch), carried by the finetune into the summary row."""
    ckpt = load(search_ckpt)
    gates, state = ckpt["spec"]["gates"], ckpt["state_dict"]
    if gates["method"] == "depthshrinker":
        scores = state["ds_gates.scores"]
        keep = keep_from_scores(scores, gates["keep_ratio"]).int().tolist()
        units = activation_units(build({**ckpt["spec"], "gates": None}), gates["granularity"])
        mask = {"method": "depthshrinker", "granularity": gates["granularity"], "keep_ratio": gates["keep_ratio"],
                "num_units": len(units), "num_kept": num_kept(gates["keep_ratio"], len(units)), "keep": keep,
                "units": [{"name": u.name, "keep": k, "score": round(float(s), 6)}
                          for u, k, s in zip(units, keep, scores.tolist())]}
    else:
        mask = {"method": "snl", "granularity": gates["granularity"], "keep_ratio": gates["keep_ratio"],
                "layers": _snl_layers(ckpt, gates)}
        mask["nonlinear_units"] = sum(layer["kept"] for layer in mask["layers"])
        if gates["granularity"] == "element":
            mask |= {"budget": gates["budget"], "budget_reached": mask["nonlinear_units"] <= gates["budget"],
                     "kept_over_budget": round(mask["nonlinear_units"] / gates["budget"], 6),
                     "init": os.path.relpath(Path(search_ckpt).resolve(), Path(out).resolve().parent)}
    searched = json.loads(ckpt.get("metrics") or "{}")  # how the search ended, for the summary row
    mask["row"] = {f"search_{k}": searched[k] for k in ("epochs", "mask_changes_last_epoch") if k in searched}
    write_json(out, mask)
    return mask


def _snl_layers(ckpt: dict, gates: dict) -> list[dict]:
    """Binary keep-masks of every SNL layer of a search checkpoint."""
    model = build(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    paths = [p for unit in activation_units(build({**ckpt["spec"], "gates": None}), "layer") for p in unit.acts]
    gate = {p: model.get_submodule(p) for p in paths}
    if gates["granularity"] == "element":
        masks = [(gate[p].alpha.detach() > SoftMaskAct.threshold).float() for p in paths]
    else:
        masks = [keep_from_scores(gate[p].scores.flatten(), gates["keep_ratio"]).float().view(
            gate[p].scores.shape) for p in paths]
    elements = {p: n for p, _, n in nonlinear(build({**ckpt["spec"], "gates": None}), gates["input_size"])["layers"]}
    return [{"name": p, "shape": list(m.shape), "kept": int(m.sum()) * (elements[p] // m.numel()),
             "bits": encode_bits(m)} for p, m in zip(paths, masks)]
