"""Block math shared by every blockwise format: absmax per block, scaling, code lookup, nibble packing.

Mirrors the structure of bitsandbytes' ``kQuantizeBlockwise`` (csrc/kernels.cu): the tensor is flattened
row-major and cut into blocks of ``blocksize`` consecutive elements (blocks run across rows); each
block is scaled by the approximate reciprocal of its absmax and every scaled value is mapped to a code
by comparing it with fixed float32 thresholds.
"""

from __future__ import annotations

import numpy as np
import torch

from bnbcli.formats.gpu_math import flush_subnormals, gpu_nan, rcp_approx

_FLT_MAX = float(np.finfo(np.float32).max)


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def to_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [nb, blocksize] view of x flattened; the tail block is padded with zeros, as the kernel
    loads out-of-range elements as 0."""
    flat = x.reshape(-1)
    if x.dtype != torch.float16:
        # fp32/bf16 can hold float32 subnormals, which the ftz kernel reads as zero; fp16 cannot.
        flat = flush_subnormals(flat.to(torch.float32))
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    blocks = torch.zeros(nb * blocksize, dtype=torch.float32)
    blocks[:n] = flat
    return blocks.view(nb, blocksize)


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """float32 [nb]: max |x| per block with ``fmaxf`` semantics, so NaN never wins.

    The kernel starts each thread from -FLT_MAX, so a full block holding only NaN ends at -FLT_MAX;
    a tail block also sees its zero padding.
    """
    absmax = blocks.abs().amax(dim=1)
    nan_blocks = torch.isnan(absmax)
    if bool(nan_blocks.any()):
        rows = blocks[nan_blocks].abs()
        fixed = torch.where(torch.isnan(rows), float("-inf"), rows).amax(dim=1)
        absmax[nan_blocks] = fixed.clamp(min=-_FLT_MAX)
    return absmax


def scale_blocks(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x * rcp.approx(absmax): multiply by the kernel's approximate reciprocal, never divide.

    An all-zero block gives rcp(0) = inf and 0 * inf = NaN, which every code table maps to code 0.
    Subnormal products are *not* flushed here: only FP4's sign bit can see the difference, and
    ``encode`` handles it there.
    """
    return blocks * rcp_approx(absmax)[:, None]


def encode(scaled: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """uint8 codes: the number of thresholds strictly below each value; NaN gets code 0.

    Every kernel decision rule here (the NF4 tree, the FP4 magnitude tree, the dynamic-map binary
    search) reduces to this count against a suitable sorted float32 table.
    """
    codes = torch.bucketize(scaled, thresholds, right=False).to(torch.uint8)
    return codes.masked_fill_(torch.isnan(scaled), 0)


def pack_nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [(n+1)//2]: element 2j in the high nibble, 2j+1 in the low one. For odd n the last low
    nibble is the code of the padding zero, as the kernel writes it."""
    flat = codes.reshape(-1)[: 2 * ((n + 1) // 2)].view(-1, 2)
    return (flat[:, 0] << 4) | flat[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [n] codes from packed bytes (the inverse of ``pack_nibbles``)."""
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n]


def expand_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 values[i] * scale[i // blocksize] with the kernel's ftz multiply."""
    n = values.numel()
    nb = scale.numel()
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = values
    return gpu_nan(flush_subnormals(padded.view(nb, blocksize) * scale[:, None])).reshape(-1)[:n]
