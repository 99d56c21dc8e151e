"""Stage 1: find the activations to keep, then extract the mask.

* DepthShrinker (Fu et al. 2022, Sec. 3.2): one score per unit trained jointly with the weights under the hard
  top-k straight-through gate. Latency-aware: the loss gets ``− λ Σ_i Δ_i ŝ_i`` where ``Δ_i`` is unit i's
  saving from a cost table (normalised by the dense total). A larger score means "remove", so this term
  prefers removing the units that save the most; the upstream ``+ λ Σ Δ_i s_i`` pushed them to be kept.
* SNL channel/pixel (the private-inference fork's baseline): per-layer top-k gates, same keep ratio everywhere.
* SNL element (Cho et al., ICML 2022): continuous per-element masks with ``λ‖α‖₁``; λ grows ×``growth`` after
  every epoch that did not reach a new low count of active elements (α > 0.01); the search stops once the
  count is within the global budget, and extraction keeps exactly the budget's largest α.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .checkpoint import build, load, load_model, write_json
from .config import ConfigError
from .counting import nonlinear
from .data import build_loaders
from .bits import encode_bits
from .gates import SoftMaskAct, install_search_gates, keep_from_scores, num_kept
from .models import activation_units
from .train import train_stage

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
        gates |= {"budget": round(keep_ratio * nonlinear(model, size)["nonlinear_units"]),
                  "lambda": st["snl_lambda"], "growth": st["snl_growth"]}
    install_search_gates(model, gates)
    regularizer = on_epoch_end = None
    if method == "depthshrinker" and cost_table is not None and st["latency_weight"] > 0:
        regularizer = latency_regularizer(read_cost_table(cost_table, model.ds_gates.scores.numel()),
                                          st["latency_weight"])
    elif granularity == "element":
        masks = [m for m in model.modules() if isinstance(m, SoftMaskAct)]

        def regularizer(m):
            return m.snl.penalty(masks)

        def on_epoch_end(_epoch, m, record):
            count = nonlinear(m, size)["nonlinear_units"]
            record |= {"active_elements": count, "snl_lambda": float(m.snl.lam)}
            return m.snl.end_epoch(count)
    spec = {**spec, "gates": gates}
    return train_stage(config, "search", model, spec, out, loaders, regularizer=regularizer,
                       on_epoch_end=on_epoch_end, desc=f"search {method} {granularity} {keep_ratio}")


def extract(search_ckpt: str | Path, out: str | Path) -> dict:
    """The mask of a finished search, as a small JSON.

    DepthShrinker: the ``round(keep_ratio · L)`` smallest scores keep (1) their activation, ties broken by unit
    index; the JSON lists the units with names and scores. SNL: a per-layer binary mask (packed bits, base64),
    from the per-layer top-k (channel/pixel) or the global budget's largest α (element)."""
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
    write_json(out, mask)
    return mask


def _snl_layers(ckpt: dict, gates: dict) -> list[dict]:
    """Binary keep-masks of every SNL layer of a search checkpoint."""
    model = build(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    paths = [p for unit in activation_units(build({**ckpt["spec"], "gates": None}), "layer") for p in unit.acts]
    gate = {p: model.get_submodule(p) for p in paths}
    if gates["granularity"] == "element":
        alphas = [gate[p].alpha.detach().flatten() for p in paths]
        top = torch.topk(torch.cat(alphas), int(gates["budget"]), sorted=False).indices
        flat = torch.zeros(sum(a.numel() for a in alphas))
        flat[top] = 1
        masks = [m.view(gate[p].alpha.shape) for m, p in zip(flat.split([a.numel() for a in alphas]), paths)]
    else:
        masks = [keep_from_scores(gate[p].scores.flatten(), gates["keep_ratio"]).float().view(
            gate[p].scores.shape) for p in paths]
    elements = {p: n for p, _, n in nonlinear(build({**ckpt["spec"], "gates": None}), gates["input_size"])["layers"]}
    return [{"name": p, "shape": list(m.shape), "kept": int(m.sum()) * (elements[p] // m.numel()),
             "bits": encode_bits(m)} for p, m in zip(paths, masks)]
