"""Every golden kernel case (bitsandbytes 0.50.2 CUDA, H100): every recorded output, byte for byte.

One test per case id of golden/kernels/cases.json and backend: cpu everywhere, cuda (marked gpu,
skipped without a GPU and CuPy) with the same body: the CPU input goes through bnbcli's API with
backend="cuda", so the kernels run on the GPU and the results come back to the CPU. Every output is
compared with the golden record of bitsandbytes' output (dtype, shape, sha256 of the bytes; tests/helpers/golden.py).
"""

from __future__ import annotations

import pytest
import torch

import bnbcli

from helpers.golden import assert_matches, assert_same_tensor, kernel_cases, kernel_inputs, sha256_of

CASES = kernel_cases()["cases"]


BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _check_dequant(case: dict, dequantized: torch.Tensor) -> None:
    assert str(dequantized.dtype) == case["dequant_dtype"]
    if "dequant" in case:
        assert_matches(dequantized, case["dequant"], "dequant")
    assert sha256_of(dequantized) == case["dequant_sha256"], "sha256 of the dequantized output"


def _check_4bit(case: dict, x: torch.Tensor, backend: str) -> None:
    q = bnbcli.quantize_4bit(x, case["quant_type"], case["blocksize"], case["double_quant"], backend=backend)
    assert_matches(q.packed, case["packed"], "packed")
    assert_matches(q.absmax, case["absmax"], "absmax")
    assert_matches(q.quant_map, case["quant_map"], "quant_map")
    if case["double_quant"]:
        assert_matches(q.nested_absmax, case["nested_absmax"], "nested_absmax")
        assert_matches(q.nested_quant_map, case["nested_quant_map"], "nested_quant_map")
        # Same float32 bits, not merely close: the offset is re-parsed from the JSON on load.
        assert q.nested_offset == case["nested_offset"], "nested_offset"
    else:
        assert q.nested_absmax is None and q.nested_offset is None
    assert q.quant_state_json() == case["quant_state_json"]
    _check_dequant(case, bnbcli.dequantize_4bit(q, backend=backend))


def _check_blockwise8(case: dict, x: torch.Tensor, backend: str) -> None:
    q = bnbcli.quantize_blockwise8(x, case["blocksize"], case["nested"], backend=backend)
    assert_matches(q.q, case["q"], "q")
    assert_matches(q.absmax, case["absmax"], "absmax")
    assert_matches(q.code, case["code"], "code")
    if case["nested"]:
        assert_matches(q.nested_absmax, case["nested_absmax"], "nested_absmax")
        assert q.nested_offset == case["nested_offset"], "nested_offset"
        assert q.blocksize == case["nested_blocksize"]
    _check_dequant(case, bnbcli.dequantize_blockwise8(q, backend=backend))


def _check_int8(case: dict, x: torch.Tensor, backend: str) -> None:
    q = bnbcli.quantize_int8_rowwise(x, case.get("threshold", 0.0), backend=backend)
    assert_matches(q.CB, case["CB"], "CB")
    assert_matches(q.SCB, case["SCB"], "SCB")
    if case["op"] == "Int8Params":
        return
    if case["outlier_cols"] is None:
        assert q.outlier_cols is None
    else:
        assert q.outlier_cols is not None and q.outlier_cols.tolist() == case["outlier_cols"], "outlier_cols"
    _check_dequant(case, bnbcli.dequantize_int8_rowwise(q.CB, q.SCB, backend=backend))


CHECKS = {
    "quantize_4bit": _check_4bit,
    "quantize_blockwise": _check_blockwise8,
    "int8_vectorwise_quant": _check_int8,
    "Int8Params": _check_int8,
}


def test_every_op_is_known() -> None:
    assert {c["op"] for c in CASES} <= set(CHECKS)
    assert not [c["id"] for c in CASES if "error" in c], "error cases need their own check"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_case(case: dict, backend: str) -> None:
    x = kernel_inputs()["in." + case["input"]]
    CHECKS[case["op"]](case, x, backend)


def test_code_tables_match_bitsandbytes() -> None:
    golden = kernel_cases()
    from bnbcli.formats.codes import DYNAMIC_CODE, FP4_CODE, NF4_CODE

    for ours, key in ((NF4_CODE, "nf4_code"), (FP4_CODE, "fp4_code"), (DYNAMIC_CODE, "dynamic_signed_code")):
        theirs = torch.tensor(golden[key], dtype=torch.float32)
        assert_same_tensor(torch.from_numpy(ours.copy()), theirs, key)
