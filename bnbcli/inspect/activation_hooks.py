"""The forward pre-hooks of `bnb inspect --activations`: per hooked module, counts of its input over all texts
(nothing of the activations themselves is kept), and per forward the positions where each dimension reached the
threshold."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnbcli.inspect.activation_report import ATTRIBUTION_CAP, THRESHOLD_GRID, TOP_TOKENS, LinearInput


class ModuleStats:
    """Counts for one hooked module's input, accumulated over calls."""

    def __init__(self, name: str, width: int) -> None:
        self.name = name
        self.width = width
        self.calls = 0
        self.positions = 0
        self.per_token = True  # every call had one row per token
        self.hits = np.zeros(width, dtype=np.int64)  # positions with |x_d| ≥ threshold
        self.peak = np.zeros(width, dtype=np.float64)  # max |x_d|
        self.rows_hit = 0  # positions with some |x| ≥ threshold
        self.cols_hit = 0  # Σ over calls: columns with some |x| ≥ threshold
        self.grid_cols = np.zeros(len(THRESHOLD_GRID), dtype=np.int64)  # the same at each grid value

    def as_input(self) -> LinearInput:
        seen = self.positions > 0
        return LinearInput(
            name=self.name,
            in_features=self.width,
            positions=self.positions,
            max_magnitude=float(self.peak.max()) if seen else 0.0,
            peak_dim=int(self.peak.argmax()) if seen else 0,
            outlier_position_share=self.rows_hit / self.positions if seen else 0.0,
            outlier_columns=int((self.hits > 0).sum()),
            decomposed_share=self.cols_hit / (self.calls * self.width) if self.calls else 0.0,
            per_token=self.per_token,
        )


class Recorder:
    """Forward pre-hooks that count; per forward, the positions where each dimension reached the threshold
    in some per-token module (one boolean [tokens, width] mask per input width)."""

    def __init__(self, threshold: float, device: torch.device) -> None:
        self.threshold = threshold
        self.modules: dict[str, ModuleStats] = {}
        self.mask: torch.Tensor | None = None  # [tokens] bool: the positions that count in this forward
        self.union: dict[int, torch.Tensor] = {}
        self.grid = torch.tensor(THRESHOLD_GRID, dtype=torch.float32, device=device)

    def hook(self, name: str, width: int) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and x.shape[-1] == width:
                self._record(name, width, x.detach())

        return pre_hook

    def _record(self, name: str, width: int, x: torch.Tensor) -> None:
        stats = self.modules.get(name)
        if stats is None:
            stats = self.modules[name] = ModuleStats(name, width)
        rows = x.reshape(-1, width)
        per_token = self.mask is not None and rows.shape[0] == self.mask.numel()
        if per_token:
            assert self.mask is not None
            rows = rows[self.mask]
        else:
            stats.per_token = False
        if rows.shape[0] == 0:
            return
        a = rows.abs().float()
        a = torch.where(torch.isnan(a), torch.zeros((), dtype=a.dtype, device=a.device), a)
        hit = a >= self.threshold
        colmax = a.amax(dim=0)
        stats.calls += 1
        stats.positions += rows.shape[0]
        stats.hits += hit.sum(dim=0).cpu().numpy()
        stats.peak = np.maximum(stats.peak, colmax.double().cpu().numpy())
        stats.rows_hit += int(hit.any(dim=1).sum())
        stats.cols_hit += int((colmax >= self.threshold).sum())
        stats.grid_cols += (colmax[None, :] >= self.grid[:, None]).sum(dim=1).cpu().numpy()
        if per_token:
            seen = self.union.get(width)
            self.union[width] = hit if seen is None else seen | hit


@dataclass
class Positions:
    """Per input width: the tokens at which each dimension reached the threshold in some per-token module,
    and (while the (dimension, token) pairs stay under ATTRIBUTION_CAP) which tokens those were."""

    hits: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)  # (width, dim) → token id → count
    pairs: int = 0
    attributed: bool = True

    def add(self, union: dict[int, torch.Tensor], ids: torch.Tensor) -> None:
        for width, mask in union.items():
            counts = mask.sum(dim=0).cpu().numpy().astype(np.int64)
            self.hits[width] = self.hits.get(width, np.zeros(width, dtype=np.int64)) + counts
            if not self.attributed:
                continue
            where = mask.nonzero().cpu().numpy()  # (position, dim)
            token_ids = ids.cpu().numpy()[where[:, 0]]
            pairs, n = np.unique(np.stack([where[:, 1], token_ids], axis=1), axis=0, return_counts=True)
            if self.pairs + len(pairs) > ATTRIBUTION_CAP:
                self.attributed, self.tokens = False, {}
                continue
            for (dim, token), count in zip(pairs.tolist(), n.tolist(), strict=True):
                by_token = self.tokens.setdefault((width, dim), {})
                self.pairs += token not in by_token
                by_token[token] = by_token.get(token, 0) + count

    def top(self, width: int, dim: int, decode: Any) -> tuple[tuple[str, int], ...]:
        found = sorted(self.tokens.get((width, dim), {}).items(), key=lambda tc: (-tc[1], tc[0]))
        return tuple((decode(token), count) for token, count in found[:TOP_TOKENS])


def hookable_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (torch.nn.Linear, Conv1D)
    except ImportError:
        return (torch.nn.Linear,)


def in_features(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])  # Conv1D stores [in, out]
