"""The CUDA backend on a GPU against the CPU formats: every byte, on fresh random and adversarial inputs.

The golden cases run through both backends in tests/conformance/test_conformance.py; this file draws many more
inputs (tests/helpers/cuda_cases.py: every dtype and blocksize, tails, NaN, ±inf, zero and NaN blocks,
subnormals, exact thresholds, int8 .5 ties), keeps them on the GPU, and also checks the device
contract of bnbcli's API, misaligned and strided inputs, and a non-default stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnbcli
from bnbcli.backends import resolve_backend
from bnbcli.formats import blockwise8, fourbit, int8
from bnbcli.formats.layout import BLOCKWISE8_BLOCKSIZES, FOUR_BIT_BLOCKSIZES

from helpers.cuda_cases import assert_same, inputs

pytestmark = pytest.mark.gpu

CASES = list(inputs(seed=4, count=40, max_numel=300_000))


@pytest.fixture(scope="module")
def cuda():
    from bnbcli.backends import cuda

    return cuda


def _gpu(x: torch.Tensor) -> torch.Tensor:
    return x.to("cuda")


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_4bit(cuda, name: str, x: torch.Tensor) -> None:
    rng = np.random.default_rng(sum(map(ord, name)))
    xg = _gpu(x)
    for quant_type in ("nf4", "fp4"):
        for blocksize in FOUR_BIT_BLOCKSIZES:
            double_quant = bool(rng.integers(0, 2))
            what = f"{name} {quant_type} {blocksize} dq={double_quant}"
            expected = fourbit.quantize_4bit(x, quant_type, blocksize, double_quant)
            q = cuda.quantize_4bit(xg, quant_type, blocksize, double_quant)
            assert q.packed.is_cuda and q.absmax.is_cuda
            assert_same(q, expected, what)
            assert_same(cuda.dequantize_4bit(q), fourbit.dequantize_4bit(expected), what + " dequant")


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_blockwise8(cuda, name: str, x: torch.Tensor) -> None:
    xg = _gpu(x)
    for blocksize in BLOCKWISE8_BLOCKSIZES:
        for nested in (False, True):
            what = f"{name} {blocksize} nested={nested}"
            expected = blockwise8.quantize_blockwise8(x, blocksize, nested)
            q = cuda.quantize_blockwise8(xg, blocksize, nested)
            assert_same(q, expected, what)
            assert_same(cuda.dequantize_blockwise8(q), blockwise8.dequantize_blockwise8(expected), what + " dequant")


@pytest.mark.parametrize(("name", "x"), CASES, ids=[c[0] for c in CASES])
def test_int8(cuda, name: str, x: torch.Tensor) -> None:
    xg = _gpu(x)
    for threshold in (0.0, 0.5, 6.0):
        expected = int8.reference_quantize_int8_rowwise(x, threshold)
        q = cuda.quantize_int8_rowwise(xg, threshold)
        assert_same(q, expected, f"{name} threshold={threshold}")
        restored = cuda.dequantize_int8_rowwise(q.CB, q.SCB)
        assert_same(restored, int8.dequantize_int8_rowwise(expected.CB, expected.SCB), f"{name} dequant")


def test_large_tensor(cuda) -> None:
    """A weight-sized tensor: many CTAs per SM, every tile of the grid-stride loop."""
    x = torch.randn(4096, 4100, dtype=torch.bfloat16)
    x[7, :3000] = 0.0
    xg = _gpu(x)
    assert_same(cuda.quantize_4bit(xg, "nf4", 64, True), fourbit.quantize_4bit(x, "nf4", 64, True), "nf4-dq")
    assert_same(cuda.quantize_blockwise8(xg, 4096), blockwise8.quantize_blockwise8(x, 4096), "blockwise8")
    assert_same(cuda.quantize_int8_rowwise(xg), int8.quantize_int8_rowwise(x), "int8")


# Every geometry of torch's reduction: one CTA, several, and past 4,325,376 values (132 SMs) where the
# last CTA folds two rows of partial sums.
TORCH_MEAN_LENGTHS = [1, 3, 127, 128, 131, 4099, 130560, 130561, 1048576, 1048579, 4325376, 4325377, 9_000_001]


@pytest.mark.parametrize("n", TORCH_MEAN_LENGTHS)
def test_nested_offset_is_torch_mean_here(cuda, n: int) -> None:
    """The double-quant offset our kernels compute has the bits of torch.mean on this very GPU, and
    the nested codes are the CPU twin's for that offset."""
    rng = np.random.default_rng(n)
    values = (rng.lognormal(0.0, 4.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    x = torch.from_numpy(values).cuda()
    codes, nested_absmax, on_device = cuda._nested(x, 256, None)
    offset = np.float32(on_device.item())  # _nested leaves the offset on the device
    assert offset.tobytes() == x.mean().cpu().numpy().tobytes()
    expected_codes, expected_absmax = blockwise8.quantize_codes(torch.from_numpy(values - offset), 256)
    assert_same(codes, expected_codes, f"n={n} codes")
    assert_same(nested_absmax, expected_absmax, f"n={n} absmax")


@pytest.mark.parametrize("blocks", TORCH_MEAN_LENGTHS)
def test_double_quant_offset_through_quantize_4bit_is_torch_mean_here(cuda, blocks: int) -> None:
    """The whole double-quantization path (first-level absmax, then the mean and the nested codes):
    one chosen value per block of 32 sets every absmax, and the offset has the bits of torch.mean of
    that absmax on this GPU."""
    rng = np.random.default_rng(blocks)
    values = (rng.lognormal(0.0, 4.0, blocks) * rng.choice([-1.0, 1.0], blocks)).astype(np.float32)
    x = torch.zeros((blocks, 32), dtype=torch.float32, device="cuda")
    x[:, 5] = torch.from_numpy(values).cuda()
    absmax = x[:, 5].abs()
    q = cuda.quantize_4bit(x.reshape(-1), "nf4", 32, True)
    expected = absmax.mean()
    assert np.float32(q.nested_offset).tobytes() == expected.cpu().numpy().tobytes()
    expected_codes, expected_absmax = blockwise8.quantize_codes((absmax - expected).cpu(), 256)
    assert_same(q.absmax, expected_codes, f"{blocks} blocks: codes")
    assert_same(q.nested_absmax, expected_absmax, f"{blocks} blocks: nested absmax")


def test_api_keeps_results_on_the_inputs_device() -> None:
    x = torch.randn(33, 70, dtype=torch.float16)
    on_cpu = bnbcli.quantize_4bit(x, "fp4", 128, True, backend="cuda")
    assert on_cpu.packed.device.type == "cpu" and on_cpu.nested_absmax is not None
    assert not on_cpu.nested_absmax.is_cuda
    on_gpu = bnbcli.quantize_4bit(x.cuda(), "fp4", 128, True, backend="cuda")
    assert on_gpu.packed.is_cuda and on_gpu.quant_map.is_cuda
    assert_same(on_gpu, on_cpu, "cpu vs gpu input")
    assert bnbcli.dequantize_4bit(on_cpu, backend="cuda").device.type == "cpu"
    assert bnbcli.dequantize_4bit(on_gpu, backend="cuda").is_cuda
    q8 = bnbcli.quantize_int8_rowwise(x.cuda(), 2.0, backend="cuda")
    assert q8.CB.is_cuda and q8.SCB.is_cuda and q8.outlier_cols is not None
    assert bnbcli.dequantize_int8_rowwise(q8.CB, q8.SCB, backend="cuda").is_cuda
    assert bnbcli.quantize_blockwise8(x, backend="cuda").q.device.type == "cpu"
    assert resolve_backend("auto") == "cuda"


def test_misaligned_strided_and_other_stream(cuda) -> None:
    base = torch.randn(10_001, dtype=torch.float32, device="cuda")
    misaligned = base[1:]  # 4 bytes past a 16-byte boundary
    strided = torch.randn(300, 129, device="cuda", dtype=torch.bfloat16).t()
    for x in (misaligned, strided):
        expected = fourbit.quantize_4bit(x.cpu(), "nf4", 64, True)
        assert_same(cuda.quantize_4bit(x, "nf4", 64, True), expected, "odd layout")
        assert_same(cuda.quantize_int8_rowwise(x), int8.quantize_int8_rowwise(x.cpu()), "odd layout int8")
    stream = torch.cuda.Stream()
    x = torch.randn(1000, 1000, device="cuda", dtype=torch.float16)
    with torch.cuda.stream(stream):
        q = cuda.quantize_4bit(x, "nf4", 64, True)
        y = cuda.dequantize_4bit(q)
    stream.synchronize()
    expected = fourbit.quantize_4bit(x.cpu(), "nf4", 64, True)
    assert_same(q, expected, "side stream")
    assert_same(y, fourbit.dequantize_4bit(expected), "side stream dequant")
