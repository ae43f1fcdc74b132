"""What --keep-budget writes loads with a plain `from_pretrained(OUT)`, and equals what transformers makes of
the source with the same explicit skip list: `from_pretrained(SRC, quantization_config=BitsAndBytesConfig(...,
llm_int8_skip_modules=LIST))`, LIST being OUT's config.json list.

On the CPU, bitsandbytes' own 4-bit quantization writes other bytes than its CUDA kernels (which ours
reproduce), so the CPU test compares what a budget decides: which modules are quantized and which kept, every
module's class, and the kept modules' weights (and every other unquantized tensor) byte for byte. The GPU test
compares the whole loaded state byte for byte, quantized weights and quant states included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.bnb_inprocess import quantize
from helpers.golden import golden_dir, tensor_bytes
from helpers.model_state import assert_same_state, module_state, state_dict_bytes

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

MODELS = golden_dir() / "models"
FAMILIES = ["llama", "qwen2_tied", "gpt2", "opt"]
SCHEMES = {"nf4": ["--scheme", "nf4"], "nf4-dq": ["--config", "nf4-dq"], "int8": ["--scheme", "int8"]}
QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def load_pair(family: str, out: Path, **placed) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(from_pretrained(OUT), from_pretrained(SRC, quantization_config=the same config), the skip list)."""
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, **placed).eval()
    config = transformers.BitsAndBytesConfig.from_dict(dict(q))
    assert config.llm_int8_skip_modules == q["llm_int8_skip_modules"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        MODELS / family / "src", quantization_config=config, **placed
    ).eval()
    return ours, theirs, q["llm_int8_skip_modules"]


def classes(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m).__qualname__ for name, m in model.named_modules()}


def unquantized_tensors(model: torch.nn.Module) -> dict[str, tuple]:
    """Every parameter and buffer outside the quantized layers: (dtype, shape, bytes)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            continue
        for pname, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            t = p.detach().cpu()
            out[f"{name}.{pname}"] = (str(t.dtype), tuple(t.shape), tensor_bytes(t))
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_transformers_quantizes_with_the_same_list(family: str, scheme: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize(MODELS / family / "src", out, *SCHEMES[scheme], "--keep-budget", "30%")
    ours, theirs, skip = load_pair(family, out)
    kept = json.loads((out / "bnb_manifest.json").read_text())["keep_budget"]["kept"]
    assert kept and {k["module"] for k in kept} <= set(skip)
    assert classes(ours) == classes(theirs)
    for k in kept:  # a kept module is a plain Linear (Conv1D for gpt2) in both
        assert not isinstance(ours.get_submodule(k["module"]), QUANTIZED)
    assert any(isinstance(m, QUANTIZED) for m in ours.modules())
    assert unquantized_tensors(ours) == unquantized_tensors(theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_state_is_byte_for_byte_transformers(family: str, scheme: str, tmp_path: Path) -> None:
    """On the GPU bitsandbytes quantizes with the CUDA kernels that bnb's bytes reproduce: the whole loaded
    state, quantized weights and quant states included, is equal."""
    out = tmp_path / "out"
    quantize(MODELS / family / "src", out, *SCHEMES[scheme], "--keep-budget", "30%")
    ours, theirs, _ = load_pair(family, out, device_map={"": "cuda:0"})
    assert_same_state(module_state(ours), module_state(theirs), "modules")
    assert_same_state(state_dict_bytes(ours), state_dict_bytes(theirs), "state_dict")
