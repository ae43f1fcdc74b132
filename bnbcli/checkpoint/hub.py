"""Hub repo ids → a local snapshot folder, through huggingface_hub's cache (HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).

Two passes keep the download to what is needed: first the small files (configs, indexes, tokenizers), then
only the shards the indexes name. Without an index the folder's ``*.safetensors`` are fetched. Pickle weights
are never fetched.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from bnbcli import json_text
from bnbcli.checkpoint.shards import CANONICAL_STEMS, INDEX_SUFFIX, SAFETENSORS_SUFFIX, WEIGHT_SUFFIXES
from bnbcli.errors import BnbError, InputError, InternalError

# Configs, indexes, model_index.json, tokenizer vocabularies and templates, model cards. No *.py: remote code
# is not ours to run or to ship.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.md")

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_repo_id(src: str) -> bool:
    """``org/name`` as the Hub spells it, and not a weight file name (that is a missing local file)."""
    if not _REPO_ID.fullmatch(src) or "--" in src or ".." in src:
        return False
    return not any(src.lower().endswith(suffix) for suffix in WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class HubSnapshot:
    folder: Path  # .../models--org--name/snapshots/<commit>
    repo_folder: Path  # .../models--org--name: the snapshot's links resolve into its blobs/
    commit: str


def resolve(repo_id: str, revision: str | None) -> HubSnapshot:
    """Download (or find in the cache) what ``open_checkpoint`` needs of ``repo_id`` at ``revision``."""
    # Imported here: huggingface_hub costs ~0.3 s to import and local checkpoints never need it.
    from huggingface_hub import snapshot_download

    try:
        first = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(METADATA_PATTERNS)))
        patterns = [*METADATA_PATTERNS, *weight_patterns(first)]
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise hub_error(e, repo_id, revision) from e
    in_cache = folder.parent.name == "snapshots"
    return HubSnapshot(folder=folder, repo_folder=folder.parent.parent if in_cache else folder, commit=folder.name)


def weight_patterns(snapshot: Path) -> list[str]:
    """allow_patterns for the weights, read from the small files of the first pass."""
    prefixes = [""]
    model_index = snapshot / "model_index.json"
    if model_index.is_file():  # a diffusers pipeline: weights live in the component folders it names
        try:
            names = json_text.loads(model_index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            names = {}  # open_checkpoint reports the broken file; fetch no weights for it
        prefixes = [f"{k}/" for k, v in names.items() if not k.startswith("_") and isinstance(v, list)]
    patterns: list[str] = []
    for prefix in prefixes:
        shards = _indexed_shards(snapshot / prefix)
        if shards is None:
            # No index: every .safetensors of the folder (fnmatch's * also matches "/", so for a plain model
            # this fetches safetensors in subfolders too; rare, and never pickle).
            patterns.append(glob.escape(prefix) + "*" + SAFETENSORS_SUFFIX)
        else:
            patterns.extend(glob.escape(prefix + shard) for shard in shards)
    return patterns


def _indexed_shards(folder: Path) -> list[str] | None:
    if not folder.is_dir():
        return None
    candidates = [folder / (stem + INDEX_SUFFIX) for stem in CANONICAL_STEMS]
    candidates += sorted(folder.glob("*" + INDEX_SUFFIX))
    for path in candidates:
        if path.is_file():
            try:
                weight_map = json_text.loads(path.read_text(encoding="utf-8")).get("weight_map")
            except (OSError, ValueError, AttributeError):
                return None  # validated (and reported) later, when the checkpoint is opened
            if isinstance(weight_map, dict):
                return sorted({s for s in weight_map.values() if isinstance(s, str)})
            return None
    return None


# The network errors of huggingface_hub's HTTP client, which is requests, httpx or httpx2 by its version.
_TRANSPORT_ERRORS = frozenset({"TransportError", "ConnectionError", "Timeout"})
_HTTP_CLIENTS = frozenset({"requests", "httpx", "httpx2"})


def unreachable(e: BaseException) -> bool:
    """Whether the Hub could not be asked at all: offline mode (HF_HUB_OFFLINE), or no network."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    return any(
        c.__name__ in _TRANSPORT_ERRORS and c.__module__.partition(".")[0] in _HTTP_CLIENTS for c in type(e).__mro__
    )


def hub_error(e: Exception, repo_id: str, revision: str | None) -> BnbError:
    """huggingface_hub's exceptions → one-line InputErrors with a hint; a bug of ours stays an internal error."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return InputError(f"{at}: the repo is gated", f"accept its terms on huggingface.co, then {login}")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{at}: repo not found on the Hub (or private)", f"check the id; for a private repo {login}")
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"{at}: revision {revision!r} not found", "pass a branch, tag or commit that exists")
    if isinstance(e, LocalEntryNotFoundError):
        # Offline (HF_HUB_OFFLINE=1 or no network) and not (completely) in the cache.
        incomplete = "incompletely " if hasattr(e, "snapshot_path") else "not "  # IncompleteSnapshotError (hf>=1.x)
        cached = f"{at}: {incomplete}in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        fetch = f"`hf download {repo_id}` into that cache"
        if constants.HF_HUB_OFFLINE:
            return InputError(f"{cached} and HF_HUB_OFFLINE is set", f"unset HF_HUB_OFFLINE to download it, or {fetch}")
        return InputError(
            f"{cached} and the Hub cannot be reached",
            f"where the Hub is reachable, {fetch}; then HF_HUB_OFFLINE=1 reads it from there without the network",
        )
    if unreachable(e):
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        return InputError(
            f"{at}: the Hub cannot be reached ({type(e).__name__}: {first_line})",
            f"check the network (HF_ENDPOINT is {constants.ENDPOINT}); HF_HUB_OFFLINE=1 reads what the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) holds without asking the Hub",
        )
    if isinstance(e, HFValidationError):
        return InputError(f"{repo_id!r} is not a valid Hub repo id: {e}", "a repo id looks like org/name")
    if isinstance(e, HfHubHTTPError):
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        return InputError(f"{at}: Hub request failed: {first_line}", "check your network, or try again later")
    if isinstance(e, (OSError, ValueError)):  # every huggingface_hub error we can explain derives from one of them
        return InputError(f"{at}: cannot fetch from the Hub: {type(e).__name__}: {e}", "check your network and the id")
    return InternalError(f"internal error: {at}: {type(e).__name__}: {e}")
