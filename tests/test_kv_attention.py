"""Global-layer attention over the cache as stored: the packed one-tensor form (spec 9) and
quantized codes read by quantized_matmul, against dequantize-then-attend and the two-tensor cache."""

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import reference
from conftest import feed, ids_of
from mlx_gemma import model as model_module
from mlx_gemma.cache import GlobalCache, window_mask
from mlx_gemma.config import ModelConfig, RopeSpec

W = reference.WINDOW


def dequantize_then_attend(q, k, v, scale, mask, group_size, bits):
    """What attention over a quantized cache did before: dequantize all of it, then sdpa."""
    k, v = (mx.dequantize(*t, group_size=group_size, bits=bits) for t in (k, v))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("kv_heads, widths", [(1, (512, 128)), (2, (64, 64))], ids=["packed-mqa", "two-tensor-gqa"])
@pytest.mark.parametrize("L, mask", [(1, None), (5, "causal"), (5, "window"), (5, "blocks")])
def test_folded_attention_equals_dequantize_then_attend(bits, kv_heads, widths, L, mask):
    """What `attend` computes over the stored arrays (quantized or not) against sdpa over their
    dequantized values: the packed cache's keys are its scored array, its values both arrays."""
    T = 300
    cache = GlobalCache(bits=bits, group_size=64)
    q = mx.random.normal((1, 8, L, widths[0]), key=mx.random.key(0))
    stored = [mx.random.normal((1, kv_heads, T, w), key=mx.random.key(i + 1)) for i, w in enumerate(widths)]
    if bits:
        stored = [cache._quantize(x) for x in stored]
    if mask == "window":
        mask = window_mask(L, T - L, 0, T, 64)
    elif mask == "blocks":
        mask = window_mask(L, T - L, 0, T, None, blocks=np.array([[-1, 0, 0, 0, -1]]))
    packed = kv_heads == 1
    got = model_module.attend(q, stored[0], stored if packed else stored[1], mask, cache)
    dense = [mx.dequantize(*x, group_size=64, bits=bits) if bits else x for x in stored]
    values = dense if packed else dense[1:]
    want = [mx.fast.scaled_dot_product_attention(q, dense[0], v, scale=1.0, mask=mask) for v in values]
    for g, w in zip(got if packed else [got], want):
        assert g.shape == w.shape and rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("L", [1, 64])
def test_folded_attention_holds_no_copy_of_the_cache(L, bits):
    """16 query heads on one kv head, the 12B's global layer and its packed cache: the arrays
    are multiplied as stored, not broadcast over the heads (mlx-lm's quantized attention holds
    ~33x an 8-bit cache at decode on the CPU backend, benchmarks/results/kv_attention.md); what
    it holds beyond its inputs is the scores and the outputs."""
    T, heads, widths = 8192, 16, (512, 128)
    cache = GlobalCache(bits=bits, group_size=64)
    q = mx.random.normal((1, heads, L, widths[0]), key=mx.random.key(0))
    stored = [mx.random.normal((1, 1, T, w), key=mx.random.key(i + 1)) for i, w in enumerate(widths)]
    stored = [cache._quantize(x) for x in stored] if bits else stored
    mask = None if L == 1 else window_mask(L, T - L, 0, T, None)
    mx.eval(q, stored)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(model_module.attend(q, stored[0], stored, mask, cache))
    scores, out = heads * L * T * 4, heads * L * sum(widths) * 4
    cache_bytes = sum(p.nbytes for x in stored for p in (x if bits else (x,)))
    assert mx.get_peak_memory() - base <= 1.1 * (scores + out) + cache_bytes // 4


@pytest.mark.parametrize("one_tensor", [True, False], ids=["one-tensor", "two-tensor"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cache_logits_equal_dequantize_then_attend(model, monkeypatch, one_tensor, bits):
    """Same cache contents, both attention paths: chunked prefill across the window, then decode."""
    ids = ids_of(4 * W + 3)
    opts = dict(one_tensor=one_tensor, kv_bits=bits, kv_group_size=32)

    def run():
        cache = model.make_cache(**opts)
        logits = np.concatenate([feed(model, cache, ids[:3 * W], W + 3), feed(model, cache, ids[3 * W:], 1)])
        assert any(isinstance(c, GlobalCache) and c.quantized and c.one_tensor == one_tensor for c in cache)
        return logits

    direct = run()
    monkeypatch.setattr(model_module, "folded_attention", lambda q, k, values, mask, group_size, bits:
                        [dequantize_then_attend(q, k, v, 1.0, mask, group_size, bits) for v in values])
    assert rel_err(direct, run()) <= 1e-5


def test_decode_step_ropes_only_the_new_token_and_reads_the_stored_arrays(model, monkeypatch):
    cache = model.make_cache()
    feed(model, cache, ids_of(5 * W), 7)
    roped, read = [], []
    rope, attend = model_module.RoPE.__call__, model_module.attend
    monkeypatch.setattr(model_module.RoPE, "__call__", lambda self, x, offset: roped.append(x.shape[2]) or rope(self, x, offset))
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, mask, c: read.append((k, v, c)) or attend(q, k, v, mask, c))
    model(mx.array([[5]]), cache=cache)
    assert set(roped) == {1}  # queries and the new key: nothing over the cached tokens
    packed = [(k, v, c) for k, v, c in read if getattr(c, "one_tensor", False)]
    spec = next(s for s in model.config.text_config.layers if s.packs_kv)
    widths = spec.packed_widths()
    for k, v, c in packed:  # the scores read the first stored array, the values both: nothing derived
        assert v[0] is k and [x.shape[2:] for x in v] == [(5 * W + 1, w) for w in widths]
        assert all(x.shape[-1] == s.shape[-1] for x, s in zip(v, c.stored))
    assert packed


def test_one_tensor_cached_kv_are_the_true_keys_and_values(model):
    ids = ids_of(3 * W)
    one, two = model.make_cache(one_tensor=True), model.make_cache(one_tensor=False)
    feed(model, one, ids, 5)
    feed(model, two, ids, 5)
    i = next(s.index for s in model.config.text_config.layers if s.packs_kv)
    attn = model.layers[i].self_attn
    for got, want in zip(attn.cached_kv(one[i], 20), attn.cached_kv(two[i], 20)):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6


def test_full_rope_keeps_two_tensors():
    """When every dim rotates, K shares nothing with N that survives RoPE: one tensor would need
    all of K beside N, i.e. no saving, so such layers keep the plain two-tensor cache."""
    text = ModelConfig.from_file(Path(__file__).parent / "data" / "gemma-4-12B-it.config.json").text_config
    spec = next(s for s in text.layers if s.k_eq_v)
    assert spec.packs_kv and spec.packed_width() == 640 and spec.packed_width(64) == 640
    full = dataclasses.replace(spec, rope=RopeSpec(spec.rope.theta, spec.head_dim, spec.head_dim // 2))
    assert not full.packs_kv
