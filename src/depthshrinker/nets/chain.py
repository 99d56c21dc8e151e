"""A network run as the chain of blocks its IR describes (``plain.layout``), on its own modules, BatchNorm kept:
the trainable form of a network whose merge segments cross residual additions (Kim et al., ICML 2023).

Where a segment swallows a residual block, the padding of the whole segment sits on its first conv (pad-first,
``plain.set_pad_first``), so the block's branch reads and writes maps larger than its shortcut's; the shortcut
is then fitted to the branch (``fit``: centre-cropped, or zero-padded before a projection), which is what the
merged conv computes with the shortcut folded at its kernel centre. With sizes that already agree, ``ChainNet``
computes exactly what the model computes.

Modules are looked up by path on every call, so activations removed or gated on ``chain.model`` afterwards
(``gates``) are the ones that run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthshrinker.nets.plain import Layout, layout


def fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` centre-cropped or zero-padded (equally on both sides) to spatial ``size``."""
    dh, dw = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    if dh == dw == 0:
        return x
    return F.pad(x, (-dw, -dw, -dh, -dh))  # negative padding crops


class ChainNet(nn.Module):
    """``model`` as its layout's chain (module docstring); ``added_acts[str(block)]``: an activation put after a
    block's residual add (Kim et al.'s optional ReLU6 at a block end); ``dropped``: the (block, conv index) pairs
    that run as the identity, their conv and BN skipped, their activation kept (LayerMerge's pruned layers);
    ``forward_features`` the map before the global pool."""

    def __init__(self, model: nn.Module, lay: Layout | None = None):
        super().__init__()
        self.model = model
        lay = lay or layout(model)
        paths = {id(m): p for p, m in model.named_modules()}
        self.blocks = []
        for block in lay.blocks:
            convs = []
            for c in block.convs:
                bn = paths.get(id(c.bn))
                own = self._act(c.act_id, c.act, paths)
                act = None if bn is not None and own == f"{bn}.act" else own  # BatchNormAct2d runs its own
                convs.append((paths[id(c.conv)] if c.conv is not None else c.pool, bn, act, own))
            shortcut = (paths[id(block.shortcut.conv)], paths.get(id(block.shortcut.bn))) if block.shortcut else None
            self.blocks.append({"convs": convs, "residual": block.residual, "shortcut": shortcut,
                                "stride": block.shortcut.conv.stride[0] if block.shortcut else 1,
                                "free_act": self._act(block.free_id, block.free_act, paths),
                                "pool": block.name if block.pool else None})
        self.classifier = paths[id(lay.classifier)]
        self.added_acts = nn.ModuleDict()
        self.dropped: set[tuple[int, int]] = set()

    @staticmethod
    def _act(act_id: str | None, act: nn.Module | None, paths: dict) -> str | nn.Module | None:
        """An activation as its module path (looked up on every call), or the module ``layout`` made for a
        function call."""
        if act is None:
            return None
        return act_id if act_id in paths.values() else act

    def _run(self, ref, x: torch.Tensor) -> torch.Tensor:
        if ref is None:
            return x
        if isinstance(ref, tuple):  # an average pool as (channels, k, s, p)
            _, k, s, p = ref
            return F.avg_pool2d(x, k, s, p)
        return (self.model.get_submodule(ref) if isinstance(ref, str) else ref)(x)

    def forward_features(self, x: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """The map before the global pool, or with ``stop`` the input of block ``stop``."""
        for i, block in enumerate(self.blocks):
            if i == stop:
                return x
            if block["pool"] is not None:
                x = self._run(block["pool"], x)
                continue
            y = x
            for j, (conv, bn, act, own) in enumerate(block["convs"]):
                y = self._run(own, y) if (i, j) in self.dropped else self._run(act, self._run(bn, self._run(conv, y)))
            if block["residual"]:
                shortcut = block["shortcut"]
                skip = fit(x, y.shape[-2:]) if block["stride"] == 1 else x
                y = y + (self._run(shortcut[1], self._run(shortcut[0], skip)) if shortcut else skip)
            y = self._run(block["free_act"], y)
            x = self.added_acts[str(i)](y) if str(i) in self.added_acts else y
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule(self.classifier)(self.forward_features(x).mean((2, 3)))
