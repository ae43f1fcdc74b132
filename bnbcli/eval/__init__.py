"""`bnb eval`: how far a bitsandbytes checkpoint's outputs are from its original's, per token (KL divergence,
perplexity, top-1 agreement, Δp) or per hidden state (cosines), and in which layer they part."""
