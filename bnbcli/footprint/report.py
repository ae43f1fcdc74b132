"""Per component and scheme: what is quantized, the files `bnb quantize` writes, get_memory_footprint()
after loading, and the run-time estimate. Sizes come from `bnb quantize`'s own plan (output_plan.py),
so the files predicted are the files written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bnbcli.checkpoint.source import ModelSource
from bnbcli.footprint.model import LoadedModel, build, deserialized_dtypes, layerwise_cast, summarize
from bnbcli.footprint.runtime import Runtime, activation_bytes, kv_cache_bytes
from bnbcli.footprint.schemes import FootprintScheme
from bnbcli.formats.dtypes import DType
from bnbcli.formats.layout import MAX_FLOAT_REPR, SHORTEST_FLOAT_REPR
from bnbcli.plan.decisions import PlannerName
from bnbcli.plan.dtype import model_dtype
from bnbcli.plan.quantize_layout import ComponentPlan, plan_component
from bnbcli.plan.scheme import QuantScheme

NO_MODEL = "no model class here (name-rules planner): buffers and parameters absent from the checkpoint are not counted"


@dataclass(frozen=True)
class FileSize:
    name: str
    bytes_min: int
    bytes_max: int  # equal to bytes_min unless the size depends on the weights (double quant)


@dataclass(frozen=True)
class ComponentFootprint:
    name: str
    planner: str
    load_dtype: torch.dtype  # what from_pretrained loads the model in
    params_quantized: int  # elements
    params_kept: int
    tensors_quantized: int
    tensors_kept: int
    files: tuple[FileSize, ...]  # the safetensors files `bnb quantize` writes (the source's, as stored)
    footprint: int | None  # get_memory_footprint() after loading and one forward pass
    footprint_at_load: int | None  # the same right after from_pretrained (4-bit biases not yet cast)
    exact: bool  # False: an approximation (see notes)
    notes: tuple[str, ...]
    runtime: Runtime | None
    planner_fallback: str | None = None  # why config.json's library could not plan it (QuantPlan.fallback)


@dataclass(frozen=True)
class Settings:
    dtype: DType | None  # the load dtype, when the user names one
    max_shard_size: int
    planner: PlannerName | None
    seq_len: int
    batch: int


def load_dtype(source: ModelSource, config: Mapping | None, first_file, settings: Settings) -> torch.dtype:
    """The dtype from_pretrained loads in, by the one model-dtype rule (plan/dtype.py) over the tensors each
    library looks at: transformers v5's `dtype="auto"` (`_get_dtype`) takes the first floating, non-fp8
    tensor of the first weight file in key order; diffusers has no "auto", and we assume torch_dtype= the
    weights' dtype (--dtype says otherwise)."""
    if "_class_name" in (config or {}):
        return model_dtype(config, (t.dtype for t in source.tensors.values()), settings.dtype).torch_dtype
    first = [dtype for _, dtype in sorted(first_file) if dtype.is_floating_point and "float8" not in str(dtype)]
    return model_dtype(config, first[:1], settings.dtype).torch_dtype


