"""The checkpoint reader: safetensors headers (validated, never reading data), single-tensor reads, and sources.

Checkpoints are made in tmp_path with safetensors' own writer, or byte by byte to corrupt them.
"""

from __future__ import annotations

import fnmatch
import gc
import hashlib
import json
import math
import os
import random
import struct
import subprocess
import sys
import threading
import tracemalloc
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bnbcli.checkpoint import hub
from bnbcli.checkpoint.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile, TensorInfo
from bnbcli.checkpoint.source import open_checkpoint
from bnbcli.checkpoint.tensor_reads import read_tensor
from bnbcli.errors import InputError, UsageError
from bnbcli.formats.dtypes import BFLOAT16, BY_CODE, FLOAT32

from helpers.bnb_process import HANG_SECONDS
from helpers.hub_cache import make_hub_cache

# ---------------------------------------------------------------------------------------------- helpers


def tiny(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}a.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        f"{prefix}b.weight": torch.randn(3, 5, generator=g),
        f"{prefix}c.bias": torch.randn(7, generator=g).to(torch.float16),
    }


def raw_file(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """A safetensors file written by hand: 8-byte length, header bytes, data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: Any = None) -> Path:
    """Shards plus a model.safetensors.index.json (by default the true weight map)."""
    folder.mkdir(parents=True, exist_ok=True)
    true_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
        true_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": true_map if weight_map is None else weight_map}
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    return path


def assert_input_error(excinfo: pytest.ExceptionInfo[InputError], *needles: str) -> None:
    err = excinfo.value
    assert type(err) is InputError
    assert "\n" not in err.message
    assert err.hint
    for needle in needles:
        assert needle in err.message, (needle, err.message)


# ---------------------------------------------------------------------------------------------- valid inputs


def test_single_file(tmp_path: Path) -> None:
    tensors = tiny()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ckpt = open_checkpoint(str(path))
    assert (ckpt.kind, ckpt.root, ckpt.pipeline_files, ckpt.repo_id) == ("file", tmp_path, (), None)
    source = ckpt.components[""]
    assert source.weight_files == (path,) and source.config is None and source.other_files == ()
    assert set(source.tensors) == set(tensors)
    info = source.tensors["a.weight"]
    assert (info.dtype, info.shape, info.nbytes, info.numel, info.path) == (BFLOAT16, (4, 8), 64, 32, path)
    for name, t in tensors.items():
        assert torch.equal(read_tensor(source.tensors[name]), t)
    assert SafetensorsFile.open(path).metadata == {"format": "pt"}


def test_read_tensor_every_dtype_scalars_and_empty(tmp_path: Path) -> None:
    tensors = {
        f"t_{name}": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4).to(dtype)
        for name, dtype in ((n, d.torch_dtype) for n, d in BY_CODE.items())
    }
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 3, dtype=torch.float32)
    tensors["flag"] = torch.tensor([True, False, True])
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    sf = SafetensorsFile.open(path)
    for name, t in tensors.items():
        got = read_tensor(sf.tensors[name])
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_large_tensors_are_read_in_parts_by_several_threads(tmp_path: Path, monkeypatch) -> None:
    from bnbcli.checkpoint import tensor_reads

    monkeypatch.setattr(tensor_reads, "READ_PART_BYTES", 1000)  # parts that split elements
    tensors = {"a": torch.randn(37, 101), "b": torch.arange(3, dtype=torch.int16)}
    save_file(tensors, tmp_path / "m.safetensors")
    sf = SafetensorsFile.open(tmp_path / "m.safetensors")
    for name, t in tensors.items():
        assert torch.equal(read_tensor(sf.tensors[name]), t)
    # A file cut short after its header was read: every part waits, then one clear error.
    with open(tmp_path / "m.safetensors", "r+b") as f:
        f.truncate(sf.tensors["a"].start + 5000)
    with pytest.raises(InputError, match=r"file ended \d+ bytes early"):
        read_tensor(sf.tensors["a"])


def test_read_tensor_owns_its_memory(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.ones(16)}, path)
    info = SafetensorsFile.open(path).tensors["x"]
    t = read_tensor(info)
    with open(path, "r+b") as f:  # overwrite the data in the file: the tensor must not change
        f.seek(info.start)
        f.write(bytes(info.nbytes))
    assert torch.equal(t, torch.ones(16))


def test_model_folder_with_other_files(tmp_path: Path) -> None:
    save_file(tiny(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for name in ["tokenizer.json", "generation_config.json", "README.md", "original/params.json"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}")
    # Not copied: hidden files, pickle weights, other formats' weights, other safetensors, their indexes.
    for name in [".gitattributes", ".cache/x.json", "pytorch_model.bin", "tf_model.h5", "original/consolidated.00.pth"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    save_file(tiny(), tmp_path / "consolidated.safetensors")
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")

    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.kind == "model" and list(ckpt.components) == [""]
    source = ckpt.components[""]
    assert source.config == {"model_type": "llama"} and source.index is None and source.name == ""
    assert source.weight_files == (tmp_path / "model.safetensors",)
    rel = sorted(str(p.relative_to(tmp_path)) for p in source.other_files)
    assert rel == ["README.md", "generation_config.json", "original/params.json", "tokenizer.json"]


def test_sharded_folder_with_index(tmp_path: Path) -> None:
    shards = {"model-00002-of-00002.safetensors": tiny(1, "l1."), "model-00001-of-00002.safetensors": tiny(0, "l0.")}
    index_path = write_sharded(tmp_path, shards)
    ckpt = open_checkpoint(str(tmp_path))
    source = ckpt.components[""]
    assert source.weight_files == tuple(tmp_path / s for s in shards)  # index order
    assert source.index == json.loads(index_path.read_text())
    assert set(source.tensors) == {name for tensors in shards.values() for name in tensors}
    assert source.tensors["l1.a.weight"].path == tmp_path / "model-00002-of-00002.safetensors"
    assert torch.equal(
        read_tensor(source.tensors["l1.b.weight"]), shards["model-00002-of-00002.safetensors"]["l1.b.weight"]
    )
    # The index file itself stands for the same model.
    assert open_checkpoint(str(index_path)).components[""].tensors.keys() == source.tensors.keys()


def test_diffusers_like_layouts(tmp_path: Path) -> None:
    save_file(tiny(), tmp_path / "diffusion_pytorch_model.safetensors")
    assert open_checkpoint(str(tmp_path)).kind == "model"
    only = tmp_path / "only"
    only.mkdir()
    save_file(tiny(), only / "diffusion_pytorch_model.fp16.safetensors")  # the only file: taken
    assert open_checkpoint(str(only)).components[""].weight_files == (
        only / "diffusion_pytorch_model.fp16.safetensors",
    )


def make_pipeline(root: Path) -> None:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "P", "unet": ["diffusers", "U"]}))
    (root / "README.md").write_text("card")
    (root / "v1-5-pruned.ckpt").write_bytes(b"pickle")  # a root-level duplicate: never copied
    unet = root / "unet"
    write_sharded(unet, {"u-1.safetensors": tiny(0, "down."), "u-2.safetensors": tiny(1, "up.")})
    (unet / "model.safetensors.index.json").rename(unet / "diffusion_pytorch_model.safetensors.index.json")
    (unet / "config.json").write_text('{"_class_name": "U"}')
    save_file(tiny(2), unet / "diffusion_pytorch_model.fp16.safetensors")  # a variant: not the one loaded
    te = root / "text_encoder"
    te.mkdir()
    save_file(tiny(3), te / "model.safetensors")
    (te / "config.json").write_text('{"model_type": "clip"}')
    for name in ["scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("{}")


def test_diffusers_pipeline(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    make_pipeline(root)
    ckpt = open_checkpoint(str(root))
    assert ckpt.kind == "diffusers" and ckpt.root == root
    assert list(ckpt.components) == ["text_encoder", "unet"]  # default: every component with weights
    unet = ckpt.components["unet"]
    assert unet.name == "unet" and unet.root == root / "unet" and unet.config == {"_class_name": "U"}
    assert unet.weight_files == (root / "unet/u-1.safetensors", root / "unet/u-2.safetensors")
    assert "up.a.weight" in unet.tensors and unet.other_files == ()
    rel = sorted(str(p.relative_to(root)) for p in ckpt.pipeline_files)
    assert rel == [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]

    only_te = open_checkpoint(str(root), components=["text_encoder"])
    assert list(only_te.components) == ["text_encoder"]
    rel = {str(p.relative_to(root)) for p in only_te.pipeline_files}
    # The unselected unet is copied as diffusers loads it: config, index and its shards, not the variant.
    assert {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/u-1.safetensors",
        "unet/u-2.safetensors",
    } <= rel
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in rel

    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(root), components=["transformer"])
    assert_input_error(excinfo, "'transformer'")
    assert "text_encoder, unet" in (excinfo.value.hint or "")


def test_diffusers_pickle_only_component(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    make_pipeline(root)
    (root / "safety_checker").mkdir()
    (root / "safety_checker/pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(root))  # by default it would silently drop out of the output
    assert_input_error(excinfo, "pickle", "safety_checker")
    with pytest.raises(InputError):
        open_checkpoint(str(root), components=["safety_checker"])
    # Left out on request, it is copied as bytes (never unpickled).
    ckpt = open_checkpoint(str(root), components=["unet"])
    assert root / "safety_checker/pytorch_model.bin" in ckpt.pipeline_files


def test_diffusers_ambiguous_component(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    make_pipeline(root)
    (root / "controlnet").mkdir()
    save_file(tiny(), root / "controlnet/a.safetensors")
    save_file(tiny(), root / "controlnet/b.safetensors")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(root))
    assert_input_error(excinfo, "controlnet", "no index")
    ckpt = open_checkpoint(str(root), components=["unet"])  # left out: copied whole
    assert {root / "controlnet/a.safetensors", root / "controlnet/b.safetensors"} <= set(ckpt.pipeline_files)


# ---------------------------------------------------------------------------------------------- the Hub cache


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_repo_from_offline_cache(tmp_path: Path, offline_cache: Path) -> None:
    src = tmp_path / "src"
    write_sharded(src, {"model-1.safetensors": tiny(0, "x."), "model-2.safetensors": tiny(1, "y.")})
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    files.update({"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"})
    snapshot = make_hub_cache(offline_cache, "org/name", files)

    ckpt = open_checkpoint("org/name")
    assert (ckpt.kind, ckpt.repo_id, ckpt.revision, ckpt.root) == ("model", "org/name", "a" * 40, snapshot)
    source = ckpt.components[""]
    assert source.config == {"model_type": "llama"} and source.other_files == (snapshot / "tokenizer.json",)
    assert torch.equal(read_tensor(source.tensors["y.b.weight"]), tiny(1, "y.")["y.b.weight"])
    assert open_checkpoint("org/name", revision="a" * 40).revision == "a" * 40

    with pytest.raises(InputError) as excinfo:
        open_checkpoint("org/other")
    assert_input_error(excinfo, "org/other", "HF_HUB_OFFLINE")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint("org/name", revision="v2")
    assert_input_error(excinfo, "org/name@v2", "cache")


def test_hub_env_variables_in_a_fresh_process(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them (read by huggingface_hub at import)."""
    save_file(tiny(), tmp_path / "model.safetensors")
    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/name", {"model.safetensors": (tmp_path / "model.safetensors").read_bytes()}, "b" * 40)
    code = "from bnbcli.checkpoint.source import open_checkpoint as o; c = o('org/name'); print(c.revision, c.kind)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["b" * 40, "model"]


def test_hub_download_patterns(tmp_path: Path) -> None:
    """The second pass fetches only the shards an index names, per component for a pipeline."""
    plain = tmp_path / "plain"
    write_sharded(plain, {"m-1.safetensors": tiny(0, "a."), "m-[2].safetensors": tiny(1, "b.")})
    assert hub.weight_patterns(plain) == ["m-1.safetensors", "m-[[]2].safetensors"]  # fnmatch-escaped
    single = tmp_path / "single"
    single.mkdir()
    assert hub.weight_patterns(single) == ["*.safetensors"]
    root = tmp_path / "pipe"
    make_pipeline(root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "P", "unet": ["d", "U"], "vae": ["d", "V"]}))
    assert hub.weight_patterns(root) == ["unet/u-1.safetensors", "unet/u-2.safetensors", "vae/*.safetensors"]
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in hub.METADATA_PATTERNS)
    assert not any(fnmatch.fnmatch("modeling_custom.py", p) for p in hub.METADATA_PATTERNS)


