"""The plan of `bnb dequantize`: which tensors of a bitsandbytes checkpoint make one weight, and what
the plain checkpoint holds instead, decided from headers, config.json and the few-byte quant_state
JSONs. ``bnb dequantize --dry-run`` renders it; ``bnbcli.pipeline.dequantize`` executes it.

Keys are those bitsandbytes' ``Linear4bit``/``Linear8bitLt`` save and transformers, diffusers or
Unsloth write (spec §4.3, §5): ``W``, ``W.absmax``, ``W.quant_map``, [``W.nested_absmax``,
``W.nested_quant_map``], ``W.quant_state.bitsandbytes__nf4|fp4``; ``M.weight`` (int8), ``M.SCB``,
[``M.weight_format``].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from bnbcli import json_text
from bnbcli.checkpoint.safetensors_file import TensorInfo
from bnbcli.checkpoint.source import Checkpoint, ModelSource
from bnbcli.checkpoint.tensor_reads import read_tensor
from bnbcli.errors import InputError
from bnbcli.formats.dtypes import BY_NAME, FLOAT32, INT8, UINT8, DType, dtype_name
from bnbcli.formats.int8 import WEIGHT_FORMAT_ROW
from bnbcli.formats.layout import FOUR_BIT_BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_STATE_KEY, SCB_SUFFIX, num_blocks
from bnbcli.plan.dtype import model_dtype as plan_dtype
from bnbcli.plan.planners.name_rules import CONV1D_MODEL_TYPES, CONV1D_NAMES
from bnbcli.plan.quantize_layout import ComponentTotals, assign_shards, set_config_dtype

Kind = Literal["4bit", "int8", "copy"]

FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# `QuantState.from_dict` accepts exactly these JSON keys (spec §5).
STATE_KEYS = frozenset(
    {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
)
# Keys that only make sense beside a quantized weight: one left over means a weight we cannot rebuild.
COMPONENT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")
# A quantized weight whose parts disagree: nothing bnb can do but say so.
BROKEN_HINT = "the checkpoint is inconsistent; download or save it again"


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the plain checkpoint and the source tensors it is made of."""

    name: str
    kind: Kind
    dtype: DType  # what is written
    shape: tuple[int, ...]  # what is written (Conv1D weights back in [in, out])
    sources: tuple[TensorInfo, ...]  # 4bit: weight, absmax, quant_map[, nested_absmax, nested_quant_map]; int8: CB, SCB
    shard: str
    transpose: bool = False  # a Conv1D weight, quantized as [out, in]
    state_json: str | None = None  # 4bit: the quant_state JSON
    absorbed: tuple[str, ...] = ()  # source keys consumed that are not in ``sources`` (quant_state, weight_format)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def bytes_in(self) -> int:
        return sum(s.nbytes for s in self.sources)


@dataclass(frozen=True)
class DequantComponent:
    name: str  # "" for a plain model, else the diffusers component folder
    source: ModelSource
    tensors: tuple[OutputTensor, ...]  # in shard order, then source order
    shards: tuple[str, ...]
    config: dict | None  # the output config.json
    copy_as_is: bool  # nothing quantized here: its files are copied byte for byte
    index_name: str | None = None  # the *.safetensors.index.json to write, if any

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def count(self, kind: Kind) -> int:
        return sum(1 for t in self.tensors if t.kind == kind)


@dataclass(frozen=True)
class DequantizePlan(ComponentTotals):
    checkpoint: Checkpoint
    components: tuple[DequantComponent, ...]
    dtype: DType | None  # --dtype, or None: each weight's quant_state dtype


def _check_quantization_config(source: ModelSource) -> None:
    config = (source.config or {}).get("quantization_config")
    if not isinstance(config, dict):
        return
    method = config.get("quant_method")
    if method not in (None, "bitsandbytes") and not any(config.get(k) for k in ("load_in_4bit", "load_in_8bit")):
        raise InputError(
            f"{source.root / 'config.json'}: quantized with {method!r}, not bitsandbytes",
            hint="bnb dequantize reads bitsandbytes checkpoints",
        )


