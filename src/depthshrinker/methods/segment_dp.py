"""The dynamic programs of Kim et al. over merge segments (``deploy.segments``): "Efficient Latency-Aware CNN Depth
Compression via Two-Stage Dynamic Programming" (ICML 2023) and LayerMerge (ICML 2024).

* ``fastest_split`` (Kim et al.'s first DP): the fastest way to run an activation-free span ``(s, e)`` as
  consecutive merged segments, ``T*(s, e) = min(T(s, e), min_j T*(s, j) + T(j, e))``.
* ``extended_importance``: importance of a span split at block ends that keep no activation,
  ``I*(s, e, a, b) = max(I(s, e, a, b), max_j I*(s, j, a, 0) + I(j, e, 0, b))``, where ``a``/``b`` say whether an
  activation is kept at the span's start/end (0 only at a block end: the reference's optional ReLU after the add).
* ``kim_dp`` (the second DP): the spans and activations that maximise Σ I* under Σ T* ≤ budget, over states
  (position, activation kept there).
* ``layermerge_dp``: the segments and their layer-pruning options that maximise Σ importance under Σ latency ≤
  budget.

Both budgeted DPs are longest paths under a budget in a graph over positions, solved exactly here with a front of
non-dominated (latency, importance) per state (the reference rounds latencies to a grid of ``1/prec``); ties go
to the lower latency, as in the reference.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable

TOLERANCE = 1e-9  # relative: the same latencies summed in another order still meet their own budget


def kim_normalised(delta: dict[tuple[int, int, int, int], float], alpha: float) -> dict:
    """Kim et al.'s importance from measured gains ``delta`` (held-out top-1 after the segment's finetune minus the
    pretrained network's): ``Δ − α·mean(Δ of the single-conv entries)`` (their convs re-initialised), uncapped;
    α = 1.6 for MobileNetV2-1.0 in the reference."""
    singles = [v for (s, e, _, _), v in delta.items() if e - s == 1]
    shift = alpha * sum(singles) / len(singles)
    return {k: v - shift for k, v in delta.items()}


def layermerge_normalised(delta: dict) -> dict:
    """LayerMerge's importance from measured top-1 gains (points): ``exp(Δ / 100)``."""
    return {k: math.exp(v / 100) for k, v in delta.items()}


def fastest_split(latency: dict[tuple[int, int], float]) -> dict[tuple[int, int], tuple[float, tuple[int, ...]]]:
    """Kim et al.'s first DP over the valid segments ``latency[(s, e)]``: per span ``(s, e)`` that is a valid
    segment, the least latency of running it as consecutive valid segments and their end points (``(e,)`` when
    it runs as one)."""
    best: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}
    for s, e in sorted(latency, key=lambda k: (k[1] - k[0], k)):
        options = [(latency[s, e], (e,))]
        options += [(best[s, j][0] + latency[j, e], best[s, j][1] + (e,))
                    for j in range(s + 1, e) if (s, j) in best and (j, e) in latency]
        best[s, e] = min(options, key=lambda o: (o[0], len(o[1])))
    return best


def extended_importance(importance: dict[tuple[int, int, int, int], float]) -> dict[tuple[int, int, int, int], float]:
    """``I*`` (module docstring) for every entry ``(s, e, a, b)`` of ``importance``."""
    out: dict[tuple[int, int, int, int], float] = {}
    for s, e, a, b in sorted(importance, key=lambda k: (k[0], k[1], k[2], k[3])):
        value = importance[s, e, a, b]
        for j in range(s + 1, e):
            if (s, j, a, 0) in out and (j, e, 0, b) in importance:
                value = max(value, out[s, j, a, 0] + importance[j, e, 0, b])
        out[s, e, a, b] = value
    return out


