"""Stage 2 of DepthShrinker (Fu et al. 2022, Sec. 3.3): the removed units become identities (pad-first where
the block will be merged), the student starts from the dense weights and is distilled from the dense teacher
(``alpha * T² * KL + (1 - alpha) * CE``)."""
from __future__ import annotations

import copy
from pathlib import Path

from .checkpoint import load_model, read_json
from .config import ConfigError
from .data import build_loaders
from .gates import apply_keep
from .models import activation_units
from .train import train_stage


def finetune(config: dict, dense_ckpt: str | Path, mask_path: str | Path, out: str | Path) -> dict:
    """Finetune the dense network with the mask of ``mask_path`` applied; writes ``out`` and its ``.json``."""
    mask = read_json(mask_path)
    loaders = build_loaders(config["data"], config["seed"])
    teacher, spec = load_model(dense_ckpt)
    student = copy.deepcopy(teacher)
    units = activation_units(student, mask["granularity"])
    if len(mask["keep"]) != len(units):
        raise ConfigError(f"{mask_path}: {len(mask['keep'])} entries for a model with {len(units)} units")
    free_act = config["model"]["free_act"]
    apply_keep(student, units, mask["keep"], free_act)
    spec = {**spec, "mask": {"granularity": mask["granularity"], "keep": mask["keep"], "free_act": free_act}}
    distill = config["stages"]["distill"]["enabled"]
    return train_stage(config, "finetune", student, spec, out, loaders, teacher=teacher if distill else None,
                       distill=distill, desc=f"finetune {mask['granularity']} {mask['keep_ratio']}")