def hf_error(cls: type[Exception], message: str = "boom") -> Exception:
    """An instance of a huggingface_hub error without an HTTP response (its __init__ wants one)."""
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


def test_hub_errors_become_input_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cases = [
        (hf_error(GatedRepoError), "gated", "accept its terms"),
        (hf_error(RepositoryNotFoundError), "not found", "HF_TOKEN"),
        (hf_error(RevisionNotFoundError), "revision 'v9' not found", "branch, tag or commit"),
        (LocalEntryNotFoundError("no"), "Hugging Face cache", "hf download org/name"),
        (hf_error(HfHubHTTPError, "500 Server Error\nmore"), "Hub request failed: 500 Server Error", "network"),
        (ConnectionError("refused"), "the Hub cannot be reached", "HF_HUB_OFFLINE=1"),
        (OSError("something else"), "cannot fetch", "network"),
    ]
    for error, words, hint in cases:

        def fail(*args: Any, error: Exception = error, **kwargs: Any) -> str:
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(InputError) as excinfo:
            open_checkpoint("org/name", revision="v9")
        assert_input_error(excinfo, "org/name@v9", words)
        assert hint in (excinfo.value.hint or "")


def test_sources_that_are_not_there(tmp_path: Path, offline_cache: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path / "nope"))
    assert_input_error(excinfo, "no such file or folder")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint("org/model.safetensors")  # a missing file, not a repo id
    assert_input_error(excinfo, "no such file or folder")
    save_file(tiny(), tmp_path / "model.safetensors")
    with pytest.raises(UsageError):
        open_checkpoint(str(tmp_path), revision="main")
    with pytest.raises(UsageError):
        open_checkpoint(str(tmp_path), components=["unet"])


