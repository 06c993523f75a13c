"""Several sequences in one forward pass (`Model.step_rows`): each row keeps its own caches, so
sliding windows at different offsets and wrap states, the packed global cache and quantized KV
all decode together; every row must match that sequence decoded alone."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import ids_of


@pytest.mark.parametrize("cache_kind", [dict(), dict(kv_bits=8), dict(one_tensor=False)],
                         ids=["packed", "8-bit", "two-tensor"])
def test_rows_decode_as_each_sequence_alone(model, cache_kind):
    prompts = [ids_of(n, seed=n) for n in (5, 23, 40)]  # the window is 16: unwrapped, wrapped, wrapped twice
    alone = [model.make_cache(**cache_kind) for _ in prompts]
    rows = [model.make_cache(**cache_kind) for _ in prompts]
    last = []
    for prompt, a, r in zip(prompts, alone, rows):
        for cache in (a, r):
            logits = model(mx.array([prompt]), cache=cache)
        last.append(int(mx.argmax(logits[0, -1]).item()))
    worst = 0.0
    for _ in range(12):  # greedy: each sequence feeds back its own token
        batched = model.step_rows(mx.array([[t] for t in last]), rows)[:, -1]
        single = mx.concatenate([model(mx.array([[t]]), cache=a)[:, -1] for t, a in zip(last, alone)])
        worst = max(worst, float(mx.max(mx.abs(batched - single)).item()))
        tokens = mx.argmax(batched, axis=-1).tolist()
        assert tokens == mx.argmax(single, axis=-1).tolist()
        last = tokens
    assert worst < 1e-4, worst  # float32: only the batched matmuls' reduction order may differ
    assert [c[0].offset for c in rows] == [c[0].offset for c in alone]


def test_rows_take_blocks_of_several_tokens(model):
    """A verify block per row (what batched drafting feeds): logits of every position."""
    prompts = [ids_of(n, seed=n + 1) for n in (9, 30)]
    caches = [model.make_cache() for _ in prompts]
    for p, c in zip(prompts, caches):
        model(mx.array([p]), cache=c)
    block = np.array([ids_of(4, seed=7)[1:], ids_of(4, seed=8)[1:]])
    batched = model.step_rows(mx.array(block), caches)
    for row, p in zip(range(2), prompts):
        cache = model.make_cache()
        model(mx.array([p]), cache=cache)
        single = model(mx.array(block[row:row + 1]), cache=cache)
        np.testing.assert_allclose(np.array(batched[row]), np.array(single[0]), atol=1e-4)
