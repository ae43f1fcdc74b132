"""The plan against what transformers/diffusers really did (golden models), and its config.json dict.

Oracles: a golden variant quantized a weight when it holds `<weight>.quant_state.bitsandbytes__*`
(4-bit) or `<module>.SCB` (int8); the packed quant_state JSON records the shape bitsandbytes saw,
which is [out, in], so it also shows which weights were transposed (Conv1D).
"""

from __future__ import annotations

import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from bnbcli.errors import InputError, UsageError
from bnbcli.formats.dtypes import BFLOAT16
from bnbcli.plan.decisions import QuantPlan, plan_quantization, quantization_config
from bnbcli.plan.planners.common import pattern_matches
from bnbcli.plan.scheme import QuantScheme, available_presets, load_preset, scheme_from_dict

from helpers.golden import golden_dir
from helpers.golden_plan import VARIANTS, checkpoint_file, header, source

MODELS = golden_dir() / "models"
pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason=f"no golden models at {MODELS}")

TRANSFORMERS_FAMILIES = ("llama", "qwen2_tied", "gpt2", "opt")
CASES = [(f, v) for f in TRANSFORMERS_FAMILIES for v in VARIANTS if v != "int8-skip-down" or f == "llama"]
CASES += [("flux_tiny", "nf4-dq"), ("flux_tiny", "int8")]


@cache
def golden_quantized(family: str, variant: str) -> dict[str, list[int] | None]:
    """Weight name → the shape recorded in its 4-bit quant_state (None for int8)."""
    path = checkpoint_file(MODELS / family / variant)
    entries = header(path)
    found: dict[str, list[int] | None] = {}
    for key in entries:
        if ".quant_state.bitsandbytes__" in key:
            found[key.split(".quant_state.")[0]] = _quant_state_shape(path, entries, key)
        elif key.endswith(".SCB"):
            found[key.removesuffix(".SCB") + ".weight"] = None
    return found


def _quant_state_shape(path: Path, entries: dict, key: str) -> list[int]:
    start, end = entries[key]["data_offsets"]
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length + start)
        return json.loads(f.read(end - start))["shape"]


@cache
def plan(family: str, variant: str, planner: str = "auto") -> QuantPlan:
    config, tensors = source(family)
    return plan_quantization(config, tensors, VARIANTS[variant], planner=planner)  # type: ignore[arg-type]


def _replaced_weights(model: torch.nn.Module, bnb: Any) -> set[str]:
    """The weights of the modules a library swapped for bitsandbytes layers."""
    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, layers)}


def _library_for(family: str) -> str:
    return "diffusers" if family == "flux_tiny" else "transformers"


# --- the plan equals what the libraries did ------------------------------------------------------


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_quantized_set_matches_golden(family: str, variant: str) -> None:
    pytest.importorskip(_library_for(family))
    p = plan(family, variant)
    assert p.planner == _library_for(family), p.reason
    golden = golden_quantized(family, variant)
    ours = set(p.quantized)
    if variant == "int8-skip-down":
        # transformers 5.17 quantized lm_head here: a user skip list REPLACES its defaults (#45674).
        # Ours adds to them, so lm_head stays 16-bit: exactly one difference.
        assert set(golden) - ours == {"lm_head.weight"}
        assert ours - set(golden) == set()
        assert p.decision("lm_head.weight").reason == "output embedding"
        assert p.decision("model.layers.0.mlp.down_proj.weight").reason == "skipped by --skip 'down_proj'"
        assert p.skip_modules == ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    else:
        assert ours == set(golden)
    # Conv1D (GPT-2) weights are stored [in, out]; bitsandbytes saw them as [out, in].
    _, tensors = source(family)
    for name in ours:
        d = p.decision(name)
        assert d.transpose == (family == "gpt2"), name
        recorded = golden[name]
        if recorded is not None:
            shape = list(tensors[name][0])
            assert recorded == (shape[::-1] if d.transpose else shape), name


