"""`bnb eval` as CI scripts run it: one JSON document, gates and exit codes, the HTML report, one
`error:` + `hint:` pair for each kind of bad input (nothing written), and the memory plan measured as the
peak RSS of the real command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.bnb_inprocess import Ran, bnb_in_one_process
from helpers.bnb_process import EXIT_FAILED, EXIT_USAGE, HANG_SECONDS, run_bnb
from helpers.eval_models import golden_pair, tokenizer, with_tokenizer
from helpers.golden import golden_dir
from helpers.peak_rss import peak_rss

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

SHORT = ("--context", "64", "--max-tokens", "200", "--device", "cpu")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """gpt2's golden int8 checkpoint and its source (int8 runs on every CPU)."""
    return golden_pair(tmp_path_factory.mktemp("gpt2"), "gpt2", "int8")


def _one_error(stderr: str) -> tuple[str, str]:
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    assert "Traceback" not in stderr
    return lines[0], lines[1]


def test_json_is_one_document_and_passing_gates_exit_0(gpt2, tmp_path: Path) -> None:
    quant, orig = gpt2
    done = run_bnb(
        "eval", str(quant), "--against", str(orig), *SHORT, "--json",
        "--max-kld", "100", "--min-top1", "0", "--max-ppl-ratio", "100", "--min-cosine", "-1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    document = json.loads(done.stdout)  # the whole of stdout is one document
    assert document["schema_version"] == 1 and document["kind"] == "causal"
    assert document["gates"] == {
        "limits": {"max_kld": 100.0, "min_top1": 0.0, "max_ppl_ratio": 100.0, "min_cosine": -1.0},
        "passed": True,
        "failures": [],
    }
    causal = document["causal"]
    assert causal["tokens"] == 200 - document["texts"]["sequences"]
    assert 0 < causal["kld"]["value"] <= causal["kld"]["max"]
    assert {"ppl_q", "ppl_base", "ratio", "ln_ratio", "difference", "correlation"} <= set(causal["perplexity"])
    assert [layer["name"] for layer in document["layers"]] == ["transformer.h.0", "transformer.h.1"]


def test_failed_gates_exit_1_and_name_each_gate(gpt2, tmp_path: Path) -> None:
    quant, orig = gpt2
    report = tmp_path / "eval.html"
    done = run_bnb(
        "eval", str(quant), "--against", str(orig), *SHORT,
        "--max-kld", "0", "--min-top1", "1", "--max-ppl-ratio", "100", "--report", str(report),
    )  # fmt: skip
    assert done.returncode == EXIT_FAILED
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("fail: mean KLD: --max-kld 0 failed: ")
    assert lines[1].startswith("fail: same top-1: --min-top1 1 failed: ")
    assert lines[2] == "error: 2 gates failed: --max-kld, --min-top1" and lines[3].startswith("hint: ")
    assert len(lines) == 4
    assert "verdict: " in done.stdout and "gates: 2 failed" in done.stdout
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 2 and "<script" not in html
    assert "transformer.h.1" in html and "--max-kld" in html


def test_quiet_prints_nothing_and_a_text_file_is_read(gpt2, tmp_path: Path) -> None:
    quant, orig = gpt2
    texts = tmp_path / "texts.txt"
    texts.write_text("The ferry left the harbour late.\nSELECT name FROM users WHERE id = 7;\n", encoding="utf-8")
    done = run_bnb("eval", str(quant), "--against", str(orig), "--text-file", str(texts), "--device", "cpu", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    done = run_bnb("eval", str(quant), "--against", str(orig), "--text-file", str(texts), "--device", "cpu", "--json")
    assert json.loads(done.stdout)["texts"] | {"tokens": 0} == {
        "source": str(texts), "texts": 2, "sequences": 2, "tokens": 0, "context": None, "max_tokens": None,
    }  # fmt: skip


def _different_llama(folder: Path) -> Path:
    """A Llama with the golden llama's layer names but another hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


_CASES = [
    ("not quantized", EXIT_FAILED, "is not quantized"),
    ("another architecture", EXIT_FAILED, "is not QUANT's source: it is llama"),
    ("other shapes", EXIT_FAILED, "is not QUANT's source: lm_head.weight is [512, 64] there and [512, 128] in QUANT"),
    ("no tokenizer", EXIT_FAILED, "no tokenizer beside QUANT or ORIG"),
    ("texts too long", EXIT_FAILED, "longer than the model's context (128)"),
    ("context too long", EXIT_USAGE, "--context 4096 is longer than the model's context (128 tokens)"),
    ("no manifest", EXIT_USAGE, "has no bnb_manifest.json that names its source"),
    ("bad gate", EXIT_USAGE, "--min-top1 must be a number between 0 and 1"),
    ("bad top-k", EXIT_USAGE, "--top-k many: a number of tokens, or all"),
    ("report folder", EXIT_FAILED, "cannot write it"),
]
# One case of each exit code runs as a `bnb` process of its own (what a CI script sees); the others one after
# the other in one interpreter, each with the process's stdout and stderr to itself (bnb_in_one_process), so
# that transformers is imported once instead of once a case.
_IN_A_PROCESS = {"not quantized", "bad gate"}


def _bad_input_args(case: str, quant: Path, orig: Path, folder: Path) -> list[str]:
    models = golden_dir() / "models"
    if case == "other shapes":
        llama_quant, _ = golden_pair(folder / "pair", "llama", "int8")
        return [str(llama_quant), "--against", str(_different_llama(folder / "other"))]
    return {
        "not quantized": [str(orig), "--against", str(orig)],
        "another architecture": [str(quant), "--against", str(with_tokenizer(models / "llama" / "src", folder / "l"))],
        "no tokenizer": [str(models / "llama" / "int8"), "--against", str(models / "llama" / "src")],
        "texts too long": [str(quant), "--against", str(orig), "--device", "cpu"],
        "context too long": [str(quant), "--against", str(orig), "--context", "4096"],
        "no manifest": [str(quant)],
        "bad gate": [str(quant), "--against", str(orig), "--min-top1", "1.5"],
        "bad top-k": [str(quant), "--against", str(orig), "--top-k", "many"],
        "report folder": [str(quant), "--against", str(orig), "--report", str(folder / "missing" / "r.html")],
    }[case]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def bad_inputs(gpt2, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Ran, list[str], list[str]]]:
    """Each case's `bnb eval` run, with its folder's listing before and after the run."""
    quant, orig = gpt2
    root = tmp_path_factory.mktemp("bad-input")
    folders = {case: root / f"case{i}" for i, (case, _, _) in enumerate(_CASES)}
    for folder in folders.values():
        folder.mkdir()
    args = {case: ("eval", *_bad_input_args(case, quant, orig, folder)) for case, folder in folders.items()}
    before = {case: _listing(folder) for case, folder in folders.items()}
    shared = [case for case in folders if case not in _IN_A_PROCESS]
    ran = dict(zip(shared, bnb_in_one_process([args[case] for case in shared], {}, root / "runs.json"), strict=True))
    for case in _IN_A_PROCESS:
        done = run_bnb(*args[case])
        ran[case] = Ran(args[case], done.returncode, done.stdout, done.stderr)
    return {case: (ran[case], before[case], _listing(folder)) for case, folder in folders.items()}


@pytest.mark.parametrize(("case", "code", "says"), _CASES)
def test_bad_input_is_one_error_and_one_hint(bad_inputs, case: str, code: int, says: str) -> None:
    ran, before, after = bad_inputs[case]
    assert ran.code == code, ran
    error, _ = _one_error(ran.stderr)
    assert says in error
    assert ran.stdout == ""
    assert after == before  # nothing written


def test_causal_gates_on_an_encoder_are_a_usage_error() -> None:
    from bnbcli.errors import UsageError
    from bnbcli.eval.gates import EvalGates

    EvalGates(min_cosine=0.9).check_model(causal=False)
    with pytest.raises(UsageError, match="--max-kld, --max-ppl-ratio need a causal LM"):
        EvalGates(max_kld=0.1, max_ppl_ratio=1.1, min_cosine=0.9).check_model(causal=False)


# --- the memory plan ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A float32 Llama whose untied embeddings and LM head (kept unquantized: 2 × 65.5 MB) are nearly all
    of both checkpoints; QUANT is its int8 checkpoint (runs on every CPU). Returns (QUANT, ORIG, kept bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256,
    )  # fmt: skip
    orig = root / "orig"
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(orig)
    tokenizer().save_pretrained(orig)
    quant = root / "int8"
    done = run_bnb("quantize", str(orig), str(quant), "--scheme", "int8", "-q", timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stderr
    return quant, orig, 2 * 32000 * 512 * 4


def test_one_at_a_time_never_holds_both_models(wide_vocab, tmp_path: Path) -> None:
    quant, _, kept = wide_vocab
    args = ("eval", str(quant), "--device", "cpu", "--context", "64", "--max-tokens", "128", "--json")
    both_peak, both = peak_rss(tmp_path / "both", *args, "--max-memory", "64GB")
    one_peak, one = peak_rss(tmp_path / "one", *args, "--max-memory", "300MB")
    assert both["memory"]["side_by_side"] is True
    assert one["memory"]["side_by_side"] is False and one["memory"]["top_k"] == 1024
    assert one["memory"]["needed_side_by_side"] > one["memory"]["available"] == 300 * 10**6
    # Side by side, both models' kept tensors (kept bytes each) are resident at once; one at a time never.
    assert both_peak - one_peak > kept / 2 * 0.8, (both_peak, one_peak, kept)
    assert one["causal"]["same_top1"] == both["causal"]["same_top1"]
