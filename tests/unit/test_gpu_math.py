"""The emulated fast-math arithmetic: approximate reciprocal, flush-to-zero, the GPU's NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnbcli.formats.gpu_math import gpu_nan, rcp_approx, rcp_steps


def test_correction_table_decodes_to_the_measured_counts() -> None:
    """As measured on the H100: 733,799 mantissas are +1 ulp and 374,723 are -1 ulp, none further."""
    step = rcp_steps()
    assert step.numel() == 1 << 23
    assert int((step == 1).sum()) == 733_799
    assert int((step == -1).sum()) == 374_723


def test_rcp_approx_within_one_ulp_and_exponent_independent() -> None:
    rng = np.random.default_rng(1)
    mantissas = rng.integers(0, 1 << 23, 20_000, dtype=np.int64)
    results = []
    for exponent in (1, 100, 127, 200):
        bits = (exponent << 23) | mantissas
        x = torch.from_numpy(bits.astype(np.int32)).view(torch.float32)
        approx = rcp_approx(x)
        exact = torch.reciprocal(x)
        ulps = (approx.view(torch.int32) - exact.view(torch.int32)).abs()
        assert int(ulps.max()) <= 1
        results.append(approx.view(torch.int32) - exact.view(torch.int32))
    # The step depends on the mantissa only (away from the subnormal-result range).
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_rcp_approx_special_values() -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 2.0**127, 1.0, -2.0, float("nan")])
    r = rcp_approx(x)
    assert r[0] == float("inf") and r[1] == float("-inf")
    assert r[2] == 0 and r[3] == 0
    assert r[4] == float("inf"), "a subnormal input is flushed to zero first"
    assert r[5] == 0, "a subnormal result is flushed to zero"
    assert r[6] == 1.0 and r[7] == -0.5
    assert torch.isnan(r[8])


def test_gpu_nan_bit_pattern() -> None:
    x = torch.tensor([0.0, 1.0], dtype=torch.float32) * torch.tensor([float("inf"), 1.0])
    assert gpu_nan(x).view(torch.int32)[0] == 0x7FFFFFFF
    assert gpu_nan(x)[1] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cast_writes_nan_as_cvt_rn_does(dtype: torch.dtype) -> None:
    """cvt.rn.{f16,bf16}.f32 store every NaN as 0x7fff (bench/device_check_formats.py compares our
    dequantized NaN blocks with bitsandbytes' on the GPU); other values convert as torch does."""
    from bnbcli.formats.gpu_math import gpu_cast

    nans = torch.tensor([0x7FFFFFFF, 0x7FC00000, 0xFFC00000 - (1 << 32), 0x7F800001], dtype=torch.int32)
    x = torch.cat((nans.view(torch.float32), torch.tensor([1.0, -2.5, 1e-3, float("inf"), -0.0])))
    out = gpu_cast(x, dtype)
    assert out[:4].view(torch.int16).tolist() == [0x7FFF] * 4
    assert torch.equal(out[4:].view(torch.int16), x[4:].to(dtype).view(torch.int16))
