"""Planner 1: transformers builds the model on the meta device and its own rules pick the modules.

This reproduces what `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` does in
transformers v5 (`quantizers/quantizer_bnb_4bit.py` `_process_model_before_weight_loading`), calling
transformers' functions wherever they exist, with one deliberate difference: the user's skip
patterns are added to the default skips (`add_default_skips=True`) instead of replacing them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from bnbcli.plan.planners.common import (
    CONV1D,
    LINEAR,
    ModuleVerdict,
    PlannerResult,
    Tensors,
    first_match,
    settle_skip_list,
    user_skip_rules,
)
from bnbcli.plan.scheme import QuantScheme

if TYPE_CHECKING:  # torch comes in when a model is built: the planner table and the cache plan without it
    from torch import nn


class NotKnown(Exception):
    """transformers is missing or does not know this model; the message says which (for plan.reason)."""


class NotImportable(NotKnown):
    """The library itself cannot be imported (not an answer about the model: never cached)."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' config warnings and the notices of bitsandbytes and its kernel hub: output.py alone
    writes to the terminal, and the plan's reason already says what was built."""
    saved = {name: logging.getLogger(name).level for name in ("transformers", "diffusers", "bitsandbytes", "kernels")}
    try:
        for name in saved:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def resolve_class(config: Mapping[str, Any]) -> tuple[type, str]:
    """The model class from `architectures[0]`, else from `model_type` (a causal LM if it has one)."""
    try:
        with quiet():
            import transformers
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
    except ImportError as err:
        raise NotImportable(f"transformers is not importable ({err})") from None
    version = transformers.__version__
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch is not None:
        cls = _class_named(transformers, arch)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, f"transformers {version} built {arch} on the meta device"
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
        cls = _class_named(transformers, name) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            why = f"architectures[0] {arch!r} is not in transformers" if arch else "config.json names no architecture"
            return cls, f"transformers {version} built {name} on the meta device ({why}; chosen by model_type)"
    known = f"architecture {arch!r}" if arch else f"model_type {model_type!r}"
    raise NotKnown(f"transformers {version} does not know {known}")


def _class_named(module: Any, name: str) -> Any:
    """`getattr` on transformers' lazy module; a class whose optional dependency is missing is unknown."""
    try:
        with quiet():
            return getattr(module, name, None)
    except Exception:
        return None


class ConfigTooLarge(Exception):
    """config.json describes a model far larger than the checkpoint holds."""


