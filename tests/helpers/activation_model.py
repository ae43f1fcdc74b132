"""Tiny generated Llama models for `bnb inspect --activations`, whose activation outliers are known by
construction, and a word-level tokenizer for them.

The injected model (hidden size 128, three layers):

- the embedding of the word "zebra" holds 4.0 in dimension OUTLIER_DIM (others ~0.02), so after each
  RMSNorm that dimension is ~11 (the bound is √128 ≈ 11.3) at exactly the "zebra" positions, in the inputs of
  q/k/v, gate/up of every layer and of the LM head: an outlier feature whose position share is the share
  of "zebra" tokens;
- layer 1's post-attention norm gain is 30 in LOCAL_DIM: large at most positions, but only in that
  layer's gate/up inputs (one layer of four);
- layer 1's up_proj is scaled ×1000 and its down_proj ÷1000: the model computes the same function, but
  the down projection's input spikes three orders of magnitude above its peers'.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bnbcli.inspect.activations import BUILTIN_TEXTS

HIDDEN, INTERMEDIATE, LAYERS = 128, 256, 3
OUTLIER_DIM, LOCAL_DIM = 17, 90
MARKED = "zebra"
SPIKE = "model.layers.1.mlp.down_proj"
TEXTS = [
    "A zebra and a horse walk along the river bank at dawn.",
    "The zebra stops, looks around and drinks from the cold water.",
    "Nobody else is awake yet, except an old heron watching the zebra from a rock.",
]
WORDS = re.compile(r"\w+|[^\w\s]+")


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.lower() for text in (*BUILTIN_TEXTS, *TEXTS) for w in WORDS.findall(text)})
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, as WORDS
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=256)


def save_model(folder: Path, inject: bool) -> None:
    """A tiny Llama and its tokenizer in FOLDER; INJECT puts the outliers above in it, else it is clean."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if inject:
        with torch.no_grad():
            model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(MARKED), OUTLIER_DIM] = 4.0
            layer = model.model.layers[1]
            layer.post_attention_layernorm.weight[LOCAL_DIM] = 30.0
            layer.mlp.up_proj.weight *= 1000.0
            layer.mlp.down_proj.weight /= 1000.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
