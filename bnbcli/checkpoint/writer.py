"""Streaming safetensors writer: tensors are written one at a time at offsets fixed in advance.

A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes back to back.
Like safetensors' own ``save_file`` we lay tensors out by alignment (8-, 4-, 2-, then 1-byte dtypes),
then by name, so every tensor is aligned for its dtype. Because every size is known from the plan,
each tensor goes straight to its final offset as soon as it exists: memory holds one tensor, not a shard.

The one exception is a double-quantized 4-bit ``quant_state`` JSON, whose length depends on the
offset's decimal digits. Those few small tensors go last, are held until the shard closes, and the
header is reserved at its largest possible size and padded with spaces (as safetensors pads it).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, cast

from bnbcli.errors import InternalError
from bnbcli.formats.dtypes import INT16, UINT8, DType

if TYPE_CHECKING:  # planning sizes shards without torch; only the tensors written are torch's
    import torch


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_SPAN = 1 << 20  # writes smaller than this are asked for together, once they add up to it


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing). The disk then works while the next
    tensors are converted, and the fsync that closes the shard has little left to wait for. The call
    itself can block while the disk's queue is full: ``_Writeback`` makes it off the writer's thread."""
    fn = _sync_file_range()
    if fn is not None and length:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only loses the head start


class WritebackSpans:
    """Writes gathered for writeback requests: one of ``WRITEBACK_SPAN`` bytes or more is asked for as it is,
    smaller ones together once they add up to it (a request each for 10,000 tiny tensors cost more than
    writing them). ``add`` and ``rest`` return the (offset, length) to ask for, or None."""

    def __init__(self) -> None:
        self.span: tuple[int, int] | None = None  # small writes not yet asked for: [start, end)
        self.gathered = 0  # their bytes

    def add(self, offset: int, length: int) -> tuple[int, int] | None:
        if length >= WRITEBACK_SPAN:
            return offset, length
        start, end = self.span or (offset, offset + length)
        self.span = (min(start, offset), max(end, offset + length))
        self.gathered += length
        return self.rest() if self.gathered >= WRITEBACK_SPAN else None

    def rest(self) -> tuple[int, int] | None:
        """The small writes not yet asked for, as one request (then forgotten)."""
        if self.span is None:
            return None
        (start, end), self.span, self.gathered = self.span, None, 0
        return start, end - start


class _Writeback:
    """Early writeback of one open file, asked for from a thread of its own.

    Made inline, ``sync_file_range`` held the writer thread whenever the disk's queue was full, and the
    tensors behind it waited: on an H100 machine writing a 5.7 GB output, the write stage was busy
    4.7-5.3 s inline and 3.5-3.8 s with this thread (bench, 2026-12-06). ``close`` returns once every
    request has been made, before the file's fsync and close (a late request must never meet a closed
    or reused descriptor)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.requests: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.spans = WritebackSpans()
        if _sync_file_range() is not None:
            self.thread = threading.Thread(target=self._run, name="bnb-writeback", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while (request := self.requests.get()) is not None:
            start_writeback(self.fd, *request)

    def request(self, offset: int, length: int) -> None:
        """Ask for these bytes (small writes gathered first)."""
        if self.thread is not None and (span := self.spans.add(offset, length)) is not None:
            self.requests.put(span)

    def close(self) -> None:
        if self.thread is not None:
            self.requests.put(None)
            self.thread.join()
            self.thread = None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous.

    Through numpy, with one torch call (two for the dtypes numpy lacks): each torch call lets the GIL go,
    and with the reader, converter and writer threads each waiting for it, a few calls per entry of
    tens of thousands of tiny tensors cost more than the bytes (BENCHMARKS.md, "many tiny tensors")."""
    if not tensor.numel():
        return memoryview(b"")
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize <= 2:  # bfloat16, the float8s (float16 too)
        tensor = tensor.view((UINT8 if tensor.dtype.itemsize == 1 else INT16).torch_dtype)
    try:
        array = tensor.numpy()
    except TypeError:  # a dtype numpy lacks still (complex32, the unsigned 16-64 bits of an old numpy …)
        return tensor.contiguous().reshape(-1).view(UINT8.torch_dtype).numpy().data
    if not array.flags.c_contiguous:
        array = array.copy()
    return array.reshape(-1).view("u1").data


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor an output shard will hold. For a ``variable`` one, ``shape`` is its largest shape."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    variable: bool = False
    nbytes: int = field(init=False, repr=False, compare=False)  # asked for again and again while a plan is sized

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", math.prod(self.shape) * self.dtype.itemsize)


