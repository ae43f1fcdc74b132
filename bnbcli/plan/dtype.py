"""The dtype a model loads in — one rule for `bnb quantize` (its bnb_4bit_compute_dtype), `bnb dequantize`
(int8 weights come back in it, as transformers' dequantize gives them) and `bnb footprint` (what
from_pretrained loads)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bnbcli.plan.scheme import FLOAT_DTYPES


def config_dtype(config: Mapping[str, Any] | None) -> torch.dtype | None:
    """config.json's dtype (transformers v5 writes `dtype`, v4 `torch_dtype`), when it names one of the
    float dtypes a model is quantized from."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        if dtype in FLOAT_DTYPES:
            return dtype
    return None


def model_dtype(
    config: Mapping[str, Any] | None, tensor_dtypes: Iterable[torch.dtype], override: torch.dtype | None = None
) -> torch.dtype:
    """``override`` (--dtype), else config.json's dtype, else the most common of float16, bfloat16 and
    float32 among ``tensor_dtypes`` (a tie goes to the one met first, so the caller's order decides),
    else float32."""
    if override is not None:
        return override
    named = config_dtype(config)
    if named is not None:
        return named
    counts = Counter(dtype for dtype in tensor_dtypes if dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else torch.float32
