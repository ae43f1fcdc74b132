"""The bad inputs of `bnb quantize`, one Case each: how to make it, the exit code, the words its error
and hint lines must hold. tests/cli/test_quantize_errors.py runs each and checks the error contract;
tests/cli/test_hints.py follows each hint."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helpers.bnb_process import EXIT_FAILED, EXIT_USAGE
from helpers.golden import golden_dir

LLAMA_SRC = golden_dir() / "models" / "llama" / "src"


# ------------------------------------------------------------------------------------------- checkpoints


def tiny_model(seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    """A few tensors with Llama-like names; without config.json the name-rules planner quantizes
    the projections and keeps the embedding and the norm."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(128, size, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(size, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2 * size, size, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(size, 2 * size, generator=g).to(torch.bfloat16),
    }


def write_model(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else tiny_model(), folder / "model.safetensors")
    return folder


def write_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    true_map: dict[str, str] = {}
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
        true_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": true_map if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, header, data section."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def copy_llama(folder: Path) -> Path:
    shutil.copytree(LLAMA_SRC, folder)
    for path in folder.iterdir():  # the golden files are read-only; the copies should be ordinary files
        path.chmod(0o644)
    folder.chmod(0o755)
    return folder


# ------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """``build(root)`` makes the inputs under ``root`` and returns the arguments after `bnb quantize`.
    The output folder is always ``root / "out"`` unless the arguments say otherwise."""

    build: Callable[[Path], list[str]]
    code: int
    words: tuple[str, ...] = ()  # in the error line
    hint_words: tuple[str, ...] = ()  # in the hint line
    out_exists: bool = False  # OUT exists before the run (and must be left exactly as it was)


def _truncated(root: Path) -> list[str]:
    path = write_model(root / "src") / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return [str(root / "src"), str(root / "out")]


def _header_past_end(root: Path) -> list[str]:
    raw_safetensors(root / "src" / "model.safetensors", {"w": entry("F32", [4], 0, 16)}, bytes(16), header_len=10**6)
    return [str(root / "src"), str(root / "out")]


def _header_not_json(root: Path) -> list[str]:
    raw_safetensors(root / "src" / "model.safetensors", b'{"w": {"dtype": "F32", ', bytes(16))
    return [str(root / "src" / "model.safetensors"), str(root / "out")]


def _overlap(root: Path) -> list[str]:
    header = {"a.weight": entry("F32", [2, 2], 0, 16), "b.weight": entry("F32", [2, 2], 8, 24)}
    raw_safetensors(root / "src" / "model.safetensors", header, bytes(24))
    return [str(root / "src"), str(root / "out")]


def _past_data(root: Path) -> list[str]:
    header = {"a.weight": entry("F32", [2, 2], 0, 16), "b.weight": entry("F32", [2, 2], 16, 32)}
    raw_safetensors(root / "src" / "model.safetensors", header, bytes(20))
    return [str(root / "src"), str(root / "out")]


def _unknown_dtype(root: Path) -> list[str]:
    header = {"a.weight": entry("F32", [2, 2], 0, 16), "b.weight": entry("Q4_K", [16], 16, 32)}
    raw_safetensors(root / "src" / "model.safetensors", header, bytes(32))
    return [str(root / "src"), str(root / "out")]


def _split(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    tensors = tiny_model(seed)
    names = list(tensors)
    return {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:2]},
        "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[2:]},
    }


def _index_missing_shard(root: Path) -> list[str]:
    shards = _split()
    weight_map = {n: s for s, t in shards.items() for n in t}
    write_sharded(root / "src", shards, weight_map)
    (root / "src" / "model-00002-of-00002.safetensors").unlink()
    return [str(root / "src"), str(root / "out")]


def _index_escapes(root: Path) -> list[str]:
    shards = _split()
    weight_map = {n: s for s, t in shards.items() for n in t}
    second = "model-00002-of-00002.safetensors"
    weight_map.update(dict.fromkeys(shards[second], "../" + second))
    write_sharded(root / "src", shards, weight_map)
    shutil.move(root / "src" / second, root / second)  # the escaping path exists: only the check stops it
    return [str(root / "src"), str(root / "out")]


def _two_shards(root: Path) -> list[str]:
    shards = _split()
    first, second = list(shards)
    weight_map = {n: s for s, t in shards.items() for n in t}
    shards[second]["model.embed_tokens.weight"] = shards[first]["model.embed_tokens.weight"]
    write_sharded(root / "src", shards, weight_map)
    return [str(root / "src"), str(root / "out")]


def _nonfinite(value: float, *flags: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        tensors = tiny_model()
        tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value
        write_model(root / "src", tensors)
        return [str(root / "src"), str(root / "out"), *flags]

    return build


def _shape_contradicts_config(root: Path) -> list[str]:
    src = copy_llama(root / "src")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = torch.zeros(rows, cols * 2, dtype=tensors[name].dtype)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return [str(src), str(root / "out")]


def _pickle_only(root: Path) -> list[str]:
    (root / "src").mkdir(parents=True)
    (root / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "src" / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be unpickled")
    return [str(root / "src"), str(root / "out")]


def _out_exists(*flags: str, ours: bool = True) -> Callable[[Path], list[str]]:
    """OUT holds an earlier result: bnb's (its manifest is there), or someone else's."""

    def build(root: Path) -> list[str]:
        write_model(root / "src")
        (root / "out").mkdir()
        (root / "out" / "precious.txt").write_text("an earlier result\n")
        if ours:
            (root / "out" / "bnb_manifest.json").write_text("{}\n")
        return [str(root / "src"), str(root / "out"), *flags]

    return build


def _with_flags(*flags: str) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        write_model(root / "src")
        return [str(root / "src"), str(root / "out"), *flags]

    return build


def _no_source(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [str(root / "no-such-model"), str(root / "out")]


def _out_inside_src(root: Path) -> list[str]:
    write_model(root / "src")
    return [str(root / "src"), str(root / "src" / "quantized")]


def _markup_in_path(root: Path) -> list[str]:
    """Rich reads `[x]` as markup: a path that contains some must still be printed as it is."""
    path = write_model(root / "src [v2] [/old]") / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1)
    return [str(root / "src [v2] [/old]"), str(root / "out")]


CASES: dict[str, Case] = {
    "truncated-shard": Case(_truncated, EXIT_FAILED, ("model.safetensors", "truncated")),
    "header-length-past-end": Case(
        _header_past_end, EXIT_FAILED, ("model.safetensors", "header length 1000000", "past the end")
    ),
    "header-not-json": Case(_header_not_json, EXIT_FAILED, ("model.safetensors", "not valid JSON")),
    "overlapping-offsets": Case(_overlap, EXIT_FAILED, ("model.safetensors", "'b.weight' overlaps tensor 'a.weight'")),
    "offsets-past-data": Case(
        _past_data, EXIT_FAILED, ("model.safetensors", "'b.weight'", "past the 20-byte data section")
    ),
    "unknown-dtype": Case(
        _unknown_dtype, EXIT_FAILED, ("model.safetensors", "'b.weight'", "unknown dtype 'Q4_K'"), ("BF16",)
    ),
    "index-missing-shard": Case(
        _index_missing_shard,
        EXIT_FAILED,
        ("model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"),
    ),
    "index-path-escapes": Case(
        _index_escapes,
        EXIT_FAILED,
        ("model.safetensors.index.json", "'../model-00002-of-00002.safetensors'", "escapes"),
    ),
    "tensor-in-two-shards": Case(
        _two_shards,
        EXIT_FAILED,
        (
            "'model.embed_tokens.weight'",
            "two shards",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ),
    ),
    "nan-weight": Case(
        _nonfinite(float("nan")),
        EXIT_FAILED,
        ("model.safetensors", "'model.layers.0.mlp.up_proj.weight'", ": 1 NaN"),
        ("--allow-nonfinite",),
    ),
    "inf-weight": Case(
        _nonfinite(float("-inf")),
        EXIT_FAILED,
        ("model.safetensors", "'model.layers.0.mlp.up_proj.weight'", ": 1 Inf"),
        ("--allow-nonfinite",),
    ),
    "nan-weight-allowed": Case(_nonfinite(float("nan"), "--allow-nonfinite"), 0),
    "inf-weight-allowed": Case(_nonfinite(float("inf"), "--allow-nonfinite", "--scheme", "int8"), 0),
    "shape-contradicts-config": Case(
        _shape_contradicts_config,
        EXIT_FAILED,
        ("model.layers.1.mlp.up_proj.weight", "[344, 256]", "contradicts config.json"),
    ),
    "pickle-only": Case(_pickle_only, EXIT_FAILED, ("pytorch_model.bin", "pickle"), ("safetensors",)),
    "out-exists": Case(_out_exists(), EXIT_FAILED, ("out", "already exists"), ("--overwrite",), out_exists=True),
    "out-exists-overwrite": Case(_out_exists("--overwrite"), 0, out_exists=True),
    "out-not-ours-overwrite": Case(
        _out_exists("--overwrite", ours=False),
        EXIT_FAILED,
        ("out", "already exists", "bnb did not write it"),
        ("choose another OUT", "bnb_manifest.json"),
        out_exists=True,
    ),
    "unknown-scheme": Case(_with_flags("--scheme", "nf5"), EXIT_USAGE, ("'nf5'",), ("nf4", "int8")),
    "bad-blocksize": Case(_with_flags("--blocksize", "48"), EXIT_USAGE, ("blocksize 48",), ("64",)),
    "bad-max-shard-size": Case(_with_flags("--max-shard-size", "5XB"), EXIT_USAGE, ("'5XB'",), ("5GB",)),
    "zero-max-shard-size": Case(_with_flags("--max-shard-size", "0"), EXIT_USAGE, ("--max-shard-size",)),
    "backend-cuda": Case(_with_flags("--backend", "cuda"), EXIT_USAGE, ("cuda",), ("--backend cpu",)),
    "unknown-backend": Case(_with_flags("--backend", "tpu"), EXIT_USAGE, ("'tpu'",), ("cpu",)),
    "unknown-preset": Case(_with_flags("--config", "nf9"), EXIT_USAGE, ("'nf9'",), ("nf4-dq",)),
    "bad-dtype": Case(_with_flags("--dtype", "int4"), EXIT_USAGE, ("'int4'",), ("bfloat16",)),
    "source-missing": Case(_no_source, EXIT_FAILED, ("no-such-model", "no such file or folder")),
    "out-inside-src": Case(_out_inside_src, EXIT_USAGE, ("quantized", "overlaps the source"), ("elsewhere",)),
    "markup-in-path": Case(_markup_in_path, EXIT_FAILED, ("src [v2] [/old]/model.safetensors", "truncated")),
}
