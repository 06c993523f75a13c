"""Decoder parity with transformers (the reference computes every expected value here)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import reference
from conftest import record_parity
from mlx_gemma.generation import generate_step, stream_generate
from mlx_gemma.loading import load_model

W = reference.WINDOW


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(20, reference.VOCAB, size=n - 1).tolist()


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("n", [W - 4, 4 * W + 7], ids=["shorter-than-window", "4x-window"])
def test_float32_logits_match_reference(model, hf_model, n):
    ids = prompt_ids(n)
    ref = reference.reference_logits(hf_model, ids)
    ours = np.array(model(mx.array([ids]))[0])
    err = rel_err(ours, ref)
    record_parity(f"float32 logits, {n} tokens (window {W})", err)
    assert err <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_track_reference(hf_checkpoint, hf_model, dtype):
    """Half precision cannot match bit for bit. Ours and the reference's are two roundings of
    the same float32 computation, so each must stay within ~1.5x the reference's own rounding
    error (its half-precision logits vs its float32 logits)."""
    ids = prompt_ids(3 * W)
    exact = reference.reference_logits(hf_model, ids)
    ref = reference.reference_logits(reference.load_reference(hf_checkpoint, dtype=getattr(torch, dtype)), ids)
    ours_model = load_model(hf_checkpoint, dtype=getattr(mx, dtype))
    ours = np.array(ours_model(mx.array([ids]))[0].astype(mx.float32))
    reference_rounding = rel_err(ref, exact)
    record_parity(f"{dtype} logits vs transformers {dtype}, {3 * W} tokens", rel_err(ours, ref))
    record_parity(f"({dtype} transformers vs its float32, same prompt)", reference_rounding)
    assert rel_err(ours, ref) <= 1.5 * reference_rounding
    assert rel_err(ours, exact) <= 1.5 * reference_rounding


def test_cached_decode_equals_full_forward(model):
    ids = prompt_ids(4 * W)
    full = np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    for i, t in enumerate(ids):
        step = np.array(model(mx.array([[t]]), cache=cache)[0, -1])
        assert rel_err(step, full[i]) <= 1e-5, f"position {i}"


@pytest.mark.parametrize("chunk", [1, 5, W - 1, W, W + 3])
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids = prompt_ids(5 * W + 2)
    one_shot = np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    pieces = [np.array(model(mx.array([ids[i:i + chunk]]), cache=cache)[0])
              for i in range(0, len(ids), chunk)]
    assert rel_err(np.concatenate(pieces), one_shot) <= 1e-5


def test_greedy_generation_matches_reference(model, processor, hf_model):
    ids = prompt_ids(2 * W + 5, seed=3)
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert len(set(ref)) > 10, "the fixture must not collapse into repeating one token"
    ours = [t for t, _ in generate_step(model, ids, model.make_cache(), max_tokens=64)]
    assert ours[:len(ref)] == ref
    streamed = list(stream_generate(model, processor, ids, max_tokens=64, temp=0.0))
    assert [r.token for r in streamed] == ref
    assert streamed[-1].finish_reason == ("stop" if ref[-1] in processor.eos_token_ids else "length")
