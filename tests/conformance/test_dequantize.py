"""`bnb dequantize`: bit-exact values (golden kernel sha256s, through a checkpoint), the golden
checkpoints back to plain models transformers/diffusers load, and the NF4 round trip's fixed point.

The oracle for values is the golden `dequant_sha256` of every 4-bit and int8 kernel case (bitsandbytes'
CUDA kernels). The loaded-model tests add bitsandbytes' own CPU `dequantize()` (through transformers) as
a second witness: it agrees everywhere except FP4's code 8, which the CUDA kernel decodes to -0.0 and the
CPU path, reading quant_map, to +0.0.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bnbcli.pipeline.dequantize import DequantizeRequest, dequantize, plan_request

from helpers.bnb_inprocess import quantize
from helpers.golden import VARIANT_FLAGS, golden_dir, golden_variants, kernel_cases, kernel_outputs, tensor_bytes

MODELS = golden_dir() / "models"
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def run_dequantize(src: Path, out: Path, **kwargs) -> dict:
    request = DequantizeRequest(src=str(src), out=out, backend=kwargs.pop("backend", "cpu"), **kwargs)
    return dequantize(request, plan_request(request), lambda n: None).manifest


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# --- golden kernel cases, as checkpoints -----------------------------------------------------------


def _four_bit_checkpoint(path: Path) -> dict[str, str]:
    """Every golden quantize_4bit case as one quantized weight "<i>.weight" (keys as Linear4bit saves them)."""
    outputs = kernel_outputs()
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, str] = {}
    for i, case in enumerate(c for c in kernel_cases()["cases"] if c["op"] == "quantize_4bit"):
        state = json.loads(case["quant_state_json"])
        weight = f"case{i}.weight"
        tensors[weight] = outputs[case["packed"]].clone()
        for part in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if part in case:
                tensors[f"{weight}.{part}"] = outputs[case[part]].clone()
        raw = torch.frombuffer(bytearray(case["quant_state_json"].encode()), dtype=torch.uint8)
        tensors[f"{weight}.quant_state.bitsandbytes__{state['quant_type']}"] = raw
        expected[weight] = case["dequant_sha256"]
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return expected


def _int8_checkpoint(path: Path) -> dict[str, str]:
    outputs = kernel_outputs()
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, str] = {}
    for i, case in enumerate(c for c in kernel_cases()["cases"] if c["op"] == "int8_vectorwise_quant"):
        tensors[f"case{i}.weight"] = outputs[case["CB"]].clone()
        tensors[f"case{i}.SCB"] = outputs[case["SCB"]].clone()
        tensors[f"case{i}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
        expected[f"case{i}.weight"] = case["dequant_sha256"]
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_dequant_sha256_through_a_checkpoint(backend: str, tmp_path: Path) -> None:
    """All 384 4-bit and 22 int8 golden cases: the written tensors hash to bitsandbytes' CUDA dequant."""
    four = _four_bit_checkpoint(tmp_path / "q4")
    int8 = _int8_checkpoint(tmp_path / "q8")
    run_dequantize(tmp_path / "q4", tmp_path / "d4", backend=backend)
    # int8_vectorwise_dequant returns float32 (transformers casts it to the model's dtype afterwards)
    run_dequantize(tmp_path / "q8", tmp_path / "d8", backend=backend, dtype=torch.float32)
    for expected, out in ((four, tmp_path / "d4"), (int8, tmp_path / "d8")):
        got = weights(out)
        assert set(got) == set(expected)
        wrong = [k for k, sha in expected.items() if hashlib.sha256(tensor_bytes(got[k])).hexdigest() != sha]
        assert not wrong, f"{len(wrong)} of {len(expected)} cases differ, e.g. {wrong[:3]}"


# --- golden models back to plain ones ----------------------------------------------------------------


def _causal_lm(folder: Path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)


