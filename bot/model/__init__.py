"""The model: the local worker (`scheduler`, with `detokenizer` turning tokens into text
and `streams` carrying it to the event loop), `native` (the C runtimes' process-wide
knobs: OpenMP pools, glibc's heap) and, in `hf/`, the only code that imports torch and
transformers."""