HeaderEntry = tuple[str, DType, tuple[int, ...], int, int]  # key, dtype, shape, begin, end


def _header_bytes(entries: list[HeaderEntry], metadata: dict[str, str]) -> bytes:
    """``json.dumps({"__metadata__": metadata, key: {"dtype", "shape", "data_offsets"}, ...},
    separators=(",", ":"))``, byte for byte, about 5x faster: an entry's text is formatted directly (its key
    escaped as json.dumps escapes it), not built as dicts and walked by the encoder (an MoE shard has
    tens of thousands of entries; ``tests/unit/test_writer_header.py`` compares the two)."""
    parts = [json.dumps({"__metadata__": metadata}, separators=(",", ":"))[:-1]]
    for key, dtype, shape, begin, end in entries:
        dims = ",".join(map(str, shape))
        parts.append(
            f'{encode_basestring_ascii(key)}:{{"dtype":"{dtype.code}","shape":[{dims}],"data_offsets":[{begin},{end}]}}'
        )
    return (",".join(parts) + "}").encode("ascii")


def _padded(length: int) -> int:
    """Header length padded so the data section starts 8-byte aligned (8 + length % 8 == 0)."""
    return length + (-length) % 8


@dataclass(frozen=True)
class ShardLayout:
    """Where a ShardWriter puts each tensor, decided from the planned tensors alone.

    Fixed tensors get their offsets; variable ones follow them, in key order, once their lengths are
    known. The header is reserved at its largest (every variable tensor at its largest size), so the
    file holds ``8 + header_size + fixed_end`` bytes plus the variable tensors' actual bytes.
    """

    offsets: dict[str, tuple[int, int]]  # fixed tensors: [begin, end) in the data section
    fixed_end: int
    variable_keys: tuple[str, ...]
    header_size: int
    header: bytes  # the header with every variable tensor at its largest: the final one when there are none

    @property
    def data_start(self) -> int:
        """Where the data section begins in the file: after the 8-byte length and the reserved header."""
        return 8 + self.header_size

    def file_size(self, variable_bytes: int) -> int:
        return self.data_start + self.fixed_end + variable_bytes


def shard_layout(tensors: list[PlannedTensor], metadata: dict[str, str]) -> ShardLayout:
    fixed = sorted((t for t in tensors if not t.variable), key=lambda t: (-t.dtype.itemsize, t.key))
    variable = sorted((t for t in tensors if t.variable), key=lambda t: t.key)
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for t in fixed:
        offsets[t.key] = (position, position + t.nbytes)
        position += t.nbytes
    fixed_end = position
    # The largest header this shard can need: every variable tensor at its largest size.
    worst = [(t.key, t.dtype, t.shape, *offsets[t.key]) for t in fixed]
    for t in variable:
        worst.append((t.key, t.dtype, t.shape, position, position + t.nbytes))
        position += t.nbytes
    header = _header_bytes(worst, metadata)
    return ShardLayout(offsets, fixed_end, tuple(t.key for t in variable), _padded(len(header)), header)


