"""`bnb eval` as a library call: run ORIG and QUANT on the same token sequences and compare their outputs.

Each sequence is one forward (batch 1: nothing padded). For a causal LM the logits (upcast to float32)
become log-probabilities, and every position but the last is scored against the next token (n − 1 tokens
for a sequence of n; llama-perplexity scores the second half of each window only). For an encoder the last
hidden state is compared per token and mean-pooled per sequence. Forward hooks on the transformer layers
compare each layer's output hidden state (bnbcli/eval/compare.py).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from bnbcli.errors import InputError
from bnbcli.eval import DEFAULT_TOP_K, check_top_k
from bnbcli.eval.compare import (
    EmbeddingPairs,
    HiddenError,
    Reference,
    TokenScores,
    join,
    keep_reference,
    pooled,
    score,
    token_cosines,
)
from bnbcli.eval.gates import EvalGates, check
from bnbcli.eval.memory import HIDDEN_BUDGET, MemoryPlan, plan_memory
from bnbcli.eval.models import (
    LayerTap,
    Pair,
    import_transformers,
    load_config,
    load_model,
    load_tokenizer,
    open_pair,
    resolve_device,
)
from bnbcli.eval.report import EvalReport, LayerReport, causal_summary, encoder_summary
from bnbcli.eval.texts import Sequences, builtin_texts, tokenize
from bnbcli.formats.dtypes import dtype_name
from bnbcli.inspect.hf_models import first_line, model_context, silent_libraries

Progress = Callable[[int], None]  # tokens run through a model


@dataclass(frozen=True)
class EvalRequest:
    quant: str
    against: str | None = None
    texts: tuple[str, ...] | None = None  # None: the built-in set
    text_source: str = "built-in"
    context: int | None = None
    max_tokens: int | None = None
    device: str = "auto"
    one_at_a_time: bool = False
    top_k: int | None = DEFAULT_TOP_K  # None: the whole vocabulary
    max_memory: int | None = None  # bytes the run may use on the device (default: what is free)
    gates: EvalGates = field(default_factory=EvalGates)


@dataclass(frozen=True)
class Prepared:
    """Everything checked before a model loads, and the memory plan."""

    request: EvalRequest
    pair: Pair
    device: torch.device
    transformers: Any
    sequences: Sequences
    plan: MemoryPlan

    @property
    def total_tokens(self) -> int:
        """The progress bar's total: each model runs every token, one pass side by side, two one at a time."""
        return self.sequences.tokens * (1 if self.plan.side_by_side else 2)


def prepare(request: EvalRequest) -> Prepared:
    check_top_k(request.top_k)
    pair = open_pair(request.quant, request.against)
    request.gates.check_model(pair.causal)
    device = resolve_device(request.device)
    transformers = import_transformers()
    with silent_libraries(transformers):
        config = load_config(transformers, pair)
        tokenizer = load_tokenizer(transformers, pair)
    texts = list(request.texts) if request.texts is not None else builtin_texts()
    sequences = tokenize(tokenizer, texts, request.context, model_context(config, tokenizer), request.max_tokens)
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0) if pair.causal else 0
    longest = max(int(s.numel()) for s in sequences.ids)
    plan = plan_memory(
        pair.orig_bytes,
        pair.quant_bytes,
        longest,
        vocab,
        device,
        request.one_at_a_time,
        request.top_k,
        request.max_memory,
    )
    return Prepared(request, pair, device, transformers, sequences, plan)


# --- one model's forward ------------------------------------------------------------------------------------


@dataclass
class Kept:
    """What the comparison needs of one model's forward on one sequence."""

    reference: Reference | None  # causal LM, ORIG: its next-token data (reduce_orig)
    logp: torch.Tensor | None  # causal LM: [n − 1, V] float32 (QUANT's; ORIG's until reduce_orig)
    last: torch.Tensor | None  # encoder: the last hidden state [n, hidden]
    hidden: list[torch.Tensor]  # each layer's output [n, hidden]; empty when not kept


class Runner:
    """One loaded model with hooks on its layers; times its loading and forwards."""

    def __init__(self, prepared: Prepared, role: str) -> None:
        started = time.perf_counter()
        self.role = role
        self.device = prepared.device
        self.causal = prepared.pair.causal
        source = prepared.pair.orig if role == "ORIG" else prepared.pair.quant
        self.model = load_model(prepared.transformers, source, self.causal, self.device, role)
        self.tap = LayerTap(self.model)
        self.layer_names = list(self.tap.names)
        self.model_class = type(self.model).__name__
        self.dtype = dtype_name(self.model.dtype)
        self.load_seconds = time.perf_counter() - started
        self.forward_seconds = 0.0

    def forward(self, ids: torch.Tensor) -> Kept:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids[None].to(self.device))
                hidden = self.tap.take()
                if self.causal:
                    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
                    kept = Kept(None, logp, None, hidden)
                else:
                    kept = Kept(None, None, out.last_hidden_state[0], hidden)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError:
            raise InputError(
                f"{self.role} ran out of memory on {self.device} on a sequence of {ids.numel()} tokens",
                hint="shorter sequences (--context N), --one-at-a-time, or --device cpu",
            ) from None
        except Exception as exc:
            raise InputError(
                f"{self.role} ({type(self.model).__name__}) failed on the texts: {first_line(exc)}",
                hint="the model's own forward pass raised this; check that it runs with transformers alone, "
                "or try another --device",
            ) from None
        self.forward_seconds += time.perf_counter() - started
        return kept

    def close(self) -> None:
        self.tap.remove()
        del self.model, self.tap
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def reduce_orig(kept: Kept, ids: torch.Tensor, top_k: int | None) -> Kept:
    """ORIG's forward reduced to what the comparison needs: the reference (top-k or whole) for a causal LM."""
    if kept.logp is None:
        return kept
    targets = ids[1:].to(kept.logp.device)
    return replace(kept, reference=keep_reference(kept.logp, targets, top_k), logp=None)


