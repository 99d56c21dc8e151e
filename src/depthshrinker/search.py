"""Stage 1 of DepthShrinker (Fu et al. 2022, Sec. 3.2): train one score per activation unit jointly with the
weights under the hard top-k straight-through gate, then extract the keep-list from the final scores."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import build, load, load_model, write_json
from .data import build_loaders
from .gates import install_topk_gates, keep_from_scores, num_kept
from .models import activation_units
from .train import train_stage


def search(config: dict, dense_ckpt: str | Path, out: str | Path, granularity: str, keep_ratio: float) -> dict:
    """Search which units keep their activation at ``keep_ratio``, starting from the dense weights; writes the
    gated checkpoint ``out`` (scores under ``ds_gates.scores``) and its metrics ``.json``."""
    loaders = build_loaders(config["data"], config["seed"])
    model, spec = load_model(dense_ckpt)
    install_topk_gates(model, activation_units(model, granularity), keep_ratio)
    spec = {**spec, "gates": {"granularity": granularity, "keep_ratio": keep_ratio}}
    return train_stage(config, "search", model, spec, out, loaders, desc=f"search {granularity} {keep_ratio}")


def extract(search_ckpt: str | Path, out: str | Path) -> dict:
    """The keep-list of a finished search: the ``round(keep_ratio * L)`` smallest scores keep (1) their
    activation, ties broken by unit index. Writes a small JSON with the unit names and scores."""
    ckpt = load(search_ckpt)
    gates = ckpt["spec"]["gates"]
    scores = ckpt["state_dict"]["ds_gates.scores"]
    keep = keep_from_scores(scores, gates["keep_ratio"]).int().tolist()
    units = activation_units(build({**ckpt["spec"], "gates": None}), gates["granularity"])
    mask = {"method": "depthshrinker", "granularity": gates["granularity"], "keep_ratio": gates["keep_ratio"],
            "num_units": len(units), "num_kept": num_kept(gates["keep_ratio"], len(units)), "keep": keep,
            "units": [{"name": u.name, "keep": k, "score": round(float(s), 6)}
                      for u, k, s in zip(units, keep, scores.tolist())]}
    write_json(out, mask)
    return mask