def plan_component(source: ModelSource, dtype: DType | None, max_shard_size: int | None) -> DequantComponent:
    _check_quantization_config(source)
    tensors = source.tensors
    four_bit = _four_bit_groups(tensors)
    int8 = _int8_groups(tensors)
    if not four_bit and not int8 and "quantization_config" not in (source.config or {}):
        return DequantComponent(source.name, source, (), (), source.config, copy_as_is=True)
    consumed = {k for keys in four_bit.values() for k in keys} | {k for keys in int8.values() for k in keys}
    for key in tensors:
        if key in consumed:
            continue
        if key.endswith(COMPONENT_SUFFIXES):
            raise InputError(
                f"{source.root}: tensor {key!r} belongs to no quantized weight (its weight or quant_state is missing)",
                hint="the checkpoint is incomplete; download or export it again",
            )
        parts = key.split(".")
        owner = next((w for i in range(1, len(parts)) if (w := ".".join(parts[:i])) in four_bit), None)
        if owner is not None:
            # QuantState.from_dict refuses unknown keys too: such a checkpoint does not load anywhere.
            raise InputError(f"{key} is not a part of the 4-bit weight {owner}", hint="the checkpoint is inconsistent")
    transposed = _conv1d_weights(source.config, list(four_bit) + list(int8), tensors)
    # transformers' dequantize() gives int8 weights in the model's dtype; the tensors left as they are show it
    model_dtype = plan_dtype(source.config, (t.dtype for k, t in source.tensors.items() if k not in consumed))
    rows: list[OutputTensor] = []
    for name, info in tensors.items():
        if name in four_bit:
            rows.append(_four_bit_tensor(source, four_bit[name], dtype, name in transposed))
        elif name in int8:
            rows.append(_int8_tensor(source, int8[name], dtype or model_dtype, name in transposed))
        elif name not in consumed:
            out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            rows.append(OutputTensor(name, "copy", out_dtype, info.shape, (info,), shard=""))
    rows.sort(key=lambda t: source.file_position(t.sources[0]))
    stem = "diffusion_pytorch_model" if source.weight_files[0].name.startswith("diffusion_") else "model"
    if max_shard_size is None:  # keep the source's sharding: each weight stays where its main tensor was
        shard_of = [t.sources[0].path.name for t in rows]
        shards = list(dict.fromkeys(shard_of))
        indexed = source.index is not None
    else:
        shards, assignment = assign_shards([t.nbytes for t in rows], max_shard_size, stem)
        shard_of = [shards[i] for i in assignment]
        indexed = len(shards) > 1
    placed = [replace(t, shard=shard) for t, shard in zip(rows, shard_of, strict=True)]
    ordered = tuple(sorted(placed, key=lambda t: shards.index(t.shard)))  # stable: source order within a shard
    index_name = f"{stem}.safetensors.index.json" if indexed else None
    config = _output_config(source, dtype)
    return DequantComponent(source.name, source, ordered, tuple(shards), config, False, index_name)


def _four_bit_groups(tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, ...]]:
    """weight key → every key of that 4-bit weight (weight first, quant_state last)."""
    groups: dict[str, tuple[str, ...]] = {}
    for key in tensors:
        match = QUANT_STATE_KEY.match(key)
        if match is None:
            continue
        weight = match["weight"]
        if weight in groups:
            raise InputError(f"{weight} has two quant_state tensors", hint="the checkpoint is inconsistent")
        if weight not in tensors:
            raise InputError(f"{key} has no weight {weight!r} beside it", hint="the checkpoint is incomplete")
        parts = tuple(f"{weight}.{p}" for p in FOUR_BIT_PARTS if f"{weight}.{p}" in tensors)
        groups[weight] = (weight, *parts, key)
    return groups


