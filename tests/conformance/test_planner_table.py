"""The planner table (bnbcli/plan/planners/table.py) against transformers itself: the same plan for every
architecture it lists (built on the meta device from a small config, tied and untied, three schemes) and
for every golden family and variant; and it answers without importing transformers, or leaves the
checkpoint to the real planner."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from bnbcli.errors import InputError
from bnbcli.plan.decisions import plan_quantization
from bnbcli.plan.planners import table
from bnbcli.plan.scheme import QuantScheme

from helpers import REPO
from helpers.golden import golden_dir
from helpers.golden_plan import VARIANTS, source

pytest.importorskip("transformers")
sys.path.insert(0, str(REPO / "scripts"))
import make_planner_table as maker

from helpers.bnb_process import HANG_SECONDS

FAMILIES = ("llama", "qwen2_tied", "gpt2", "opt", "flux_tiny")


def test_the_installed_transformers_is_one_the_table_was_checked_against() -> None:
    """The suite's transformers is in the table's range: otherwise every test here would test nothing."""
    for library in ("transformers", "diffusers"):
        version = table.installed(library)
        assert version is not None
        low, high = table.checked_range(library)
        assert table._minor(low) <= table._minor(version) <= table._minor(high), (library, version, low, high)


@pytest.mark.parametrize("name", sorted(table.table()["models"]))
def test_every_listed_model_plans_as_its_library_does(name: str) -> None:
    data = table.table()
    entry = data["models"][name]
    differs = [
        v
        for v in entry.get("differs_with", ())
        if table._minor(v) == table._minor(table.installed(entry["library"]) or "")
    ]
    if differs:  # marked by `make_planner_table.py --check-only --record` under this release: never used
        with pytest.raises(table.NotInTable, match="does not hold for"):
            maker.compare(name, data)
        return
    maker.compare(name, data)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden_families_plan_as_their_library_does(family: str, variant: str) -> None:
    config, tensors = source(family)
    library = "diffusers" if family == "flux_tiny" else "transformers"
    ours = plan_quantization(config, tensors, VARIANTS[variant])
    theirs = plan_quantization(config, tensors, VARIANTS[variant], planner=library)
    assert "planner table" in ours.reason and "built" in theirs.reason
    assert dict(ours.decisions) == dict(theirs.decisions)
    assert ours.skip_modules == theirs.skip_modules
    assert ours.quantization_config() == theirs.quantization_config()


def test_a_plan_from_the_table_imports_no_transformers() -> None:
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bnbcli.checkpoint.source import open_checkpoint\n"
        "from bnbcli.plan.quantize_layout import tensor_shapes\n"
        "from bnbcli.plan.decisions import plan_quantization\n"
        "from bnbcli.plan.scheme import QuantScheme\n"
        "src = open_checkpoint(sys.argv[1])\n"
        "plan = plan_quantization(src.components[''].config, tensor_shapes(src.components['']), QuantScheme())\n"
        "print(json.dumps([plan.reason, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'diffusers', 'accelerate'))]))\n"
    )
    src = golden_dir() / "models" / "llama" / "src"
    result = subprocess.run(
        [sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=HANG_SECONDS
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reason, imported = json.loads(result.stdout.splitlines()[-1])
    assert "planner table" in reason
    assert imported == []


def _plan(config: dict, tensors: dict) -> str:
    return plan_quantization(config, tensors, QuantScheme()).reason


def test_what_the_table_does_not_describe_goes_to_the_real_planner(monkeypatch) -> None:
    config, tensors = source("llama")
    assert "planner table" in _plan(config, tensors)
    # a key the model does not have (transformers calls it "not a parameter")
    assert "built" in _plan(config, {**tensors, "model.extra.weight": ((4, 4), torch.bfloat16)})
    # a config.json value that changes the layer count: layer 2 is then missing, which transformers names
    with pytest.raises(InputError, match=r"no tensor for model\.layers\.2\."):
        _plan({**config, "num_hidden_layers": 3}, tensors)
    # another model_type under a listed name; an architecture the table does not list
    assert "built" in _plan({**config, "model_type": "mistral"}, tensors)
    assert "does not know" in _plan({**config, "architectures": ["NoSuchForCausalLM"], "model_type": "x"}, tensors)
    # a transformers release outside the checked range
    monkeypatch.setattr(table, "installed", lambda library: "5.99.0")
    assert "built" in _plan(config, tensors)


def test_an_entry_that_differs_under_the_installed_release_goes_to_the_real_planner(monkeypatch) -> None:
    config, tensors = source("llama")
    data = copy.deepcopy(table.table())  # the cached table itself stays as it is for the tests after this one
    data["models"]["LlamaForCausalLM"]["differs_with"] = [table.installed("transformers")]
    monkeypatch.setattr(table, "table", lambda: data)
    assert "built" in _plan(config, tensors)


def test_without_transformers_the_table_still_answers(monkeypatch) -> None:
    monkeypatch.setattr(table, "installed", lambda library: None)
    config, tensors = source("llama")
    assert "planner table" in _plan(config, tensors)


def test_a_checkpoint_that_contradicts_config_json_gets_the_real_planners_error() -> None:
    config, tensors = source("llama")
    wrong_shape = {**tensors, "model.layers.0.self_attn.q_proj.weight": ((64, 128), torch.bfloat16)}
    with pytest.raises(InputError, match=r"contradicts config\.json"):
        plan_quantization(config, wrong_shape, QuantScheme())
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(InputError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight"):
        plan_quantization(config, missing, QuantScheme())


@pytest.mark.parametrize("family", ["qwen2_tied", "opt"])
def test_tied_embeddings_without_lm_head_in_the_file(family: str) -> None:
    """These checkpoints hold no lm_head.weight (tied to the input embeddings): lm_head still goes on the
    skip list. (OPT's last parameter is also the last layer's final norm bias: the table numbers it.)"""
    config, tensors = source(family)
    assert "lm_head.weight" not in tensors
    plan = plan_quantization(config, tensors, QuantScheme())
    assert "planner table" in plan.reason and plan.skip_modules == ("lm_head",)
