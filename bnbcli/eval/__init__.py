"""`bnb eval`: how far a bitsandbytes checkpoint's outputs are from its original's, per token (KL divergence,
perplexity, top-1 agreement, Δp) or per hidden state (cosines), and in which layer they part."""

from bnbcli.errors import UsageError

# ORIG's tokens kept per position when the models run one at a time (`--top-k`); here, not in memory.py, so
# that the command line shows and checks it without importing torch.
DEFAULT_TOP_K = 1024


def check_top_k(top_k: int | None) -> None:
    """``--top-k``: 1 token or more, or None (the whole vocabulary)."""
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k}: keep 1 token or more", hint="or --top-k all")
