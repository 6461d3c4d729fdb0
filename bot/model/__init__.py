"""The model: the local worker (`scheduler`) and, in `hf/`, the only code that imports torch and transformers."""
