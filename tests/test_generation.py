"""Generation loop behaviour: stop tokens, thought channel, generation_config defaults."""

import json

import mlx.core as mx
import pytest

from mlx_gemma.generation import generate, stream_generate
from mlx_gemma.prompt import GenerationDefaults


def scripted(processor, pieces):
    """A sampler that emits a fixed token script (strings are encoded, ints used as ids)."""
    ids = []
    for p in pieces:
        ids += [p] if isinstance(p, int) else processor.encode(p, add_special_tokens=False)
    it = iter(ids)
    # The loop queues one step ahead of what it yields, so the script may be read past its end.
    return lambda logprobs: mx.array([next(it, 0)]), ids


def tok(processor, s):
    return processor.tokenizer.convert_tokens_to_ids(s)


def test_thoughts_are_streamed_apart_from_the_answer(model, processor):
    sampler, _ = scripted(processor, [tok(processor, "<|channel>"), "thought\nweigh it", tok(processor, "<channel|>"),
                                      "the answer", tok(processor, "<turn|>")])
    out = list(stream_generate(model, processor, "q", sampler=sampler, max_tokens=50))
    thought = "".join(r.text for r in out if r.thinking)
    answer = "".join(r.text for r in out if not r.thinking)
    assert (thought, answer) == ("weigh it", "the answer")
    assert out[-1].finish_reason == "stop"
    sampler, _ = scripted(processor, [tok(processor, "<|channel>"), "thought\nhmm", tok(processor, "<channel|>"),
                                      "ok", 1])
    assert generate(model, processor, "q", sampler=sampler) == "ok"


@pytest.mark.parametrize("stop", ["<turn|>", "<eos>"])
def test_stops_at_end_of_turn_and_end_of_sequence(model, processor, stop):
    sampler, ids = scripted(processor, ["abc", tok(processor, stop), "never"])
    out = list(stream_generate(model, processor, "q", sampler=sampler, max_tokens=50))
    assert "".join(r.text for r in out) == "abc"
    assert out[-1].finish_reason == "stop" and out[-1].generation_tokens == 4


def test_max_tokens_ends_with_length(model, processor):
    out = list(stream_generate(model, processor, "q", temp=0.0, max_tokens=5))
    assert out[-1].finish_reason in ("length", "stop") and out[-1].generation_tokens <= 5
    if out[-1].finish_reason == "length":
        assert out[-1].generation_tokens == 5


@pytest.mark.parametrize("max_kv_size", [None, 400])
def test_a_reply_ends_with_length_where_the_context_is_full(model, processor, max_kv_size):
    """At the model's context (512 tokens here) or at max_kv_size, short of max_tokens."""
    from conftest import ids_of

    prompt = ids_of(395)
    room = (max_kv_size or model.config.text_config.max_position_embeddings) - len(prompt)
    cache = model.make_cache()
    out = list(stream_generate(model, processor, prompt, cache=cache, max_tokens=200, max_kv_size=max_kv_size,
                               sampler=lambda logprobs: mx.array([40])))  # never an end token
    assert len(out) == room and out[-1].generation_tokens == room and out[-1].finish_reason == "length"
    assert cache[0].offset == len(prompt) + room - 1  # the last token is yielded, never fed


def test_generation_config_defaults_and_suppressed_tokens(tmp_path, model, processor):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_k": 64, "top_p": 0.95,
        "eos_token_id": [1, 106, 50], "suppress_tokens": [258883, 258882]}))
    d = GenerationDefaults.from_file(tmp_path / "generation_config.json")
    assert (d.temperature, d.top_k, d.top_p, d.eos_token_ids, d.suppress_tokens) == \
        (0.7, 64, 0.95, [1, 106, 50], [258883, 258882])
    assert GenerationDefaults.from_file(tmp_path / "absent.json").temperature == 0.0
    # A suppressed token is never produced, even when it is the greedy choice.
    greedy = [r.token for r in stream_generate(model, processor, "q", temp=0.0, max_tokens=1)][0]
    saved = processor.defaults.suppress_tokens
    try:
        processor.defaults.suppress_tokens = [greedy]
        first = [r.token for r in stream_generate(model, processor, "q", temp=0.0, max_tokens=1)][0]
    finally:
        processor.defaults.suppress_tokens = saved
    assert first != greedy


