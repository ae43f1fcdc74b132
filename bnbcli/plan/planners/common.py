"""Records and helpers shared by the planners: module verdicts → per-tensor decisions, the skip list.

A planner decides per *module* (a Linear is quantized or kept, and why); this module turns those
verdicts into per-*tensor* decisions over the checkpoint's own names and checks the checkpoint
against the model (missing weights, contradicting shapes, storage sizes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from bnbcli.errors import EXIT_USAGE, BnbError, InputError, UsageError
from bnbcli.formats.dtypes import FLOAT_DTYPES, DType, dtype_name
from bnbcli.plan.scheme import QuantScheme

Tensors = Mapping[str, tuple[tuple[int, ...], DType]]
Action = Literal["quantize", "keep"]

LINEAR = "Linear"
CONV1D = "Conv1D (transposed to [out, in])"


class PlanInconsistent(BnbError):
    """The explicit skip list would not reproduce the plan on reload: a bug in bnb, not in the input."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class TensorDecision:
    """What happens to one checkpoint tensor. ``module`` is the model's module name (None if unknown)."""

    name: str
    action: Action
    reason: str
    transpose: bool = False
    module: str | None = None


@dataclass(frozen=True)
class ModuleVerdict:
    """A Linear-like module (the only kind bitsandbytes replaces) and the planner's decision on it."""

    name: str  # full dotted module name in the model tree
    quantize: bool
    reason: str
    transpose: bool = False  # Conv1D stores [in, out]; bnb wants [out, in]
    shape: tuple[int, ...] | None = None  # the weight's shape as the model (meta) declares it, if known


@dataclass
class PlannerResult:
    """What a planner hands to ``assemble``: verdicts on Linear-like modules plus the key mapping."""

    planner: str
    reason: str
    verdicts: dict[str, ModuleVerdict]
    # checkpoint key → the model's parameter name ("<module>.<leaf>"); absent = not in the model
    params: dict[str, str]
    # other modules' class names, to explain why they are kept ("not a Linear (Embedding)")
    kinds: dict[str, str] = field(default_factory=dict)
    # checkpoint keys that a loader rewrites (merges, splits) with the reason
    converted: dict[str, str] = field(default_factory=dict)
    # model parameter shapes as declared (meta), to catch a checkpoint that contradicts config.json
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model_label: str = "the model"
    # reasons for checkpoint keys outside any verdict, where the planner knows better than kept_reason
    notes: dict[str, str] = field(default_factory=dict)
    # the explicit llm_int8_skip_modules (settle_skip_list), set by the planner
    skip_modules: tuple[str, ...] = ()
    # why config.json's library (transformers, diffusers) could not plan, when name rules stood in for it
    fallback: str | None = None


# --- skip patterns --------------------------------------------------------------------------------

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def pattern_matches(full_name: str, pattern: str) -> bool:
    """One pattern of transformers v5 `quantizers/quantizers_utils.py` `should_convert_module`.

    A pattern matches from the start up to a module boundary (as a regex: "layers.1" matches
    "layers.1.mlp", not "layers.11"), or as a plain suffix ("fc1" matches "model.layers.0.fc1"; the
    suffix test is not boundary-aware). The user's --skip patterns mean this in every planner.
    """
    return bool(re.match(rf"(?:{pattern}){_BOUNDARY}", full_name)) or full_name.endswith(pattern)


def first_match(full_name: str, rules: Iterable[tuple[str, Iterable[str]]]) -> tuple[str, str] | None:
    """The first (reason, pattern) whose pattern matches, in rule order."""
    for reason, patterns in rules:
        for pattern in patterns:
            if pattern_matches(full_name, pattern):
                return reason, pattern
    return None


def user_skip_rules(scheme: QuantScheme) -> list[tuple[str, list[str]]]:
    return [(f"skipped by --skip {p!r}", [p]) for p in scheme.skip]


def settle_skip_list(
    verdicts: dict[str, ModuleVerdict], reload_converts: Callable[[str, list[str]], bool]
) -> tuple[str, ...]:
    """The explicit ``llm_int8_skip_modules``: every Linear-like module left unquantized, by full name.

    A loader matches these names as patterns (transformers also by suffix, diffusers also by child
    name), so an entry can catch a module we quantize ("lm_head" also ends "x.lm_head"). Such a module
    is kept as well (its verdict is rewritten in place) until the loader's decisions on the explicit
    list equal ours. ``reload_converts(name, skip_list)`` is the loader's own rule.
    """
    while True:
        skip = sorted(name for name, v in verdicts.items() if not v.quantize)
        caught = [n for n, v in verdicts.items() if v.quantize and not reload_converts(n, skip)]
        if not caught:
            break
        for name in caught:
            entry = next((s for s in skip if not reload_converts(name, [s])), None)
            why = f"llm_int8_skip_modules entry {entry!r} matches it on reload" if entry else "the loader skips it"
            verdicts[name] = ModuleVerdict(name, False, why, shape=verdicts[name].shape)
    wrong = [n for n, v in verdicts.items() if not v.quantize and reload_converts(n, skip)]
    if wrong:
        raise PlanInconsistent(
            f"the explicit skip list does not keep {wrong[0]!r} unquantized on reload",
            hint="please report this with the model's config.json",
        )
    return tuple(skip)


