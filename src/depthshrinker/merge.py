"""Exact convolution merging (DepthShrinker, Fu et al. 2022, Sec. 3.3): within each block of a PlainNet,
every run of consecutive convolutions with no activation between them becomes one dense convolution.

Composition of two biased convolutions A (kernel ``ka``, stride ``sa``) then B (``kb``, ``sb``, padding 0)::

    W[o, i] = Σ_m W_B[o, m] ⋆ W_A[m, i]    (W_B dilated by sa; kernel ka + (kb-1)·sa, stride sa·sb)
    b[o]    = b_B[o] + Σ_m b_A[m] · Σ_{u,v} W_B[o, m, u, v]

For pw-expand W1, depthwise K, pw-project W3 this is ``W[o,i,u,v] = Σ_m W3[o,m]·K[m,u,v]·W1[m,i]`` and
``b[o] = b3[o] + Σ_m W3[o,m]·(b2[m] + b1[m]·Σ_{u,v} K[m,u,v])``. It is exact at the image borders only when B
has no padding of its own: a 1x1 with bias before a padded kxk must be in pad-first form (the 1x1 carries the
padding, see ``models.set_pad_first``), otherwise the merge is refused. A block that becomes one stride-1
convolution with ``in == out`` absorbs its residual: ``W[o, o, p, p] += 1`` at the kernel centre.

Which runs merge is a policy: ``macs`` merges a (part of a) run only where it lowers the multiply-accumulates
per pixel (borders ignored), ``latency`` where a measured table (``segment_key`` -> seconds, keys listed by
``candidate_segments``) says it is faster. The choice is a shortest path over the run's split points.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .config import ConfigError
from .counting import profile
from .gates import apply_keep
from .models import activation_units, create_model
from .plain import PlainNet, to_plain

POLICIES = ("macs", "latency")

# Upstream MobileNetV2-1.4 keep-lists (19 block units, 1 = keep the activation); F keeps the stem and head only.
PATTERNS: dict[str, list[int]] = {
    "A": [0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1],
    "B": [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1],
    "C": [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1],
    "D": [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "E": [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "F": [1] + [0] * 17 + [1],
}


@dataclass
class Conv:
    """A biased convolution: its spec (as in ``plain``) and float64 weight and bias."""
    spec: dict
    weight: torch.Tensor
    bias: torch.Tensor


def composed_spec(a: dict, b: dict) -> dict:
    """Spec of conv ``a`` followed by conv ``b`` as one convolution; ``padding`` None when not exact."""
    groups = a["groups"] if a["groups"] in (1, b["groups"]) else 1
    return {"in": a["in"], "out": b["out"], "kernel": a["kernel"] + (b["kernel"] - 1) * a["stride"],
            "stride": a["stride"] * b["stride"], "padding": None if b["padding"] else a["padding"],
            "groups": groups, "act": b["act"], **({"mask": b["mask"]} if "mask" in b else {})}


def _ungroup(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped weight [M, I/g, k, k] as the equivalent dense one [M, I, k, k] (zeros off the groups)."""
    out, per_group = weight.shape[:2]
    index = (torch.arange(out) // (out // groups) * per_group)[:, None] + torch.arange(per_group)
    dense = weight.new_zeros(out, per_group * groups, *weight.shape[2:])
    return dense.scatter_(1, index[:, :, None, None].expand_as(weight), weight)


def compose(a: Conv, b: Conv, where: str = "") -> Conv:
    """``b ∘ a`` as one convolution (module docstring); ConfigError naming ``where`` when it is not exact."""
    spec = composed_spec(a.spec, b.spec)
    if spec["padding"] is None:
        raise ConfigError(f"merge: {where}: a conv with padding {b.spec['padding']} follows a linear conv, so merging "
                          "them is not exact at the borders (the first conv's bias is missing in the padding); put "
                          "the block in pad-first form (models.set_pad_first, done by gates.apply_keep) first")
    stride = a.spec["stride"]
    w_a = a.weight if spec["groups"] == a.spec["groups"] else _ungroup(a.weight, a.spec["groups"])
    weight = F.conv2d(w_a.transpose(0, 1), b.weight.flip(2, 3), padding=(b.spec["kernel"] - 1) * stride,
                      dilation=stride, groups=b.spec["groups"]).transpose(0, 1)
    bias = b.bias + F.conv2d(a.bias.view(1, -1, 1, 1), b.weight.sum((2, 3), keepdim=True),
                             groups=b.spec["groups"]).view(-1)
    return Conv(spec, weight.contiguous(), bias)


def fold_residual(conv: Conv) -> bool:
    """Add the identity at the kernel centre (``W[o, o, p, p] += 1``) when the conv keeps the shape."""
    s = conv.spec
    if s["stride"] != 1 or s["in"] != s["out"] or 2 * s["padding"] != s["kernel"] - 1 or s["act"] != "none":
        return False
    channels = torch.arange(s["out"])
    conv.weight[channels, channels % (s["in"] // s["groups"]), s["padding"], s["padding"]] += 1
    return True


def linear_runs(convs: list[dict]) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of a block's convs with no activation between them (length >= 2)."""
    runs, start = [], 0
    for j, c in enumerate(convs):
        if c["act"] != "none" or j == len(convs) - 1:
            if j > start:
                runs.append((start, j + 1))
            start = j + 1
    return runs


def segment_key(block: int, start: int, stop: int) -> str:
    """Key of the convs [start, stop) of a block in a latency table."""
    return f"{block}:{start}-{stop}"


def _stride(convs: list[dict]) -> int:
    return math.prod(c["stride"] for c in convs)


def candidate_segments(net: PlainNet) -> dict[str, dict]:
    """Every segment the policies may compare (single convs included), as ``segment_key`` -> merged spec with
    ``stride_in``, the stride from the block input to the segment input: what a latency table must time."""
    return {segment_key(i, s, e): {**functools.reduce(composed_spec, convs[s:e]), "stride_in": _stride(convs[:s])}
            for i, convs in enumerate(b["convs"] for b in net.spec["blocks"])
            for start, stop in linear_runs(convs) for s in range(start, stop) for e in range(s + 1, stop + 1)}


def _plan(block: int, convs: list[dict], policy: str, latency: dict | None) -> tuple[list[list[int]], list[dict]]:
    """Segments of a block (lists of conv indices) and the recorded decision of each run."""
    def cost(s: int, e: int) -> float:
        """Seconds from the table, or MACs per pixel of the block input (borders ignored)."""
        if policy == "latency":
            key = segment_key(block, s, e)
            if key not in latency:
                raise ConfigError(f"merge: latency table has no entry '{key}' (see merge.candidate_segments)")
            return float(latency[key])
        spec = functools.reduce(composed_spec, convs[s:e])
        return spec["out"] * spec["in"] // spec["groups"] * spec["kernel"] ** 2 / _stride(convs[:e]) ** 2

    segments, decisions, done = [], [], 0
    for start, stop in linear_runs(convs):
        best = {start: (0.0, [])}  # shortest path over the split points: cut -> (cost, segments up to it)
        for e in range(start + 1, stop + 1):  # ties go to the shortest last segment (fewer merges)
            options = [(best[s][0] + cost(s, e), best[s][1] + [list(range(s, e))]) for s in range(e - 1, start - 1, -1)]
            best[e] = min(options, key=lambda option: option[0])
        decisions.append({"run": [start, stop - 1], "policy": policy, "segments": best[stop][1],
                          "cost_unmerged": sum(cost(s, s + 1) for s in range(start, stop)),
                          "cost_chosen": best[stop][0]})
        segments += [[j] for j in range(done, start)] + best[stop][1]
        done = stop
    segments += [[j] for j in range(done, len(convs))]
    return segments, decisions


@torch.no_grad()
def merge_plain(net: PlainNet, policy: str = "macs", latency: dict | None = None) -> PlainNet:
    """The merged PlainNet (same function): runs merged per ``policy``, residuals folded where the block became
    one conv. Each block spec records ``merged_from`` (original conv indices per conv), ``residual_folded``
    and ``decisions`` (per run: the segments chosen, ``cost_unmerged`` and ``cost_chosen``)."""
    if policy not in POLICIES:
        raise ConfigError(f"merge: policy '{policy}' is not one of {', '.join(POLICIES)}")
    if (policy == "latency") != (latency is not None):
        raise ConfigError("merge: a latency table goes with policy 'latency', and only with it")
    spec = copy.deepcopy(net.spec)
    merged_convs: list[list[Conv]] = []
    for i, (block, bspec) in enumerate(zip(net.blocks, spec["blocks"])):
        convs = [Conv(c, m.weight.to(torch.float64, copy=True), m.bias.to(torch.float64, copy=True))
                 for c, m in zip(bspec["convs"], block.convs)]
        segments, decisions = _plan(i, bspec["convs"], policy, latency)
        merged = [functools.reduce(functools.partial(compose, where=f"block {i}"), [convs[j] for j in seg])
                  for seg in segments]
        folded = bool(bspec.get("residual")) and len(merged) == 1 and fold_residual(merged[0])
        bspec.update(convs=[m.spec for m in merged], residual=bool(bspec.get("residual")) and not folded,
                     merged_from=segments, residual_folded=folded, decisions=decisions)
        merged_convs.append(merged)
    spec["merge"] = {"policy": policy}
    out = PlainNet(spec).to(next(net.parameters()))
    for block, convs in zip(out.blocks, merged_convs):
        for target, conv in zip(block.convs, convs):
            target.weight.copy_(conv.weight)
            target.bias.copy_(conv.bias)
    out.classifier.load_state_dict(net.classifier.state_dict())
    return out.eval()


def conv_layers(net: PlainNet) -> int:
    return sum(len(block.convs) for block in net.blocks)


@torch.no_grad()
def _merge_and_check(model: nn.Module, input_size: int, samples: int, seed: int) -> tuple[PlainNet, dict]:
    """Merge a (timm or plain) model; report costs before/after and the max abs logit error on seeded noise."""
    model.eval()
    plain = model if isinstance(model, PlainNet) else to_plain(model)
    merged = merge_plain(plain)
    x = torch.randn(samples, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    ref = model(x)
    before, after = profile(plain, input_size), profile(merged, input_size)
    return merged, {
        "merge_max_abs_err": float((merged(x) - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
        **after, "layers_before": conv_layers(plain),
        "layers_after": conv_layers(merged), "params_unmerged": before["params"], "macs_unmerged": before["macs"],
        "merged_blocks": [i for i, b in enumerate(merged.spec["blocks"]) if any(len(s) > 1 for s in b["merged_from"])],
    }


def merge_checkpoint(ckpt_path: str | Path, out_path: str | Path, input_size: int, samples: int = 8,
                     seed: int = 0) -> dict:
    """Stage: load a finetuned checkpoint, fold BN, merge, check against the unmerged model, save the merged
    PlainNet (state_dict + spec) to ``out_path``; returns the JSON-able report."""
    model, _ = checkpoint.load_model(ckpt_path)
    merged, report = _merge_and_check(model, input_size, samples, seed)
    checkpoint.save(out_path, merged, merged.spec)
    return {"finetuned": str(ckpt_path), "merged": str(out_path), "input_size": input_size, **report}


def merge_pattern(arch: str, keep: list[int] | str, input_size: int, pretrained: str = "none",
                  num_classes: int = 1000, small_input: bool = False, free_act: str = "none",
                  samples: int = 2, seed: int = 0) -> dict:
    """Apply a keep-list (or a ``PATTERNS`` name) to a fresh backbone, merge, and report costs and error.
    The granularity follows the keep-list's length (block or layer units)."""
    model = create_model(arch, num_classes, small_input=small_input, pretrained=pretrained).eval()
    keep = PATTERNS[keep] if isinstance(keep, str) else list(keep)
    units = {len(u): u for u in (activation_units(model, g) for g in ("block", "layer"))}
    if len(keep) not in units:
        raise ConfigError(f"merge: keep-list has {len(keep)} entries; {arch} has {' or '.join(map(str, units))} units")
    apply_keep(model, units[len(keep)], keep, free_act)
    _, report = _merge_and_check(model, input_size, samples, seed)
    return {"arch": arch, "keep": keep, "input_size": input_size, **report}


def export_onnx(net: nn.Module, path: str | Path, input_size: int) -> Path:
    """Export to ONNX (opset 17, dynamic batch) with the TorchScript exporter (no onnxscript needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, input_size, input_size),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


@torch.no_grad()
def onnx_max_abs_err(net: nn.Module, path: str | Path, input_size: int, samples: int = 2, seed: int = 0) -> float:
    """Max abs difference between onnxruntime (CPU) running ``path`` and PyTorch running ``net``."""
    import onnxruntime

    x = torch.randn(samples, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    return float((torch.from_numpy(logits) - net.eval()(x)).abs().max())
