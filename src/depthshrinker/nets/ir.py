"""One network IR for any feed-forward CNN, extracted by tracing (``torch.fx``; Torch-Pruning's
``DependencyGraph`` likewise finds structure from a traced forward pass), so that no stage names a block class
or an attribute.

Supported: ``Conv2d``, ``BatchNorm2d`` (and its subclasses, e.g. timm's ``BatchNormAct2d``, kept as one call
with their ReLU/ReLU6 child as the activation ``<bn path>.act``), ReLU and ReLU6 (modules, ``F.relu``/``relu6``,
``Tensor.relu``, ``Hardtanh(0, 6)``), residual additions whose shortcut is the identity or a projection
(1x1 conv + BN), max and average pooling, global mean, flatten, linear; ``Identity`` and ``Dropout`` pass
through. Anything else is refused in one line naming the module. An activation is named by its module path,
or by its fx node where one module is called at several sites (torchvision's ResNet reuses one ``relu``).

A *residual* is an ``add(a, b)``: its *fork* is the last node both arms descend from; an arm that is the fork
is an identity shortcut, an arm that is conv(+BN) of the fork a projection, the other arm the branch.
*Units* (what one DepthShrinker gate controls, Fu et al. 2022, Sec. 3.1): at ``layer`` granularity every
activation; at ``block`` granularity the activations of one block share a unit, where an activation belongs to
the residual whose branch holds it or whose sum it activates (ResNet's ``act2``), else to the deepest module
(not a container) that holds it and the conv feeding it (MobileNetV2's blocks without skip); activations
outside every block are the ``stem`` before the first block and the ``head`` after the last.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from depthshrinker.base.config import ConfigError

SUPPORTED = "Conv2d, BatchNorm2d, ReLU/ReLU6, add, max/avg/mean pooling, flatten, linear"
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
PASS_MODULES = (nn.Identity, nn.Dropout)
IGNORED = (getattr, operator.getitem, operator.eq, torch._assert)  # shape checks timm traces through
RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


@dataclass(frozen=True)
class Node:
    """One IR node: ``op`` is conv, norm, act, add, pool, flatten, linear or input; ``module`` the module path
    (call_module nodes), ``kind`` relu|relu6 for an act, max|avg|mean for a pool; ``scope`` the path of the
    module whose forward made the call; ``act_id`` an activation's name (module docstring)."""
    name: str
    op: str
    inputs: tuple[str, ...] = ()
    module: str | None = None
    kind: str = ""
    scope: str = ""
    act_id: str = ""


@dataclass(frozen=True)
class Residual:
    """``add`` = fork's branch + shortcut (None: identity, else the projection conv's node name)."""
    add: str
    fork: str
    branch: tuple[str, ...]
    shortcut: str | None
    block: str


@dataclass
class Unit:
    """One gate's worth of activations: ``acts`` are activation ids (module paths), ``block`` the block they
    belong to (None for the stem and head)."""
    name: str
    acts: list[str] = field(default_factory=list)
    block: str | None = None


class ActModule(nn.Module):
    """Base of the modules that stand in for a ReLU/ReLU6 (the gates of ``nets.gates``): the IR reads them as
    that activation (``kind``: relu or relu6), so a gated or masked network has the same IR as the plain one."""
    kind: str = "relu"


