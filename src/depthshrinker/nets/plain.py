"""The plain network: the deploy form of any network the IR (``nets.ir``) supports, BatchNorm folded into
biased convolutions, described by a JSON spec. Merging, the device benchmarks and the MPC engine all work on it::

    blocks ... -> global average pool -> linear classifier

A block is a chain of convolutions, each followed by its activation (``relu``, ``relu6`` or ``none``), then an
optional residual add of the block input (``residual``; through a 1x1 projection conv when ``shortcut`` is
given), then an optional activation after the add (``free_act``: ResNet's ``act2``, or DepthShrinker's ReLU6
added to a block left linear). A max-pool is a block of its own (``convs: []``, ``pool``); an average pool
(zero padding counted, as torch's default) is a block of one depthwise conv with weights ``1/k²``. An
SNL-masked activation carries its public mask in the spec (``"mask"``, or ``"free_mask"`` after the add:
``{"shape", "ones", "bits"}``), and one whose mask keeps nothing is written as ``act: none`` (DESIGN "One set of
counts": it counts, costs and merges as linear)::

    {"convs": [{"in": 16, "out": 96, "kernel": 1, "stride": 1, "padding": 1, "groups": 1, "act": "none"}, ...],
     "residual": true, "shortcut": {"in": 16, "out": 32, "kernel": 1, "stride": 2, ...}, "free_act": "relu"}

The blocks come from the IR: the convs of a residual's branch (its shortcut conv as ``shortcut``) form one
block, other convs group by the deepest module that holds them (MobileNetV2's blocks without a skip), and a
conv of the root module is a block of its own (the stem and head convs). Anything that is not such a chain of
blocks (a conv reading an earlier tensor, a norm not after a conv, a linear before the end) is refused by name.

BatchNorm folding (Ioffe & Szegedy 2015, inference form): ``W' = W·γ/√(σ²+ε)``, ``b' = β − μ·γ/√(σ²+ε)``.
A pad-first chain (see ``set_pad_first``) keeps its padding on its first conv. The merge plan a keep-list
was applied with (``plan.apply_keep``) is carried in the spec as ``merge_plan`` for ``merge.merge_plain``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from depthshrinker.base.bits import decode_bits, encode_bits
from depthshrinker.base.config import ConfigError
from depthshrinker.nets.gates import MaskedAct
from depthshrinker.nets.ir import Net, Node, extract

ACTS = {"none": nn.Identity, "relu6": nn.ReLU6, "relu": nn.ReLU}


def act_spec(act: nn.Module | None) -> dict:
    """``{"act"}`` of an activation module (None: linear), with ``"mask"`` for an SNL-masked one: its (public)
    mask as packed bits; one whose mask keeps nothing is linear (``act: none``): it costs nothing and merges like
    any linear run."""
    spec = {"act": _act_name(act)}
    if isinstance(act, MaskedAct):
        ones = int(act.mask.sum())
        if ones:
            spec["mask"] = {"shape": list(act.mask.shape), "ones": ones, "bits": encode_bits(act.mask)}
        else:
            spec["act"] = "none"
    return spec


def conv_spec(conv: nn.Conv2d, act: nn.Module | None) -> dict:
    """A conv and its activation (``act_spec``)."""
    if isinstance(conv.padding, str):
        raise ConfigError(f"plain network: string padding '{conv.padding}' is not supported")
    return {"in": conv.in_channels, "out": conv.out_channels, "kernel": conv.kernel_size[0],
            "stride": conv.stride[0], "padding": conv.padding[0], "groups": conv.groups, **act_spec(act)}


def act_module(conv: dict) -> nn.Module:
    """The activation of a conv spec: plain, or masked (its mask from the spec, not the state_dict)."""
    if not conv.get("mask"):
        return ACTS[conv["act"]]()
    mask = conv["mask"]
    gate = MaskedAct(ACTS[conv["act"]](), tuple(mask["shape"]), persistent=False)
    gate.mask.copy_(decode_bits(mask["bits"], mask["shape"]))
    return gate


def free_act_spec(block: dict) -> dict:
    """The activation after a block's residual add as an ``act_spec``."""
    return {"act": block.get("free_act", "none"), **({"mask": block["free_mask"]} if block.get("free_mask") else {})}


def _plain_conv(c: dict) -> nn.Conv2d:
    return nn.Conv2d(c["in"], c["out"], c["kernel"], c["stride"], c["padding"], groups=c["groups"], bias=True)


