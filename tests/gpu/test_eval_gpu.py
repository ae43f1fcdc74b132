"""`bnb eval --device cuda` on the golden causal models (GPU suite: skipped cleanly without a GPU): every
4-bit and int8 variant runs there with bitsandbytes' CUDA kernels, and each statistic equals the
independent computation of tests/helpers/eval_models.py on the same GPU; one at a time with the whole vocabulary
gives the side-by-side figures; the CLI's --json names the GPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from helpers.bnb_process import run_bnb
from helpers.eval_models import GOLDEN_CAUSAL, golden_pair, independent

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from bnbcli.eval.run import EvalRequest, evaluate, prepare

CONTEXT, MAX_TOKENS = 64, 640
VARIANTS = ("nf4-dq", "nf4", "fp4-dq", "int8")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", GOLDEN_CAUSAL)
def test_eval_on_the_gpu_equals_an_independent_computation(tmp_path, family: str, variant: str) -> None:
    quant, orig = golden_pair(tmp_path, family, variant)
    prepared = prepare(EvalRequest(str(quant), str(orig), context=CONTEXT, max_tokens=MAX_TOKENS, device="cuda"))
    assert prepared.device.type == "cuda" and prepared.plan.side_by_side
    report = evaluate(prepared)
    assert report.device.startswith("cuda")
    theirs = independent(quant, orig, prepared.sequences.ids, device=str(prepared.device))
    c = report.causal
    assert c is not None and c.tokens == theirs.kld.size
    np.testing.assert_allclose(c.kld_values, theirs.kld, rtol=1e-3, atol=1e-6)
    assert c.kld.value == pytest.approx(theirs.kld.mean(), rel=1e-3, abs=1e-6)
    assert c.perplexity.ratio.value == pytest.approx(math.exp(theirs.nll_q.mean() - theirs.nll_base.mean()), rel=1e-4)
    assert c.same_top1.value == theirs.same_top1.mean()
    assert c.rms_dp.value == pytest.approx(math.sqrt((theirs.dp**2).mean()), rel=1e-3, abs=1e-7)
    for ours_layer, rel in zip(report.layers[:-1], theirs.layer_rel_l2, strict=True):
        assert ours_layer.rel_l2 == pytest.approx(rel, rel=1e-3)
    assert c.kld.value > 0


@pytest.mark.gpu
def test_one_at_a_time_on_the_gpu_matches_side_by_side(tmp_path) -> None:
    quant, orig = golden_pair(tmp_path, "llama", "nf4-dq")
    settings = {"context": CONTEXT, "max_tokens": MAX_TOKENS, "device": "cuda"}
    both = evaluate(prepare(EvalRequest(str(quant), str(orig), **settings)))
    one = evaluate(prepare(EvalRequest(str(quant), str(orig), one_at_a_time=True, top_k=None, **settings)))
    assert both.memory.side_by_side and not one.memory.side_by_side
    assert both.causal is not None and one.causal is not None
    np.testing.assert_allclose(one.causal.kld_values, both.causal.kld_values, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_the_command_on_the_gpu(tmp_path) -> None:
    quant, orig = golden_pair(tmp_path, "gpt2", "nf4-dq")
    done = run_bnb("eval", str(quant), "--against", str(orig), "--context", "64", "--device", "cuda", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["device"].startswith("cuda") and document["dtypes"]["orig"] == "bfloat16"
    assert document["causal"]["tokens"] > 0 and document["gates"]["passed"]
