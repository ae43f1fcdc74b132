"""Planner 0: transformers' decisions for the architectures people convert, from a table, without importing
transformers (seconds on a laptop, up to 25 s on a GPU machine: more than converting an 8B model).

`bnbcli/data/planner_table.json` is made by `scripts/make_planner_table.py` from an installed transformers:
for each architecture, every module of the model built on the meta device (its name with layer numbers as
`#`, its class, whether transformers' bitsandbytes quantizer replaces it), the state_dict keys, the tied
weights, the last parameter, the output embedding and `_keep_in_fp32_modules` (with and without
`tie_word_embeddings`), and which config.json key counts each `#`. It lists the transformers versions
whose rules it was checked against; tests/test_planner_table.py compares it with transformers itself.

The table answers only when the checkpoint is exactly the model it describes for this config.json: every
tensor is a state_dict key of the expanded model, and every Linear weight the model has is in the
checkpoint. Anything else (renamed keys, merged experts, missing weights, an architecture or a
transformers version it does not know) is left to the real planner, which sees the model itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import metadata, resources
from typing import Any

from bnbcli.planning.common import (
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
from bnbcli.scheme import QuantScheme

LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer number between dots: "model.layers.12.mlp"


class NotInTable(Exception):
    """The table cannot answer for this checkpoint; the message says why (for the plan's reason)."""


@cache
def table() -> dict[str, Any]:
    text = resources.files("bnbcli.data").joinpath("planner_table.json").read_text()
    return json.loads(text)


def installed_transformers() -> str | None:
    """The installed transformers' version, read from its metadata (no import)."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> tuple[int, ...]:
    """(major, minor): a patch release does not change which modules are quantized."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def checked_range(data: dict[str, Any] | None = None) -> tuple[str, str]:
    """The oldest and newest transformers the table was checked against (tests on both)."""
    versions = sorted((data or table())["checked_with"], key=_minor)
    return versions[0], versions[-1]


def entry_for(config: Mapping[str, Any], data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(architecture, its table entry), or NotInTable."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    entries = data["architectures"]
    if arch is None or arch not in entries:
        raise NotInTable(f"the planner table has no {arch!r}" if arch else "config.json names no architecture")
    entry = entries[arch]
    if config.get("model_type", entry["model_type"]) != entry["model_type"]:
        raise NotInTable(f"model_type {config.get('model_type')!r} is not {arch}'s {entry['model_type']!r}")
    version = installed_transformers()
    low, high = checked_range(data)
    if version is not None and not _minor(low) <= _minor(version) <= _minor(high):
        raise NotInTable(f"the planner table was checked against transformers {low} to {high}, not {version}")
    return arch, entry


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


def _tie(config: Mapping[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    tied = config.get("tie_word_embeddings", entry["defaults"].get("tie_word_embeddings"))
    return entry["tied" if tied else "untied"]


def plan_modules(
    config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme, data: dict[str, Any] | None = None
) -> PlannerResult:
    """transformers' PlannerResult for this checkpoint (hf_transformers.plan_modules), or NotInTable.
    ``data`` is the table (the packaged one by default)."""
    data = data or table()
    arch, entry = entry_for(config, data)
    tie = _tie(config, entry)
    modules = {name: kind for pattern, kind in entry["modules"].items() for name in expand(pattern, config, entry)}
    state = {name: pattern for pattern in entry["state"] for name in expand(pattern, config, entry)}
    stray = next((key for key in tensors if key not in state), None)
    if stray is not None:
        raise NotInTable(f"{stray} is not a state_dict key of {arch} as the table has it")
    for key, (shape, _) in tensors.items():
        _check_shape(key, shape, entry["dims"][state[key]], config)
    tied_targets = set(tie["tied"])  # tied copies may be absent from the checkpoint
    weights = (f"{name}.weight" for name, (_, role) in modules.items() if role is not None)
    missing = next((w for w in weights if w not in tensors and w not in tied_targets), None)
    if missing is not None:
        raise NotInTable(f"the checkpoint has no {missing}")

    # `quantizers/base.py` get_keys_to_not_convert, split by cause (as hf_transformers._default_skip_rules)
    tied_modules = sorted({k.removesuffix(".weight") for pair in tie["tied"].items() for k in pair})
    last = [_last(tie["last_param"], config, entry).removesuffix(".weight")] if tie["last_param"] else []
    keep_fp32 = list(entry["keep_fp32"])
    defaults = [*tied_modules, *tie["output_embedding"], *last]
    rules = [
        ("tied weight", tied_modules),
        ("output embedding", list(tie["output_embedding"])),
        ("last module", last),
        ("_keep_in_fp32_modules", sorted(keep_fp32)),
        *user_skip_rules(scheme),
    ]
    not_convert = sorted({*defaults, *scheme.skip, *keep_fp32})
    rules.append(("transformers default skip (get_keys_to_not_convert)", not_convert))

    verdicts: dict[str, ModuleVerdict] = {}
    for name, (cls, role) in modules.items():
        if role is None:
            continue
        if role == "linear-subclass":
            why = f"{cls} subclasses nn.Linear; transformers v5 replaces only exact nn.Linear"
            verdicts[name] = ModuleVerdict(name, False, why)
        elif not any(pattern_matches(name, p) for p in not_convert):
            verdicts[name] = ModuleVerdict(name, True, CONV1D if role == "conv1d" else LINEAR, role == "conv1d")
        else:
            hit = first_match(name, rules)
            verdicts[name] = ModuleVerdict(name, False, hit[0] if hit else "skipped by transformers")

    def reload_converts(name: str, skip: list[str]) -> bool:
        # transformers reloading with our explicit list uses it instead of its defaults (plus keep_fp32)
        return modules[name][1] in ("linear", "conv1d") and not any(
            pattern_matches(name, p) for p in [*skip, *keep_fp32]
        )

    low, high = checked_range(data)
    versions = low if low == high else f"{low} to {high}"
    result = PlannerResult(
        planner="transformers",
        reason=f"transformers' rules for {arch}, from bnb's planner table (checked against transformers {versions})",
        verdicts=verdicts,
        params={key: key for key in tensors},
        kinds={name: cls for name, (cls, _) in modules.items()},
        model_label=arch,
    )
    result.skip_modules = settle_skip_list(verdicts, reload_converts)
    return result
