"""Tensors read from a safetensors file: single-tensor reads with pread, into memory the tensor owns."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from bnbcli.checkpoint.safetensors_file import TensorInfo, open_tensor_file, read_range
from bnbcli.errors import InputError
from bnbcli.formats.dtypes import UINT8

# A tensor larger than this is read by READ_THREADS threads in parts this size. 64 MiB parts left the 32 MB
# attention weights of an 8B model to one thread and its 112 MB MLP weights to two: the reader was busy
# 1.88-1.90 s of a 2.0 s stream on an H100, 1.25-1.42 s with 16 MiB parts (BENCHMARKS.md, 2026-12-07).
READ_PART_BYTES = 16 << 20
READ_THREADS = 4


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="bnb-read-part")


def _read_part(fd: int, info: TensorInfo, view: memoryview, begin: int) -> None:
    read_range(fd, info, view, begin, min(begin + READ_PART_BYTES, info.nbytes))


def read_tensor(info: TensorInfo, pin_memory: bool = False) -> torch.Tensor:
    """Read one tensor's bytes with pread into a tensor that owns its memory (no file mapping stays open);
    into page-locked memory with ``pin_memory``, ready for an asynchronous copy to a GPU. A large
    tensor is read in parts by several threads: one thread copies ~3 GB/s out of the page cache,
    which is slower than a GPU converts, and a fast disk also wants several requests in flight."""
    # torch.empty does not zero-fill: half the cost of a bytearray
    raw = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
    if info.nbytes:
        view = raw.numpy().data  # a writable memoryview of the tensor's own memory
        fd = open_tensor_file(info)
        try:
            parts = range(0, info.nbytes, READ_PART_BYTES)
            if len(parts) == 1:
                read_range(fd, info, view, 0, info.nbytes)
            else:
                futures = [_read_pool().submit(_read_part, fd, info, view, p) for p in parts]
                wait(futures)  # every part done before fd closes, even when one failed
                for future in futures:
                    future.result()
        finally:
            os.close(fd)
    return _typed(raw, info)


def read_tensors(infos: list[TensorInfo]) -> Iterator[torch.Tensor]:
    """``read_tensor`` of each, in order, read as they are asked for; a run of small tensors close to each
    other in one file is read with one pread into one buffer that they share, the bytes between them too
    (tens of thousands of tiny tensors would otherwise cost an open, a read and a close each, system calls
    that let the GIL go; an MoE's weights are read apart from their biases, which the early copy took)."""
    for run in _runs(infos):
        if len(run) == 1:
            yield read_tensor(run[0])
            continue
        first = run[0]
        nbytes = run[-1].start + run[-1].nbytes - first.start
        try:
            raw = read_tensor(TensorInfo(first.name, UINT8, (nbytes,), first.path, first.start, nbytes))
        except InputError:  # the tensor that fails says so on its own
            yield from (read_tensor(info) for info in run)
            continue
        for info in run:
            part = raw[info.start - first.start : info.start - first.start + info.nbytes]
            aligned = part.data_ptr() % info.dtype.itemsize == 0
            yield _typed(part if aligned else part.clone(), info)


RUN_BYTES = 1 << 20  # a run read at once spans at most this many bytes of tensors below SMALL_READ_BYTES
SMALL_READ_BYTES = 64 << 10  # also the most bytes a run reads between two of its tensors


def _runs(infos: list[TensorInfo]) -> Iterator[list[TensorInfo]]:
    """``infos`` in order, cut into runs of small tensors that follow each other closely in one file."""
    run: list[TensorInfo] = []
    for info in infos:
        end = run[-1].start + run[-1].nbytes if run else 0
        if run and not (
            info.nbytes <= SMALL_READ_BYTES
            and info.path == run[-1].path
            and end <= info.start <= end + SMALL_READ_BYTES
            and info.start + info.nbytes - run[0].start <= RUN_BYTES
        ):
            yield run
            run = []
        run.append(info)
        if info.nbytes > SMALL_READ_BYTES:
            yield run
            run = []
    if run:
        yield run


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The tensor of ``raw``, ``info``'s bytes."""
    if sys.byteorder == "big" and info.dtype.itemsize > 1:  # safetensors stores little-endian
        raw = raw.view(-1, info.dtype.itemsize).flip(1).contiguous().view(-1)
    return raw.view(info.dtype.torch_dtype).reshape(info.shape)
