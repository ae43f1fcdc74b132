"""Many small weights of one format through one CPU kernel call: for checkpoints of tens of thousands of
tiny tensors (MoE experts), where the fixed cost of a call (dozens of small torch ops, ~0.4 ms for a
quantize and dequantize) would otherwise be paid once per weight.

The bytes are those of one call per weight because every format computes each block (4-bit) or row
(int8) on its own. 4-bit weights are joined end to end with each one's tail block padded with zeros, as
the kernel pads it, so that no block holds two weights; int8 weights with the same row length are
stacked row after row. What belongs to a whole weight (a double quantization's mean and nested blocks)
is still computed per weight. ``tests/unit/test_batch.py`` checks joined against one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bnbcli.formats import fourbit, int8
from bnbcli.formats.blocks import quantize_blocks
from bnbcli.formats.dtypes import UINT8, is_float
from bnbcli.formats.layout import FOUR_BIT_BLOCKSIZES, FormatSettings, num_blocks

# Weights above this many elements go one by one: their own work already dwarfs a call's fixed cost.
SMALL_ELEMENTS = 1 << 16

Restored = tuple[Any, torch.Tensor]  # (the record, its dequantized values)


def joinable(weight: torch.Tensor, settings: FormatSettings) -> bool:
    """Whether ``quantize_restore_many`` takes ``weight``: a small float CPU tensor with elements, and
    settings its kernels accept. Anything else goes through the kernels alone (which refuse what they must)."""
    if not is_float(weight.dtype) or weight.device.type != "cpu" or not 0 < weight.numel() <= SMALL_ELEMENTS:
        return False
    if settings.method == "int8":
        return weight.dim() > 0
    # Another quant_storage may drop a weight's last packed bytes, which its dequantization reads as zeros.
    return (
        settings.method in fourbit.QUANT_TYPES
        and settings.blocksize in FOUR_BIT_BLOCKSIZES
        and settings.quant_storage == UINT8
    )


def quantize_restore_many(weights: Sequence[torch.Tensor], settings: FormatSettings) -> list[Restored]:
    """(record, restored) per weight, byte for byte what the CPU kernels' quantize then dequantize give
    for each weight alone. Every weight must be ``joinable``."""
    int8_method = settings.method == "int8"
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.dtype, w.shape[-1]) if int8_method else (w.dtype,), []).append(i)
    results: list[Restored | None] = [None] * len(weights)
    for indices in groups.values():
        group = [weights[i] for i in indices]
        done = _join_int8(group) if int8_method else _join_4bit(group, settings)
        for i, result in zip(indices, done, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _join_4bit(xs: list[torch.Tensor], settings: FormatSettings) -> list[Restored]:
    """Weights of one dtype: one quantize and one dequantize of them all, each padded to whole blocks."""
    bs, dtype = settings.blocksize, xs[0].dtype
    padding = torch.zeros(bs, dtype=dtype)
    pieces, starts, total = [], [], 0
    for x in xs:
        n = x.numel()
        starts.append(total)
        pieces.append(x.reshape(-1))
        if n % bs:
            pieces.append(padding[: bs - n % bs])
        total += num_blocks(n, bs) * bs
    packed, absmax = quantize_blocks(torch.cat(pieces), bs, fourbit.code_table(settings.method), pack=True)

    records = []
    for x, start in zip(xs, starts, strict=True):
        n, first = x.numel(), start // bs
        records.append(
            fourbit.make_record(
                packed[start // 2 : start // 2 + (n + 1) // 2].clone(),  # its own buffer, as one call gives
                absmax[first : first + num_blocks(n, bs)].clone(),
                tuple(x.shape),
                dtype,
                settings.method,
                bs,
                settings.double_quant,
                settings.quant_storage.torch_dtype,
            )
        )
    # Double quantization rounds each weight's scales through its own nested blocks and offset.
    scales = torch.cat([fourbit.block_scales(q) for q in records]) if settings.double_quant else absmax
    values = fourbit.dequantize_packed(packed, scales, total, settings.method, bs, dtype)
    return [
        (q, values[start : start + x.numel()].view(x.shape)) for q, x, start in zip(records, xs, starts, strict=True)
    ]


def _join_int8(xs: list[torch.Tensor]) -> list[Restored]:
    """Weights of one dtype and row length: their rows quantized and dequantized as one matrix."""
    rows = [x.reshape(-1, x.shape[-1]) for x in xs]
    joined = int8.quantize_int8_rowwise(torch.cat(rows))
    values = int8.dequantize_int8_rowwise(joined.CB, joined.SCB)
    out: list[Restored] = []
    start = 0
    for x, r in zip(xs, rows, strict=True):
        part = slice(start, start + r.shape[0])
        start = part.stop
        record = int8.Int8Rowwise(CB=joined.CB[part].reshape(x.shape).clone(), SCB=joined.SCB[part].clone())
        out.append((record, values[part].reshape(x.shape)))
    return out
