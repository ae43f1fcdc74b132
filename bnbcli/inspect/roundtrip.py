"""The round-trip error of one weight under each scheme: quantize with the bit-exact formats of
``bnbcli.api`` (the bytes bitsandbytes' CUDA kernels write), dequantize, and measure with
``bnbcli.formats.metrics`` — the same measure ``bnb quantize`` records in its manifest.

The weight is taken as the model holds it, ``[out, in]`` (the caller transposes Conv1D weights), in its
own dtype: int8 casts it to fp16 first, as transformers does; 4-bit keeps it. On the cuda backend the
weight is copied to the GPU once and every scheme runs there; the sums come back as three float64s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnbcli import api
from bnbcli.errors import UsageError
from bnbcli.footprint.schemes import make_schemes
from bnbcli.formats.metrics import RoundTripError, error_from_sums, roundtrip_sums
from bnbcli.plan.scheme import QuantScheme
from bnbcli.plan.scheme_names import ROUNDTRIP_SCHEMES

# The bitsandbytes formats by the names `bnb footprint` uses; inspect's default is one of each method.


@dataclass(frozen=True)
class NamedScheme:
    name: str  # nf4, nf4-dq, fp4, fp4-dq, int8
    scheme: QuantScheme


def parse_schemes(names: tuple[str, ...], blocksize: int = 64) -> tuple[NamedScheme, ...]:
    """``--schemes``: named bitsandbytes formats (4-bit ones with ``blocksize``)."""
    unknown = [n for n in names if n not in ROUNDTRIP_SCHEMES]
    if unknown or not names:
        raise UsageError(
            f"unknown scheme {unknown[0]!r}" if unknown else "no scheme given",
            hint="choose from " + ", ".join(ROUNDTRIP_SCHEMES),
        )
    made = make_schemes(tuple(dict.fromkeys(names)), blocksize=blocksize)
    return tuple(NamedScheme(s.name, s.quant) for s in made if s.quant is not None)


def restored(weight: torch.Tensor, scheme: QuantScheme, backend: str) -> torch.Tensor:
    """``weight`` quantized with ``scheme`` and dequantized again, on ``backend``."""
    if scheme.method == "int8":
        q = api.quantize_int8_rowwise(weight, backend=backend)
        return api.dequantize_int8_rowwise(q.CB, q.SCB, backend=backend)
    q4 = api.quantize_4bit(
        weight, scheme.method, scheme.blocksize, scheme.double_quant, scheme.quant_storage, backend=backend
    )
    return api.dequantize_4bit(q4, backend=backend)


def roundtrip_errors(weight: torch.Tensor, schemes: tuple[NamedScheme, ...], backend: str) -> dict[str, RoundTripError]:
    """Scheme name → the error of ``weight`` (finite values only: the caller skips the others)."""
    if backend == "cuda":
        weight = weight.to(torch.device("cuda", torch.cuda.current_device()))
    return {
        s.name: error_from_sums(roundtrip_sums(weight, restored(weight, s.scheme, backend)).cpu(), weight.numel())
        for s in schemes
    }
