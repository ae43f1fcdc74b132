"""The plan cache (bnbcli/plan/planners/cache.py): a second run with the same inputs gets the library planner's
answer without asking the library; any change of input asks again; a broken entry is made again."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bnbcli.formats.dtypes import FLOAT16, FLOAT32
from bnbcli.plan.decisions import plan_quantization
from bnbcli.plan.planners import cache, hf_diffusers, hf_transformers, table
from bnbcli.plan.scheme import QuantScheme

from helpers.golden_plan import source

SCHEME = QuantScheme(method="nf4", double_quant=True)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The plan cache on, in a folder of its own, and the planner table out of the way (the cache keeps the
    real planners' answers: architectures the table does not describe); the list of library planner calls."""

    def not_in_table(*args: Any) -> Any:
        raise table.NotInTable("not in this test's table")

    monkeypatch.setattr(table, "plan_modules", not_in_table)
    monkeypatch.setenv("BNB_PLAN_CACHE", "on")
    monkeypatch.setenv("BNB_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[str] = []
    for module in (hf_transformers, hf_diffusers):
        real = module.plan_modules

        def counted(*args: Any, _real: Any = real, _name: str = module.__name__) -> Any:
            calls.append(_name.rsplit(".", 1)[-1])
            return _real(*args)

        monkeypatch.setattr(module, "plan_modules", counted)
    return calls


def plan_is_cached(config: dict | None, tensors: Any, scheme: QuantScheme) -> bool:
    """Whether the cache holds the library planner's answer for this component."""
    library = "diffusers" if config and "_class_name" in config else "transformers"
    return config is None or cache.lookup(library, config, tensors, scheme)


def _same(a: Any, b: Any) -> None:
    assert a.to_json_dict() == b.to_json_dict()
    assert (a.skip_modules, a.model_dtype, a.unmatched_skip) == (b.skip_modules, b.model_dtype, b.unmatched_skip)


@pytest.mark.parametrize("family", ["llama", "gpt2", "flux_tiny"])
def test_second_plan_comes_from_the_cache_and_is_the_same(family: str, asked: list[str]) -> None:
    config, tensors = source(family)
    library = "hf_diffusers" if family == "flux_tiny" else "hf_transformers"
    assert not plan_is_cached(config, tensors, SCHEME)
    first = plan_quantization(config, tensors, SCHEME)
    assert asked == [library] and plan_is_cached(config, tensors, SCHEME)
    again = plan_quantization(config, tensors, SCHEME)
    assert asked == [library]  # not asked a second time
    _same(first, again)
    # the cached answer is the library's, not a fallback's
    assert again.planner == ("diffusers" if family == "flux_tiny" else "transformers")


def _variants(config: dict, tensors: dict) -> list[tuple[str, dict, dict, QuantScheme]]:
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    shape, _ = tensors[name]
    return [
        ("a config value", {**config, "rms_norm_eps": 1.234e-5}, tensors, SCHEME),
        ("one more tensor", config, {**tensors, "extra.weight": ((4, 4), FLOAT32)}, SCHEME),
        ("a tensor's dtype", config, {**tensors, name: (shape, FLOAT16)}, SCHEME),
        ("the scheme's skip list", config, tensors, replace(SCHEME, skip=("q_proj",))),
        ("the method", config, tensors, QuantScheme(method="int8")),
    ]


def test_any_other_input_asks_the_library_again(asked: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config, tensors = source("llama")
    plan_quantization(config, tensors, SCHEME)
    for what, other_config, other_tensors, scheme in _variants(config, tensors):
        before = len(asked)
        assert not plan_is_cached(other_config, other_tensors, scheme), what
        plan_quantization(other_config, other_tensors, scheme)
        assert len(asked) == before + 1, what
    monkeypatch.setattr(cache, "_library_version", lambda library: "999.0")  # another transformers
    assert not plan_is_cached(config, tensors, SCHEME)
    plan_quantization(config, tensors, SCHEME)
    assert asked[-1] == "hf_transformers" and len(asked) == len(_variants(config, tensors)) + 2


def test_a_broken_entry_is_made_again(asked: list[str], tmp_path: Path) -> None:
    config, tensors = source("llama")
    first = plan_quantization(config, tensors, SCHEME)
    (entry,) = (tmp_path / "cache" / "plans").glob("*.json")
    for damage in ("", "{", json.dumps({"result": {"planner": "transformers"}}), json.dumps({"not_known": 3})):
        entry.write_text(damage)
        assert not plan_is_cached(config, tensors, SCHEME)
        _same(plan_quantization(config, tensors, SCHEME), first)
    assert len(asked) == 5
    assert plan_is_cached(config, tensors, SCHEME)  # written whole again


def test_an_unknown_model_is_an_answer_too_but_a_broken_library_is_not(
    asked: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tensors = source("llama")
    unknown = {**config, "architectures": ["NoSuchModelForCausalLM"], "model_type": "no-such-model"}
    first = plan_quantization(unknown, tensors, SCHEME)
    assert first.planner == "name-rules" and "does not know" in first.reason
    again = plan_quantization(unknown, tensors, SCHEME)
    assert asked == ["hf_transformers"]
    _same(first, again)

    def not_importable(*args: Any) -> Any:
        raise hf_transformers.NotImportable("transformers is not importable (broken)")

    monkeypatch.setattr(hf_transformers, "plan_modules", not_importable)
    other = {**config, "rms_norm_eps": 1e-3}
    assert plan_quantization(other, tensors, SCHEME).planner == "name-rules"
    assert not plan_is_cached(other, tensors, SCHEME)


def test_off_and_unwritable(asked: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config, tensors = source("gpt2")
    monkeypatch.setenv("BNB_PLAN_CACHE", "off")
    plan_quantization(config, tensors, SCHEME)
    plan_quantization(config, tensors, SCHEME)
    assert len(asked) == 2 and not (tmp_path / "cache").exists()
    monkeypatch.setenv("BNB_PLAN_CACHE", "on")
    (tmp_path / "cache").write_text("a file where the folder would go")
    plan_quantization(config, tensors, SCHEME)  # plans anyway
    assert len(asked) == 3 and not plan_is_cached(config, tensors, SCHEME)


def test_bnb_env_shows_the_planners_and_the_cache(tmp_path: Path) -> None:
    from helpers.bnb_process import run_bnb

    plans = tmp_path / "cache" / "plans"
    plans.mkdir(parents=True)
    for name in ("a", "b"):
        (plans / f"{name}.json").write_text("{}")
    on = {"BNB_CACHE_DIR": str(tmp_path / "cache"), "BNB_PLAN_CACHE": "on"}
    document = json.loads(run_bnb("env", "--json", env=on).stdout)
    assert document["plan_cache"] == {"folder": str(plans), "enabled": True, "plans": 2}
    assert document["planners"]["transformers"]  # installed for the tests
    table = " ".join(run_bnb("env", env=on).stdout.split())
    assert f"plan cache │ {plans} (2 plans)" in table
    off = json.loads(run_bnb("env", "--json", env={**on, "BNB_PLAN_CACHE": "off"}).stdout)
    assert off["plan_cache"]["enabled"] is False
