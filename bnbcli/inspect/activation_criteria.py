"""The criteria of `bnb inspect --activations` applied to the counts of its hooks: outlier features, activation
spikes and the suggested threshold (bnbcli/inspect/activations.py describes them)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from bnbcli.inspect.activation_hooks import ModuleStats
from bnbcli.inspect.activation_report import (
    DECOMPOSITION_BUDGET,
    NEAR_MISSES,
    SPIKE_FACTOR,
    THRESHOLD_GRID,
    ActivationCriteria,
    ActivationOutlierDim,
)
from bnbcli.inspect.outliers import layer_of


def block_of(module: str) -> str:
    """The transformer layer of a module: its name up to the first numeric part, else the name itself."""
    return layer_of(module + ".weight") or module


def blocks(modules: list[ModuleStats]) -> dict[str, list[int]]:
    """layer → the indexes of its modules, in order."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(modules):
        out.setdefault(block_of(s.name), []).append(i)
    return out


def outlier_dims(
    modules: list[ModuleStats],
    hits: np.ndarray,
    tokens: int,
    criteria: ActivationCriteria,
    top_tokens: Any,
) -> tuple[list[ActivationOutlierDim], list[ActivationOutlierDim]]:
    """(outlier features, near misses) among the modules of one input width."""
    by_module = np.stack([s.hits > 0 for s in modules])  # [modules, width]
    layers = blocks(modules)
    by_layer = np.stack([by_module[i].any(axis=0) for i in layers.values()])  # [layers, width]
    names = list(layers)
    peak = np.stack([s.peak for s in modules]).max(axis=0)
    layer_count = by_layer.sum(axis=0)
    found: list[ActivationOutlierDim] = []
    near: list[ActivationOutlierDim] = []
    for d in np.nonzero(layer_count)[0].tolist():
        layer_share = int(layer_count[d]) / len(names)
        position_share = int(hits[d]) / tokens if tokens else 0.0
        dim = ActivationOutlierDim(
            dim=d,
            layer_count=int(layer_count[d]),
            layer_share=layer_share,
            position_share=position_share,
            max_magnitude=float(peak[d]),
            layers=tuple(name for name, r in zip(names, by_layer[:, d], strict=True) if r),
            modules=tuple(s.name for s, r in zip(modules, by_module[:, d], strict=True) if r),
        )
        if layer_share >= criteria.min_layer_share and position_share >= criteria.min_position_share:
            found.append(dim)
        else:
            near.append(dim)
    found.sort(key=lambda x: (-x.layer_count, -x.position_share, x.dim))
    near.sort(key=lambda x: (-x.layer_count * x.position_share, -x.max_magnitude, x.dim))
    return [replace(x, top_tokens=top_tokens(x.dim)) for x in found], [
        replace(x, top_tokens=top_tokens(x.dim)) for x in near[:NEAR_MISSES]
    ]


def activation_spikes(modules: list[ModuleStats], threshold: float) -> list[tuple[str, str]]:
    """(module, why) for the modules whose input's max |x| is ≥ threshold and ≥ SPIKE_FACTOR × the median
    max |x| of the hooked modules of its input width (three or more), the largest first."""
    by_width: dict[int, list[ModuleStats]] = {}
    for s in modules:
        by_width.setdefault(s.width, []).append(s)
    out: list[tuple[float, str, str]] = []
    for width, peers in by_width.items():
        if len(peers) < 3:
            continue
        median = float(np.median([float(s.peak.max()) for s in peers]))
        for s in peers:
            peak = float(s.peak.max())
            if peak >= threshold and peak >= SPIKE_FACTOR * median:
                ratio = peak / median if median > 0 else math.inf
                why = (
                    f"{s.name}: max |x| {peak:.4g} at dim {int(s.peak.argmax())}, {ratio:.3g}× the median "
                    f"max |x| ({median:.4g}) of the {len(peers)} modules with {width} inputs"
                )
                out.append((peak, s.name, why))
    out.sort(key=lambda t: -t[0])
    return [(name, why) for _, name, why in out]


def decomposed_shares(modules: list[ModuleStats]) -> np.ndarray:
    """Per grid value: the share of input columns per forward with some |x| ≥ it, over ``modules``."""
    columns = sum(s.calls * s.width for s in modules)
    if not columns:
        return np.zeros(len(THRESHOLD_GRID))
    return sum((s.grid_cols for s in modules), np.zeros(len(THRESHOLD_GRID), dtype=np.int64)) / columns


def suggest_threshold(share: np.ndarray, threshold: float, outliers: bool) -> tuple[float, float]:
    """(the lowest grid value within DECOMPOSITION_BUDGET — at most ``threshold`` when outlier features were
    found —, its decomposed share)."""
    index = next((i for i, s in enumerate(share) if s <= DECOMPOSITION_BUDGET), len(THRESHOLD_GRID) - 1)
    value = THRESHOLD_GRID[index]
    if outliers and value > threshold:
        return threshold, math.nan  # measured exactly by the caller
    return value, float(share[index])
