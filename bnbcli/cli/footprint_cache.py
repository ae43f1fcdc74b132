"""`bnb footprint`'s reports kept on disk, so that asking again about an unchanged local checkpoint takes
milliseconds instead of importing torch and transformers and building the model on the meta device
(9-21 s for all-MiniLM-L6-v2 on a 2-core machine).

The key is the sha256 of: this format, bnbcli's own source files, the installed versions of the
libraries the report comes from, the command's arguments, and every file of the checkpoint's folder
(its path, size and modification time, and the bytes of its JSON files). Anything else, or a repo id on
the Hub, is computed afresh. Lives beside the plan cache (``<cache>/footprints``), on and off with it
(``BNB_PLAN_CACHE=off``). Writing is best effort; an entry that cannot be read is computed again.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from bnbcli import __version__, json_text
from bnbcli.checkpoint.durable import write_json
from bnbcli.environment import installed_version
from bnbcli.plan.planners import cache_folder

FORMAT = 1
LIBRARIES = ("torch", "transformers", "diffusers", "accelerate", "bitsandbytes", "safetensors", "huggingface_hub")


def folder() -> Path:
    return cache_folder.folder().parent / "footprints"


@cache
def _code_digest() -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _checkpoint_files(src: Path) -> list[list[Any]]:
    root = src if src.is_dir() else src.parent
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.suffix == ".json" else None
        files.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns, content])
    return [[str(root.resolve())], *files]


def key(src: str, arguments: dict[str, Any], text_file: Path | None = None) -> str | None:
    """The entry's name for this command, or None when it is not to be cached (off, or not local).
    ``text_file``: a file the report reads (--calibrate's text), its bytes part of the key."""
    path = Path(src).expanduser()
    if not cache_folder.enabled() or not path.exists():
        return None
    try:
        document = {
            "format": FORMAT,
            "code": _code_digest(),
            "libraries": {library: installed_version(library) for library in LIBRARIES},
            "arguments": arguments,
            "checkpoint": _checkpoint_files(path),
            "text": hashlib.sha256(text_file.read_bytes()).hexdigest() if text_file else None,
        }
    except OSError:
        return None
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def load(name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    try:
        report = json_text.loads((folder() / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("schemes"), list) else None


def store(name: str | None, report: dict[str, Any]) -> None:
    if name is None:
        return
    try:
        target = folder()
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / f"{name}.json", report)  # whole or absent, whoever reads it meanwhile
    except OSError:
        pass
