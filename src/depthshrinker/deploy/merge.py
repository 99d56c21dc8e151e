"""Exact convolution merging (DepthShrinker, Fu et al. 2022, Sec. 3.3): within each block of a PlainNet,
every run of consecutive convolutions with no activation between them becomes one dense convolution.

Composition of two biased convolutions A (kernel ``ka``, stride ``sa``) then B (``kb``, ``sb``, padding 0)::

    W[o, i] = Σ_m W_B[o, m] ⋆ W_A[m, i]    (W_B dilated by sa; kernel ka + (kb-1)·sa, stride sa·sb)
    b[o]    = b_B[o] + Σ_m b_A[m] · Σ_{u,v} W_B[o, m, u, v]

For pw-expand W1, depthwise K, pw-project W3 this is ``W[o,i,u,v] = Σ_m W3[o,m]·K[m,u,v]·W1[m,i]`` and
``b[o] = b3[o] + Σ_m W3[o,m]·(b2[m] + b1[m]·Σ_{u,v} K[m,u,v])``. It is exact at the image borders only when B
has no padding of its own: a chain with padding after its first conv must be in pad-first form (the first
conv carries all the padding, see ``plain.set_pad_first``), otherwise the merge is refused. A residual block
whose branch became one conv (kernel K, stride S, padding P) absorbs its shortcut at kernel offset P, where
that conv reads the input pixel the shortcut reads: the identity (S = 1) as ``W[o, o, P, P] += 1``, a 1x1
projection (stride S) as ``W[:, :, P, P] += W_proj``, ``b += b_proj``.

Which runs merge is the network's merge plan (``plan.plan_merges``): the one recorded with the network when its
keep-list was applied (``plan.apply_keep``, under the deploy target's ``plan.merge_policy``), else one made
here under the given policy, among the segments that merge exactly as the network stands.
"""
from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from depthshrinker.base.checkpoint import save
from depthshrinker.base.config import ConfigError
from depthshrinker.base.data import build_datasets
from depthshrinker.deploy.load import load_model
from depthshrinker.deploy.plan import apply_keep, candidate_segments, composed_spec, merge_policy, plan_merges
from depthshrinker.nets.counting import profile
from depthshrinker.nets.chain import ChainNet
from depthshrinker.nets.plain import LayoutConv, PlainNet, layout, to_plain
from depthshrinker.nets.registry import create_model
from depthshrinker.nets.units import activation_units

__all__ = ["PATTERNS", "Conv", "build_plain", "candidate_segments", "compose", "conv_layers", "export_onnx", "fold_residual",
           "head_input", "held_out_images", "merge_checkpoint", "merge_pattern", "merge_plain", "merge_segments",
           "onnx_max_abs_err"]

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
                          "the chain in pad-first form (plain.set_pad_first, done by plan.apply_keep) first")
    stride = a.spec["stride"]
    w_a = a.weight if spec["groups"] == a.spec["groups"] else _ungroup(a.weight, a.spec["groups"])
    weight = F.conv2d(w_a.transpose(0, 1), b.weight.flip(2, 3), padding=(b.spec["kernel"] - 1) * stride,
                      dilation=stride, groups=b.spec["groups"]).transpose(0, 1)
    bias = b.bias + F.conv2d(a.bias.view(1, -1, 1, 1), b.weight.sum((2, 3), keepdim=True),
                             groups=b.spec["groups"]).view(-1)
    return Conv(spec, weight.contiguous(), bias)


