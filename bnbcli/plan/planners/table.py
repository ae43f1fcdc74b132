"""Planner 0: transformers' and diffusers' decisions for the models people convert, from a table, without
importing either library (seconds on a laptop, up to 25 s on a GPU machine: more than converting an 8B model).

`bnbcli/data/planner_table.json` is made by `scripts/make_planner_table.py` from the installed libraries: for
each model class, every module of the model built on the meta device (its name with layer numbers as `#`,
its class, whether the bitsandbytes quantizer replaces it), the state_dict keys with their shapes as
config.json expressions, which config.json key counts each `#`, `_keep_in_fp32_modules`, and transformers'
default skips (tied weights, the output embedding, the last parameter; with and without tied embeddings). It
lists the library releases it was checked against; tests/conformance/test_planner_table.py compares it with them.

The table answers only when the checkpoint is exactly the model it describes for this config.json: every
tensor a state_dict key of the model, every dimension it knows as config.json says, every Linear weight in the
checkpoint. Anything else (renamed keys, merged experts, missing weights, another shape, a model or a library
release it does not know) goes to the real planner, which sees the model itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import metadata, resources
from typing import Any

from bnbcli.plan.planners.common import (
    CONV1D,
    LINEAR,
    ModuleVerdict,
    PlannerResult,
    Tensors,
    first_match,
    pattern_matches,
    settle_skip_list,
    user_skip_rules,
)
from bnbcli.plan.planners.hf_diffusers import diffusers_skips
from bnbcli.plan.scheme import QuantScheme

LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer number between dots: "model.layers.12.mlp"
Modules = dict[str, tuple[str, str | None]]  # module name → (class, "linear" | "conv1d" | "linear-subclass" | None)


class NotInTable(Exception):
    """The table cannot answer for this checkpoint; the message says why."""


@cache
def table() -> dict[str, Any]:
    text = resources.files("bnbcli.data").joinpath("planner_table.json").read_text()
    return json.loads(text)


def installed(library: str) -> str | None:
    """The installed library's version, read from its metadata (no import)."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> tuple[int, ...]:
    """(major, minor): a patch release does not change which modules are quantized."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def checked_range(library: str, data: dict[str, Any] | None = None) -> tuple[str, str]:
    """The oldest and newest releases of the library that the table was checked against."""
    versions = sorted((data or table())["checked_with"][library], key=_minor)
    return versions[0], versions[-1]


def entry_for(config: Mapping[str, Any], data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model class, its table entry), or NotInTable. A diffusers config names its class in `_class_name`,
    a transformers one in `architectures`."""
    library = "diffusers" if "_class_name" in config else "transformers"
    named = config.get("_class_name") if library == "diffusers" else (config.get("architectures") or [None])[0]
    entry = data["models"].get(named) if isinstance(named, str) else None
    if not isinstance(named, str) or entry is None or entry["library"] != library:
        raise NotInTable(f"the planner table has no {named!r}")
    if library == "transformers" and config.get("model_type", entry["model_type"]) != entry["model_type"]:
        raise NotInTable(f"model_type {config.get('model_type')!r} is not {named}'s {entry['model_type']!r}")
    version = installed(library)
    low, high = checked_range(library, data)
    if version is not None and not _minor(low) <= _minor(version) <= _minor(high):
        raise NotInTable(f"the planner table was checked against {library} {low} to {high}, not {version}")
    if version is not None and _minor(version) in {_minor(v) for v in entry.get("differs_with", ())}:
        raise NotInTable(f"the planner table's {named} does not hold for {library} {version}")
    return named, entry


def count_key(head: str) -> str:
    """The table's name for the numbered position after ``head``: its numbers so far as `#`.
    ("model.layers.3.experts." → "model.layers.#.experts.#")"""
    return LAYER_INDEX.sub("#", head) + "#"


def _count(config: Mapping[str, Any], entry: dict[str, Any], head: str) -> int:
    prefix = count_key(head)
    key = entry["counts"].get(prefix)
    if key is None:
        raise NotInTable(f"the planner table does not know what counts {prefix}")
    if isinstance(key, int):  # fixed by the architecture
        return key
    value = config.get(key, entry["defaults"].get(key))
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
        raise NotInTable(f"config.json {key} is {value!r}")
    return value


def expand(pattern: str, config: Mapping[str, Any], entry: dict[str, Any]) -> list[str]:
    """Every name of a pattern in this model: each `#` from 0 to the count config.json gives it."""
    if "#" not in pattern:
        return [pattern]
    head, _, tail = pattern.partition("#")
    count = _count(config, entry, head)
    return [name for i in range(count) for name in expand(f"{head}{i}{tail}", config, entry)]


def _last(pattern: str, config: Mapping[str, Any], entry: dict[str, Any]) -> str:
    """The model's last parameter: in the last of its numbered layers (OPT: the last layer's norm bias)."""
    while "#" in pattern:
        head, _, tail = pattern.partition("#")
        pattern = f"{head}{_count(config, entry, head) - 1}{tail}"
    return pattern


def _check_shape(key: str, shape: tuple[int, ...], dims: list[Any], config: Mapping[str, Any]) -> None:
    """The checkpoint's shape against config.json, dimension by dimension where the table knows the rule (a
    product of config.json values and constant factors). A mismatch goes to the real planner, which either
    names the contradiction or knows a rule the table missed (say a key the table's model left unset)."""
    if len(shape) != len(dims):
        raise NotInTable(f"{key} has {len(shape)} dimensions; the table expects {len(dims)}")
    for n, factors in zip(shape, dims, strict=True):
        values = [f if isinstance(f, int) else config.get(f) for f in factors or [None]]
        known = [v for v in values if type(v) is int]
        if len(known) == len(values) and math.prod(known) != n:
            raise NotInTable(f"{key} has shape {list(shape)}; the table expects {dims}")


