"""One safetensors file: its header, validated without reading tensor data, and single-tensor reads.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
UTF-8 JSON ``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data section. Offsets are relative to the data section, which the tensors must cover exactly, without holes or
overlaps. We check everything the safetensors library checks, before trusting any size from the header.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnbcli import json_text
from bnbcli.errors import InputError
from bnbcli.formats.dtypes import BY_CODE, DType

# safetensors refuses headers over 100 MB (its MAX_HEADER_SIZE); a real 70B checkpoint's header is ~100 KB,
# so anything bigger is corrupt or hostile, and reading it would allocate that much.
MAX_HEADER_BYTES = 100_000_000
# 2^48 elements (a 256 TiB tensor at one byte each) is far past any real tensor, and keeps
# numel * itemsize well inside int64 so that torch and offsets arithmetic never overflow.
MAX_ELEMENTS = 2**48

_HEADER_LENGTH = struct.Struct("<Q")


# Where headers come from instead of the local file, while `headers_from` is active: a function that
# returns the header of a path (fetched from the Hub by range requests), or None to read the file.
_HEADER_SOURCE: ContextVar[Callable[[Path], SafetensorsFile | None] | None] = ContextVar("header_source", default=None)


@contextlib.contextmanager
def headers_from(source: Callable[[Path], SafetensorsFile | None]) -> Iterator[None]:
    """Within this block ``SafetensorsFile.open`` asks ``source`` first: a folder of empty stand-ins
    then opens like the checkpoint whose headers ``source`` knows, and no tensor data exists to read."""
    token = _HEADER_SOURCE.set(source)
    try:
        yield
    finally:
        _HEADER_SOURCE.reset(token)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: enough to read it with a single pread, and to plan without reading it."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute file offset of the tensor's first byte
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed, validated safetensors header. Tensors keep the header's order."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # absolute offset of the data section (8 + header length)
    file_size: int

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SafetensorsFile:
        """Read and validate the header of ``path``; never reads tensor data."""
        path = Path(path)
        source = _HEADER_SOURCE.get()
        if source is not None and (remote := source(path)) is not None:
            return remote
        try:
            # stat before open: opening a folder fails obscurely, and opening a FIFO would block.
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise InputError(f"{path}: not a regular file", "point at a .safetensors file")
            with open(path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                if file_size < _HEADER_LENGTH.size:
                    raise InputError(
                        f"{path}: {file_size} bytes is too short for a safetensors file (the header length alone is 8)",
                        "the file is truncated or not safetensors; download it again",
                    )
                (header_len,) = _HEADER_LENGTH.unpack(f.read(_HEADER_LENGTH.size))
                # Both checks come before the read, so an untrusted length never sizes an allocation.
                if header_len > file_size - _HEADER_LENGTH.size:
                    raise InputError(
                        f"{path}: header length {header_len} runs past the end of the {file_size}-byte file",
                        "the file is truncated or not safetensors; download it again",
                    )
                if header_len > MAX_HEADER_BYTES:
                    raise InputError(
                        f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
                        "(safetensors refuses headers over 100 MB; real ones are kilobytes)",
                        "the file is corrupt or not safetensors",
                    )
                raw = f.read(header_len)
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}", "check the path and its permissions") from e
        if len(raw) != header_len:  # the file shrank under us
            raise InputError(f"{path}: header truncated while reading", "the file is changing; try again")
        return cls.from_header(path, raw, file_size)

    @classmethod
    def from_header(cls, path: Path, raw: bytes, file_size: int) -> SafetensorsFile:
        """Validate a header read elsewhere (a Hub range request): ``raw`` is the JSON, ``file_size`` the
        whole file's length."""
        data_start = _HEADER_LENGTH.size + len(raw)
        metadata, entries = _parse_header(path, raw)
        tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in entries.items()}
        _check_layout(path, tensors, data_start, file_size)
        return cls(path=path, metadata=metadata, tensors=tensors, data_start=data_start, file_size=file_size)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a tensor declared twice is a corrupt header.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        header = json_text.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header is not valid UTF-8 ({e.reason} at byte {e.start})", _NOT_ST) from e
    except ValueError as e:  # json.JSONDecodeError is a ValueError, as is a duplicate key
        raise InputError(f"{path}: header is not valid JSON: {e}", _NOT_ST) from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is a JSON {type(header).__name__}, not an object", _NOT_ST)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: __metadata__ must map strings to strings", _NOT_ST)
    return metadata, header