def fold_residual(conv: Conv, shortcut: Conv | None = None, offset: int | None = None) -> bool:
    """Add the shortcut (None: the identity) into a block's one conv at kernel offset P (module docstring; its
    padding unless ``offset`` is given: a pad-first segment's block, whose padding moved to the segment's front);
    False where the conv has an activation or does not read the shortcut's pixel at a kernel tap."""
    s, p = conv.spec, conv.spec["padding"] if offset is None else offset
    stride = shortcut.spec["stride"] if shortcut else 1
    if s["act"] != "none" or s["stride"] != stride or not 0 <= p < s["kernel"]:
        return False
    if shortcut is None:
        if s["in"] != s["out"]:
            return False
        channels = torch.arange(s["out"])
        conv.weight[channels, channels % (s["in"] // s["groups"]), p, p] += 1
        return True
    if s["groups"] != 1:
        conv.weight, conv.spec = _ungroup(conv.weight, s["groups"]), {**s, "groups": 1}
    conv.weight[:, :, p, p] += shortcut.weight[:, :, 0, 0]
    conv.bias += shortcut.bias
    return True


@torch.no_grad()
def merge_plain(net: PlainNet, policy: str | dict | None = None, latency: dict | None = None) -> PlainNet:
    """The merged PlainNet (same function). The plan is the one recorded in ``net.spec["merge_plan"]`` when no
    ``policy`` is given, else ``plan_merges(net, policy, latency)`` (``macs`` when there is neither). Residuals
    fold where a block became one conv. The spec records ``merge`` (``policy`` and per block the ``plan``) and
    per block ``merged_from`` (original conv indices per conv), ``residual_folded`` and ``decisions``."""
    recorded = net.spec.get("merge_plan") if policy is None and latency is None else None
    plan = recorded or plan_merges(net, policy or "macs", latency)
    if len(plan["blocks"]) != len(net.blocks):
        raise ConfigError(f"merge: the plan has {len(plan['blocks'])} blocks, the network {len(net.blocks)}")
    spec = copy.deepcopy(net.spec)
    spec.pop("merge_plan", None)
    merged_convs: list[list[Conv]] = []
    for i, (block, bspec, bplan) in enumerate(zip(net.blocks, spec["blocks"], plan["blocks"])):
        convs = [_float64(c, m) for c, m in zip(bspec["convs"], block.convs)]
        segments = bplan["segments"]
        merged = [functools.reduce(functools.partial(compose, where=f"block {i}"), [convs[j] for j in seg])
                  for seg in segments]
        shortcut = _float64(bspec["shortcut"], block.shortcut) if bspec.get("shortcut") else None
        folded = bool(bspec.get("residual")) and len(merged) == 1 and fold_residual(merged[0], shortcut)
        bspec.update(convs=[m.spec for m in merged], residual=bool(bspec.get("residual")) and not folded,
                     merged_from=segments, residual_folded=folded, decisions=bplan["decisions"])
        if folded:
            bspec.pop("shortcut", None)
        merged_convs.append(merged + ([shortcut] if shortcut and not folded else []))
    spec["merge"] = {"policy": plan["policy"], "plan": [b["segments"] for b in plan["blocks"]]}
    return build_plain(spec, merged_convs, net.classifier)


@torch.no_grad()
def build_plain(spec: dict, convs: list[list[Conv]], classifier: nn.Linear) -> PlainNet:
    """The PlainNet of ``spec`` with each block's convs (then its shortcut) from ``convs`` and ``classifier``'s
    weights, on the classifier's device and dtype."""
    out = PlainNet(spec).to(classifier.weight)
    for block, block_convs in zip(out.blocks, convs, strict=True):
        targets = [*block.convs, *([block.shortcut] if hasattr(block, "shortcut") else [])]
        for target, conv in zip(targets, block_convs, strict=True):
            target.weight.copy_(conv.weight)
            target.bias.copy_(conv.bias)
    out.classifier.load_state_dict(classifier.state_dict())
    return out.eval()


def _folded(c: LayoutConv) -> Conv:
    weight, bias = c.folded()
    return Conv({**c.spec(), "act": "none"}, weight.to(torch.float64), bias.to(torch.float64))


def _merged(chain: ChainNet, lay, s: int, e: int, dropped: set[int]) -> Conv:
    """Segment ``(s, e)`` as one float64 conv: swallowed residual blocks first, shortcut at the kernel centre; the
    body positions ``dropped`` (LayerMerge) left out, a swallowed block whose convs were all dropped being ``x + x``,
    a factor 2 on the next conv's input."""
    b, items, p, scale = chain.body, [], s, 1.0
    chained = functools.partial(functools.reduce, functools.partial(compose, where=f"segment ({s}, {e})"))

    def add(item: Conv) -> None:
        nonlocal scale
        items.append(Conv(item.spec, item.weight * scale, item.bias))
        scale = 1.0

    while p < e:
        block = lay.blocks[b.convs[p].block]
        tgt = b.residuals.get(p)
        if tgt is None or tgt > e:  # a conv of its own, not a residual block the segment swallows
            if p + 1 not in dropped:
                add(_folded(block.convs[b.convs[p].index]))
            p += 1
            continue
        kept = [_folded(block.convs[b.convs[q - 1].index]) for q in range(p + 1, tgt + 1) if q not in dropped]
        if not kept and block.shortcut is None:
            scale *= 2.0
            p = tgt
            continue
        merged = chained(kept) if kept else None
        shortcut = _folded(block.shortcut) if block.shortcut else None
        if merged is None or not fold_residual(merged, shortcut, offset=(merged.spec["kernel"] - 1) // 2):
            raise ConfigError(f"segments: ({s}, {e}) cannot fold the shortcut of block {block.name}")
        add(merged)
        p = tgt
    if scale != 1.0:  # the segment ends in an emptied block: scale the output
        items[-1] = Conv(items[-1].spec, items[-1].weight * scale, items[-1].bias * scale)
    return chained(items)


def _act_at(chain: ChainNet, p: int) -> str:
    """The activation the deployed network has at body position ``p``."""
    if p not in chain.acts:
        return "none"
    kind = chain.body.convs[p - 1].act
    return chain.added if kind == "none" else kind


def _outside(block) -> tuple[dict, list[Conv]]:
    """A block outside the body as it stands: its spec and its convs and shortcut, BN folded."""
    convs = [_folded(c) for c in block.convs] + ([_folded(block.shortcut)] if block.shortcut else [])
    return {**block.spec(), "merged_from": [[j] for j in range(len(block.convs))]}, convs


@torch.no_grad()
def merge_segments(chain: ChainNet) -> PlainNet:
    """The PlainNet of a ``segment_form`` network (Kim et al.'s segments), the same function in eval mode: each
    segment one conv (BN folded; a residual block it swallows merged first, its shortcut folded at the block
    kernel's centre, then composed with its neighbours); a residual block with a segment boundary inside stays a
    residual block of its segments' convs. Each block's ``merged_from`` lists per conv the body positions it
    merges (``[[j]]`` per conv outside the body, as ``merge_plain``)."""
    b = chain.body
    lay = layout(chain.model)
    span: dict[int, list[int]] = {}
    for p, c in enumerate(b.convs):
        span.setdefault(c.block, [p, p + 1])[1] = p + 1
    first, last = b.convs[0].block, b.convs[-1].block
    start_of = {s: (s, e) for s, e in chain.segments}
    dropped = {q for q, c in enumerate(b.convs, start=1) if (c.block, c.index) in chain.dropped}
    blocks: list[tuple[dict, list[Conv]]] = [_outside(block) for block in lay.blocks[:first]]
    p = 0
    for i in range(first, last + 1):
        block = lay.blocks[i]
        if block.pool:
            blocks.append(_outside(block))
            continue
        src, tgt = span[i]
        if p >= tgt:  # swallowed by a segment that started before it
            continue
        if block.residual and start_of[src][1] < tgt:  # a boundary inside: stays a residual block of its segments
            convs, merged_from = [], []
            while p < tgt:
                s, e = start_of[p]
                convs.append(_merged(chain, lay, s, e, dropped))
                convs[-1].spec["act"] = _act_at(chain, e) if e < tgt else "none"
                merged_from.append(list(range(s + 1, e + 1)))
                p = e
            shortcut = [_folded(block.shortcut)] if block.shortcut else []
            blocks.append(({"convs": [c.spec for c in convs], "residual": True, "free_act": _act_at(chain, tgt),
                            "merged_from": merged_from, **({"shortcut": shortcut[0].spec} if shortcut else {})},
                           convs + shortcut))
            continue
        while p < tgt:
            s, e = start_of[p]
            conv = _merged(chain, lay, s, e, dropped)
            conv.spec["act"] = _act_at(chain, e)
            blocks.append(({"convs": [conv.spec], "residual": False, "free_act": "none",
                            "merged_from": [list(range(s + 1, e + 1))]}, [conv]))
            p = e
    blocks += [_outside(block) for block in lay.blocks[last + 1:]]
    classifier = lay.classifier
    spec = {"kind": "plain", "num_classes": classifier.out_features, "blocks": [bs for bs, _ in blocks],
            "classifier": {"in": classifier.in_features, "out": classifier.out_features},
            "merge": {"policy": {"name": "segments"}, "segments": [list(seg) for seg in chain.segments],
                      "head": last + 1 < len(lay.blocks)}}
    return build_plain(spec, [convs for _, convs in blocks], classifier)


def _float64(spec: dict, module: nn.Conv2d) -> Conv:
    return Conv(spec, module.weight.to(torch.float64, copy=True), module.bias.to(torch.float64, copy=True))


def conv_layers(net: PlainNet) -> int:
    """Convolutions of a PlainNet, projection shortcuts included."""
    return sum(len(block.convs) + hasattr(block, "shortcut") for block in net.blocks)


def head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features before the head (the input of the last PlainNet block, of its first conv in the network it
    came from: MobileNetV2's ``conv_head``): where a wrong merge shows even when the head's ReLU6 clips the
    logits into agreement (REFERENCE §2). A segment-merged network whose last block is in the body (a ResNet: no
    head conv; the block may be swallowed by a longer segment) is compared at the map before the global pool."""
    if isinstance(model, ChainNet):
        head = model.body.convs[-1].block + 1 < len(model.blocks)
        return model.forward_features(x, stop=len(model.blocks) - 1 if head else None)
    if isinstance(model, PlainNet) and model.spec.get("merge", {}).get("head") is False:
        for block in model.blocks:
            x = block(x)
        return x
    if isinstance(model, PlainNet):
        head = model.blocks[-1]
    else:
        last = layout(model).blocks[-1]
        head = last.convs[0].conv if last.convs else model.get_submodule(last.name)
    seen = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def _merge_and_check(model: nn.Module, x: torch.Tensor, policy: str | dict | None) -> tuple[PlainNet, dict]:
    """Merge a (timm or plain) model under its recorded plan or ``policy``; report costs before/after, the max
    abs logit error and the relative error of the features before the head on the images ``x``."""
    model.eval()
    if isinstance(model, ChainNet):  # Kim et al.'s segments: their own merge; the unmerged network as it runs
        plain, merged = to_plain(model.model), merge_segments(model)
        before = profile(model, x.shape[-1])
    else:
        plain = model if isinstance(model, PlainNet) else to_plain(model)
        merged = merge_plain(plain, None if plain.spec.get("merge_plan") else policy)
        before = profile(plain, x.shape[-1])
    ref, ref_features = model(x), head_input(model, x)
    after = profile(merged, x.shape[-1])
    return merged, {
        "merge_max_abs_err": float((merged(x) - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
        "merge_feature_rel_err": float((head_input(merged, x) - ref_features).abs().max()
                                       / ref_features.abs().max().clamp_min(1e-30)),
        **after, "layers_before": conv_layers(plain),
        "layers_after": conv_layers(merged), "params_unmerged": before["params"], "macs_unmerged": before["macs"],
        "merged_blocks": [i for i, b in enumerate(merged.spec["blocks"]) if any(len(s) > 1 for s in b["merged_from"])],
        "merge_policy": merged.spec["merge"]["policy"]["name"], "merge_plan": merged.spec["merge"],
    }


def held_out_images(config: dict, input_size: int, samples: int) -> torch.Tensor:
    """The first ``samples`` images of the held-out test split (``data.build_datasets``) at ``input_size``."""
    test = build_datasets({**config["data"], "image_size": input_size}, config["seed"]).test
    return torch.stack([test[i][0] for i in range(min(samples, len(test)))])


def merge_checkpoint(ckpt_path: str | Path, out_path: str | Path, config: dict, input_size: int | None = None,
                     samples: int = 8) -> dict:
    """Stage: load a finetuned checkpoint, fold BN, merge under its recorded plan (else ``merge_policy(config)``,
    among the exact merges), check against the unmerged model on ``samples`` held-out test images, save the
    merged PlainNet (state_dict + spec) to ``out_path``; returns the JSON-able report."""
    size = input_size or config["data"]["image_size"]
    model, spec = load_model(ckpt_path)
    x = held_out_images(config, size, samples)
    masked = bool(spec.get("mask"))  # all activations kept: nothing merges under any policy, none is read
    merged, report = _merge_and_check(model, x, merge_policy(config, size) if masked else {"name": "macs"})
    save(out_path, merged, merged.spec)
    return {"finetuned": str(ckpt_path), "merged": str(out_path), "input_size": size, "check_images": len(x),
            "check_split": "test", "masked": masked, **report}


def merge_pattern(arch: str, keep: list[int] | str, input_size: int, pretrained: str = "none",
                  num_classes: int = 1000, small_input: bool = False, free_act: str = "none",
                  policy: str | dict = "macs", samples: int = 2, seed: int = 0) -> dict:
    """Apply a keep-list (or a ``PATTERNS`` name) to a fresh backbone under the merge ``policy``, merge, and
    report costs and errors on ``samples`` seeded random images. The granularity follows the keep-list's length
    (block or layer units)."""
    model = create_model(arch, num_classes, small_input=small_input, pretrained=pretrained).eval()
    keep = PATTERNS[keep] if isinstance(keep, str) else list(keep)
    units = {len(u): u for u in (activation_units(model, g) for g in ("block", "layer"))}
    if len(keep) not in units:
        raise ConfigError(f"merge: keep-list has {len(keep)} entries; {arch} has {' or '.join(map(str, units))} units")
    apply_keep(model, units[len(keep)], keep, free_act, policy)
    x = torch.randn(samples, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    _, report = _merge_and_check(model, x, policy)
    return {"arch": arch, "keep": keep, "input_size": input_size, "check_images": samples,
            "check_split": "seeded noise", **report}


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