class PlainBlock(nn.Module):
    """Convolutions (with bias) and activations in a chain, plus the residual add (identity or projection), the
    activation after it, or a max-pool."""

    def __init__(self, spec: dict):
        super().__init__()
        self.convs = nn.ModuleList(_plain_conv(c) for c in spec["convs"])
        self.acts = nn.ModuleList(act_module(c) for c in spec["convs"])
        self.residual = bool(spec.get("residual", False))
        if spec.get("shortcut"):
            self.shortcut = _plain_conv(spec["shortcut"])
        self.free_act = act_module(free_act_spec(spec))
        pool = spec.get("pool")
        self.pool = nn.MaxPool2d(pool["kernel"], pool["stride"], pool["padding"]) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            return self.pool(x)
        y = x
        for conv, act in zip(self.convs, self.acts):
            y = act(conv(y))
        if self.residual:
            y = y + (self.shortcut(x) if hasattr(self, "shortcut") else x)
        return self.free_act(y)


class PlainNet(nn.Module):
    """Blocks (stem and head included), global average pooling and a linear classifier."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(PlainBlock(b) for b in spec["blocks"])
        self.classifier = nn.Linear(spec["classifier"]["in"], spec["classifier"]["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean((2, 3)))


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one biased convolution: ``W·γ/√(σ²+ε)``, ``β + (b − μ)·γ/√(σ²+ε)``
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``)."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias)
    return weight.detach(), bias.detach()


def _act_name(module: nn.Module | None) -> str:
    if module is None or isinstance(module, nn.Identity):
        return "none"
    if isinstance(module, MaskedAct):
        return module.kind
    if isinstance(module, nn.ReLU6) or (type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0, 6)):
        return "relu6"
    if type(module) is nn.ReLU:
        return "relu"
    raise ConfigError(f"plain network: activation {type(module).__name__} is not supported (only ReLU/ReLU6; "
                      "a search checkpoint must be finetuned first)")


@dataclass
class LayoutConv:
    """One conv of the deploy form and the modules it comes from: ``conv`` (None: an average pool, as a
    depthwise conv of ``pool`` = (channels, k, s, p)), its BatchNorm, and its activation (module and id)."""
    conv: nn.Conv2d | None
    bn: nn.BatchNorm2d | None = None
    act: nn.Module | None = None
    act_id: str | None = None
    pool: tuple[int, int, int, int] | None = None
    node: str = ""

    def spec(self) -> dict:
        if self.conv is None:
            c, k, s, p = self.pool
            return {"in": c, "out": c, "kernel": k, "stride": s, "padding": p, "groups": c, "act": "none"}
        return conv_spec(self.conv, self.act)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of conv + BN as one biased conv."""
        if self.conv is None:
            c, k, _, _ = self.pool
            return torch.full((c, 1, k, k), 1.0 / (k * k)), torch.zeros(c)
        if self.bn is None:
            bias = self.conv.bias if self.conv.bias is not None else torch.zeros(self.conv.out_channels)
            return self.conv.weight.detach(), bias.detach()
        return fold_bn(self.conv, self.bn)


@dataclass
class LayoutBlock:
    """One PlainNet block as modules: its conv chain, shortcut, activation after the add, or max-pool; ``name``
    is the module path of the block (``free_act`` hooks live there), or of its conv or pool."""
    name: str
    convs: list[LayoutConv] = field(default_factory=list)
    residual: bool = False
    shortcut: LayoutConv | None = None
    free_act: nn.Module | None = None
    free_id: str | None = None
    pool: dict | None = None

    def spec(self) -> dict:
        spec = {"convs": [c.spec() for c in self.convs], "residual": self.residual}
        if self.pool:
            return {**spec, "pool": self.pool}
        if self.shortcut is not None:
            spec["shortcut"] = self.shortcut.spec()
        free = act_spec(self.free_act)
        spec["free_act"] = free["act"]
        if "mask" in free:
            spec["free_mask"] = free["mask"]
        return spec


@dataclass
class Layout:
    """The PlainNet of a network as its modules: blocks and the classifier."""
    blocks: list[LayoutBlock]
    classifier: nn.Linear

    def act_positions(self) -> dict[str, tuple[int, int]]:
        """Activation id -> (block, conv) it follows (the activation after an add: the block's last conv)."""
        where = {c.act_id: (i, j) for i, b in enumerate(self.blocks) for j, c in enumerate(b.convs) if c.act_id}
        where.update({b.free_id: (i, len(b.convs) - 1) for i, b in enumerate(self.blocks) if b.free_id})
        return where


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(f"plain network: {where}: {what}")


