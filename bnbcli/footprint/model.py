"""What a loaded model holds, from its class built on the meta device: every parameter and buffer with
the dtype ``from_pretrained`` gives it. No weight is read; the model has shapes and dtypes only.

The rules, from the libraries' loaders (each function says where):
- transformers v5 (`core_model_loading.convert_and_load_state_dict_in_model`, "Handle dtype casting"):
  the model is built under the load dtype; a checkpoint tensor is cast to the dtype of the parameter
  it fills, or to float32 where the model's dtype plan (`_keep_in_fp32_modules` under fp16,
  `_keep_in_fp32_modules_strict` under fp16/bf16) names it.
- diffusers (`model_loading_utils.load_model_dict_into_meta`): floating tensors are cast to the load
  dtype, or to float32 for a `_keep_in_fp32_modules` name among the key's parts.
- `get_memory_footprint()` (both libraries) sums nelement * element_size over `parameters()` (each
  shared parameter once) and `buffers()`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnbcli.plan.planners import hf_diffusers, hf_transformers
from bnbcli.plan.planners.hf_transformers import module_budget, quiet
from bnbcli.plan.scheme import QuantScheme


@dataclass(frozen=True)
class Param:
    name: str  # the model's parameter name
    module: str
    leaf: str  # "weight", "bias", ...
    numel: int
    dtype: torch.dtype  # after loading

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class DecoderShape:
    """What the KV cache and the activations of a decoder-only language model depend on."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class LoadedModel:
    library: str  # "transformers" | "diffusers"
    class_name: str
    load_dtype: torch.dtype
    params: tuple[Param, ...]  # each shared parameter once, as parameters() yields them
    buffers_bytes: int
    decoder: DecoderShape | None

    @property
    def params_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def footprint(self) -> int:
        """get_memory_footprint() of the model loaded unquantized."""
        return self.params_bytes + self.buffers_bytes


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build(config: Mapping[str, Any], load_dtype: torch.dtype, tensor_count: int) -> tuple[nn.Module, str] | None:
    """The model of ``config`` on the meta device, built as from_pretrained builds it under ``load_dtype``;
    None where neither library knows it (the name-rules planner's case), or where config.json describes a
    model far larger than the checkpoint's ``tensor_count`` tensors."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        if "_class_name" in config:
            cls, _ = hf_diffusers._resolve_class(config)
            # diffusers' from_pretrained sets the default dtype, then calls from_config (`_set_default_torch_dtype`)
            with quiet(), torch.device("meta"), _default_dtype(load_dtype), module_budget(tensor_count):
                return cls.from_config(config), "diffusers"  # type: ignore[attr-defined]
        cls, _ = hf_transformers._resolve_class(config)
        # `_from_config` builds under config.dtype, as from_pretrained does under the resolved dtype
        config["dtype"] = str(load_dtype).removeprefix("torch.")
        return hf_transformers._build_meta_model(cls, config, tensor_count), "transformers"
    except Exception:  # NotKnown, or a config the class rejects: the planner falls back to name rules too
        return None


def _fp32_matcher(model: nn.Module, library: str, load_dtype: torch.dtype) -> Callable[[str], bool]:
    """Which parameter names load in float32 whatever the load dtype."""
    if library == "diffusers":
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        keep = [keep] if isinstance(keep, str) else list(keep)
        return lambda name: any(k in name.split(".") for k in keep)
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(load_dtype) if callable(get_plan) else {}
    patterns = [k for k, v in plan.items() if v == torch.float32]
    if not patterns:
        return lambda name: False
    try:
        from transformers.core_model_loading import build_glob_alternation

        alternation = build_glob_alternation(patterns)[0]
    except ImportError:
        alternation = re.compile("|".join(p.replace("*", ".*") for p in patterns))
    return lambda name: alternation.search(name) is not None


def summarize(model: nn.Module, library: str, load_dtype: torch.dtype) -> LoadedModel:
    """Each parameter and buffer with the dtype it has once loaded (see the module docstring)."""
    fp32 = _fp32_matcher(model, library, load_dtype)
    persistent = set(model.state_dict())

    def loaded_dtype(name: str, tensor: torch.Tensor, in_checkpoint: bool) -> torch.dtype:
        if not tensor.is_floating_point() or not in_checkpoint:
            return tensor.dtype
        if fp32(name):
            return torch.float32
        return load_dtype if library == "diffusers" else tensor.dtype

    params = []
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        params.append(Param(name, module, leaf, p.numel(), loaded_dtype(name, p, True)))
    buffers = sum(b.numel() * loaded_dtype(n, b, n in persistent).itemsize for n, b in model.named_buffers())
    return LoadedModel(
        library=library,
        class_name=type(model).__name__,
        load_dtype=load_dtype,
        params=tuple(params),
        buffers_bytes=buffers,
        decoder=decoder_shape(model, library),
    )


def deserialized_dtypes(
    model: nn.Module, quant: QuantScheme, stored: Mapping[str, torch.dtype]
) -> dict[str, torch.dtype]:
    """Parameters that keep the checkpoint's dtype when transformers v5 loads a pre-quantized bitsandbytes
    checkpoint: param name → stored dtype.

    transformers routes every checkpoint key its bitsandbytes quantizer's serialized names match (any
    ``*.weight``, quantized or not) through the deserializer (`quantizers/base.py` get_weight_conversions),
    and `get_new_dtype` then returns None, "handled by them": no cast to the load dtype, no float32 dtype
    plan. A weight left unquantized therefore loads in the dtype the file holds. Asked of transformers'
    own renaming (`core_model_loading.rename_source_key`) with the conversion mapping from_pretrained uses.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        with quiet():
            quantizer = hf_transformers._bnb_quantizer(quant)
            mapping = get_model_conversion_mapping(model, None, quantizer)  # type: ignore[arg-type]
    except Exception:  # an older transformers, or no bitsandbytes: every tensor is cast as usual
        return {}
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or None
    kept: dict[str, torch.dtype] = {}
    for key in sorted(stored, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
        converter = next((c for c in converters if pattern in c.source_patterns), None)
        if converter is not None and any(getattr(op, "hf_quantizer", None) for op in converter.operations):
            kept.setdefault(renamed, stored[key])
    return kept


def decoder_shape(model: nn.Module, library: str) -> DecoderShape | None:
    """The text model's dimensions, for a decoder-only language model (a causal LM); else None."""
    if library != "transformers":
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(getattr(config, "model_type", ""))) != type(model).__name__:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        return DecoderShape(
            layers=int(text.num_hidden_layers),
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden),
            vocab=int(text.vocab_size),
        )
    except (AttributeError, TypeError, ValueError):
        return None


