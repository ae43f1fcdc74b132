"""Block math shared by every blockwise format: absmax per block, scaling, code lookup, nibble packing.

Mirrors the structure of bitsandbytes' ``kQuantizeBlockwise`` (csrc/kernels.cu): the tensor is flattened
row-major and cut into blocks of ``blocksize`` consecutive elements (blocks run across rows); each
block is scaled by the approximate reciprocal of its absmax and every scaled value is mapped to a code
by comparing it with fixed float32 thresholds.

Two implementations give the same bytes:

* the reference, ``reference_quantize_blocks`` (``to_blocks``, ``block_absmax``, ``scale_blocks``, an
  encoder): a few whole-tensor torch expressions that read like the kernel. It is the specification.
* ``quantize_blocks``, several times faster: it takes the reference's arithmetic for granted on the
  "ordinary" blocks (finite, absmax a normal float32, no float32 subnormal inside; nearly every block
  of a real weight), walks them in cache-sized chunks and encodes with a ``CodeTable`` derived from the
  reference encoder. Every other block, and the partial tail block, goes through the reference.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bnbcli.formats import parts
from bnbcli.formats.codes import FLT_MAX, FLT_MIN
from bnbcli.formats.gpu_math import flush_subnormals, gpu_nan, rcp_approx
from bnbcli.formats.layout import num_blocks

# An encoder maps float32 scaled values to uint8 codes (any shape): the kernel's decision rule.
Encoder = Callable[[torch.Tensor], torch.Tensor]

# Elements per chunk of the fast path: its float32 working buffers stay within a core's L2 cache, and
# each chunk is big enough for torch to split every op over its intra-op threads.
CHUNK_ELEMENTS = 1 << 18


# --------------------------------------------------------------------------------------------------
# The reference


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
        absmax[nan_blocks] = fixed.clamp(min=-float(FLT_MAX))
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
    # numpy's binary search, not torch.bucketize: the same count (side="left" is right=False), but
    # bucketize splits even a few hundred values over torch's threads, and on a busy machine the
    # barrier that ends it costs milliseconds (19 ms for one double-quant absmax block at load 160).
    found = np.searchsorted(thresholds.numpy(), scaled.numpy(), side="left")
    codes = torch.from_numpy(np.asarray(found, dtype=np.uint8))
    return codes.masked_fill_(torch.isnan(scaled), 0)


def pack_nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [(n+1)//2]: element 2j in the high nibble, 2j+1 in the low one. For odd n the last low
    nibble is the code of the padding zero, as the kernel writes it."""
    flat = codes.reshape(-1)[: 2 * ((n + 1) // 2)].view(-1, 2)
    return (flat[:, 0] << 4) | flat[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [n] codes from packed bytes (the inverse of ``pack_nibbles``)."""
    codes = torch.empty(2 * packed.numel(), dtype=torch.uint8)
    unpack_nibbles_into(packed, codes)
    return codes[:n]


def unpack_nibbles_into(packed: torch.Tensor, out: torch.Tensor) -> None:
    """The codes of packed bytes into ``out[: 2 * packed.numel()]``, which may be any integer dtype (an int32
    ``out`` takes them without a uint8 copy first)."""
    flat = packed.reshape(-1)
    pairs = out[: 2 * flat.numel()].view(-1, 2)
    torch.bitwise_right_shift(flat, 4, out=pairs[:, 0])
    torch.bitwise_and(flat, 0xF, out=pairs[:, 1])


def reference_quantize_blocks(
    x: torch.Tensor, blocksize: int, encoder: Encoder, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of x flattened (nibble-packed if ``pack``) and float32 absmax [nb]."""
    n = x.numel()
    blocks = to_blocks(x, blocksize)
    absmax = block_absmax(blocks)
    codes = encoder(scale_blocks(blocks, absmax))
    return (pack_nibbles(codes, n) if pack else codes.reshape(-1)[:n]), absmax


# --------------------------------------------------------------------------------------------------
# The fast path


@dataclass(frozen=True)
class CodeTable:
    """An encoder tabulated on the high 16 bits of the float32 value (sign, exponent, 7 mantissa bits),
    so that one lookup per element encodes it exactly.

    In ascending value order the encoder is a staircase: its code changes at fixed thresholds and never
    comes back (every kernel rule is monotone in |s| on each sign). Number its intervals 0, 1, ...;
    each 16-bit bucket holds at most one threshold (checked when the table is built). Within bucket b
    the 16 low bits give a value's rank (ascending value; they run backwards on the negative side), and
    ``v = bits ^ (bits >> 31)`` is exactly (h << 16) | rank, with h = b for positive buckets and
    0xFFFF - b for negative ones. ``offset[b]`` is (first interval of b) << 16, plus 0xFFFF - (rank of
    the bucket's threshold) if it has one, so that ranks above the threshold carry into the next
    interval, minus h << 16. Byte 2 of ``offset[b] + v`` is then the interval of the value, which
    ``codes`` maps to the code (None: the interval is the code, as for NF4 and the dynamic map).
    """

    encoder: Encoder  # the reference rule, which the fast path falls back to
    offset: torch.Tensor  # int32 [65536]
    codes: torch.Tensor | None  # uint8 [intervals]

    @staticmethod
    def build(encoder: Encoder) -> CodeTable:
        """Tabulate ``encoder`` (uint8 codes of a float32 tensor) on every finite float32; inf/NaN
        buckets are left out, as the fast path never produces those values."""
        bucket = np.arange(1 << 16, dtype=np.int64)
        negative = bucket >= 0x8000
        finite = (bucket & 0x7F80) != 0x7F80

        def value(b: np.ndarray, rank: np.ndarray) -> torch.Tensor:
            low = np.where(b >= 0x8000, 0xFFFF - rank, rank)
            return torch.from_numpy(((b << 16) | low).astype(np.uint32).view(np.float32))

        def code(b: np.ndarray, rank: np.ndarray) -> np.ndarray:
            return encoder(value(b, rank)).numpy().astype(np.int64)

        # Finite buckets in ascending value order, and the codes at both ends of each.
        order = np.concatenate((bucket[negative & finite][::-1], bucket[~negative & finite]))
        first = code(order, np.zeros_like(order))
        last = code(order, np.full_like(order, 0xFFFF))

        # Bisect the buckets whose ends differ for the rank of the last value keeping the first code.
        stepped = np.nonzero(first != last)[0]
        lo = np.zeros_like(stepped)
        hi = np.full_like(stepped, 0xFFFF)
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            same = code(order[stepped], mid) == first[stepped]
            lo = np.where(same, mid, lo)
            hi = np.where(same, hi, mid)
        # The value right after the threshold already has the bucket's last code: no middle code.
        assert np.array_equal(code(order[stepped], hi), last[stepped]), "a bucket holds two thresholds"

        # Intervals: the code sequence first, last, first, last, ... changes at each threshold.
        sequence = np.stack((first, last), axis=1).reshape(-1)
        interval = np.concatenate(([0], np.cumsum(sequence[1:] != sequence[:-1])))
        assert interval[-1] <= 255, "interval numbers must fit in one byte"
        interval_codes = np.zeros(256, dtype=np.uint8)  # every byte is an index: unusual blocks make garbage
        interval_codes[interval] = sequence

        carry = np.zeros_like(order)
        carry[stepped] = 0xFFFF - lo
        h = np.where(order >= 0x8000, 0xFFFF - order, order)
        offset = np.zeros(1 << 16, dtype=np.int64)
        offset[order] = (interval[0::2] << 16) + carry - (h << 16)
        identity = np.array_equal(interval_codes[: interval[-1] + 1], np.arange(interval[-1] + 1))
        return CodeTable(
            encoder=encoder,
            offset=torch.from_numpy(offset.astype(np.int32)),
            codes=None if identity else torch.from_numpy(interval_codes),
        )

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """uint8 codes of any finite float32 tensor (``encode_into`` with fresh buffers)."""
        flat = scaled.contiguous().reshape(-1)
        out = torch.empty(flat.numel(), dtype=torch.uint8)
        self.encode_into(flat, out, _Scratch(flat.numel(), torch.int16))
        return out.view(scaled.shape)

    def encode_into(self, scaled: torch.Tensor, out: torch.Tensor, scratch: _Scratch) -> None:
        """uint8 codes of the finite float32 ``scaled`` (contiguous, [e]) written to ``out`` [e]."""
        e = scaled.numel()
        bits = scaled.view(torch.int32)
        v = torch.bitwise_right_shift(bits, 31, out=scratch.v[:e]).bitwise_xor_(bits)
        # The bucket is the high half of each float32, as an unsigned 16-bit number.
        bucket = torch.bitwise_right_shift(bits, 16, out=scratch.bucket[:e]).bitwise_and_(0xFFFF)
        total = torch.index_select(self.offset, 0, bucket, out=scratch.total[:e]).add_(v)
        interval = total.bitwise_right_shift_(16)  # byte 2 of total is now its low byte
        if self.codes is None:
            out.copy_(interval)  # int32 to uint8 keeps the low byte
        else:
            torch.index_select(self.codes, 0, interval.bitwise_and_(0xFF), out=out)


assert sys.byteorder == "little", "the nibble packing reads pairs of uint8 codes as int16 values"


class _Scratch:
    """Working buffers of one chunk, reused for every chunk (fresh large tensors cost page faults)."""

    def __init__(self, elements: int, bits_dtype: torch.dtype) -> None:
        self.bits = torch.empty(elements, dtype=bits_dtype)
        self.scaled = torch.empty(elements, dtype=torch.float32)
        self.v = torch.empty(elements, dtype=torch.int32)
        self.bucket = torch.empty(elements, dtype=torch.int32)
        self.total = torch.empty(elements, dtype=torch.int32)
        self.codes = torch.empty(elements, dtype=torch.uint8)
        self.pairs = torch.empty(elements // 2, dtype=torch.int16)


# Per input dtype: the integer type of the same width and its magnitude mask (the bits without the
# sign); for dtypes that can hold float32 subnormals, the bit pattern of the smallest normal float32.
BITS = {
    torch.float16: (torch.int16, 0x7FFF, None),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x0080),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x00800000),
}


def _ordinary_absmax(body: torch.Tensor, scratch: _Scratch, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 absmax [nb] of full blocks ``body`` [nb, bs], and which blocks are ordinary.

    Works on the raw bits: for |x| the magnitude bits order like the values, so the block max of the
    bits is the absmax exactly (and any NaN shows up as a NaN absmax). A block holds a float32
    subnormal iff its smallest nonzero magnitude is below the smallest normal.
    """
    bits_dtype, mask, min_normal = BITS[body.dtype]
    bits = body.view(bits_dtype)
    nb, bs = bits.shape
    max_bits = torch.empty(nb, dtype=bits_dtype)
    min_nonzero = torch.empty(nb, dtype=bits_dtype)
    for b0 in range(0, nb, rows):
        chunk = bits[b0 : b0 + rows]
        k = chunk.shape[0]
        magnitude = torch.bitwise_and(chunk, mask, out=scratch.bits[: k * bs].view(k, bs))
        torch.amax(magnitude, dim=1, out=max_bits[b0 : b0 + k])
        if min_normal is not None:
            # (m - 1) & mask sends 0 to the largest value, so the min skips zeros.
            magnitude.sub_(1).bitwise_and_(mask)
            torch.amin(magnitude, dim=1, out=min_nonzero[b0 : b0 + k])
    absmax = max_bits.view(body.dtype).to(torch.float32)
    ordinary = (absmax >= float(FLT_MIN)) & (absmax <= float(FLT_MAX))
    if min_normal is not None:
        ordinary &= min_nonzero >= min_normal - 1
    return absmax, ordinary


def _quantize_ordinary(
    body: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor, ordinary: torch.Tensor, table: CodeTable, pack: bool
) -> None:
    """Full blocks ``body`` [nb, bs] into ``out`` [nb, bs or bs/2], ``absmax`` [nb] and ``ordinary``
    [nb], chunk by chunk, assuming every block is ordinary; the caller redoes the others."""
    nb, blocksize = body.shape
    rows = max(1, CHUNK_ELEMENTS // blocksize)
    scratch = _Scratch(min(rows, nb) * blocksize, BITS[body.dtype][0])
    absmax[:], ordinary[:] = _ordinary_absmax(body, scratch, rows)
    scale = rcp_approx(absmax)
    for b0 in range(0, nb, rows):
        chunk = body[b0 : b0 + rows]
        e = chunk.numel()
        # Exactly scale_blocks: x widens to float32 exactly, then a float32 multiply.
        scaled = scratch.scaled[:e].view(chunk.shape).copy_(chunk).mul_(scale[b0 : b0 + rows, None])
        if not pack:
            table.encode_into(scaled.view(-1), out[b0 : b0 + rows].view(-1), scratch)
            continue
        table.encode_into(scaled.view(-1), scratch.codes[:e], scratch)
        # Nibble packing on int16 pairs (little-endian: the first code is the low byte):
        # (pair << 4) | (pair >> 8) has (first << 4) | second in its low byte.
        pairs = scratch.codes[:e].view(torch.int16)
        packed = torch.bitwise_left_shift(pairs, 4, out=scratch.pairs[: e // 2]).bitwise_or_(pairs >> 8)
        out[b0 : b0 + rows].view(-1).copy_(packed.view(torch.uint8)[0::2])


def quantize_blocks(
    x: torch.Tensor, blocksize: int, table: CodeTable, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_quantize_blocks(x, blocksize, table.encoder, pack)``, byte for byte, faster."""
    encoder = table.encoder
    if x.dtype not in BITS or x.numel() < blocksize:
        return reference_quantize_blocks(x, blocksize, encoder, pack)
    flat = x.reshape(-1)
    n = flat.numel()
    nfull = n // blocksize
    per_block = blocksize // 2 if pack else blocksize
    codes = torch.empty((n + 1) // 2 if pack else n, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32)
    ordinary = torch.empty(nfull, dtype=torch.bool)

    body = flat[: nfull * blocksize].view(nfull, blocksize)
    out = codes[: nfull * per_block].view(nfull, per_block)

    def blocks(start: int, stop: int) -> None:
        part = slice(start, stop)
        _quantize_ordinary(body[part], out[part], absmax[part], ordinary[part], table, pack)

    parts.for_each_part(blocks, nfull, max(1, CHUNK_ELEMENTS // blocksize))

    unusual = torch.nonzero(~ordinary).reshape(-1)
    if unusual.numel():
        redo_codes, redo_absmax = reference_quantize_blocks(body[unusual], blocksize, encoder, pack)
        out[unusual] = redo_codes.view(-1, per_block)
        absmax[unusual] = redo_absmax
    if nfull * blocksize < n:
        tail_codes, tail_absmax = reference_quantize_blocks(flat[nfull * blocksize :], blocksize, encoder, pack)
        codes[nfull * per_block :] = tail_codes
        absmax[nfull:] = tail_absmax
    return codes, absmax


def expand_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 values[i] * scale[i // blocksize] with the kernel's ftz multiply."""
    n = values.numel()
    nb = scale.numel()
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = values
    return gpu_nan(flush_subnormals(padded.view(nb, blocksize) * scale[:, None])).reshape(-1)[:n]