def test_checkpoint_eos_ids_are_stop_tokens(processor):
    assert {1, 106} <= processor.eos_token_ids


@pytest.mark.parametrize("max_tokens", [50, 3])
def test_one_response_per_generated_token(model, processor, max_tokens):
    """Channel markers and the stop token included, none twice (also when the budget ends on a
    marker): ChatSession rebuilds what its cache holds from these tokens."""
    script = [tok(processor, "<|channel>"), "thought\nhm", tok(processor, "<channel|>"), "yes", tok(processor, "<turn|>")]
    sampler, ids = scripted(processor, script)
    ids = ids[:max_tokens]
    if max_tokens == 3:
        ids[-1] = tok(processor, "<channel|>")
        sampler, _ = scripted(processor, ids)
    out = list(stream_generate(model, processor, "q", sampler=sampler, max_tokens=max_tokens))
    assert [r.token for r in out] == ids
    assert [r.generation_tokens for r in out] == list(range(1, len(ids) + 1))
    assert [r.finish_reason for r in out] == [None] * (len(ids) - 1) + ["stop" if max_tokens == 50 else "length"]


def test_chat_cache_ids_match_the_cache_in_thinking_mode(model, processor):
    from mlx_gemma.generation import ChatSession

    chat = ChatSession(model, processor, enable_thinking=True)
    sampler, _ = scripted(processor, [tok(processor, "<|channel>"), "thought\nhm", tok(processor, "<channel|>"), "ok",
                                      tok(processor, "<turn|>")])
    list(chat.send("q", sampler=sampler, max_tokens=50))
    assert len(chat.cached_ids) == chat.cache[0].offset
    # What the cache holds is the prompt and the reply as generated, markers included.
    tail = [tok(processor, "<channel|>"), *processor.encode("ok", add_special_tokens=False), tok(processor, "<turn|>")]
    assert chat.cached_ids[-len(tail):] == tail


def test_completion_penalties_follow_openais_formula():
    """logit - frequency x count - presence x (count > 0), over the generated tokens only."""
    import numpy as np

    from mlx_gemma.generation import completion_penalties

    process = completion_penalties(presence=0.5, frequency=0.25)
    prompt, generated = [3, 3, 4], [5, 5, 5, 6]
    outs = [np.array(process(mx.array(prompt + generated[:n]), mx.zeros((1, 10))))[0]
            for n in range(len(generated) + 1)]  # the n-th call sees n generated tokens
    expected = np.zeros(10)
    expected[5], expected[6] = -(3 * 0.25 + 0.5), -(0.25 + 0.5)
    np.testing.assert_allclose(outs[-1], expected)
    assert not outs[0].any() and outs[1][5] == -0.75 and not outs[1][3]  # the prompt's 3s are not counted


def test_thought_budget_closes_the_channel_after_budget_tokens(model, processor):
    from mlx_gemma.generation import make_sampling, thought_budget

    start, end = processor.thought_start_id, processor.thought_end_id
    calls = [0]

    def open_thought(tokens, logits):  # the model opens its thought channel at once
        calls[0] += 1
        return mx.where(mx.arange(logits.shape[-1]) == start, 0.0, -mx.inf + logits) if calls[0] == 1 else logits

    def tokens(budget):
        calls[0] = 0
        _, processors = make_sampling(processor, temp=0.0)
        return [r.token for r in stream_generate(model, processor, "q", temp=0.0, max_tokens=12,
                                                 logits_processors=[open_thought, *processors,
                                                                    thought_budget(processor, budget)])]

    capped = tokens(3)
    assert capped[0] == start and capped[4] == end and end not in capped[1:4]  # three thought tokens, then the end
    free = tokens(100)
    assert free[0] == start and end not in free[1:5]  # without the cap this model goes on thinking
