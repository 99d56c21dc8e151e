"""Stage 2 (Fu et al. 2022, Sec. 3.3; SNL's finetuning likewise): the student starts from the dense weights with
the searched mask applied and is distilled from the dense teacher (``alpha · T² · KL + (1 − alpha) · CE``).
DepthShrinker's removed units become identities, in pad-first form where the block will be merged; SNL's
masks become fixed binary masks."""
from __future__ import annotations

import copy
from pathlib import Path

from .checkpoint import load_model, read_json
from .config import ConfigError
from .data import build_loaders
from .bits import decode_bits
from .gates import apply_mask_spec
from .models import activation_units
from .train import train_stage


def mask_spec(mask: dict, free_act: str) -> dict:
    """The checkpoint-spec form of an extracted mask JSON (``search.extract``)."""
    if mask["method"] == "depthshrinker":
        return {"method": "depthshrinker", "granularity": mask["granularity"], "keep": mask["keep"],
                "free_act": free_act}
    return {"method": "snl", "granularity": mask["granularity"],
            "shapes": {layer["name"]: layer["shape"] for layer in mask["layers"]}}


def finetune(config: dict, dense_ckpt: str | Path, mask_path: str | Path, out: str | Path) -> dict:
    """Finetune the dense network with the mask of ``mask_path`` applied; writes ``out`` and its ``.json``."""
    mask = read_json(mask_path)
    loaders = build_loaders(config["data"], config["seed"])
    teacher, spec = load_model(dense_ckpt)
    student = copy.deepcopy(teacher)
    if mask["method"] == "depthshrinker" and len(mask["keep"]) != len(activation_units(student, mask["granularity"])):
        raise ConfigError(f"{mask_path}: {len(mask['keep'])} entries do not fit the model's units")
    spec = {**spec, "mask": mask_spec(mask, config["model"]["free_act"])}
    apply_mask_spec(student, spec["mask"])
    if mask["method"] == "snl":
        for layer in mask["layers"]:
            student.get_submodule(layer["name"]).mask.copy_(decode_bits(layer["bits"], layer["shape"]))
    distill = config["stages"]["distill"]["enabled"]
    return train_stage(config, "finetune", student, spec, out, loaders, teacher=teacher if distill else None,
                       distill=distill, desc=f"finetune {mask['method']} {mask['granularity']} {mask['keep_ratio']}")