class ShardWriter:
    """Writes one safetensors file from a known list of tensors, in any order, one at a time.

    ``prewritten``: keys another writer has placed (or is placing) at their planned offsets in this file
    (pipeline/early_copy.py); the file is then opened as it is, not emptied, and those keys count as written.
    """

    def __init__(
        self,
        path: Path,
        tensors: list[PlannedTensor],
        metadata: dict[str, str],
        prewritten: frozenset[str] = frozenset(),
        layout: ShardLayout | None = None,
    ) -> None:
        """``layout``: ``shard_layout(tensors, metadata)``, when the caller has it already."""
        self.path = path
        self.metadata = metadata
        self.planned = {t.key: t for t in tensors}
        layout = layout or shard_layout(tensors, metadata)
        self.offsets = dict(layout.offsets)
        self.fixed_end = layout.fixed_end
        self.variable_keys = list(layout.variable_keys)
        self.header_size = layout.header_size
        self.fixed_header = layout.header
        self.data_start = layout.data_start
        self.pending: dict[str, bytes] = {}
        self.written: set[str] = set(prewritten)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if prewritten else os.O_TRUNC), 0o644)
        self.writeback = _Writeback(self.fd)

    def write(self, key: str, tensor: torch.Tensor) -> memoryview:
        """Write one planned tensor; returns its bytes (a view of the tensor's memory, for hashing)."""
        return self.write_many([(key, tensor)])[0]

    def write_many(self, items: list[tuple[str, torch.Tensor]]) -> list[memoryview]:
        """Write planned tensors; returns each one's bytes, in order (views of the tensors' memory).

        Small tensors whose planned places follow one another go out gathered into one buffer and one
        write: an MoE batch of 512 tiny tensors has ~1,300 entries but a few runs in the layout, and a
        write per entry (each letting the GIL go) cost more than the rest of the writer's work. The
        file's bytes are those of writing each tensor alone (``tests/unit/test_writer_batch.py``)."""
        views, placed = [], []
        for key, tensor in items:
            data = self._checked_bytes(key, tensor)
            self.written.add(key)
            views.append(data)
            if self.planned[key].variable:
                self.pending[key] = bytes(data)
            else:
                placed.append((self.offsets[key][0], data))
        placed.sort(key=lambda item: item[0])
        run: list[memoryview] = []
        start = end = 0
        for begin, data in placed:
            if run and (begin != end or len(data) >= WRITEBACK_SPAN or end - start >= WRITEBACK_SPAN):
                self._write_at(start, run)
                run = []
            if not run:
                start = end = begin
            run.append(data)
            end += len(data)
        if run:
            self._write_at(start, run)
        return views

    def _checked_bytes(self, key: str, tensor: torch.Tensor) -> memoryview:
        """The bytes of ``tensor``, once it is known to be the planned ``key``, not yet written."""
        planned = self.planned.get(key)
        if planned is None or key in self.written:
            raise InternalError(f"internal error: {key} is not planned for {self.path.name} or written twice")
        shape = tuple(tensor.shape)
        fits = shape == planned.shape or (planned.variable and len(shape) == 1 and shape[0] <= planned.shape[0])
        if tensor.dtype != planned.dtype.torch_dtype or not fits:
            raise InternalError(
                f"internal error: {key} is {tensor.dtype} {list(shape)}, planned {planned.dtype} {list(planned.shape)}"
            )
        return tensor_bytes(tensor)

    def _write_at(self, begin: int, run: list[memoryview]) -> None:
        """Bytes that follow one another in the data section, from ``begin``, with one write when
        they are several (joined in a buffer) and with none of their own copy when one."""
        view = memoryview(b"".join(run)) if len(run) > 1 else run[0]
        offset = self.data_start + begin
        length = len(view)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        self.writeback.request(self.data_start + begin, length)

    def close(self) -> int:
        """``finish`` and ``sync``: the shard complete and on disk; returns the tensor data bytes."""
        data_bytes = self.finish()
        self.sync()
        return data_bytes

    def finish(self) -> int:
        """Place the variable tensors and write the header; returns the tensor data bytes. The file is
        complete but maybe not on disk yet: ``sync`` does that (and may run on another thread)."""
        missing = set(self.planned) - self.written
        if missing:
            raise InternalError(f"internal error: {len(missing)} planned tensors never written to {self.path.name}")
        position = self.fixed_end
        tail = bytearray()
        entries: list[HeaderEntry] = []
        for key in self.variable_keys:
            data = self.pending[key]
            entries.append((key, UINT8, (len(data),), position, position + len(data)))
            position += len(data)
            tail += data
        header = self._header(entries) if entries else self.fixed_header
        if len(header) > self.header_size:
            raise InternalError(f"internal error: header of {self.path.name} outgrew its reservation")
        header += b" " * (self.header_size - len(header))
        os.pwrite(self.fd, tail, self.data_start + self.fixed_end)
        os.pwrite(self.fd, len(header).to_bytes(8, "little") + header, 0)
        os.ftruncate(self.fd, self.data_start + position)
        return position

    def _header(self, variable: list[HeaderEntry]) -> bytes:
        """The header with the variable tensors at their actual sizes, after the fixed ones (in offset order)."""
        fixed = [(k, self.planned[k].dtype, self.planned[k].shape, *self.offsets[k]) for k in self.offsets]
        return _header_bytes(fixed + variable, self.metadata)

    def sync(self) -> None:
        """Flush the file to disk and close it."""
        self.writeback.close()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        self.writeback.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
