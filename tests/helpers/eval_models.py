"""Checkpoint pairs for the `bnb eval` tests: the golden causal models (which ship no tokenizer) get a small
byte-level BPE tokenizer trained on the built-in texts, so that every id fits their 512-token vocabulary;
and the independent computation the tests compare `bnb eval` with: plain `from_pretrained` of both
folders, logits → float32 log-softmax → torch.nn.functional.kl_div over the whole vocabulary."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnbcli.eval.texts import builtin_texts

from helpers.golden import golden_dir

GOLDEN_CAUSAL = ("llama", "qwen2_tied", "gpt2", "opt")


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>"],
        show_progress=False,
    )
    tok.train_from_iterator(builtin_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def with_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tokenizer().save_pretrained(dst)
    return dst


def golden_pair(root: Path, family: str, variant: str) -> tuple[Path, Path]:
    """(QUANT, ORIG): the golden variant transformers wrote and its source, each with the tokenizer."""
    models = golden_dir() / "models" / family
    return with_tokenizer(models / variant, root / variant), with_tokenizer(models / "src", root / "src")


@dataclass
class Independent:
    """Per scored token, from the two models' full distributions; per layer, hidden-state errors."""

    kld: np.ndarray
    nll_q: np.ndarray
    nll_base: np.ndarray
    dp: np.ndarray
    same_top1: np.ndarray
    layer_rel_l2: list[float]  # all layers but the last (transformers' last hidden state is after the final norm)


def independent(quant: Path, orig: Path, sequences: tuple[torch.Tensor, ...], device: str = "cpu") -> Independent:
    import transformers

    placed = {} if device == "cpu" else {"device_map": {"": device}}
    q = transformers.AutoModelForCausalLM.from_pretrained(quant, **placed).eval()
    o = transformers.AutoModelForCausalLM.from_pretrained(orig).eval().to(device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kld", "nll_q", "nll_base", "dp", "same_top1")}
    err2: list[float] = []
    ref2: list[float] = []
    with torch.no_grad():
        for ids in sequences:
            ids = ids.to(device)
            out_q, out_o = q(ids[None], output_hidden_states=True), o(ids[None], output_hidden_states=True)
            logq = torch.log_softmax(out_q.logits[0, :-1].float(), dim=-1)
            logp = torch.log_softmax(out_o.logits[0, :-1].float(), dim=-1)
            kl = torch.nn.functional.kl_div(logq.double(), logp.double(), log_target=True, reduction="none")
            target = ids[1:]
            rows = torch.arange(target.numel(), device=target.device)
            lq, lp = logq.double()[rows, target], logp.double()[rows, target]
            parts["kld"].append(kl.sum(-1).cpu().numpy())
            parts["nll_q"].append(-lq.cpu().numpy())
            parts["nll_base"].append(-lp.cpu().numpy())
            parts["dp"].append((lq.exp() - lp.exp()).cpu().numpy())
            parts["same_top1"].append((logq.argmax(-1) == logp.argmax(-1)).cpu().numpy())
            hidden = list(zip(out_q.hidden_states[1:-1], out_o.hidden_states[1:-1], strict=True))
            if not err2:
                err2, ref2 = [0.0] * len(hidden), [0.0] * len(hidden)
            for i, (hq, ho) in enumerate(hidden):
                err2[i] += float(((hq.float() - ho.float()) ** 2).sum())
                ref2[i] += float((ho.float() ** 2).sum())
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Independent(**joined, layer_rel_l2=[(e / r) ** 0.5 for e, r in zip(err2, ref2, strict=True)])


def forward_error(folder: Path, ids: torch.Tensor) -> str | None:
    """The exception a plain forward of the model raises on this machine ("Type: message"), or None."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    try:
        with torch.no_grad():
            model(ids[None])
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None
