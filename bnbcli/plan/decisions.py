"""The plan: which checkpoint tensor is quantized, which is kept, and why; and the quantization_config.

Three planners, tried in this order (`plan_quantization(planner="auto")`):

0. transformers' or diffusers' decisions from bnb's planner table, for the models it lists, when the
   checkpoint is exactly the model it describes (`bnbcli/plan/planners/table.py`): neither library is imported;
1. transformers (config.json has `architectures`/`model_type` it knows): builds the model on the meta
   device and applies transformers v5's own rules (`bnbcli/plan/planners/hf_transformers.py`);
2. diffusers (config.json has a `_class_name` it knows): the same with diffusers' rules
   (`bnbcli/plan/planners/hf_diffusers.py`);
3. name rules: a heuristic over names and shapes (`bnbcli/plan/planners/name_rules.py`).

Whatever the planner, the result carries an explicit, complete `skip_modules` list that goes into
config.json as `llm_int8_skip_modules`, so reloading never depends on a library's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from bnbcli.errors import InputError, UsageError
from bnbcli.formats.dtypes import DType, dtype_name
from bnbcli.formats.layout import quantized_keys
from bnbcli.plan.dtype import model_dtype
from bnbcli.plan.planners import cache as plan_cache
from bnbcli.plan.planners import hf_diffusers, hf_transformers, name_rules, table
from bnbcli.plan.planners.common import (
    PlannerResult,
    TensorDecision,
    Tensors,
    assemble,
    check_quantizable,
    pattern_matches,
)
from bnbcli.plan.planners.hf_transformers import NotKnown
from bnbcli.plan.scheme import QuantScheme
from bnbcli.plan.scheme_names import PlannerName

__all__ = [
    "PlannerName",
    "QuantPlan",
    "TensorDecision",
    "plan_quantization",
    "quantization_config",
]


@dataclass(frozen=True)
class QuantPlan:
    """Every checkpoint tensor's decision, in checkpoint order, plus what config.json needs."""

    planner: str  # "transformers" | "diffusers" | "name-rules"
    reason: str  # why this planner, e.g. "transformers 5.23.0 built LlamaForCausalLM on the meta device"
    scheme: QuantScheme
    decisions: Mapping[str, TensorDecision]  # read-only, name → decision, in checkpoint order
    skip_modules: tuple[str, ...]  # Linear-like modules left unquantized → llm_int8_skip_modules
    model_dtype: DType  # the dtype the model loads in (config.json `dtype`, else the weights')
    unmatched_skip: tuple[str, ...] = ()  # --skip patterns that match no Linear-like module (likely typos)
    fallback: str | None = None  # why config.json's library could not plan it (name rules stood in)

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.decisions.values() if d.action == "quantize")

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.decisions.values() if d.action == "keep")

    def decision(self, name: str) -> TensorDecision:
        return self.decisions[name]

    def quantization_config(self) -> dict[str, Any]:
        return quantization_config(self.scheme, self.skip_modules, self.model_dtype)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON values (dtype names, lists) for `--json` and dry-run output."""
        return {
            "planner": self.planner,
            "reason": self.reason,
            "model_dtype": dtype_name(self.model_dtype),
            "skip_modules": list(self.skip_modules),
            "unmatched_skip": list(self.unmatched_skip),
            "tensors": [
                {"name": d.name, "action": d.action, "reason": d.reason, "transpose": d.transpose, "module": d.module}
                for d in self.decisions.values()
            ],
        }


def plan_quantization(
    config: Mapping[str, Any] | None,
    tensors: Tensors,
    scheme: QuantScheme,
    planner: PlannerName | None = "auto",
    strict: bool = True,
) -> QuantPlan:
    """Decide every tensor from config.json and the safetensors headers (name → (shape, dtype)).

    ``planner`` forces one planner (None means "auto"); a forced transformers/diffusers planner that cannot build the
    model is a UsageError, while "auto" falls back to the next planner and says why in ``reason`` and ``fallback``.
    ``strict=False`` (`bnb inspect`, which measures rather than writes) plans weights that bitsandbytes cannot
    quantize (an int64 or empty weight) instead of refusing them.
    """
    refuse_quantized(config, tensors)
    result = _run_planner(config, tensors, scheme, planner or "auto")
    decisions = assemble(result, tensors, scheme)
    if strict:
        check_quantizable(decisions, tensors, scheme)
    return QuantPlan(
        planner=result.planner,
        reason=result.reason,
        scheme=scheme,
        decisions=MappingProxyType({d.name: d for d in decisions}),
        skip_modules=result.skip_modules,
        model_dtype=model_dtype(config, (dtype for _, dtype in tensors.values()), scheme.dtype),
        unmatched_skip=tuple(p for p in scheme.skip if not any(pattern_matches(m, p) for m in result.verdicts)),
        fallback=result.fallback,
    )


def refuse_quantized(config: Mapping[str, Any] | None, names: Iterable[str]) -> None:
    """A bitsandbytes checkpoint is not quantized again: known by config.json's quantization_config or,
    without one, by its keys (quant_state, SCB), as `bnb inspect` and `bnb dequantize` know it."""
    if config is not None and config.get("quantization_config"):
        why = "config.json has a quantization_config"
    elif marks := quantized_keys(names):
        why = f"it holds bitsandbytes keys such as {marks[0]}"
    else:
        return
    raise InputError(
        f"the checkpoint is already quantized ({why})",
        hint="start from the unquantized checkpoint (`bnb dequantize SRC OUT` writes one)",
    )


def fallback_warning(component: str, fallback: str) -> str:
    """The warning for a plan made by name rules because config.json's library could not make it."""
    where = f"{component}: " if component else ""
    return (
        f"{where}planned by name rules (a guess from tensor names) because {fallback}; "
        "check the plan with --dry-run, or fix config.json"
    )