# ---------------------------------------------------------------------------------------------- bad headers

F32 = "F32"
BAD_HEADERS: list[tuple[str, Any, bytes, dict[str, Any], str]] = [
    # id, header, data, raw_file kwargs, expected words in the message
    ("short", None, b"", {}, "too short"),
    ("len-past-end", {"x": entry(F32, [1], 0, 4)}, bytes(4), {"header_len": 10_000}, "past the end"),
    ("not-utf8", b'{"x\xff": 1}', b"", {}, "UTF-8"),
    ("not-json", b"{nope", b"", {}, "not valid JSON"),
    ("not-object", b"[1, 2]", b"", {}, "not an object"),
    ("duplicate-key", b'{"x": {}, "x": {}}', b"", {}, "duplicate key"),
    ("metadata-not-str", {"__metadata__": {"a": 1}}, b"", {}, "__metadata__"),
    ("metadata-not-dict", {"__metadata__": ["a"]}, b"", {}, "__metadata__"),
    ("entry-not-object", {"x": [1]}, b"", {}, "'x'"),
    ("unknown-dtype", {"x": entry("F4X", [1], 0, 4)}, bytes(4), {}, "unknown dtype 'F4X'"),
    ("missing-dtype", {"x": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), {}, "unknown dtype None"),
    ("shape-negative", {"x": entry(F32, [-1], 0, 4)}, bytes(4), {}, "non-negative"),
    ("shape-float", {"x": entry(F32, [1.0], 0, 4)}, bytes(4), {}, "non-negative"),
    ("shape-bool", {"x": entry(F32, [True], 0, 4)}, bytes(4), {}, "non-negative"),
    ("shape-not-list", {"x": entry(F32, 4, 0, 4)}, bytes(4), {}, "non-negative"),
    ("shape-overflow", {"x": entry(F32, [2**40, 2**40], 0, 4)}, bytes(4), {}, "2^48"),
    ("shape-one-huge-dim", {"x": entry(F32, [0, 2**70], 0, 0)}, b"", {}, "2^48"),
    ("offsets-not-pair", {"x": {"dtype": F32, "shape": [1], "data_offsets": [0]}}, bytes(4), {}, "pair"),
    ("offsets-not-int", {"x": entry(F32, [1], 0, "4")}, bytes(4), {}, "pair"),
    ("offsets-reversed", {"x": entry(F32, [0], 4, 0)}, bytes(4), {}, "0 <= begin <= end"),
    ("offsets-negative", {"x": entry(F32, [1], -4, 0)}, bytes(4), {}, "0 <= begin <= end"),
    ("size-mismatch", {"x": entry(F32, [2], 0, 4)}, bytes(4), {}, "needs 8"),
    ("past-data", {"x": entry(F32, [2], 0, 8)}, bytes(4), {}, "past the 4-byte data section"),
    ("overlap", {"x": entry(F32, [1], 0, 4), "y": entry(F32, [1], 2, 6)}, bytes(6), {}, "'y' overlaps tensor 'x'"),
    ("hole", {"x": entry(F32, [1], 0, 4), "y": entry(F32, [1], 8, 12)}, bytes(12), {}, "'y' is not contiguous"),
    ("hole-at-start", {"x": entry(F32, [1], 4, 8)}, bytes(8), {}, "not contiguous"),
    ("trailing-bytes", {"x": entry(F32, [1], 0, 4)}, bytes(8), {}, "4 bytes after the last tensor"),
]


