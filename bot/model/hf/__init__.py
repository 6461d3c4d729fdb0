"""Hugging Face transformers on torch: loading, the KV cache, chat templates, batched decoding."""
