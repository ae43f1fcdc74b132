"""What `bnb inspect --activations` reports, and the parameters of its method (bnbcli/inspect/activations.py
says how they are measured and applied)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnbcli.errors import UsageError
from bnbcli.inspect.report import finite

MAX_TOKENS = 512  # per text; longer texts are truncated
DECOMPOSITION_BUDGET = 0.01  # the share of input columns in 16-bit the suggested threshold allows
SPIKE_FACTOR = 10.0  # a module's max |x| over its peers' median max |x|: a spike
NEAR_MISSES = 10  # dimensions listed that reach the threshold but miss a criterion
TOP_TOKENS = 3  # tokens listed per dimension
ATTRIBUTION_CAP = 200_000  # distinct (dimension, token) pairs counted before token attribution stops
_STEPS = tuple(1.0 + 0.5 * i for i in range(11))  # 1.0, 1.5, …, 6.0
THRESHOLD_GRID = (*_STEPS, 7.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 256.0, 512.0, 1024.0)


@dataclass(frozen=True)
class ActivationCriteria:
    threshold: float = 6.0  # |activation| ≥ this (LLM.int8's default llm_int8_threshold)
    min_layer_share: float = 0.25  # the dimension reaches it in ≥ 25% of the layers (transformer layers)
    min_position_share: float = 0.06  # ... and at ≥ 6% of the tokens, in one of them or another (module docstring)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise UsageError(f"--activation-threshold must be above 0, not {self.threshold}", hint="6.0 is the default")
        if not (0 <= self.min_layer_share <= 1 and 0 <= self.min_position_share <= 1):
            raise UsageError("the activation criteria's shares must be within [0, 1]", hint="0.25 and 0.06 by default")

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "min_layer_share": self.min_layer_share,
            "min_position_share": self.min_position_share,
        }


@dataclass(frozen=True)
class ActivationOutlierDim:
    dim: int
    layer_count: int  # transformer layers where |x_dim| ≥ threshold at some position, in an input of its width
    layer_share: float  # of the layers with inputs of its width
    position_share: float  # of all tokens: |x_dim| ≥ threshold in at least one module of its width
    max_magnitude: float  # max |x_dim| over those modules and all tokens
    layers: tuple[str, ...]  # the layers' module names (model.layers.7)
    modules: tuple[str, ...] = ()  # the Linear modules where |x_dim| ≥ threshold
    top_tokens: tuple[tuple[str, int], ...] = ()  # (token, positions) where it reaches the threshold, most first

    def as_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "layer_count": self.layer_count,
            "layer_share": self.layer_share,
            "position_share": self.position_share,
            "max_magnitude": finite(self.max_magnitude),
            "layers": list(self.layers),
            "module_count": len(self.modules),
            "modules": list(self.modules),
            "top_tokens": [[token, count] for token, count in self.top_tokens],
        }


@dataclass(frozen=True)
class LinearInput:
    """One hooked module's input over all texts."""

    name: str
    in_features: int
    positions: int  # input rows seen (tokens, for a module with a row per token)
    max_magnitude: float  # max |x|
    peak_dim: int  # the dimension of max |x|
    outlier_position_share: float  # rows with some |x| ≥ threshold
    outlier_columns: int  # dimensions with |x| ≥ threshold somewhere
    decomposed_share: float  # input columns per forward with |x| ≥ threshold (what LLM.int8 runs in 16-bit)
    per_token: bool  # one input row per token (in the outlier criterion when hidden-width)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_features": self.in_features,
            "positions": self.positions,
            "max_magnitude": finite(self.max_magnitude),
            "peak_dim": self.peak_dim,
            "outlier_position_share": self.outlier_position_share,
            "outlier_columns": self.outlier_columns,
            "decomposed_share": self.decomposed_share,
            "per_token": self.per_token,
        }


@dataclass(frozen=True)
class WidthGroup:
    """The outlier criterion among the modules of an input width other than the hidden size."""

    in_features: int
    layers: int
    modules: int
    outlier_dims: tuple[ActivationOutlierDim, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "layers": self.layers,
            "modules": self.modules,
            "outlier_dims": [d.as_dict() for d in self.outlier_dims],
        }


@dataclass(frozen=True)
class ActivationReport:
    model_class: str
    tokens: int  # all positions of all texts (special tokens included; nothing padded)
    linear_layers: int  # hooked Linear modules that ran
    criteria: ActivationCriteria
    outlier_dims: tuple[ActivationOutlierDim, ...]  # in the hidden size, most layers first
    suggested_threshold: float
    suggested_skip_modules: tuple[str, ...]
    texts: int = 0
    truncated: int = 0  # texts cut at MAX_TOKENS
    hidden_size: int = 0
    hidden_layers: tuple[str, ...] = ()  # the layers the criterion counts (model.layers.7, lm_head)
    hidden_modules: tuple[str, ...] = ()  # their hidden-width Linear modules with a row per token
    near_misses: tuple[ActivationOutlierDim, ...] = ()
    other_widths: tuple[WidthGroup, ...] = ()
    inputs: tuple[LinearInput, ...] = ()
    decomposed_share: float = 0.0  # at criteria.threshold, over the modules that stay int8
    suggested_decomposed_share: float = 0.0  # at the suggested threshold
    skip_reasons: tuple[str, ...] = ()  # one per suggested skip module
    device: str = "cpu"
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "device": self.device,
            "dtype": self.dtype,
            "texts": self.texts,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "linear_layers": self.linear_layers,
            "hidden_size": self.hidden_size,
            "hidden_layers": list(self.hidden_layers),
            "hidden_modules": list(self.hidden_modules),
            "criteria": self.criteria.as_dict(),
            "outlier_dims": [d.as_dict() for d in self.outlier_dims],
            "near_misses": [d.as_dict() for d in self.near_misses],
            "other_widths": [g.as_dict() for g in self.other_widths],
            "suggested_threshold": self.suggested_threshold,
            "decomposed_share": self.decomposed_share,
            "suggested_decomposed_share": self.suggested_decomposed_share,
            "suggested_skip_modules": list(self.suggested_skip_modules),
            "skip_reasons": list(self.skip_reasons),
            "inputs": [i.as_dict() for i in self.inputs],
            "method": {
                "threshold_grid": list(THRESHOLD_GRID),
                "decomposition_budget": DECOMPOSITION_BUDGET,
                "spike_factor": SPIKE_FACTOR,
                "max_tokens": MAX_TOKENS,
            },
        }