@contextlib.contextmanager
def module_budget(tensor_count: int) -> Iterator[None]:
    """Stop building a model once it has far more modules than the checkpoint has tensors.

    A config.json that says 2**31 layers (a typo, or a hostile file) would otherwise keep the meta build
    busy for hours; a real model has about one module per tensor (plus activations, dropouts, norms).
    """
    from torch import nn

    limit = 64 * tensor_count + 4096
    count = 0

    def count_module(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ConfigTooLarge(
                f"config.json describes more than {limit} modules for a checkpoint of {tensor_count} tensors"
            )

    handle = nn.modules.module.register_module_module_registration_hook(count_module)
    try:
        yield
    finally:
        handle.remove()


def build_meta_model(cls: type, config: Mapping[str, Any], tensor_count: int) -> nn.Module:
    """The model skeleton on the meta device: parameters have shapes but no storage (fast, no RAM)."""
    import torch

    with quiet(), module_budget(tensor_count):
        cfg = cls.config_class.from_dict(dict(config))  # type: ignore[attr-defined]
        with torch.device("meta"):
            return cls._from_config(cfg)  # type: ignore[attr-defined]


def bnb_quantizer(scheme: QuantScheme) -> Any:
    """transformers' own bitsandbytes quantizer object, pre-quantized (its methods need no bitsandbytes)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=scheme.is_4bit, load_in_8bit=not scheme.is_4bit, llm_int8_threshold=scheme.threshold
    )
    return AutoHfQuantizer.from_config(bnb_config, pre_quantized=True)


def _default_skip_rules(model: Any) -> list[tuple[str, list[str]]]:
    """`quantizers/base.py` `get_keys_to_not_convert`, split by cause so each skip can say why."""
    tied_map = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {k.removesuffix(".weight") for k in (*tied_map.keys(), *tied_map.values())}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_names = [n for n, m in model.named_modules() if output is not None and m is output]
    params = list(model.named_parameters())
    # The function removes only ".weight": when the last parameter is a bias the entry names no module.
    last = [params[-1][0].removesuffix(".weight")] if params else []
    keep = sorted(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [
        ("tied weight", sorted(tied)),
        ("output embedding", out_names),
        ("last module", last),
        ("_keep_in_fp32_modules", keep),
    ]


def checkpoint_params(model: Any, keys: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Checkpoint key → model parameter, the way `core_model_loading.convert_and_load_state_dict_in_model`
    renames keys (legacy renamings, the model's conversion mapping, adding/stripping base_model_prefix).
    Keys that a WeightConverter rewrites (merges, splits) come back in the second dict."""
    meta_sd = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # older transformers: exact names, or with/without base_model_prefix
        return {k: p for k in keys if (p := _simple_rename(k, prefix, meta_sd)) is not None}, {}
    with quiet():
        mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    params: dict[str, str] = {}
    converted: dict[str, str] = {}
    for key in sorted(keys, key=dot_natural_key):  # the loader's order: some renamings are stateful
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
        if renamed in meta_sd:
            params[key] = renamed
            if pattern is not None:
                converted[key] = f"rewritten on load by a transformers WeightConverter ({pattern!r})"
    return params, converted


def _simple_rename(key: str, prefix: str | None, meta_sd: Mapping[str, Any]) -> str | None:
    if key in meta_sd:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in meta_sd:
        return key[len(prefix) + 1 :]
    if prefix and f"{prefix}.{key}" in meta_sd:
        return f"{prefix}.{key}"
    return None


def plan_modules(config: Mapping[str, Any], tensors: Tensors, scheme: QuantScheme) -> PlannerResult:
    cls, reason = resolve_class(config)
    try:
        model = build_meta_model(cls, config, len(tensors))
    except Exception as err:  # a config the class rejects: let the caller fall back, saying why
        why = f"transformers could not build {cls.__name__} from config.json ({type(err).__name__}: {err})"
        raise NotKnown(why) from None
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    quantizer = bnb_quantizer(scheme)
    # `HfQuantizer.preprocess_model`: pre-quantized models first swap some modules (Llama4 experts).
    if hasattr(quantizer, "_convert_model_for_quantization"):
        quantizer._convert_model_for_quantization(model)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    # Ours: the user's patterns ADD to the defaults (`add_default_skips=True`), unlike a plain
    # `llm_int8_skip_modules`, which replaces them (transformers issue #45674).
    not_convert = quantizer.get_modules_to_not_convert(model, list(scheme.skip), keep_fp32, add_default_skips=True)
    rules = _default_skip_rules(model) + user_skip_rules(scheme)
    rules.append(("transformers default skip (get_keys_to_not_convert)", not_convert))

    verdicts: dict[str, ModuleVerdict] = {}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        kinds[name] = type(module).__name__
        # `integrations/bitsandbytes.py` `replace_with_bnb_linear`: Conv1D, or exactly nn.Linear
        is_conv1d = isinstance(module, Conv1D)
        if not (is_conv1d or isinstance(module, nn.Linear)):
            continue
        shape = tuple(module.weight.shape)
        if not is_conv1d and type(module) is not nn.Linear:
            why = f"{type(module).__name__} subclasses nn.Linear; transformers v5 replaces only exact nn.Linear"
            verdicts[name] = ModuleVerdict(name, False, why, shape=shape)
        elif should_convert_module(name, not_convert):
            verdicts[name] = ModuleVerdict(name, True, CONV1D if is_conv1d else LINEAR, is_conv1d, shape)
        else:
            hit = first_match(name, rules)
            verdicts[name] = ModuleVerdict(name, False, hit[0] if hit else "skipped by transformers", shape=shape)

    def reload_converts(name: str, skip: list[str]) -> bool:
        # Reloading with our explicit list: transformers then uses the list INSTEAD of its defaults.
        patterns = quantizer.get_modules_to_not_convert(model, list(skip), keep_fp32)
        if not should_convert_module(name, patterns):
            return False
        module = model.get_submodule(name)
        return isinstance(module, Conv1D) or type(module) is nn.Linear

    params, converted = checkpoint_params(model, list(tensors))
    return PlannerResult(
        planner="transformers",
        reason=reason,
        verdicts=verdicts,
        params=params,
        kinds=kinds,
        converted=converted,
        param_shapes={n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
        model_label=cls.__name__,
        skip_modules=settle_skip_list(verdicts, reload_converts),
    )