def _int8_groups(tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, ...]]:
    """weight key → (weight, SCB[, weight_format]) of each LLM.int8 weight."""
    groups: dict[str, tuple[str, ...]] = {}
    for key in tensors:
        if not key.endswith(SCB_SUFFIX):
            continue
        module = key.removesuffix(SCB_SUFFIX)
        weight = f"{module}.weight"
        if weight not in tensors or tensors[weight].dtype != INT8:
            raise InputError(f"{key} has no int8 weight {weight!r} beside it", hint="the checkpoint is inconsistent")
        extra = (f"{module}.weight_format",) if f"{module}.weight_format" in tensors else ()
        groups[weight] = (weight, key, *extra)
    for key, info in tensors.items():
        if info.dtype == INT8 and key.endswith(".weight") and key not in groups:
            raise InputError(f"{key} is int8 but has no SCB beside it", hint="the checkpoint is incomplete")
    return groups


def _four_bit_tensor(source: ModelSource, keys: tuple[str, ...], dtype: DType | None, transpose: bool) -> OutputTensor:
    tensors = source.tensors
    weight, state_key = keys[0], keys[-1]
    state = _read_state(tensors[state_key])
    shape = tuple(state["shape"])
    n = 1
    for d in shape:
        n *= d
    nb = num_blocks(n, state["blocksize"])
    packed = tensors[weight]
    nested = "nested_offset" in state
    expected = {
        weight: None,
        f"{weight}.absmax": (UINT8 if nested else FLOAT32, (nb,)),
        f"{weight}.quant_map": (FLOAT32, (16,)),
    }
    if nested:
        expected[f"{weight}.nested_absmax"] = (FLOAT32, (num_blocks(nb, NESTED_BLOCKSIZE),))
        expected[f"{weight}.nested_quant_map"] = (FLOAT32, (256,))
    if set(keys[:-1]) != set(expected):
        missing = sorted(set(expected) - set(keys[:-1])) or sorted(set(keys[:-1]) - set(expected))
        raise InputError(f"{weight}: its 4-bit parts do not match its quant_state ({missing[0]})", hint=BROKEN_HINT)
    for key, want in expected.items():
        if want is not None and (tensors[key].dtype, tensors[key].shape) != want:
            got = f"{dtype_name(tensors[key].dtype)} {list(tensors[key].shape)}"
            raise InputError(
                f"{key} is {got}, but its quant_state needs {dtype_name(want[0])} {list(want[1])}", hint=BROKEN_HINT
            )
    # bitsandbytes stores (n+1)//2 bytes as quant_storage elements, dropping a last partial element.
    if not 0 <= (n + 1) // 2 - packed.nbytes < packed.dtype.itemsize:
        raise InputError(
            f"{weight} holds {packed.nbytes} bytes, not the packed size of shape {list(shape)}", hint=BROKEN_HINT
        )
    out_shape = tuple(reversed(shape)) if transpose else shape
    state_dtype = BY_NAME[state["dtype"]]
    sources = tuple(tensors[k] for k in expected)
    return OutputTensor(
        weight, "4bit", dtype or state_dtype, out_shape, sources, "", transpose, json.dumps(state), (state_key,)
    )