@pytest.mark.parametrize(
    ("header", "data", "kwargs", "words"), [b[1:] for b in BAD_HEADERS], ids=[b[0] for b in BAD_HEADERS]
)
def test_bad_header(tmp_path: Path, header: Any, data: bytes, kwargs: dict[str, Any], words: str) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x00\x00")
    else:
        raw_file(path, header, data, **kwargs)
    with pytest.raises(InputError) as excinfo:
        SafetensorsFile.open(path)
    assert_input_error(excinfo, str(path), words)
    with pytest.raises(InputError):  # the same through open_checkpoint, for a file and for its folder
        open_checkpoint(str(path))
    with pytest.raises(InputError):
        open_checkpoint(str(tmp_path))


def test_absurd_header_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "big.safetensors", b"{}", header_len=MAX_HEADER_BYTES + 1)
    os.truncate(path, MAX_HEADER_BYTES + 64)  # sparse: the length fits in the file, but is over the cap
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as excinfo:
            SafetensorsFile.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_input_error(excinfo, "100000000-byte limit")
    assert peak < 1_000_000


def test_truncated_shard(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tiny(), path)
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path))
    assert_input_error(excinfo, "truncated")


def test_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(InputError) as excinfo:
        SafetensorsFile.open(tmp_path / "dir.safetensors")
    assert_input_error(excinfo, "not a regular file")


