"""--keep-budget's pieces on their own: the budget's spelling, the exact costs, the skip entries that catch
other modules, and the knapsack against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from bnbcli.checkpoint.source import open_checkpoint
from bnbcli.errors import UsageError
from bnbcli.plan.budget import choose
from bnbcli.plan.budget.candidates import Candidate, candidates, catches, linear_bytes
from bnbcli.plan.budget.spec import KeepBudget, one_budget, parse_keep_budget, parse_target_size
from bnbcli.plan.planners.common import pattern_matches
from bnbcli.plan.quantize_layout import plan_quantize
from bnbcli.plan.scheme import QuantScheme

from helpers.golden import golden_dir

LLAMA = golden_dir() / "models" / "llama" / "src"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10%", KeepBudget(share=0.10)),
        ("0%", KeepBudget(share=0.0)),
        ("100%", KeepBudget(share=1.0)),
        ("2.5 %", KeepBudget(share=0.025)),
        ("600MB", KeepBudget(size=600 * 10**6)),
        ("1GiB", KeepBudget(size=2**30)),
    ],
)
def test_budget_spellings(text: str, expected: KeepBudget) -> None:
    assert parse_keep_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "said"),
    [("-5%", "negative"), ("-5MB", "negative"), ("150%", "over 100%"), ("abc", "cannot read"), ("10", "no unit")],
)
def test_bad_budgets_are_usage_errors(text: str, said: str) -> None:
    with pytest.raises(UsageError, match=said) as raised:
        parse_keep_budget(text)
    assert raised.value.hint


def test_allowance() -> None:
    assert KeepBudget(share=0.1).allowance(1000, 5000) == 100
    assert KeepBudget(share=0.1).allowance(1005, 5000) == 100  # rounded down: never over
    assert KeepBudget(size=77).allowance(1000, 5000) == 77
    assert parse_target_size("5200B").allowance(1000, 5000) == 200
    assert parse_target_size("5000B").allowance(1000, 5000) == 0
    with pytest.raises(UsageError, match="smaller than the smallest output") as raised:
        parse_target_size("4999B").allowance(1000, 5000)
    assert "--target-size 5000B" in raised.value.hint
    with pytest.raises(UsageError, match="both"):
        one_budget(KeepBudget(share=0.1), KeepBudget(target=5))


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme("nf4"), QuantScheme("nf4", double_quant=True), QuantScheme("fp4", blocksize=128), QuantScheme("int8")],
    ids=["nf4", "nf4-dq", "fp4-b128", "int8"],
)
def test_costs_are_the_plans_bytes(scheme: QuantScheme) -> None:
    """A module's cost is what its entries take in the plan with it kept minus with it quantized (the shortest
    nested_offset counted with double quant: an upper bound by exactly that margin)."""
    checkpoint = open_checkpoint(str(LLAMA))
    uniform = plan_quantize(checkpoint, scheme)
    found = candidates(uniform)
    assert len(found) == 14
    assert linear_bytes(found) == sum(c.job.source.nbytes for c in found)  # bf16 weights kept as they are
    for c in found[:3]:
        kept = plan_quantize(checkpoint, QuantScheme(**{**vars(scheme), "skip": (c.module,)}))
        grown = kept.bytes_out - uniform.bytes_out
        margin = (24 - 3) if scheme.double_quant else 0
        assert c.own_cost == grown + margin
        assert c.members == (c.module,)


def test_catches_is_transformers_matching() -> None:
    """The fast matcher agrees with pattern_matches (transformers' rule) on every pair, dots as wildcards
    and suffixes included."""
    names = [
        "model.layers.1.mlp.fc1",
        "model.layers.11.mlp.fc1",
        "model.layers.1.mlp.fc1x",
        "fc1",
        "mlp.fc1",
        "model.layers.1.mlp_fc1",
        "model_layers.1.mlp.fc1",
        "a.b",
        "aXb",
        "a.b.c",
        "x[0].y",
    ]
    found = catches(names)
    for pattern in names:
        expected = sorted(n for n in names if n != pattern and pattern_matches(n, pattern))
        assert sorted(found[pattern]) == expected, pattern


def _pool(values: list[float], costs: list[int]) -> tuple[list[choose.Item], dict[str, float]]:
    cands = [
        Candidate(f"m{i}", None, c + 100, 100, (f"m{i}",))  # type: ignore[arg-type]
        for i, c in enumerate(costs)
    ]
    scores = {f"m{i}": v for i, v in enumerate(values)}
    return choose.items(tuple(cands), scores), scores


def _optimum(values: list[float], costs: list[int], allowance: int) -> float:
    best = 0.0
    for r in range(len(values) + 1):
        for subset in itertools.combinations(range(len(values)), r):
            if sum(costs[i] for i in subset) <= allowance:
                best = max(best, sum(values[i] for i in subset))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_greedy_against_brute_force(seed: int) -> None:
    """Never over the allowance; at least half the optimum; the optimum never above the fractional bound."""
    rng = random.Random(seed)
    n = rng.randint(1, 11)
    values = [rng.random() for _ in range(n)]
    costs = [rng.randint(1, 50) for _ in range(n)]
    allowance = rng.randint(0, sum(costs) + 10)
    pool, scores = _pool(values, costs)
    solution = choose.greedy(pool, scores, allowance)
    optimum = _optimum(values, costs, allowance)
    assert solution.cost == sum(p.cost for p in solution.picked) <= allowance
    assert solution.value >= optimum / 2 - 1e-12
    assert solution.upper_bound is not None and optimum <= solution.upper_bound + 1e-12
    if allowance >= sum(costs):
        assert len(solution.picked) == n  # everything fits: everything is kept
    if allowance == 0:
        assert solution.picked == ()


def test_greedy_is_deterministic_on_ties() -> None:
    pool, scores = _pool([1.0] * 6, [10] * 6)
    first = choose.greedy(pool, scores, 30)
    assert [p.item.candidate.module for p in first.picked] == ["m0", "m1", "m2"]
    assert choose.greedy(list(reversed(pool)), scores, 30) == first


def test_zero_allowance_keeps_nothing_even_free_items() -> None:
    cand = Candidate("tiny", None, 10, 50, ("tiny",))  # type: ignore[arg-type]  # keeping it saves bytes
    pool = choose.items((cand,), {"tiny": 1.0})
    assert choose.greedy(pool, {"tiny": 1.0}, 0).picked == ()
    assert [p.item.candidate.module for p in choose.greedy(pool, {"tiny": 1.0}, 1).picked] == ["tiny"]


def test_a_catching_entry_is_one_item_with_what_it_catches() -> None:
    a = Candidate("mlp.fc1", None, 110, 10, ("mlp.fc1", "model.mlp.fc1"))  # type: ignore[arg-type]
    b = Candidate("model.mlp.fc1", None, 110, 10, ("model.mlp.fc1",))  # type: ignore[arg-type]
    scores = {"mlp.fc1": 1.0, "model.mlp.fc1": 1.0}
    pool = choose.items((a, b), scores)
    assert (pool[0].cost, pool[0].value) == (200, 2.0)
    solution = choose.greedy(pool, scores, 150)  # room for b alone, never for a (which keeps b too)
    assert [p.item.candidate.module for p in solution.picked] == ["model.mlp.fc1"]
    assert solution.upper_bound is None  # the fractional bound assumes disjoint items


def test_calibrated_score_is_the_expected_output_error_second_order(tmp_path) -> None:
    """--calibrate's score is ½·E[(g·ΔW·x)²]: twice the weight error gives four times the score, and the score
        of a small error is the KL divergence it really adds, within a factor 3 (16 draws in all: their noise, not
    the second order, sets the width; a wrong unit, as a mean over tokens for their sum, falls far outside)."""
    import torch
    import transformers

    from bnbcli.budget.calibrate import output_errors

    from helpers.eval_models import with_tokenizer

    src = with_tokenizer(golden_dir() / "models" / "llama" / "src", tmp_path / "src")
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    noise = {n: torch.randn(0) for n in names}

    def restore(scale: float):
        def with_error(module: str, weight: torch.Tensor) -> torch.Tensor:
            if noise[module].shape != weight.shape:
                noise[module] = torch.randn(weight.shape, generator=torch.Generator().manual_seed(len(module)))
            return weight + scale * 1e-3 * weight.abs().mean() * noise[module]

        return with_error

    texts = ["The ferry left the harbour late.", "A second text, about bread and the weather in spring."]
    once, twice = output_errors(src, names, restore(1.0), texts), output_errors(src, names, restore(2.0), texts)
    for n in names:
        assert twice[n] == pytest.approx(4 * once[n], rel=1e-4)

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    modules = dict(model.named_modules())
    for n in names:
        weight = modules[n].weight
        with torch.no_grad():
            kld = 0.0
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")
                base = torch.log_softmax(model(**ids).logits[0].double(), -1)
                original = weight.data.clone()
                weight.data.copy_(restore(1.0)(n, original))
                moved = torch.log_softmax(model(**ids).logits[0].double(), -1)
                weight.data.copy_(original)
                kld += float((base.exp() * (base - moved)).sum())
        assert kld / 3 < once[n] < 3 * kld, (n, once[n], kld)  # measured 0.66 and 0.78 of it
