"""The quantization scheme (what to write) and the TOML presets in configs/ that name one.

A ``QuantScheme`` is frozen and checked when it is made, so everything downstream (the plan, the
pipeline, the writer) may trust it. Values mirror what bitsandbytes and transformers accept; the
citations say where each limit comes from.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args

from bnbcli.errors import UsageError
from bnbcli.formats.dtypes import BY_NAME, FLOAT_DTYPES, UINT8, DType, as_dtype, dtype_name
from bnbcli.formats.layout import FOUR_BIT_BLOCKSIZES
from bnbcli.plan.scheme_names import DTYPE_NAMES, Method, StorageDtypeName

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

METHODS: tuple[str, ...] = get_args(Method)
STORAGE_DTYPES: tuple[DType, ...] = tuple(BY_NAME[name] for name in get_args(StorageDtypeName))
_DTYPE_ALIASES: dict[str, DType] = {alias: BY_NAME[name] for alias, name in DTYPE_NAMES.items()}
AUTO = "auto"  # TOML has no null: "auto" stands for None (the model's dtype / each tensor's dtype)


def _configs_dir() -> Path:
    """The presets: configs/ of this source checkout, else the copy a wheel installs as bnbcli.configs."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "configs"
    return checkout if checkout.is_dir() else package / "configs"


CONFIGS_DIR = _configs_dir()


def parse_dtype(value: object, what: str, allowed: tuple[DType, ...]) -> DType:
    """A dtype from its name ('bf16', 'bfloat16'), a DType or a torch.dtype, limited to ``allowed``."""
    dtype = _DTYPE_ALIASES.get(value.lower()) if isinstance(value, str) else as_dtype(value)
    if dtype is None or dtype not in allowed:
        raise UsageError(
            f"{what} {value!r} is not supported",
            hint="use one of " + ", ".join(dtype_name(d) for d in allowed),
        )
    return dtype


@dataclass(frozen=True)
class QuantScheme:
    """How every quantized weight is written.

    ``skip`` holds the user's module patterns; they are ADDED to the planner's default skips (output
    embedding, tied weights, ...), never replacing them (transformers replaces them: issue #45674).
    """

    method: Method = "nf4"
    double_quant: bool = False  # transformers' default; the nf4-dq preset turns it on
    blocksize: int = 64  # 4-bit only; transformers always quantizes with 64, any listed size loads
    compute_dtype: DType | None = None  # None: the model's dtype
    quant_storage: DType = UINT8
    dtype: DType | None = None  # cast weights to this before quantizing; None: keep each dtype
    skip: tuple[str, ...] = ()
    threshold: float = 6.0  # llm_int8_threshold (applies to activations at run time)

    def __post_init__(self) -> None:
        # Normalize what a TOML file or a caller naturally gives (a list, an int threshold, a torch.dtype).
        for key in ("compute_dtype", "quant_storage", "dtype"):
            object.__setattr__(self, key, as_dtype(getattr(self, key)) or getattr(self, key))  # else _check says
        if isinstance(self.skip, (list, str)):
            object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        if isinstance(self.threshold, int) and not isinstance(self.threshold, bool):
            # transformers' BitsAndBytesConfig.post_init raises unless llm_int8_threshold is a float
            object.__setattr__(self, "threshold", float(self.threshold))
        self._check()

    @property
    def is_4bit(self) -> bool:
        return self.method != "int8"

    def _check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}", hint="use one of " + ", ".join(METHODS))
        if not isinstance(self.double_quant, bool):
            raise UsageError(
                f"double_quant must be true or false, not {self.double_quant!r}", hint="double_quant = true"
            )
        if self.is_4bit:
            if isinstance(self.blocksize, bool) or self.blocksize not in FOUR_BIT_BLOCKSIZES:
                # bitsandbytes `_ops.py` quantize_4bit: torch._check(blocksize in (32, 64, ..., 4096))
                raise UsageError(
                    f"blocksize {self.blocksize!r} is not supported for 4-bit",
                    hint="use one of " + ", ".join(map(str, FOUR_BIT_BLOCKSIZES)) + " (64 is the usual choice)",
                )
            if self.quant_storage not in STORAGE_DTYPES:
                raise UsageError(
                    f"quant_storage {self.quant_storage} is not supported",
                    hint="use one of " + ", ".join(dtype_name(d) for d in STORAGE_DTYPES) + " (uint8 is the usual)",
                )
        else:
            if self.double_quant:
                raise UsageError("double_quant applies to 4-bit methods only", hint="drop it for int8")
            if self.quant_storage != UINT8:
                raise UsageError("quant_storage applies to 4-bit methods only", hint="leave it at uint8 for int8")
        for what, dtype in (("compute_dtype", self.compute_dtype), ("dtype", self.dtype)):
            if dtype is not None and dtype not in FLOAT_DTYPES:
                raise UsageError(
                    f"{what} {dtype} is not supported", hint="use float16, bfloat16 or float32 (or leave it unset)"
                )
        if not isinstance(self.threshold, float) or not self.threshold >= 0.0:
            raise UsageError(f"threshold must be a number >= 0, not {self.threshold!r}", hint="6.0 is the default")
        for pattern in self.skip:
            _check_pattern(pattern)


