"""Planner 3: name rules, for models that neither transformers nor diffusers can build here.

A heuristic over checkpoint names and shapes only. It quantizes 2-D ``*.weight`` tensors of
Linear-looking modules and keeps embeddings, the output layer, norms, biases and convolutions. The
plan says it was this planner, so users can see the decisions were guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bnbcli.plan.planners.common import (
    CONV1D,
    LINEAR,
    ModuleVerdict,
    PlannerResult,
    Tensors,
    first_match,
    pattern_matches,
    settle_skip_list,
    user_skip_rules,
)
from bnbcli.plan.planners.hf_diffusers import diffusers_skips
from bnbcli.plan.scheme import FLOAT_DTYPES, QuantScheme

# The last component of an embedding module's name: wte/wpe (GPT-2), shared (T5), embed_tokens,
# embed_positions, embed_in (GPT-NeoX), word_embeddings, tok_embeddings, position_embedding (CLIP)...
# "x_embedder"/"context_embedder" (diffusers) are Linear layers and do not match.
EMBEDDING = re.compile(r"^(?:wte|wpe|shared)$|(?:^|_)embed(?:dings?|_tokens|_positions|_in)?$")
# Output embeddings: lm_head, embed_out (GPT-NeoX); a root "output" (original Llama format).
OUTPUT_LAST = frozenset({"lm_head", "embed_out"})
OUTPUT_ROOT = frozenset({"output"})
NORM = re.compile(r"norm|^ln(?:_\w+|\d*)$", re.IGNORECASE)
# transformers' Conv1D users (`pytorch_utils.Conv1D` in modeling_gpt2/openai/imagegpt/
# decision_transformer/clvp) and the module names that are Conv1D there.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def _output_reason(config: Mapping[str, Any]) -> str:
    # transformers' PretrainedConfig defaults tie_word_embeddings to True
    return "tied weight" if config.get("tie_word_embeddings", True) else "output embedding"


def plan_modules(config: Mapping[str, Any] | None, tensors: Tensors, scheme: QuantScheme, why: str) -> PlannerResult:
    config = config or {}
    conv1d_model = config.get("model_type") in CONV1D_MODEL_TYPES
    user_rules = user_skip_rules(scheme)
    verdicts: dict[str, ModuleVerdict] = {}
    notes: dict[str, str] = {}
    for key, (shape, dtype) in tensors.items():
        module, _, leaf = key.rpartition(".")
        last = module.rpartition(".")[2]
        if leaf != "weight" or not module:
            notes[key] = "bias" if leaf == "bias" else f"not a .weight ({len(shape)}-D {leaf or key})"
        elif len(shape) != 2:
            kind = "a convolution" if len(shape) > 2 else ("a norm" if NORM.search(last) else "a 1-D tensor")
            notes[key] = "norm" if kind == "a norm" else f"not a Linear ({kind})"
        elif dtype not in FLOAT_DTYPES:
            notes[key] = f"not a Linear (a {str(dtype).removeprefix('torch.')} tensor)"
        elif EMBEDDING.search(last):
            verdicts[module] = ModuleVerdict(module, False, "not a Linear (embedding, by name)", shape=tuple(shape))
        elif last in OUTPUT_LAST or module in OUTPUT_ROOT:
            verdicts[module] = ModuleVerdict(module, False, _output_reason(config), shape=tuple(shape))
        elif (hit := first_match(module, user_rules)) is not None:
            verdicts[module] = ModuleVerdict(module, False, hit[0], shape=tuple(shape))
        elif conv1d_model and last in CONV1D_NAMES:
            verdicts[module] = ModuleVerdict(module, True, CONV1D, transpose=True, shape=tuple(shape))
        else:
            verdicts[module] = ModuleVerdict(module, True, LINEAR, shape=tuple(shape))

    if "_class_name" not in config and config.get("tie_word_embeddings", True) and "lm_head" not in verdicts:
        # A tied output layer has no tensor of its own in the checkpoint, but the model still has the
        # Linear: without "lm_head" on the explicit list, transformers would quantize it on reload.
        verdicts["lm_head"] = ModuleVerdict("lm_head", False, "tied weight (not in the checkpoint)")

    def reload_converts(name: str, skip: list[str]) -> bool:
        # Which library will load the result is unknown: the list must hold under both one's rules.
        return not any(pattern_matches(name, s) for s in skip) and not diffusers_skips(name, skip)

    result = PlannerResult(
        planner="name-rules",
        reason=f"name rules (a heuristic over tensor names and shapes): {why}",
        verdicts=verdicts,
        params={key: key for key in tensors},
        notes=notes,
        model_label="the checkpoint",
    )
    # Every kept 2-D weight goes on the list: without the model, an Embedding and a Linear look alike,
    # and listing an Embedding is harmless (loaders only replace Linear layers).
    result.skip_modules = settle_skip_list(verdicts, reload_converts)
    return result