@pytest.mark.parametrize(("family", "variant"), [v for v in golden_variants() if v[0] != "flux_tiny"], ids=str)
def test_golden_variant_loads_as_a_plain_model(family: str, variant: str, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "plain"
    manifest = run_dequantize(MODELS / family / variant, out)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((MODELS / family / "src" / "config.json").read_text())
    assert "quantization_config" not in config
    assert {k: v for k, v in config.items() if k != "transformers_version"} == {
        k: v for k, v in source_config.items() if k != "transformers_version"
    }
    model, info = _causal_lm(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(model, "hf_quantizer", None) is None
    ours = weights(out)
    source = load_file(MODELS / family / "src" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in source.items()}
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())

    # Second witness: transformers' model.dequantize() on bitsandbytes' CPU path, in [out, in].
    quantized, _ = _causal_lm(MODELS / family / variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = quantized.dequantize().state_dict()
    transposed = {t["name"] for c in manifest["components"] for t in c["tensors"] if t["transposed"]}
    for key, value in ours.items():
        theirs = reference[key].t() if key in transposed else reference[key]
        if variant.startswith("fp4"):  # the CPU path decodes FP4 code 8 as +0.0 (quant_map), CUDA as -0.0
            assert torch.equal(value, theirs), key  # equal as values: -0.0 == +0.0
            same_bits = torch.equal(value.view(torch.int16), theirs.contiguous().view(torch.int16))
            assert same_bits or bool(((value == 0) | (value.view(torch.int16) == theirs.view(torch.int16))).all())
        else:
            assert tensor_bytes(value) == tensor_bytes(theirs.contiguous()), key


def test_flux_variants_load_as_plain_diffusers_models(tmp_path: Path) -> None:
    """diffusers loads the plain result on the CPU (it refuses only bitsandbytes checkpoints there)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    source = load_file(MODELS / "flux_tiny" / "src" / "diffusion_pytorch_model.safetensors")
    for variant in ("nf4-dq", "int8"):
        out = tmp_path / variant
        run_dequantize(MODELS / "flux_tiny" / variant, out)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = diffusers.FluxTransformer2DModel.from_pretrained(
                out, torch_dtype=torch.bfloat16, output_loading_info=True
            )
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        ours = weights(out)
        assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in source.items()}
        quantized = load_file(MODELS / "flux_tiny" / variant / "diffusion_pytorch_model.safetensors")
        key = "transformer_blocks.0.ff.net.0.proj.weight"
        if variant == "int8":
            reference = F.int8_vectorwise_dequant(quantized[key], quantized[key.replace("weight", "SCB")])
            assert torch.equal(ours[key], reference.to(torch.bfloat16))
        assert model.state_dict()[key].dtype == torch.bfloat16


# --- the round trip ---------------------------------------------------------------------------------


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack((b >> 4, b & 15), dim=1).reshape(-1)


@pytest.mark.parametrize(("family", "scheme"), [("gpt2", "nf4"), ("llama", "fp4")])  # gpt2: Conv1D, transposed
def test_quantize_dequantize_quantize_is_a_fixed_point(family: str, scheme: str, tmp_path: Path) -> None:
    """NF4 without double quant: Q(D(Q(x))) == Q(x) byte for byte (so adapters merged into D re-quantize to
    the same base). FP4: the CUDA dequantizer turns code 8 (a tiny negative) into -0.0, which quantizes to
    code 0 (+0.0): the first round changes exactly those nibbles, 8 -> 0 (equal values), and from then on
    it is a fixed point. With double quant there is none: the rebuilt absmax is not the stored one."""
    flags = ["--scheme", scheme, "--no-double-quant"]
    quantize(MODELS / family / "src", tmp_path / "q1", *flags)
    run_dequantize(tmp_path / "q1", tmp_path / "d1")
    quantize(tmp_path / "d1", tmp_path / "q2", *flags)
    first, second = (tmp_path / "q1" / "model.safetensors"), (tmp_path / "q2" / "model.safetensors")
    if scheme == "nf4":
        assert first.read_bytes() == second.read_bytes()
        return
    q1, q2 = load_file(first), load_file(second)
    changed = 0
    for key, value in q1.items():
        if tensor_bytes(value) == tensor_bytes(q2[key]):
            continue
        a, b = _nibbles(value), _nibbles(q2[key])
        moved = a != b
        assert bool((a[moved] == 8).all() and (b[moved] == 0).all()), key
        changed += int(moved.sum())
    assert changed > 0  # real weights do hit code 8
    run_dequantize(tmp_path / "q2", tmp_path / "d2")
    quantize(tmp_path / "d2", tmp_path / "q3", *flags)
    assert second.read_bytes() == (tmp_path / "q3" / "model.safetensors").read_bytes()


def test_round_trip_variants_are_the_golden_ones(tmp_path: Path) -> None:
    """The golden nf4 checkpoint (transformers + CUDA) is itself a fixed point of dequantize -> bnb quantize."""
    run_dequantize(MODELS / "llama" / "nf4", tmp_path / "d")
    quantize(tmp_path / "d", tmp_path / "q", *VARIANT_FLAGS["nf4"])
    ours, golden = weights(tmp_path / "q"), weights(MODELS / "llama" / "nf4")
    assert set(ours) == set(golden)
    assert all(tensor_bytes(ours[k]) == tensor_bytes(golden[k]) for k in golden)


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "variant"), [("gpt2", "nf4-dq"), ("llama", "fp4-dq"), ("opt", "int8")])
def test_backends_write_the_same_checkpoint(family: str, variant: str, tmp_path: Path) -> None:
    """The cuda backend (bnbcli/backends/cuda.py through bnbcli.api) writes the CPU reference's bytes."""
    for backend in ("cpu", "cuda"):
        run_dequantize(MODELS / family / variant, tmp_path / backend, backend=backend)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (
        tmp_path / "cuda" / "model.safetensors"
    ).read_bytes()
