"""Whether ORIG and QUANT run side by side or one at a time.

**Side by side** (both loaded on the device): each sequence runs through ORIG then QUANT and the scores
use both full distributions (exact). It needs ORIG's and QUANT's weights (their tensor bytes: the dtype
they load in), plus a forward's workspace: about six float32 copies of the logits of the longest sequence
(two models' logits and log-probabilities, and the comparison's temporaries), plus 0.5 GiB of CUDA context.

**One at a time** (too little memory for both, or ``--one-at-a-time``): ORIG runs over every sequence
first; for each scored token it keeps, in host memory, its top-k log-probabilities with their token ids,
its log-probability of the real next token and the log of the mass outside the top-k (``Reference``:
k × 12 bytes + 24 per token), and each layer's hidden state while those stay under ``HIDDEN_BUDGET``. ORIG
is then freed, and QUANT runs. The device never holds both models; KLD is within its stated bound
(bnbcli/eval/compare.py), exact when k is the vocabulary (``--top-k all``).

With the defaults (ORIG in bf16, QUANT nf4, 512-token texts, Llama-3-sized vocabulary) a model of P billion
parameters needs about 2P GB for ORIG and 0.6P + 1 GB for QUANT, plus ~2 GB of workspace and context: on
one GPU side by side is chosen up to ~8B parameters on 24 GB, ~14B on 40 GB, ~29B on 80 GB, ~53B on
141 GB; one at a time ORIG alone must fit: ~10B, ~18B, ~38B, ~68B. Bigger models do not fit one GPU in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnbcli.units import human_bytes

CUDA_CONTEXT = 512 << 20
LOGIT_COPIES = 6
HIDDEN_BUDGET = 2 << 30  # host bytes of ORIG hidden states kept for the per-layer comparison, one at a time


@dataclass(frozen=True)
class MemoryPlan:
    side_by_side: bool
    top_k: int | None  # one at a time: ORIG's tokens kept per position; None: the whole vocabulary
    needed_side_by_side: int  # bytes, estimated
    available: int | None  # bytes free for the run (None: unknown)
    reason: str
    logits: bool = True  # a causal LM (an encoder keeps hidden states only)

    def describe(self) -> str:
        if not self.logits:
            return "side by side" if self.side_by_side else "one at a time, ORIG's hidden states kept"
        if self.side_by_side:
            return "side by side, exact over the whole vocabulary"
        kept = "the whole vocabulary" if self.top_k is None else f"top-{self.top_k}"
        return f"one at a time, ORIG's {kept} log-probabilities kept"

    def as_dict(self) -> dict[str, object]:
        return {
            "side_by_side": self.side_by_side,
            "top_k": self.top_k,
            "needed_side_by_side": self.needed_side_by_side,
            "available": self.available,
            "reason": self.reason,
        }


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the GPU, or the host memory available (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def plan_memory(
    orig_bytes: int,
    quant_bytes: int,
    longest: int,
    vocab: int,
    device: torch.device,
    one_at_a_time: bool,
    top_k: int | None,
    max_memory: int | None,
) -> MemoryPlan:
    workspace = LOGIT_COPIES * longest * vocab * 4 + (CUDA_CONTEXT if device.type == "cuda" else 0)
    needed = orig_bytes + quant_bytes + workspace
    available = max_memory if max_memory is not None else free_memory(device)
    logits = vocab > 0
    if one_at_a_time:
        return MemoryPlan(False, top_k, needed, available, "--one-at-a-time", logits)
    if available is None or needed <= available:
        where = "memory free unknown" if available is None else f"{human_bytes(available)} free"
        return MemoryPlan(True, None, needed, available, f"both fit: {human_bytes(needed)} needed, {where}", logits)
    why = f"both need {human_bytes(needed)}, {human_bytes(available)} free on {device}"
    return MemoryPlan(False, top_k, needed, available, why, logits)