def _check_pattern(pattern: object) -> None:
    """transformers matches skip entries as regular expressions (`should_convert_module`)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"skip pattern {pattern!r} must be a non-empty string", hint="e.g. --skip down_proj")
    try:
        re.compile(pattern)
    except re.error as err:
        raise UsageError(
            f"skip pattern {pattern!r} is not a valid regular expression: {err}",
            hint="patterns are matched like transformers' llm_int8_skip_modules (a module name, a suffix or a regex)",
        ) from None


# --- presets and TOML settings -------------------------------------------------------------------

SCHEME_KEYS: tuple[str, ...] = tuple(f.name for f in fields(QuantScheme))
# How each typed setting is written in a TOML file: the hint for a value of the wrong type.
SETTING_EXAMPLES = {
    "blocksize": "blocksize = 64 (a number)",
    "threshold": "threshold = 6.0",
    "method": 'method = "nf4"',
}


def scheme_from_dict(settings: Mapping[str, Any]) -> QuantScheme:
    """A QuantScheme from TOML-style values ('bf16', 'auto', lists); missing keys take the defaults."""
    unknown = sorted(set(settings) - set(SCHEME_KEYS))
    if unknown:
        raise UsageError(
            "unknown setting" + ("s " if len(unknown) > 1 else " ") + ", ".join(repr(k) for k in unknown),
            hint="known settings: " + ", ".join(SCHEME_KEYS),
        )
    values = dict(settings)
    for key in ("compute_dtype", "dtype"):
        if key in values:
            raw = values[key]
            values[key] = None if raw is None or raw == AUTO else parse_dtype(raw, key, FLOAT_DTYPES)
    if "quant_storage" in values:
        values["quant_storage"] = parse_dtype(values["quant_storage"], "quant_storage", STORAGE_DTYPES)
    if "skip" in values and not isinstance(values["skip"], (list, tuple)):
        raise UsageError(f"skip must be a list of module patterns, not {values['skip']!r}", hint='skip = ["down_proj"]')
    for key, kind in (("blocksize", int), ("threshold", (int, float)), ("method", str)):
        if key in values and (not isinstance(values[key], kind) or isinstance(values[key], bool)):
            raise UsageError(f"{key} has the wrong type: {values[key]!r}", hint=SETTING_EXAMPLES[key])
    return QuantScheme(**values)


def available_presets() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The settings of a preset name (``nf4-dq``) or a TOML file, checked; keys as in QuantScheme.

    Returns the raw TOML values (strings for dtypes) so that callers can layer flags over them;
    ``scheme_from_dict`` turns the merged result into a QuantScheme.
    """
    path = Path(name_or_path)
    looks_like_path = path.suffix == ".toml" or len(path.parts) > 1
    if not looks_like_path:
        path = CONFIGS_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UsageError(
                f"unknown preset {str(name_or_path)!r}",
                hint="presets: " + ", ".join(available_presets()) + "; or give a path to a .toml file",
            )
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"config file {str(path)!r} does not exist",
            hint="presets: " + ", ".join(available_presets()) + "; or give the path of an existing .toml file",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"cannot read config file {str(path)!r}: {err}", hint="give a readable UTF-8 .toml file"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(
            f"{path.name} is not valid TOML: {err}",
            hint='fix the line it names; a setting looks like method = "nf4"',
        ) from None
    try:
        scheme_from_dict(settings)
    except UsageError as err:
        raise UsageError(f"{path.name}: {err.message}", hint=err.hint) from None
    return settings


FOUR_BIT_ONLY = ("double_quant", "blocksize", "quant_storage")


def resolve_scheme(preset: Mapping[str, Any], flags: Mapping[str, Any]) -> QuantScheme:
    """Defaults < preset (--config) < flags. A flag that switches a 4-bit preset to int8 also drops
    the preset's 4-bit-only settings; the same settings given as flags are still refused."""
    merged = {**preset, **flags}
    if merged.get("method") == "int8" and preset.get("method", "nf4") != "int8":
        for key in FOUR_BIT_ONLY:
            if key not in flags:
                merged.pop(key, None)
    return scheme_from_dict(merged)