# --- verdicts → tensor decisions ------------------------------------------------------------------


def kept_reason(leaf: str, kind: str | None) -> str:
    """Why a tensor outside any Linear-like module stays as it is."""
    if leaf == "bias":
        return "bias"
    if kind is not None and "norm" in kind.lower():
        return "norm"
    if kind is not None:
        return f"not a Linear ({kind})"
    return "not a Linear"


def assemble(result: PlannerResult, tensors: Tensors, scheme: QuantScheme) -> tuple[TensorDecision, ...]:
    """Per-tensor decisions in checkpoint order, after checking the checkpoint against the model."""
    by_param: dict[str, str] = {}
    for source, target in result.params.items():
        by_param.setdefault(target, source)
    for name, v in result.verdicts.items():
        if v.quantize and f"{name}.weight" not in by_param:
            raise InputError(
                f"the checkpoint has no tensor for {name}.weight, which {result.model_label} quantizes",
                hint="the checkpoint does not match its config.json; check the files, or --skip the module",
            )
    decisions = []
    for key, (shape, _) in tensors.items():
        param = result.params.get(key)
        if param is None:
            decisions.append(TensorDecision(key, "keep", f"not a parameter of {result.model_label}"))
            continue
        expected = result.param_shapes.get(param)
        if expected is not None and key not in result.converted and tuple(shape) != tuple(expected):
            raise InputError(
                f"{key} has shape {list(shape)}, a shape that contradicts config.json "
                f"({result.model_label} declares {list(expected)} for {param})",
                hint="the checkpoint and config.json do not belong together",
            )
        module, _, leaf = param.rpartition(".")
        verdict = result.verdicts.get(module)
        if key in result.converted:
            if verdict is not None and verdict.quantize and leaf == "weight":
                raise InputError(
                    f"{key} is rewritten on load ({result.converted[key]}), so it cannot be quantized alone",
                    hint=f"--skip {module!r} keeps it as it is",
                )
            decisions.append(TensorDecision(key, "keep", result.converted[key], module=module or None))
        elif verdict is not None and leaf == "weight":
            action: Action = "quantize" if verdict.quantize else "keep"
            transpose = verdict.transpose and verdict.quantize
            decisions.append(TensorDecision(key, action, verdict.reason, transpose, module))
        else:
            reason = result.notes.get(key) or kept_reason(leaf, result.kinds.get(module))
            decisions.append(TensorDecision(key, "keep", reason, module=module or None))
    return tuple(decisions)


def check_quantizable(decisions: Iterable[TensorDecision], tensors: Tensors, scheme: QuantScheme) -> None:
    """Refuse a plan that quantizes a tensor bitsandbytes cannot quantize, with the flag that gets past it."""
    for d in decisions:
        if d.action == "quantize":
            shape, dtype = tensors[d.name]
            _check_quantizable(d.name, d.module or d.name.rpartition(".")[0], shape, dtype, scheme)


def _check_quantizable(key: str, module: str, shape: tuple[int, ...], dtype: DType, scheme: QuantScheme) -> None:
    keep = f"--skip {module!r} keeps it as it is"
    # --dtype casts floating-point tensors only (an int64 or bool weight stays what it is)
    source = scheme.dtype if scheme.dtype is not None and dtype.is_floating_point else dtype
    if source not in FLOAT_DTYPES:
        # bitsandbytes quantizes fp16/bf16/fp32 only (`backends/cuda/ops.py` quantize_4bit; int8 casts to fp16)
        raise InputError(
            f"{key} is {dtype_name(dtype)}; bitsandbytes quantizes float16, bfloat16 or float32 weights",
            hint=f"--dtype bfloat16 casts it, or {keep}" if dtype.is_floating_point else keep,
        )
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0:
        raise InputError(f"{key} is empty and cannot be quantized", hint=keep)
    if scheme.is_4bit:
        itemsize = scheme.quant_storage.itemsize
        packed_bytes = (numel + 1) // 2
        if packed_bytes % itemsize:
            # bitsandbytes allocates (n + 1) // (2 * itemsize) storage elements (`backends/cuda/ops.py`
            # quantize_4bit): with a wider storage dtype the last packed bytes would not fit.
            raise UsageError(
                f"{key} packs into {packed_bytes} bytes, not a multiple of {itemsize}: "
                f"{dtype_name(scheme.quant_storage)} storage cannot hold its last values",
                hint="use --quant-storage uint8 (the default)",
            )