class _Tracer(fx.Tracer):
    """torch.nn built-ins are leaves, and so is every BatchNorm2d subclass (a fused norm-act stays one call,
    and traces the same in train and eval mode) and every ``ActModule``."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d | ActModule) or super().is_leaf_module(m, qualname)


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
    return paths[-1] if paths else ""


def _act_kind(module: nn.Module) -> str | None:
    if isinstance(module, ActModule):
        return module.kind
    if isinstance(module, nn.ReLU6) or (type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0, 6)):
        return "relu6"
    return "relu" if isinstance(module, nn.ReLU) else None


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(f"network IR: {where}: {what} is not supported ({SUPPORTED})")


@dataclass
class Net:
    """The IR of a traced network: ``nodes`` in forward order (by name), its residuals, and the paths of its
    container modules (Sequential, ModuleList, ModuleDict: never a block)."""
    nodes: dict[str, Node]
    residuals: list[Residual]
    containers: frozenset[str]

    @property
    def acts(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.op == "act"]

    def _feeding_conv(self, name: str) -> Node | None:
        while True:
            node = self.nodes[name]
            if node.op == "conv":
                return node
            if len(node.inputs) != 1:
                return None
            name = node.inputs[0]

    def block_of(self, act: Node) -> str | None:
        """The block ``act`` belongs to (module docstring), None outside every block."""
        for res in self.residuals:
            if act.name in res.branch or act.inputs == (res.add,):
                return res.block
        conv = self._feeding_conv(act.inputs[0])
        if conv is None:
            return None
        shared = _common_prefix(act.scope, conv.module or "")
        while shared and shared in self.containers:
            shared = shared.rpartition(".")[0]
        return shared or None

    def units(self, granularity: str = "block") -> list[Unit]:
        """The activation units in forward order, at ``block`` or ``layer`` granularity (module docstring)."""
        if granularity not in ("block", "layer"):
            raise ConfigError(f"granularity: '{granularity}' is not block or layer")
        acts = [(act, self.block_of(act)) for act in self.acts]
        first = next((i for i, (_, b) in enumerate(acts) if b is not None), len(acts))
        units: list[Unit] = []
        for i, (act, block) in enumerate(acts):
            if granularity == "block" and block is not None and units and units[-1].block == block:
                units[-1].acts.append(act.act_id)
                continue
            owner = act.act_id.rpartition(".")[0] if act.act_id.endswith(".act") else act.act_id
            outside = "stem" if i < first else "head"
            name = (block or outside) if granularity == "block" else (owner if block else outside)
            units.append(Unit(name, [act.act_id], block))
        return units


def _common_prefix(a: str, b: str) -> str:
    """Deepest module path that contains both paths (``""``: the root)."""
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _ancestors(nodes: dict[str, Node], name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(nodes[n].inputs)
    return seen


def _residual(nodes: dict[str, Node], order: dict[str, int], add: Node, index: int) -> Residual:
    a, b = add.inputs
    up_a, up_b = _ancestors(nodes, a), _ancestors(nodes, b)
    fork = max(up_a & up_b, key=order.get)
    above = _ancestors(nodes, fork)
    short, branch = sorted((sorted(up - above, key=order.get) for up in (up_a, up_b)), key=len)
    if not short:
        shortcut = None
    elif [nodes[n].op for n in short] in (["conv"], ["conv", "norm"]) and nodes[short[0]].inputs == (fork,):
        shortcut = short[0]
    else:
        raise _refuse(add.scope or add.name, "a residual whose shortcut is not the identity or conv(+BN)")
    paths = [n.module or n.scope for n in (*(nodes[m] for m in branch), add)]  # a shared act: its module's path
    block = functools.reduce(_common_prefix, paths)
    return Residual(add.name, fork, tuple(branch), shortcut, block or f"res{index}")


def extract(model: nn.Module) -> Net:
    """The IR of ``model`` (module docstring); a ConfigError naming the first unsupported module or call."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    nodes: dict[str, Node] = {}
    alias: dict[str, str] = {}  # pass-through nodes -> their input

    def inputs(node: fx.Node) -> tuple[str, ...]:
        return tuple(alias.get(a.name, a.name) for a in node.all_input_nodes if alias.get(a.name, a.name) in nodes)

    def add(name: str, op: str, node: fx.Node, **kw) -> None:
        nodes[name] = Node(name, op, inputs(node), scope=_scope(node), **kw)

    for node in graph.nodes:
        where = _scope(node) or f"{type(model).__name__}.forward"
        if node.op == "placeholder":
            nodes[node.name] = Node(node.name, "input")
        elif node.op == "output":
            continue
        elif node.op == "call_module":
            m, path = modules[node.target], node.target
            if isinstance(m, nn.Conv2d):
                if isinstance(m.padding, str) or m.padding_mode != "zeros" or m.dilation != (1, 1):
                    raise _refuse(path, "a conv with string padding, non-zero padding mode or dilation")
                add(node.name, "conv", node, module=path)
            elif isinstance(m, nn.BatchNorm2d):
                add(node.name, "norm", node, module=path)
                extra = [(n, c) for n, c in m.named_children() if not isinstance(c, PASS_MODULES)]
                if extra:
                    (child, act), kind = extra[0], _act_kind(extra[0][1])
                    if len(extra) > 1 or kind is None:
                        raise _refuse(f"{path}.{child}", type(act).__name__)
                    nodes[f"{node.name}.{child}"] = Node(f"{node.name}.{child}", "act", (node.name,),
                                                         f"{path}.{child}", kind, path, f"{path}.{child}")
                    alias[node.name] = f"{node.name}.{child}"
            elif _act_kind(m):
                add(node.name, "act", node, module=path, kind=_act_kind(m), act_id=path)
            elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
                add(node.name, "pool", node, module=path, kind="max" if isinstance(m, nn.MaxPool2d) else "avg")
            elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
                add(node.name, "pool", node, module=path, kind="mean")
            elif isinstance(m, nn.Flatten):
                add(node.name, "flatten", node, module=path)
            elif isinstance(m, nn.Linear):
                add(node.name, "linear", node, module=path)
            elif isinstance(m, PASS_MODULES):
                alias[node.name] = inputs(node)[0]
            else:
                raise _refuse(path, type(m).__name__)
        elif node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
            if len(inputs(node)) != 2:
                raise _refuse(where, "an add of a constant")
            add(node.name, "add", node)
        elif node.op == "call_function" and node.target in RELU_FUNCTIONS:
            add(node.name, "act", node, kind=RELU_FUNCTIONS[node.target], act_id=node.name)
        elif node.op == "call_function" and node.target is torch.flatten:
            add(node.name, "flatten", node)
        elif node.op == "call_method" and node.target == "relu":
            add(node.name, "act", node, kind="relu", act_id=node.name)
        elif node.op == "call_method" and node.target == "mean" and tuple(node.args[1:2]) in ((2, 3), ((2, 3),)):
            add(node.name, "pool", node, kind="mean")
        elif node.op == "call_method" and node.target in ("flatten", "view", "reshape", "size", "dim"):
            if node.target in ("flatten", "view", "reshape"):
                add(node.name, "flatten", node)
        elif node.op == "call_function" and node.target in IGNORED:
            continue
        else:
            raise _refuse(where, f"{'.' if node.op == 'call_method' else ''}{getattr(node.target, '__name__', node.target)}")
    calls: dict[str, int] = {}
    for n in nodes.values():
        calls[n.module] = calls.get(n.module, 0) + 1
    for name, n in nodes.items():  # an activation module called at several sites: one act per call, by node name
        if n.op == "act" and n.module and calls[n.module] > 1:
            nodes[name] = dataclasses.replace(n, act_id=n.name)
    order = {name: i for i, name in enumerate(nodes)}
    adds = [n for n in nodes.values() if n.op == "add"]
    residuals = [_residual(nodes, order, n, i) for i, n in enumerate(adds)]
    return Net(nodes, residuals, frozenset(p for p, m in modules.items() if isinstance(m, CONTAINERS)))
