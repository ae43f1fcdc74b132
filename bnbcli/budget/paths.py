"""How much the block a module works in amplifies its weight error: the path gain of the weights-alone score.

A module's relative round-trip error ‖ΔW‖²/‖W‖² is nearly the same for every nf4 weight, yet the output error
it causes is not, and part of the difference is what the module is multiplied with. An attention's value and
output projections act on a token only through their product O·V, an MLP's through Down·f(Up·x). For a
pair A·B (A: d×m after B: m×n) and a round-trip error that is white (uncorrelated, one variance: nearly what
the formats' error is), E‖A·ΔB‖² = ‖A‖²·‖ΔB‖²/m, so the product's relative error is the module's own times

    gain = ‖A‖²·‖B‖² / (m·‖A·B‖²)

1 for two unrelated random matrices; above 1 where the trained pair's product is smaller than chance (the
two partly cancel, and an error in either weighs more against what is left). An error in A gets the same
gain. ‖A·B‖² is estimated from PROBES seeded Gaussian vectors (the mean of ‖A·B·z‖²), so no m×n product is
formed: a pair costs PROBES matrix-vector products of each weight, in float64 (the same weights give the
same gain on any machine, to the last digits that could reorder two modules).

The pairs come from the modules' names (``role``): the value and output projections of one attention, and the
input (and gate) projections of one MLP with its output projection, each once in its block (the name up to
its last number: a layer, or an expert). Every other module has gain 1 and keeps its own relative error as
its score: the query and key (their error goes through a softmax, not a product), a fused QKV, a block with
two attentions, names this table does not know.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

PROBES = 32
ROW_BLOCK = 1024  # rows converted to float64 at a time: bounded memory whatever the weight's size

VALUE, ATTENTION_OUT, MLP_IN, MLP_GATE, MLP_OUT = "value", "attention output", "mlp input", "mlp gate", "mlp output"
# A name's last part, for the architectures transformers ships (Llama/Mistral/Qwen/Gemma, OPT/BART, T5,
# DistilBERT, GPT-J, GPT-NeoX's MLP, Mixtral's experts, GPT-2's MLP).
_LAST = {
    **dict.fromkeys(("v_proj", "value", "v", "v_lin"), VALUE),
    **dict.fromkeys(("o_proj", "out_proj", "o", "out_lin"), ATTENTION_OUT),
    **dict.fromkeys(("up_proj", "fc1", "fc_in", "wi", "wi_1", "w3", "c_fc", "lin1", "dense_h_to_4h"), MLP_IN),
    **dict.fromkeys(("gate_proj", "wi_0", "w1"), MLP_GATE),
    **dict.fromkeys(("down_proj", "fc2", "fc_out", "wo", "w2", "lin2", "dense_4h_to_h"), MLP_OUT),
}
# Names whose last part is ambiguous (BERT's "dense" and GPT-2's "c_proj"), by their last parts; the first match wins.
_TAILS = (
    ("attention.output.dense", ATTENTION_OUT),
    ("intermediate.dense", MLP_IN),
    ("output.dense", MLP_OUT),
    ("mlp.c_proj", MLP_OUT),
)


def role(module: str) -> str | None:
    """The part a module plays in its block, as far as the path gain is concerned (None: none)."""
    for tail, found in _TAILS:
        if module == tail or module.endswith("." + tail):
            return found
    return _LAST.get(module.rsplit(".", 1)[-1])


def block(module: str) -> str:
    """The module's block: its name up to its last number (a layer, an expert); "" without one."""
    parts = module.split(".")
    numbers = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbers[-1] + 1]) if numbers else ""


@dataclass(frozen=True)
class Path:
    out: str  # A: the module that reads the others' outputs
    inputs: tuple[str, ...]  # each B: the value projection, or an MLP's input and gate projections
    main: str  # the input whose gain ``out`` takes (the value; an MLP's input, not its gate)


def paths(modules: list[str]) -> list[Path]:
    """Every pair the names show, in the order of the modules."""
    blocks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module in modules:
        found = role(module)
        if found is not None:
            blocks[block(module)][found].append(module)
    out = []
    for roles in blocks.values():
        if len(roles[ATTENTION_OUT]) == 1 and len(roles[VALUE]) == 1:
            out.append(Path(roles[ATTENTION_OUT][0], (roles[VALUE][0],), roles[VALUE][0]))
        if len(roles[MLP_OUT]) == 1 and len(roles[MLP_IN]) == 1 and len(roles[MLP_GATE]) <= 1:
            main = roles[MLP_IN][0]
            out.append(Path(roles[MLP_OUT][0], (main, *roles[MLP_GATE]), main))
    return out


def head_dim(config: Mapping[str, Any] | None) -> int | None:
    """The attention's head size from config.json: what grouped-query attention repeats the values by."""
    if not config:
        return None
    if isinstance(config.get("head_dim"), int) and config["head_dim"] > 0:
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def _row_blocks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, t.shape[0], ROW_BLOCK):
        yield t[start : start + ROW_BLOCK].to(torch.float64)


def _energy(t: torch.Tensor) -> float:
    return sum(float(rows.square().sum()) for rows in _row_blocks(t))


def gain(a: torch.Tensor, b: torch.Tensor, head_size: int | None) -> float | None:
    """``gain`` of the pair a·b ([out, in] weights, a after b), or None when their shapes do not chain. When
    a reads more than b writes (grouped-query attention: O reads every head, V writes one per group of
    heads), b's rows are repeated head by head as the model repeats its values."""
    rows, inner = b.shape[0], a.shape[1]
    repeat = inner // rows if rows and inner % rows == 0 else 0
    if repeat == 0 or (repeat > 1 and (head_size is None or rows % head_size)):
        return None
    z = torch.randn(b.shape[1], PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.cat([part @ z for part in _row_blocks(b)])
    if repeat > 1:
        assert head_size is not None
        groups = rows // head_size
        y = y.view(groups, 1, head_size, PROBES).expand(groups, repeat, head_size, PROBES).reshape(inner, PROBES)
    product = sum(float((part @ y).square().sum()) for part in _row_blocks(a)) / PROBES
    if not product > 0:
        return None
    return _energy(a) * repeat * _energy(b) / (inner * product)


def path_gains(
    modules: list[str], weight: Callable[[str], torch.Tensor], config: Mapping[str, Any] | None
) -> dict[str, float]:
    """module → its path gain, for the modules the names pair (the others: 1); ``weight(module)`` reads a
    module's weight as the model holds it ([out, in]). A pair's weights are read together, one pair at a time."""
    head_size = head_dim(config)
    gains: dict[str, float] = {}
    for path in paths(modules):
        a = weight(path.out)
        for name in path.inputs:
            found = gain(a, weight(name), head_size)
            if found is not None:
                gains[name] = found
        if path.main in gains:
            gains[path.out] = gains[path.main]
    return gains
