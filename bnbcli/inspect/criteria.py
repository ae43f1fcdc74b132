"""The outlier criteria of `bnb inspect` and their defaults, without torch (the command line shows them).
What each one means is in bnbcli/inspect/outliers.py."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FACTOR = 5.0
DEFAULT_VALUE_SIGMA = 10.0
DEFAULT_MIN_LAYER_SHARE = 0.25


@dataclass(frozen=True)
class OutlierCriteria:
    factor: float = DEFAULT_FACTOR
    value_sigma: float = DEFAULT_VALUE_SIGMA
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE

    def as_dict(self) -> dict[str, float]:
        return {"factor": self.factor, "value_sigma": self.value_sigma, "min_layer_share": self.min_layer_share}
