"""LoRA files for requests: where a `path` points (URL, our storage, a local folder, the Hugging Face Hub)
and the on-disk cache of downloads. Loading them into the experts is the engine's job (engine/lora.py)."""
