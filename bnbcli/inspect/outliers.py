"""Outlier dimensions of weight matrices, and the hidden dimensions that recur across layers.

Every matrix is looked at as the model uses it, ``[out, in]`` (Conv1D weights, stored ``[in, out]``, are
transposed first), in float64 row chunks so that memory stays about one tensor.

**The column criterion** (``--outlier-factor K``, default ``criteria.DEFAULT_FACTOR``): the magnitude of input
column ``j`` is its mean absolute value ``mean_i |w[i, j]|``; column ``j`` is an *outlier input column*
when that magnitude is at least ``K`` times the median magnitude over all columns. The same test over
rows finds *outlier output rows*. A mean, not a max: one large value in a column of n rows raises the
column's mean by only value/n, so a single large entry is not mistaken for an outlier dimension; it is
reported on its own (below). For a column of Gaussian values the mean |w| of n ≥ 16 rows varies by
~0.75/√n around its expectation, so K = 5 leaves random columns far behind.

**Isolated large values** (``--value-sigma Z``, default ``criteria.DEFAULT_VALUE_SIGMA``): entries outside the
outlier columns and rows whose distance from the mean is at least ``Z`` standard deviations, mean and
standard deviation taken over the entries outside the outlier columns and rows (otherwise an outlier
column would inflate σ and hide them). A Gaussian matrix of 16M entries reaches ~5.9σ; real weights
have heavier tails, hence 10.

**Norm gains** (1-D ``*norm*.weight`` / ``ln_*.weight``): dimension ``d`` stands out when
``|g[d]| ≥ K × median |g|``.

**Recurrence across layers**: a tensor's layer is the part of its name up to its first numeric
component (``model.layers.7``, ``transformer.h.0``, ``single_transformer_blocks.3``). A dimension
*recurs* when it is an outlier (on the same axis: input columns, output rows, or norm gains) in at least
``--min-layer-share`` of the layers and in at least two of them.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from bnbcli.formats.metrics import CHUNK
from bnbcli.inspect.criteria import OutlierCriteria

TOP_VALUES = 5  # isolated values listed per matrix (all are counted)

Axis = Literal["in", "out", "norm"]
AXES: tuple[Axis, ...] = ("in", "out", "norm")
AXIS_WORDS = {"in": "input columns", "out": "output rows", "norm": "norm gains"}

_NORM = re.compile(r"(?:^|\.)(?:[^.]*norm[^.]*|ln_?\w*)\.weight$", re.IGNORECASE)


@dataclass(frozen=True)
class OutlierDim:
    dim: int
    ratio: float  # its magnitude over the median magnitude


@dataclass(frozen=True)
class LargeValue:
    row: int
    col: int
    value: float
    sigmas: float


@dataclass(frozen=True)
class MatrixOutliers:
    in_dims: tuple[OutlierDim, ...]  # outlier input columns
    out_dims: tuple[OutlierDim, ...]  # outlier output rows
    large_values: int  # isolated large values (count)
    top_values: tuple[LargeValue, ...] = ()  # the largest of them, largest first

    @property
    def count(self) -> int:
        return len(self.in_dims) + len(self.out_dims)

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_dims": [{"dim": d.dim, "ratio": d.ratio} for d in self.in_dims],
            "out_dims": [{"dim": d.dim, "ratio": d.ratio} for d in self.out_dims],
            "large_values": self.large_values,
            "top_values": [vars(v) for v in self.top_values],
        }


def layer_of(name: str) -> str | None:
    """``model.layers.7`` for ``model.layers.7.mlp.up_proj.weight``; None outside numbered stacks."""
    parts = name.split(".")
    first = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return None if first is None else ".".join(parts[: first + 1])


def is_norm_gain(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 and bool(_NORM.search(name))


def _rows(w: torch.Tensor):
    """(first row, float64 numpy block) over ``w`` [out, in], about CHUNK elements at a time."""
    step = max(1, CHUNK // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        yield start, w[start : start + step].to(torch.float64).numpy()


def _standing_out(magnitude: np.ndarray, factor: float) -> tuple[OutlierDim, ...]:
    finite = magnitude[np.isfinite(magnitude)]
    median = float(np.median(finite)) if finite.size else 0.0
    if median <= 0:
        return ()  # no typical magnitude to compare with (a mostly-zero matrix)
    ratios = magnitude / median
    hits = np.nonzero(ratios >= factor)[0]
    return tuple(OutlierDim(int(d), float(ratios[d])) for d in sorted(hits, key=lambda d: -ratios[d]))


def matrix_outliers(w: torch.Tensor, criteria: OutlierCriteria) -> MatrixOutliers:
    """Outlier input columns, output rows and isolated large values of a 2-D ``w`` [out, in]."""
    w = w.detach().cpu()
    rows, cols = w.shape
    col_sum = np.zeros(cols)
    row_mean = np.zeros(rows)
    for start, block in _rows(w):
        a = np.abs(np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0))
        col_sum += a.sum(axis=0)
        row_mean[start : start + block.shape[0]] = a.mean(axis=1) if cols else 0.0
    in_dims = _standing_out(col_sum / max(rows, 1), criteria.factor)
    out_dims = _standing_out(row_mean, criteria.factor)
    # mean and σ of the entries outside the outlier columns and rows
    keep_cols = np.ones(cols, dtype=bool)
    keep_cols[[d.dim for d in in_dims]] = False
    skip_rows = {d.dim for d in out_dims}
    n = 0
    s1 = s2 = 0.0
    for start, block in _rows(w):
        rest = _rest(block, start, keep_cols, skip_rows)
        n += rest.size
        s1 += float(rest.sum())
    mean = s1 / n if n else 0.0
    for start, block in _rows(w):
        rest = _rest(block, start, keep_cols, skip_rows) - mean
        s2 += float((rest * rest).sum())
    std = math.sqrt(s2 / n) if n else 0.0
    count = 0
    top: list[LargeValue] = []
    if std > 0:
        for start, block in _rows(w):
            distance = np.abs(block - mean)
            hit = (distance >= criteria.value_sigma * std) & keep_cols[None, :] & np.isfinite(block)
            for r in skip_rows:
                if start <= r < start + block.shape[0]:
                    hit[r - start] = False
            found = np.flatnonzero(hit)
            count += found.size
            largest = found[np.argsort(-distance.reshape(-1)[found], kind="stable")[:TOP_VALUES]]
            for i, j in zip(*np.unravel_index(largest, block.shape), strict=True):
                top.append(LargeValue(start + int(i), int(j), float(block[i, j]), float(distance[i, j] / std)))
            top = sorted(top, key=lambda v: -v.sigmas)[:TOP_VALUES]
    return MatrixOutliers(in_dims, out_dims, count, tuple(top))


NOTHING = MatrixOutliers((), (), 0)
# The screen of ``matrix_outliers_many`` sends a matrix one by one when it comes this close to a threshold,
# so that a last-bit difference in a sum could never hide an outlier.
SCREEN_SLACK = 1 - 1e-9


def matrix_outliers_many(ws: list[torch.Tensor], criteria: OutlierCriteria) -> list[MatrixOutliers]:
    """``matrix_outliers`` of each matrix, the same result: those of one shape (at most ``CHUNK`` elements,
    all finite) are screened in one numpy pass per step, and a matrix that shows no outlier column, row
    or large value gets ``NOTHING``; the others (the few where something stands out) go one by one."""
    groups: dict[tuple[torch.dtype, torch.Size], list[int]] = {}
    found: list[MatrixOutliers | None] = [None] * len(ws)
    for i, w in enumerate(ws):
        if 0 < w.numel() <= CHUNK and w.device.type == "cpu":
            groups.setdefault((w.dtype, w.shape), []).append(i)
    for indices in groups.values():
        table = torch.stack([ws[i] for i in indices]).to(torch.float64).numpy()  # [matrices, out, in]
        for i, plain in zip(indices, _plain_matrices(table, criteria).tolist(), strict=True):
            found[i] = NOTHING if plain else None
    return [f if f is not None else matrix_outliers(w, criteria) for f, w in zip(found, ws, strict=True)]


def _plain_matrices(x: np.ndarray, criteria: OutlierCriteria) -> np.ndarray:
    """Per matrix of ``x`` [matrices, out, in]: finite, with no outlier column or row (the median
    magnitude is 0, or none reaches ``factor`` times it) and no value ``value_sigma`` σ from the mean."""
    count, rows, cols = x.shape
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(x).all(axis=(1, 2))
        a = np.abs(x)
        quiet = _no_dim_stands_out(a.sum(axis=1) / rows, criteria.factor)
        quiet &= _no_dim_stands_out(a.mean(axis=2), criteria.factor)
        flat = x.reshape(count, rows * cols)
        mean = flat.sum(axis=1) / flat.shape[1]
        distance = np.abs(flat - mean[:, None])
        std = np.sqrt(np.square(distance).sum(axis=1) / flat.shape[1])
        limit = criteria.value_sigma * std * SCREEN_SLACK
        quiet &= (std == 0) | ~(distance >= limit[:, None]).any(axis=1)
    return finite & quiet


def _no_dim_stands_out(magnitude: np.ndarray, factor: float) -> np.ndarray:
    """Per row of ``magnitude`` [matrices, dims]: ``_standing_out`` finds nothing."""
    median = np.median(magnitude, axis=1)
    return (median <= 0) | (magnitude < factor * SCREEN_SLACK * median[:, None]).all(axis=1)


def _rest(block: np.ndarray, start: int, keep_cols: np.ndarray, skip_rows: set[int]) -> np.ndarray:
    keep_rows = [i for i in range(block.shape[0]) if start + i not in skip_rows]
    rest = block[keep_rows][:, keep_cols] if skip_rows else block[:, keep_cols]
    return rest[np.isfinite(rest)]


def norm_outliers(g: torch.Tensor, criteria: OutlierCriteria) -> tuple[OutlierDim, ...]:
    """Dimensions of a 1-D norm gain whose |g| is at least ``factor`` times the median |g|."""
    a = np.abs(g.detach().cpu().to(torch.float64).numpy())
    return _standing_out(np.where(np.isfinite(a), a, np.inf), criteria.factor)


@dataclass(frozen=True)
class RecurringDim:
    axis: Axis
    dim: int
    layers: tuple[str, ...]  # the layers it is an outlier in
    layer_share: float  # of all layers seen
    tensors: tuple[str, ...]  # the tensors it is an outlier in

    def as_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "dim": self.dim,
            "layer_count": len(self.layers),
            "layer_share": self.layer_share,
            "layers": list(self.layers),
            "tensor_count": len(self.tensors),
            "tensors": list(self.tensors),
        }


@dataclass
class Recurrence:
    """Collects (tensor, layer, axis, dims) while tensors stream by; ``result()`` at the end."""

    criteria: OutlierCriteria
    layers: dict[str, None] = field(default_factory=dict)  # every layer seen, in order
    hits: dict[tuple[Axis, int], dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, tensor: str, axis: Axis, dims: tuple[OutlierDim, ...]) -> None:
        layer = layer_of(tensor)
        if layer is None:
            return
        self.layers.setdefault(layer)
        for d in dims:
            self.hits[(axis, d.dim)].setdefault(layer, []).append(tensor)

    def result(self) -> tuple[RecurringDim, ...]:
        total = len(self.layers)
        found = []
        for (axis, dim), by_layer in self.hits.items():
            share = len(by_layer) / total
            if len(by_layer) >= 2 and share >= self.criteria.min_layer_share:
                tensors = tuple(t for names in by_layer.values() for t in names)
                found.append(RecurringDim(axis, dim, tuple(by_layer), share, tensors))
        return tuple(sorted(found, key=lambda r: (-len(r.layers), -len(r.tensors), AXES.index(r.axis), r.dim)))
