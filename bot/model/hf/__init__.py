"""Hugging Face transformers on torch: loading (`loader`), the KV cache (`kv_cache`),
chat templates (`chat_template`), sampling (`sampler`), batched decoding (`runner`) and
the compiled decode step for Llama-family models (`fast_step`, compiled and loaded by
`fast_decoder`). The only package that imports torch and transformers; import it only to run the local
model."""

from bot.model.hf.loader import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, default_model_file, load_engine
from bot.model.hf.runner import HFEngine

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "HFEngine", "default_model_file", "load_engine"]