def _module_block(net: Net, path: str) -> str:
    """The deepest module holding ``path`` that is not a container ("": the root)."""
    parent = path.rpartition(".")[0]
    while parent and parent in net.containers:
        parent = parent.rpartition(".")[0]
    return parent


def layout(model: nn.Module, net: Net | None = None) -> Layout:
    """The PlainNet blocks of ``model`` (module docstring), read from its IR."""
    net = net or extract(model)
    modules = dict(model.named_modules())
    res_of = {}
    for r in net.residuals:
        res_of.update({n: r for n in r.branch})
        if r.shortcut:
            res_of[r.shortcut] = r
    blocks: list[LayoutBlock] = []
    convs: dict[str, LayoutConv] = {}   # node -> conv it ends (conv, its norm, its activation)
    shortcuts: dict[str, LayoutConv] = {}  # residual add -> its projection conv
    out, head = None, []

    def start(name: str, node: Node) -> LayoutBlock:
        if node.inputs != (out,):
            raise _refuse(node.module or node.name, "reads a tensor other than the previous block's output "
                          "(only a chain of blocks, each with at most one residual add, is supported)")
        blocks.append(LayoutBlock(name))
        return blocks[-1]

    for node in net.nodes.values():
        where = node.module or node.name
        if head and (node.op not in ("flatten", "linear") or head[-1].op == "linear"):
            raise _refuse(where, f"{node.op} after the global pool (only flatten and one linear follow it)")
        if node.op == "input":
            out = node.name
        elif node.op == "conv":
            conv = LayoutConv(modules[node.module], node=node.name)
            convs[node.name] = conv
            r = res_of.get(node.name)
            if r is not None and r.shortcut == node.name:
                shortcuts[r.add] = conv
                continue
            key = r.block if r is not None else _module_block(net, node.module)
            block = blocks[-1] if blocks and key and blocks[-1].name == key and not blocks[-1].pool else None
            if block is None:
                block = start(key or node.module, node)
                block.residual = r is not None
            elif node.inputs != (out,):
                raise _refuse(where, "reads a tensor other than the previous conv's output")
            block.convs.append(conv)
            out = node.name
        elif node.op == "norm":
            conv = convs.get(node.inputs[0]) if len(node.inputs) == 1 else None
            if conv is None or conv.bn is not None or conv.conv is None:
                raise _refuse(where, "a BatchNorm that does not follow a conv")
            conv.bn = modules[node.module]
            convs[node.name] = conv
            out = node.name if out == node.inputs[0] else out
        elif node.op == "act":
            module = modules[node.module] if node.module else ACTS[node.kind]()
            if blocks and node.module == f"{blocks[-1].name}.free_act" and blocks[-1].free_act is None:
                blocks[-1].free_act, blocks[-1].free_id = module, node.act_id  # gates.add_free_act's hook
            elif node.inputs and node.inputs[0] in convs and convs[node.inputs[0]] is (blocks[-1].convs or [None])[-1]:
                conv = convs[node.inputs[0]]
                conv.act, conv.act_id = module, node.act_id
            elif node.inputs == (out,) and blocks and blocks[-1].residual and blocks[-1].free_act is None:
                blocks[-1].free_act, blocks[-1].free_id = module, node.act_id
            else:
                raise _refuse(where, "an activation that does not follow a conv or a residual add")
            out = node.name
        elif node.op == "add":
            r = next(r for r in net.residuals if r.add == node.name)
            if not (blocks and blocks[-1].residual and blocks[-1].name == r.block and out in node.inputs):
                raise _refuse(where, "a residual add whose branch is not one chain of convs")
            blocks[-1].shortcut = shortcuts.pop(r.add, None)
            out = node.name
        elif node.op == "pool" and node.kind in ("max", "avg"):
            pool = modules[node.module]
            k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
            if pool.ceil_mode or (node.kind == "max" and pool.dilation not in (1, (1, 1))) or (
                    node.kind == "avg" and (not pool.count_include_pad or pool.divisor_override)):
                raise _refuse(where, "a pool with ceil_mode, dilation, count_include_pad=False or a divisor")
            if node.kind == "max":
                start(node.module, node).pool = {"kind": "max", "kernel": k, "stride": s, "padding": p}
            else:
                conv = LayoutConv(None, pool=(_channels(blocks), k, s, p), node=node.name)
                start(node.module, node).convs.append(conv)
                convs[node.name] = conv
            out = node.name
        elif node.op in ("pool", "flatten"):
            if node.inputs != (out,):
                raise _refuse(where, "a global pool or flatten that does not read the last block's output")
            head.append(node)
            out = node.name
        elif node.op == "linear":
            if not any(n.op == "pool" for n in head) or node.inputs != (out,):
                raise _refuse(where, "a linear layer that is not the classifier after the global average pool")
            linear = modules[node.module]
            head.append(node)
    if not head or head[-1].op != "linear":
        raise _refuse(type(model).__name__, "no global average pool + linear classifier at the end")
    return Layout(blocks, linear)


