"""bnbcli: bit-exact bitsandbytes quantization formats and the ``bnb`` command line."""

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

__version__ = "0.1.0"

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
