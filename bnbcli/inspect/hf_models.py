"""Running a transformers model from a folder: what `bnb inspect --activations` and `bnb eval` share.

transformers is imported only when one of them asks for it (`bnb inspect` without --activations never does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bnbcli.errors import BackendUnavailable
from bnbcli.plan.planners.hf_transformers import quiet


def first_line(err: BaseException) -> str:
    """The exception's type and the first line of its message (200 characters at most), for an error line."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "…"
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def import_transformers(feature: str) -> Any:
    """transformers, or BackendUnavailable naming the ``feature`` that needs it."""
    try:
        import transformers
    except Exception as exc:
        raise BackendUnavailable(
            f"{feature} needs transformers, which cannot be imported ({type(exc).__name__})",
            hint="pip install 'bnbcli[hf]'",
        ) from None
    return transformers


@contextlib.contextmanager
def silent_libraries(transformers: Any) -> Iterator[None]:
    """No config warnings and no "Loading weights" bar: output.py alone writes to the terminal."""
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with quiet():
            yield
    finally:
        if bars:
            logging.enable_progress_bar()


def is_causal_lm(config: Any) -> bool:
    """config.json's architectures name a causal LM (``*ForCausalLM``, or a class transformers' causal-LM
    auto mapping holds, such as ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    return any(isinstance(a, str) and (a.endswith("CausalLM") or a in causal) for a in archs)


def model_context(config: Any, tokenizer: Any) -> int | None:
    """The longest sequence the model takes: its position embeddings, or the tokenizer's limit (None: neither
    says)."""
    limits = []
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits) if limits else None
