"""`bnb dequantize` as a library call: open the source, plan, execute into a temporary folder, rename.

Execution obeys the plan of ``bnbcli.plan.dequantize_layout``: it reads one weight's tensors (pread), rebuilds
the values through ``bnbcli.api`` with the chosen backend (bit-exact with bitsandbytes'
``dequantize_4bit`` / ``int8_vectorwise_dequant``, then ``.to(dtype)`` as transformers'
``dequantize()`` does), writes them at their planned offsets, and drops them. Memory holds one weight.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnbcli import api
from bnbcli.backends import resolve_backend
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.durable import write_atomically
from bnbcli.checkpoint.hashing import FileHashes
from bnbcli.checkpoint.manifest import MANIFEST_NAME, manifest_document, write_manifest
from bnbcli.checkpoint.source import open_checkpoint
from bnbcli.checkpoint.tensor_reads import read_tensor
from bnbcli.checkpoint.writer import PlannedTensor, ShardWriter
from bnbcli.errors import InputError, UsageError
from bnbcli.formats.dtypes import FLOAT_DTYPES, DType, as_dtype, dtype_name
from bnbcli.formats.registry import FAMILIES
from bnbcli.pipeline.executor import copy_file, json_dumps_config
from bnbcli.pipeline.request import check_paths, source_label
from bnbcli.plan.dequantize_layout import DequantComponent, DequantizePlan, OutputTensor, plan_component
from bnbcli.plan.quantize_layout import SHARD_METADATA, index_json
from bnbcli.units import positive_size

Progress = Callable[[int], None]


@dataclass(frozen=True)
class DequantizeRequest:
    src: str
    out: Path
    dtype: DType | None = None  # None: each 4-bit weight's quant_state dtype; int8: the model's
    max_shard_size: int | None = None  # None: keep the source's shards
    revision: str | None = None
    backend: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:  # a library caller's torch.dtype, as the DType it is (else refused below)
        object.__setattr__(self, "dtype", as_dtype(self.dtype) or self.dtype)


@dataclass(frozen=True)
class DequantizeOutcome:
    plan: DequantizePlan
    out: Path
    manifest: dict[str, Any]


def plan_request(request: DequantizeRequest) -> DequantizePlan:
    """Headers, configs and quant_state JSONs only: what --dry-run prints and what execution obeys."""
    resolve_backend(request.backend)
    if request.dtype is not None and request.dtype not in FLOAT_DTYPES:
        raise UsageError(
            f"--dtype {dtype_name(request.dtype)} is not supported", hint="use float16, bfloat16 or float32"
        )
    if request.max_shard_size is not None:
        positive_size(request.max_shard_size, "--max-shard-size")
    checkpoint = open_checkpoint(request.src, revision=request.revision)
    check_paths(checkpoint, request.out)
    components = tuple(
        plan_component(source, request.dtype, request.max_shard_size)
        for _, source in sorted(checkpoint.components.items())
    )
    if all(c.copy_as_is for c in components):
        raise InputError(
            f"{request.src}: not a bitsandbytes checkpoint (no quant_state or SCB tensors to dequantize)",
            hint="point at a checkpoint that `bnb quantize`, transformers, diffusers or Unsloth saved in 4 or 8 bit",
        )
    return DequantizePlan(checkpoint=checkpoint, components=components, dtype=request.dtype)


def dequantize(request: DequantizeRequest, plan: DequantizePlan, progress: Progress) -> DequantizeOutcome:
    backend = resolve_backend(request.backend)
    started = time.monotonic()
    output = AtomicOutputDir(request.out, overwrite=request.overwrite)
    with output as tmp:
        root = plan.checkpoint.root
        for item in plan.checkpoint.pipeline_files:
            if item.name != MANIFEST_NAME:  # the quantized checkpoint's manifest does not describe this one
                copy_file(item, tmp / item.relative_to(root))
        components = [_write_component(c, tmp / c.name if c.name else tmp, backend, progress) for c in plan.components]
        settings = {
            "operation": "dequantize",
            "dtype": dtype_name(plan.dtype) if plan.dtype else None,
            "max_shard_size": request.max_shard_size,
        }
        manifest = manifest_document(source_label(plan.checkpoint), settings, components, time.monotonic() - started)
        write_manifest(tmp, manifest)
        output.commit()  # only now does OUT appear, whole
    return DequantizeOutcome(plan=plan, out=output.out, manifest=manifest)


def _write_component(component: DequantComponent, target: Path, backend: str, progress: Progress) -> dict[str, Any]:
    source = component.source
    target.mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(list(source.weight_files))
    for item in source.other_files:
        if item.name != MANIFEST_NAME:
            copy_file(item, target / item.relative_to(source.root))
    records: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    try:
        if component.copy_as_is:  # nothing quantized: the weights as they are, byte for byte
            indexes = sorted(source.root.glob("*.safetensors.index.json")) if source.index is not None else []
            for path in (*source.weight_files, *indexes):
                copy_file(path, target / path.relative_to(source.root))
                sizes[path.name] = path.stat().st_size
        else:
            data_bytes = {s: _write_shard(component, s, target, backend, progress, records) for s in component.shards}
            sizes = {s: (target / s).stat().st_size for s in component.shards}
            if component.index_name is not None:
                weight_map = {t.name: t.shard for t in component.tensors}
                numel = sum(t.nbytes // t.dtype.itemsize for t in component.tensors)
                index = index_json(weight_map, numel, sum(data_bytes.values()))
                write_atomically(target / component.index_name, index)
        if component.config is not None:
            write_atomically(target / "config.json", json_dumps_config(component.config))
        source_sha256 = hashes.result()
    except BaseException:
        hashes.cancel()
        raise
    return {
        "name": component.name,
        "copied_as_is": component.copy_as_is,
        "source_files": [
            {"path": str(Path(p).relative_to(source.root)), "sha256": h} for p, h in source_sha256.items()
        ],
        "shards": [{"file": name, "bytes": size} for name, size in sizes.items()],
        "tensors": records,
    }


def _write_shard(
    component: DequantComponent,
    shard: str,
    target: Path,
    backend: str,
    progress: Progress,
    records: list[dict[str, Any]],
) -> int:
    tensors = [t for t in component.tensors if t.shard == shard]
    writer = ShardWriter(target / shard, [PlannedTensor(t.name, t.dtype, t.shape) for t in tensors], SHARD_METADATA)
    try:
        for t in tensors:
            sha256 = hashlib.sha256(writer.write(t.name, restore(t, backend))).hexdigest()
            records.append(
                {
                    "name": t.name,
                    "kind": t.kind,
                    "dtype": dtype_name(t.dtype),
                    "shape": list(t.shape),
                    "transposed": t.transpose,
                    "sources": [s.name for s in t.sources] + list(t.absorbed),
                    "sha256": sha256,
                }
            )
            progress(t.bytes_in)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def restore(tensor: OutputTensor, backend: str, cast: bool = True) -> torch.Tensor:
    """The plain tensor ``tensor`` plans: read its sources and rebuild the values on ``backend``. Without
    ``cast`` the values stay as the dequantization gives them (int8: float32, before transformers' cast
    to the model dtype): `bnb inspect` measures those, as `bnb quantize`'s manifest does."""
    parts = [read_tensor(info) for info in tensor.sources]
    if tensor.kind == "copy":
        values = parts[0]
    else:  # int8 gives float32 (int8_vectorwise_dequant); transformers' dequantize() then casts with .to(dtype)
        values = api.dequantize(FAMILIES[tensor.kind].from_entries(parts, tensor.state_json), backend=backend)
    if tensor.transpose:
        values = values.t().contiguous()  # Conv1D keeps its weight as [in, out]
    # The 4-bit values are already in the quant_state dtype; another --dtype is a second rounding, as
    # transformers' dequantize_bnb_weight does it (dequantize_4bit, then .to(dtype)).
    return values if values.dtype == tensor.dtype.torch_dtype or not cast else values.to(tensor.dtype.torch_dtype)
