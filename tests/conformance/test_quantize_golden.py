"""`bnb quantize` on every golden family and variant writes tensors byte-identical to what
transformers + bitsandbytes' CUDA kernels wrote (golden/models/<family>/<variant>): every tensor's dtype,
shape and sha256 against the vendored records, and the config transformers wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnbcli.cli.app import app

from helpers.bnb_inprocess import quantize
from helpers.golden import VARIANT_FLAGS, differs_from_record, golden_dir, golden_variants, variant_records


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(("family", "variant"), golden_variants(), ids=lambda v: v)
def test_quantize_matches_golden(family: str, variant: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize(golden_dir() / "models" / family / "src", out, *VARIANT_FLAGS[variant])
    ours = weights(out)
    theirs = {name: t for record in variant_records(family, variant).values() for name, t in record["tensors"].items()}
    if variant == "int8-skip-down":
        # The one deliberate difference: transformers let the user's list replace its defaults and
        # quantized lm_head; ours adds to the defaults, so lm_head stays 16-bit.
        lm_head = {"lm_head.weight", "lm_head.SCB", "lm_head.weight_format"}
        assert set(theirs) - set(ours) == {"lm_head.SCB", "lm_head.weight_format"}
        assert ours["lm_head.weight"].dtype == torch.bfloat16 and theirs["lm_head.weight"]["dtype"] == "I8"
        ours = {k: v for k, v in ours.items() if k not in lm_head}
        theirs = {k: v for k, v in theirs.items() if k not in lm_head}
    assert set(ours) == set(theirs)
    differing = {k: why for k in theirs if (why := differs_from_record(ours[k], theirs[k]))}
    assert not differing, f"{len(differing)} of {len(theirs)} tensors differ, e.g. {list(differing.items())[:3]}"

    config = json.loads((out / "config.json").read_text())
    theirs_config = json.loads((golden_dir() / "models" / family / variant / "config.json").read_text())
    ours_q, theirs_q = config.pop("quantization_config"), theirs_config.pop("quantization_config")
    # An explicit, complete skip list instead of null; everything else as transformers wrote it.
    assert isinstance(ours_q.pop("llm_int8_skip_modules"), list)
    theirs_q.pop("llm_int8_skip_modules")
    assert ours_q == theirs_q
    for volatile in ("transformers_version", "_diffusers_version", "_name_or_path"):
        config.pop(volatile, None)
        theirs_config.pop(volatile, None)
    assert config == theirs_config
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    assert manifest["schema_version"] == 1


def test_verbose_run_reports_busy_seconds_per_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(golden_dir() / "models" / "llama" / "src"), str(out), "-v"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((out / "bnb_manifest.json").read_text())["run"]
    stages = run["stage_seconds"]
    assert set(stages) == {"read", "convert", "results", "write", "hashing"}
    assert all(v >= 0 for v in stages.values()) and stages["convert"] > 0
    assert stages["convert"] <= run["seconds"]
    assert "busy per stage" in result.output and "convert" in result.output
    marks = run["timeline"]  # in order of time, each once
    for earlier, later in [
        ("source opened", "first tensor read"),
        ("first tensor read", "first tensor queued"),
        ("first tensor queued", "first tensor written"),
        ("first tensor written", "last tensor written"),
        ("last tensor read", "last tensor written"),
        ("last tensor written", "outputs on disk"),
        ("outputs on disk", "manifest"),
    ]:
        assert marks[earlier] <= marks[later], (earlier, later, marks)
    assert list(marks.values()) == sorted(marks.values())
    assert "timeline (s since start)" in result.output