_NOT_ST = "the file is corrupt or not a safetensors file"


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass, and True is not a dimension


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: entry is not a JSON object", _NOT_ST)
    spelled = entry.get("dtype")
    dtype = BY_CODE.get(spelled) if isinstance(spelled, str) else None
    if dtype is None:
        raise InputError(
            f"{where}: unknown dtype {spelled!r}",
            f"supported dtypes: {' '.join(BY_CODE)}",
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers", _NOT_ST)
    numel = 1
    for d in shape:  # stop at the first dimension that overflows, before any product gets huge
        if d > MAX_ELEMENTS:
            numel = d
            break
        numel *= d
        if numel > MAX_ELEMENTS:
            break
    if numel > MAX_ELEMENTS:
        raise InputError(f"{where}: shape {shape} has more than 2^48 elements", _NOT_ST)
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InputError(f"{where}: data_offsets {offsets!r} is not a pair of integers", _NOT_ST)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InputError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end", _NOT_ST)
    expected = numel * dtype.itemsize
    if end - begin != expected:
        raise InputError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but {spelled} {shape} needs {expected}",
            _NOT_ST,
        )
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(shape), path=path, start=data_start + begin, nbytes=end - begin
    )


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires."""
    data_len = file_size - data_start
    cursor = 0  # relative to the data section
    previous = ""
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        begin, end = info.start - data_start, info.start - data_start + info.nbytes
        if end > data_len:
            raise InputError(
                f"{path}: tensor {info.name!r} ends at data byte {end}, past the {data_len}-byte data section "
                "(truncated file?)",
                "the file is truncated; download it again",
            )
        if begin < cursor:
            raise InputError(f"{path}: tensor {info.name!r} overlaps tensor {previous!r}", _NOT_ST)
        if begin > cursor:
            after = f"after tensor {previous!r}" if previous else "at the start of the data section"
            raise InputError(
                f"{path}: tensor {info.name!r} is not contiguous: {begin - cursor} unused bytes {after}", _NOT_ST
            )
        cursor, previous = end, info.name
    if cursor != data_len:
        raise InputError(
            f"{path}: {data_len - cursor} bytes after the last tensor are not contiguous with any tensor", _NOT_ST
        )


# --- reading tensor bytes (torch-free: checkpoint/tensor_reads.py makes tensors of them) -----------------


def open_tensor_file(info: TensorInfo) -> int:
    """A read-only descriptor of the file that holds ``info``."""
    try:
        return os.open(info.path, os.O_RDONLY)
    except OSError as e:
        raise InputError(
            f"{info.path}: tensor {info.name!r}: cannot read: {e.strerror or e}",
            "check that the file is still there and readable, then run again",
        ) from e


def read_range(fd: int, info: TensorInfo, view: memoryview, begin: int, end: int, view_start: int = 0) -> None:
    """Fill ``view`` with the tensor's bytes [begin, end) from ``fd`` (its open file), where ``view`` holds
    the tensor's bytes from ``view_start`` (0: the whole tensor; ``begin``: just this range)."""
    done = begin
    try:
        while done < end:  # one read returns at most ~2 GiB on Linux, or less near the end of a file
            n = os.preadv(fd, [view[done - view_start : end - view_start]], info.start + done)
            if n == 0:
                raise InputError(
                    f"{info.path}: tensor {info.name!r}: file ended {info.nbytes - done} bytes early",
                    "the file was truncated after it was opened; download it again",
                )
            done += n
    except OSError as e:
        raise InputError(
            f"{info.path}: tensor {info.name!r}: cannot read: {e.strerror or e}",
            "check that the file is still there and readable, then run again",
        ) from e
