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
from bnbcli.formats.batch import joinable, quantize_restore_many
from bnbcli.formats.metrics import RoundTripError, error_from_sums, roundtrip_sums, roundtrip_sums_many
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
    return api.dequantize(api.quantize(weight, scheme, backend), backend)


def roundtrip_errors(weight: torch.Tensor, schemes: tuple[NamedScheme, ...], backend: str) -> dict[str, RoundTripError]:
    """Scheme name → the error of ``weight`` (finite values only: the caller skips the others)."""
    if backend == "cuda":
        weight = weight.to(torch.device("cuda", torch.cuda.current_device()))
    return {
        s.name: error_from_sums(roundtrip_sums(weight, restored(weight, s.scheme, backend)).cpu(), weight.numel())
        for s in schemes
    }


def joinable_everywhere(weight: torch.Tensor, schemes: tuple[NamedScheme, ...], backend: str) -> bool:
    """Whether ``roundtrip_errors_many`` takes ``weight`` (small, on the CPU backend)."""
    return backend == "cpu" and all(joinable(weight, s.scheme) for s in schemes)


def roundtrip_errors_many(
    weights: list[torch.Tensor], schemes: tuple[NamedScheme, ...]
) -> list[dict[str, RoundTripError]]:
    """``roundtrip_errors`` of each weight on the CPU, the weights joined in one call per scheme
    (``formats.batch``: the same values); every weight must be ``joinable_everywhere``."""
    errors: list[dict[str, RoundTripError]] = [{} for _ in weights]
    for s in schemes:
        restored = [values for _, values in quantize_restore_many(weights, s.scheme)]
        for found, w, sums in zip(errors, weights, roundtrip_sums_many(weights, restored), strict=True):
            found[s.name] = error_from_sums(sums, w.numel())
    return errors