def _channels(blocks: list[LayoutBlock]) -> int:
    for block in reversed(blocks):
        if block.convs:
            return (block.convs[-1].conv.out_channels if block.convs[-1].conv is not None
                    else block.convs[-1].pool[0])
    raise _refuse("input", "a pool before the first conv")


def act_positions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Activation id of a network -> (PlainNet block, conv) it follows."""
    return layout(model).act_positions()


def plain_spec(model: nn.Module, lay: Layout | None = None) -> dict:
    """The PlainNet spec of a network (no weights folded): what merge plans are made on. A merge plan recorded
    on the model (``plan.apply_keep``) travels with it as ``merge_plan``."""
    lay = lay or layout(model)
    classifier = lay.classifier
    spec = {"kind": "plain", "num_classes": classifier.out_features, "blocks": [b.spec() for b in lay.blocks],
            "classifier": {"in": classifier.in_features, "out": classifier.out_features}}
    if getattr(model, "merge_plan", None) is not None:
        spec["merge_plan"] = model.merge_plan
    return spec


def to_plain(model: nn.Module) -> PlainNet:
    """Fold a network (any the IR supports: masked, pruned or not) into a PlainNet that computes the same
    function in eval mode."""
    lay = layout(model)
    net = PlainNet(plain_spec(model, lay))
    with torch.no_grad():
        for source, block in zip(lay.blocks, net.blocks):
            pairs = list(zip(source.convs, block.convs))
            if source.shortcut is not None:
                pairs.append((source.shortcut, block.shortcut))
            for conv, target in pairs:
                weight, bias = conv.folded()
                target.weight.copy_(weight)
                target.bias.copy_(bias)
        net.classifier.load_state_dict(lay.classifier.state_dict())
    return net.eval()


def set_pad_first(convs: list[nn.Conv2d]) -> None:
    """Put a chain of convs in pad-first form: all its zero padding, ``P = Σ_j p_j·s_1⋯s_{j−1}``, on the first
    conv, none on the others, so that the chain merges exactly (REFERENCE §1, the padding trap).

    With the activations between them removed, ``b(pad(a(x)))`` differs from the merged conv at the borders by
    ``a``'s bias (and, for ``a`` wider than 1x1, by what ``a`` reads of the border); ``b(a(pad(x)))`` equals it
    exactly. The chain keeps its output size (each later conv's padding reappears as ``a``'s output border), but
    it computes another function at the borders, so a network is put in this form before it is finetuned."""
    total, stride = 0, 1
    for conv in convs:
        if isinstance(conv.padding, str):
            raise ConfigError("pad-first: a conv with string padding")
        total += conv.padding[0] * stride
        stride *= conv.stride[0]
    for j, conv in enumerate(convs):
        conv.padding = (total, total) if j == 0 else (0, 0)


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Record a decided merge plan (``deploy.plan``) as ``model.merge_plan`` and put the segments it merges into
    a conv whose padding must move, and only those, in pad-first form (``set_pad_first``)."""
    model.merge_plan = plan
    lay = layout(model)
    if len(lay.blocks) != len(plan["blocks"]):
        raise ConfigError(f"merge: the plan has {len(plan['blocks'])} blocks, the network {len(lay.blocks)}")
    for block, entry in zip(lay.blocks, plan["blocks"]):
        for segment in entry["segments"] if entry["pad_first"] else []:
            convs = [block.convs[j].conv for j in segment]
            if any(c.padding[0] for c in convs[1:]):
                set_pad_first(convs)
    return model
