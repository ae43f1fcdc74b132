"""Turn one source tensor into the checkpoint entries its plan names, on the CPU or on a GPU.

A converter returns at once with a ``Converted``: the entries as host tensors and a ``finish()`` that
waits for them and returns the round-trip error. On the CPU the work is already done by then; on a GPU
it is queued on the device's streams, so the caller can read the next tensor and the writer can write
the previous one while the kernels run. Both go through ``bnbcli.api`` and give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from bnbcli.errors import InputError, InternalError
from bnbcli.formats.batch import joinable, quantize_restore_many
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.metrics import RoundTripError, error_from_sums, roundtrip_sums, roundtrip_sums_many
from bnbcli.formats.registry import family_of, family_of_record
from bnbcli.plan.quantize_layout import TensorJob
from bnbcli.plan.scheme import QuantScheme


@dataclass
class Converted:
    job: TensorJob
    entries: dict[str, torch.Tensor]  # key -> host tensor, in the plan's order; valid once finish() returned
    _finish: Callable[[], RoundTripError | None]

    def finish(self) -> RoundTripError | None:
        """Wait for the entries; the round-trip error of a quantized tensor (None when kept)."""
        return self._finish()


def _nonfinite_error(job: TensorJob, nan: int, inf: int) -> InputError:
    found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
    return InputError(
        f"{job.source.path}: tensor {job.source.name!r} has non-finite values: {found}",
        hint="fix the checkpoint, or pass --allow-nonfinite to quantize them as bitsandbytes would",
    )


def _quantize(job: TensorJob, weight: torch.Tensor, scheme: QuantScheme, backend: str):
    """(entries, restored, pending): the planned entries of ``weight``, its dequantized values (on the CPU,
    for 4-bit, a ``Restore`` that makes them a block at a time), and
    None or, on the GPU with double quantization, (the record's fields without its tensors, the device
    offset): the offset is not read yet, so the quant_state entry is a placeholder until the
    converter's finish() rebuilds it from these two."""
    family = family_of(scheme.method)
    kernels = family.kernels(backend)  # the weight is on the backend's device already
    args = family.quantize_args(scheme)
    offset = None
    if kernels.quantize_queued is not None:  # no waiting for the double-quant offset
        record, offset = kernels.quantize_queued(weight, *args)
        restored = kernels.dequantize(record, offset)
    else:
        record = kernels.quantize(weight, *args)
        restore = kernels.restorer
        restored = restore(record) if restore else kernels.dequantize(*family.dequantize_args(record))
    pending = None if offset is None else (_without_tensors(record), offset)
    return _entries(job, record), restored, pending


def _entries(job: TensorJob, record: Any) -> dict[str, torch.Tensor]:
    """The checkpoint entries of a quantized weight's record, checked against the plan."""
    entries = family_of_record(record).entries(record, job.source.name)
    planned = [e.key for e in job.entries]
    if list(entries) != planned:
        raise InternalError(f"internal error: {job.source.name} produced {list(entries)}, planned {planned}")
    return entries


