"""The CPU fast paths' own threads (bnbcli/formats/parts.py): a tensor cut once into parts, torch ops
single-threaded inside them, and the same bytes whatever the number of threads."""

from __future__ import annotations

import threading
from itertools import pairwise

import pytest
import torch

from bnbcli.formats import blocks, blockwise8, fourbit, int8, parts


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for a test, and puts the old one back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(("count", "unit", "wanted"), [(10, 3, 2), (9, 3, 3), (9, 3, 5), (1, 4, 2), (100, 1, 7)])
def test_split_covers_everything_in_whole_units(count: int, unit: int, wanted: int) -> None:
    ranges = parts.split(count, unit, wanted)
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    assert all(start % unit == 0 and stop > start for start, stop in ranges)
    assert len(ranges) == min(wanted, -(-count // unit))
    sizes = [stop - start for start, stop in ranges[:-1]]
    assert max(sizes, default=0) - min(sizes, default=0) <= unit  # as even as whole units allow


def test_parts_run_on_their_own_threads_with_single_threaded_torch(torch_threads) -> None:
    torch_threads(3)
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    lock = threading.Lock()

    def work(start: int, stop: int) -> None:
        with lock:
            seen[(start, stop)] = (threading.get_ident(), torch.get_num_threads())

    parts.for_each_part(work, 30, 5)
    assert sorted(seen) == [(0, 10), (10, 20), (20, 30)]
    assert seen[(10, 20)][0] != threading.get_ident() != seen[(20, 30)][0]
    assert {threads for _, threads in seen.values()} == {1}  # no OpenMP region per op inside a part
    assert seen[(0, 10)][0] == threading.get_ident()  # the first part on the calling thread
    assert torch.get_num_threads() == 3  # put back


def test_a_small_tensor_is_one_part_on_the_calling_thread(torch_threads) -> None:
    torch_threads(2)
    seen = []
    parts.for_each_part(
        lambda start, stop: seen.append((start, stop, threading.get_ident(), torch.get_num_threads())), 3, 8
    )
    assert seen == [(0, 3, threading.get_ident(), 1)]
    assert torch.get_num_threads() == 2


def test_an_error_in_a_part_is_raised_and_the_threads_are_put_back(torch_threads) -> None:
    torch_threads(2)

    def work(start: int, stop: int) -> None:
        if start > 0:
            raise ValueError("second part")

    with pytest.raises(ValueError, match="second part"):
        parts.for_each_part(work, 20, 5)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_bytes_whatever_the_thread_count(threads: int, torch_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each format on a tensor cut into several parts (small chunks), against the whole-tensor reference."""
    monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 4096)
    torch_threads(threads)
    g = torch.Generator().manual_seed(threads)
    x = torch.randn(96, 1000, generator=g).to(torch.bfloat16)  # 96,000 elements: 23 chunks and a partial one
    x[5, :70] = 0.0  # an all-zero block, redone by the reference after the parts
    x[50, 3] = float("nan")
    for quant_type in ("nf4", "fp4"):
        table = fourbit.code_table(quant_type)
        fast = blocks.quantize_blocks(x, 64, table, pack=True)
        reference = blocks.reference_quantize_blocks(x, 64, table.encoder, pack=True)
        assert torch.equal(fast[0], reference[0]) and torch.equal(
            fast[1].view(torch.int32), reference[1].view(torch.int32)
        ), quant_type
    table = blockwise8.code_table()
    fast = blocks.quantize_blocks(x, 256, table)
    reference = blocks.reference_quantize_blocks(x, 256, table.encoder)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1].view(torch.int32), reference[1].view(torch.int32))
    rows, ref_rows = int8.quantize_int8_rowwise(x), int8.reference_quantize_int8_rowwise(x)
    assert torch.equal(rows.CB, ref_rows.CB) and torch.equal(rows.SCB.view(torch.int32), ref_rows.SCB.view(torch.int32))
    assert torch.get_num_threads() == threads