def test_reasons_and_skip_modules() -> None:
    pytest.importorskip("transformers")
    llama = plan("llama", "nf4-dq")
    version = __import__("transformers").__version__
    assert llama.planner == "transformers"
    assert llama.reason.startswith("transformers' rules for LlamaForCausalLM, from bnb's planner table")
    config, tensors = source("llama")
    real = plan_quantization(config, tensors, VARIANTS["nf4-dq"], planner="transformers")
    assert real.reason == f"transformers {version} built LlamaForCausalLM on the meta device"
    assert dict(real.decisions) == dict(llama.decisions) and real.skip_modules == llama.skip_modules
    assert llama.skip_modules == ("lm_head",)
    assert list(llama.decisions) == list(source("llama")[1])  # every tensor, in checkpoint order
    assert llama.decision("model.norm.weight").reason == "norm"
    assert llama.decision("model.embed_tokens.weight").reason == "not a Linear (Embedding)"
    assert llama.decision("model.layers.0.mlp.down_proj.weight").reason == "Linear"
    # Tied output layer: no tensor in the checkpoint, but the Linear exists and goes on the list.
    assert plan("qwen2_tied", "nf4").skip_modules == ("lm_head",)
    assert "lm_head.weight" not in source("qwen2_tied")[1]
    gpt2 = plan("gpt2", "nf4")
    assert gpt2.decision("transformer.h.0.attn.c_attn.weight").reason == "Conv1D (transposed to [out, in])"
    assert gpt2.decision("transformer.h.0.attn.c_attn.bias").reason == "bias"
    assert plan("opt", "int8").decision("model.decoder.layers.0.fc1.bias").action == "keep"


def test_flux_quantizes_every_linear_including_the_last() -> None:
    pytest.importorskip("diffusers")
    p = plan("flux_tiny", "nf4-dq")
    assert p.decision("proj_out.weight").action == "quantize"  # diffusers has no last-module rule
    assert p.skip_modules == ()
    assert p.quantization_config()["bnb_4bit_compute_dtype"] == "bfloat16"  # no dtype in config: the weights'


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_explicit_skip_list_reloads_to_the_same_decisions(family: str) -> None:
    """transformers' own quantizer, reading our config.json dict, replaces exactly our modules."""
    pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    import transformers
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    from bnbcli.plan.planners.hf_transformers import quiet

    config, _ = source(family)
    for variant in ("nf4-dq", "int8-skip-down") if family == "llama" else ("nf4-dq", "int8"):
        p = plan(family, variant)
        cls = getattr(transformers, config["architectures"][0])
        with quiet(), torch.device("meta"):
            model = cls._from_config(cls.config_class.from_dict(config))
        bnb_config = BitsAndBytesConfig.from_dict(p.quantization_config())
        quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=True)
        with quiet():
            quantizer.preprocess_model(model, device_map={"": "cpu"})
        replaced = _replaced_weights(model, bnb)
        assert replaced == set(p.quantized), (family, variant)


def test_diffusers_explicit_skip_list_reloads_to_the_same_decisions() -> None:
    pytest.importorskip("diffusers")
    bnb = pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig as DiffusersBnbConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from bnbcli.plan.planners.hf_diffusers import quiet, resolve_class

    config, tensors = source("flux_tiny")
    p = plan_quantization(config, tensors, QuantScheme(method="nf4", skip=("proj_out",)))
    assert set(p.skip_modules) == {"proj_out", "single_transformer_blocks.0.proj_out"}
    cls, _ = resolve_class(config)
    with quiet(), torch.device("meta"):
        model = cls.from_config(config)
    qc = DiffusersBnbConfig.from_dict(p.quantization_config())
    with quiet():
        model = replace_with_bnb_linear(model, modules_to_not_convert=list(p.skip_modules), quantization_config=qc)
    replaced = _replaced_weights(model, bnb)
    assert replaced == set(p.quantized)


# --- name rules -----------------------------------------------------------------------------------

# What the heuristic gets wrong on the golden families, stated rather than hidden: nothing.
NAME_RULES_DISAGREEMENTS: dict[str, set[str]] = {
    "llama": set(),
    "qwen2_tied": set(),
    "gpt2": set(),
    "opt": set(),
    "flux_tiny": set(),
}


@pytest.mark.parametrize("family", [*TRANSFORMERS_FAMILIES, "flux_tiny"])
def test_name_rules_agree_with_the_library_planner(family: str) -> None:
    pytest.importorskip(_library_for(family))
    variant = "nf4-dq"
    library, heuristic = plan(family, variant), plan(family, variant, "name-rules")
    assert heuristic.planner == "name-rules" and heuristic.reason.startswith("name rules")
    disagreements = set(library.quantized) ^ set(heuristic.quantized)
    assert disagreements == NAME_RULES_DISAGREEMENTS[family], f"{family}: name rules differ on {sorted(disagreements)}"
    for name in heuristic.quantized:
        assert heuristic.decision(name).transpose == library.decision(name).transpose, name
    # Every Linear the library keeps is on the heuristic's list too (plus embeddings, harmlessly).
    assert set(library.skip_modules) <= set(heuristic.skip_modules)


