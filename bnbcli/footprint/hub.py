"""A Hub repo's checkpoint without its weights: configs and indexes downloaded, safetensors headers read
with HTTP range requests (`HfApi.parse_safetensors_file_metadata`), tensor data never fetched.

The repo is mirrored into a temporary folder of its small JSON files and an empty stand-in for each
weight file; while ``remote_headers`` is active, opening a stand-in returns the header the Hub sent, so
``open_checkpoint`` (and everything after it) reads the repo as it reads a local folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bnbcli.checkpoint.hub import hub_error, unreachable
from bnbcli.checkpoint.safetensors_file import SafetensorsFile, headers_from
from bnbcli.checkpoint.shards import INDEX_SUFFIX, SAFETENSORS_SUFFIX, is_weight_file

# The small files a footprint needs: configs, model_index.json, safetensors indexes.
NEEDED_NAMES = frozenset({"config.json", "model_index.json"})


@dataclass(frozen=True)
class RemoteRepo:
    folder: Path  # the temporary mirror: small files, and empty stand-ins for weight files
    commit: str
    sizes: dict[Path, int]  # stand-in → the size of the file on the Hub, for the headers read so far


def _needed(name: str) -> bool:
    return PurePosixPath(name).name in NEEDED_NAMES or name.endswith(INDEX_SUFFIX)


def _header_bytes(metadata: Any) -> tuple[bytes, int]:
    """A safetensors header rebuilt from huggingface_hub's parsed one, and the data section's length."""
    header: dict[str, Any] = {"__metadata__": dict(metadata.metadata or {})} if metadata.metadata else {}
    end = 0
    for name, info in metadata.tensors.items():
        begin, stop = info.data_offsets
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [begin, stop]}
        end = max(end, stop)
    return json.dumps(header).encode("utf-8"), end


def hub_api(api: Any = None) -> Any:
    """``api``, or huggingface_hub's ``HfApi`` (HF_TOKEN and HF_ENDPOINT as it reads them); tests pass a stand-in."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    return api


def repo_listing(repo_id: str, revision: str | None, api: Any) -> Any | None:
    """The repo's files as the Hub lists them, or None when the Hub cannot be asked (HF_HUB_OFFLINE, or no
    network): the caller then reads what the Hugging Face cache holds, as the other verbs do."""
    try:
        return api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        if unreachable(e):
            return None
        raise hub_error(e, repo_id, revision) from e


@contextlib.contextmanager
def remote_headers(repo_id: str, revision: str | None, info: Any, api: Any) -> Iterator[RemoteRepo]:
    """The mirror of ``repo_id`` at ``revision``, from its listing ``info`` (``repo_listing``)."""
    commit = info.sha or revision or "main"
    listed = {s.rfilename: getattr(s, "size", None) for s in info.siblings or []}
    with tempfile.TemporaryDirectory(prefix="bnb-footprint-") as tmp:
        folder = Path(tmp)
        for name in listed:
            path = folder / name
            if ".." in PurePosixPath(name).parts or PurePosixPath(name).is_absolute():
                continue  # never write outside the mirror
            path.parent.mkdir(parents=True, exist_ok=True)
            if _needed(name):
                try:
                    local = api.hf_hub_download(repo_id, name, revision=commit)
                except Exception as e:
                    raise hub_error(e, repo_id, revision) from e
                shutil.copyfile(local, path)
            elif is_weight_file(name):
                path.touch()  # a stand-in: its header comes from the Hub when it is opened
        sizes: dict[Path, int] = {}

        def header(path: Path) -> SafetensorsFile | None:
            if not path.name.endswith(SAFETENSORS_SUFFIX) or not path.is_relative_to(folder):
                return None
            name = path.relative_to(folder).as_posix()
            try:
                metadata = api.parse_safetensors_file_metadata(repo_id, name, revision=commit)
            except Exception as e:  # SafetensorsParsingError is neither an OSError nor a ValueError
                raise hub_error(e, f"{repo_id}/{name}", revision) from e
            raw, data_len = _header_bytes(metadata)
            # The file's size as the Hub lists it (the rebuilt header may be spaced differently).
            sizes[path] = listed.get(name) or 8 + len(raw) + data_len
            return SafetensorsFile.from_header(path, raw, 8 + len(raw) + data_len)

        with headers_from(header):
            yield RemoteRepo(folder=folder, commit=commit, sizes=sizes)
