"""`bnb footprint` against its oracles: the golden get_memory_footprint() values, the files `bnb quantize`
really writes, and models that transformers/diffusers really load — for the golden families and for
families it was never shown (derived from the libraries' rules, not from tables)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bnbcli.footprint import FootprintRequest, footprint, make_schemes
from bnbcli.footprint.schemes import FootprintScheme
from bnbcli.formats.layout import MAX_FLOAT_REPR
from bnbcli.plan.scheme import QuantScheme

from helpers.bnb_inprocess import quantize
from helpers.golden import VARIANT_FLAGS, golden_dir, golden_variants

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

MODELS = golden_dir() / "models"
GOLDEN_FOOTPRINT = json.loads((MODELS / "logits_meta.json").read_text())

# The golden variants' BitsAndBytesConfig as `bnb quantize` schemes (test_quantize_golden.VARIANT_FLAGS).
VARIANT_SCHEMES = {
    "nf4-dq": QuantScheme("nf4", double_quant=True),
    "nf4": QuantScheme("nf4"),
    "fp4-dq": QuantScheme("fp4", double_quant=True, compute_dtype=torch.float32),
    "nf4-storage-bf16": QuantScheme("nf4", quant_storage=torch.bfloat16, compute_dtype=torch.float32),
    "int8": QuantScheme("int8"),
    "int8-skip-down": QuantScheme("int8", skip=("down_proj", "fc2", "c_proj")),
}


def variant_report(folder: Path, names: tuple[str, ...]) -> dict[str, dict]:
    schemes = tuple(FootprintScheme(n, "bnb", VARIANT_SCHEMES[n]) for n in names)
    report = footprint(FootprintRequest(str(folder), schemes=schemes))
    return {s.scheme.name: s.as_dict() for s in report.schemes}


def written_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def offset_digits_saved(folder: Path) -> int:
    """Bytes a double-quantized checkpoint saves against the longest possible nested_offset reprs."""
    saved = 0
    for path in folder.rglob("*.safetensors"):
        for key, value in load_file(path).items():
            if ".quant_state.bitsandbytes__" in key:
                state = json.loads(value.numpy().tobytes())
                if "nested_offset" in state:
                    saved += MAX_FLOAT_REPR - len(repr(state["nested_offset"]))
    return saved


def _after_forward_biases(model: torch.nn.Module) -> None:
    """What Linear4bit.forward does to a bias on its first call (bitsandbytes nn/modules.py): cast it, in
    place, to the compute dtype. A CPU forward cannot run these 344-wide layers, so it is done directly."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.bias is not None:
            module.bias.data = module.bias.data.to(module.compute_dtype)


def _load(folder: Path, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


# --- golden families -------------------------------------------------------------------------------

FAMILIES = sorted({f for f, _ in golden_variants()})


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_footprints_and_written_bytes(family: str, tmp_path: Path) -> None:
    """Per variant: get_memory_footprint() == the golden value (transformers families), and the files are
    the bytes `bnb quantize` writes: exactly, or with double quant exactly but for each nested_offset's
    decimal digits (the bound minus what the written offsets saved, to the byte)."""
    variants = tuple(v for f, v in golden_variants() if f == family)
    predicted = variant_report(MODELS / family / "src", variants)
    for variant in variants:
        p = predicted[variant]
        out = tmp_path / variant
        quantize(MODELS / family / "src", out, *VARIANT_FLAGS[variant])
        written = written_bytes(out)
        if VARIANT_SCHEMES[variant].double_quant:
            assert p["file_bytes_min"] <= written <= p["file_bytes"]
            assert p["file_bytes"] - written == offset_digits_saved(out), variant
        else:
            assert p["file_bytes"] == p["file_bytes_min"] == written, variant
        golden = GOLDEN_FOOTPRINT.get(f"{family}/{variant}/footprint")
        if golden is None:
            continue  # flux_tiny: diffusers' footprint has no golden value; test_footprint_diffusers checks it
        if variant == "int8-skip-down":
            # transformers let the user's list replace its default skips and quantized lm_head (int8); bnb
            # quantize adds them, so lm_head stays bf16: 1 more byte per element (test_quantize_golden)
            lm_head = load_file(MODELS / family / "src" / "model.safetensors")["lm_head.weight"].numel()
            golden += lm_head
        assert p["get_memory_footprint"] == golden, variant
        assert p["exact"]
        if family in ("llama", "opt", "gpt2"):  # right after loading, on this CPU (qwen2_tied: same rules)
            model = _load(out)
            assert p["get_memory_footprint_at_load"] == model.get_memory_footprint(), variant
            _after_forward_biases(model)
            assert p["get_memory_footprint"] == model.get_memory_footprint(), variant


# --- families never shown --------------------------------------------------------------------------

UNSEEN = {
    # biases everywhere (lm_head too), partial rotary, a final LayerNorm
    "phi": ("PhiForCausalLM", {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 64}, torch.bfloat16),
    # fp16 with _keep_in_fp32_modules ("wo" loads in float32), tied embeddings, encoder-decoder
    "t5": ("T5ForConditionalGeneration", {"d_model": 64, "d_ff": 96, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "d_kv": 16, "vocab_size": 300}, torch.float16),
    # grouped KV heads, untied, bias-free, three norms per layer
    "gemma": ("GemmaForCausalLM", {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300,
              "max_position_embeddings": 64}, torch.bfloat16),
}  # fmt: skip


def _unseen_model(model_type: str, root: Path) -> Path:
    arch, kwargs, dtype = UNSEEN[model_type]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [arch]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch)(config).to(dtype)
    model.save_pretrained(root / model_type)
    return root / model_type


