"""The path gain of the weights-alone budget score (bnbcli/budget/paths.py): which modules pair, and the gain
against the exact formula and against what it stands for (the relative error of the pair's product)."""

from __future__ import annotations

import math

import pytest
import torch

from bnbcli.budget import paths
from bnbcli.budget.paths import Path, gain, path_gains, role


def exact_gain(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a.square().sum() * b.square().sum() / (a.shape[1] * (a @ b).square().sum()))


LLAMA = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
BERT = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.key",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.0.attention.output.dense",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.0.output.dense",
    "pooler.dense",
]


def test_llama_and_bert_names_pair_value_with_output_and_mlp_in_with_out() -> None:
    assert paths.paths(LLAMA)[:2] == [
        Path(
            "model.layers.0.self_attn.o_proj", ("model.layers.0.self_attn.v_proj",), "model.layers.0.self_attn.v_proj"
        ),
        Path(
            "model.layers.0.mlp.down_proj",
            ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"),
            "model.layers.0.mlp.up_proj",
        ),
    ]
    assert len(paths.paths(LLAMA)) == 4
    assert paths.paths(BERT) == [
        Path("encoder.layer.0.attention.output.dense", ("encoder.layer.0.attention.self.value",), BERT[2]),
        Path("encoder.layer.0.output.dense", ("encoder.layer.0.intermediate.dense",), BERT[4]),
    ]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None),  # through a softmax: gain 1
        ("transformer.h.0.attn.c_attn", None),  # fused QKV
        ("transformer.h.0.mlp.c_fc", paths.MLP_IN),  # GPT-2 (Conv1D)
        ("transformer.h.0.mlp.c_proj", paths.MLP_OUT),
        ("transformer.h.0.attn.c_proj", None),  # its value is inside c_attn
        ("encoder.block.0.layer.1.DenseReluDense.wo", paths.MLP_OUT),  # T5
        ("model.layers.0.block_sparse_moe.experts.3.w1", paths.MLP_GATE),  # Mixtral
        ("bert.encoder.layer.2.attention.output.dense", paths.ATTENTION_OUT),
        ("bert.encoder.layer.2.output.dense", paths.MLP_OUT),
        ("lm_head", None),
    ],
)
def test_roles(module: str, expected: str | None) -> None:
    assert role(module) == expected


def test_experts_pair_within_their_own_expert_and_ambiguous_blocks_do_not_pair() -> None:
    experts = [f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(3) for w in ("w1", "w2", "w3")]
    found = paths.paths(experts)
    assert [p.out for p in found] == [f"model.layers.0.block_sparse_moe.experts.{e}.w2" for e in range(3)]
    assert all(p.main.endswith(".w3") and p.inputs[1].endswith(".w1") for p in found)
    # a decoder layer with self- and cross-attention: two values in one block, neither paired
    bart = [f"model.decoder.layers.0.{a}.{m}" for a in ("self_attn", "encoder_attn") for m in ("v_proj", "out_proj")]
    assert paths.paths(bart) == []


def test_gain_is_the_formula_and_does_not_depend_on_the_machine_order() -> None:
    g = torch.Generator().manual_seed(0)
    for shape_a, shape_b in (((64, 48), (48, 80)), ((3000, 40), (40, 2100))):  # the second in several row blocks
        a, b = torch.randn(shape_a, generator=g), torch.randn(shape_b, generator=g)
        estimate = gain(a, b, None)
        assert estimate is not None
        assert math.isclose(estimate, exact_gain(a, b), rel_tol=0.3)  # PROBES random probes
        assert gain(a, b, None) == estimate  # seeded: the same weights give the same gain
    # a pair that cancels has a gain well above 1, one that is aligned below
    u = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    s = torch.linspace(1, 10, 64)
    a, b = u * s, (u * (1 / s)).t()  # a @ b = u u^T = I: the pair undoes its large directions
    assert gain(a, b, None) > 3
    a, b = u * s, (u * s).t()  # a @ b = u s^2 u^T: the large directions meet
    assert gain(a, b, None) < 0.8


def test_gain_is_what_a_white_error_does_to_the_product() -> None:
    """E‖A·ΔB‖²/‖A·B‖² = gain · ‖ΔB‖²/‖B‖² for a white ΔB: what the score stands for, checked by sampling."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(96, 64, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(0.2, 3, 64, dtype=torch.float64)
    )
    b = torch.randn(64, 80, generator=g, dtype=torch.float64)
    ratios = []
    for _ in range(200):
        noise = 0.01 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        product = (a @ noise).square().sum() / (a @ b).square().sum()
        ratios.append(float(product / (noise.square().sum() / b.square().sum())))
    assert math.isclose(sum(ratios) / len(ratios), exact_gain(a, b), rel_tol=0.03)


def test_grouped_query_values_are_repeated_per_head() -> None:
    g = torch.Generator().manual_seed(2)
    heads, groups, size, hidden = 8, 2, 16, 128
    o = torch.randn(hidden, heads * size, generator=g)
    v = torch.randn(groups * size, hidden, generator=g)
    repeated = v.view(groups, 1, size, hidden).expand(groups, heads // groups, size, hidden).reshape(-1, hidden)
    got = gain(o, v, size)
    assert got is not None and math.isclose(got, exact_gain(o, repeated), rel_tol=0.3)
    assert gain(o, v, None) is None  # the head size unknown: no gain, rather than a wrong one
    assert gain(o, v, 24) is None  # a head size that does not divide the values
    assert gain(torch.randn(8, 5), torch.randn(4, 8), None) is None  # shapes that do not chain


def test_path_gains_pair_by_name_and_leave_the_rest_out() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
    shapes |= {"gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}
    weights = {
        f"model.layers.0.{'mlp' if 'proj' in k and k[0] in 'gud' else 'self_attn'}.{k}": torch.randn(s, generator=g)
        for k, s in shapes.items()
    }
    read = []

    def weight(module: str) -> torch.Tensor:
        read.append(module)
        return weights[module]

    gains = path_gains(list(weights), weight, {"hidden_size": 32, "num_attention_heads": 4})
    prefix = "model.layers.0."
    assert set(gains) == {
        prefix + m for m in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert gains[prefix + "self_attn.o_proj"] == gains[prefix + "self_attn.v_proj"]
    assert gains[prefix + "mlp.down_proj"] == gains[prefix + "mlp.up_proj"] != gains[prefix + "mlp.gate_proj"]
    assert not any("q_proj" in m or "k_proj" in m for m in read)  # unpaired weights are not read again
