"""ShardWriter.write_many: a batch's tensors whose planned places follow one another go out as one write;
the file must be byte for byte the one written a tensor at a time, in any order and any batching."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from bnbcli.checkpoint import writer as writer_module
from bnbcli.checkpoint.writer import WRITEBACK_SPAN, PlannedTensor, ShardWriter
from bnbcli.errors import InternalError
from bnbcli.formats.dtypes import BFLOAT16, BY_NAME, UINT8

DTYPES = [BY_NAME[n] for n in ("float32", "bfloat16", "float16", "int8", "uint8", "int64")]
METADATA = {"format": "pt"}


def _planned(rng: random.Random, count: int) -> list[PlannedTensor]:
    tensors = []
    for i in range(count):
        if rng.random() < 0.1:  # variable: written at the end, at its actual length
            tensors.append(PlannedTensor(f"t{i:03d}.quant_state", UINT8, (rng.randint(1, 90),), True))
            continue
        shape = tuple(rng.choice([0, 1, 3, 16, 64]) for _ in range(rng.randint(0, 3)))
        if rng.random() < 0.05:  # larger than a gathered run may grow: written alone
            shape = (WRITEBACK_SPAN // 4 + rng.randint(0, 9),)
        tensors.append(PlannedTensor(f"t{i:03d}.{rng.choice('abc')}", rng.choice(DTYPES), shape))
    return tensors


def _value(t: PlannedTensor, rng: random.Random) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    if t.variable:
        return torch.randint(0, 256, (rng.randint(1, t.shape[0]),), dtype=torch.uint8, generator=g)
    value = torch.randint(-100, 100, t.shape, generator=g).to(t.dtype.torch_dtype)
    if value.dim() == 2 and rng.random() < 0.3:  # a transposed copy: not contiguous, same values
        value = value.t().contiguous().t()
    return value


def _write(path: Path, planned: list[PlannedTensor], batches: list[list[tuple[str, torch.Tensor]]]) -> list:
    writer = ShardWriter(path, planned, METADATA)
    views = []
    for batch in batches:
        views.extend(bytes(v) for v in writer.write_many(batch))
    writer.close()
    return views


@pytest.mark.parametrize("seed", range(12))
def test_batched_writes_give_the_file_of_one_by_one_writes(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    planned = _planned(rng, rng.randint(1, 80))
    values = {t.key: _value(t, rng) for t in planned}
    order = [(t.key, values[t.key]) for t in (planned if seed % 3 == 0 else rng.sample(planned, len(planned)))]
    one_by_one = _write(tmp_path / "a.safetensors", planned, [[item] for item in order])
    cuts = sorted(rng.sample(range(1, len(order)), min(len(order) - 1, rng.randint(0, 4)))) if len(order) > 1 else []
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    batched = _write(tmp_path / "b.safetensors", planned, batches)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert batched == one_by_one  # the bytes returned for hashing, in the order given
    assert batched == [values[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for key, _ in order]


def test_neighbours_in_the_layout_go_out_with_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 tiny tensors of one dtype, planned one after another by name: one write for all of them; a
    tensor of a MiB or more is written alone, without being copied into a gathered buffer."""
    planned = [PlannedTensor(f"w{i:03d}", BFLOAT16, (16,)) for i in range(100)]
    planned.append(PlannedTensor("w050.big", BFLOAT16, (WRITEBACK_SPAN // 2,)))
    writes: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data, offset: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", counting_pwrite)
    writer = ShardWriter(tmp_path / "s.safetensors", planned, METADATA)
    items = [(t.key, torch.full(t.shape, float(i), dtype=torch.bfloat16)) for i, t in enumerate(planned)]
    writer.write_many(list(reversed(items)))
    # w000..w050 (51 × 32 bytes), then w050.big alone, then w051..w099 (49 × 32 bytes)
    assert writes == [51 * 32, WRITEBACK_SPAN, 49 * 32]
    writer.close()


def test_a_key_twice_in_one_batch_is_refused(tmp_path: Path) -> None:
    planned = [PlannedTensor("a", UINT8, (4,)), PlannedTensor("b", UINT8, (4,))]
    writer = ShardWriter(tmp_path / "s.safetensors", planned, METADATA)
    value = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(InternalError, match="written twice"):
        writer.write_many([("a", value), ("b", value), ("a", value)])
    writer.abort()


@pytest.mark.parametrize("dtype", [d for d in BY_NAME.values() if hasattr(torch, d.name)], ids=lambda d: d.name)
def test_tensor_bytes_are_the_tensors_bytes_in_memory_order(dtype) -> None:
    """Every dtype (those numpy lacks through a view of their own size), contiguous or not, 0-d or empty:
    the bytes torch holds for the tensor laid out in row-major order."""
    base = torch.arange(-6, 18, dtype=torch.float64).reshape(4, 6)
    values = base.abs().to(dtype.torch_dtype) if not dtype.is_floating_point else base.to(dtype.torch_dtype)
    for tensor in (values, values.t(), values[:, ::2], values[1], values[0, 0], values[:0]):
        expected = (
            tensor.contiguous().flatten().view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        )
        assert bytes(writer_module.tensor_bytes(tensor)) == bytes(expected.tolist()), (dtype.name, tuple(tensor.shape))
