"""`bnb footprint` as a library call: memory per scheme from safetensors headers and config.json alone.

For each scheme and each component (a model, or each component of a diffusers pipeline): the
parameters quantized and kept, the bytes of the files `bnb quantize` would write (from its own plan),
what ``get_memory_footprint()`` reports once transformers or diffusers has loaded them, and an estimate
of GPU memory at run time with a verdict against ``gpu_memory``. Never reads tensor data: local files
are opened for their headers, Hub repos are read with range requests (``bnbcli.footprint.hub``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnbcli.checkpoint import hub as checkpoint_hub
from bnbcli.checkpoint.source import Checkpoint, open_checkpoint
from bnbcli.errors import UsageError
from bnbcli.footprint.hub import hub_api, remote_headers, repo_listing
from bnbcli.footprint.report import ComponentFootprint, ComponentModel, Settings, component_footprint
from bnbcli.footprint.runtime import Runtime, combine
from bnbcli.footprint.schemes import DEFAULT_SCHEMES, FootprintScheme, make_schemes
from bnbcli.formats.dtypes import DType, dtype_name
from bnbcli.pipeline.request import source_label
from bnbcli.plan.decisions import PlannerName, fallback_warning, refuse_quantized
from bnbcli.plan.quantize_layout import DEFAULT_MAX_SHARD_SIZE
from bnbcli.plan.scheme import QuantScheme
from bnbcli.units import positive_size

# --keep-budget (bnbcli.budget.spend.keeper, given by the command line): for a bnb scheme, the same scheme with
# the modules bnb quantize would keep added to its --skip, and that choice as data.
Keeper = Callable[[Checkpoint, QuantScheme, int, "PlannerName | None"], tuple[QuantScheme, dict[str, Any]]]

__all__ = [
    "DEFAULT_SCHEMES",
    "FootprintReport",
    "FootprintRequest",
    "FootprintScheme",
    "SchemeFootprint",
    "footprint",
    "make_schemes",
]


@dataclass(frozen=True)
class FootprintRequest:
    src: str
    schemes: tuple[FootprintScheme, ...] = make_schemes()
    revision: str | None = None
    components: tuple[str, ...] | None = None
    dtype: DType | None = None  # the dtype from_pretrained loads with (default: the checkpoint's)
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    planner: PlannerName | None = None
    seq_len: int = 4096
    batch: int = 1
    gpu_memory: int | None = None
    keep: Keeper | None = None  # --keep-budget: each bnb scheme with the modules it keeps (and the choice)


@dataclass(frozen=True)
class SchemeFootprint:
    scheme: FootprintScheme
    components: tuple[ComponentFootprint, ...]
    runtime: Runtime | None  # the whole model or pipeline on one GPU
    gpu_memory: int | None
    keep_budget: dict[str, Any] | None = None  # --keep-budget: the choice (bnbcli/plan/budget/choice.py)

    def _sum(self, field: str) -> int | None:
        values = [getattr(c, field) for c in self.components]
        return None if any(v is None for v in values) else sum(values)

    @property
    def file_bytes(self) -> int | None:
        """The largest the weight files can be (exact unless double quant: see ``file_bytes_min``)."""
        files = [f for c in self.components for f in c.files]
        return sum(f.bytes_max for f in files) if files else None

    @property
    def file_bytes_min(self) -> int | None:
        files = [f for c in self.components for f in c.files]
        return sum(f.bytes_min for f in files) if files else None

    @property
    def footprint(self) -> int | None:
        return self._sum("footprint")

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None or self.runtime is None:
            return None
        return self.runtime.total <= self.gpu_memory

    @property
    def headroom(self) -> int | None:
        if self.gpu_memory is None or self.runtime is None:
            return None
        return self.gpu_memory - self.runtime.total

    @property
    def label(self) -> str:
        if self.scheme.kind == "stored" and self.components:
            short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
            name = dtype_name(self.components[0].load_dtype)
            return f"{short.get(name, name)} as stored"
        return self.scheme.label

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.scheme.name,
            "label": self.label,
            "params_quantized": sum(c.params_quantized for c in self.components),
            "params_kept": sum(c.params_kept for c in self.components),
            "file_bytes": self.file_bytes,
            "file_bytes_min": self.file_bytes_min,
            "get_memory_footprint": self.footprint,
            "get_memory_footprint_at_load": self._sum("footprint_at_load"),
            "exact": all(c.exact for c in self.components),
            "runtime": self.runtime.as_dict() if self.runtime else None,
            "fits": self.fits,
            "headroom": self.headroom,
            "components": [_component_dict(c) for c in self.components],
            "keep_budget": self.keep_budget,
        }


def _component_dict(c: ComponentFootprint) -> dict[str, Any]:
    return {
        "name": c.name,
        "planner": c.planner,
        "load_dtype": dtype_name(c.load_dtype),
        "params_quantized": c.params_quantized,
        "params_kept": c.params_kept,
        "tensors_quantized": c.tensors_quantized,
        "tensors_kept": c.tensors_kept,
        "files": [{"file": f.name, "bytes": f.bytes_max, "bytes_min": f.bytes_min} for f in c.files],
        "get_memory_footprint": c.footprint,
        "get_memory_footprint_at_load": c.footprint_at_load,
        "exact": c.exact,
        "notes": list(c.notes),
        "runtime": c.runtime.as_dict() if c.runtime else None,
    }


@dataclass(frozen=True)
class FootprintReport:
    source: dict[str, Any]
    request: FootprintRequest
    schemes: tuple[SchemeFootprint, ...]
    warnings: tuple[str, ...] = ()  # also printed on stderr

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "source": self.source,
            "settings": {
                "dtype": dtype_name(r.dtype) if r.dtype else None,
                "seq_len": r.seq_len,
                "batch": r.batch,
                "gpu_memory": r.gpu_memory,
                "max_shard_size": r.max_shard_size,
            },
            "schemes": [s.as_dict() for s in self.schemes],
            "warnings": list(self.warnings),
        }


@contextlib.contextmanager
def _opened(request: FootprintRequest, api: Any) -> Iterator[tuple[Checkpoint, dict[Path, int]]]:
    """The checkpoint's headers (and each weight file's size): local, from the Hub, or, when the Hub cannot
    be asked (HF_HUB_OFFLINE, no network), from the Hugging Face cache."""
    path = Path(request.src).expanduser()
    remote = not path.exists() and checkpoint_hub.looks_like_repo_id(request.src)
    api = hub_api(api) if remote else None
    info = repo_listing(request.src, request.revision, api) if remote else None
    if info is None:
        checkpoint = open_checkpoint(request.src, revision=request.revision, components=request.components)
        sizes = {p: p.stat().st_size for c in checkpoint.components.values() for p in c.weight_files}
        yield checkpoint, sizes
        return
    with remote_headers(request.src, request.revision, info, api) as repo:
        checkpoint = open_checkpoint(str(repo.folder), components=request.components)
        yield (
            Checkpoint(
                kind=checkpoint.kind,
                root=checkpoint.root,
                components=checkpoint.components,
                pipeline_files=(),
                repo_id=request.src,
                revision=repo.commit,
            ),
            repo.sizes,
        )


def _with_budget(
    scheme: FootprintScheme, checkpoint: Checkpoint, request: FootprintRequest
) -> tuple[FootprintScheme, dict[str, Any] | None]:
    """A bnb scheme with the modules --keep-budget keeps added to its skips, and the choice."""
    if request.keep is None or scheme.quant is None:
        return scheme, None
    if checkpoint.repo_id is not None:
        raise UsageError(
            "--keep-budget scores the weights, and bnb footprint reads a Hub repo's headers alone",
            hint="download it (hf download org/name) and give its folder",
        )
    quant, choice = request.keep(checkpoint, scheme.quant, request.max_shard_size, request.planner)
    return replace(scheme, quant=quant), choice


def footprint(request: FootprintRequest, api: Any = None) -> FootprintReport:
    """The report for ``request``; ``api`` replaces huggingface_hub's HfApi for a Hub repo id (tests)."""
    if request.seq_len < 1 or request.batch < 1:
        raise UsageError(
            "--seq-len and --batch must be at least 1", hint="for example --seq-len 4096 --batch 1 (the defaults)"
        )
    if not request.schemes:
        raise UsageError("no scheme to estimate", hint="name at least one with --schemes")
    positive_size(request.max_shard_size, "--max-shard-size")
    if request.gpu_memory is not None:
        positive_size(request.gpu_memory, "--gpu-memory")
    with _opened(request, api) as (checkpoint, sizes):
        for source in checkpoint.components.values():  # footprint predicts from the unquantized checkpoint
            refuse_quantized(source.config, source.tensors)
        settings = Settings(request.dtype, request.max_shard_size, request.planner, request.seq_len, request.batch)
        models = [ComponentModel(source) for _, source in sorted(checkpoint.components.items())]
        results = []
        for scheme in request.schemes:
            scheme, choice = _with_budget(scheme, checkpoint, request)
            parts = tuple(component_footprint(m, scheme, settings, sizes) for m in models)
            runtimes = [p.runtime for p in parts]
            runtime = combine([r for r in runtimes if r is not None]) if all(runtimes) else None
            results.append(SchemeFootprint(scheme, parts, runtime, request.gpu_memory, choice))
        label = source_label(checkpoint)
        if checkpoint.repo_id:
            label = {"repo_id": checkpoint.repo_id, "revision": checkpoint.revision, "kind": checkpoint.kind}
        fallbacks = {(c.name, c.planner_fallback) for s in results for c in s.components if c.planner_fallback}
        warnings = [*checkpoint.warnings, *(fallback_warning(name, why) for name, why in sorted(fallbacks))]
    return FootprintReport(source=label, request=request, schemes=tuple(results), warnings=tuple(warnings))