def test_name_rules_without_config_or_libraries() -> None:
    _, tensors = source("llama")
    p = plan_quantization(None, tensors, QuantScheme())
    assert p.planner == "name-rules" and "there is no config.json" in p.reason
    assert p.decision("lm_head.weight").action == "keep"
    assert p.decision("model.embed_tokens.weight").reason == "not a Linear (embedding, by name)"
    unknown = {"architectures": ["NoSuchModelForCausalLM"], "model_type": "no-such-model"}
    p = plan_quantization(unknown, tensors, QuantScheme())
    assert p.planner == "name-rules"
    assert "does not know" in p.reason or "not importable" in p.reason, p.reason


# --- the checkpoint must match config.json ---------------------------------------------------------


def test_missing_quantizable_weight_is_an_input_error() -> None:
    pytest.importorskip("transformers")
    config, tensors = source("llama")
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        plan_quantization(config, broken, QuantScheme())


def test_contradicting_shape_is_an_input_error() -> None:
    pytest.importorskip("transformers")
    config, tensors = source("llama")
    broken = dict(tensors)
    broken["model.layers.0.self_attn.q_proj.weight"] = ((64, 128), BFLOAT16)
    with pytest.raises(InputError, match=r"a shape that contradicts config\.json") as err:
        plan_quantization(config, broken, QuantScheme())
    assert "model.layers.0.self_attn.q_proj.weight" in err.value.message


def test_prefixless_checkpoint_maps_through_base_model_prefix() -> None:
    """Old GPT-2 checkpoints have no "transformer." prefix; transformers adds it when loading."""
    pytest.importorskip("transformers")
    config, tensors = source("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    p = plan_quantization(config, bare, QuantScheme())
    assert set(p.quantized) == {k.removeprefix("transformer.") for k in plan("gpt2", "nf4").quantized}
    assert p.decision("h.0.attn.c_attn.weight").module == "transformer.h.0.attn.c_attn"


def test_already_quantized_and_forced_planners() -> None:
    config, tensors = source("llama")
    with pytest.raises(InputError, match="already quantized"):
        plan_quantization({**config, "quantization_config": {"load_in_4bit": True}}, tensors, QuantScheme())
    with pytest.raises(UsageError):
        plan_quantization(config, tensors, QuantScheme(), planner="diffusers")
    with pytest.raises(UsageError):
        plan_quantization(None, tensors, QuantScheme(), planner="transformers")


def test_wide_quant_storage_must_divide_the_weight() -> None:
    odd = {"layers.0.proj.weight": ((3, 6), BFLOAT16)}  # 9 packed bytes
    with pytest.raises(UsageError, match="not a multiple of 2"):
        plan_quantization(None, odd, QuantScheme(quant_storage=torch.bfloat16), planner="name-rules")
    assert plan_quantization(None, odd, QuantScheme(), planner="name-rules").quantized == ("layers.0.proj.weight",)


# --- skip patterns ---------------------------------------------------------------------------------


def test_pattern_matches_is_transformers_should_convert_module() -> None:
    pytest.importorskip("transformers")
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "lm_head",
        "model.up_gate",
        "transformer.h.0.mlp.c_proj",
        "model.layers.1",
    ]
    patterns = ["down_proj", "model.layers.1", "layers.*", "gate", "lm_head", "mlp.c", r"model\.layers\.1\d"]
    for name in names:
        for pattern in patterns:
            assert pattern_matches(name, pattern) == (not should_convert_module(name, [pattern])), (name, pattern)


# --- quantization_config -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantization_config_is_what_bitsandbytesconfig_writes(variant: str) -> None:
    pytest.importorskip("transformers")
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    scheme = VARIANTS[variant]
    skip = ["lm_head", "model.layers.0.mlp.down_proj"]
    ours = quantization_config(scheme, tuple(skip), BFLOAT16)
    kwargs: dict = {"llm_int8_skip_modules": skip, "llm_int8_threshold": scheme.threshold}
    if scheme.is_4bit:
        kwargs |= {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": scheme.method,
            "bnb_4bit_use_double_quant": scheme.double_quant,
            "bnb_4bit_compute_dtype": (scheme.compute_dtype or BFLOAT16).torch_dtype,
            "bnb_4bit_quant_storage": scheme.quant_storage.torch_dtype,
        }
    else:
        kwargs["load_in_8bit"] = True
    expected = BitsAndBytesConfig(**kwargs).to_dict()
    assert json.dumps(ours) == json.dumps(expected, sort_keys=True)
    parsed = AutoQuantizationConfig.from_dict(json.loads(json.dumps(ours)))
    assert parsed.to_dict() == expected


