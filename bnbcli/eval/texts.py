"""The texts `bnb eval` runs both models on, and how they become token sequences.

The built-in set (``texts.txt`` beside this module, written for bnbcli, MIT like the project): fifteen
English texts — narrative prose, dialogue, Python, SQL and shell, JSON, a financial summary, a letter,
instructions, a FAQ, meeting notes, unit conversions, history, science and a chat exchange — about 3,200
tokens with a Llama-style 49k vocabulary and 3,100 with BERT's. Texts are separated by a line ``%%``.

Two ways to cut them, with the checkpoint's own tokenizer:

- one sequence per text (the default; ``--text-file``: one text per line), special tokens as the
  tokenizer adds them; a text longer than the model's context is an error;
- ``--context N``: all texts joined by blank lines into one token stream, cut into windows of N tokens
  (the first one the tokenizer's BOS token where it adds one), as llama-perplexity reads a file.

``--max-tokens`` stops after that many tokens (the last sequence cut short).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bnbcli.errors import InputError, UsageError

SEPARATOR = "\n%%\n"


def builtin_texts() -> list[str]:
    raw = resources.files("bnbcli.eval").joinpath("texts.txt").read_text(encoding="utf-8")
    return [text.strip("\n") for text in raw.split(SEPARATOR) if text.strip()]


def read_text_file(path: Path) -> list[str]:
    """One text per non-empty line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text-file {path}: cannot read it: {exc}", hint="a UTF-8 text file") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise UsageError(f"--text-file {path} holds no text", hint="one text per line")
    return texts


@dataclass(frozen=True)
class Sequences:
    ids: tuple[torch.Tensor, ...]  # 1-D token ids, one per forward
    texts: int  # texts read
    windowed: bool

    @property
    def tokens(self) -> int:
        return sum(int(s.numel()) for s in self.ids)


def tokenize(
    tokenizer: Any, texts: list[str], context: int | None, limit: int | None, max_tokens: int | None
) -> Sequences:
    """Token sequences of at most ``limit`` tokens (the model's context; None: no limit known)."""
    if context is not None:
        if context < 2:
            raise UsageError(f"--context {context}: a window needs 2 tokens or more", hint="512 is llama-perplexity's")
        if limit is not None and context > limit:
            raise UsageError(
                f"--context {context} is longer than the model's context ({limit} tokens)",
                hint=f"use --context {limit} or less",
            )
        ids = _windows(tokenizer, texts, context)
    else:
        ids = [torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long) for text in texts]
        longest = max(range(len(ids)), key=lambda i: ids[i].numel())
        if limit is not None and ids[longest].numel() > limit:
            raise InputError(
                f"text {longest + 1} is {ids[longest].numel()} tokens, longer than the model's context ({limit})",
                hint=f"cut the texts into windows with --context N (N ≤ {limit})",
            )
    ids = _first_tokens([s for s in ids if s.numel() >= 2], max_tokens)
    if not ids:
        raise InputError("the texts give no sequence of 2 tokens or more", hint="give texts with words in them")
    return Sequences(tuple(ids), len(texts), context is not None)


def _windows(tokenizer: Any, texts: list[str], context: int) -> list[torch.Tensor]:
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    step = context - 1 if adds_bos else context
    windows = []
    for start in range(0, len(stream), step):
        chunk = stream[start : start + step]
        windows.append(torch.tensor(([bos] if adds_bos else []) + chunk, dtype=torch.long))
    return windows


def _first_tokens(ids: list[torch.Tensor], max_tokens: int | None) -> list[torch.Tensor]:
    if max_tokens is None:
        return ids
    if max_tokens < 2:
        raise UsageError(
            f"--max-tokens {max_tokens}: at least 2 tokens are needed", hint="leave it out to run every text"
        )
    kept, left = [], max_tokens
    for s in ids:
        if left < 2:
            break
        kept.append(s[:left])
        left -= kept[-1].numel()
    return kept
