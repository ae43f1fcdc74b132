"""The streaming writer's safetensors header: formatted directly instead of through json.dumps, and built
once per shard and reused; its bytes must be json.dumps' and the files safetensors' own."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bnbcli.checkpoint.writer import PlannedTensor, ShardWriter, _header_bytes, shard_layout
from bnbcli.formats.dtypes import BY_NAME, UINT8

NAMES = ["model.layers.0.mlp.experts.7.up_proj.weight", "x", "é.wéight", 'quote"back\\slash', "tab\tline\n", "😀.w"]
DTYPES = [BY_NAME[n] for n in ("float32", "bfloat16", "float16", "int8", "uint8", "int64", "bool")]
# safetensors' own spelling, written out here rather than taken from the code under test
CODES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "int8": "I8",
    "uint8": "U8",
    "int64": "I64",
    "bool": "BOOL",
}


def _reference(entries: list, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    for key, dtype, shape, begin, end in entries:
        header[key] = {"dtype": CODES[dtype.name], "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _random_tensors(rng: random.Random, count: int) -> list[PlannedTensor]:
    tensors = []
    for i in range(count):
        shape = tuple(rng.choice([0, 1, 3, 16, 1000]) for _ in range(rng.randint(0, 3)))
        name = f"{rng.choice(NAMES)}.{i}"
        tensors.append(PlannedTensor(name, rng.choice(DTYPES), shape, variable=rng.random() < 0.1))
    return tensors


@pytest.mark.parametrize("seed", range(20))
def test_header_is_json_dumps_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    entries = []
    for i, t in enumerate(_random_tensors(rng, rng.randint(0, 40))):
        begin = rng.randint(0, 10**12)
        entries.append((t.key, t.dtype, t.shape, begin, begin + rng.randint(0, 10**6) * (i % 3)))
    metadata = rng.choice([{}, {"format": "pt"}, {"format": "pt", "é": 'a"b'}])
    assert _header_bytes(entries, metadata) == _reference(entries, metadata)


@pytest.mark.parametrize("seed", range(10))
def test_written_shard_has_the_reference_header_and_planned_size(seed: int, tmp_path: Path) -> None:
    """Fixed tensors only (the header built once and reused) or with variable ones (rebuilt at the end):
    the file's header is json.dumps' of its entries, padded, and safetensors reads every tensor back."""
    rng = random.Random(seed)
    planned = [t for t in _random_tensors(rng, rng.randint(1, 30)) if seed % 2 == 0 or not t.variable]
    planned = [t if t.variable is False else PlannedTensor(t.key, UINT8, (64,), True) for t in planned]
    metadata = {"format": "pt"}
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(path, planned, metadata)
    values = {}
    for t in rng.sample(planned, len(planned)):
        if t.variable:
            value = torch.randint(0, 255, (rng.randint(1, 64),), dtype=torch.uint8)
        else:
            value = torch.randint(0, 2, t.shape).to(t.dtype.torch_dtype)
        values[t.key] = value
        writer.write(t.key, value)
    writer.close()

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    layout = shard_layout(planned, metadata)
    assert length == layout.header_size
    order = sorted((t for t in planned if not t.variable), key=lambda t: (-t.dtype.itemsize, t.key))
    order += sorted((t for t in planned if t.variable), key=lambda t: t.key)
    entries, position = [], 0
    for t in order:
        size = values[t.key].numel() * t.dtype.itemsize
        entries.append((t.key, t.dtype, tuple(values[t.key].shape), position, position + size))
        position += size
    assert raw[8 : 8 + length] == _reference(entries, metadata).ljust(length, b" ")
    largest = layout.file_size(sum(t.nbytes for t in planned if t.variable))
    assert len(raw) == 8 + length + position <= largest
    if not any(t.variable for t in planned):
        assert len(raw) == largest
    loaded = load_file(path)
    assert loaded.keys() == values.keys()
    for key, value in values.items():
        assert torch.equal(loaded[key], value)