# ---------------------------------------------------------------------------------------------- bad folders


def test_bad_index(tmp_path: Path) -> None:
    a, b = tiny(0, "a."), tiny(1, "b.")

    def check(
        name: str,
        weight_map: Any,
        *words: str,
        shards: dict[str, dict[str, torch.Tensor]] | None = None,
        raw: str | None = None,
    ) -> None:
        folder = tmp_path / name
        index = write_sharded(folder, shards or {"s1.safetensors": a, "s2.safetensors": b}, weight_map)
        if raw is not None:
            index.write_text(raw)
        with pytest.raises(InputError) as excinfo:
            open_checkpoint(str(folder))
        assert_input_error(excinfo, *words)

    good = {**dict.fromkeys(a, "s1.safetensors"), **dict.fromkeys(b, "s2.safetensors")}
    check("invalid-json", None, "not valid JSON", raw="{oops")
    check("no-weight-map", None, "no weight_map", raw='{"metadata": {}}')
    check("weight-map-list", None, "no weight_map", raw='{"weight_map": []}')
    check("empty-weight-map", {}, "lists no tensors")
    check("shard-not-str", {**good, "a.a.weight": 3}, "'a.a.weight'", "not a shard file name")
    check("missing-shard", {**good, "b.a.weight": "s3.safetensors"}, "s3.safetensors does not exist")
    check("dotdot", {**good, "b.a.weight": "../s2.safetensors"}, "escapes the model folder")
    check("absolute", {**good, "b.a.weight": str(tmp_path / "x.safetensors")}, "escapes the model folder")
    check("listed-but-missing", {**good, "a.ghost": "s1.safetensors"}, "'a.ghost'", "missing from it")
    check("not-in-index", {k: v for k, v in good.items() if k != "b.c.bias"}, "'b.c.bias'", "not in the index")
    check("other-shard", {**good, "b.c.bias": "s1.safetensors"}, "'b.c.bias'", "says it is in s1.safetensors")
    # Same tensor in both shards, and the index (a dict) can only name one of them.
    check(
        "in-two-shards",
        good,
        "is in two shards, s1.safetensors and s2.safetensors",
        shards={"s1.safetensors": a, "s2.safetensors": {**b, **a}},
    )
    # Renamed in the shard: the index's name is missing, the shard's name is unknown to the index.
    renamed = {"b.renamed" if k == "b.a.weight" else k: v for k, v in b.items()}
    check("renamed", good, "'b.renamed'", "not in the index", shards={"s1.safetensors": a, "s2.safetensors": renamed})


def test_shard_link_outside_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file(tiny(1, "b."), outside / "s2.safetensors")
    folder = tmp_path / "model"
    write_sharded(
        folder,
        {"s1.safetensors": tiny(0, "a.")},
        {**dict.fromkeys(tiny(0, "a."), "s1.safetensors"), **dict.fromkeys(tiny(1, "b."), "s2.safetensors")},
    )
    (folder / "s2.safetensors").symlink_to(outside / "s2.safetensors")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(folder))
    assert_input_error(excinfo, "s2.safetensors", "outside the model folder")


@pytest.mark.parametrize(
    "names",
    [
        ["pytorch_model.bin"],
        ["pytorch_model.bin.index.json", "pytorch_model-1.bin"],
        ["model.pt"],
        ["weights.pth"],
        ["sd.ckpt"],
    ],
)
def test_pickle_folders_are_refused(tmp_path: Path, names: list[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    for name in names:
        (tmp_path / name).write_bytes(b"\x80\x04 pickle: must never be loaded")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path))
    assert_input_error(excinfo, "pickle checkpoints are not read (they can run code)")
    assert "safe_serialization=True" in (excinfo.value.hint or "")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path / names[-1]))
    assert_input_error(excinfo, "pickle")


def test_no_weights_and_ambiguous_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path))
    assert_input_error(excinfo, "no safetensors weights")
    save_file(tiny(), tmp_path / "model-00001-of-00002.safetensors")
    save_file(tiny(), tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path))
    assert_input_error(excinfo, "2 .safetensors files and no index")
    empty_pipe = tmp_path / "pipe"
    empty_pipe.mkdir()
    (empty_pipe / "model_index.json").write_text("{}")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(empty_pipe))
    assert_input_error(excinfo, "no component")


@pytest.mark.parametrize("name", ["config.json", "model_index.json"])
def test_invalid_config_json(tmp_path: Path, name: str) -> None:
    save_file(tiny(), tmp_path / "model.safetensors")
    (tmp_path / name).write_text("{not json")
    with pytest.raises(InputError) as excinfo:
        open_checkpoint(str(tmp_path))
    assert_input_error(excinfo, name, "not valid JSON")


# ---------------------------------------------------------------------------------------------- scale