def test_quantization_config_matches_golden_config_json() -> None:
    """The golden nf4-dq config.json (skip list null there; ours is explicit)."""
    written = json.loads((MODELS / "llama" / "nf4-dq" / "config.json").read_text())["quantization_config"]
    ours = quantization_config(VARIANTS["nf4-dq"], ("lm_head",), BFLOAT16)
    assert list(ours) == list(written)
    assert {**ours, "llm_int8_skip_modules": None} == written


def test_compute_dtype_defaults_to_the_model_dtype() -> None:
    config, tensors = source("llama")
    p = plan_quantization(config, tensors, QuantScheme(), planner="name-rules")
    assert p.model_dtype == BFLOAT16
    assert p.quantization_config()["bnb_4bit_compute_dtype"] == "bfloat16"
    cast = plan_quantization(config, tensors, QuantScheme(dtype=torch.float16), planner="name-rules")
    assert cast.quantization_config()["bnb_4bit_compute_dtype"] == "float16"
    int8 = plan_quantization(config, tensors, QuantScheme(method="int8"), planner="name-rules")
    assert int8.quantization_config()["bnb_4bit_compute_dtype"] == "float32"


# --- scheme and presets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocksize": 100}, "blocksize 100"),
        ({"method": "nf3"}, "unknown method"),
        ({"method": "int8", "double_quant": True}, "double_quant"),
        ({"quant_storage": torch.complex64}, "quant_storage"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"threshold": -1.0}, "threshold"),
        ({"skip": ("(",)}, "regular expression"),
        ({"skip": ("",)}, "non-empty"),
    ],
)
def test_scheme_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        QuantScheme(**kwargs)
    assert err.value.hint or "regular expression" in message or "empty" in message


def test_presets_load_and_describe_the_golden_variants() -> None:
    assert set(available_presets()) >= {"nf4-dq", "nf4", "fp4", "fp4-dq", "int8"}
    nf4_dq = scheme_from_dict(load_preset("nf4-dq"))
    assert (nf4_dq.method, nf4_dq.double_quant, nf4_dq.blocksize, nf4_dq.compute_dtype) == ("nf4", True, 64, None)
    assert scheme_from_dict(load_preset("int8")) == QuantScheme(method="int8")
    assert scheme_from_dict(load_preset("fp4")).method == "fp4"
    assert scheme_from_dict({"skip": ["down_proj"], "threshold": 6}).skip == ("down_proj",)


def test_preset_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown preset 'nf5'") as err:
        load_preset("nf5")
    assert "nf4-dq" in (err.value.hint or "")
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "nf4"\nblock_size = 64\n')
    with pytest.raises(UsageError, match="unknown setting 'block_size'"):
        load_preset(bad)
    bad.write_text('compute_dtype = "int4"\n')
    with pytest.raises(UsageError, match="compute_dtype 'int4'"):
        load_preset(bad)
    bad.write_text("method = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_preset(bad)


def test_skip_list_entries_that_catch_other_modules_on_reload_keep_them_too() -> None:
    """transformers also matches llm_int8_skip_modules by suffix: "lm_head" catches "vision.lm_head"."""
    from bnbcli.plan.planners.common import ModuleVerdict, settle_skip_list

    verdicts = {
        "lm_head": ModuleVerdict("lm_head", False, "output embedding"),
        "vision.lm_head": ModuleVerdict("vision.lm_head", True, "Linear"),
        "vision.proj": ModuleVerdict("vision.proj", True, "Linear"),
    }
    skip = settle_skip_list(verdicts, lambda name, entries: not any(pattern_matches(name, e) for e in entries))
    assert skip == ("lm_head", "vision.lm_head")
    assert verdicts["vision.lm_head"].reason == "llm_int8_skip_modules entry 'lm_head' matches it on reload"
    assert verdicts["vision.proj"].quantize


def test_unmatched_skip_patterns_are_reported() -> None:
    config, tensors = source("llama")
    p = plan_quantization(config, tensors, QuantScheme(skip=("down_proj", "down_prj")), planner="name-rules")
    assert p.unmatched_skip == ("down_prj",)
    doc = p.to_json_dict()
    assert json.loads(json.dumps(doc))["skip_modules"] == list(p.skip_modules)
    assert doc["tensors"][0].keys() == {"name", "action", "reason", "transpose", "module"}
