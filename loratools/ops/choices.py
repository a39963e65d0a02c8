"""The values the commands' options take, as plain data: the operations check their arguments
against these tables and the CLI builds its choice lists from them, without importing the
operations (which import numpy or torch)."""

# merge --dtype, extract --dtype: what float tensors are written as (the library also takes float64)
DTYPES = ("float32", "float16", "bfloat16")

# combine --method: the exact ones first, then PEFT's add_weighted_adapter combination types
COMBINE_EXACT = ("cat", "svd")
COMBINE_PEFT = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINE_METHODS = COMBINE_EXACT + COMBINE_PEFT
MAJORITY_SIGNS = ("total", "frequency")  # combine --majority-sign (ties, dare_ties)

EMBEDDING_MODES = ("lora", "save", "skip")  # extract --embeddings: LoRA, stored whole, left out

