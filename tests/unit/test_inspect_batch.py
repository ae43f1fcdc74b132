"""`bnb inspect`'s batches (inspect/measure.py) against one tensor at a time: the statistics of
``tensor_stats_many``, the outlier screen of ``matrix_outliers_many``, the shared reads of
``read_tensors`` and a whole report, every figure equal to the one-by-one figure (repr: -0.0 and NaN
compare as they print)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bnbcli.checkpoint.safetensors_file import SafetensorsFile
from bnbcli.checkpoint.tensor_reads import read_tensor, read_tensors
from bnbcli.inspect import measure
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.outliers import NOTHING, matrix_outliers, matrix_outliers_many
from bnbcli.inspect.run import InspectRequest, inspect, open_source
from bnbcli.inspect.stats import tensor_stats, tensor_stats_many

SCALES = (1e-30, 1e-3, 1.0, 300.0, 1e30)


def _edge(x: torch.Tensor, kind: int, rng: np.random.Generator) -> torch.Tensor:
    """Values that take a tensor off the joined pass or test its arithmetic's corners."""
    flat = x.view(-1)
    if kind == 1:
        flat[int(rng.integers(flat.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif kind == 2:
        flat[:] = 0.0
    elif kind == 3:
        flat[:] = -0.0  # a mean that must print as the one-by-one mean
    elif kind == 4:
        flat[:] = 3.0  # std 0
    elif kind == 5:
        flat[0] = 1e4  # beyond 6σ
    elif kind == 6:
        flat[int(rng.integers(flat.numel()))] = 1e-40  # a float32 subnormal
    return x


def _tensors(seed: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    tensors = []
    for _ in range(count):
        shape = tuple(int(rng.choice([1, 2, 3, 7, 16, 33, 64, 129])) for _ in range(int(rng.integers(1, 3))))
        x = torch.randn(shape, generator=g) * float(rng.choice(SCALES)) + float(rng.choice([0.0, 5.0, -1e3]))
        x = _edge(x, int(rng.integers(0, 8)), rng)
        dtype = (torch.float16, torch.bfloat16, torch.float32, torch.int32)[int(rng.integers(4))]
        tensors.append(torch.nan_to_num(x).clamp(-1e6, 1e6).to(dtype) if dtype == torch.int32 else x.to(dtype))
    return [*tensors, torch.zeros(0), torch.randn(8, 16, generator=g).t(), torch.full((4, 4), -0.0)]


def test_joined_stats_equal_one_by_one() -> None:
    tensors = _tensors(0, 400)
    joined = tensor_stats_many(tensors)
    assert sum(s.nonfinite > 0 for s in joined) > 5, "some rows must take the one-by-one path"
    for t, got in zip(tensors, joined, strict=True):
        assert repr(got) == repr(tensor_stats(t)), (t.dtype, tuple(t.shape))


def _matrices(seed: int, count: int) -> list[torch.Tensor]:
    """Matrices, some with an outlier column, row or value, some transposed (a Conv1D weight's view)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    matrices = []
    for _ in range(count):
        rows, cols = (int(rng.choice([1, 2, 3, 7, 16, 33, 64, 129])) for _ in range(2))
        x = torch.randn(rows, cols, generator=g) * float(rng.choice([1e-3, 1.0, 300.0]))
        kind = int(rng.integers(0, 10))
        if kind == 7:
            x[:, int(rng.integers(cols))] *= 50
        elif kind == 8:
            x[int(rng.integers(rows))] *= 50
        else:
            x = _edge(x, kind, rng)
        x = x.to((torch.float16, torch.bfloat16, torch.float32)[int(rng.integers(3))])
        matrices.append(x.t() if rng.integers(2) else x)
    return matrices


@pytest.mark.parametrize("criteria", [OutlierCriteria(), OutlierCriteria(factor=1.5, value_sigma=2.0)])
def test_outlier_screen_equals_one_by_one(criteria: OutlierCriteria) -> None:
    matrices = _matrices(1, 500)
    joined = matrix_outliers_many(matrices, criteria)
    screened = sum(found is NOTHING for found in joined)
    assert 50 < screened < len(matrices) - 50, "both the screen and the one-by-one path must be taken"
    for w, got in zip(matrices, joined, strict=True):
        assert repr(got) == repr(matrix_outliers(w, criteria)), tuple(w.shape)


def _misaligned_file(path: Path) -> None:
    """A uint8 tensor of 3 bytes, then a bfloat16 tensor starting at an odd offset (safetensors itself
    never writes one; another writer may)."""
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [3, 11]},
        "c": {"dtype": "F32", "shape": [1], "data_offsets": [11, 15]},
    }
    text = json.dumps(header).encode()
    data = bytes([1, 2, 3]) + torch.arange(4, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    data += torch.tensor([2.5]).numpy().tobytes()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_read_tensors_equal_read_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(int(n), generator=g).to(torch.bfloat16) for i, n in enumerate([3, 1, 40000, 7])}
    tensors["big"] = torch.randn(300, 300, generator=g)  # past SMALL_READ_BYTES: read alone
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, tmp_path / "a.safetensors")
    _misaligned_file(tmp_path / "b.safetensors")
    infos = [i for f in ("a", "b") for i in SafetensorsFile.open(tmp_path / f"{f}.safetensors").tensors.values()]
    # every other tensor too: gaps between them, read across (the bytes between are not tensors returned)
    for chosen in (infos, infos[::2], infos[1::2]):
        for info, got in zip(chosen, read_tensors(chosen), strict=True):
            alone = read_tensor(info)
            assert got.dtype == alone.dtype and got.shape == alone.shape and torch.equal(got, alone), info.name


def test_tensors_with_small_gaps_between_are_read_together(tmp_path: Path, monkeypatch) -> None:
    """Tiny weights whose biases lie between them (copied by the early copy, not read): one read, not one
    each; a gap past SMALL_READ_BYTES starts a new read."""
    from bnbcli.checkpoint import tensor_reads

    tensors = {
        f"e{i:03d}.{kind}": torch.full((16,) * (2 if kind == "weight" else 1), float(i))
        for i in range(40)
        for kind in ("bias", "weight")
    }
    tensors["e999.zbig"] = torch.zeros(tensor_reads.SMALL_READ_BYTES // 4 + 1)  # a gap too wide
    tensors["f000.weight"] = torch.ones(4)
    save_file(tensors, tmp_path / "a.safetensors")
    infos = SafetensorsFile.open(tmp_path / "a.safetensors").tensors
    weights = [i for n, i in sorted(infos.items(), key=lambda item: item[1].start) if n.endswith("weight")]
    opened = []
    real_open = tensor_reads.open_tensor_file
    monkeypatch.setattr(tensor_reads, "open_tensor_file", lambda info: opened.append(info.start) or real_open(info))
    got = list(read_tensors(weights))
    assert len(opened) == 2
    for info, tensor in zip(weights, got, strict=True):
        assert torch.equal(tensor, read_tensor(info)), info.name


def _checkpoint(folder: Path) -> Path:
    """Small experts in numbered layers (two with an outlier input column that recurs), a norm gain,
    biases, a NaN weight, an int weight and a large weight among them."""
    folder.mkdir()
    g = torch.Generator().manual_seed(4)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(4):
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(16, generator=g)
        for expert in range(6):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}.up_proj"
            w = torch.randn(16, 16, generator=g)
            if expert == 1:
                w[:, 3] *= 40
            if layer == 2 and expert == 4:
                w[0, 0] = float("nan")
            tensors[f"{prefix}.weight"] = w.to(torch.bfloat16)
            tensors[f"{prefix}.bias"] = torch.zeros(16, dtype=torch.bfloat16)
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(16, 8 if layer else 300, generator=g)
    tensors["model.layers.1.mlp.experts.0.gate_proj.weight"] = torch.ones(8, 8, dtype=torch.int32)
    tensors["model.layers.3.mlp.big_proj.weight"] = torch.randn(300, 300, generator=g).to(torch.float16)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_batched_report_equals_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    request = InspectRequest(src=str(_checkpoint(tmp_path / "model")), schemes=("nf4", "int8"))
    batched = inspect(request, open_source(request)).as_dict()
    assert batched["outlier_dims"]["recurring"], "the recurring column must be found"

    def one_by_one_reads(infos):  # type: ignore[no-untyped-def]
        return (read_tensor(info) for info in infos)

    monkeypatch.setattr("bnbcli.inspect.run.read_tensors", one_by_one_reads)
    monkeypatch.setattr(measure, "tensor_stats_many", lambda ts: [tensor_stats(t) for t in ts])
    monkeypatch.setattr(measure, "matrix_outliers_many", lambda ws, c: [matrix_outliers(w, c) for w in ws])
    monkeypatch.setattr(measure, "JOIN_TENSORS", 1)  # every tensor measured (and round-tripped) alone
    alone = inspect(request, open_source(request)).as_dict()
    assert json.dumps(batched) == json.dumps(alone)
