"""bnb_manifest.json: what was converted, from what, with which settings, and how well.

Everything in it is deterministic for the same input and settings except the ``run`` object
(timestamps, duration, host), which is documented as such.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bnbcli import __version__
from bnbcli.pipeline.executor import ComponentResult, StageSeconds
from bnbcli.plan.quantize_layout import QuantizePlan

MANIFEST_NAME = "bnb_manifest.json"
MANIFEST_SCHEMA_VERSION = 1


def _dtype(d: Any) -> str:
    return str(d).removeprefix("torch.")


def scheme_settings(plan: QuantizePlan) -> dict[str, Any]:
    settings = asdict(plan.scheme)
    # None stays null ("the checkpoint's own dtype"), never the string "None".
    return {
        k: (_dtype(v) if v is not None and ("dtype" in k or k == "quant_storage") else v) for k, v in settings.items()
    }


def _tensor_entry(record: Any) -> dict[str, Any]:
    job = record.job
    entry: dict[str, Any] = {
        "name": job.source.name,
        "action": job.decision.action,
        "reason": job.decision.reason,
        "source": {"dtype": _dtype(job.source.dtype), "shape": list(job.source.shape), "bytes": job.source.nbytes},
        "shard": job.shard,
        "outputs": [
            {"key": e.key, "dtype": _dtype(e.dtype), "shape": list(e.shape), "sha256": record.outputs[e.key]}
            for e in job.entries
        ],
    }
    if job.quantized:
        entry["transposed"] = job.decision.transpose
        entry["error"] = record.error.as_dict() if record.error else None
    return entry


def build_manifest(
    plan: QuantizePlan, results: list[ComponentResult], source_label: dict[str, Any], seconds: float
) -> dict[str, Any]:
    components = []
    for result in results:
        c = result.plan
        components.append(
            {
                "name": c.name,
                "planner": c.planner,
                "planner_reason": c.planner_reason,
                "skip_modules": list(c.skip_modules),
                "source_files": [
                    {"path": str(Path(p).relative_to(plan.checkpoint.root)), "sha256": h}
                    for p, h in result.source_sha256.items()
                ],
                "shards": [{"file": s, "bytes": result.shard_sizes[s]} for s in c.shards],
                "tensors": [_tensor_entry(r) for r in result.records],
            }
        )
    stages = StageSeconds()
    for result in results:
        for name, value in asdict(result.stage_seconds).items():
            setattr(stages, name, getattr(stages, name) + value)
    document = manifest_document(source_label, scheme_settings(plan), components, seconds, stages.as_dict())
    document["run"]["resumed_shards"] = sum(result.resumed_shards for result in results)
    return document


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
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
