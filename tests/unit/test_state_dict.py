"""The state-dict entries of a 4-bit weight: the exact keys, dtypes and shapes Linear4bit saves."""

from __future__ import annotations

import json

import pytest
import torch

import bnbcli

PREFIX = "model.layers.0.self_attn.q_proj.weight"


def test_entries_without_double_quant() -> None:
    x = torch.randn(96, 80, dtype=torch.bfloat16)
    entries = bnbcli.quantize_4bit(x, "nf4", 64).state_dict(PREFIX)
    assert list(entries) == [
        PREFIX,
        f"{PREFIX}.absmax",
        f"{PREFIX}.quant_map",
        f"{PREFIX}.quant_state.bitsandbytes__nf4",
    ]
    n = 96 * 80
    assert entries[PREFIX].dtype == torch.uint8 and entries[PREFIX].shape == (n // 2, 1)
    assert entries[f"{PREFIX}.absmax"].dtype == torch.float32 and entries[f"{PREFIX}.absmax"].shape == (n // 64,)
    assert entries[f"{PREFIX}.quant_map"].shape == (16,)
    packed_json = entries[f"{PREFIX}.quant_state.bitsandbytes__nf4"]
    assert packed_json.dtype == torch.uint8 and packed_json.dim() == 1
    text = bytes(packed_json.tolist()).decode()
    assert text == '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 80]}'


def test_entries_with_double_quant() -> None:
    x = torch.randn(300, 256, dtype=torch.float16)
    q = bnbcli.quantize_4bit(x, "fp4", 64, double_quant=True)
    entries = q.state_dict(PREFIX)
    assert list(entries) == [
        PREFIX,
        f"{PREFIX}.absmax",
        f"{PREFIX}.quant_map",
        f"{PREFIX}.nested_absmax",
        f"{PREFIX}.nested_quant_map",
        f"{PREFIX}.quant_state.bitsandbytes__fp4",
    ]
    nb = 300 * 256 // 64
    assert entries[f"{PREFIX}.absmax"].dtype == torch.uint8 and entries[f"{PREFIX}.absmax"].shape == (nb,)
    assert entries[f"{PREFIX}.nested_absmax"].shape == (-(-nb // 256),)
    assert entries[f"{PREFIX}.nested_quant_map"].shape == (256,)
    state = json.loads(bytes(entries[f"{PREFIX}.quant_state.bitsandbytes__fp4"].tolist()))
    assert list(state) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert state["nested_offset"] == q.nested_offset and state["nested_blocksize"] == 256
    # The offset round-trips through JSON to the same float32 bits.
    assert torch.tensor(state["nested_offset"], dtype=torch.float32).item() == q.nested_offset


def test_entries_are_separate_buffers() -> None:
    """safetensors refuses tensors that share storage."""
    q = bnbcli.quantize_4bit(torch.randn(64, 64), "nf4", 64, double_quant=True)
    pointers = [t.untyped_storage().data_ptr() for t in q.state_dict(PREFIX).values()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize(("storage", "rows"), [(torch.bfloat16, 64 * 48 // 4), (torch.float32, 64 * 48 // 8)])
def test_quant_storage_views_the_same_bytes(storage: torch.dtype, rows: int) -> None:
    x = torch.randn(64, 48, dtype=torch.bfloat16)
    plain = bnbcli.quantize_4bit(x, "nf4")
    stored = bnbcli.quantize_4bit(x, "nf4", quant_storage=storage)
    assert stored.packed.dtype == storage and stored.packed.shape == (rows, 1)
    assert torch.equal(stored.packed.view(torch.uint8).reshape(-1), plain.packed.reshape(-1))
    assert torch.equal(bnbcli.dequantize_4bit(stored), bnbcli.dequantize_4bit(plain))


def test_odd_sizes_and_odd_storage() -> None:
    """n = 3*7 = 21: 11 packed bytes; a 2-byte storage keeps 5 elements (the last byte is dropped)."""
    x = torch.randn(3, 7)
    q = bnbcli.quantize_4bit(x, "nf4", quant_storage=torch.float16)
    assert q.packed.shape == (5, 1)
    y = bnbcli.dequantize_4bit(q)
    assert y.shape == (3, 7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bnbcli.quantize_4bit(torch.randn(8), "nf5"), "quant_type"),
        (lambda: bnbcli.quantize_4bit(torch.randn(8), blocksize=48), "blocksize"),
        (lambda: bnbcli.quantize_blockwise8(torch.randn(8), blocksize=32), "blocksize"),
        (lambda: bnbcli.quantize_4bit(torch.ones(8, dtype=torch.int32)), "int32"),
        (lambda: bnbcli.quantize_4bit(torch.randn(8), backend="tpu"), "backend"),
        (lambda: bnbcli.quantize_4bit(torch.randn(8), backend="cuda"), "cuda"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(bnbcli.BnbError, match=message) as info:
        call()
    assert info.value.hint


@pytest.mark.parametrize("shape", [(96, 80), (3, 7), (5,), (2, 3, 64)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_4bit_layout_is_what_quantizing_writes(
    shape: tuple[int, ...], double_quant: bool, storage: torch.dtype
) -> None:
    """formats/layout.py sizes shards before any data is read: every entry's key, dtype and shape must be
    what quantizing gives (a double-quant quant_state's JSON at most as long as planned)."""
    from bnbcli.formats.dtypes import FLOAT16, DType
    from bnbcli.formats.layout import layout_4bit

    x = torch.randn(shape, dtype=torch.float16)
    entries = bnbcli.quantize_4bit(x, "fp4", 64, double_quant, storage).state_dict(PREFIX)
    layout = layout_4bit(shape, FLOAT16, "fp4", 64, double_quant, DType.of(storage))
    assert list(entries) == [e.key(PREFIX) for e in layout]
    for e in layout:
        got = entries[e.key(PREFIX)]
        assert got.dtype == e.dtype.torch_dtype, e
        if e.variable:
            assert got.dim() == 1 and got.numel() <= e.shape[0], e
        else:
            assert tuple(got.shape) == e.shape, e


def test_int8_layout_is_what_quantizing_writes() -> None:
    from bnbcli.formats.layout import layout_int8

    q = bnbcli.quantize_int8_rowwise(torch.randn(6, 40))
    cb, scb, weight_format = layout_int8((6, 40))
    assert (q.CB.dtype, tuple(q.CB.shape)) == (cb.dtype.torch_dtype, cb.shape)
    assert (q.SCB.dtype, tuple(q.SCB.shape)) == (scb.dtype.torch_dtype, scb.shape)
    assert [e.key(PREFIX) for e in (cb, scb, weight_format)] == [
        PREFIX,
        "model.layers.0.self_attn.q_proj.SCB",
        "model.layers.0.self_attn.q_proj.weight_format",
    ]