def to_host(kept: Kept) -> Kept:
    return Kept(
        kept.reference.to("cpu") if kept.reference is not None else None,
        None,
        kept.last.cpu() if kept.last is not None else None,
        [h.cpu() for h in kept.hidden],
    )


def kept_bytes(kept: Kept) -> int:
    hidden = sum(h.numel() * h.element_size() for h in kept.hidden)
    return hidden + (kept.reference.nbytes if kept.reference is not None else 0)


# --- comparing ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """The comparison, accumulated over sequences."""

    layers: list[HiddenError]
    scores: list[TokenScores] = field(default_factory=list)
    token_cosines: list[np.ndarray] = field(default_factory=list)
    embeddings: EmbeddingPairs = field(default_factory=EmbeddingPairs)

    def add(self, orig: Kept, quant: Kept, device: torch.device) -> None:
        if orig.reference is not None and quant.logp is not None:
            self.scores.append(score(orig.reference.to(device), quant.logp))
        if orig.last is not None and quant.last is not None:
            last = orig.last.to(device)
            self.token_cosines.append(token_cosines(quant.last, last).double().cpu().numpy())
            self.embeddings.orig.append(pooled(last))
            self.embeddings.quant.append(pooled(quant.last))
        for error, o, q in zip(self.layers, orig.hidden, quant.hidden, strict=False):
            error.add(q, o.to(device))


# --- the two memory plans -----------------------------------------------------------------------------------


def _side_by_side(prepared: Prepared, progress: Progress) -> tuple[Tally, Runner, Runner]:
    orig = Runner(prepared, "ORIG")
    quant = Runner(prepared, "QUANT")
    tally = Tally([HiddenError() for _ in orig.tap.names])
    for ids in prepared.sequences.ids:
        kept = reduce_orig(orig.forward(ids), ids, None)
        tally.add(kept, quant.forward(ids), prepared.device)
        progress(int(ids.numel()))
    quant.close()
    orig.close()
    return tally, orig, quant


def _one_at_a_time(prepared: Prepared, progress: Progress) -> tuple[Tally, Runner, Runner]:
    orig = Runner(prepared, "ORIG")
    kept_all: list[Kept] = []
    budget = HIDDEN_BUDGET
    for ids in prepared.sequences.ids:
        kept = to_host(reduce_orig(orig.forward(ids), ids, prepared.plan.top_k))
        layer_bytes = kept_bytes(replace(kept, reference=None))
        if layer_bytes > budget:
            kept = replace(kept, hidden=[])
        budget -= min(layer_bytes, budget)
        kept_all.append(kept)
        progress(int(ids.numel()))
    orig.close()  # the device never holds both models
    quant = Runner(prepared, "QUANT")
    tally = Tally([HiddenError() for _ in orig.layer_names])
    for ids, kept in zip(prepared.sequences.ids, kept_all, strict=True):
        tally.add(kept, quant.forward(ids), prepared.device)
        progress(int(ids.numel()))
    quant.close()
    return tally, orig, quant


def evaluate(prepared: Prepared, progress: Progress = lambda n: None) -> EvalReport:
    started = time.perf_counter()
    with silent_libraries(prepared.transformers):
        run = _side_by_side if prepared.plan.side_by_side else _one_at_a_time
        tally, orig, quant = run(prepared, progress)
    return _report(prepared, tally, orig, quant, time.perf_counter() - started)


def _report(prepared: Prepared, tally: Tally, orig: Runner, quant: Runner, seconds: float) -> EvalReport:
    request, pair, sequences = prepared.request, prepared.pair, prepared.sequences
    scores = join(tally.scores)
    cosines = np.concatenate(tally.token_cosines) if tally.token_cosines else np.zeros(0)
    report = EvalReport(
        quant=request.quant,
        orig=pair.orig_label,
        model_class=quant.model_class,
        kind="causal" if pair.causal else "encoder",
        device=str(prepared.device),
        dtypes={"orig": orig.dtype, "quant": quant.dtype},
        memory=prepared.plan,
        texts={
            "source": request.text_source,
            "texts": sequences.texts,
            "sequences": len(sequences.ids),
            "tokens": sequences.tokens,
            "context": request.context,
            "max_tokens": request.max_tokens,
        },
        layers=tuple(LayerReport.of(name, error) for name, error in zip(orig.layer_names, tally.layers, strict=True)),
        seconds={
            "orig_load": round(orig.load_seconds, 3),
            "orig_forward": round(orig.forward_seconds, 3),
            "quant_load": round(quant.load_seconds, 3),
            "quant_forward": round(quant.forward_seconds, 3),
            "total": round(seconds, 3),
        },
        causal=causal_summary(scores) if pair.causal else None,
        encoder=encoder_summary(cosines, tally.embeddings) if not pair.causal else None,
        gates=request.gates.as_dict(),
    )
    return replace(report, failures=check(request.gates, report))
