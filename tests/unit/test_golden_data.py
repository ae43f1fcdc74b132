"""The project's copy of the oracle (tests/data/golden): complete, as vendored, and rebuilt byte for byte.

Everything the other tests compare against comes from here (tests/helpers/golden.py): if these fail, read their
message first.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.golden import (
    VENDORED,
    assert_matches,
    build_errors,
    golden_dir,
    kernel_cases,
    kernel_outputs,
    output_records,
)

PROVENANCE = json.loads((VENDORED / "PROVENANCE.json").read_text())
OUTPUT_FIELDS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "q", "code", "CB", "SCB")


def sha256_file(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vendored_files_are_the_golden_files_they_name() -> None:
    """Each file copied as bytes has the golden file's sha256; each record describes a file of that sha256."""
    assert PROVENANCE["files"], "PROVENANCE.json lists no file"
    for entry in PROVENANCE["files"]:
        path = VENDORED / entry["path"]
        if entry["stored"] == "bytes":
            assert sha256_file(path) == entry["sha256"], entry["path"]
        else:
            record = json.loads(path.with_suffix(".safetensors.json").read_text())
            assert (record["sha256"], record["size"]) == (entry["sha256"], entry["size"]), entry["path"]


def test_golden_set_is_rebuilt_byte_for_byte() -> None:
    """Every golden file exists in golden_dir() with the golden sha256: rebuilt from bnb's own output, whose
    every tensor matched its record, or the full set named by BNB_GOLDEN_DIR."""
    assert build_errors() == []
    for entry in PROVENANCE["files"]:
        assert sha256_file(golden_dir() / entry["path"]) == entry["sha256"], entry["path"]


def test_every_recorded_output_is_checked_by_a_case() -> None:
    named = {case[f] for case in kernel_cases()["cases"] for f in (*OUTPUT_FIELDS, "dequant") if f in case}
    assert named == set(output_records())


def test_one_flipped_bit_fails_and_says_where() -> None:
    case = next(c for c in kernel_cases()["cases"] if c["op"] == "quantize_4bit" and "dequant" in c)
    packed = kernel_outputs()[case["packed"]].clone()
    assert_matches(packed, case["packed"], "packed")
    packed.view(-1)[7] ^= 1
    with pytest.raises(AssertionError, match=rf"{case['packed']} \(packed\): 1 of {packed.numel()} .* first at 7"):
        assert_matches(packed, case["packed"], "packed")
    with pytest.raises(AssertionError, match="shape"):
        assert_matches(packed[1:], case["packed"], "packed")
    with pytest.raises(AssertionError, match="dtype"):
        assert_matches(packed.to(torch.int16), case["packed"], "packed")


@pytest.mark.skipif(bool(os.environ.get("BNB_GOLDEN_DIR")), reason="a full set named by BNB_GOLDEN_DIR is not rebuilt")
def test_a_rebuilt_set_is_not_kept_when_bnb_gets_a_tensor_wrong(tmp_path, monkeypatch) -> None:
    """The rebuild writes a tensor only when its sha256 is the record's: a wrong byte from bnb leaves the
    file out and says which tensor, instead of a wrong "golden" file."""
    from helpers import golden

    real = golden._kernel_case_outputs

    def one_wrong(case, x):
        outputs = real(case, x)
        if case["id"] == "q4.randn_tail_bf16.nf4.bs32.dq0":
            outputs[case["absmax"]] = outputs[case["absmax"]] * 2
        return outputs

    monkeypatch.setattr(golden, "_kernel_case_outputs", one_wrong)
    monkeypatch.setattr(golden, "golden_variants", lambda: [("llama", "nf4")])
    errors = golden._build(tmp_path / "set")
    assert errors == ["kernel output q4.randn_tail_bf16.nf4.bs32.dq0.absmax: bytes differ (sha256)"]
    written = load_file(tmp_path / "set" / "kernels" / "outputs.safetensors")
    assert "q4.randn_tail_bf16.nf4.bs32.dq0.absmax" not in written
    assert "q4.randn_tail_bf16.nf4.bs32.dq0.packed" in written
    assert (tmp_path / "set" / "models" / "llama" / "nf4" / "model.safetensors").is_file()
