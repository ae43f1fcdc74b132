"""The float32 arithmetic of bitsandbytes' fast-math CUDA kernels, reproduced bit for bit on the CPU.

bitsandbytes builds its kernels with ``--use_fast_math``: ``1.0f / absmax`` becomes the approximate
reciprocal ``rcp.approx.ftz.f32`` and products are ``mul.ftz.f32`` (subnormal inputs and results are
flushed to zero). The approximate reciprocal differs from the correctly rounded one by -1, 0 or +1
ulp, and which one depends only on the 23 mantissa bits of the input. ``data/rcp_approx_sm90.npz``
holds that correction for every mantissa, measured on an H100 (sm_90, driver 580.159) by running
``rcp.approx.ftz.f32`` and ``__frcp_rn`` on every float32 in [1, 2).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from bnbcli.formats.codes import FLT_MIN

_MANTISSA_MASK = (1 << 23) - 1


@lru_cache(maxsize=1)
def _rcp_correction() -> torch.Tensor:
    """uint8[2^21]: the ulp step (-1, 0, +1) that rcp.approx adds to RN(1/x) for x's 23-bit mantissa m,
    as four 2-bit codes per byte, little end first (0 -> 0, 1 -> +1 ulp, 2 -> -1 ulp): byte m >> 2,
    bits 2 * (m & 3). Kept packed (2 MiB): unpacking all 2^23 steps took 0.6 s of every run that
    quantizes, and only an absmax per block is ever looked up."""
    with resources.files("bnbcli.data").joinpath("rcp_approx_sm90.npz").open("rb") as f:
        return torch.from_numpy(np.load(f)["packed"])


_STEP = torch.tensor([0, 1, -1, 0], dtype=torch.int32)


def _rcp_step(mantissa: torch.Tensor) -> torch.Tensor:
    """int32 ulp steps of int32 mantissas (see ``_rcp_correction``)."""
    byte = _rcp_correction()[(mantissa >> 2).long()].to(torch.int32)
    return _STEP[((byte >> ((mantissa & 3) * 2)) & 3).long()]


def rcp_steps() -> torch.Tensor:
    """int32[2^23]: every mantissa's ulp step, unpacked (for the CUDA emulation harness's table)."""
    return _rcp_step(torch.arange(1 << 23, dtype=torch.int32))


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """ftz: float32 values below the smallest normal become zero (keeping the sign, as the GPU does)."""
    return torch.where(x.abs() < FLT_MIN, x * 0.0, x)


def rcp_approx(x: torch.Tensor) -> torch.Tensor:
    """``rcp.approx.ftz.f32`` of a float32 tensor: what the kernels compute for ``1.0f / absmax``."""
    x = flush_subnormals(x.to(torch.float32))
    exact = torch.reciprocal(x)  # correctly rounded; 1/±0 = ±inf, 1/inf = 0, NaN stays NaN
    mantissa = x.view(torch.int32) & _MANTISSA_MASK
    step = _rcp_step(mantissa)
    finite_nonzero = torch.isfinite(exact) & (exact != 0)
    # Adding to the raw bit pattern moves the magnitude by one ulp whatever the sign.
    adjusted = torch.where(finite_nonzero, exact.view(torch.int32) + step, exact.view(torch.int32))
    return flush_subnormals(adjusted.view(torch.float32))


# CUDA arithmetic produces the canonical NaN 0x7fffffff; x86 produces 0xffc00000. Outputs that can
# hold a NaN (0 * inf in a dequantization) are rewritten to the GPU's pattern so the bytes match.
_CUDA_NAN = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)


def gpu_nan(x: torch.Tensor) -> torch.Tensor:
    """float32 x with every NaN replaced by the GPU's canonical NaN bit pattern."""
    return torch.where(torch.isnan(x), _CUDA_NAN, x)


# cvt.rn.f16.f32 and cvt.rn.bf16.f32 write every NaN as 0x7fff; torch's CPU casts do not (float32
# 0x7fffffff becomes bfloat16 0xffff on x86, measured with torch 2.13).
_CUDA_NAN_16 = torch.tensor(0x7FFF, dtype=torch.int16)


def gpu_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 x converted to ``dtype`` as a kernel's store converts it, NaN bit patterns included."""
    if dtype == torch.float32:
        return gpu_nan(x)
    out = x.to(dtype)
    nan = torch.isnan(x)
    if bool(nan.any()):
        out.view(torch.int16)[nan] = _CUDA_NAN_16
    return out
