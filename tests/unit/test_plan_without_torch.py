"""Opening a checkpoint and planning it import no torch, nor numpy, when the planner table, the plan cache or
the name rules decide (`bnb quantize` writes its kept tensors while torch imports: pipeline/early_copy.py;
everything before that import is on the run's critical path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from helpers.fuzz_harness import LLAMA_CONFIG, llama_tensors

PLAN = """
import sys
from bnbcli.checkpoint.source import open_checkpoint
from bnbcli.plan.quantize_layout import plan_quantize, plan_summary
from bnbcli.plan.scheme import QuantScheme
scheme = QuantScheme(method=sys.argv[2], double_quant=sys.argv[2] != "int8")
plan = plan_quantize(open_checkpoint(sys.argv[1]), scheme, planner=sys.argv[3])
plan_summary(plan)
print(plan.components[0].planner, plan.bytes_out, ",".join(m for m in ("torch", "numpy") if m in sys.modules) or "-")
"""


def _plan_in_a_fresh_process(src: Path, method: str, env: dict[str, str], planner: str = "auto") -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), **env}
    run = subprocess.run(
        [sys.executable, "-c", PLAN, str(src), method, planner], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("with_config", [True, False])
def test_planning_imports_no_torch_nor_numpy(tmp_path: Path, method: str, with_config: bool) -> None:
    save_file(llama_tensors(0), tmp_path / "model.safetensors")
    if with_config:  # the planner table knows this Llama; without config.json the name rules decide
        (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    planner, bytes_out, imported = _plan_in_a_fresh_process(tmp_path, method, {})
    assert planner == ("transformers" if with_config else "name-rules")
    assert int(bytes_out) > 0
    assert imported == "-"


def test_a_cached_plan_imports_no_torch(tmp_path: Path) -> None:
    """The real planner (transformers, with torch) answers once; the cache answers the next run without torch.
    (--planner transformers: the table, which would answer first under auto, stays out of it.)"""
    src = tmp_path / "src"
    src.mkdir()
    save_file(llama_tensors(0), src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    env = {"BNB_PLAN_CACHE": "on", "BNB_CACHE_DIR": str(tmp_path / "cache")}
    first = _plan_in_a_fresh_process(src, "nf4", env, "transformers")
    second = _plan_in_a_fresh_process(src, "nf4", env, "transformers")
    assert first[:2] == second[:2] and first[0] == "transformers"
    assert "torch" in first[2] and second[2] == "-"
