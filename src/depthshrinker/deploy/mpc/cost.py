"""Closed-form two-party cost of a PlainNet under CrypTen 0.4.1 (64-bit ring), exact for what ``engine`` runs:
the online phase (party to party) and the preprocessing phase (dealer to model owner, TTP provider), and
latency estimates ``T ≈ compute + R·RTT + B / (2·bandwidth)``.

Online, what CrypTen communicates (per party, sent + received; equal to its counters in tests/test_mpc.py):

* conv / linear layer (Beaver): opens ``x − a`` and ``W − b`` in one ``all_reduce`` → 16 B per element of
  input and weight, 1 round; a projection shortcut is one more conv. Bias and residual additions, mean pooling
  (public divisor, local truncation in 2PC) and input sharing (pseudo-random zero shares) are free.
* ReLU: ``x · (x ≥ 0)`` (SNL masks: only on the kept elements, selected by public indices, for free): A2B
  conversion, carry circuit, B2A and a Beaver product → 464 B per element,
  9 rounds per layer. ReLU6 = ``hardtanh(0, 6)`` stacks its two ReLUs into one call → 928 B, still 9 rounds.
* max-pool (k, stride s, padding p; ``party.secure_max_pool``): replicate padding (free: the max of a window
  is unchanged by copies of its own border pixels), then the max over each window row and then over each
  window column as ``m + relu(x − m)`` chains: ``k − 1`` ReLU layers of ``C·H·W_o`` elements, then ``k − 1``
  of ``C·H_o·W_o`` → ``2(k − 1)`` activation layers, counted as ReLU elements.
* revealing the logits to the client: 8 B per logit, 1 round.

So ``B = 464·N_relu + 928·N_relu6 + 16·Σ(numel(in) + numel(W)) + 8·classes`` and
``R = 9·(#activation layers) + #conv/linear layers + 1``. Two parties send B/2 each, at the same time.

Preprocessing (TTP: the client draws its shares from a seed it shares with the dealer; the dealer sends the
owner one correction share per tuple request, 8 B per ring element; ``engine`` batches one inference's
requests into a single round trip):

* conv / linear layer: one Beaver triple request, ``c`` of the layer's output shape → 8 B per output element.
* ReLU layer: 9 requests carrying 15 ring elements per compared element (A2B's adder: one binary triple of
  n elements, then six levels of 2n; the B2A bit; the final product's Beaver triple) → 120 B per ReLU
  element, 240 B per ReLU6 element (its two comparisons are stacked: still 9 requests).
* additions, pooling, input sharing and revealing the logits: nothing.

So ``P = 120·N_relu + 240·N_relu6 + 8·Σ_conv,fc numel(out)`` and ``Q = 9·(#activation layers) + #conv/linear
layers`` tuple requests. The dealer also sends each party an 8-byte seed once per session (not counted per
inference).
With TFP (the cost simulation) rank 0 draws the same tuples locally: no preprocessing traffic.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from depthshrinker.nets.plain import PlainNet

LINEAR_BYTES = 16        # per element of input and weight: two opened int64 tensors, counted sent + received
RELU_BYTES = 464         # per ReLU element
ACT_COMPARISONS = {"none": 0, "relu": 1, "relu6": 2}
ACT_ROUNDS = 9           # per activation layer, ReLU or ReLU6
REVEAL_BYTES = 8         # per revealed logit
RING_BYTES = 8           # per ring element the dealer sends (preprocessing)
ACT_PREPROC_ELEMENTS = 15   # ring elements of dealt randomness per compared element
ACT_PREPROC_REQUESTS = 9    # dealer requests per activation layer
# Compute of one party on the 2-core reference box (1 thread per party, loopback, shared and loaded): a
# least-squares fit by ``benchmarks/bench_mpc.py --calibrate``. Box- and load-specific; pass compute_s to override.
SECONDS_PER_COMPARISON = 3.3e-6
SECONDS_PER_MAC = 1.06e-9
SECONDS_PER_ROUND = 4.9e-3


@dataclass(frozen=True)
class Network:
    """A link between the two parties: round-trip time and bandwidth per direction."""
    rtt_s: float
    bandwidth_bit_s: float


NETWORKS = {"loopback": Network(0.0, float("inf")),
            "lan": Network(0.5e-3, 1e9),    # 1 Gbit/s, 0.5 ms RTT
            "wan": Network(40e-3, 100e6)}   # 100 Mbit/s, 40 ms RTT


@dataclass(frozen=True)
class Cost:
    """Counts of one network or block: bytes and rounds as CrypTen counts them, and what drives compute."""
    bytes: int = 0
    rounds: int = 0
    relu: int = 0                # ReLU elements
    relu6: int = 0               # ReLU6 elements
    act_layers: int = 0
    linear_layers: int = 0
    macs: int = 0
    preproc_bytes: int = 0       # randomness the dealer sends (TTP), per inference
    preproc_requests: int = 0    # tuple requests to the dealer (TTP), per inference (one round trip in all)

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict:
        return asdict(self)


def activation(kind: str, numel: int) -> Cost:
    """One activation layer (``relu``, ``relu6`` or ``none``) over ``numel`` elements."""
    comparisons = ACT_COMPARISONS[kind]
    if not comparisons:
        return Cost()
    return Cost(bytes=RELU_BYTES * comparisons * numel, rounds=ACT_ROUNDS, act_layers=1,
                preproc_bytes=RING_BYTES * ACT_PREPROC_ELEMENTS * comparisons * numel,
                preproc_requests=ACT_PREPROC_REQUESTS, **{kind: numel})


def _linear(in_numel: int, weight_numel: int, macs: int, out_numel: int) -> Cost:
    return Cost(bytes=LINEAR_BYTES * (in_numel + weight_numel), rounds=1, linear_layers=1, macs=macs,
                preproc_bytes=RING_BYTES * out_numel, preproc_requests=1)


def _conv(conv: dict, shape: tuple[int, int, int]) -> tuple[Cost, tuple[int, int, int]]:
    c, h, w = shape
    if c != conv["in"]:
        raise ValueError(f"conv expects {conv['in']} input channels, got {c}")
    k, s, p = conv["kernel"], conv["stride"], conv["padding"]
    out = (conv["out"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    weight = conv["out"] * conv["in"] // conv["groups"] * k * k
    macs = out[0] * out[1] * out[2] * conv["in"] // conv["groups"] * k * k
    numel = out[0] * out[1] * out[2]
    return _linear(c * h * w, weight, macs, numel) + activation(conv["act"], _elements(conv, numel)), out


def max_pool(pool: dict, shape: tuple[int, int, int]) -> tuple[Cost, tuple[int, int, int]]:
    """(cost, output shape) of a max-pool as ``party.secure_max_pool`` computes it (module docstring)."""
    c, h, w = shape
    k, s, p = pool["kernel"], pool["stride"], pool["padding"]
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    total = Cost()
    for numel in [c * h * wo] * (k - 1) + [c * ho * wo] * (k - 1):
        total += activation("relu", numel)
    return total, (c, ho, wo)


def _elements(act: dict, numel: int) -> int:
    """Elements an activation compares: with an SNL mask only its ones (broadcast over the rest of the shape)."""
    mask = act.get("mask")
    return mask["ones"] * numel // math.prod(mask["shape"]) if mask else numel


def merged_conv(convs: list[dict]) -> dict:
    """The one dense conv a chain of activation-free convs merges into (DepthShrinker merging): kernel
    ``k1 + Σ (k_i − 1)·s_1⋯s_{i−1}``, stride ``Π s_i``, padding ``Σ p_i·s_1⋯s_{i−1}``."""
    if len(convs) == 1:
        return {**convs[0], "act": "none"}
    kernel, padding, stride = 1, 0, 1
    for conv in convs:
        kernel += (conv["kernel"] - 1) * stride
        padding += conv["padding"] * stride
        stride *= conv["stride"]
    return {"in": convs[0]["in"], "out": convs[-1]["out"], "kernel": kernel, "stride": stride, "padding": padding,
            "groups": 1, "act": "none"}


def block_cost(block: dict, shape: tuple[int, int, int], acts: bool = True,
               merged: bool = False) -> tuple[Cost, tuple[int, int, int]]:
    """(cost, output shape) of one block (a ``PlainNet.spec["blocks"]`` entry) on a (C, H, W) input.
    ``acts=False`` drops all its activations (the free activation too); ``merged=True`` also merges its convs
    into one (what DepthShrinker deploys)."""
    if block.get("pool"):
        return max_pool(block["pool"], shape)
    convs = [c if acts else {**c, "act": "none"} for c in block["convs"]]
    if merged:
        if acts and any(c["act"] != "none" for c in convs):
            raise ValueError("only an activation-free block can be merged")
        convs = [merged_conv(convs)]
    total = Cost()
    out = shape
    for conv in convs:
        step, out = _conv(conv, out)
        total += step
    if block.get("shortcut"):
        step, short = _conv(block["shortcut"], shape)
        total, shape = total + step, short
    if block.get("residual") and out != shape:
        raise ValueError(f"residual block changes the shape {shape} -> {out}")
    if acts:
        free = block.get("free_act", "none")
        total += activation(free, _elements({"mask": block.get("free_mask")}, math.prod(out)))
    return total, out


def _spec(net: PlainNet | dict) -> dict:
    return net if isinstance(net, dict) else net.spec


def count(net: PlainNet | dict, input_size: int) -> Cost:
    """Exact CrypTen cost of one secure inference of a (1, 3, s, s) image: online bytes (per party) and rounds,
    preprocessing bytes and dealer requests."""
    spec = _spec(net)
    total, shape = Cost(), (3, input_size, input_size)
    for block in spec["blocks"]:
        step, shape = block_cost(block, shape)
        total += step
    classifier = spec["classifier"]
    total += _linear(classifier["in"], classifier["in"] * classifier["out"], classifier["in"] * classifier["out"],
                     classifier["out"])
    return total + Cost(bytes=REVEAL_BYTES * classifier["out"], rounds=1)


def _link(network: str | Network) -> Network:
    return NETWORKS[network] if isinstance(network, str) else network


def compute_seconds(c: Cost) -> float:
    """Local compute of one party on the reference box (the constants above)."""
    return (SECONDS_PER_COMPARISON * (c.relu + 2 * c.relu6) + SECONDS_PER_MAC * c.macs
            + SECONDS_PER_ROUND * c.rounds)


def latency(c: Cost, network: str | Network = "lan", compute_s: float | None = None) -> float:
    """``compute + R·RTT + (B/2)·8 / bandwidth`` seconds; ``compute_s`` overrides the calibrated compute."""
    link = _link(network)
    compute = compute_seconds(c) if compute_s is None else compute_s
    return compute + c.rounds * link.rtt_s + c.bytes / 2 * 8 / link.bandwidth_bit_s


def preproc_latency(c: Cost, network: str | Network = "lan", compute_s: float = 0.0) -> float:
    """Network time of the preprocessing over a dealer link like ``network``: one round trip (all requests in
    one batch) + ``P·8 / bandwidth`` (the dealer's bytes flow one way), plus ``compute_s`` (the tuples'
    generation, not modelled)."""
    link = _link(network)
    return compute_s + (link.rtt_s if c.preproc_requests else 0.0) + c.preproc_bytes * 8 / link.bandwidth_bit_s


def estimate(net: PlainNet | dict, input_size: int, network: str | Network = "lan",
             compute_s: float | None = None) -> dict:
    """Counts of ``count`` plus, online, ``compute_s``, ``rtt_s`` (R·RTT), ``transfer_s`` and ``latency_s``, and
    the preprocessing's network time ``preproc_network_s`` (``preproc_latency`` without compute)."""
    c = count(net, input_size)
    link = _link(network)
    return {**c.as_dict(), "mb": c.bytes / 1e6, "preproc_mb": c.preproc_bytes / 1e6,
            "compute_s": compute_seconds(c) if compute_s is None else compute_s,
            "rtt_s": c.rounds * link.rtt_s, "transfer_s": c.bytes / 2 * 8 / link.bandwidth_bit_s,
            "latency_s": latency(c, link, compute_s), "preproc_network_s": preproc_latency(c, link)}


def unit_table(net: PlainNet | dict, input_size: int, network: str | Network = "lan") -> list[dict]:
    """Per block (= DepthShrinker unit for MobileNetV2): estimated latency with its activations
    (``before``) and with them removed and the block merged (``after``), for the MPC-aware search."""
    shape, rows = (3, input_size, input_size), []
    for block in _spec(net)["blocks"]:
        before, out = block_cost(block, shape)
        after, _ = block_cost(block, shape, acts=False, merged=True)
        rows.append({"before_s": latency(before, network), "after_s": latency(after, network),
                     "before_bytes": before.bytes, "after_bytes": after.bytes})
        shape = out
    return rows
