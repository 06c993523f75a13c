"""Many requests at once: continuous batching in the server's engine, admission by the memory
plan, a failed step, /metrics and /health. Every expected text is our own `generate`, alone:
batching must not change a greedy answer."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server import (CHAT, Server, abandon_stream, data_url, png_bytes, reference, stream_text,
                         user)

QUESTIONS = [f"question {i}: " + "tell me more " * (i * 3) for i in range(8)]


def metric(server, name: str, **labels) -> float:
    """A sample's value from /metrics, parsed by prometheus_client's own parser."""
    status, text, _ = server.request("GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def watch_running(server, stop: threading.Event, seen: list) -> None:
    while not stop.is_set():
        body = server.request("GET", "/health")[1]
        seen.append(body.get("running", 0))
        time.sleep(0.02)


@pytest.fixture(scope="module", params=[None, 8], ids=["full-kv", "8-bit-kv"])
def batch_server(request, tmp_path_factory):
    """(server, its model and processor, its --kv-bits). 8-bit KV runs on the checkpoint whose
    global head dim (64) the default KV group size divides."""
    checkpoint = request.getfixturevalue("smooth_checkpoint" if request.param else "hf_checkpoint")
    from mlx_gemma import load

    flags = ["--kv-bits", str(request.param)] if request.param else []
    s = Server(checkpoint, tmp_path_factory.mktemp("batch") / "log", "--temp", "0", "--max-tokens", "24",
               "--prompt-cache-bytes", "0", *flags)
    yield s, load(checkpoint), request.param
    s.stop()


def test_concurrent_greedy_requests_each_give_their_solo_answer(batch_server, tmp_path):
    batch_server, (model, processor), kv_bits = batch_server
    png = png_bytes(seed=5)
    (tmp_path / "p.png").write_bytes(png)
    chats = [[user(q)] for q in QUESTIONS[:6]] + [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                      {"type": "text", "text": f"picture {i}"}]}] for i in range(2)]
    library = [[user(q)] for q in QUESTIONS[:6]] + [
        [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "p.png")},
                                      {"type": "text", "text": f"picture {i}"}]}] for i in range(2)]
    lengths = [24, 10, 17, 24, 5, 20, 12, 24]
    cache = (lambda: model.make_cache(kv_bits=kv_bits))
    expected = [reference(model, processor, m, n, cache=cache()) for m, n in zip(library, lengths)]

    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_running, args=(batch_server, stop, seen))
    watcher.start()
    client = batch_server.client()
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda a: client.chat.completions.create(model="m", messages=a[0], max_tokens=a[1]),
                                zip(chats, lengths)))
    stop.set()
    watcher.join()
    assert [r.choices[0].message.content for r in replies] == expected
    assert max(seen) >= 3  # they really ran together
    assert metric(batch_server, "mlx_gemma_batch_size_count") > 0


def test_joining_leaving_and_stopping_in_a_running_batch(batch_server):
    """Long replies run; a newcomer joins mid-batch, a client hangs up, a stop string ends one:
    the others' answers are what they are alone."""
    batch_server, (model, processor), kv_bits = batch_server
    cache = (lambda: model.make_cache(kv_bits=kv_bits))
    long_ones = [[user(q)] for q in QUESTIONS[:3]]
    expected = [reference(model, processor, m, 24, cache=cache()) for m in long_ones]
    newcomer = [user("a late question")]
    late = reference(model, processor, newcomer, 12, cache=cache())
    full = reference(model, processor, [user("count with me")], 24, cache=cache())
    stop = full[4:6]
    client = batch_server.client()
    with ThreadPoolExecutor(max_workers=6) as pool:
        running = [pool.submit(stream_text, batch_server, m, 24) for m in long_ones]
        time.sleep(0.3)
        joined = pool.submit(stream_text, batch_server, newcomer, 12)
        gone = pool.submit(abandon_stream, batch_server.port, 24)
        cut = pool.submit(client.chat.completions.create, model="m", messages=[user("count with me")],
                          max_tokens=24, stop=[stop])
        assert [f.result(timeout=120) for f in running] == expected
        assert joined.result(timeout=120) == late
        gone.result(timeout=120)
        assert cut.result(timeout=120).choices[0].message.content == full[:full.find(stop)]
    deadline = time.monotonic() + 30
    while batch_server.request("GET", "/health")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch_server.request("GET", "/health")[1] == {"status": "ok", "busy": False, "waiting": 0, "running": 0}


