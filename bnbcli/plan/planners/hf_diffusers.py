"""Planner 2: diffusers builds the component (config.json `_class_name`) on the meta device.

diffusers' rules for bitsandbytes (`quantizers/bitsandbytes/bnb_quantizer.py`
`_process_model_before_weight_loading` and `utils.py` `_replace_with_bnb_linear`): every module
that `isinstance(m, nn.Linear)` (subclasses too) is replaced, except `_keep_in_fp32_modules` and the
skip list. Unlike transformers there are no default skips: not the last module, not an output
layer (the golden flux_tiny variants quantize `proj_out`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bnbcli.plan.planners.common import (
    LINEAR,
    ModuleVerdict,
    PlannerResult,
    Tensors,
    first_match,
    settle_skip_list,
    user_skip_rules,
)
from bnbcli.plan.planners.hf_transformers import NotImportable, NotKnown, quiet
from bnbcli.plan.scheme import QuantScheme


def diffusers_skips(full_name: str, patterns: Sequence[str]) -> bool:
    """diffusers `_replace_with_bnb_linear`: skip when the child's own name is listed, or a listed key
    equals the full name or occurs in it followed by a dot (an ancestor; a substring test)."""
    child = full_name.rpartition(".")[2]
    return child in patterns or any(key + "." in full_name or key == full_name for key in patterns)


def resolve_class(config: Mapping[str, Any]) -> tuple[type, str]:
    """The diffusers model class config.json's ``_class_name`` names, and the plan's reason."""
    try:
        with quiet():
            import diffusers
    except ImportError as err:
        raise NotImportable(f"diffusers is not importable ({err})") from None
    name = config.get("_class_name")
    with quiet():  # resolving a class imports its module, and bitsandbytes with it (noisy on CPU)
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise NotKnown(f"diffusers {diffusers.__version__} has no model class {name!r}")
    return cls, f"diffusers {diffusers.__version__} built {name} on the meta device"


def plan_modules(config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme) -> PlannerResult:
    import torch
    from torch import nn

    cls, reason = resolve_class(config)
    try:
        with quiet(), torch.device("meta"):
            model = cls.from_config(dict(config))  # type: ignore[attr-defined]
    except Exception as err:
        why = f"diffusers could not build {cls.__name__} from config.json ({type(err).__name__}: {err})"
        raise NotKnown(why) from None
    # `ModelMixin.from_pretrained` passes the class attribute on when the quantizer sets
    # `use_keep_in_fp32_modules` (the bnb quantizers do).
    keep = cls._keep_in_fp32_modules or []  # type: ignore[attr-defined]
    keep_fp32 = [keep] if isinstance(keep, str) else list(keep)
    user_rules = user_skip_rules(scheme)

    verdicts: dict[str, ModuleVerdict] = {}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        kinds[name] = type(module).__name__
        if not isinstance(module, nn.Linear):
            continue
        shape = tuple(module.weight.shape)
        hit = first_match(name, user_rules)
        if diffusers_skips(name, keep_fp32):
            verdicts[name] = ModuleVerdict(name, False, "_keep_in_fp32_modules", shape=shape)
        elif hit is not None:
            verdicts[name] = ModuleVerdict(name, False, hit[0], shape=shape)
        else:
            verdicts[name] = ModuleVerdict(name, True, LINEAR, shape=shape)

    def reload_converts(name: str, skip: list[str]) -> bool:
        return not diffusers_skips(name, [*skip, *keep_fp32])

    meta_sd = model.state_dict()
    result = PlannerResult(
        planner="diffusers",
        reason=reason,
        verdicts=verdicts,
        params={key: key for key in tensors if key in meta_sd},  # diffusers loads by exact name
        kinds=kinds,
        param_shapes={n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
        model_label=cls.__name__,
    )
    result.skip_modules = settle_skip_list(verdicts, reload_converts)
    return result
