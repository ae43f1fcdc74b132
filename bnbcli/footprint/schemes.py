"""The schemes `bnb footprint` compares, and the settings that make each one `bnb quantize`'s own."""

from __future__ import annotations

from dataclasses import dataclass

from bnbcli.errors import UsageError
from bnbcli.formats.dtypes import UINT8, DType
from bnbcli.plan.scheme import QuantScheme
from bnbcli.plan.scheme_names import DEFAULT_SCHEMES, KNOWN, Kind


@dataclass(frozen=True)
class FootprintScheme:
    name: str
    kind: Kind
    quant: QuantScheme | None = None  # the scheme `bnb quantize` writes ("bnb" kind only)

    @property
    def label(self) -> str:
        if self.kind == "stored":
            return "as stored"
        if self.kind == "fp8":
            return "fp8 e4m3 (layerwise casting)"
        assert self.quant is not None
        if self.quant.method == "int8":
            return "int8 (LLM.int8)"
        return f"{self.quant.method}{' + double quant' if self.quant.double_quant else ''}"


def make_schemes(
    names: tuple[str, ...] = DEFAULT_SCHEMES,
    *,
    dtype: DType | None = None,
    blocksize: int = 64,
    compute_dtype: DType | None = None,
    quant_storage: DType = UINT8,
    skip: tuple[str, ...] = (),
) -> tuple[FootprintScheme, ...]:
    """The named schemes; the 4-bit settings apply to the 4-bit ones (as in `bnb quantize` flags)."""
    schemes = []
    for name in names:
        if name not in KNOWN:
            raise UsageError(f"unknown scheme {name!r}", hint="choose from " + ", ".join(KNOWN))
        kind, method, double_quant = KNOWN[name]
        quant = None
        if method == "int8":
            quant = QuantScheme(method="int8", dtype=dtype, skip=skip)
        elif method is not None:
            quant = QuantScheme(
                method=method,  # type: ignore[arg-type]
                double_quant=double_quant,
                blocksize=blocksize,
                compute_dtype=compute_dtype,
                quant_storage=quant_storage,
                dtype=dtype,
                skip=skip,
            )
        schemes.append(FootprintScheme(name, kind, quant))
    return tuple(schemes)