def best_path(edges: Iterable[tuple[Hashable, Hashable, float, float, Hashable]], start: Hashable,
              ends: Iterable[Hashable], budget: float) -> tuple[float, float, list]:
    """The path from ``start`` to one of ``ends`` with the largest Σ importance and Σ latency ≤ ``budget`` over
    ``edges`` (from, to, latency ≥ 0, importance, label), states visited in sorted order (every edge goes forward
    in it: states are positions, or (position, activation kept)); returns (importance, latency, labels); ties go to
    the lower latency. Raises ValueError naming the fastest path's latency when no path fits."""
    limit = budget * (1 + TOLERANCE) + TOLERANCE
    incoming: dict[Hashable, list] = {}
    states = {start}
    for edge in edges:
        incoming.setdefault(edge[1], []).append(edge)
        states.update(edge[:2])
    fronts: dict[Hashable, list[tuple[float, float, tuple]]] = {start: [(0.0, 0.0, ())]}
    for state in sorted(states - {start}):
        grown = sorted(((t + lat, imp + i, labels + (label,))
                        for src, _, lat, i, label in incoming.get(state, ())
                        for t, imp, labels in fronts.get(src, ()) if t + lat <= limit), key=lambda c: (c[0], -c[1]))
        front, top = [], -math.inf
        for candidate in grown:  # by latency: kept only if more important than every faster one
            if candidate[1] > top:
                front.append(candidate)
                top = candidate[1]
        fronts[state] = front
    done = [c for end in ends for c in fronts.get(end, ())]
    if not done:
        fastest = {start: 0.0}
        for state in sorted(states - {start}):
            fastest[state] = min((fastest[src] + lat for src, _, lat, _, _ in incoming.get(state, ()) if src in fastest),
                                 default=math.inf)
        least = min(fastest.get(end, math.inf) for end in ends)
        raise ValueError(f"no choice fits the latency budget {budget:.6g} (the fastest takes {least:.6g})")
    t, imp, labels = min(done, key=lambda c: (-c[1], c[0]))
    return imp, t, list(labels)


def kim_dp(latency: dict[tuple[int, int], float], importance: dict[tuple[int, int, int, int], float], length: int,
           budget: float, act_latency: dict[int, float] | None = None) -> dict:
    """Kim et al.'s two DPs: ``latency[(s, e)]`` of each valid segment merged into one conv, ``importance[(s, e, a,
    b)]`` of each extended segment, over body positions ``0..length``; ``act_latency[p]``: the cost of keeping the
    activation at ``p`` (0 when not given: Kim et al.'s tables time a conv with its activation; under MPC the
    activation is the larger part and gets its own entry). Returns the chosen spans, the positions that keep an
    activation (``acts``: span ends with ``b = 1``), the merge points (every span's fastest split), and
    Σ importance / Σ latency."""
    split = fastest_split(latency)
    ext = extended_importance(importance)
    act_latency = act_latency or {}
    edges = [((s, a), (e, b), split[s, e][0] + (act_latency.get(e, 0.0) if b else 0.0), value, (s, e, a, b))
             for (s, e, a, b), value in ext.items() if (s, e) in split]
    imp, t, spans = best_path(edges, (0, 1), [(length, 0), (length, 1)], budget)
    return {"spans": spans, "acts": sorted(e for _, e, _, b in spans if b),
            "merges": sorted({p for s, e, _, _ in spans for p in split[s, e][1]}), "importance": imp, "latency": t}


def layermerge_dp(entries: dict[tuple[int, int, Hashable], tuple[float, float]], length: int, budget: float) -> dict:
    """LayerMerge's DP: ``entries[(s, e, option)] = (latency, importance)`` of each segment under each of its
    layer-pruning options, over body positions ``0..length``. Returns the chosen (s, e, option) and Σ importance /
    Σ latency."""
    edges = [(s, e, lat, imp, (s, e, option)) for (s, e, option), (lat, imp) in entries.items()]
    imp, t, chosen = best_path(edges, 0, [length], budget)
    return {"segments": chosen, "importance": imp, "latency": t}
