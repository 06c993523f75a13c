"""Compiled decode (generation.compiled_decode): the same tokens, logits and caches as the eager
step, for every cache kind, across buffer reallocations, with media, sampling and processors."""

import mlx.core as mx
import numpy as np
import pytest

import media_files as mf
from conftest import ids_of
from mlx_gemma import cache as cache_module, generation
from mlx_gemma.generation import ChatSession, generate_step, make_sampling
from mlx_gemma.prompt import MediaOptions

# Prompt 200 and 80 new tokens: the global buffers grow and the sliding ones are laid out
# again at token 256, inside the decode; the 4-bit cache starts quantizing at token 230.
PROMPT, NEW = 200, 80
KINDS = {"one-tensor": {}, "two-tensor": dict(one_tensor=False), "one-tensor 8-bit": dict(kv_bits=8, kv_group_size=32),
         "two-tensor 4-bit from 230": dict(one_tensor=False, kv_bits=4, kv_group_size=32, quantized_kv_start=230)}


def decode(model, compile, make_cache=None, **kwargs):
    cache = (make_cache or model.make_cache)()
    steps = list(generate_step(model, ids_of(PROMPT, seed=3), cache, max_tokens=NEW, compile=compile, **kwargs))
    return [t for t, _ in steps], np.stack([np.array(lp) for _, lp in steps]), cache


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_decode_equals_eager(model, kind):
    eager_tokens, eager_lp, eager_cache = decode(model, False, lambda: model.make_cache(**KINDS[kind]))
    tokens, lp, cache = decode(model, True, lambda: model.make_cache(**KINDS[kind]))
    assert tokens == eager_tokens
    np.testing.assert_allclose(lp, eager_lp, atol=1e-5, rtol=0)
    for ours, theirs in zip(cache, eager_cache):  # the same tokens cached, the same bookkeeping
        assert (ours.offset, len(ours.state)) == (theirs.offset, len(theirs.state))
        for a, b in zip(ours.state, theirs.state):
            np.testing.assert_allclose(np.array(a[..., :ours.offset, :]), np.array(b[..., :ours.offset, :]), atol=1e-6)


def test_one_trace_per_buffer_layout(model, monkeypatch):
    """Traced again only when a buffer is reallocated (both kinds at token 256), not per step."""
    made = []
    real = cache_module.DecodeStep.__init__
    monkeypatch.setattr(cache_module.DecodeStep, "__init__", lambda self, *a: (made.append(1), real(self, *a))[1])
    decode(model, True)
    assert len(made) == 2 * len(model.make_cache())


def test_compiled_sampling_and_processors_equal_eager(model, processor):
    """A seeded sampler draws the same tokens; a repetition penalty sees the same history."""
    sampler, processors = make_sampling(processor, temp=1.0, top_p=0.9)
    processors += generation.make_logits_processors(repetition_penalty=1.3)
    runs = []
    for compile in (False, True):
        mx.random.seed(7)
        runs.append(decode(model, compile, sampler=sampler, logits_processors=processors)[0])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_compiled_chat_with_an_image_equals_eager(model, processor, tmp_path, monkeypatch):
    """Through the whole stack (prompt, media, chunked prefill, a cache kept across turns), with
    the public `compile` switch."""
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(mf.noise_image(120, 90)).save(img)
    replies, traced = [], []
    build = generation.compiled_decode
    monkeypatch.setattr(generation, "compiled_decode", lambda *a: traced.append(compile) or build(*a))
    for compile in (False, True):
        chat = ChatSession(model, processor, media_options=MediaOptions(image_budget=70))
        turns = [chat.send("what is this?", image=[str(img)], temp=0.0, max_tokens=20, prefill_step_size=32,
                           compile=compile),
                 chat.send("and then?", temp=0.0, max_tokens=20, compile=compile)]
        replies.append([[r.token for r in turn] for turn in turns])
        assert chat.reused_tokens > 0
    assert replies[0] == replies[1] and traced == [True, True]  # one compiled step per turn, none eager


def test_compiled_decode_of_a_quantized_model_with_split_matmuls(quant_source, tmp_path):
    """4-bit weights, each matmul split over CPU streams (backend.split_matmuls) inside the trace."""
    from mlx_gemma.backend import split_matmuls
    from mlx_gemma.loading import load_model
    from mlx_gemma.checkpoint import quantize_checkpoint

    model = load_model(quantize_checkpoint(str(quant_source), str(tmp_path / "q4")), split=1)
    eager_tokens, eager_lp, _ = decode(model, False)
    assert split_matmuls(model, 2) > 0
    tokens, lp, _ = decode(model, True)
    assert tokens == eager_tokens
    np.testing.assert_allclose(lp, eager_lp, atol=1e-4, rtol=0)
