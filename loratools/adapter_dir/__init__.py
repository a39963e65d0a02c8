"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors/.bin) read into and
written from the in-memory Adapter; AdaLoRA files read as the plain LoRA they equal. Above the
adapter model, below the commands: formats/ below it knows bytes only."""
