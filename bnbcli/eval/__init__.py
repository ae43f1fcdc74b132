"""`bnb eval`: how far a bitsandbytes checkpoint's outputs are from its original's, per token (KL divergence,
perplexity, top-1 agreement, Δp) or per hidden state (cosines), and in which layer they part."""

# ORIG's tokens kept per position when the models run one at a time (`--top-k`); here, not in memory.py, so
# that the command line shows it without importing torch.
DEFAULT_TOP_K = 1024
