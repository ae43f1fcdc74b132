"""What to convert: a safetensors file, a model folder, a diffusers pipeline folder, or a Hub repo id.

``open_checkpoint`` reads headers only (never tensor data) and validates everything a conversion relies on,
so that a bad checkpoint fails before any output is written. Pickle weights are refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path
from typing import Any

from bnbcli import json_text
from bnbcli.checkpoint import hub
from bnbcli.checkpoint.safetensors_file import SafetensorsFile, TensorInfo
from bnbcli.checkpoint.shards import (
    INDEX_SUFFIX,
    SAFETENSORS_SUFFIX,
    WeightChoice,
    copy_files,
    find_weights,
    is_pickle_file,
    load_weights,
    pickle_error,
    refuse_link_out,
    refuse_pickle,
)
from bnbcli.errors import InputError, UsageError

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"  # marks a diffusers pipeline folder


@dataclass(frozen=True)
class ModelSource:
    """One model, or one component of a diffusers pipeline."""

    root: Path  # its folder (a single file's parent)
    name: str  # the diffusers component name; "" for a plain model or file
    config: dict[str, Any] | None  # parsed config.json, if present
    weight_files: tuple[Path, ...]  # the safetensors shards, in index order
    index: dict[str, Any] | None  # the parsed *.safetensors.index.json
    tensors: dict[str, TensorInfo]  # over all shards; each tensor in exactly one shard
    other_files: tuple[Path, ...]  # files under root to copy as-is (tokenizer, generation_config.json, …)
    unlisted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # shard → tensors the index leaves out

    @cached_property
    def _file_index(self) -> dict[Path, int]:
        return {path: i for i, path in enumerate(self.weight_files)}

    def file_position(self, info: TensorInfo) -> tuple[int, int]:
        """Where a tensor stands in the files: its shard, then its offset (read in this order, the shards
        stream sequentially and hash as they are read)."""
        return self._file_index[info.path], info.start

    def in_file_order(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=self.file_position)


@dataclass(frozen=True)
class Checkpoint:
    kind: str  # "model" | "file" | "diffusers"
    root: Path
    components: dict[str, ModelSource]  # "" → the model, for kinds "model" and "file"
    pipeline_files: tuple[Path, ...]  # diffusers: files outside the selected components, to copy as-is
    repo_id: str | None = None
    revision: str | None = None  # for a Hub repo: the commit its snapshot was resolved to

    @property
    def warnings(self) -> list[str]:
        """What a user should know that does not stop a run: shards their index leaves out."""
        found = []
        for name, source in sorted(self.components.items()):
            for file, tensors in source.unlisted.items():
                shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
                found.append(
                    f"{name + '/' if name else ''}{file} is not in the index, so its tensors are left out "
                    f"(transformers leaves them out too): {shown or 'it cannot be read'}"
                )
        return found

    @property
    def tensor_bytes(self) -> int:
        """The bytes of every tensor: what a progress bar over the whole checkpoint counts."""
        return sum(info.nbytes for source in self.components.values() for info in source.tensors.values())


def open_checkpoint(src: str, *, revision: str | None = None, components: Sequence[str] | None = None) -> Checkpoint:
    """Open ``src``: a ``.safetensors`` file, a model folder, a diffusers folder, or a Hub repo id ``org/name``.

    ``components`` selects diffusers components to convert; by default every component that has
    safetensors weights (unet/transformer, text encoders, vae, …). The others are copied as-is.
    ``revision`` (a branch, tag or commit) applies to Hub repo ids only.
    """
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise UsageError(
                f"--revision {revision} applies to Hub repo ids, not to the local path {src}",
                "leave out the revision, or give the repo id (org/name)",
            )
        return _open_local(path, components, trusted_root=path if path.is_dir() else path.parent)
    if hub.looks_like_repo_id(src):
        snapshot = hub.resolve(src, revision)
        checkpoint = _open_local(snapshot.folder, components, trusted_root=snapshot.repo_folder)
        return replace(checkpoint, repo_id=src, revision=snapshot.commit)
    raise InputError(
        f"{src}: no such file or folder",
        "give a .safetensors file, a model folder, a diffusers pipeline folder, or a Hub repo id like org/name",
    )


def _open_local(path: Path, components: Sequence[str] | None, trusted_root: Path) -> Checkpoint:
    if path.is_dir() and (path / MODEL_INDEX_NAME).is_file():
        return _open_diffusers(path, components, trusted_root)
    if components is not None:
        raise UsageError(
            f"{path}: components were selected, but this is not a diffusers pipeline (no {MODEL_INDEX_NAME})",
            "leave out the component selection for a plain model",
        )
    if path.is_dir():
        choice = find_weights(path)
        if choice is None:
            refuse_pickle(path)
            raise InputError(
                f"{path}: no safetensors weights (model.safetensors, or an index and its shards)",
                "point at the folder that holds config.json and the .safetensors files "
                "(a pytorch_model.bin checkpoint must be converted to safetensors first)",
            )
        return Checkpoint(
            kind="model", root=path, components={"": _model_source(path, "", choice, trusted_root)}, pipeline_files=()
        )
    name = path.name
    if name.endswith(INDEX_SUFFIX):  # an index file stands for its folder, with that index chosen
        source = _model_source(path.parent, "", WeightChoice(index=path), trusted_root)
        return Checkpoint(kind="model", root=path.parent, components={"": source}, pipeline_files=())
    if name.endswith(SAFETENSORS_SUFFIX):
        source = _file_source(path, trusted_root)
        return Checkpoint(kind="file", root=path.parent, components={"": source}, pipeline_files=())
    if is_pickle_file(name):
        raise pickle_error(path)
    raise InputError(f"{path}: not a .safetensors file", "give a .safetensors file, a model folder or a Hub repo id")


def _model_source(
    folder: Path, name: str, choice: WeightChoice, trusted_root: Path, other: tuple[Path, ...] | None = None
) -> ModelSource:
    """``other``: the files to copy beside the weights; by default every file of the folder."""
    loaded = load_weights(choice, trusted_root)
    config_path = folder / CONFIG_NAME
    other = tuple(p for p in (copy_files(folder, trusted_root) if other is None else other) if p != config_path)
    return ModelSource(
        root=folder,
        name=name,
        config=_checked_config(config_path, _read_json_object(config_path, trusted_root)),
        weight_files=loaded.files,
        index=loaded.index,
        tensors=loaded.tensors,
        other_files=other,
        unlisted=loaded.unlisted,
    )


def _file_source(path: Path, trusted_root: Path) -> ModelSource:
    """A single weight file. With a config.json beside it, it is the weights of the model in that folder:
    the config is used, and the small files a loader reads beside the weights (tokenizer, generation
    config, chat template: what the Hub download fetches besides weights) are copied. Without one, the
    folder may be any folder (~/Downloads): nothing else is taken."""
    folder = path.parent
    if not (folder / CONFIG_NAME).is_file():
        tensors = dict(SafetensorsFile.open(path).tensors)
        return ModelSource(folder, "", config=None, weight_files=(path,), index=None, tensors=tensors, other_files=())
    beside = tuple(
        p
        for p in copy_files(folder, trusted_root, recursive=False)
        if any(fnmatch(p.name, m) for m in hub.METADATA_PATTERNS)
    )
    return _model_source(folder, "", WeightChoice(single=path), trusted_root, beside)


# The config.json fields every planner branches on, and the JSON type each must have.
_CONFIG_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "_class_name": (str,),
    "architectures": (list,),
    "torch_dtype": (str,),
    "dtype": (str,),
    "quantization_config": (dict,),
}


def _checked_config(path: Path, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuse a config.json whose identifying fields have the wrong JSON type (a list for model_type,
    say): transformers would fail on it in surprising ways, and so would the planners."""
    if config is None:
        return None
    for key, types in _CONFIG_FIELD_TYPES.items():
        value = config.get(key)
        wrong = value is not None and not isinstance(value, types)
        if key == "architectures" and not wrong and value is not None:
            wrong = not all(isinstance(a, str) for a in value)
        if wrong:
            expected = "a list of strings" if key == "architectures" else f"a JSON {types[0].__name__}"
            raise InputError(
                f"{path}: {key!r} is {json.dumps(value)[:60]}, not {expected}".replace(" str", " string"),
                "fix config.json, or re-download it",
            )
    return config