def _model(
    config: Mapping[str, Any], tensors: Tensors, named: str, entry: dict[str, Any]
) -> tuple[Modules, dict[str, str]]:
    """The model's modules and state_dict keys, once the checkpoint is known to be exactly its state_dict (and
    buffers the model keeps out of it, which transformers calls "not a parameter")."""
    modules = {n: (kind[0], kind[1]) for p, kind in entry["modules"].items() for n in expand(p, config, entry)}
    state = {name: pattern for pattern in entry["state"] for name in expand(pattern, config, entry)}
    buffers = {name for pattern in entry["buffers"] for name in expand(pattern, config, entry)}
    stray = next((key for key in tensors if key not in state and key not in buffers), None)
    if stray is not None:
        raise NotInTable(f"{stray} is not a state_dict key of {named} as the table has it")
    for key, (shape, _) in tensors.items():
        if key in state:
            _check_shape(key, shape, entry["dims"][state[key]], config)
    tied = set(_tie(config, entry)["tied"]) if "tied" in entry else set()  # tied copies may be absent
    weights = (f"{name}.weight" for name, (_, role) in modules.items() if role is not None)
    missing = next((w for w in weights if w not in tensors and w not in tied), None)
    if missing is not None:
        raise NotInTable(f"the checkpoint has no {missing}")
    return modules, state


def _tie(config: Mapping[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    tied = config.get("tie_word_embeddings", entry["defaults"].get("tie_word_embeddings"))
    return entry["tied" if tied else "untied"]


def plan_modules(
    config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme, data: dict[str, Any] | None = None
) -> PlannerResult:
    """The library planner's PlannerResult for this checkpoint (hf_transformers / hf_diffusers
    plan_modules), or NotInTable. ``data`` is the table (the packaged one by default)."""
    data = data or table()
    named, entry = entry_for(config, data)
    modules, state = _model(config, tensors, named, entry)
    library = entry["library"]
    verdicts, reload_converts = (_transformers if library == "transformers" else _diffusers)(
        modules, config, entry, scheme
    )
    low, high = checked_range(library, data)
    versions = low if low == high else f"{low} to {high}"
    result = PlannerResult(
        planner=library,
        reason=f"{library}' rules for {named}, from bnb's planner table (checked against {library} {versions})",
        verdicts=verdicts,
        params={key: key for key in tensors if key in state},
        kinds={name: cls for name, (cls, _) in modules.items()},
        model_label=named,
    )
    result.skip_modules = settle_skip_list(verdicts, reload_converts)
    return result


def _transformers(modules: Modules, config: Mapping[str, Any], entry: dict[str, Any], scheme: QuantScheme) -> Any:
    """hf_transformers.plan_modules' verdicts: exact nn.Linear and Conv1D, less transformers' default skips
    (`quantizers/base.py` get_keys_to_not_convert, split by cause), keep_in_fp32 and the user's patterns."""
    tie = _tie(config, entry)
    tied = sorted({k.removesuffix(".weight") for pair in tie["tied"].items() for k in pair})
    last = [_last(tie["last_param"], config, entry).removesuffix(".weight")] if tie["last_param"] else []
    keep_fp32 = list(entry["keep_fp32"])
    not_convert = sorted({*tied, *tie["output_embedding"], *last, *scheme.skip, *keep_fp32})
    rules = [
        ("tied weight", tied),
        ("output embedding", list(tie["output_embedding"])),
        ("last module", last),
        ("_keep_in_fp32_modules", keep_fp32),
        *user_skip_rules(scheme),
        ("transformers default skip (get_keys_to_not_convert)", not_convert),
    ]
    verdicts: dict[str, ModuleVerdict] = {}
    for name, (cls, role) in modules.items():
        if role == "linear-subclass":
            why = f"{cls} subclasses nn.Linear; transformers v5 replaces only exact nn.Linear"
            verdicts[name] = ModuleVerdict(name, False, why)
        elif role is not None and not any(pattern_matches(name, p) for p in not_convert):
            verdicts[name] = ModuleVerdict(name, True, CONV1D if role == "conv1d" else LINEAR, role == "conv1d")
        elif role is not None:
            hit = first_match(name, rules)
            verdicts[name] = ModuleVerdict(name, False, hit[0] if hit else "skipped by transformers")

    def reload_converts(name: str, skip: list[str]) -> bool:
        # transformers reloading with our explicit list uses it instead of its defaults (plus keep_fp32)
        return modules[name][1] in ("linear", "conv1d") and not any(
            pattern_matches(name, p) for p in [*skip, *keep_fp32]
        )

    return verdicts, reload_converts


def _diffusers(modules: Modules, config: Mapping[str, Any], entry: dict[str, Any], scheme: QuantScheme) -> Any:
    """hf_diffusers.plan_modules' verdicts: every nn.Linear, subclasses too, less keep_in_fp32 and the
    user's patterns; no default skips."""
    keep_fp32 = list(entry["keep_fp32"])
    user_rules = user_skip_rules(scheme)
    verdicts: dict[str, ModuleVerdict] = {}
    for name, (_, role) in modules.items():
        if role not in ("linear", "linear-subclass"):
            continue
        hit = first_match(name, user_rules)
        if diffusers_skips(name, keep_fp32):
            verdicts[name] = ModuleVerdict(name, False, "_keep_in_fp32_modules")
        elif hit is not None:
            verdicts[name] = ModuleVerdict(name, False, hit[0])
        else:
            verdicts[name] = ModuleVerdict(name, True, LINEAR)

    def reload_converts(name: str, skip: list[str]) -> bool:
        return not diffusers_skips(name, [*skip, *keep_fp32])

    return verdicts, reload_converts