def layerwise_cast(model: nn.Module, library: str, compute_dtype: torch.dtype) -> tuple[int, int, int]:
    """fp8 e4m3 storage with diffusers' layerwise casting applied to ``model`` (a fresh meta model: it is
    changed): `enable_layerwise_casting` for a diffusers model, `apply_layerwise_casting` with its default
    skip patterns for any other. Returns (footprint, elements stored in fp8, largest cast layer's elements)."""
    from diffusers.hooks import apply_layerwise_casting

    storage = torch.float8_e4m3fn
    fp32 = _fp32_matcher(model, library, compute_dtype)
    with torch.no_grad():  # the float32 dtype plan first, as loading would have applied it
        for name, p in model.named_parameters():
            if p.is_floating_point() and fp32(name):
                p.data = p.data.to(torch.float32)
    with quiet():
        enable = getattr(model, "enable_layerwise_casting", None) if library == "diffusers" else None
        if callable(enable):
            enable(storage_dtype=storage, compute_dtype=compute_dtype)
        else:
            apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute_dtype)
    params = list(model.parameters())
    footprint = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    cast = sum(p.numel() for p in params if p.dtype == storage)
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules() if _is_cast(m, storage)),
        default=0,
    )
    return footprint, cast, largest


def _is_cast(module: nn.Module, storage: torch.dtype) -> bool:
    return any(p.dtype == storage for p in module.parameters(recurse=False))