def _prepare(job: TensorJob, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != job.dtype.torch_dtype:
        tensor = tensor.to(job.dtype.torch_dtype)
    if job.quantized and job.decision.transpose:
        tensor = tensor.t().contiguous()  # Conv1D stores [in, out]; bitsandbytes wants [out, in]
    return tensor


def _known(error: RoundTripError) -> Callable[[], RoundTripError]:
    return lambda: error


def _count_nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    return torch.stack((torch.isnan(tensor).sum(), torch.isinf(tensor).sum()))


class CpuConverter:
    pin_memory = False

    def __init__(self, scheme: QuantScheme, allow_nonfinite: bool) -> None:
        self.scheme = scheme
        self.allow_nonfinite = allow_nonfinite

    def __call__(self, job: TensorJob, tensor: torch.Tensor) -> Converted:
        return self._convert(job, _prepare(job, tensor))

    def _convert(self, job: TensorJob, tensor: torch.Tensor) -> Converted:
        if not job.quantized:
            return Converted(job, {job.source.name: tensor}, lambda: None)
        entries, restored, _ = _quantize(job, tensor, self.scheme, "cpu")
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported below, or allowed
            error = self._error(job, tensor, roundtrip_sums(tensor, restored))
        return Converted(job, entries, _known(error))

    def convert_many(self, batch: list[tuple[TensorJob, torch.Tensor]]) -> list[Converted]:
        """Each tensor as ``self(job, tensor)`` converts it, in order; the batch's small weights go through
        one joined kernel call (``formats.batch``: the same bytes), the others one by one."""
        prepared = [_prepare(job, tensor) for job, tensor in batch]
        joined = [i for i, (job, _) in enumerate(batch) if job.quantized and joinable(prepared[i], self.scheme)]
        results = quantize_restore_many([prepared[i] for i in joined], self.scheme)
        with np.errstate(invalid="ignore", over="ignore"):
            sums = roundtrip_sums_many([prepared[i] for i in joined], [restored for _, restored in results])
        done = dict(zip(joined, zip(results, sums, strict=True), strict=True))
        converted = []
        for i, (job, _) in enumerate(batch):
            if i not in done:
                converted.append(self._convert(job, prepared[i]))
                continue
            (record, _), tensor_sums = done[i]
            converted.append(Converted(job, _entries(job, record), _known(self._error(job, prepared[i], tensor_sums))))
        return converted

    def _error(self, job: TensorJob, tensor: torch.Tensor, sums: torch.Tensor) -> RoundTripError:
        """The round-trip error, once the weight's values are known to be finite (or allowed not to be)."""
        # The float64 sum of squares is finite when every value is: the check costs no pass of its own
        # (a float64 overflow, or a NaN/Inf, is then counted exactly before refusing).
        if not self.allow_nonfinite and not math.isfinite(float(sums[0])):
            nan, inf = _count_nonfinite(tensor).tolist()
            if nan or inf:
                raise _nonfinite_error(job, nan, inf)
        return error_from_sums(sums, tensor.numel())


class CudaConverter:
    """Queues each tensor on one GPU: the host→device copy on its own stream, then kernels and the
    device→host copies of the results on a second, so the copy of the next tensor overlaps the
    kernels of this one. Inputs arrive in pinned memory (the reader allocates it so), and results go
    back into pinned memory; torch's caching host allocator reuses both once their copies are done."""

    pin_memory = True

    def __init__(self, scheme: QuantScheme, allow_nonfinite: bool, device: torch.device) -> None:
        self.scheme = scheme
        self.allow_nonfinite = allow_nonfinite
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.stream = torch.cuda.Stream(device)

    def __call__(self, job: TensorJob, tensor: torch.Tensor) -> Converted:
        if not job.quantized:  # kept tensors never visit the GPU
            return Converted(job, {job.source.name: _prepare(job, tensor)}, lambda: None)
        with torch.cuda.device(self.device):
            with torch.cuda.stream(self.copy_stream):
                on_device = tensor.to(self.device, non_blocking=True)
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(self.copy_stream)
                on_device.record_stream(self.stream)  # freed later by this stream, not the copy stream
                weight = _prepare(job, on_device)
                nonfinite = None if self.allow_nonfinite else _to_host(_count_nonfinite(weight))
                entries, restored, pending = _quantize(job, weight, self.scheme, "cuda")
                sums = _to_host(roundtrip_sums(weight, restored))
                host = {key: _to_host(value) for key, value in entries.items()}
                fields, offset = (None, None) if pending is None else (pending[0], _to_host(pending[1]))
                done = torch.cuda.Event()
                done.record(self.stream)
        numel = weight.numel()
        del weight, on_device, entries, restored, pending  # device memory goes back to the stream's pool now

        def finish() -> RoundTripError:
            done.synchronize()
            if nonfinite is not None and bool(nonfinite.any()):
                nan, inf = nonfinite.tolist()
                raise _nonfinite_error(job, nan, inf)
            if fields is not None and offset is not None:
                key, value = _quant_state_entry(fields, offset, job.source.name)
                host[key] = value  # the placeholder's key, so the plan's order stays
            return error_from_sums(sums, numel)

        return Converted(job, host, finish)


def _quant_state_entry(fields: QuantState4bit, offset: torch.Tensor, name: str) -> tuple[str, torch.Tensor]:
    """The quant_state entry of a double-quantized weight whose offset has reached the host."""
    return replace(fields, nested_offset=float(offset)).quant_state_entry(name)


def _without_tensors(q: QuantState4bit) -> QuantState4bit:
    """The record's fields without its device tensors (enough for its quant_state entry), so that
    keeping it does not keep device memory."""
    empty = torch.empty(0)
    return replace(q, packed=empty, absmax=empty, quant_map=empty, nested_absmax=empty, nested_quant_map=empty)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy, queued on the current stream (host tensors are returned as they are)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


Converter = CpuConverter | CudaConverter


def make_converters(
    backend: str, devices: tuple[torch.device, ...], scheme: QuantScheme, allow_nonfinite: bool
) -> list[Converter]:
    """One converter per device (tensors go round-robin), or one CPU converter."""
    if backend == "cpu":
        return [CpuConverter(scheme, allow_nonfinite)]
    return [CudaConverter(scheme, allow_nonfinite, d) for d in devices]
