"""bnb_manifest.json: what was converted, from what, with which settings, and how well. The commands that
write a checkpoint fill it with plain records (bnbcli/pipeline/quantize.py, dequantize.py).

Everything in it is deterministic for the same input and settings except the ``run`` object
(timestamps, duration, host), which is documented as such.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from bnbcli import __version__, json_text
from bnbcli.checkpoint.durable import atomic_file

MANIFEST_NAME = "bnb_manifest.json"
MANIFEST_SCHEMA_VERSION = 1


def manifest_document(
    source_label: dict[str, Any],
    settings: dict[str, Any],
    components: list[dict[str, Any]],
    seconds: float,
    stage_seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The manifest's frame, shared by every command that writes a checkpoint."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "tool": {"name": "bnbcli", "version": __version__},
        "source": source_label,
        "settings": settings,
        "components": components,
        # Not deterministic: when and where this run happened.
        "run": {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3),
            "host": platform.node(),
            **({"stage_seconds": stage_seconds} if stage_seconds is not None else {}),
        },
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    # json.dumps(indent=2)'s exact text (ASCII), faster and in pieces for the tens of thousands of tensors
    # of an MoE checkpoint
    with atomic_file(out_dir / MANIFEST_NAME) as f:
        json_text.write_indented(manifest, lambda text: f.write(text.encode("ascii")))
        f.write(b"\n")
