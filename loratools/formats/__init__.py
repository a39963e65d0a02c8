"""File formats only: safetensors headers, PEFT adapter directories, base checkpoints."""