def llama70b_header() -> tuple[dict[str, Any], int]:
    """The header of a Llama-3-70B-shaped bf16 checkpoint (one shard), and its data length."""
    hidden, inter, kv, vocab = 8192, 28672, 1024, 128256
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(80):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [hidden, hidden],
            p + "self_attn.k_proj.weight": [kv, hidden],
            p + "self_attn.v_proj.weight": [kv, hidden],
            p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
        }
    shapes |= {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = entry("BF16", shape, offset, offset + nbytes)
        offset += nbytes
    return header, offset


def test_huge_sparse_checkpoint_opens_without_reading_data(tmp_path: Path) -> None:
    header, data_len = llama70b_header()
    path = raw_file(tmp_path / "model.safetensors", header)
    os.truncate(path, path.stat().st_size + data_len)  # ~141 GB, sparse: no block is written
    assert data_len > 140e9

    tracemalloc.start()
    try:
        ckpt = open_checkpoint(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tensors = ckpt.components[""].tensors
    assert len(tensors) == 80 * 9 + 3
    assert sum(t.numel for t in tensors.values()) > 70e9
    assert peak < 20_000_000, peak  # the header and its records, nothing sized by the data
    norm = read_tensor(tensors["model.norm.weight"])  # one small tensor from the middle of 141 GB
    assert norm.shape == (8192,) and not norm.any()


def test_tensorinfo_is_frozen(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    info = SafetensorsFile.open(tmp_path / "x.safetensors").tensors["x"]
    assert isinstance(info, TensorInfo)
    with pytest.raises(AttributeError):
        info.start = 0  # type: ignore[misc]


def test_source_hashes_started_at_start_up_are_taken_once_and_only_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bnb quantize` starts hashing SRC's shards before it imports torch; the pipeline's FileHashes
    takes those digests instead of reading the files again, unless a file changed since."""
    from bnbcli.checkpoint import hashing

    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    kept, changed = src / "model.safetensors", src / "unet" / "diffusion.safetensors"
    kept.write_bytes(b"a" * 100_000)
    changed.write_bytes(b"b" * 50_000)
    hashing.hash_sources_early(str(src))
    for _, future in list(hashing._early.values()):
        future.result(timeout=HANG_SECONDS)
    changed.write_bytes(b"c" * 50_001)  # other bytes and size after the early digest

    read_again = []
    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda p: read_again.append(Path(p).name) or real(p))
    digests = hashing.FileHashes([kept, changed]).result()
    assert digests == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (kept, changed)}
    assert read_again == ["diffusion.safetensors"]  # the unchanged file's early digest was used
    assert hashing.FileHashes([kept]).result() == {str(kept): hashlib.sha256(kept.read_bytes()).hexdigest()}
    assert read_again == ["diffusion.safetensors", "model.safetensors"]  # taken once: a second run reads


def _early_digests(hashing: Any, src: Path, tmp_path: Path) -> dict[str, Any]:
    hashing.hash_sources_early(str(src))
    outcomes: dict[str, Any] = {}
    for path in sorted(src.glob("*.safetensors")):
        _, future = hashing._early.pop(os.path.realpath(path))
        try:
            outcomes[path.name] = future.result(timeout=HANG_SECONDS)
        except Exception as exc:
            outcomes[path.name] = exc
    return outcomes


def test_early_source_hashes_come_from_a_child_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing in this process competed with torch's import for the GIL: the early digests are made by
    sha256_worker in a process of its own, and an unreadable entry is reported as the pipeline would."""
    from bnbcli.checkpoint import hashing

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"model-{i}.safetensors").write_bytes(bytes([i]) * (100_000 + i))
    (src / "odd\tname\n.safetensors").write_bytes(b"z" * 10)  # not a line or column of the protocol
    (src / "dir.safetensors").mkdir()  # unreadable as a file
    monkeypatch.setattr(hashing, "sha256_of", lambda p: pytest.fail("hashed in this process"))
    monkeypatch.setattr(hashing, "file_sha256", lambda p: (_ for _ in ()).throw(InputError(f"{p}: cannot read", "x")))
    outcomes = _early_digests(hashing, src, tmp_path)
    for path in src.glob("*.safetensors"):
        if path.is_file():
            assert outcomes[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(outcomes["dir.safetensors"], InputError)


def test_early_source_hashes_without_a_child_are_made_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnbcli.checkpoint import hashing

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"model-{i}.safetensors").write_bytes(bytes([i]) * 70_000)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    assert _early_digests(hashing, src, tmp_path) == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")
    }


def test_early_source_hashes_survive_a_child_that_talks_nonsense_and_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from bnbcli.checkpoint import hashing

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"model-{i}.safetensors").write_bytes(bytes([i + 1]) * 50_000)
    liar = tmp_path / "liar.py"
    liar.write_text("print('x\\tnonsense')\nprint('7\\t' + 'a' * 64)\nprint('0\\tshort')\nraise SystemExit(3)\n")
    monkeypatch.setattr(hashing, "sha256_worker", SimpleNamespace(__file__=str(liar)))
    assert _early_digests(hashing, src, tmp_path) == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")
    }


def test_early_source_hashes_are_kept_for_the_latest_call_only(tmp_path: Path) -> None:
    """A run that fails before it takes its early hashes leaves them behind: a process that runs `bnb
    quantize` again and again on other folders (the fuzzer) kept every one, for good."""
    from bnbcli.checkpoint import hashing

    started: list[Future[str]] = []
    for run in range(5):
        src = tmp_path / f"src-{run}"
        src.mkdir()
        for i in range(2):
            (src / f"model-{i}.safetensors").write_bytes(bytes([run, i]) * 1000)
        hashing.hash_sources_early(str(src))
        started += [future for _, future in hashing._early.values()]
    assert sorted(hashing._early) == sorted(os.path.realpath(p) for p in src.glob("*.safetensors"))
    # the dropped ones are still settled (their collector does not know they were dropped)
    assert len(started) == 10 and all(len(f.result(timeout=HANG_SECONDS)) == 64 for f in started)
    hashing._early.clear()


def test_a_hash_that_failed_is_freed_with_its_future_not_by_the_garbage_collector(tmp_path: Path) -> None:
    """The error's traceback holds the frame that stored it in the future: with that frame still holding
    the future, the error, its frames and a 16 MiB read buffer lived until the next full collection
    (hundreds of fuzz cases: 256 MiB after 150)."""
    from bnbcli.checkpoint import hashing

    gc.collect()
    gc.disable()
    try:
        future: Future[str] = Future()
        hashing._settle(future, str(tmp_path / "gone.safetensors"))
        assert isinstance(future.exception(timeout=0), InputError)
        settled = weakref.ref(future)
        del future
        assert settled() is None, "a reference cycle keeps the failed hash alive"
    finally:
        gc.enable()


@pytest.mark.parametrize("size", [0, 1, 64 << 10, (64 << 10) + 1, 3 << 20])
def test_hashing_a_file_allocates_no_more_than_the_file_needs(tmp_path: Path, size: int) -> None:
    """A 16 MiB read buffer for every file, however small, left the fuzzer's process with 16 MiB holes
    in malloc's arenas (its memory grew by ~130 MB a thousand cases); one that cannot be opened gets none."""
    from bnbcli.checkpoint.sha256_worker import CHUNK, sha256_of

    path = tmp_path / "file"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    tracemalloc.start()
    try:
        digest = sha256_of(path)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with pytest.raises(FileNotFoundError):
            sha256_of(tmp_path / "missing")
        used_missing = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert used < max(size, 64 << 10) + (256 << 10) < CHUNK, used
    assert used_missing < 256 << 10, used_missing


def test_early_hashing_only_for_runs_that_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from bnbcli.checkpoint import hashing
    from bnbcli.cli.app import app

    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.zeros(4, 4)}, src / "model.safetensors")
    started: list[str] = []
    monkeypatch.setattr(hashing, "hash_sources_early", started.append)
    for args in (["quantize", str(src), str(tmp_path / "o"), "--dry-run"], ["footprint", str(src)]):
        assert CliRunner().invoke(app, args).exit_code == 0, args
    assert started == []
    assert CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "o"), "-q"]).exit_code == 0
    assert started == [str(src)]


def test_small_writes_are_gathered_into_few_writeback_requests(tmp_path: Path, monkeypatch) -> None:
    """A request per tiny tensor cost more than writing it: small writes are asked for together, as one
    span once they add up to WRITEBACK_SPAN, and that span covers them."""
    from bnbcli.checkpoint import writer

    if writer._sync_file_range() is None:
        pytest.skip("no sync_file_range on this platform: nothing is requested")
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(writer, "start_writeback", lambda fd, offset, length: made.append((offset, length)))
    count, numel = 1000, 1024  # 4 KiB each: 4 MB in all
    planned = [writer.PlannedTensor(f"t{i:04d}", FLOAT32, (numel,)) for i in range(count)]
    shard = writer.ShardWriter(tmp_path / "out.safetensors", planned, {"format": "pt"})
    for i in range(count):
        shard.write(f"t{i:04d}", torch.full((numel,), float(i)))
    shard.close()
    assert 1 <= len(made) <= count * numel * 4 // writer.WRITEBACK_SPAN
    first = [shard.data_start + shard.offsets[f"t{i:04d}"][0] for i in range(256)]  # the first span's tensors
    assert made[0][0] <= min(first) and max(first) + numel * 4 <= made[0][0] + made[0][1]


def test_early_writeback_never_holds_the_writer_and_ends_before_the_file_closes(tmp_path: Path, monkeypatch) -> None:
    """sync_file_range can block on a busy disk: the writer hands the requests to a thread of its own,
    and the file's fsync and close come only after the last request was made."""
    from bnbcli.checkpoint import writer

    if writer._sync_file_range() is None:
        pytest.skip("no sync_file_range on this platform: nothing is requested")
    made: list[tuple[int, int, int]] = []
    closed: list[int] = []
    disk_free = threading.Event()

    def slow_writeback(fd: int, offset: int, length: int) -> None:
        disk_free.wait(timeout=HANG_SECONDS)  # a disk whose queue stays full until the test frees it
        made.append((fd, offset, length))

    real_fsync = os.fsync
    monkeypatch.setattr(writer, "start_writeback", slow_writeback)
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (closed.append(len(made)), real_fsync(fd)))
    numel = writer.WRITEBACK_SPAN // 4  # a request each: smaller writes are gathered (next test)
    planned = [writer.PlannedTensor(f"t{i}", FLOAT32, (numel,)) for i in range(5)]
    shard = writer.ShardWriter(tmp_path / "out.safetensors", planned, {"format": "pt"})
    for i in range(5):
        shard.write(f"t{i}", torch.full((numel,), float(i)))
    assert made == []  # all five tensors were written while every writeback request was still blocked
    disk_free.set()
    shard.close()
    assert closed == [5]  # every request was made before the fsync
    assert sorted(offset for _, offset, _ in made) == sorted(shard.data_start + b for b, _ in shard.offsets.values())
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "out.safetensors")
    assert [loaded[f"t{i}"][0].item() for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_indented_json_is_byte_for_byte_what_json_dumps_writes() -> None:
    """The manifest's fast writer against json.dumps(indent=2) on random documents: every JSON type,
    escapes, non-ASCII, inf/NaN, empty containers, tuples, and, at any depth, keys other than str and
    subclasses of int (which json.dumps spells), whole or in pieces."""
    from bnbcli.json_text import write_indented

    def dumps_indented(document: object) -> str:
        pieces: list[str] = []
        write_indented(document, pieces.append)
        return "".join(pieces)

    rng = random.Random(17)
    leaves = [
        None,
        True,
        False,
        0,
        -7,
        2**70,
        0.1,
        -0.0,
        1e-310,
        math.inf,
        -math.inf,
        math.nan,
        "",
        'a"\\\n\t',
        "é☃\U0001f600",
    ]

    def value(depth: int) -> object:
        kind = rng.randrange(4) if depth < 4 else 3
        if kind == 0:
            return {
                rng.choice(["k", "ü", 'q"', "x" * rng.randrange(3)]) + str(i): value(depth + 1)
                for i in range(rng.randrange(4))
            }
        if kind == 1:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if kind == 2:
            return tuple(value(depth + 1) for _ in range(rng.randrange(3)))
        return rng.choice(leaves)

    for _ in range(300):
        document = value(0)
        assert dumps_indented(document) == json.dumps(document, indent=2)

    class Count(int):
        pass

    odd = {"a": {1: "int key", None: [{2.5: {"x": []}}]}, "b": [1, [Count(3), {"deep": {True: "k"}}]], "c": Count(4)}
    assert dumps_indented(odd) == json.dumps(odd, indent=2)


def test_a_large_document_is_written_in_pieces() -> None:
    from bnbcli.json_text import write_indented

    document = {"tensors": [{"name": f"t{i}", "sha256": "ab" * 32} for i in range(5000)]}
    pieces: list[str] = []
    write_indented(document, pieces.append)
    assert len(pieces) > 5 and max(map(len, pieces)) < len("".join(pieces)) / 4
    assert "".join(pieces) == json.dumps(document, indent=2)


def test_batches_keep_the_order_and_send_a_large_tensor_alone() -> None:
    """Tiny tensors travel between the stages together; one of BATCH_BYTES or more always alone."""
    from types import SimpleNamespace

    from bnbcli.pipeline import executor

    sizes = (
        [10] * 1300 + [executor.BATCH_BYTES] + [5] * 3 + [executor.BATCH_BYTES * 3] + [executor.BATCH_BYTES // 2] * 3
    )
    jobs = [SimpleNamespace(source=SimpleNamespace(nbytes=n), index=i) for i, n in enumerate(sizes)]
    groups = list(executor.batches(jobs))  # type: ignore[arg-type]
    assert [j.index for g in groups for j in g] == list(range(len(sizes)))
    assert all(len(g) <= executor.BATCH_TENSORS for g in groups)
    assert all(sum(j.source.nbytes for j in g) <= executor.BATCH_BYTES or len(g) == 1 for g in groups)
    assert [len(g) for g in groups][:3] == [512, 512, 276]
    assert [len(g) for g in groups if g[0].source.nbytes >= executor.BATCH_BYTES] == [1, 1]
