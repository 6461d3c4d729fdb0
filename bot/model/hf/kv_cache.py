"""The batch's KV cache: per layer, keys and values ``[rows, heads, columns, dim]``.

Each row's tokens sit right-aligned in the columns, with padding on the left (the
runner's attention mask hides it). `join_rows` copies the batch and new rows into
new buffers padded on the left to the longest row; `keep_rows` keeps some rows and
drops the columns that became padding in every row, one layer at a time. So the cache
holds (rows) x (longest row) columns, plus spare ones that decode steps write into (a
quarter of the used ones, between `MIN_SLACK_COLUMNS` and `SLACK_COLUMNS`), and never
more than the context length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bot.errors import GenerationError

SLACK_COLUMNS = 64
MIN_SLACK_COLUMNS = 16

KV = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values, each ``[rows, heads, columns, dim]``."""


def with_slack(columns: int, max_columns: int) -> int:
    """Columns to allocate for `columns` used ones: room for a quarter more (at least
    `MIN_SLACK_COLUMNS`, at most `SLACK_COLUMNS`), within `max_columns`. Proportional,
    because short replies in a big batch are the common case: a fixed 64 spare columns
    were 40% of the cache at 32 rows x 100 columns (90 MiB), while the copy that grows
    the cache still comes at most once every width / 4 steps."""
    slack = min(SLACK_COLUMNS, max(MIN_SLACK_COLUMNS, columns // 4))
    return max(columns, min(columns + slack, max_columns))


def resized(kv: torch.Tensor, columns: int) -> torch.Tensor:
    """A buffer of `columns` columns starting with `kv`'s columns (the rest unset)."""
    rows, heads, used, dim = kv.shape
    buffer = kv.new_empty((rows, heads, columns, dim))
    buffer[:, :, :used] = kv
    return buffer


class SlackLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A `DynamicLayer` whose keys and values are prefix views of buffers with spare
    columns on the right, once it is handed buffers (`set_buffers`): appending a token
    then writes one column instead of copying the whole layer, which cost ~15% of a
    step at 8 rows x 850 columns. Without buffers (a prefill) it grows by `torch.cat`."""

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

    def reserve(self, columns: int) -> None:
        """Grow the buffers (with slack) if they hold fewer than `columns` columns."""
        if self._key_buffer is None or self._value_buffer is None or self.keys is None or self.values is None:
            return
        if columns > self._key_buffer.shape[-2]:
            allocated = with_slack(columns, self._max_columns)
            self._key_buffer = resized(self.keys, allocated)
            self._value_buffer = resized(self.values, allocated)
            used = int(self.keys.shape[-2])
            self.keys, self.values = self._key_buffer[:, :, :used], self._value_buffer[:, :, :used]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key_buffer is None or self._value_buffer is None or self.keys is None or self.values is None:
            return super().update(key_states, value_states, *args, **kwargs)
        start = int(self.keys.shape[-2])
        end = start + int(key_states.shape[-2])
        self.reserve(end)
        keys, values = self._key_buffer, self._value_buffer
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class SlackCache(DynamicCache):
    """A `DynamicCache` made of `SlackLayer`s. Empty, it serves a prefill (layers grow
    as the model writes them); `join_rows` and `keep_rows` build the batch's."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = SlackLayer

    @classmethod
    def from_buffers(cls, buffers: Sequence[KV], columns: int, max_columns: int) -> SlackCache:
        """A cache whose layers adopt `buffers` (see `SlackLayer.set_buffers`)."""
        cache = cls()
        for keys, values in buffers:
            layer = SlackLayer()
            layer.set_buffers(keys, values, columns, max_columns)
            cache.layers.append(layer)
        return cache

    def kv(self) -> list[KV]:
        """Each layer's keys and values (the used columns)."""
        out: list[KV] = []
        for layer in self.layers:
            if not isinstance(layer, SlackLayer) or layer.keys is None or layer.values is None:
                raise GenerationError(f"unsupported KV cache layer {type(layer).__name__}")
            out.append((layer.keys, layer.values))
        return out

    def buffers(self) -> list[torch.Tensor]:
        """Every layer's key and value buffers, ``[k0, v0, k1, v1, …]``, each
        ``[rows, heads, capacity, dim]``: the used columns first, then spare ones."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if not isinstance(layer, SlackLayer) or layer._key_buffer is None or layer._value_buffer is None:
                raise GenerationError(f"KV cache layer {type(layer).__name__} has no buffers")
            out += [layer._key_buffer, layer._value_buffer]
        return out

    def reserve(self, columns: int) -> None:
        """Make every layer's buffers hold at least `columns` columns (with slack)."""
        for layer in self.layers:
            assert isinstance(layer, SlackLayer)
            layer.reserve(columns)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one token per row: ``keys``/``values`` are ``[layers, rows, heads, dim]``."""
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, SlackLayer)
            layer.update(keys[i][:, :, None], values[i][:, :, None])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the keys and values."""
        keys, _ = self.kv()[0]
        return (int(keys.shape[0]), int(keys.shape[2]))

    @property
    def capacity(self) -> int:
        """Columns allocated per row (used plus spare)."""
        layer = self.layers[0]
        assert isinstance(layer, SlackLayer)
        return layer.capacity

    def split(self, lengths: Sequence[int]) -> list[list[KV]]:
        """For a cache of one row holding prompts laid end to end (of `lengths` tokens):
        each prompt's keys and values, per layer."""
        layers = self.kv()
        pieces: list[list[KV]] = []
        end = 0
        for n in lengths:
            end += n
            pieces.append([(keys[:, :, end - n : end], values[:, :, end - n : end]) for keys, values in layers])
        return pieces


def join_rows(cache: SlackCache | None, pieces: Sequence[Sequence[KV]], width: int, max_columns: int) -> SlackCache:
    """A new cache: the rows of `cache` (if any), then one row per piece (``pieces[row][layer]``),
    each right-aligned at `width` columns with zeros on its left. `cache` is left as it is,
    so a failure leaves the batch intact."""
    old = cache.kv() if cache is not None else []
    rows = (old[0][0].shape[0] if old else 0) + sum(piece[0][0].shape[0] for piece in pieces)
    allocated = with_slack(width, max_columns)
    joined: list[KV] = []
    for li, (sample, _) in enumerate(pieces[0]):
        shape = (rows, sample.shape[1], allocated, sample.shape[3])
        keys, values = sample.new_zeros(shape), sample.new_zeros(shape)
        parts = ([old[li]] if old else []) + [piece[li] for piece in pieces]
        row = 0
        for part_keys, part_values in parts:
            n, columns = part_keys.shape[0], part_keys.shape[2]
            keys[row : row + n, :, width - columns : width] = part_keys
            values[row : row + n, :, width - columns : width] = part_values
            row += n
        joined.append((keys, values))
    return SlackCache.from_buffers(joined, width, max_columns)


def keep_rows(cache: SlackCache, index: torch.Tensor, cut: int, max_columns: int) -> SlackCache:
    """Keep the rows at `index` without their first `cut` columns, in new buffers, one
    layer at a time: each layer's old buffers are freed before the next layer's new ones
    are made, so the cache never exists twice in memory (at 32 rows that was ~200 MB at
    the end of every reply). Changes `cache` in place and returns it; if this raises,
    some layers are cut and others not, and the caller must drop the cache."""
    _, columns = cache.shape
    allocated = with_slack(columns - cut, max_columns)
    for layer in cache.layers:
        assert isinstance(layer, SlackLayer) and layer.keys is not None and layer.values is not None
        keys = resized(layer.keys[index, :, cut:], allocated)
        values = resized(layer.values[index, :, cut:], allocated)
        layer.set_buffers(keys, values, columns - cut, max_columns)
    return cache
