"""The weights of one model folder: which safetensors files, their index, and every tensor, validated.

Selection follows what transformers and diffusers load, so the output is what ``from_pretrained`` would
have read: ``model.safetensors``, then ``model.safetensors.index.json`` (likewise for diffusers'
``diffusion_pytorch_model``), then a folder's only index, then its only ``.safetensors`` file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from bnbcli import json_text
from bnbcli.checkpoint.safetensors_file import SafetensorsFile, TensorInfo
from bnbcli.errors import InputError

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
CANONICAL_STEMS = ("model", "diffusion_pytorch_model")  # transformers, diffusers

# torch.save / pickle formats: loading them can run arbitrary code, so they are never opened.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# Weights in any format. None is copied into an output as an "other file": each would be an unquantized
# duplicate of the model (a consolidated.safetensors, a tf_model.h5, a pytorch_model.bin, …).
WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {SAFETENSORS_SUFFIX, ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot"}

PICKLE_HINT = (
    "convert it to safetensors first, e.g. load it with transformers and call "
    "save_pretrained(out_dir, safe_serialization=True), then point bnb at out_dir"
)


def _weight_suffix(name: str) -> str:
    """The weight suffix of a weight file or of its index (``x.bin.index.json`` → ``.bin``), else ""."""
    if name.endswith(".index.json"):
        name = name[: -len(".index.json")]
    suffix = os.path.splitext(name)[1].lower()
    return suffix if suffix in WEIGHT_SUFFIXES else ""


def is_weight_file(name: str) -> bool:
    return bool(_weight_suffix(name))


def is_pickle_file(name: str) -> bool:
    return _weight_suffix(name) in PICKLE_SUFFIXES


def pickle_error(what: Path | str) -> InputError:
    return InputError(f"{what}: pickle checkpoints are not read (they can run code)", PICKLE_HINT)


def refuse_pickle(folder: Path) -> None:
    """Raise the pickle error if ``folder`` holds pickle weights (call when it has no safetensors)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_pickle_file(p.name))
    if names:
        raise pickle_error(f"{folder} ({', '.join(names[:3])})")


@dataclass(frozen=True)
class WeightChoice:
    """The weights a folder offers: exactly one of a single file or an index."""

    single: Path | None = None
    index: Path | None = None


