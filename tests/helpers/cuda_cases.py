"""Inputs and byte comparisons shared by the CUDA backend tests (emulated on a CPU and on a GPU).

Every input is drawn fresh from a seeded generator: random shapes (tails, odd lengths), every dtype,
and adversarial values: NaN, ±inf, all-zero / all-NaN / constant blocks, a zero tail, float32 and
fp16 subnormals, ±0, tiny negatives, values exactly on the NF4/FP4/dynamic thresholds (times a
power-of-two absmax, so the scaled value is the threshold itself), fp16 overflow, int8 .5 ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from bnbcli.formats.codes import DYNAMIC_CODE, FP4_THRESHOLDS, NF4_THRESHOLDS

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ties(table: np.ndarray, n: int) -> np.ndarray:
    """Thresholds (and their float32 neighbours) times 4, with a 4.0 opening every 32 elements so each
    block's absmax is 4 and rcp.approx(4) = 0.25 exactly: the scaled values are the thresholds."""
    row = np.concatenate([table, -table, np.nextafter(table, 2), np.nextafter(table, -2)]).astype(np.float32)
    values = np.resize(row * np.float32(4.0), n).astype(np.float32)
    values[::32] = 4.0
    return values


def _specials(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    blocks = [slice(i, i + 64) for i in range(0, n - 64, 64)]
    picks = rng.choice(len(blocks), size=min(len(blocks), 10), replace=False) if blocks else []
    fills = [0.0, np.nan, 3.0, -0.0, 1e-39, -1e-40, 1e-38, 6e-8, 70000.0, -1e-5]
    for k, p in enumerate(picks):
        x[blocks[p]] = fills[k % len(fills)]
    x[rng.integers(0, n, size=max(1, n // 97))] = np.nan
    x[rng.integers(0, n, size=max(1, n // 301))] = np.inf
    x[rng.integers(0, n, size=max(1, n // 307))] = -np.inf
    return x


def _int8_ties(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """fp16 rows with absmax 2^p and entries ±2^(p-1): scaled by 127/2^p they land on ±63.5 exactly."""
    power = rng.integers(-3, 9, size=(shape[0], 1)).astype(np.float32)
    x = rng.uniform(-1, 1, size=shape).astype(np.float32) * np.float32(2.0) ** power
    x[:, 0] = np.float32(2.0) ** power[:, 0]
    halves = rng.random(shape) < 0.2
    x[halves] = (np.sign(x) * np.float32(2.0) ** (power - 1) * np.ones(shape, dtype=np.float32))[halves]
    return x


def inputs(seed: int, count: int, max_numel: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs: ``count`` random ones, then the fixed adversarial set, each in a random dtype."""
    rng = np.random.default_rng(seed)
    fixed: list[tuple[str, np.ndarray]] = [
        ("ties_nf4", _ties(NF4_THRESHOLDS, 4096).reshape(32, 128)),
        ("ties_fp4", _ties(FP4_THRESHOLDS, 4096).reshape(64, 64)),
        ("ties_dyn", _ties(((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * np.float32(0.5)), 8192).reshape(8, 1024)),
        ("int8_ties", _int8_ties(rng, (16, 96))),
        ("zeros_tail", np.concatenate([rng.standard_normal(4096), np.zeros(37)]).astype(np.float32)),
        ("one_element", np.array([-2.5], dtype=np.float32)),
        ("three", np.array([0.0, -0.0, 1.0], dtype=np.float32)),
        ("wide_range", (rng.standard_normal((33, 65)) * 10.0 ** rng.integers(-30, 20, (33, 1))).astype(np.float32)),
    ]
    for i in range(count):
        ndim = int(rng.integers(1, 4))
        numel_target = int(rng.integers(1, max_numel))
        shape = [int(rng.integers(1, 9)) for _ in range(ndim - 1)]
        shape.append(max(1, numel_target // max(1, int(np.prod(shape)))))
        kind = rng.choice(["randn", "student", "specials"])
        n = int(np.prod(shape))
        if kind == "randn":
            values = rng.standard_normal(n).astype(np.float32) * np.float32(rng.uniform(0.01, 10))
        elif kind == "student":
            values = (rng.standard_t(3, size=n) * 0.02).astype(np.float32)
        else:
            values = _specials(rng, n)
        fixed.append((f"{kind}{i}", values.reshape(shape)))
    for name, values in fixed:
        dtype = DTYPES[int(rng.integers(0, 3))]
        if name.startswith("ties") or name == "wide_range":
            dtype = torch.float32  # the exact thresholds need float32
        if name == "int8_ties":
            dtype = torch.float16
        yield f"{name}_{str(dtype).removeprefix('torch.')}", torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(ours: object, reference: object, what: str) -> None:
    """Same bytes, dtype and shape for tensors; the same float32 bits for offsets; records field by field."""
    if dataclasses.is_dataclass(reference):
        for field in dataclasses.fields(reference):
            assert_same(getattr(ours, field.name), getattr(reference, field.name), f"{what}.{field.name}")
        return
    if isinstance(reference, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{what}: not a tensor"
        assert ours.dtype == reference.dtype, f"{what}: dtype {ours.dtype} != {reference.dtype}"
        assert tuple(ours.shape) == tuple(reference.shape), f"{what}: shape {tuple(ours.shape)} != {reference.shape}"
        if raw(ours) != raw(reference):
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[reference.element_size()]
            a = ours.detach().contiguous().cpu().reshape(-1).view(width)
            b = reference.detach().contiguous().reshape(-1).view(width)
            bad = torch.nonzero(a != b).reshape(-1)
            i = int(bad[0])
            raise AssertionError(f"{what}: {bad.numel()}/{a.numel()} elements differ, first at {i}: {a[i]} != {b[i]}")
        return
    if isinstance(reference, float):
        assert isinstance(ours, float), f"{what}: {ours!r} is not a float"
        if np.isnan(reference):  # a NaN offset reaches the checkpoint as the JSON word NaN, payload-free
            assert np.isnan(ours), f"{what}: {ours} != NaN"
            return
        assert np.float32(ours).tobytes() == np.float32(reference).tobytes(), f"{what}: {ours} != {reference}"
        return
    assert ours == reference, f"{what}: {ours!r} != {reference!r}"
