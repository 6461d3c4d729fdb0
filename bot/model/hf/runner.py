"""`HFEngine`: a causal LM running a continuous batch (implements `bot.ports.Engine`).

Sequences join and leave one running batch at step boundaries; each `step` is one
forward pass for all of them. The rows share one KV cache (see `kv_cache`), each
right-aligned with its padding on the left hidden by a 2-D attention mask, and every
row gets explicit position ids (its own token count), so RoPE and absolute position
embeddings see exactly what they would see for that sequence alone: greedy output in
a batch is token-identical to the sequence run alone.

Decode steps of Llama-family models run through the compiled fast step
(`fast_decoder.FastDecoder`) once it is ready; prefill always runs the HF forward.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from bot.errors import GenerationError
from bot.events import ChatTurn
from bot.model.hf.chat_template import ChatTokenizer
from bot.model.hf.fast_decoder import FastDecoder
from bot.model.hf.kv_cache import KV, SlackCache, join_rows, keep_rows
from bot.model.hf.sampler import RowSampler, sample
from bot.model.native import return_free_memory
from bot.ports import SamplingParams

if TYPE_CHECKING:
    from bot.ports import Engine

logger = logging.getLogger(__name__)

LoadedFrom = Literal["gguf", "cache", "directory", "hub"]

# Prompts are prefilled together up to this many tokens: a pass over a few short
# prompts costs about as much as over one (the weights are read once); beyond it the
# block-diagonal attention wastes more than packing saves.
_PACK_TOKENS = 256
# A forward pass over fewer tokens (decode rows or prompt tokens) than this runs on one
# thread: measured on 2 cores, a second thread gains nothing below ~8 rows and makes a
# step many times slower when another process holds a core.
_PARALLEL_MIN_TOKENS = 8

# torch's own choice of intra-op threads, before `load_engine` lowers it (see `on_thread_start`).
_DEFAULT_THREADS = torch.get_num_threads()


@dataclass(slots=True)
class _Row:
    """One active sequence: a row of the batch."""

    seq_id: int
    sampler: RowSampler
    length: int  # tokens of this sequence in the KV cache


class HFEngine:
    """A causal LM with a continuously batched decode loop (implements `bot.ports.Engine`).

    `add`, `step` and `remove` run on one thread (the worker's scheduler); the tokenizer
    methods may be called from any thread. Built by `load_engine`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: ChatTokenizer,
        *,
        context_length: int,
        device: torch.device,
        loaded_from: LoadedFrom,
        fast: FastDecoder | None = None,
    ) -> None:
        self.loaded_from: LoadedFrom = loaded_from
        """Where the weights came from: "gguf" (de-quantized now), "cache", "directory", "hub"."""
        self._model = model
        self._tokenizer = tokenizer
        self._context_length = context_length
        self._device = device

        self._pass_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Packed prefill needs a boolean 4-D mask, which only SDPA takes as is.
        attn = getattr(model.config, "_attn_implementation", None)
        self._pack_tokens = _PACK_TOKENS if attn == "sdpa" else 0

        self._max_threads = 1  # raised by `on_thread_start`
        self._threads = torch.get_num_threads()
        self._fast = fast
        self._fast_enabled = True
        # Compiled kernels are built for one thread count; another one recompiles them
        # (and runs very slowly the first time), so with a fast step it never changes.
        self._fixed_threads = fast.config.threads if fast is not None and fast.compiled else None

        # The batch. Row i of every tensor is `self._rows[i]`.
        self._rows: list[_Row] = []
        self._cache: SlackCache | None = None
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
        return self._tokenizer.eos_token_ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._tokenizer.stop_strings

    # Only tests read these two, and they must: the memory the batch holds is a real
    # behaviour (it shrinks when rows leave, stays within the context) that nothing
    # else shows.
    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """(rows, columns) of the KV cache tensors; (0, 0) when nothing is active."""
        return (0, 0) if self._cache is None else self._cache.shape

    @property
    def kv_cache_capacity(self) -> int:
        """Columns allocated per row (used plus spare); within `context_length` while every
        prompt is shorter than it (see `add`)."""
        return 0 if self._cache is None else self._cache.capacity

    @property
    def hf_model(self) -> Any:
        """The loaded transformers model (benchmarks compare with its own `generate`;
        call it only while the engine is idle)."""
        return self._model

    @property
    def decode_path(self) -> Literal["fast", "hf"]:
        """What decode steps run: the fast step (see `fast_step`; once all its graphs
        are ready) or the HF forward."""
        return "fast" if self._fast is not None and self._fast_enabled and self._fast.ready else "hf"

    @property
    def _use_fast(self) -> bool:
        return self._fast is not None and self._fast_enabled and self._fast.usable(max(len(self._rows), 1))

    def enable_fast_step(self, enabled: bool) -> None:
        """Switch between the fast step (when there is one) and the HF forward at the next
        step; benchmarks compare the two in one process."""
        self._fast_enabled = enabled

    def wait_for_fast_step(self, timeout: float | None = None, *, one_row: bool = False) -> bool:
        """Block until the fast step has compiled (True) or failed or is not configured
        (False); with `one_row`, only until one user's graph is ready."""
        return self._fast is not None and self._fast.wait(timeout, "one" if one_row else None)

    def on_thread_start(self) -> None:
        """Let the scheduler thread use all cores for forward passes big enough to
        gain from them (loading and warm-up ran on one thread)."""
        self._max_threads = max(_DEFAULT_THREADS, 1)
        logger.debug("Generation thread uses up to %d torch threads", self._max_threads)

    def _use_threads_for(self, tokens: int) -> None:
        threads = self._max_threads if tokens >= _PARALLEL_MIN_TOKENS else 1
        if self._fixed_threads is not None:
            # Checked against torch itself: another engine in the process (tests,
            # benchmarks) may have changed the process-wide count since.
            if torch.get_num_threads() != self._fixed_threads:
                torch.set_num_threads(self._fixed_threads)
            self._threads = self._fixed_threads
            return
        if threads != self._threads:
            torch.set_num_threads(threads)  # process-wide, but this thread is torch's only user
            self._threads = threads

    # ------------------------------------------------------------------ Engine: tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)

    def render_chat(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        """Prompt token ids ending where the assistant's reply begins (see `ChatTokenizer`)."""
        return self._tokenizer.render_chat(system, turns)

    # ------------------------------------------------------------------ Engine: batch

    def add(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> dict[int, int]:
        """Prefill new sequences and join them to the batch. Short prompts are packed
        into one forward pass (see `_prefill`); nothing changes if this raises. The
        caller keeps each prompt shorter than `context_length` (the worker's admission
        checks it)."""
        self._check_new(requests)
        rows = [
            _Row(seq_id, RowSampler.for_params(sampling, self._device), len(prompt))
            for seq_id, prompt, sampling in requests
        ]
        prompts = [list(prompt) for _, prompt, _ in requests]
        logits: list[torch.Tensor] = []
        pieces: list[list[KV]] = []
        with torch.inference_mode():
            for group in _pack(prompts, self._pack_tokens):
                group_logits, group_pieces = self._prefill([prompts[i] for i in group])
                logits.append(group_logits)
                pieces += group_pieces
            tokens = sample(torch.cat(logits), [row.sampler for row in rows])
            self._join(rows, pieces, tokens)
        return {row.seq_id: token for row, token in zip(rows, tokens, strict=True)}

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[list[KV]]]:
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
        cache = SlackCache()
        self._use_threads_for(int(ids.shape[1]))
        logits = self._forward(ids, mask, positions, cache, keep=ends - 1)[0]
        return logits, cache.split(lengths)

    def step(self) -> dict[int, int]:
        """One forward pass feeding every row its pending token; returns the next ones."""
        if not self._rows:
            return {}
        # The cache and the positions never grow past the context length.
        full = [row.seq_id for row in self._rows if row.length >= self._context_length]
        if full:
            raise GenerationError(f"sequences {full} reached the context length; remove them first")
        with torch.inference_mode():
            ones = torch.ones((len(self._rows), 1), dtype=torch.bool, device=self._device)
            mask = torch.cat([self._mask, ones], dim=1)
            self._use_threads_for(len(self._rows))
            try:
                if self._use_fast:
                    assert self._fast is not None and self._cache is not None
                    # The step is compiled for a cache with a spare column: a full one
                    # (contiguous slices) would fail its guards and recompile it.
                    self._cache.reserve(self._width + 1)
                    last, keys, values = self._fast(self._pending, self._positions, self._mask, self._cache.buffers())
                    self._cache.append(keys, values)
                else:
                    last = self._forward(self._pending[:, None], mask, self._positions[:, None], self._cache)[:, -1]
                tokens = sample(last, [row.sampler for row in self._rows])
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
        return {row.seq_id: token for row, token in zip(self._rows, tokens, strict=True)}

    def remove(self, seq_ids: Sequence[int]) -> None:
        """Drop rows (unknown ids are ignored) and shrink the cache to what is left. If
        shrinking fails (out of memory), every row is dropped and the error raised."""
        drop = set(seq_ids)
        keep = [i for i, row in enumerate(self._rows) if row.seq_id not in drop]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            # Idle: hand back the heap pages the batch's activations and cache left free
            # (after a burst of 32 users, 85 MiB that the next burst's peak sat on top of).
            return_free_memory()
            return
        rows = [self._rows[i] for i in keep]
        # Columns left of the longest remaining row are padding in every row.
        cut = self._width - max(row.length for row in rows)
        with torch.inference_mode():
            index = torch.tensor(keep, dtype=torch.long, device=self._device)
            assert self._cache is not None
            try:
                self._cache = keep_rows(self._cache, index, cut, self._context_length)
            except BaseException:
                # Some layers are cut and others not (out of memory): the batch cannot
                # continue, as after a failed step.
                self._reset()
                raise
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

    @property
    def _width(self) -> int:
        """Columns of the KV cache: the longest active sequence's token count."""
        return int(self._mask.shape[1])

    def _check_new(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> None:
        # A repeated id or an empty row would corrupt the batch for every sequence in it.
        active = {row.seq_id for row in self._rows}
        for seq_id, prompt, _ in requests:
            if seq_id in active:
                raise GenerationError(f"sequence {seq_id} is already active")
            active.add(seq_id)
            if not prompt:
                raise GenerationError(f"sequence {seq_id} has an empty prompt")

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: SlackCache | None,
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

    def _join(self, rows: list[_Row], pieces: list[list[KV]], tokens: list[int]) -> None:
        """Add the new rows (their keys and values are ``pieces[row][layer]``) to the batch,
        every row right-aligned at the longest row's length."""
        width = max([self._width] + [row.length for row in rows])
        # Nothing changes until the new cache is built, so a failure leaves the batch intact.
        self._cache = join_rows(self._cache, pieces, width, self._context_length)
        pads = torch.tensor([width - row.length for row in rows], device=self._device)
        new_mask = torch.arange(width, device=self._device)[None, :] >= pads[:, None]
        self._mask = torch.cat([F.pad(self._mask, (width - self._width, 0), value=False), new_mask])
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


if TYPE_CHECKING:
    _ENGINE_CHECK: type[Engine] = HFEngine  # mypy: HFEngine implements the Engine protocol