def find_weights(folder: Path) -> WeightChoice | None:
    """Pick the safetensors weights of ``folder`` (not recursive); None when it has none."""
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    present = set(names)
    for stem in CANONICAL_STEMS:
        if stem + SAFETENSORS_SUFFIX in present:
            return WeightChoice(single=folder / (stem + SAFETENSORS_SUFFIX))
        if stem + INDEX_SUFFIX in present:
            return WeightChoice(index=folder / (stem + INDEX_SUFFIX))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) == 1:
        return WeightChoice(index=folder / indexes[0])
    if len(indexes) > 1:
        raise InputError(
            f"{folder}: {len(indexes)} safetensors indexes and none is model{INDEX_SUFFIX}: {', '.join(indexes)}",
            "remove the ones that are not the model, or rename the right one to model.safetensors.index.json",
        )
    files = [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
    if len(files) == 1:
        return WeightChoice(single=folder / files[0])
    if len(files) > 1:
        shown = ", ".join(files[:4]) + (", …" if len(files) > 4 else "")
        raise InputError(
            f"{folder}: {len(files)} .safetensors files and no index to say which make the model: {shown}",
            "if they are shards, the model.safetensors.index.json is missing; otherwise pass one file's path",
        )
    return None


@dataclass(frozen=True)
class LoadedWeights:
    files: tuple[Path, ...]
    index: dict[str, Any] | None
    tensors: dict[str, TensorInfo]
    unlisted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # see _unlisted_shards


def load_weights(choice: WeightChoice, trusted_root: Path) -> LoadedWeights:
    """Open every shard's header and check it against the index (if any).

    ``trusted_root`` is the folder that shard paths, once symlinks are resolved, must stay inside: the model
    folder itself, or for a Hub snapshot the repo's cache folder (whose files link to ``../../blobs``).
    """
    if choice.single is not None:
        refuse_link_out(choice.single, trusted_root)
        shard = SafetensorsFile.open(choice.single)
        return LoadedWeights(files=(choice.single,), index=None, tensors=dict(shard.tensors))
    assert choice.index is not None
    index_path = choice.index
    refuse_link_out(index_path, trusted_root)
    index, weight_map = read_index(index_path)
    shard_names = list(dict.fromkeys(weight_map.values()))  # index order, each shard once
    shards = {name: SafetensorsFile.open(shard_path(index_path, name, trusted_root)) for name in shard_names}

    # Compare the shards' own headers, not only the index: a tensor stored twice would be quantized twice.
    owner: dict[str, str] = {}
    for shard_name, shard in shards.items():
        for name in shard.tensors:
            if name in owner:
                raise InputError(
                    f"{index_path}: tensor {name!r} is in two shards, {owner[name]} and {shard_name}",
                    "the checkpoint is inconsistent; re-export it",
                )
            owner[name] = shard_name
    tensors: dict[str, TensorInfo] = {}
    for shard_name, shard in shards.items():
        for name, info in shard.tensors.items():
            listed = weight_map.get(name)
            if listed is None:
                raise InputError(
                    f"{shard.path}: tensor {name!r} is not in the index {index_path.name}",
                    "the index and the shards disagree; re-export the checkpoint or fix the index",
                )
            if listed != shard_name:
                raise InputError(
                    f"{shard.path}: holds tensor {name!r}, but {index_path.name} says it is in {listed}",
                    "the index and the shards disagree; re-export the checkpoint or fix the index",
                )
            tensors[name] = info
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise InputError(
                f"{index_path}: tensor {name!r} is listed in shard {shard_name} but missing from it",
                "the index and the shards disagree; re-export the checkpoint or fix the index",
            )
    files = tuple(shard.path for shard in shards.values())
    return LoadedWeights(files, index, tensors, _unlisted_shards(index_path, shard_names))


def _unlisted_shards(index_path: Path, listed: list[str]) -> dict[str, tuple[str, ...]]:
    """Shards beside the index (``model-00003-of-00003.safetensors``) that its weight_map never names, and
    the tensors each holds. They are not part of the model (transformers does not load them either), but
    an export that lost index entries looks exactly like this, so they are named. A shard that cannot be
    read is named without its tensors."""
    stem = re.escape(index_path.name.removesuffix(INDEX_SUFFIX))
    shard_name = re.compile(rf"{stem}-\d+-of-\d+{re.escape(SAFETENSORS_SUFFIX)}")
    found: dict[str, tuple[str, ...]] = {}
    for path in sorted(index_path.parent.iterdir()):
        if shard_name.fullmatch(path.name) and path.name not in listed and path.is_file():
            try:
                found[path.name] = tuple(SafetensorsFile.open(path).tensors)
            except InputError:
                found[path.name] = ()
    return found


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a ``*.safetensors.index.json``; returns the index and its validated ``weight_map``."""
    try:
        index = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: index is not valid JSON: {e}", "re-download or re-export the checkpoint") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{path}: index has no weight_map object", "re-download or re-export the checkpoint")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise InputError(
                f"{path}: weight_map entry for tensor {name!r} is {shard!r}, not a shard file name",
                "re-download or re-export the checkpoint",
            )
    if not weight_map:
        raise InputError(f"{path}: index lists no tensors", "re-download or re-export the checkpoint")
    return index, weight_map


def shard_path(index_path: Path, name: str, trusted_root: Path) -> Path:
    """The shard ``name`` as the index names it, refused if it escapes the model folder."""
    rel = PurePosixPath(name)
    windows = PureWindowsPath(name)
    if rel.is_absolute() or windows.is_absolute() or windows.drive or ".." in rel.parts or "\\" in name:
        raise InputError(
            f"{index_path}: shard path {name!r} escapes the model folder",
            "shard names must be relative paths inside the folder; the index may be malicious",
        )
    path = index_path.parent / rel
    if not path.is_file():
        raise InputError(
            f"{index_path}: shard {name} does not exist",
            "the download is incomplete; fetch the missing shard",
        )
    refuse_link_out(path, trusted_root)
    return path


def refuse_link_out(path: Path, trusted_root: Path) -> None:
    """Every file bnb reads or copies from a folder must stay inside ``trusted_root`` once links are
    resolved: a ``tokenizer.json`` linking to /etc/shadow would otherwise be copied into OUT."""
    target = path.resolve()
    if not target.is_relative_to(trusted_root.resolve()):
        raise InputError(
            f"{path} is a link to {target}, outside the model folder",
            "copy the file into the folder (cp -L) or remove the link: links out of the folder are refused",
        )


def copy_files(
    folder: Path,
    trusted_root: Path,
    *,
    keep_weights: frozenset[Path] = frozenset(),
    all_weights: bool = False,
    recursive: bool = True,
) -> tuple[Path, ...]:
    """Every non-hidden file under ``folder`` to copy as-is, in sorted order; a link out of
    ``trusted_root`` is refused (``refuse_link_out``).

    Weight files are left out (see WEIGHT_SUFFIXES) unless listed in ``keep_weights`` or ``all_weights`` is set.
    """
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow links to folders
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.startswith("."):
                continue
            if is_weight_file(filename) and not all_weights and path not in keep_weights:
                continue
            if path.is_file():  # skips dangling links
                refuse_link_out(path, trusted_root)
                out.append(path)
    return tuple(out)
