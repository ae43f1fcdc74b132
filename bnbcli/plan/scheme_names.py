"""The schemes `bnb footprint` and `bnb inspect` compare, by name, without torch: the command line lists them
in its help and checks them before the library is imported. bnbcli/footprint/schemes.py makes each one's
settings."""

from __future__ import annotations

from typing import Literal

Kind = Literal["stored", "fp8", "bnb"]

# name → (kind, method, double quant); "stored" is bf16/fp16/fp32 as the checkpoint holds it.
KNOWN: dict[str, tuple[Kind, str | None, bool]] = {
    "stored": ("stored", None, False),
    "fp8": ("fp8", None, False),
    "int8": ("bnb", "int8", False),
    "nf4": ("bnb", "nf4", False),
    "nf4-dq": ("bnb", "nf4", True),
    "fp4": ("bnb", "fp4", False),
    "fp4-dq": ("bnb", "fp4", True),
}
DEFAULT_SCHEMES = ("stored", "fp8", "int8", "nf4", "nf4-dq", "fp4")  # bnb footprint
ROUNDTRIP_SCHEMES = tuple(name for name, (kind, _, _) in KNOWN.items() if kind == "bnb")  # bnb inspect
DEFAULT_ROUNDTRIPS = ("nf4", "fp4", "int8")