def _run_planner(
    config: Mapping[str, Any] | None, tensors: Tensors, scheme: QuantScheme, planner: PlannerName
) -> PlannerResult:
    if planner == "name-rules":
        return name_rules.plan_modules(config, tensors, scheme, "asked for with --planner name-rules")
    if planner not in ("auto", "transformers", "diffusers"):
        raise UsageError(f"unknown planner {planner!r}", hint="use auto, transformers, diffusers or name-rules")
    if config is None:
        if planner != "auto":
            raise UsageError(f"the {planner} planner needs the model's config.json", hint="use --planner name-rules")
        return name_rules.plan_modules(config, tensors, scheme, "there is no config.json")
    library = _library(config, planner)
    module = hf_diffusers if library == "diffusers" else hf_transformers
    if planner == "auto":
        try:
            return table.plan_modules(config, tensors, scheme)
        except table.NotInTable:
            pass  # the real planner sees the model itself
    try:
        return plan_cache.planned(
            library, config, tensors, scheme, lambda: module.plan_modules(config, tensors, scheme)
        )
    except NotKnown as why:
        if planner != "auto":
            raise UsageError(
                f"the {planner} planner cannot plan this model: {why}", hint="use --planner name-rules"
            ) from None
        why_line = " ".join(str(why).split())  # a library's message may span lines; a warning is one
        result = name_rules.plan_modules(config, tensors, scheme, why_line)
        result.fallback = why_line
        return result


def _library(config: Mapping[str, Any], planner: PlannerName) -> str:
    return planner if planner != "auto" else ("diffusers" if "_class_name" in config else "transformers")


def quantization_config(
    scheme: QuantScheme, skip_modules: tuple[str, ...] | list[str], model_dtype: DType
) -> dict[str, Any]:
    """Exactly what transformers' `BitsAndBytesConfig(...).to_dict()` returns (spec §6.1), keys sorted.

    `llm_int8_skip_modules` is the explicit list (never null); for int8 the 4-bit fields stay at
    BitsAndBytesConfig's defaults (fp4, float32, uint8, no double quant), as transformers writes them.
    """
    four = scheme.is_4bit
    config: dict[str, Any] = {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": dtype_name(scheme.compute_dtype or model_dtype) if four else "float32",
        "bnb_4bit_quant_storage": dtype_name(scheme.quant_storage) if four else "uint8",
        "bnb_4bit_quant_type": scheme.method if four else "fp4",
        "bnb_4bit_use_double_quant": scheme.double_quant if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_threshold": float(scheme.threshold),
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }
    return dict(sorted(config.items()))
