"""`bnb dequantize` as a command: shards kept or re-cut, diffusers pipelines, other files, --json and
--dry-run, and the error contract (exit code, one `error:` line and a hint, OUT never half-written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.bnb_inprocess import quantize
from helpers.bnb_process import run_main as bnb
from helpers.golden import golden_dir, tensor_bytes

MODELS = golden_dir() / "models"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_json_is_one_document_and_the_folder_is_complete(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = bnb(["dequantize", str(MODELS / "gpt2" / "int8"), str(out), "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["schema_version"] == 1 and document["dry_run"] is False
    (component,) = document["components"]
    assert component["dequantized_int8"] == 8 and component["dequantized_4bit"] == 0
    assert set(component["transposed"]) == {k for k in component["transposed"] if ".c_" in k}
    assert sorted(p.name for p in out.iterdir()) == [
        "bnb_manifest.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    assert manifest["settings"]["operation"] == "dequantize"
    assert (out / "generation_config.json").read_bytes() == (
        MODELS / "gpt2" / "int8" / "generation_config.json"
    ).read_bytes()
    # int8 weights come back in the model's dtype (config.json), as transformers' dequantize() does
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())


def test_dry_run_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    code, stdout, _ = bnb(["dequantize", str(MODELS / "llama" / "nf4-dq"), str(out), "--dry-run"], capsys, monkeypatch)
    assert code == 0 and not out.exists()
    assert "dequantize 4-bit" in stdout and "14 dequantized" in stdout


def test_dtype_casts_every_floating_tensor(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    code, _, stderr = bnb(
        ["dequantize", str(MODELS / "opt" / "nf4"), str(out), "--dtype", "fp16", "-q"], capsys, monkeypatch
    )
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in weights(out).values()} == {torch.float16}
    # 4-bit values: the quant_state dtype (bf16) first, then .to(float16), as transformers' dequantize() does
    default = tmp_path / "default"
    assert bnb(["dequantize", str(MODELS / "opt" / "nf4"), str(default), "-q"], capsys, monkeypatch)[0] == 0
    key = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(weights(out)[key], weights(default)[key].to(torch.float16))


def test_sharding_is_kept_or_recut(tmp_path: Path, capsys, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    sharded = tmp_path / "sharded"
    quantize(MODELS / "llama" / "src", sharded, "--scheme", "nf4", "--max-shard-size", "150KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    kept, recut = tmp_path / "kept", tmp_path / "recut"
    assert bnb(["dequantize", str(sharded), str(kept), "-q"], capsys, monkeypatch)[0] == 0
    assert sorted(p.name for p in kept.glob("model-*.safetensors")) == shards
    assert bnb(["dequantize", str(sharded), str(recut), "-q", "--max-shard-size", "10MB"], capsys, monkeypatch)[0] == 0
    assert sorted(p.name for p in recut.glob("*.safetensors")) == ["model.safetensors"]
    assert not (recut / "model.safetensors.index.json").exists()
    index = json.loads((kept / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights(kept))
    a, b = weights(kept), weights(recut)
    assert all(tensor_bytes(a[k]) == tensor_bytes(b[k]) for k in a)
    for folder in (kept, recut):
        _, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_diffusers_pipeline(tmp_path: Path, capsys, monkeypatch) -> None:
    """The quantized component comes back plain; the others are copied byte for byte."""
    pipe = tmp_path / "pipe"
    shutil.copytree(MODELS / "flux_tiny" / "nf4-dq", pipe / "transformer")
    shutil.copytree(MODELS / "llama" / "src", pipe / "text_encoder")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "FlowMatchEulerDiscreteScheduler"}')
    (pipe / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "x"]})
    )
    out = tmp_path / "out"
    code, stdout, stderr = bnb(["dequantize", str(pipe), str(out), "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    by_name = {c["name"]: c for c in json.loads(stdout)["components"]}
    assert by_name["text_encoder"]["copied_as_is"] and not by_name["transformer"]["copied_as_is"]
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors"):
        assert (out / rel).read_bytes() == (pipe / rel).read_bytes(), rel
    plain = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    source = load_file(MODELS / "flux_tiny" / "src" / "diffusion_pytorch_model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in plain.items()} == {k: (v.dtype, v.shape) for k, v in source.items()}
    assert "quantization_config" not in json.loads((out / "transformer" / "config.json").read_text())


def test_int8_without_weight_format(tmp_path: Path, capsys, monkeypatch) -> None:
    """Older transformers wrote no weight_format: the row layout is implied."""
    src = tmp_path / "src"
    shutil.copytree(MODELS / "llama" / "int8", src)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("weight_format")}, src / "model.safetensors")
    assert bnb(["dequantize", str(src), str(tmp_path / "a"), "-q"], capsys, monkeypatch)[0] == 0
    assert bnb(["dequantize", str(MODELS / "llama" / "int8"), str(tmp_path / "b"), "-q"], capsys, monkeypatch)[0] == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(tensor_bytes(a[k]) == tensor_bytes(b[k]) for k in b)


# --- errors ----------------------------------------------------------------------------------------


def _broken(tmp_path: Path, drop: str | None = None, config: dict | None = None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(MODELS / "llama" / "nf4", src)
    if drop is not None:
        tensors = load_file(src / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if k != drop}, src / "model.safetensors")
    if config is not None:
        document = json.loads((src / "config.json").read_text())
        document["quantization_config"] = config
        (src / "config.json").write_text(json.dumps(document))
    return src


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("plain", 1, ("not a bitsandbytes checkpoint",)),
        ("missing-quant-map", 1, ("quant_map",)),
        ("missing-quant-state", 1, ("belongs to no quantized weight",)),
        ("gptq", 1, ("'gptq'", "not bitsandbytes")),
        ("bad-dtype", 2, ("'int4'",)),
        ("out-exists", 1, ("already exists",)),
        ("out-inside-src", 2, ("overlaps the source",)),
        ("missing", 1, ("no such file or folder",)),
    ],
)
def test_errors(case: str, code: int, words: tuple[str, ...], tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    layer = "model.layers.0.mlp.up_proj.weight"
    src = {
        "plain": lambda: MODELS / "llama" / "src",
        "missing-quant-map": lambda: _broken(tmp_path, drop=f"{layer}.quant_map"),
        "missing-quant-state": lambda: _broken(tmp_path, drop=f"{layer}.quant_state.bitsandbytes__nf4"),
        "gptq": lambda: _broken(tmp_path, config={"quant_method": "gptq", "bits": 4}),
        "bad-dtype": lambda: MODELS / "llama" / "nf4",
        "out-exists": lambda: MODELS / "llama" / "nf4",
        "out-inside-src": lambda: _broken(tmp_path),
        "missing": lambda: tmp_path / "nope",
    }[case]()
    if case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "out-inside-src":
        out = src / "out"
    args = ["dequantize", str(src), str(out), *(["--dtype", "int4"] if case == "bad-dtype" else [])]
    result, stdout, stderr = bnb(args, capsys, monkeypatch)
    assert result == code, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.startswith("error:") and all(w in stderr for w in words), stderr
    if case == "out-exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and "--overwrite" in stderr
    elif case != "out-inside-src":
        assert not out.exists()
