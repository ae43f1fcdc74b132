"""The dtype a model loads in — one rule for `bnb quantize` (its bnb_4bit_compute_dtype), `bnb dequantize`
(int8 weights come back in it, as transformers' dequantize gives them) and `bnb footprint` (what
from_pretrained loads)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from bnbcli.formats.dtypes import BY_NAME, FLOAT32, FLOAT_DTYPES, DType


def config_dtype(config: Mapping[str, Any] | None) -> DType | None:
    """config.json's dtype (transformers v5 writes `dtype`, v4 `torch_dtype`), when it names one of the
    float dtypes a model is quantized from."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        dtype = BY_NAME.get(value) if isinstance(value, str) else None
        if dtype in FLOAT_DTYPES:
            return dtype
    return None


def model_dtype(
    config: Mapping[str, Any] | None, tensor_dtypes: Iterable[DType], override: DType | None = None
) -> DType:
    """``override`` (--dtype), else config.json's dtype, else the most common of float16, bfloat16 and
    float32 among ``tensor_dtypes`` (a tie goes to the one met first, so the caller's order decides),
    else float32."""
    if override is not None:
        return override
    named = config_dtype(config)
    if named is not None:
        return named
    counts = Counter(dtype for dtype in tensor_dtypes if dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else FLOAT32