class ComponentModel:
    """The component's model, built once per load dtype and shared by the schemes (read, never changed)."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self._cache: dict[torch.dtype, tuple[nn.Module, LoadedModel] | None] = {}

    def _built(self, dtype: torch.dtype) -> tuple[nn.Module, LoadedModel] | None:
        if dtype not in self._cache:
            config = self.source.config
            built = build(config, dtype, len(self.source.tensors)) if config is not None else None
            self._cache[dtype] = (built[0], summarize(*built, dtype)) if built is not None else None
        return self._cache[dtype]

    def loaded(self, dtype: torch.dtype) -> LoadedModel | None:
        built = self._built(dtype)
        return built[1] if built is not None else None

    def prequantized_dtypes(
        self, dtype: torch.dtype, plan: ComponentPlan, quant: QuantScheme
    ) -> dict[str, torch.dtype]:
        """Parameters transformers loads in the stored dtype from a bitsandbytes checkpoint (see
        model.deserialized_dtypes); diffusers casts every floating tensor (load_model_dict_into_meta)."""
        built = self._built(dtype)
        if built is None or built[1].library != "transformers":
            return {}
        return deserialized_dtypes(built[0], quant, {e.key: e.dtype.torch_dtype for j in plan.jobs for e in j.entries})


def component_footprint(
    model: ComponentModel,
    scheme: FootprintScheme,
    settings: Settings,
    sizes: Mapping[Path, int],
) -> ComponentFootprint:
    source = model.source
    if scheme.kind == "bnb":
        assert scheme.quant is not None
        plan = plan_component(source, scheme.quant, settings.max_shard_size, settings.planner)
        return _quantized(model, plan, scheme.quant, settings)
    first = sorted(source.weight_files)[0] if source.weight_files else None
    first_file = [(t.name, t.dtype) for t in source.tensors.values() if t.path == first]
    dtype = load_dtype(source, source.config, first_file, settings)
    loaded = model.loaded(dtype)
    if scheme.kind == "fp8":
        return _fp8(model, dtype, settings)
    numel = sum(t.numel for t in source.tensors.values())
    footprint = loaded.footprint if loaded is not None else None
    if footprint is None:  # without the model: the checkpoint's tensors in the load dtype
        footprint = sum(_loaded_bytes(t.numel, t.dtype, dtype) for t in source.tensors.values())
    return ComponentFootprint(
        name=source.name,
        planner=loaded.library if loaded is not None else "name-rules",
        load_dtype=dtype,
        params_quantized=0,
        params_kept=numel,
        tensors_quantized=0,
        tensors_kept=len(source.tensors),
        files=tuple(FileSize(p.name, sizes.get(p, 0), sizes.get(p, 0)) for p in source.weight_files),
        footprint=footprint,
        footprint_at_load=footprint,
        exact=loaded is not None,
        notes=_notes(loaded),
        runtime=_runtime(loaded, footprint, 0, 0, dtype, settings),
    )


def _notes(loaded: LoadedModel | None) -> tuple[str, ...]:
    if loaded is None:
        return (NO_MODEL,)
    if loaded.decoder is None:
        return (f"{loaded.class_name} is not a decoder-only language model: no KV cache or activations estimated",)
    return ()


def _loaded_bytes(numel: int, stored: DType, dtype: torch.dtype) -> int:
    return numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)


def _fp8(model: ComponentModel, dtype: torch.dtype, settings: Settings) -> ComponentFootprint:
    loaded = model.loaded(dtype)
    result = ComponentFootprint(
        name=model.source.name,
        planner=loaded.library if loaded is not None else "name-rules",
        load_dtype=dtype,
        params_quantized=0,
        params_kept=0,
        tensors_quantized=0,
        tensors_kept=0,
        files=(),  # a cast in memory: no checkpoint is written
        footprint=None,
        footprint_at_load=None,
        exact=False,
        notes=("fp8 layerwise casting needs the model's classes (transformers or diffusers) to pick its layers",),
        runtime=None,
    )
    if loaded is None:
        return result
    try:
        built = build(model.source.config or {}, dtype, len(model.source.tensors))  # fresh: casting changes it
        assert built is not None
        footprint, cast, largest = layerwise_cast(built[0], built[1], dtype)
    except ImportError:
        return replace(
            result, notes=("fp8 layerwise casting is diffusers' apply_layerwise_casting: install diffusers",)
        )
    return replace(
        result,
        params_quantized=cast,
        params_kept=sum(p.numel for p in loaded.params) - cast,
        footprint=footprint,
        footprint_at_load=footprint,
        exact=True,
        notes=_notes(loaded),
        runtime=_runtime(loaded, footprint, 0, largest * dtype.itemsize, dtype, settings),
    )


def _quantized(
    model: ComponentModel, plan: ComponentPlan, quant: QuantScheme, settings: Settings
) -> ComponentFootprint:
    config = plan.config or {}
    first_shard = [(e.key, e.dtype) for j in plan.jobs if j.shard == plan.shards[0] for e in j.entries]
    dtype = load_dtype(model.source, config, first_shard, settings)
    qconfig = config.get("quantization_config", {})
    compute = getattr(torch, qconfig.get("bnb_4bit_compute_dtype", "float32")) if quant.is_4bit else dtype
    quantized = [j for j in plan.jobs if j.quantized]
    kept = [j for j in plan.jobs if not j.quantized]
    # bitsandbytes keeps these on the GPU beside each weight; they are not parameters (spec §8)
    state = sum(
        e.nbytes
        for j in quantized
        for e in j.entries[1:]
        if ".quant_state." not in e.key and not e.key.endswith("weight_format")
    )
    transient = max((j.source.numel for j in quantized), default=0) * compute.itemsize if quant.is_4bit else 0
    loaded = model.loaded(dtype)
    stored = model.prequantized_dtypes(dtype, plan, quant) if loaded is not None else {}
    sums = _bnb_sums(loaded, plan, quant.is_4bit, compute, stored) if loaded is not None else None
    exact = sums is not None
    at_load, after = sums if sums is not None else _bnb_sums_from_checkpoint(plan, quant.is_4bit, compute, dtype)
    return ComponentFootprint(
        name=plan.name,
        planner=plan.planner,
        load_dtype=dtype,
        params_quantized=sum(j.source.numel for j in quantized),
        params_kept=sum(j.source.numel for j in kept),
        tensors_quantized=len(quantized),
        tensors_kept=len(kept),
        files=tuple(_file_size(plan, shard) for shard in plan.shards),
        footprint=after,
        footprint_at_load=at_load,
        exact=exact,
        notes=_notes(loaded if exact else None),
        runtime=_runtime(loaded, after, state, transient, dtype, settings),
        planner_fallback=plan.planner_fallback,
    )


def _file_size(plan: ComponentPlan, shard: str) -> FileSize:
    largest = plan.shard_bytes(shard)  # the writer's own layout: exact but for variable tensors
    variable = sum(1 for j in plan.jobs if j.shard == shard for e in j.entries if e.variable)
    return FileSize(shard, largest - variable * (MAX_FLOAT_REPR - SHORTEST_FLOAT_REPR), largest)


def _bnb_sums(
    loaded: LoadedModel, plan: ComponentPlan, four_bit: bool, compute: torch.dtype, stored: dict[str, torch.dtype]
) -> tuple[int, int] | None:
    """get_memory_footprint() (at load, after one forward pass) of the model with bitsandbytes layers.

    A quantized weight is a parameter holding its stored tensor (packed bytes or int8). Its module's bias
    loads in the load dtype; Linear4bit.forward then casts it to the compute dtype in place
    (bitsandbytes nn/modules.py: `bias.data = bias.data.to(x.dtype)` after x went to compute_dtype), while
    Linear8bitLt casts it to the input's dtype, the model's. Parameters in ``stored`` keep the checkpoint's
    dtype. None when the plan names a module the model does not have (the footprint is then taken from the
    checkpoint)."""
    by_module = {j.decision.module: j for j in plan.jobs if j.quantized}
    weights = {p.module for p in loaded.params if p.leaf == "weight"}
    if not set(by_module) <= weights:
        return None
    at_load = after = loaded.buffers_bytes
    for p in loaded.params:
        job = by_module.get(p.module)
        if job is not None and p.leaf == "weight":
            at_load += job.entries[0].nbytes
            after += job.entries[0].nbytes
        elif job is not None and p.leaf == "bias" and four_bit:
            at_load += p.nbytes
            after += p.numel * compute.itemsize
        else:
            nbytes = p.numel * stored[p.name].itemsize if p.name in stored else p.nbytes
            at_load += nbytes
            after += nbytes
    return at_load, after


def _bnb_sums_from_checkpoint(
    plan: ComponentPlan, four_bit: bool, compute: torch.dtype, dtype: torch.dtype
) -> tuple[int, int]:
    """The same over the checkpoint's own tensors, without a model: no buffers, nothing tied or missing."""
    quantized_modules = {j.source.name.rpartition(".")[0] for j in plan.jobs if j.quantized}
    at_load = after = 0
    for j in plan.jobs:
        if j.quantized:
            at_load += j.entries[0].nbytes
            after += j.entries[0].nbytes
            continue
        size = _loaded_bytes(j.source.numel, j.dtype, dtype)
        at_load += size
        module, _, leaf = j.source.name.rpartition(".")
        is_4bit_bias = four_bit and leaf == "bias" and module in quantized_modules
        after += j.source.numel * compute.itemsize if is_4bit_bias else size
    return at_load, after


def _runtime(
    loaded: LoadedModel | None, weights: int, state: int, transient: int, dtype: torch.dtype, settings: Settings
) -> Runtime:
    decoder = loaded.decoder if loaded is not None else None
    return Runtime(
        weights=weights,
        quant_state=state,
        transient=transient,
        kv_cache=kv_cache_bytes(decoder, settings.seq_len, settings.batch, dtype.itemsize),
        activations=activation_bytes(decoder, settings.seq_len, settings.batch, dtype.itemsize),
    )
