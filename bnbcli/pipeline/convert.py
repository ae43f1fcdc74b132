"""Turn one source tensor into the checkpoint entries its plan names, on the CPU or on a GPU.

A converter returns at once with a ``Converted``: the entries as host tensors and a ``finish()`` that
waits for them and returns the round-trip error. On the CPU the work is already done by then; on a GPU
it is queued on the device's streams, so the caller can read the next tensor and the writer can write
the previous one while the kernels run. Both go through ``bnbcli.api`` and give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bnbcli import api
from bnbcli.errors import InputError, InternalError
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.metrics import RoundTripError, error_from_sums, roundtrip_sums
from bnbcli.plan.quantize_layout import TensorJob
from bnbcli.plan.scheme import QuantScheme

WEIGHT_FORMAT_ROW = 0  # the int8 `weight_format` entry: 0 = "row", the only layout transformers writes


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
    """(entries, restored, pending): the planned entries of ``weight``, its dequantized values, and
    None or, on the GPU with double quantization, (the record's fields without its tensors, the device
    offset): the offset is not read yet, so the quant_state entry is a placeholder until the
    converter's finish() rebuilds it from these two."""
    pending = None
    if scheme.method == "int8":
        q = api.quantize_int8_rowwise(weight, backend=backend)
        restored = api.dequantize_int8_rowwise(q.CB, q.SCB, backend=backend)
        row = torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)
        values = [q.CB, q.SCB, row]
        entries = dict(zip((e.key for e in job.entries), values, strict=True))
    elif backend == "cuda":
        from bnbcli.backends import cuda

        args = (scheme.method, scheme.blocksize, scheme.double_quant, scheme.quant_storage)
        q4, offset = cuda.quantize_4bit_queued(weight, *args)  # no waiting for the double-quant offset
        restored = cuda.dequantize_4bit(q4, offset)
        entries = q4.state_dict(job.source.name)
        pending = None if offset is None else (_without_tensors(q4), offset)
    else:
        q4 = api.quantize_4bit(
            weight, scheme.method, scheme.blocksize, scheme.double_quant, scheme.quant_storage, backend=backend
        )
        restored = api.dequantize_4bit(q4, backend=backend)
        entries = q4.state_dict(job.source.name)
    planned = [e.key for e in job.entries]
    if list(entries) != planned:
        raise InternalError(f"internal error: {job.source.name} produced {list(entries)}, planned {planned}")
    return entries, restored, pending


def _prepare(job: TensorJob, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != job.dtype:
        tensor = tensor.to(job.dtype)
    if job.quantized and job.decision.transpose:
        tensor = tensor.t().contiguous()  # Conv1D stores [in, out]; bitsandbytes wants [out, in]
    return tensor


def _count_nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    return torch.stack((torch.isnan(tensor).sum(), torch.isinf(tensor).sum()))


class CpuConverter:
    pin_memory = False

    def __init__(self, scheme: QuantScheme, allow_nonfinite: bool) -> None:
        self.scheme = scheme
        self.allow_nonfinite = allow_nonfinite

    def __call__(self, job: TensorJob, tensor: torch.Tensor) -> Converted:
        tensor = _prepare(job, tensor)
        if not job.quantized:
            return Converted(job, {job.source.name: tensor}, lambda: None)
        if not self.allow_nonfinite and not bool(torch.isfinite(tensor).all()):
            nan, inf = _count_nonfinite(tensor).tolist()  # the error path only
            raise _nonfinite_error(job, nan, inf)
        entries, restored, _ = _quantize(job, tensor, self.scheme, "cpu")
        error = error_from_sums(roundtrip_sums(tensor, restored), tensor.numel())
        return Converted(job, entries, lambda: error)


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
