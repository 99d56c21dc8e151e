"""Stage 2 (Fu et al. 2022, Sec. 3.3; SNL's finetuning likewise): the student, with the searched mask applied,
is distilled from the dense teacher (``alpha · T² · KL + (1 − alpha) · CE``). DepthShrinker and SNL
channel/pixel students start from the dense weights; an SNL element student starts from the weights its mask
search trained (Cho et al. 2022, Algorithm 1, line 12 finetunes the searched network). DepthShrinker's removed
units become identities, in pad-first form where the block will be merged; SNL's masks become fixed binary
masks; a depthdp mask (Kim et al.'s segments, LayerMerge's with dropped convs) puts the network in its
``segment_form``."""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from depthshrinker.base.bits import decode_bits
from depthshrinker.base.checkpoint import load
from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_loaders
from depthshrinker.base.jsonio import read_json
from depthshrinker.deploy.load import apply_mask, load_model
from depthshrinker.deploy.plan import merge_policy
from depthshrinker.nets.units import activation_units
from depthshrinker.train import train_stage

MASK_KEYS = {"depthshrinker": ("granularity", "keep_ratio", "keep"), "snl": ("granularity", "keep_ratio", "layers"),
             "depthdp": ("granularity", "keep_ratio", "segments", "acts")}


def read_mask(path: str | Path) -> dict:
    """An extracted mask JSON (``search.extract``), checked: ConfigError naming the file and the missing key."""
    mask = read_json(path)
    method = mask.get("method") if isinstance(mask, dict) else None
    if method not in MASK_KEYS:
        raise ConfigError(f"{path}: not a mask file ('method' must be one of {', '.join(MASK_KEYS)}, got {method!r})")
    for key in MASK_KEYS[method]:
        if key not in mask:
            raise ConfigError(f"{path}: {method} mask without '{key}'")
    layer_keys = ("name", "shape", "bits") if method == "snl" else ()
    for i, layer in enumerate(mask.get("layers", []) if method == "snl" else []):
        missing = [k for k in layer_keys if k not in layer]
        if missing:
            raise ConfigError(f"{path}: layers[{i}] without '{missing[0]}'")
    return mask


def mask_spec(mask: dict, free_act: str) -> dict:
    """The checkpoint-spec form of an extracted mask JSON (``search.extract``)."""
    if mask["method"] == "depthshrinker":
        return {"method": "depthshrinker", "granularity": mask["granularity"], "keep": mask["keep"],
                "free_act": free_act}
    if mask["method"] == "depthdp":
        return {"method": "segments", "segments": mask["segments"], "acts": mask["acts"],
                "added": mask.get("added", "relu6"), "dropped": mask.get("dropped", [])}
    return {"method": "snl", "granularity": mask["granularity"],
            "shapes": {layer["name"]: layer["shape"] for layer in mask["layers"]}}


def load_searched_weights(student: nn.Module, search_ckpt: str | Path) -> None:
    """The weights of an SNL mask search into ``student`` (everything but the soft masks and the λ state)."""
    state = {k: v for k, v in load(search_ckpt)["state_dict"].items()
             if not (k.endswith(".alpha") or k.startswith("snl."))}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(".mask") for k in missing):
        raise ConfigError(f"{search_ckpt}: its weights do not fit the student (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def finetune(config: dict, dense_ckpt: str | Path, mask_path: str | Path, out: str | Path) -> dict:
    """Finetune the network with the mask of ``mask_path`` applied, from the dense weights (or, for an SNL
    element mask, from its search checkpoint's); writes ``out`` and its ``.json``."""
    mask = read_mask(mask_path)
    loaders = build_loaders(config["data"], config["seed"])
    teacher, spec = load_model(dense_ckpt)
    student = copy.deepcopy(teacher)
    if mask["method"] == "depthshrinker" and len(mask["keep"]) != len(activation_units(student, mask["granularity"])):
        raise ConfigError(f"{mask_path}: {len(mask['keep'])} entries do not fit the model's units")
    spec = {**spec, "mask": mask_spec(mask, config["model"]["free_act"])}
    student = apply_mask(student, spec["mask"], merge_policy(config))  # records the merge plan in spec["mask"]
    if mask.get("init"):
        load_searched_weights(student, Path(mask_path).parent / mask["init"])
    if mask["method"] == "snl":
        for layer in mask["layers"]:
            student.get_submodule(layer["name"]).mask.copy_(decode_bits(layer["bits"], layer["shape"]))
    distill = config["stages"]["distill"]["enabled"]
    row = {**mask.get("row", {}),  # extra summary columns: SNL element's budget, depthdp's
           **{k: mask[k] for k in ("budget", "budget_reached") if k in mask}}
    return train_stage(config, "finetune", student, spec, out, loaders, teacher=teacher if distill else None,
                       reference=teacher, distill=distill, desc=f"finetune {mask['method']} {mask['granularity']} {mask['keep_ratio']}",
                       extra_metrics=(lambda history: {"row": row}) if row else None)
