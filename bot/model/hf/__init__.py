"""Hugging Face transformers on torch: loading, the KV cache, chat templates, batched
decoding. The only package that imports torch and transformers; import it only to run
the local model."""

from bot.model.hf.engine import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, HFEngine, default_model_file, load_engine

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "HFEngine", "default_model_file", "load_engine"]
