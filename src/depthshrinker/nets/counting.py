"""Cost counts of a network: parameters, multiply-accumulates, and the nonlinear elements and layers that
private inference pays for (each ReLU/ReLU6 element is a secure comparison; each layer with at least one
such element is a communication round trip). One function serves gated, masked and merged networks."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from depthshrinker.nets.gates import GateAct, is_gate_param

PLAIN_ACTS = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh(0, 6)


def params(model: nn.Module) -> int:
    """Parameters of the network proper (gate scores and SNL masks excluded)."""
    return sum(p.numel() for name, p in model.named_parameters() if not is_gate_param(name))


@torch.no_grad()
def macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one image (convolutions and linear layers; torch's FlopCounterMode / 2)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def nonlinear(model: nn.Module, input_size: int) -> dict:
    """Nonlinear elements per image and nonlinear layers, split into ReLU and ReLU6 (= 2 comparisons in MPC).

    Returns ``{"nonlinear_units", "nonlinear_layers", "relu_elements", "relu6_elements", "layers": [...]}``
    where ``layers`` lists ``(module path, kind, elements)`` of every layer with at least one element."""
    layers: list[tuple[str, str, int]] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, GateAct):
            kind, active = module.kind, module.active_elements
        elif isinstance(module, PLAIN_ACTS):
            is_relu6 = isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0)
            kind, active = ("relu6" if is_relu6 else "relu"), torch.Tensor.numel
        else:
            continue

        def hook(_module, inputs, _output, path=path, kind=kind, active=active):
            elements = active(inputs[0][0])
            if elements:
                layers.append((path, kind, elements))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    relu = sum(n for _, kind, n in layers if kind == "relu")
    relu6 = sum(n for _, kind, n in layers if kind == "relu6")
    return {"nonlinear_units": relu + relu6, "nonlinear_layers": len(layers), "relu_elements": relu,
            "relu6_elements": relu6, "layers": layers}


def profile(model: nn.Module, input_size: int) -> dict:
    """params, macs, nonlinear_units, nonlinear_layers (and the ReLU/ReLU6 split) of one image."""
    counts = nonlinear(model, input_size)
    counts.pop("layers")
    return {"params": params(model), "macs": macs(model, input_size), **counts}