def _read_state(info: TensorInfo) -> dict[str, Any]:
    """The quant_state JSON, checked the way ``QuantState.from_dict`` would use it."""
    if info.dtype != UINT8 or len(info.shape) != 1 or info.nbytes > 4096:
        raise InputError(f"{info.name} is not a packed quant_state (1-D uint8 JSON)", hint=BROKEN_HINT)
    try:
        state = json_text.loads(read_tensor(info).numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{info.name}: quant_state is not JSON: {e}", hint="the checkpoint is corrupt") from None
    bad = (
        not isinstance(state, dict)
        or not STATE_KEYS >= set(state) >= {"quant_type", "blocksize", "dtype", "shape"}
        or state["blocksize"] not in FOUR_BIT_BLOCKSIZES
        or state["dtype"] not in ("float16", "bfloat16", "float32")
        or not isinstance(state["shape"], list)
        or not all(type(d) is int and d >= 0 for d in state["shape"])
        or ("nested_offset" in state) != ("nested_blocksize" in state)
        or state.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE
    )
    if bad or state["quant_type"] != info.name.rsplit("__", 1)[-1]:
        raise InputError(f"{info.name}: unsupported quant_state {json.dumps(state)[:200]}", hint=BROKEN_HINT)
    return state


def _int8_tensor(source: ModelSource, keys: tuple[str, ...], dtype: DType, transpose: bool) -> OutputTensor:
    tensors = source.tensors
    cb, scb = tensors[keys[0]], tensors[keys[1]]
    rows = 1
    for d in cb.shape[:-1]:
        rows *= d
    if len(cb.shape) < 1 or scb.dtype != FLOAT32 or scb.numel != rows:
        raise InputError(
            f"{scb.name} is {dtype_name(scb.dtype)} {list(scb.shape)}, not float32 [{rows}]", hint=BROKEN_HINT
        )
    if len(keys) == 3:
        fmt = tensors[keys[2]]
        if fmt.numel != 1 or int(read_tensor(fmt).reshape(-1)[0]) != WEIGHT_FORMAT_ROW:
            raise InputError(f"{fmt.name}: only the row layout (0) can be read", hint="save it again with bitsandbytes")
    out_shape = tuple(reversed(cb.shape)) if transpose else cb.shape
    return OutputTensor(keys[0], "int8", dtype, out_shape, (cb, scb), "", transpose, None, keys[2:])


def _conv1d_weights(config: dict | None, weights: list[str], tensors: dict[str, TensorInfo]) -> set[str]:
    """Quantized weights of Conv1D modules: transformers transposed them to [out, in] before quantizing
    (spec §6.2) and a plain model wants them back in [in, out]. Asked of transformers' model on the meta
    device when it knows the model; otherwise by GPT-2-style names."""
    config = {k: v for k, v in (config or {}).items() if k != "quantization_config"}
    if "_class_name" in config or not weights:
        return set()  # diffusers models have no Conv1D
    from bnbcli.plan.planners import hf_transformers

    try:
        cls, _ = hf_transformers.resolve_class(config)
        model = hf_transformers.build_meta_model(cls, config, len(tensors))
    except Exception:  # transformers cannot build it (as the planner, fall back to names)
        conv1d_model = config.get("model_type") in CONV1D_MODEL_TYPES
        return {w for w in weights if conv1d_model and w.rsplit(".", 2)[-2] in CONV1D_NAMES}
    from transformers.pytorch_utils import Conv1D

    params, _ = hf_transformers.checkpoint_params(model, list(tensors))
    found = set()
    for weight in weights:
        param = params.get(weight)
        if param is not None and isinstance(model.get_submodule(param.rpartition(".")[0]), Conv1D):
            found.add(weight)
    return found


def _output_config(source: ModelSource, dtype: DType | None) -> dict | None:
    if source.config is None:
        return None
    config = {k: v for k, v in source.config.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
    if dtype is not None:
        set_config_dtype(config, dtype)
    return config


def plan_summary(plan: DequantizePlan) -> dict[str, Any]:
    """The plan as plain data, for --dry-run and --json."""
    components = []
    for c in plan.components:
        components.append(
            {
                "name": c.name,
                "copied_as_is": c.copy_as_is,
                "shards": list(c.shards),
                "dequantized_4bit": c.count("4bit"),
                "dequantized_int8": c.count("int8"),
                "kept": c.count("copy"),
                "transposed": [t.name for t in c.tensors if t.transpose],
                "tensors": [
                    {
                        "name": t.name,
                        "kind": t.kind,
                        "dtype": dtype_name(t.dtype),
                        "shape": list(t.shape),
                        "shard": t.shard,
                        "bytes_in": t.bytes_in,
                        "bytes_out": t.nbytes,
                    }
                    for t in c.tensors
                ],
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
            }
        )
    return {
        "dtype": dtype_name(plan.dtype) if plan.dtype else None,
        "components": components,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "warnings": plan.checkpoint.warnings,  # also printed on stderr
    }
