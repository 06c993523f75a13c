"""Caches: bounded sliding window, trimming before and after the window wraps, prefix reuse."""

import mlx.core as mx
import numpy as np
import pytest

import reference
from mlx_gemma.cache import GlobalCache, SlidingWindowCache, reuse_prefix
from mlx_gemma.generation import ChatSession, generate

W = reference.WINDOW


def ids_of(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(20, reference.VOCAB, size=n).tolist()


def feed(model, cache, ids, chunk=7):
    out = None
    for i in range(0, len(ids), chunk):
        out = model(mx.array([ids[i:i + chunk]]), cache=cache)
    return np.array(out[0, -1])


def test_sliding_cache_memory_is_bounded_by_window():
    cache = SlidingWindowCache(window=64, slack=16)
    sizes = []
    for _ in range(200):  # 200 x 13 = 2600 tokens, 40x the window
        k = mx.zeros((1, 2, 13, 8))
        cache.update_and_fetch(k, k)
        sizes.append(cache.keys.shape[2])
    assert cache.offset == 2600
    assert max(sizes) <= cache.capacity + cache.step
    assert cache.nbytes == 2 * cache.keys.size * 4


@pytest.mark.parametrize("prefix_len", [W // 2, 300], ids=["before-wrap", "after-wrap"])
@pytest.mark.parametrize("n_trim", [1, 5])
def test_trim_then_decode_equals_never_seen(model, prefix_len, n_trim):
    """Speculative rollback: feed drafts, trim them, continue == never fed them."""
    prefix, drafts, cont = ids_of(prefix_len, 1), ids_of(n_trim, 2), ids_of(W + 2, 3)
    cache = model.make_cache(sliding_slack=8)  # 300 tokens overflow the 256-slot buffer
    feed(model, cache, prefix)
    feed(model, cache, drafts, chunk=1)
    if prefix_len > W:
        assert any(isinstance(c, SlidingWindowCache) and c.offset > c._len for c in cache), "must have wrapped"
    for c in cache:
        assert c.trim(n_trim) == n_trim
    got = [np.array(model(mx.array([[t]]), cache=cache)[0, -1]) for t in cont]
    fresh = model.make_cache()
    feed(model, fresh, prefix)
    want = [np.array(model(mx.array([[t]]), cache=fresh)[0, -1]) for t in cont]
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=0, atol=1e-5)


def small_sliding_cache():
    cache = SlidingWindowCache(window=8, slack=4)
    cache.step = 4  # wrap (evict) after a few tokens
    return cache


@pytest.mark.parametrize("make", [small_sliding_cache, GlobalCache], ids=["sliding", "global"])
def test_each_cache_kind_trims_to_the_same_state(make):
    x = mx.arange(40 * 3, dtype=mx.float32).reshape(1, 1, 40, 3)
    a, b = make(), make()
    for i in range(0, 40, 3):  # a sees all 40 tokens, then drops the last 3
        a.update_and_fetch(x[:, :, i:i + 3], x[:, :, i:i + 3])
    a.trim(3)
    for i in range(0, 37, 3):  # b sees only the first 37
        j = min(i + 3, 37)
        b.update_and_fetch(x[:, :, i:j], x[:, :, i:j])
    assert a.offset == b.offset == 37
    if isinstance(a, SlidingWindowCache):
        assert a.offset > a._len, "must have wrapped"
    new = mx.full((1, 1, 1, 3), -1.0)
    assert a.make_mask(1) == b.make_mask(1)
    ka, va = a.update_and_fetch(new, new)
    kb, vb = b.update_and_fetch(new, new)
    assert np.array_equal(np.array(ka), np.array(kb)) and np.array_equal(np.array(va), np.array(vb))


def test_trim_beyond_slack_after_wrap_is_refused():
    cache = small_sliding_cache()
    for _ in range(30):
        k = mx.zeros((1, 1, 1, 2))
        cache.update_and_fetch(k, k)
    assert cache.slack <= cache.max_trim < cache.slack + cache.step
    too_many = cache.max_trim + 1
    with pytest.raises(ValueError, match=f"cannot trim {too_many} tokens"):
        cache.trim(too_many)
    assert cache.offset == 30


def test_reuse_prefix_keeps_shared_tokens(model):
    shared, old_tail, new_tail = ids_of(3 * W, 4), ids_of(6, 5), ids_of(9, 6)
    cache = model.make_cache()
    feed(model, cache, shared + old_tail)
    kept = reuse_prefix(cache, shared + old_tail, shared + new_tail)
    assert kept == len(shared) and cache[0].offset == len(shared)
    got = feed(model, cache, new_tail)
    want = feed(model, model.make_cache(), shared + new_tail)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_chat_session_reuses_cache_and_matches_fresh_run(model, processor):
    chat = ChatSession(model, processor)
    first = "".join(r.text for r in chat.send("hello there", temp=0.0, max_tokens=12) if not r.thinking)
    second = "".join(r.text for r in chat.send("and then?", temp=0.0, max_tokens=12) if not r.thinking)
    assert chat.reused_tokens > 0
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    assert second == generate(model, processor, history, temp=0.0, max_tokens=12)
