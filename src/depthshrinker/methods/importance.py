"""Stage: one entry of an importance table of Kim et al.'s DPs, measured as the authors measure it: the dense
network with only that entry's change (``depthdp``: an extended segment ``s-e-a-b`` made linear; ``layermerge``:
a segment option ``s-e-k<kernel>[d]``, linear and with convs dropped), a single conv re-initialised (so that it
measures what the conv is worth), finetuned ``depthdp.epochs`` epochs from the dense weights with a cosine
schedule (distilled as the finetune stage), then scored on the selection split against the dense network before
any finetune. Never the test split. One Snakemake job per entry.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_loaders
from depthshrinker.base.jsonio import write_json
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.segment_form import segment_form
from depthshrinker.deploy.segments import Body, body
from depthshrinker.methods import depthdp, layermerge
from depthshrinker.nets.plain import layout

RETEST_SEED = 1000  # adaptation seed offset of the retest table


@torch.no_grad()
def reinit(model: nn.Module, b: Body, p: int, seed: int) -> None:
    """Re-initialise conv ``p`` of the body and its BatchNorm (the reference's single-conv entries)."""
    c = b.convs[p - 1]
    conv = layout(model).blocks[c.block].convs[c.index]
    torch.manual_seed(seed)
    for module in (conv.conv, conv.bn):
        if module is not None:
            module.reset_parameters()


def entry_change(dense: nn.Module, b: Body, entry: str, add_relu: bool) -> tuple[list, list, set, set[int]]:
    """(the entry as stored, segments, kept activations, dropped convs) of a depthdp or layermerge ``entry``."""
    key = layermerge.parse_entry(entry)
    if key is not None:
        return [*key], *layermerge.entry_form(b, key, layermerge.l1_norms(dense, b))
    key = depthdp.parse_entry(entry)
    if key not in set(depthdp.entries(b, add_relu)):
        raise ConfigError(f"depthdp entry '{entry}' is not an extended segment of this network "
                          f"({len(depthdp.entries(b, add_relu))} are; depthdp.add_relu: {add_relu})")
    return [*key], *depthdp.entry_form(b, key), set()


def importance(config: dict, dense_ckpt: str | Path, entry: str, out: str | Path, rep: int = 0) -> dict:
    """Stage: the importance of ``entry`` (module docstring), measured with adaptation seed ``seed + rep·1000``;
    writes ``out`` (JSON: the entry, its dropped convs, the selection split's top-1 and loss after the finetune and
    the dense network's, and their differences ``delta_top1``, ``delta_loss``)."""
    from depthshrinker.train import Recipe, evaluate, fit

    cfg = config["depthdp"]
    dense, _ = load_model(dense_ckpt)
    b = body(dense)
    key, segments, acts, dropped = entry_change(dense, b, entry, cfg["add_relu"])
    seed = config["seed"] + RETEST_SEED * rep
    loaders = build_loaders(config["data"], seed)
    base = evaluate(dense, loaders.select)
    student = copy.deepcopy(dense)
    if key[1] - key[0] == 1:
        reinit(student, b, key[1], seed)
    chain = segment_form(student, segments, acts, cfg["added_act"], dropped)
    distill = config["stages"]["distill"]["enabled"]
    recipe = Recipe.from_config(config, "finetune", distill=distill)
    recipe = replace(recipe, epochs=cfg["epochs"], patience=None,
                     lr=recipe.lr if cfg["lr"] is None else recipe.lr * cfg["lr"] / config["stages"]["finetune"]["lr"])
    out = Path(out)
    history = fit(chain, loaders.train, loaders.select, recipe, out.with_name(out.name + ".last"),
                  teacher=dense if distill else None, identity={"entry": entry, "rep": rep}, seed=seed,
                  desc=f"importance {entry}")
    last = history[-1]
    report = {"entry": key, "dropped": sorted(dropped), "rep": rep, "seed": seed, "top1": last["select_top1"],
              "loss": last["select_loss"], "base_top1": base["top1"], "base_loss": base["loss"],
              "delta_top1": last["select_top1"] - base["top1"], "delta_loss": last["select_loss"] - base["loss"],
              "select_images": len(loaders.select.dataset), "recipe": {"epochs": recipe.epochs, "lr": recipe.lr}}
    write_json(out, report)
    out.with_name(out.name + ".last").unlink(missing_ok=True)
    return report
