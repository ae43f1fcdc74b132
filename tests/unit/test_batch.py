"""Joined calls (formats/batch.py, metrics.roundtrip_sums_many) against one call per weight, byte for byte."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bnbcli.formats import batch
from bnbcli.formats.metrics import roundtrip_sums, roundtrip_sums_many
from bnbcli.formats.registry import family_of
from bnbcli.plan.scheme import QuantScheme

SCHEMES = [
    QuantScheme("nf4"),
    QuantScheme("nf4", blocksize=32, double_quant=True),
    QuantScheme("fp4", blocksize=128),
    QuantScheme("fp4", blocksize=64, double_quant=True),
    QuantScheme("int8"),
]
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _weights(seed: int, count: int) -> list[torch.Tensor]:
    """Random shapes and dtypes; sizes that are and are not whole blocks; some with the values that send a
    block or row off the fast path (NaN, Inf, all zero, float32 subnormals, fp16 overflow)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(count):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(rng.choice([1, 2, 3, 7, 16, 33, 64, 100])) for _ in range(ndim))
        x = torch.randn(shape, generator=g) * float(rng.choice([1e-3, 1.0, 300.0]))
        flat = x.view(-1)
        special = rng.integers(0, 6)
        if special == 1:
            flat[int(rng.integers(flat.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
        elif special == 2:
            flat[: flat.numel() // 2] = 0.0
        elif special == 3:
            flat[int(rng.integers(flat.numel()))] = 1e-40  # a float32 subnormal
        elif special == 4:
            flat[0] = 1e5  # past fp16's range
        weights.append(x.to(DTYPES[int(rng.integers(3))]))
    weights.append(torch.randn(8, 16, generator=g).t())  # not contiguous
    return weights


def _same(a: object, b: object) -> bool:
    """Records or tensors equal in every byte (NaN bit patterns included), dtype and shape."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(a.contiguous().view(torch.uint8).numpy()) == bytes(b.contiguous().view(torch.uint8).numpy())
        )
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.method}{'-dq' if s.double_quant else ''}-b{s.blocksize}")
@pytest.mark.parametrize("seed", [0, 1])
def test_joined_quantize_and_restore_equal_one_by_one(scheme: QuantScheme, seed: int) -> None:
    weights = [w for w in _weights(seed, 60) if batch.joinable(w, scheme)]
    kernels = family_of(scheme.method).kernels("cpu")
    family = family_of(scheme.method)
    joined = batch.quantize_restore_many(weights, scheme)
    assert len(joined) == len(weights) > 50
    for w, (record, restored) in zip(weights, joined, strict=True):
        alone = kernels.quantize(w, *family.quantize_args(scheme))
        assert _same(record, alone)
        assert _same(restored, kernels.dequantize(*family.dequantize_args(alone)))
        assert _same(family.entries(record, "w"), family.entries(alone, "w"))


def test_joinable_leaves_out_what_one_call_must_handle() -> None:
    nf4 = QuantScheme("nf4")
    assert batch.joinable(torch.randn(16, 16), nf4)
    assert not batch.joinable(torch.zeros(0, 4), nf4)  # refused by the kernel, with its message
    assert not batch.joinable(torch.ones(4, dtype=torch.int32), nf4)
    assert not batch.joinable(torch.randn(batch.SMALL_ELEMENTS + 1), nf4)
    assert not batch.joinable(torch.randn(16, 16), QuantScheme("nf4", quant_storage=torch.float16))
    assert not batch.joinable(torch.tensor(1.0), QuantScheme("int8"))
    assert batch.joinable(torch.tensor([1.0]), QuantScheme("int8"))


def test_row_sums_equal_one_by_one_sums() -> None:
    g = torch.Generator().manual_seed(3)
    originals, restored = [], []
    for n in [1, 5, 8, 127, 128, 129, 255, 256, 1000, 4099, 65536] * 3 + [0]:
        x = torch.randn(n, generator=g) * torch.rand(1, generator=g) * 1e3
        y = x + torch.randn(n, generator=g) * 1e-2
        if n > 200:
            y[7] = float("nan") if n % 2 else float("inf")
        originals.append(x.to(torch.bfloat16))
        restored.append(y.to(torch.bfloat16))
    many = roundtrip_sums_many(originals, restored)
    for x, y, got in zip(originals, restored, many, strict=True):
        with np.errstate(invalid="ignore"):
            alone = roundtrip_sums(x, y)
        assert got.dtype == torch.float64
        assert bytes(got.numpy()) == bytes(alone.numpy())


def test_inspect_joined_roundtrip_errors_equal_one_by_one() -> None:
    from bnbcli.inspect.roundtrip import joinable_everywhere, parse_schemes, roundtrip_errors, roundtrip_errors_many

    schemes = parse_schemes(("nf4", "fp4-dq", "int8"))
    weights = [w.contiguous() for w in _weights(5, 40) if w.dim() == 2 and w.isfinite().all()]
    weights = [w for w in weights if joinable_everywhere(w, schemes, "cpu")]
    assert len(weights) > 5
    for w, errors in zip(weights, roundtrip_errors_many(weights, schemes), strict=True):
        assert repr(errors) == repr(roundtrip_errors(w, schemes, "cpu"))  # repr: NaN figures compare equal
