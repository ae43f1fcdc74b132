"""bnb's dtypes, without torch: what a header, a plan and a layout say of a tensor's type.

Planning needs a dtype's name, its safetensors code and its size, and nothing of torch, so opening a
checkpoint and planning it import no torch (`bnb quantize` writes its first bytes while torch imports).
Code that computes on tensors converts at its boundary: ``DType.torch_dtype`` one way, ``DType.of`` the other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bnbcli.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # as torch spells it: "bfloat16" (config.json, a quant_state's JSON and bnb's reports say so too)
    code: str  # as a safetensors header spells it: "BF16"
    itemsize: int  # bytes per element
    is_floating_point: bool

    def __repr__(self) -> str:
        # torch's own spelling: a message or a note reads the same whether it got a DType or a torch.dtype
        return f"torch.{self.name}"

    __str__ = __repr__

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch.dtype (imports torch). The table lists every safetensors dtype; an older torch (bnb
        accepts 2.2) lacks some (float8_e8m0fnu came in 2.7, uint16-64 in 2.3): refused as input here."""
        import torch

        dtype = getattr(torch, self.name, None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(
                f"a {self.code} tensor needs a torch with {self.name}; this one is {torch.__version__}",
                hint="upgrade torch (pip install -U torch), or store the tensor in another dtype",
            )
        return dtype

    @staticmethod
    def of(dtype: torch.dtype | DType) -> DType:
        """The DType of a torch.dtype (an unknown one is an error of the caller: a KeyError)."""
        return dtype if isinstance(dtype, DType) else BY_NAME[dtype_name(dtype)]


def as_dtype(value: object) -> DType | None:
    """The DType that ``value`` is, a DType or a torch.dtype; None for anything else. (Without torch
    imported there is no torch.dtype to meet, so this never imports it.)"""
    if isinstance(value, DType):
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        return BY_NAME.get(dtype_name(value))
    return None


# safetensors' table (its Dtype enum), less the sub-byte types bnb does not read.
ALL: tuple[DType, ...] = (
    DType("float64", "F64", 8, True),
    DType("float32", "F32", 4, True),
    DType("float16", "F16", 2, True),
    DType("bfloat16", "BF16", 2, True),
    DType("int64", "I64", 8, False),
    DType("int32", "I32", 4, False),
    DType("int16", "I16", 2, False),
    DType("int8", "I8", 1, False),
    DType("uint8", "U8", 1, False),
    DType("bool", "BOOL", 1, False),
    DType("float8_e4m3fn", "F8_E4M3", 1, True),
    DType("float8_e5m2", "F8_E5M2", 1, True),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, True),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, True),
    DType("float8_e8m0fnu", "F8_E8M0", 1, True),
    DType("uint16", "U16", 2, False),
    DType("uint32", "U32", 4, False),
    DType("uint64", "U64", 8, False),
    DType("complex64", "C64", 8, False),
)
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
BY_CODE: dict[str, DType] = {d.code: d for d in ALL}  # as safetensors spells them (sub-byte kinds such as F4: none)

FLOAT64, FLOAT32, FLOAT16, BFLOAT16 = BY_NAME["float64"], BY_NAME["float32"], BY_NAME["float16"], BY_NAME["bfloat16"]
INT8, UINT8, INT16 = BY_NAME["int8"], BY_NAME["uint8"], BY_NAME["int16"]

# bitsandbytes' 4-bit kernels read fp16/bf16/fp32 and Linear4bit computes in one of them
# (`_ops.py` dequantize_4bit checks `dtype in (float16, bfloat16, float32)`); int8 quantizes the same.
FLOAT_DTYPES: tuple[DType, ...] = (FLOAT16, BFLOAT16, FLOAT32)


def dtype_name(dtype: torch.dtype | DType) -> str:
    """'bfloat16' for torch.bfloat16 or BFLOAT16: the spelling of config.json, a quant_state's JSON and bnb's
    reports."""
    return str(dtype).removeprefix("torch.")


def is_float(dtype: torch.dtype | DType) -> bool:
    """One of FLOAT_DTYPES: what bitsandbytes quantizes."""
    return BY_NAME.get(dtype_name(dtype)) in FLOAT_DTYPES
