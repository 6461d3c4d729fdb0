"""The batch's KV cache: rows right-aligned with spare columns, joined and shrunk."""

from __future__ import annotations

from pathlib import Path

import torch

from bot.events import ChatTurn
from bot.model.hf import HFEngine
from bot.model.hf.kv_cache import (
    MIN_SLACK_COLUMNS,
    SLACK_COLUMNS,
    SlackCache,
    SlackLayer,
    join_rows,
    keep_rows,
    with_slack,
)
from tests.bot.model.hf.drive import GREEDY, reference_greedy, run_alone, run_batch


def kv(*rows: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[rows, 1 head, columns, 1]`` holding `rows`; the values are ten times the keys."""
    keys = torch.tensor(rows)[:, None, :, None]
    return keys, keys * 10


def columns(tensor: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in tensor[:, 0, :, 0]]


def test_slack_is_a_quarter_of_the_used_columns_within_bounds_and_the_limit() -> None:
    assert with_slack(10, 1000) == 10 + MIN_SLACK_COLUMNS
    assert with_slack(200, 1000) == 250
    assert with_slack(900, 1000) == 900 + SLACK_COLUMNS
    assert with_slack(10, 20) == 20
    assert with_slack(40, 30) == 40  # never less than what is used


def test_a_layer_with_buffers_writes_new_columns_in_place_and_grows_within_its_limit() -> None:
    layer = SlackLayer()
    keys, values = kv([1.0, 2.0, 0.0])
    layer.set_buffers(keys, values, columns=2, max_columns=4)
    assert layer.capacity == 3
    new_keys, new_values = layer.update(*kv([3.0]))
    assert columns(new_keys) == [[1.0, 2.0, 3.0]] and columns(new_values) == [[10.0, 20.0, 30.0]]
    assert new_keys.data_ptr() == keys.data_ptr()  # written into the spare column
    grown, _ = layer.update(*kv([4.0]))
    assert columns(grown) == [[1.0, 2.0, 3.0, 4.0]]
    assert layer.capacity == 4  # grown, but only to the limit


def test_reserve_grows_a_full_cache_keeping_its_columns_and_leaves_a_roomy_one_alone() -> None:
    keys, values = kv([1.0, 2.0])
    cache = SlackCache.from_buffers([(keys, values)], columns=2, max_columns=100)
    assert cache.capacity == 2  # full: the compiled step needs a spare column
    cache.reserve(3)
    assert cache.capacity == 3 + MIN_SLACK_COLUMNS
    ((used_keys, used_values),) = cache.kv()
    assert columns(used_keys) == [[1.0, 2.0]] and columns(used_values) == [[10.0, 20.0]]
    buffer = cache.buffers()[0]
    cache.reserve(3)
    assert cache.buffers()[0] is buffer  # room enough: nothing copied


def test_a_prefill_cache_grows_and_splits_into_its_prompts() -> None:
    cache = SlackCache()
    cache.update(*kv([1.0, 2.0, 3.0, 4.0, 5.0]), 0)
    first, second = cache.split([2, 3])
    assert columns(first[0][0]) == [[1.0, 2.0]] and columns(second[0][1]) == [[30.0, 40.0, 50.0]]


def test_joined_rows_are_right_aligned_behind_zeros_and_kept_rows_lose_common_padding() -> None:
    batch = join_rows(None, [[kv([1.0, 2.0])], [kv([3.0])]], width=2, max_columns=100)
    assert batch.shape == (2, 2)
    assert batch.capacity == 2 + MIN_SLACK_COLUMNS
    joined = join_rows(batch, [[kv([4.0, 5.0, 6.0])]], width=3, max_columns=5)
    ((keys, values),) = joined.kv()
    assert columns(keys) == [[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [4.0, 5.0, 6.0]]
    assert columns(values)[2] == [40.0, 50.0, 60.0]
    assert joined.capacity == 5
    assert batch.shape == (2, 2)  # the old cache is left as it was
    before = joined.buffers()
    kept = keep_rows(joined, torch.tensor([0, 1]), cut=1, max_columns=5)
    assert columns(kept.kv()[0][0]) == [[1.0, 2.0], [0.0, 3.0]]
    assert kept.shape == (2, 2) and kept.capacity == 5
    # In place, in new buffers: the old ones are no longer held (so they are freed).
    assert kept is joined
    assert all(new.data_ptr() != old.data_ptr() for new, old in zip(kept.buffers(), before, strict=True))


# --------------------------------------------------------------------------- in the engine: a tiny GPT-2


def test_cache_shrinks_when_the_longest_sequence_leaves(gpt2: HFEngine) -> None:
    long = gpt2.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    short = gpt2.encode("Hello there")
    middle = gpt2.encode("Be nice. Be brief.")
    assert len(short) < len(middle) < len(long)
    try:
        gpt2.add([(1, long, GREEDY), (2, short, GREEDY)])
        gpt2.step()
        gpt2.add([(3, middle, GREEDY)])
        gpt2.step()
        assert gpt2.kv_cache_shape == (3, len(long) + 2)
        assert len(long) + 2 <= gpt2.kv_cache_capacity <= gpt2.context_length
        gpt2.remove([1])
        assert gpt2.kv_cache_shape == (2, len(middle) + 1)
        assert list(gpt2.step()) == [2, 3]  # the rows left, in order
        assert gpt2.kv_cache_shape == (2, len(middle) + 2)
        gpt2.remove([3])
        assert gpt2.kv_cache_shape == (1, len(short) + 3)
        gpt2.remove([2, 99])  # unknown ids are ignored
        assert gpt2.kv_cache_shape == (0, 0)
    finally:
        gpt2.remove([1, 2, 3])


def test_gpt2_engine_matches_transformers_generate_past_the_spare_columns(gpt2: HFEngine, tiny_gpt2_dir: Path) -> None:
    prompt = gpt2.render_chat(None, [ChatTurn("user", "Paris is the capital of")])
    n = 100  # the cache buffer has to grow at least once
    expected = reference_greedy(tiny_gpt2_dir, prompt, n)
    assert run_alone(gpt2, prompt, n) == expected
    other = gpt2.render_chat("Be nice.", [ChatTurn("user", "Hello")])
    together = run_batch(gpt2, {1: (other, GREEDY), 2: (prompt, GREEDY)}, n, join_at={2: 30})
    assert together[2] == expected
