"""Pure model math, one file per concept: norm, rope, mla, moe, decoder."""
