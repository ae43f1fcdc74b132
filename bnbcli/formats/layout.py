"""The tensors a quantized weight becomes in a checkpoint, known from its shape alone.

The plan uses these layouts to size shards and headers before any data is read; the pipeline then
checks that what the formats produce matches them (``tests/unit/test_state_dict.py`` checks it too).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from bnbcli.formats.dtypes import FLOAT32, INT8, UINT8, DType, dtype_name

# The blocksizes the kernels take (plain numbers: the plan needs them before numpy or torch is imported).
FOUR_BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKWISE8_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization re-quantizes the 4-bit absmax with the dynamic map in blocks of 256.
NESTED_BLOCKSIZE = 256


def num_blocks(n: int, blocksize: int) -> int:
    """Blocks of ``blocksize`` elements that ``n`` elements fill, the last one maybe short."""
    return -(-n // blocksize)


class FormatSettings(Protocol):
    """What a scheme says about a weight's format (``plan.QuantScheme`` has these fields)."""

    @property
    def method(self) -> str: ...  # nf4, fp4, int8

    @property
    def blocksize(self) -> int: ...

    @property
    def double_quant(self) -> bool: ...

    @property
    def quant_storage(self) -> DType: ...


def entry_layouts(shape: tuple[int, ...], dtype: DType, settings: FormatSettings) -> tuple[EntryLayout, ...]:
    """The tensors a ``dtype`` weight of ``shape`` becomes: int8's (``Linear8bitLt``) or 4-bit's (``Linear4bit``)."""
    if settings.method == "int8":
        return layout_int8(shape)
    return layout_4bit(shape, dtype, settings.method, settings.blocksize, settings.double_quant, settings.quant_storage)


def format_label(settings: FormatSettings) -> str:
    """The format as the plan's "quantize as ..." names it."""
    if settings.method == "int8":
        return "int8 row-wise"
    return f"{settings.method}{'+dq' if settings.double_quant else ''} b{settings.blocksize}"


# The keys only a bitsandbytes checkpoint holds: a 4-bit weight's packed quant_state, an int8 weight's SCB.
QUANT_STATE_KEY = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<quant_type>nf4|fp4)$")
SCB_SUFFIX = ".SCB"


def quantized_keys(keys: Iterable[str]) -> list[str]:
    """The keys that mark a checkpoint as already quantized by bitsandbytes."""
    return [k for k in keys if QUANT_STATE_KEY.match(k) or k.endswith(SCB_SUFFIX)]


# The longest ``repr`` of a float32 value as a Python float ("-1.1754943508222875e-38" is 23
# characters): the one part of a 4-bit quant_state whose length is unknown before quantizing.
# The shortest is "0.0": a double-quantized weight's entry takes between the two.
MAX_FLOAT_REPR = 24
SHORTEST_FLOAT_REPR = len("0.0")


@dataclass(frozen=True)
class EntryLayout:
    """One tensor of the output. Its key is the weight's key plus ``suffix`` ("" for the weight itself),
    or, for a ``sibling`` (int8's SCB), the module's name plus "." plus ``suffix``."""

    suffix: str
    dtype: DType
    shape: tuple[int, ...]
    variable: bool = False  # its length (a JSON string) is known only after quantizing
    sibling: bool = False

    def key(self, weight_key: str) -> str:
        if self.sibling:
            return f"{weight_key.rsplit('.', 1)[0]}.{self.suffix}"
        return weight_key + self.suffix

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def quant_state_json_length(
    quant_type: str, blocksize: int, dtype: DType, shape: tuple[int, ...], double_quant: bool
) -> int:
    """Bytes of the packed quant_state JSON; with double quant, its upper bound."""
    state: dict[str, object] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
    }
    if double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.0)
        return len(json.dumps(state)) - SHORTEST_FLOAT_REPR + MAX_FLOAT_REPR
    return len(json.dumps(state))


@functools.lru_cache(maxsize=4096)  # an MoE checkpoint repeats a few shapes tens of thousands of times
def layout_4bit(
    shape: tuple[int, ...],
    dtype: DType,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_storage: DType = UINT8,
) -> tuple[EntryLayout, ...]:
    """The entries ``Linear4bit`` saves, in bitsandbytes' order (see QuantState4bit.state_dict)."""
    n = 1
    for d in shape:
        n *= d
    nb = num_blocks(n, blocksize)
    entries = [
        EntryLayout("", quant_storage, ((n + 1) // (2 * quant_storage.itemsize), 1)),
        EntryLayout(".absmax", UINT8 if double_quant else FLOAT32, (nb,)),
        EntryLayout(".quant_map", FLOAT32, (16,)),
    ]
    if double_quant:
        entries.append(EntryLayout(".nested_absmax", FLOAT32, (num_blocks(nb, NESTED_BLOCKSIZE),)))
        entries.append(EntryLayout(".nested_quant_map", FLOAT32, (256,)))
    json_len = quant_state_json_length(quant_type, blocksize, dtype, shape, double_quant)
    entries.append(EntryLayout(f".quant_state.bitsandbytes__{quant_type}", UINT8, (json_len,), variable=double_quant))
    return tuple(entries)


def layout_int8(shape: tuple[int, ...]) -> tuple[EntryLayout, ...]:
    """``Linear8bitLt`` keys: weight int8 [out, in], SCB float32 [out], weight_format uint8 0-d (row = 0).

    The SCB/weight_format keys sit beside ``weight`` in the module, so their suffixes replace it.
    """
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return (
        EntryLayout("", INT8, tuple(shape)),
        EntryLayout("SCB", FLOAT32, (rows,), sibling=True),
        EntryLayout("weight_format", UINT8, (), sibling=True),
    )
