"""Provenance of the constants: the kernels' thresholds are their decimal literals rounded to float32
once, and the dynamic-map decision rule equals the kernel's binary search."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from bnbcli.formats.codes import (
    DYNAMIC_CODE,
    FP4_CODE,
    FP4_MAGNITUDE_BITS,
    FP4_THRESHOLD_LITERALS,
    FP4_THRESHOLDS,
    NF4_CODE,
    NF4_THRESHOLD_LITERALS,
    NF4_THRESHOLDS,
)


def correctly_rounded_f32(literal: str) -> np.float32:
    """decimal -> float32 in one rounding (as nvcc does), by exact rational comparison."""
    exact = Fraction(literal)
    guess = np.float32(float(exact))
    below = np.nextafter(guess, np.float32(-np.inf))
    above = np.nextafter(guess, np.float32(np.inf))
    candidates = sorted((abs(Fraction(float(c)) - exact), i, c) for i, c in enumerate((below, guess, above)))
    (d0, _, best), (d1, _, _) = candidates[0], candidates[1]
    assert d0 != d1, "a decimal literal exactly between two floats would need ties-to-even"
    return best


@pytest.mark.parametrize(
    ("literals", "bits"), [(NF4_THRESHOLD_LITERALS, NF4_THRESHOLDS), (FP4_THRESHOLD_LITERALS, FP4_THRESHOLDS)]
)
def test_thresholds_are_literals_rounded_once(literals: str, bits: np.ndarray) -> None:
    derived = np.array([correctly_rounded_f32(s) for s in literals.split()], dtype=np.float32)
    assert derived.view(np.uint32).tolist() == bits.view(np.uint32).tolist()


def test_double_rounding_would_be_wrong() -> None:
    """The trap the spec warns about: decimal -> double -> float32 is an ulp off at four NF4 boundaries."""
    twice = np.array([np.float32(float(s)) for s in NF4_THRESHOLD_LITERALS.split()], dtype=np.float32)
    assert int(np.sum(twice.view(np.uint32) != NF4_THRESHOLDS.view(np.uint32))) == 4


def test_nf4_thresholds_separate_the_table() -> None:
    assert np.all(NF4_CODE[:-1] < NF4_THRESHOLDS) and np.all(NF4_CODE[1:] > NF4_THRESHOLDS)


def test_fp4_magnitude_order() -> None:
    """The magnitude bits in interval order decode to increasing values."""
    decoded = FP4_CODE[FP4_MAGNITUDE_BITS]
    assert np.all(np.diff(decoded) > 0)
    assert np.all(decoded[:-1] < FP4_THRESHOLDS) and np.all(decoded[1:] > FP4_THRESHOLDS)


def kernel_binary_search(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """A literal vectorized transcription of bitsandbytes' dQuantize<0> (7 halving steps, then the
    midpoint decision with its path-dependent ties), to check the threshold form against."""
    x = x.astype(np.float32)
    pivot = np.full(x.shape, 127)
    upper_pivot = np.full(x.shape, 255)
    lower_pivot = np.zeros(x.shape, dtype=np.int64)
    lower = np.full(x.shape, np.float32(-1.0))
    upper = np.full(x.shape, np.float32(1.0))
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = np.where(right, pivot, lower_pivot)
        lower = np.where(right, val, lower)
        upper_pivot = np.where(right, upper_pivot, pivot)
        upper = np.where(right, upper, val)
        pivot = np.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    up_mid = ((upper + val) * np.float32(0.5)).astype(np.float32)
    down_mid = ((lower + val) * np.float32(0.5)).astype(np.float32)
    return np.where(
        x > val, np.where(x > up_mid, upper_pivot, pivot), np.where(x < down_mid, lower_pivot, pivot)
    ).astype(np.uint8)


def test_dynamic_thresholds_equal_the_kernel_search() -> None:
    import torch

    from bnbcli.formats.blocks import encode
    from bnbcli.formats.blockwise8 import dynamic_thresholds

    code = DYNAMIC_CODE
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    rng = np.random.default_rng(0)
    probes = np.concatenate(
        [
            code,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            np.nextafter(code, np.float32(np.inf)),
            np.nextafter(code, np.float32(-np.inf)),
            rng.uniform(-1.0, 1.0, 200_000).astype(np.float32),
            (rng.standard_normal(50_000) * 1e-3).astype(np.float32),
            np.array([-2.0, 2.0, -0.0, 0.0, np.nan, np.inf, -np.inf], dtype=np.float32),
        ]
    ).astype(np.float32)
    ours = encode(torch.from_numpy(probes.copy()), dynamic_thresholds()).numpy()
    assert np.array_equal(ours, kernel_binary_search(probes, code))
