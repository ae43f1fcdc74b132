"""What transformers' or diffusers' planner decided, kept on disk for the next run with the same inputs.

The model-aware planners import transformers (or diffusers) and build the model on the meta device:
8 to 25 s on the GPU machines, more than the whole conversion of an 8B model there. Their answer
depends only on what goes into the key below, so a second run on the same model (a CI job, the next
fine-tune of the same base, `bnb footprint` then `bnb quantize`) takes it from here in milliseconds.

The key is the sha256 of: the library and its installed version (and torch's and accelerate's), the
digest of bnbcli's planning code, config.json, every tensor's name, shape and dtype, and the scheme. A
different transformers, a changed config or one more tensor is another key; nothing is ever reused
across them. An entry that cannot be
read back (truncated, edited, from another layout) is ignored and made again.

Where: ``$BNB_CACHE_DIR/plans``, else ``plans`` in the user's cache folder for bnbcli as platformdirs
finds it (``$XDG_CACHE_HOME/bnbcli`` or ``~/.cache/bnbcli`` on Linux, ``~/Library/Caches/bnbcli`` on
macOS, ``%LOCALAPPDATA%\\bnbcli\\Cache`` on Windows).
``BNB_PLAN_CACHE=off`` turns it off. Writing is best effort: a read-only home only loses the speed-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from bnbcli import json_text
from bnbcli.checkpoint.durable import write_json
from bnbcli.formats.dtypes import DType, dtype_name
from bnbcli.plan.planners.cache_folder import enabled, folder
from bnbcli.plan.planners.common import ModuleVerdict, PlannerResult, Tensors
from bnbcli.plan.planners.hf_transformers import NotImportable, NotKnown
from bnbcli.plan.scheme import QuantScheme

FORMAT = 1  # bump when the entry layout changes
_PLANNING_CODE = ("common.py", "hf_transformers.py", "hf_diffusers.py", "cache.py")


@cache
def _code_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    try:
        for name in _PLANNING_CODE:
            digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    except OSError:  # sources not readable as files (a zipped install): bnbcli's version stands for them
        return "bnbcli " + str(_library_version("bnbcli"))
    return digest.hexdigest()


def _library_version(library: str) -> str | None:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def key(library: str, config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme) -> str | None:
    """The entry's name, or None when nothing may be cached (the library is not installed)."""
    version = _library_version(library)
    if version is None:
        return None
    scheme_fields = {f.name: getattr(scheme, f.name) for f in dataclasses.fields(scheme)}
    scheme_fields = {k: dtype_name(v) if isinstance(v, DType) else v for k, v in scheme_fields.items()}
    inputs = {
        "format": FORMAT,
        "library": [library, version],
        "beside": [_library_version("torch"), _library_version("accelerate")],  # what the model build runs on
        "planning_code": _code_digest(),
        "config": config,
        "tensors": sorted([name, list(shape), dtype_name(dtype)] for name, (shape, dtype) in tensors.items()),
        "scheme": scheme_fields,
    }
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def planned(
    library: str,
    config: Mapping[str, Any],
    tensors: Tensors,
    scheme: QuantScheme,
    plan: Callable[[], PlannerResult],
) -> PlannerResult:
    """``plan()``'s result (or its NotKnown), from the cache when this exact question was answered."""
    name = key(library, config, tensors, scheme) if enabled() else None
    if name is None:
        return plan()
    cached = _load(name)
    if cached is None:
        try:
            result = plan()
        except NotImportable:  # a broken install says nothing about the model: ask again next time
            raise
        except NotKnown as why:  # the library does not know this model: that is an answer too
            _store(name, {"not_known": str(why)})
            raise
        _store(name, {"result": dataclasses.asdict(result)})
        return result
    if isinstance(cached, str):
        raise NotKnown(cached)
    return cached


def lookup(library: str, config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme) -> bool:
    """Whether ``planned`` would answer from the cache (without asking the library)."""
    name = key(library, config, tensors, scheme) if enabled() else None
    return name is not None and _load(name) is not None


def _load(name: str) -> PlannerResult | str | None:
    """The cached result, or the reason the library did not know the model; None for a miss (no entry,
    or one that does not read back whole)."""
    try:
        entry = json_text.loads((folder() / f"{name}.json").read_text(encoding="utf-8"))
        if "not_known" in entry:
            return entry["not_known"] if isinstance(entry["not_known"], str) else None
        return _result(entry["result"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(name: str, entry: dict[str, Any]) -> None:
    try:
        target = folder()
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / f"{name}.json", entry)  # whole or absent, whoever reads it meanwhile
    except (OSError, TypeError, ValueError):  # unwritable, or a value JSON cannot hold: not cached
        pass


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) for d in value):
        raise TypeError("not a shape")
    return tuple(value)


def _result(data: dict[str, Any]) -> PlannerResult:
    """A PlannerResult from its JSON form (lists back to tuples); TypeError/KeyError when malformed."""
    verdicts = {
        name: ModuleVerdict(
            name=v["name"],
            quantize=bool(v["quantize"]),
            reason=v["reason"],
            transpose=bool(v["transpose"]),
            shape=None if v["shape"] is None else _shape(v["shape"]),
        )
        for name, v in data["verdicts"].items()
    }
    return PlannerResult(
        planner=data["planner"],
        reason=data["reason"],
        verdicts=verdicts,
        params=dict(data["params"]),
        kinds=dict(data["kinds"]),
        converted=dict(data["converted"]),
        param_shapes={k: _shape(v) for k, v in data["param_shapes"].items()},
        model_label=data["model_label"],
        notes=dict(data["notes"]),
        skip_modules=tuple(data["skip_modules"]),
    )
