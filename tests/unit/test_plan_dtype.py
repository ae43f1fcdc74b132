"""The one rule for a model's dtype (bnbcli/plan/dtype.py) and the verbs that use it: quantize (its
bnb_4bit_compute_dtype), dequantize (int8 weights come back in it) and footprint (the load dtype)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from bnbcli.formats.dtypes import BFLOAT16 as BF16
from bnbcli.formats.dtypes import BY_NAME
from bnbcli.formats.dtypes import FLOAT16 as FP16
from bnbcli.formats.dtypes import FLOAT32 as FP32
from bnbcli.plan.dtype import config_dtype, model_dtype


@pytest.mark.parametrize(
    ("config", "dtypes", "override", "expected"),
    [
        ({"dtype": "bfloat16"}, [FP32, FP32], None, BF16),  # config.json first (v5's key)
        ({"torch_dtype": "float16"}, [BF16], None, FP16),  # v4's key
        ({"dtype": "int8"}, [BF16], None, BF16),  # not a dtype a model is quantized from: the tensors decide
        ({"dtype": 3}, [FP16], None, FP16),
        (None, [FP32, BF16, BF16, FP32, BF16], None, BF16),  # the most common: mixed fp32 norms, bf16 weights
        (None, [FP32, BF16, BF16, FP32], None, FP32),  # a tie: the one met first
        (None, [BF16, FP32, FP32, BF16], None, BF16),
        (
            None,
            [BY_NAME["int8"], BY_NAME["uint8"], BY_NAME["float64"]],
            None,
            FP32,
        ),  # no float16/bfloat16/float32 tensor
        (None, [], None, FP32),
        ({"dtype": "bfloat16"}, [BF16], FP16, FP16),  # --dtype over everything
    ],
)
def test_the_rule(config, dtypes, override, expected) -> None:
    assert model_dtype(config, dtypes, override) == expected


def test_config_dtype_reads_either_key() -> None:
    assert config_dtype({"dtype": "float32", "torch_dtype": "float16"}) == FP32
    assert config_dtype({}) is None and config_dtype(None) is None


def _tied_checkpoint(folder: Path) -> Path:
    """A Llama checkpoint whose tensors tie: as many float32 tensors as bfloat16 ones, float32 met first in
    key order, and no dtype in config.json."""
    from helpers.fuzz_harness import LLAMA_CONFIG, llama_tensors

    tensors = llama_tensors(0)
    names = sorted(tensors)
    for i, name in enumerate(names):
        tensors[name] = tensors[name].to((FP32 if i < len(names) // 2 else BF16).torch_dtype)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({k: v for k, v in LLAMA_CONFIG.items() if "dtype" not in k}))
    return folder


def test_quantize_dequantize_and_footprint_agree_on_a_tied_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from bnbcli.cli.app import app
    from bnbcli.footprint import FootprintRequest, footprint, make_schemes

    src = _tied_checkpoint(tmp_path / "src")
    run = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--scheme", "int8", "-q"])
    assert run.exit_code == 0, run.output
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    decided = written["dtype"]  # the rule's answer (the tie goes by checkpoint order), named for from_pretrained
    assert decided in ("float32", "bfloat16")
    report = footprint(FootprintRequest(str(src), schemes=make_schemes(("int8",)))).as_dict()
    assert {c["load_dtype"] for s in report["schemes"] for c in s["components"]} == {decided}
    back = CliRunner().invoke(app, ["dequantize", str(tmp_path / "q"), str(tmp_path / "d"), "-q"])
    assert back.exit_code == 0, back.output
    int8_weight = load_file(tmp_path / "d" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert str(int8_weight.dtype).removeprefix("torch.") == decided


def test_a_dtype_this_torch_lacks_is_refused_as_input(monkeypatch) -> None:
    import torch

    from bnbcli.errors import InputError
    from bnbcli.formats.dtypes import BY_CODE

    assert BY_CODE["F8_E8M0"].torch_dtype is torch.float8_e8m0fnu
    monkeypatch.delattr(torch, "float8_e8m0fnu")  # as torch before 2.7 has it
    with pytest.raises(InputError, match="F8_E8M0 tensor needs a torch with float8_e8m0fnu"):
        _ = BY_CODE["F8_E8M0"].torch_dtype
