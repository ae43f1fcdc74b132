"""Names the command line offers, without torch: it lists them in its help and checks them before the
library is imported. The methods, the dtypes a scheme takes (with the aliases people write), the
planners, and the schemes `bnb footprint` and `bnb inspect` compare (bnbcli/footprint/schemes.py makes
each one's settings)."""

from __future__ import annotations

from typing import Literal

Method = Literal["nf4", "fp4", "int8"]

# bitsandbytes' 4-bit kernels read fp16/bf16/fp32 and Linear4bit computes in one of them
# (`_ops.py` dequantize_4bit checks `dtype in (float16, bfloat16, float32)`).
FloatDtypeName = Literal["float16", "bfloat16", "float32"]
# transformers `BitsAndBytesConfig.__init__` accepts exactly these storage dtypes.
StorageDtypeName = Literal["uint8", "int8", "float16", "bfloat16", "float32", "float64"]
# What a dtype may be called (lower case) → its name, the spelling transformers writes into config.json.
DTYPE_NAMES: dict[str, str] = {
    **{name: name for name in ("float16", "bfloat16", "float32", "float64", "uint8", "int8")},
    **{"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"},
    "fp64": "float64",
}

# How weights are told apart; auto: the planner table, else transformers/diffusers, else name rules.
PlannerName = Literal["auto", "transformers", "diffusers", "name-rules"]

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
