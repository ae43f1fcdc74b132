"""bnbcli: bit-exact bitsandbytes quantization formats and the ``bnb`` command line.

The public API is loaded on first use, so that ``import bnbcli`` (and the ``bnb`` command's start) does
not wait for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "dequantize_4bit": "bnbcli.api",
    "dequantize_blockwise8": "bnbcli.api",
    "dequantize_int8_rowwise": "bnbcli.api",
    "quantize_4bit": "bnbcli.api",
    "quantize_blockwise8": "bnbcli.api",
    "quantize_int8_rowwise": "bnbcli.api",
    "BnbError": "bnbcli.errors",
    "Blockwise8Quantized": "bnbcli.formats.blockwise8",
    "QuantState4bit": "bnbcli.formats.fourbit",
    "Int8Rowwise": "bnbcli.formats.int8",
}

__all__ = [
    "Blockwise8Quantized",
    "BnbError",
    "Int8Rowwise",
    "QuantState4bit",
    "__version__",
    "dequantize_4bit",
    "dequantize_blockwise8",
    "dequantize_int8_rowwise",
    "quantize_4bit",
    "quantize_blockwise8",
    "quantize_int8_rowwise",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnbcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


if TYPE_CHECKING:
    from bnbcli.api import (
        dequantize_4bit,
        dequantize_blockwise8,
        dequantize_int8_rowwise,
        quantize_4bit,
        quantize_blockwise8,
        quantize_int8_rowwise,
    )
    from bnbcli.errors import BnbError
    from bnbcli.formats.blockwise8 import Blockwise8Quantized
    from bnbcli.formats.fourbit import QuantState4bit
    from bnbcli.formats.int8 import Int8Rowwise
