"""The quantized formats by family: the one table that says, for each, how a weight is quantized and restored,
which backend function runs it, and how its record goes to and from checkpoint tensors (which tensors a
weight becomes, known from its shape alone, is ``formats/layout.py``: planning needs no torch).

A *family* is a way bitsandbytes stores a weight: ``4bit`` (NF4/FP4, with or without double quantization;
``Linear4bit``) and ``int8`` (LLM.int8 row-wise; ``Linear8bitLt``). ``blockwise8`` (8-bit codes with the dynamic
map) has kernels but no checkpoint layout of its own: a checkpoint holds it as 4-bit double quantization's second
level. Each backend names its functions per family: the CPU reference here (``CPU_KERNELS``), the CUDA kernels in
``bnbcli.backends.cuda.KERNELS`` (same signatures, same records, same bytes). ``bnbcli.api``, the converter,
`bnb dequantize`, `bnb inspect` and the plan's layouts all go through this table, so a new family is one entry
here, its module in formats/ and its kernels in the backends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bnbcli.formats import blockwise8, fourbit, int8
from bnbcli.formats.layout import FormatSettings, layout_int8
from bnbcli.formats.metrics import Restore


@dataclass(frozen=True)
class Kernels:
    """One backend's functions for one family, with the CPU reference's signatures and records."""

    quantize: Callable[..., Any]
    dequantize: Callable[..., Any]
    # CUDA 4-bit only: quantize without waiting for the GPU; returns (record, the double-quant offset still on
    # the device, or None), and ``dequantize(record, offset)`` reads that offset (see backends/cuda.py).
    quantize_queued: Callable[..., tuple[Any, torch.Tensor | None]] | None = None
    # CPU 4-bit only: the record's restored values a block at a time, for the round-trip error (formats.metrics)
    restorer: Callable[[Any], Restore] | None = None


CPU_KERNELS = {
    "4bit": Kernels(fourbit.quantize_4bit, fourbit.dequantize_4bit, restorer=fourbit.restorer),
    "int8": Kernels(int8.quantize_int8_rowwise, int8.dequantize_int8_rowwise),
    "blockwise8": Kernels(blockwise8.quantize_blockwise8, blockwise8.dequantize_blockwise8),
}


def kernels(family: str, backend: str) -> Kernels:
    """``family``'s functions on ``backend`` ("cpu" or "cuda"; ``backends.resolve_backend`` says which can run)."""
    if backend == "cpu":
        return CPU_KERNELS[family]
    from bnbcli.backends import cuda  # CuPy is optional: the CUDA backend is imported when first asked for

    return cuda.KERNELS[family]


@dataclass(frozen=True)
class Family:
    """A format a checkpoint holds: the scheme methods it serves, and how its record goes to and from the
    tensors a weight becomes (``formats.layout.entry_layouts``)."""

    name: str  # the key of the kernels, and the ``kind`` a dequantize plan records
    methods: tuple[str, ...]
    record: type  # what its quantize returns
    quantize_args: Callable[[FormatSettings], tuple[Any, ...]]  # after the weight
    dequantize_args: Callable[[Any], tuple[Any, ...]]  # of a record
    entries: Callable[[Any, str], dict[str, torch.Tensor]]  # record, weight key → checkpoint tensors, in order
    from_entries: Callable[[Sequence[torch.Tensor], str | None], Any]  # the tensors (and quant_state JSON) → record

    def kernels(self, backend: str) -> Kernels:
        return kernels(self.name, backend)


def _four_bit_from_entries(parts: Sequence[torch.Tensor], state_json: str | None) -> fourbit.QuantState4bit:
    """The record of weight, absmax, quant_map[, nested_absmax, nested_quant_map] and its quant_state JSON."""
    assert state_json is not None
    state = json.loads(state_json)
    nested = len(parts) == 5
    return fourbit.QuantState4bit(
        packed=parts[0],
        absmax=parts[1],
        quant_map=parts[2],
        blocksize=state["blocksize"],
        shape=tuple(state["shape"]),
        dtype=getattr(torch, state["dtype"]),
        quant_type=state["quant_type"],
        nested_absmax=parts[3] if nested else None,
        nested_quant_map=parts[4] if nested else None,
        nested_offset=float(state["nested_offset"]) if nested else None,
    )


def _int8_entries(q: int8.Int8Rowwise, key: str) -> dict[str, torch.Tensor]:
    values = (q.CB, q.SCB, torch.tensor(int8.WEIGHT_FORMAT_ROW, dtype=torch.uint8))
    return {e.key(key): v for e, v in zip(layout_int8(tuple(q.CB.shape)), values, strict=True)}


FOUR_BIT = Family(
    name="4bit",
    methods=fourbit.QUANT_TYPES,
    record=fourbit.QuantState4bit,
    quantize_args=lambda f: (f.method, f.blocksize, f.double_quant, f.quant_storage.torch_dtype),
    dequantize_args=lambda q: (q,),
    entries=lambda q, key: q.state_dict(key),
    from_entries=_four_bit_from_entries,
)
INT8 = Family(
    name="int8",
    methods=("int8",),
    record=int8.Int8Rowwise,
    quantize_args=lambda f: (),  # no threshold: a weight is stored without outlier columns
    dequantize_args=lambda q: (q.CB, q.SCB),
    entries=_int8_entries,
    from_entries=lambda parts, state_json: int8.Int8Rowwise(CB=parts[0], SCB=parts[1]),
)
FAMILIES = {f.name: f for f in (FOUR_BIT, INT8)}


def family_of(method: str) -> Family:
    """The family of a scheme method: nf4 and fp4 are 4bit, int8 is int8."""
    return next(f for f in FAMILIES.values() if method in f.methods)


def family_of_record(record: object) -> Family:
    return next(f for f in FAMILIES.values() if isinstance(record, f.record))
