"""GPU memory at run time: an estimate, the parts named, and a verdict against a GPU's memory.

Unlike ``get_memory_footprint()``, which the golden checkpoints pin to the byte, this is a model of
what else a forward pass holds. Each term says what it counts; anything not counted is named in the
README ("bnb footprint").
"""

from __future__ import annotations

from dataclasses import dataclass

from bnbcli.footprint.model import DecoderShape

# torch's CUDA context plus cuBLAS workspace on a recent GPU, before any tensor: typically 0.3 to 0.6 GiB
# (driver, GPU and library versions move it). A round, stated number; compare with torch.cuda.mem_get_info.
CUDA_CONTEXT_BYTES = 512 * 2**20
LOGITS_ITEMSIZE = 4  # generate() keeps the last position's logits in float32


@dataclass(frozen=True)
class Runtime:
    """Bytes on the GPU while the model runs, by cause."""

    weights: int  # parameters and buffers after the first forward pass: get_memory_footprint()
    quant_state: int  # absmax, quant maps, nested absmax, SCB: on the GPU, but attributes, not parameters
    transient: int  # the largest layer held dequantized / upcast for one matmul (4-bit, fp8)
    kv_cache: int  # decoder-only language models: keys and values for batch x seq-len tokens
    activations: int | None  # decoder-only language models: a prefill step's largest live tensors; else None
    cuda_context: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        parts = (self.weights, self.quant_state, self.transient, self.kv_cache, self.activations or 0)
        return sum(parts) + self.cuda_context

    def as_dict(self) -> dict[str, int | None]:
        return {
            "weights": self.weights,
            "quant_state": self.quant_state,
            "transient": self.transient,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "cuda_context": self.cuda_context,
            "total": self.total,
        }


def kv_cache_bytes(decoder: DecoderShape | None, seq_len: int, batch: int, itemsize: int) -> int:
    """Keys and values of every layer: 2 * layers * kv_heads * head_dim * seq_len * batch elements, in the
    model's dtype (transformers' DynamicCache). Sliding-window layers would hold less: an upper bound."""
    if decoder is None:
        return 0
    return 2 * decoder.layers * decoder.kv_heads * decoder.head_dim * seq_len * batch * itemsize


def activation_bytes(decoder: DecoderShape | None, seq_len: int, batch: int, itemsize: int) -> int | None:
    """A prefill step's live activations: the residual stream, the normed input and the attention output
    (3 x hidden), the MLP's gate and up projections (2 x intermediate), per token; plus the last position's
    logits in float32. Attention runs through SDPA, which does not materialize seq x seq scores."""
    if decoder is None:
        return None
    tokens = seq_len * batch
    return tokens * (3 * decoder.hidden + 2 * decoder.intermediate) * itemsize + batch * decoder.vocab * LOGITS_ITEMSIZE


def combine(parts: list[Runtime]) -> Runtime:
    """A pipeline on one GPU: the weights of every component, one context, the largest transient."""
    activations = [p.activations for p in parts if p.activations is not None]
    return Runtime(
        weights=sum(p.weights for p in parts),
        quant_state=sum(p.quant_state for p in parts),
        transient=max((p.transient for p in parts), default=0),
        kv_cache=sum(p.kv_cache for p in parts),
        activations=max(activations) if activations else None,
    )