def _load_any(folder: Path, **kwargs) -> torch.nn.Module:
    config = json.loads((folder / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, config["architectures"][0]).from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("model_type", sorted(UNSEEN))
def test_unseen_families(model_type: str, tmp_path: Path) -> None:
    src = _unseen_model(model_type, tmp_path)
    flags = {
        "nf4-dq": ["--scheme", "nf4", "--double-quant", "--compute-dtype", "float32"],
        "int8": ["--scheme", "int8"],
    }
    schemes = (
        FootprintScheme("nf4-dq", "bnb", QuantScheme("nf4", double_quant=True, compute_dtype=torch.float32)),
        FootprintScheme("int8", "bnb", QuantScheme("int8")),
        *make_schemes(("stored", "fp8")),
    )
    report = {s.scheme.name: s.as_dict() for s in footprint(FootprintRequest(str(src), schemes=schemes)).schemes}
    for name, args in flags.items():
        out = tmp_path / name
        quantize(src, out, *args)
        p = report[name]
        assert p["file_bytes_min"] <= written_bytes(out) <= p["file_bytes"]
        assert p["file_bytes"] - written_bytes(out) == offset_digits_saved(out)
        model = _load_any(out)
        assert p["get_memory_footprint_at_load"] == model.get_memory_footprint(), name
        _after_forward_biases(model)
        assert p["get_memory_footprint"] == model.get_memory_footprint(), name
    plain = _load_any(src)
    assert report["stored"]["get_memory_footprint"] == plain.get_memory_footprint()
    assert report["stored"]["file_bytes"] == written_bytes(src)
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(plain, storage_dtype=torch.float8_e4m3fn, compute_dtype=plain.dtype)
    assert report["fp8"]["get_memory_footprint"] == plain.get_memory_footprint()


def test_footprint_diffusers(tmp_path: Path) -> None:
    """flux_tiny as stored and with layerwise casting, against diffusers' own loaded model (CPU)."""
    diffusers = pytest.importorskip("diffusers")
    report = footprint(FootprintRequest(str(MODELS / "flux_tiny" / "src"), schemes=make_schemes(("stored", "fp8"))))
    stored, fp8 = (s.as_dict() for s in report.schemes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            MODELS / "flux_tiny" / "src", torch_dtype=torch.bfloat16
        )
    assert stored["get_memory_footprint"] == model.get_memory_footprint()
    assert stored["components"][0]["planner"] == "diffusers" and stored["runtime"]["kv_cache"] == 0
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert fp8["get_memory_footprint"] == model.get_memory_footprint()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["nf4-dq", "int8"])
def test_footprint_diffusers_quantized_on_gpu(variant: str) -> None:
    """diffusers loads bitsandbytes checkpoints on a GPU only; there the golden flux variants must match."""
    diffusers = pytest.importorskip("diffusers")
    (p,) = variant_report(MODELS / "flux_tiny" / "src", (variant,)).values()
    model = diffusers.FluxTransformer2DModel.from_pretrained(MODELS / "flux_tiny" / variant, torch_dtype=torch.bfloat16)
    assert p["get_memory_footprint_at_load"] == model.get_memory_footprint()
