"""`n` in Chat Completions (and Completions): n replies to one prompt, run as n sequences of
one batch that share the prompt's prefill. Greedy replies are our own `generate`, alone; seeded
ones repeat with their seed and differ from each other."""

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_batching import watch_running
from test_server import CHAT, Server, reference, user

MESSAGES = [user("tell me a story about a lighthouse")]


@pytest.fixture(scope="module")
def server(hf_checkpoint, tmp_path_factory):
    """Four rows in a batch at most: n=5 can never run."""
    s = Server(hf_checkpoint, tmp_path_factory.mktemp("choices") / "log", "--temp", "0", "--max-num-seqs", "4")
    yield s
    s.stop()


def chat(server, **fields) -> dict:
    status, body, _ = server.request("POST", CHAT, {"messages": MESSAGES, **fields})
    assert status == 200, body
    return body


def texts(body: dict) -> list:
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
    return [c["message"]["content"] for c in body["choices"]]


def streamed(server, **fields) -> tuple:
    """(each choice's text, each choice's finish reasons, the usage) of a streamed request, by index."""
    stream = server.client().chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                     stream_options={"include_usage": True}, **fields)
    text, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish.setdefault(c.index, []).append(c.finish_reason)
    return [text[i] for i in sorted(text)], [finish.get(i) for i in sorted(text)], usage


def test_greedy_n_gives_the_solo_answer_n_times(server, model, processor):
    expected = reference(model, processor, MESSAGES, 12)
    one = chat(server, max_tokens=12)
    body = chat(server, max_tokens=12, n=3)
    assert texts(body) == [expected] * 3
    assert [c["finish_reason"] for c in body["choices"]] == [one["choices"][0]["finish_reason"]] * 3
    prompt = len(processor.chat_ids(MESSAGES))
    assert body["usage"]["prompt_tokens"] == prompt  # prefilled once
    assert body["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]  # summed over the choices
    assert body["usage"]["total_tokens"] == prompt + 3 * one["usage"]["completion_tokens"]

    got, finish, usage = streamed(server, max_tokens=12, n=3)
    assert got == [expected] * 3
    assert finish == [[one["choices"][0]["finish_reason"]]] * 3  # one finish chunk per choice
    assert usage.completion_tokens == body["usage"]["completion_tokens"] and usage.prompt_tokens == prompt


def test_seeded_n_repeats_with_its_seed_and_its_samples_differ(server):
    fields = {"max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 7}
    first = texts(chat(server, **fields))
    assert texts(chat(server, **fields)) == first
    assert len(set(first)) > 1, first  # each reply draws its own tokens
    assert streamed(server, **fields)[0] == first  # a stream is the same run, chunked
    assert texts(chat(server, **dict(fields, seed=8))) != first


def test_a_seeded_request_draws_the_same_whatever_runs_beside_it(server, model, processor):
    """Its draws come from its own key: alone, beside three sampled requests that join and leave
    at other steps, and as the library's `generate` draws after `mx.random.seed`."""
    import mlx.core as mx

    from mlx_gemma.generation import generate

    fields = {"max_tokens": 12, "temperature": 1.0, "seed": 11}
    alone = texts(chat(server, **fields))
    with ThreadPoolExecutor(max_workers=4) as pool:
        others = [pool.submit(chat, server, max_tokens=n, temperature=1.0) for n in (5, 9, 16)]
        beside = pool.submit(chat, server, **fields)
        assert texts(beside.result()) == alone
        assert all(len(o.result()["choices"]) == 1 for o in others)
    mx.random.seed(11)
    assert alone == [generate(model, processor, MESSAGES, temp=1.0, max_tokens=12)]


def test_each_choice_has_its_own_constraint_and_stop(server, model, processor):
    body = chat(server, n=3, temperature=1.0, seed=3, structured_outputs={"regex": "[0-9]{4}"})
    assert all(re.fullmatch(r"[0-9]{4}", t) for t in texts(body)), texts(body)
    assert len(body["choices"]) == 3

    full = reference(model, processor, MESSAGES, 12)
    stop = full[5:7]
    body = chat(server, n=2, max_tokens=12, stop=[stop])
    assert texts(body) == [full[:full.find(stop)]] * 2
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]


def test_completions_take_n_too(server, model, processor):
    from mlx_gemma.generation import generate

    expected = generate(model, processor, "once upon a time", chat_template=False, temp=0.0, max_tokens=8)
    status, body, _ = server.request("POST", "/v1/completions", {"prompt": "once upon a time", "max_tokens": 8,
                                                                 "n": 2})
    assert status == 200, body
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, expected), (1, expected)]


def test_what_n_cannot_be(server):
    status, body, _ = server.request("POST", CHAT, {"messages": MESSAGES, "n": 5})
    assert status == 400 and body["error"]["param"] == "n"
    assert body["error"]["message"] == ("n: 5 replies run as 5 sequences at once, more than this server runs "
                                        "together (4, --max-num-seqs)")
    status, body, _ = server.request("POST", "/v1/responses", {"input": "hi", "n": 2})
    assert status == 400 and body["error"]["message"] == "n: not a supported parameter"
    status, body, _ = server.request("POST", "/v1/messages", {"max_tokens": 4, "n": 2, "messages": MESSAGES})
    assert status == 400 and body["error"]["message"] == "n: not a supported parameter"
    assert server.request("GET", "/health")[1]["running"] == 0


def test_admission_plans_kv_for_every_choice(hf_checkpoint, tmp_path, model, processor):
    """A budget that holds two sequences' KV at their planned length (and a batch of 8 rows):
    n=2 runs, two of them one after the other, never more than two sequences at once; n=3 never fits."""
    from mlx_gemma.server import build_parser, plan_server

    planned = len(processor.chat_ids(MESSAGES)) + 10
    _, _, plan = plan_server(hf_checkpoint, build_parser().parse_args(["--prompt-cache-bytes", "0"]))
    s = Server(hf_checkpoint, tmp_path / "log", "--temp", "0", "--prompt-cache-bytes", "0", "--max-num-seqs", "8",
               "--memory-limit", f"{plan.fixed + int(2.5 * plan.kv(planned))}B")
    try:
        expected = [reference(model, processor, MESSAGES, 10)] * 2
        stop, seen = threading.Event(), []
        watcher = threading.Thread(target=watch_running, args=(s, stop, seen))
        watcher.start()
        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = list(pool.map(lambda _: s.request("POST", CHAT, {"messages": MESSAGES, "max_tokens": 10,
                                                                       "n": 2}), range(2)))
        stop.set()
        watcher.join()
        assert [(status, texts(body)) for status, body, _ in replies] == [(200, expected)] * 2
        assert max(seen) <= 2
        status, body, _ = s.request("POST", CHAT, {"messages": MESSAGES, "max_tokens": 10, "n": 3})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert re.match(r"^3 replies \(n\) of the prompt and max_tokens need [\d.]+ GB of KV cache",
                        body["error"]["message"]), body
    finally:
        s.stop()