def test_metrics_count_what_was_served(hf_checkpoint, tmp_path):
    s = Server(hf_checkpoint, tmp_path / "log", "--temp", "0")
    try:
        usage = []
        for q in QUESTIONS[:3]:
            status, body, _ = s.request("POST", CHAT, {"messages": [user(q)], "max_tokens": 6})
            assert status == 200
            usage.append(body["usage"])
        assert s.request("POST", CHAT, {"messages": "nope"})[0] == 400
        assert metric(s, "mlx_gemma_requests_total", endpoint="/v1/chat/completions", status="200") == 3
        assert metric(s, "mlx_gemma_requests_total", endpoint="/v1/chat/completions", status="400") == 1
        assert metric(s, "mlx_gemma_generated_tokens_total") == sum(u["completion_tokens"] for u in usage)
        assert metric(s, "mlx_gemma_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
        assert metric(s, "mlx_gemma_cached_tokens_total") == \
            sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
        assert metric(s, "mlx_gemma_time_to_first_token_seconds_count") == 3
        assert metric(s, "mlx_gemma_memory_budget_bytes") > metric(s, "mlx_gemma_planned_memory_bytes") > 0
    finally:
        s.stop()


def test_admission_holds_to_the_memory_plan(hf_checkpoint, tmp_path, model, processor):
    """A budget that holds two sequences' KV at their planned lengths, not three: four requests
    all succeed, never more than two at once; one that could never fit is a 400 at once."""
    from mlx_gemma.server import build_parser, plan_server

    prompts = [[user(q)] for q in QUESTIONS[:4]]
    planned = max(len(processor.chat_ids(p)) for p in prompts) + 20
    _, _, plan = plan_server(hf_checkpoint, build_parser().parse_args(["--prompt-cache-bytes", "0"]))
    budget = plan.fixed + int(2.5 * plan.kv(planned))
    s = Server(hf_checkpoint, tmp_path / "log", "--temp", "0", "--prompt-cache-bytes", "0", "--memory-limit",
               f"{budget}B")
    try:
        stop, seen = threading.Event(), []
        watcher = threading.Thread(target=watch_running, args=(s, stop, seen))
        watcher.start()
        client = s.client()
        with ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda p: client.chat.completions.create(model="m", messages=p, max_tokens=20),
                                    prompts))
        stop.set()
        watcher.join()
        assert [r.choices[0].message.content for r in replies] == [reference(model, processor, p, 20) for p in prompts]
        assert 1 <= max(seen) <= 2
    finally:
        s.stop()


FAILING_BOOT = """
import sys
import mlx_gemma.model as model
from mlx_gemma.server import main
calls, real = [0], model.Model.__call__
def call(self, input_ids=None, *args, **kwargs):
    if input_ids is not None and input_ids.shape[1] == 1:  # a decode step (the third one)
        calls[0] += 1
        if calls[0] == 3:  # as Metal says when an allocation fails
            raise RuntimeError("[metal::malloc] Attempting to allocate 9999999999 bytes which is greater than the "
                               "maximum")
    return real(self, input_ids, *args, **kwargs)
model.Model.__call__ = call
main()
"""


def test_a_failed_step_answers_5xx_and_the_server_goes_on(hf_checkpoint, tmp_path, model, processor):
    s = Server(hf_checkpoint, tmp_path / "log", "--temp", "0", boot=["-c", FAILING_BOOT])
    try:
        status, body, _ = s.request("POST", CHAT, {"messages": [user("first")], "max_tokens": 10})
        assert status == 500 and body["error"]["code"] == "step_failed"
        assert "the model failed in this step ([metal::malloc] Attempting to allocate" in body["error"]["message"]
        assert s.request("GET", "/health")[0] == 200
        messages = [user("second")]
        status, body, _ = s.request("POST", CHAT, {"messages": messages, "max_tokens": 10})
        assert status == 200 and body["choices"][0]["message"]["content"] == reference(model, processor, messages, 10)
        assert metric(s, "mlx_gemma_step_failures_total") == 1
    finally:
        s.stop()


DYING_BOOT = """
import mlx_gemma.server.engine as engine
from mlx_gemma.server import main
real = engine.Engine._inputs
def inputs(self, job):
    if job.request.messages and job.request.messages[-1]["content"] == "die":
        raise SystemExit("the engine thread ends")  # what no request handler catches
    return real(self, job)
engine.Engine._inputs = inputs
main()
"""


def test_health_says_not_ready_when_the_engine_is_gone(hf_checkpoint, tmp_path):
    s = Server(hf_checkpoint, tmp_path / "log", boot=["-c", DYING_BOOT])
    try:
        assert s.request("GET", "/health")[0] == 200
        # the request it died on, and any after it, are answered (not left to their timeouts)
        for content in ("die", "hello"):
            status, body, _ = s.request("POST", CHAT, {"messages": [user(content)]}, timeout=20)
            assert (status, body["error"]["code"]) == (503, "engine_stopped"), body
        assert s.request("GET", "/health")[:2] == (503, {"status": "engine stopped"})
    finally:
        s.stop()


def test_drafting_in_the_batch_keeps_every_greedy_answer(hf_checkpoint, drafter_checkpoint, tmp_path, model,
                                                         processor):
    """Every sequence drafts and verifies within the shared step, its own accepted run kept and
    its caches trimmed alone: each answer is the undrafted greedy one, and usage and /metrics
    say how many drafts were kept."""
    from mlx_gemma.server.main import DEFAULT_NUM_DRAFT_TOKENS
    from mlx_gemma.speculative import DEFAULT_NUM_DRAFT_TOKENS as LIBRARY_DEFAULT

    assert DEFAULT_NUM_DRAFT_TOKENS == LIBRARY_DEFAULT
    s = Server(hf_checkpoint, tmp_path / "log", "--temp", "0", "--draft-model", str(drafter_checkpoint),
               "--num-draft-tokens", "3", "--prompt-cache-bytes", "0")
    try:
        chats = [[user(q)] for q in QUESTIONS[:4]]
        lengths = [20, 9, 16, 20]
        client = s.client()
        with ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda a: client.chat.completions.create(model="m", messages=a[0],
                                                                             max_tokens=a[1]), zip(chats, lengths)))
        assert [r.choices[0].message.content for r in replies] == \
            [reference(model, processor, c, n) for c, n in zip(chats, lengths)]
        details = [r.usage.completion_tokens_details for r in replies]
        kept = sum(d.accepted_prediction_tokens for d in details)
        proposed = kept + sum(d.rejected_prediction_tokens for d in details)
        assert proposed > 0 and metric(s, "mlx_gemma_drafts_proposed_total") == proposed
        assert metric(s, "mlx_gemma_drafts_accepted_total") == kept
        stream = stream_text(s, chats[0], 20)  # streamed, drafted: the same text
        assert stream == replies[0].choices[0].message.content
    finally:
        s.stop()
