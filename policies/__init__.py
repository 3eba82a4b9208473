"""π0.5 in JAX/Flax, numerically identical to openpi, plus openpi's checkpoint, tokenizer and transform I/O."""
