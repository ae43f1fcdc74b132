"""The CUDA kernels' encoding tables, replayed bit for bit in numpy, against the reference encoders.

``cuda_tables.emulate_*`` follow the kernels' steps (bucket by fma rounding or by the high 16 bits,
one table entry, one comparison or carry); the reference is the CPU formats' decision rule. Checked
on every float32 bucket edge, every threshold and its neighbours, and random values of every
magnitude. (An exhaustive pass over every float32 in [-1, 1] agreed as well when the tables were made.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnbcli.backends import cuda_tables
from bnbcli.formats import blockwise8, fourbit
from bnbcli.formats.codes import DYNAMIC_CODE, FP4_THRESHOLDS, NF4_THRESHOLDS


def reference(kind: str, s: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(s)
    if kind == "nf4":
        return fourbit._encode_nf4(t).numpy()
    if kind == "fp4":
        return fourbit._encode_fp4(t).numpy()
    return blockwise8._encode_dynamic(t).numpy()


def emulated(kind: str, s: np.ndarray) -> np.ndarray:
    return cuda_tables.emulate_dynamic(s) if kind == "dyn" else cuda_tables.emulate_lane_lut(s, kind)


def probes(kind: str) -> np.ndarray:
    """float32 values the kernel can feed its encoder: |s| <= 1 + 3e-7 or NaN, never subnormal."""
    rng = np.random.default_rng(0)
    thresholds = {
        "nf4": NF4_THRESHOLDS,
        "fp4": np.concatenate([FP4_THRESHOLDS, -FP4_THRESHOLDS]),
        "dyn": (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * np.float32(0.5),
    }[kind].astype(np.float32)
    near, up, down = [thresholds], thresholds, thresholds
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        near += [up, down]
    # Every high-16-bit bucket (sign, exponent, 7 mantissa bits) at its lowest, middle and highest value.
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    edges = [(high | np.uint32(low)).view(np.float32) for low in (0, 1, 0x7FFF, 0xFFFE, 0xFFFF)]
    magnitudes = np.float32(10.0) ** rng.uniform(-40, 0.1, 1 << 20).astype(np.float32)
    signs = np.where(rng.random(1 << 20) < 0.5, -1, 1).astype(np.float32)
    specials = np.array([0.0, -0.0, np.nan, 1.0, -1.0, 1.0000002], dtype=np.float32)
    values = np.concatenate([*near, *edges, magnitudes * signs, specials])
    usable = np.isnan(values) | ((np.abs(values) <= cuda_tables.SCALED_LIMIT) & (np.abs(values) >= 1.1754944e-38))
    return values[usable | (values == 0)]


@pytest.mark.parametrize("kind", ["nf4", "fp4", "dyn"])
def test_kernel_encoding_equals_reference(kind: str) -> None:
    s = probes(kind)
    ours, theirs = emulated(kind, s), reference(kind, s)
    bad = np.nonzero(ours != theirs)[0]
    assert bad.size == 0, f"{bad.size} differ, first {s[bad[0]]!r}: {ours[bad[0]]} != {theirs[bad[0]]}"


def test_lane_tables_hold_reference_thresholds() -> None:
    for quant_type, thresholds in (("nf4", NF4_THRESHOLDS), ("fp4", FP4_THRESHOLDS)):
        table = cuda_tables.lane_lut(quant_type)
        assert table[cuda_tables.NAN_BUCKET] == 0  # NaN encodes as 0
        used = table[32:63].view(np.float32)
        assert set(used[np.isfinite(used) & (used != 0)].tolist()) <= set(thresholds.tolist())


def test_dynamic_table_covers_every_bucket_it_indexes() -> None:
    table = cuda_tables.dynamic_table()
    assert table.size == cuda_tables.DYN8_TABLE_ENTRIES
    # 1.0 and 2^-23 of both signs land inside the table
    for value in (1.0, -1.0, 2.0**-23, -(2.0**-23)):
        a = np.float32(abs(value)).view(np.uint32)
        index = (int(a) >> 16) - cuda_tables.DYN8_LOW_BUCKET + (cuda_tables.DYN8_NEGATIVE if value < 0 else 0)
        assert 0 <= index < table.size