def _read_json_object(path: Path, trusted_root: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    refuse_link_out(path, trusted_root)
    try:
        value = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON: {e}", "fix or re-download the file") from e
    if not isinstance(value, dict):
        raise InputError(f"{path}: is a JSON {type(value).__name__}, not an object", "fix or re-download the file")
    return value


def _open_diffusers(root: Path, components: Sequence[str] | None, trusted_root: Path) -> Checkpoint:
    _read_json_object(root / MODEL_INDEX_NAME, trusted_root)  # a broken model_index.json would break the output too
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    available: dict[str, WeightChoice] = {}
    unusable: dict[str, InputError] = {}  # folders with weights we cannot convert: pickle only, or ambiguous
    for folder in subfolders:
        try:
            choice = find_weights(folder)
        except InputError as e:
            unusable[folder.name] = e
            continue
        if choice is not None:
            available[folder.name] = choice
        elif any(is_pickle_file(p.name) for p in folder.iterdir() if p.is_file()):
            unusable[folder.name] = pickle_error(f"{root}: component {folder.name}")

    if components is None:
        # Default: every component with weights. One we cannot convert would silently stay unconverted.
        for error in unusable.values():
            raise error
        selected = list(available)
        if not selected:
            raise InputError(
                f"{root}: no component folder holds safetensors weights",
                "each component (unet, vae, text_encoder, …) needs a diffusion_pytorch_model.safetensors or "
                "model.safetensors",
            )
    else:
        selected = list(dict.fromkeys(components))
        if not selected:
            raise UsageError(f"{root}: no components selected", f"choose from: {', '.join(available)}")
        for name in selected:
            if name in unusable:
                raise unusable[name]
            if name not in available:
                raise InputError(
                    f"{root}: no component {name!r} with safetensors weights",
                    f"available components: {', '.join(available) or 'none'}",
                )

    sources = {name: _model_source(root / name, name, available[name], trusted_root) for name in selected}
    pipeline_files = _pipeline_files(root, selected, available, trusted_root)
    return Checkpoint(kind="diffusers", root=root, components=sources, pipeline_files=pipeline_files)


def _pipeline_files(
    root: Path, selected: Sequence[str], available: dict[str, WeightChoice], trusted_root: Path
) -> tuple[Path, ...]:
    """Files outside the selected components, to copy as-is, listed file by file (never whole folders).

    Root-level weight files (single-file pipeline checkpoints such as v1-5-pruned.ckpt) are duplicates and left
    out. A component that is not selected keeps exactly the weights diffusers loads, not variants beside them;
    any other folder (scheduler, tokenizer, a pickle or ambiguous component left out on request) is copied whole.
    """
    files = list(copy_files(root, trusted_root, recursive=False))
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name in selected:
            continue
        choice = available.get(folder.name)
        if choice is None:
            files.extend(copy_files(folder, trusted_root, all_weights=True))
        else:
            files.extend(copy_files(folder, trusted_root, keep_weights=_weights_of(choice)))
    return tuple(files)


def _weights_of(choice: WeightChoice) -> frozenset[Path]:
    """The files of a component that is copied as-is: its chosen single file, or its index and shards."""
    if choice.single is not None:
        return frozenset({choice.single})
    assert choice.index is not None
    try:
        weight_map = json_text.loads(choice.index.read_text(encoding="utf-8"))["weight_map"]
        return frozenset({choice.index, *(choice.index.parent / shard for shard in weight_map.values())})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return frozenset({choice.index})  # copied as broken as it came: only selected components are validated
