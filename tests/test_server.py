"""`python -m mlx_gemma.server` as a client meets it: a real server process on 127.0.0.1 (a
free port) driven by the real `openai` client and by raw HTTP. Our own `generate` computes
every expected text. Each server is stopped by its fixture; every loop is bounded."""

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import openai
import pytest

import media_files as mf
from mlx_gemma.constrain import Constraint
from mlx_gemma.generation import generate


REPO = Path(__file__).resolve().parent.parent
KEY = "test-key"
MAX_BODY = 4_000_000
SYSTEM = "you are a terse assistant. the answer is always short, and it is given in plain words."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ranks` > 1 starts that many ranks on 127.0.0.1 as mlx.launch does (its ring hostfile,
    MLX_RANK) in a process group of their own, which `stop` signals whole."""

    def __init__(self, checkpoint: Path, log: Path, *flags, boot=("-m", "mlx_gemma.server"),
                 ranks: int = 1):
        self.port, self.log_path, self.model = free_port(), log, str(checkpoint)
        self.name = checkpoint.name  # the served model id
        self.log = open(log, "w")
        cmd = [sys.executable, *boot, "--model", str(checkpoint), "--port", str(self.port),
               "--api-key", KEY, "--max-tokens", "16", "--max-body-bytes", str(MAX_BODY), *flags]
        self.procs = []
        if ranks > 1:
            from benchmarks.distributed import loopback_hostfile

            hostfile = loopback_hostfile(log.with_name(log.name + ".hosts.json"), ranks)
            for r in range(ranks):  # one process group (rank 0's), as the launcher's ranks share one
                self.procs.append(subprocess.Popen(
                    cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                    process_group=self.procs[0].pid if self.procs else 0))
        else:
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT))
        self.proc = self.procs[0]
        self.group = ranks > 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), log.read_text()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not start within 120 s:\n" + log.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kwargs)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60):
        """(status, parsed JSON or text, headers) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}",
                                                           "Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw), {k.lower(): v for k, v in r.getheaders()}
            except ValueError:
                return r.status, raw.decode(errors="replace"), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def log_lines(self, at_least: int = 0) -> list:
        """The per-request log lines (written just after each response is sent: wait up to 5 s)."""
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in self.log_path.read_text().splitlines() if re.search(r" (GET|POST) /", line)]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def wait(self, timeout: float) -> None:
        """Until the server (every rank) has exited."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))

    def stop(self):
        self._signal(signal.SIGTERM)
        try:
            self.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.wait(timeout=20)
        if self.group:  # whatever of the group outlived rank 0
            self._signal(signal.SIGKILL)
        self.log.close()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig) if self.group else self.proc.send_signal(sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(hf_checkpoint, tmp_path_factory):
    s = Server(hf_checkpoint, tmp_path_factory.mktemp("server") / "server.log", "--queue-size", "64")
    yield s
    s.stop()
    assert s.proc.returncode is not None


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def reference(model, processor, messages, max_tokens, **kwargs) -> str:
    return generate(model, processor, messages, temp=0.0, max_tokens=max_tokens, **kwargs)


def png_bytes(h=40, w=56, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mf.noise_image(h, w, seed)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def wav_bytes(tmp_path, seconds=0.4) -> bytes:
    return mf.write_wav(tmp_path / "a.wav", 16000, seconds).read_bytes()


# --- behaviour ----------------------------------------------------------------------------------

IDLE = {"status": "ok", "busy": False, "waiting": 0, "running": 0}


def test_models_health_and_the_log_line(server, hf_checkpoint):
    assert server.request("GET", "/health")[:2] == (200, IDLE)
    before = len(server.log_lines())
    models = server.client().models.list()
    assert [m.id for m in models.data] == [hf_checkpoint.name]  # the folder's name, not a path
    line = server.log_lines(before + 1)[-1]
    assert re.search(r"GET /v1/models 200 prompt=- cached=- generated=- \d+\.\d+s$", line), line
    assert server.client().models.retrieve("gpt-4o").id == "gpt-4o"  # any name is served


def test_greedy_chat_equals_generate_streamed_and_not(server, model, processor):
    messages = [{"role": "system", "content": "be brief"}, user("why is the sky blue")]
    expected = reference(model, processor, messages, 12)
    before = len(server.log_lines())
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(processor.chat_ids(messages))
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                            max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    line = server.log_lines(before + 2)[-1]
    assert re.search(rf"POST /v1/chat/completions 200 prompt={prompt_tokens} cached=\d+ generated="
                     rf"{r.usage.completion_tokens} ", line), line


def test_completions_equal_generate_without_template(server, model, processor):
    expected = generate(model, processor, "the sky is", chat_template=False, temp=0.0, max_tokens=10)
    r = server.client().completions.create(model=server.model, prompt="the sky is", temperature=0,
                                           max_tokens=10)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(processor.encode("the sky is"))


def test_stop_string_cuts_the_reply(server, model, processor):
    messages = [user("count with me")]
    full = reference(model, processor, messages, 16)
    stop = full[3:5]
    assert len(full) > 5 and stop
    cut = full[:full.find(stop)]
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                       max_tokens=16, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    stream = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                            max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_image_and_audio_parts_equal_the_library(server, model, processor, tmp_path):
    png, wav = png_bytes(), wav_bytes(tmp_path)
    (tmp_path / "a.png").write_bytes(png)
    expected = reference(model, processor, [{"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "a.png")}, {"type": "audio", "audio": str(tmp_path / "a.wav")},
        {"type": "text", "text": "what is this"}]}], 10)
    r = server.client().chat.completions.create(model=server.model, temperature=0, max_tokens=10, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
            {"type": "text", "text": "what is this"}]}])
    assert r.choices[0].message.content == expected
    counts = processor.chat_inputs([{"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "a.png")}, {"type": "audio", "audio": str(tmp_path / "a.wav")},
        {"type": "text", "text": "what is this"}]}])
    assert r.usage.prompt_tokens == len(counts.ids)


def test_image_budget_extension_changes_the_prompt(server, processor):
    png = png_bytes(200, 300)
    sizes = []
    for budget in (70, 280):
        status, body, _ = server.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": data_url(png, "image/png")}}]}], "max_tokens": 1, "image_budget": budget})
        assert status == 200, body
        sizes.append(body["usage"]["prompt_tokens"])
    assert sizes[1] - sizes[0] > 100


def test_logprobs_equal_the_library(server, model, processor):
    from mlx_gemma.generation import stream_generate

    messages = [user("tell me")]
    pieces = list(stream_generate(model, processor, messages, temp=0.0, max_tokens=8))
    expected = [(processor.decode([p.token]), p.logprobs[p.token].item()) for p in pieces
                if p.token not in processor.eos_token_ids]
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    got = r.choices[0].logprobs.content
    assert [e.token for e in got] == [t for t, _ in expected]
    assert [e.logprob for e in got] == pytest.approx([lp for _, lp in expected], abs=1e-4)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in got)  # greedy
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob for e in got)
    stream = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=8,
                                            logprobs=True, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.top_logprobs) for e in streamed] == [(t, []) for t, _ in expected]


# --- prefix cache -------------------------------------------------------------------------------

def chat(server, messages, max_tokens=12):
    status, body, _ = server.request("POST", "/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                                     "max_tokens": max_tokens})
    assert status == 200, body
    return body["choices"][0]["message"]["content"], body["usage"]


def test_second_turn_and_shared_system_prompt_reuse_the_cache(server, model, processor):
    first = [{"role": "system", "content": SYSTEM}, user("name a colour")]
    reply, usage = chat(server, first)
    assert reply == reference(model, processor, first, 12)

    second = first + [{"role": "assistant", "content": reply}, user("and a number")]
    reply2, usage2 = chat(server, second)
    assert reply2 == reference(model, processor, second, 12)
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= len(processor.chat_ids(first))
    assert usage2["prompt_tokens_details"]["cached_tokens"] < usage2["prompt_tokens"]

    other = [{"role": "system", "content": SYSTEM}, user("something else entirely")]
    reply3, usage3 = chat(server, other)
    assert reply3 == reference(model, processor, other, 12)
    system_turn = len(processor.chat_ids([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    assert usage3["prompt_tokens_details"]["cached_tokens"] >= system_turn


def test_shared_system_prompt_past_the_sliding_window_uses_the_turn_snapshot(server, model, processor):
    """The first conversation outgrows the window plus its slack, so its final cache cannot be
    trimmed back to the system prompt: the snapshot taken where its user turn began is used."""
    words = " ".join(["the sky is a blue thing and"] * 4)
    system = {"role": "system", "content": "rules " + words}
    first = [system, user("first " + words + words)]
    system_turn = len(processor.chat_ids([system], add_generation_prompt=False))
    cache = model.make_cache()
    assert chat(server, first, 8)[0] == reference(model, processor, first, 8, cache=cache)
    assert cache[0].offset - system_turn > min(c.max_trim for c in cache if hasattr(c, "max_trim"))
    second = [system, user("second " + words + words)]
    reply, usage = chat(server, second, 8)
    assert reply == reference(model, processor, second, 8)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= system_turn


def test_different_images_never_share_their_rows(server, model, processor, tmp_path):
    results = []
    for seed in (1, 2):
        png = png_bytes(seed=seed)
        (tmp_path / f"{seed}.png").write_bytes(png)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                                 {"type": "text", "text": "describe"}]}]
        reply, usage = chat(server, messages, 8)
        expected = reference(model, processor, [{"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / f"{seed}.png")}, {"type": "text", "text": "describe"}]}], 8)
        assert reply == expected
        results.append(usage["prompt_tokens_details"]["cached_tokens"])
    ids = processor.chat_inputs([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "2.png")},
                                                              {"type": "text", "text": "describe"}]}]).ids
    first_placeholder = ids.index(model.config.image_token_id)
    assert results[1] <= first_placeholder  # the second image is read again, from its first row


# --- hostile and broken requests ----------------------------------------------------------------

CHAT = "/v1/chat/completions"
HELLO = [user("hello")]


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says `width` x `height` (a decompression bomb's first bytes)."""
    import struct
    import zlib

    raw = png_bytes(2, 2)
    header = struct.pack(">II", width, height) + raw[24:29]
    return raw[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + raw[33:]


def image_message(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def audio_message(data: str, fmt: str = "wav") -> list:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]


HOSTILE = [  # id, path, body (dict or bytes), extra headers, status, message regex, error code
    ("malformed-json", CHAT, b'{"messages": [', {}, 400, r"not valid JSON", None),
    ("not-utf8", CHAT, b"\xff\xfe\x00", {}, 400, r"not valid JSON", None),
    ("json-array", CHAT, b"[1, 2]", {}, 400, r"must be a JSON object", None),
    ("no-messages", CHAT, {"max_tokens": 4}, {}, 400, r"^messages: is required", None),
    ("messages-string", CHAT, {"messages": "hello"}, {}, 400, r"^messages: must be a list", None),
    ("messages-empty", CHAT, {"messages": []}, {}, 400, r"^messages: must not be empty", None),
    ("bad-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, {}, 400,
     r"^messages\[0\]\.role: must be 'system', .* got 'robot'", None),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400, r"content: must be a string",
     None),
    ("unknown-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "file"}]}]}, {}, 400,
     r"^messages\[0\]\.content\[0\]: type 'file' is not one of 'text', 'image_url', 'input_audio', 'video_url'",
     None),
    ("negative-max-tokens", CHAT, {"messages": HELLO, "max_tokens": -5}, {}, 400, r"max_tokens: must be at least 1",
     None),
    ("zero-max-tokens", CHAT, {"messages": HELLO, "max_completion_tokens": 0}, {}, 400,
     r"max_completion_tokens: must be at least 1", None),
    ("max-tokens-string", CHAT, {"messages": HELLO, "max_tokens": "ten"}, {}, 400,
     r"max_tokens: must be a whole number", None),
    ("negative-temperature", CHAT, {"messages": HELLO, "temperature": -1}, {}, 400, r"^temperature -1(\.0)?: must be",
     None),
    ("top-p-over-1", CHAT, {"messages": HELLO, "top_p": 2}, {}, 400, r"^top_p 2(\.0)?: must be", None),
    ("n-0", CHAT, {"messages": HELLO, "n": 0}, {}, 400, r"^n: must be at least 1, got 0$", None),
    ("n-over-the-cap", CHAT, {"messages": HELLO, "n": 200}, {}, 400, r"^n: must be at most 16, got 200$", None),
    ("penalty-over-2", CHAT, {"messages": HELLO, "presence_penalty": 3}, {}, 400,
     r"^presence_penalty: must be from -2 to 2", None),
    ("unknown-field", CHAT, {"messages": HELLO, "foo": 1}, {}, 400, r"foo: not a supported parameter", None),
    ("top-logprobs", CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 50}, {}, 400,
     r"top_logprobs: must be from 0 to 20", None),
    ("stream-not-bool", CHAT, {"messages": HELLO, "stream": "yes"}, {}, 400, r"stream: must be a boolean", None),
    ("wrong-api-key", CHAT, {"messages": HELLO}, {"Authorization": "Bearer nope"}, 401, r"invalid or missing API key",
     "invalid_api_key"),
    ("no-api-key", "/v1/models", None, {"Authorization": ""}, 401, r"invalid or missing API key", "invalid_api_key"),
    ("huge-body", CHAT, b"x" * (MAX_BODY + 1), {}, 413, r"over the limit", "request_too_large"),
    ("2MB-stop", CHAT, {"messages": HELLO, "stop": "s" * 2_000_000}, {}, 400, r"stop: at most", None),
    ("10MB-stop", CHAT, {"messages": HELLO, "stop": "s" * 10_000_000}, {}, 413, r"over the limit", None),
    ("bad-base64-image", CHAT, {"messages": image_message("data:image/png;base64,@@notbase64@@")}, {}, 400,
     r"image_url: the data URL is not valid base64", None),
    ("truncated-png", CHAT, {"messages": image_message(data_url(png_bytes()[:200], "image/png"))}, {}, 400,
     r"truncated or corrupt image", None),
    ("not-an-image", CHAT, {"messages": image_message(data_url(b"hello there", "image/png"))}, {}, 400,
     r"not an image", None),
    ("local-path", CHAT, {"messages": image_message("/etc/passwd")}, {}, 400, r"--allow-local-media", None),
    ("http-url", CHAT, {"messages": image_message("http://127.0.0.1:9/a.png")}, {}, 400, r"--allow-remote-media",
     None),
    ("zero-byte-audio", CHAT, {"messages": audio_message("")}, {}, 400, r"input_audio: the audio is empty", None),
    ("garbage-audio", CHAT, {"messages": audio_message(base64.b64encode(b"RIFF0000WAVEjunk").decode())}, {}, 400,
     r"input_audio: cannot decode", None),
    ("audio-format", CHAT, {"messages": audio_message("AAAA", "aac")}, {}, 400, r"format 'aac' is not one of", None),
    ("json-nested-too-deep", CHAT, b"[" * 100_000, {}, 400, r"the body is not valid JSON", None),
    ("json-integer-too-long", CHAT, b'{"max_tokens": ' + b"1" * 5000 + b"}", {}, 400, r"the body is not valid JSON",
     None),
    ("top-k-infinite", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_k": Infinity}', {}, 400,
     r"^top_k: must be a whole number", None),
    ("tool-call-id-a-list", CHAT, {"messages": [user("hi"), {"role": "assistant", "content": "", "tool_calls": [
        {"id": ["x"], "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, {}, 400,
     r"tool_calls\[0\]\.id: must be a string", None),
    ("tool-call-id-of-a-result-a-dict", CHAT, {"messages": [user("hi"), {"role": "tool", "content": "1",
                                                                       "tool_call_id": {"a": 1}}]}, {}, 400,
     r"tool_call_id: must be a string", None),
    ("over-context", CHAT, {"messages": HELLO, "max_tokens": 600}, {}, 400, r"over the served context of 512",
     "context_length_exceeded"),
    ("prompt-over-context", CHAT, {"messages": [user("a " * 600)]}, {}, 400, r"the served context is 512",
     "context_length_exceeded"),
    ("image-budget", CHAT, {"messages": HELLO, "image_budget": 123}, {}, 400, r"image_budget: must be one of", None),
    ("template-kwargs", CHAT, {"messages": HELLO, "chat_template_kwargs": {"x": 1}}, {}, 400,
     r"^chat_template_kwargs\.x: not a supported parameter", None),
    ("tool-choice", CHAT, {"messages": HELLO, "tool_choice": "required"}, {}, 400,
     r"^tool_choice: 'required' needs tools, and the request declares none", None),
    ("completion-no-prompt", "/v1/completions", {"max_tokens": 3}, {}, 400, r"^prompt: is required", None),
    ("no-such-route", "/v1/nothing", {}, {}, 404, r"/v1/nothing: Not Found", None),
    # A web page's ways in: a rebound DNS name, a cross-site request, a form's text/plain body.
    ("dns-rebinding", CHAT, {"messages": HELLO}, {"Host": "attacker.example:8080"}, 403,
     r"^Host 'attacker.example' is not this server's address", "host_not_allowed"),
    ("cross-origin", CHAT, {"messages": HELLO}, {"Origin": "https://attacker.example"}, 403,
     r"^requests from web pages at 'https://attacker.example' are refused", "origin_not_allowed"),
    ("text-plain", CHAT, {"messages": HELLO}, {"Content-Type": "text/plain"}, 415,
     r"^Content-Type must be application/json, got 'text/plain'", "unsupported_media_type"),
    ("no-content-type", CHAT, {"messages": HELLO}, {"Content-Type": ""}, 415, r"got 'none'",
     "unsupported_media_type"),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', {}, 400,
     r"^the body holds a lone UTF-16 surrogate", None),
    ("huge-image-header", CHAT, {"messages": image_message(data_url(png_claiming(12000, 12000), "image/png"))}, {},
     400, r"image_url: the image is 12000x12000 pixels, over the server's limit of 50,000,000", None),
]


def test_hostile_requests_get_a_4xx_with_one_line(server):
    before = len(server.log_lines())
    for case_id, path, body, headers, status, pattern, code in HOSTILE:
        method = "GET" if path == "/v1/models" else "POST"
        got, reply, _ = server.request(method, path, body, headers)
        assert got == status, (case_id, got, reply)
        assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}, (case_id, reply)
        message = reply["error"]["message"]
        assert "\n" not in message and len(message) < 400 and re.search(pattern, message), (case_id, message)
        if code:
            assert reply["error"]["code"] == code, (case_id, reply)
    lines = server.log_lines(before + len(HOSTILE))[before:]
    assert [int(line.split()[4]) for line in lines] == [case[4] for case in HOSTILE]
    assert server.request("GET", "/health")[0] == 200
    assert server.proc.poll() is None


def test_local_and_remote_media_and_video_with_the_flags(hf_checkpoint, tmp_path, model, processor):
    import http.server
    from functools import partial

    (tmp_path / "a.png").write_bytes(png_bytes())
    video = mf.write_video(tmp_path / "v.mp4", seconds=2.0, audio=False)
    from_disk = reference(model, processor, [{"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "a.png")}]}], 6)
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler,
                                                                       directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    s = Server(hf_checkpoint, tmp_path / "log", "--allow-local-media", "--allow-remote-media")
    try:
        for url in (str(tmp_path / "a.png"), f"http://127.0.0.1:{files.server_address[1]}/a.png"):
            status, body, _ = s.request("POST", CHAT, {"messages": image_message(url), "temperature": 0,
                                                       "max_tokens": 6})
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == from_disk
        for url, pattern in ((str(tmp_path / "none.png"), "no such file"),
                             (f"http://127.0.0.1:{files.server_address[1]}/none.png", "cannot fetch .*404")):
            status, body, _ = s.request("POST", CHAT, {"messages": image_message(url)})
            assert status == 400 and re.search(pattern, body["error"]["message"]), body

        status, body, _ = s.request("POST", CHAT, {"temperature": 0, "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(video.read_bytes(),
                                                                                             "video/mp4")}},
                                         {"type": "text", "text": "what happens"}]}]})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == reference(model, processor, [{"role": "user", "content": [
            {"type": "video", "video": str(video)}, {"type": "text", "text": "what happens"}]}], 6)
        assert not list(Path(tempfile.gettempdir()).glob("mlx-gemma-video-*"))  # the upload is gone
    finally:
        s.stop()
        files.shutdown()


@pytest.mark.parametrize("flags, message", [
    (["--model", "/nonexistent/model"], r"/nonexistent/model: neither a local directory nor"),
    (["--port", "0"], r"--port: must be from 1 to 65535, got 0"),
    (["--kv-bits", "3"], r"--kv-bits: must be 4 or 8, got 3"),
    (["--prompt-cache-bytes", "-1"], r"--prompt-cache-bytes: must be 0 \(off\) or more, got -1"),
    (["--temp", "-1"], r"--temp -1.0: must be a number >= 0"),
    (["--port", "{busy}"], r"--port \d+: cannot listen on 127.0.0.1 \(Address already in use\)"),
], ids=["no-model", "port-0", "kv-bits", "cache-bytes", "temp", "port-in-use"])
def test_bad_flags_are_one_line_errors_before_loading(server, hf_checkpoint, flags, message):
    flags = [f.replace("{busy}", str(server.port)) for f in flags]
    model = [] if "--model" in flags else ["--model", str(hf_checkpoint)]
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.server", *model, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done
    assert re.fullmatch(rf"error: {message}.*\n", done.stderr), done.stderr


# --- load and faults ----------------------------------------------------------------------------

def stream_text(server, messages, max_tokens) -> str:
    stream = server.client().chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                     max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def test_fifty_concurrent_streams_all_complete_correctly(server, model, processor):
    prompts = [[user(f"question number {i}")] for i in range(5)]
    expected = [reference(model, processor, p, 8) for p in prompts]
    assert [stream_text(server, p, 8) for p in prompts] == expected  # their cache entries exist from here on

    def burst() -> None:
        with ThreadPoolExecutor(max_workers=50) as pool:
            futures = [pool.submit(stream_text, server, prompts[i % 5], 8) for i in range(50)]
            health = [server.request("GET", "/health", timeout=5) for _ in range(3)]  # answered under load
            results = [f.result(timeout=300) for f in futures]
        assert results == [expected[i % 5] for i in range(50)]
        assert all(h[0] == 200 for h in health)

    burst()  # the first one batched sets what the allocator keeps for a 50-row step
    before = rss_bytes(server.proc.pid)
    burst()
    assert rss_bytes(server.proc.pid) <= 1.05 * before  # nothing per request is left behind


def abandon_stream(port: int, max_tokens: int) -> None:
    """Start a streamed request, read its first event, and hang up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"messages": [user("tell me a long story")], "max_tokens": max_tokens, "stream": True,
                       "temperature": 0}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data:" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    sock.close()


def test_clients_that_hang_up_free_the_worker(server, model, processor):
    # 20 x 400 tokens would keep the worker busy for minutes if a hang-up did not stop it.
    threads = [threading.Thread(target=abandon_stream, args=(server.port, 400)) for _ in range(20)]
    tic = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.request("GET", "/health")[1] != {"status": "ok", "busy": False,
                                                                                 "waiting": 0}:
        time.sleep(0.1)
    assert server.request("GET", "/health")[1] == IDLE
    assert time.monotonic() - tic < 40
    assert stream_text(server, HELLO, 6) == reference(model, processor, HELLO, 6)


def abandon_waiting(port: int, max_tokens: int) -> None:
    """Send a non-streamed request, wait a moment (its reply is being generated), and hang up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"messages": [user("tell me a long story")], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.3)
    sock.close()


def test_waiting_clients_that_hang_up_stop_their_generation(server):
    """Six 450-token replies whose clients hang up while they are generated: each stops within a
    step or two (a hang-up is polled while tokens stream in, not only when none comes), so the
    worker is idle again long before one whole reply would have taken."""
    tic = time.monotonic()
    threads = [threading.Thread(target=abandon_waiting, args=(server.port, 450)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    idle = IDLE
    while time.monotonic() - tic < 60 and server.request("GET", "/health")[1] != idle:
        time.sleep(0.05)
    stopped = time.monotonic() - tic
    tic = time.monotonic()
    status, body, _ = server.request("POST", CHAT, {"messages": [user("tell me a long story")], "max_tokens": 450,
                                                    "temperature": 0})
    one = time.monotonic() - tic
    assert status == 200 and body["usage"]["completion_tokens"] == 450
    assert stopped < 0.5 * one, (stopped, one)  # measured 0.47 s vs 2.8 s; 2.8 s (the first ran whole) before


def test_a_missing_adapter_folder_exits_cleanly_every_time(hf_checkpoint, tmp_path):
    """The load fails on the engine's thread; the exit must not abort (it did, some runs, with
    exit 134 after the error line)."""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "mlx_gemma.server", "--model", str(hf_checkpoint),
                               "--adapter-path", str(tmp_path / "nope"), "--port", str(free_port())],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr.strip()) == \
            (1, f"error: {tmp_path / 'nope'}: no adapter_config.json (not an adapter directory)")


def test_an_empty_api_key_is_refused_before_loading(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.server", "--model", str(tmp_path), "--api-key", ""],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip() == \
        "error: --api-key: must not be empty (leave the flag out to serve without a key)"


def test_a_full_queue_answers_503_with_retry_after(hf_checkpoint, tmp_path):
    s = Server(hf_checkpoint, tmp_path / "log", "--queue-size", "1", "--max-num-seqs", "1")
    try:
        body = {"messages": [user("a long one")], "max_tokens": 60, "temperature": 0}  # busy while the rest arrive
        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = list(pool.map(lambda _: s.request("POST", CHAT, body), range(6)))
        refused = [r for r in replies if r[0] == 503]
        assert refused and all(r[2].get("retry-after") == "1" and r[1]["error"]["code"] == "queue_full"
                               for r in refused)
        assert all(r[0] in (200, 503) for r in replies)
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.stop()


# --- tool calling -------------------------------------------------------------------------------

# A tool-capable template written to Gemma 4's format (spec 6.1; the real one ships with the
# checkpoint): tools declared in the system turn, calls and their responses in the model turn.
# ({{ '{' }} is a literal brace right before a Jinja tag, which would otherwise open one.)
TOOL_TEMPLATE = (
    "{%- macro render(content) -%}{% if content is string %}{{ content }}{% elif content %}"
    "{% for item in content %}{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'audio' %}<|audio|>"
    "{% elif item['type'] == 'video' %}<|video|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{% set has_system = messages[0]['role'] == 'system' %}"
    "{% if has_system or tools or enable_thinking %}<|turn>system\n{% if enable_thinking %}<|think|>\n{% endif %}"
    "{% if has_system %}{{ render(messages[0]['content']) }}{% endif %}"
    "{% for tool in tools or [] %}{% set f = tool['function'] %}"
    "<|tool>declaration:{{ f['name'] }}{description:<|\"|>{{ f.description | default('') }}<|\"|>,parameters:{properties:{{ '{' }}"
    "{% for key, p in f['parameters']['properties'] | dictsort %}{{ key }}:{description:<|\"|>"
    "{{ p.description | default('') }}<|\"|>,type:<|\"|>{{ p['type'] | upper }}<|\"|>}{% if not loop.last %},{% endif %}"
    "{% endfor %}},required:[{% for r in f['parameters'].required | default([]) %}<|\"|>{{ r }}<|\"|>"
    "{% if not loop.last %},{% endif %}{% endfor %}],type:<|\"|>OBJECT<|\"|>}}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% set ns = namespace(open=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% if ns.open %}<turn|>\n{% set ns.open = false %}{% endif %}"
    "<|turn>user\n{{ render(message['content']) }}<turn|>\n"
    "{% elif message['role'] == 'assistant' %}{% if not ns.open %}<|turn>model\n{% endif %}"
    "{{ render(message['content']) }}"
    "{% for call in message['tool_calls'] | default([]) %}<|tool_call>call:{{ call['function']['name'] }}{{ '{' }}"
    "{% for k, v in call['function']['arguments'] | dictsort %}{{ k }}:{% if v is string %}<|\"|>{{ v }}<|\"|>"
    "{% else %}{{ v | tojson }}{% endif %}{% if not loop.last %},{% endif %}{% endfor %}}<tool_call|>{% endfor %}"
    "{% if message['tool_calls'] %}{% set ns.open = true %}{% else %}<turn|>\n{% set ns.open = false %}{% endif %}"
    "{% elif message['role'] == 'tool' %}<|tool_response>response:{{ message['name'] }}{value:<|\"|>"
    "{{ message['content'] }}<|\"|>}<tool_response|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and not ns.open %}<|turn>model\n{% endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "its name"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "the time somewhere",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}, "hours": {"type": "integer"}}}}}]
CALLS = ('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
         '<|tool_call>call:get_time{hours:2,zone:<|"|>CET<|"|>}<tool_call|>')

# The server with one test hook, its sampler forced to emit given token ids (argv[1], JSON) and
# then the end of the turn: "tools" while tools are given and the user spoke last (as a model
# that decided to call two tools would), "thinking" when thinking is on, "after_tools" (if given)
# once tool results came last. Everything else
# (template, parsing, the thought split, HTTP) is the server's.
FORCING_BOOT = """
import json, sys
import mlx.core as mx
import mlx_gemma.generation as generation
import mlx_gemma.server.engine as engine
from mlx_gemma.server import main
forced, state = json.loads(sys.argv.pop(1)), {"force": None}
real_sampling, real_start = generation.make_sampling, engine.Engine._start
def make_sampling(processor, **kwargs):
    sampler, processors = real_sampling(processor, **kwargs)
    if state["force"] is None:
        return sampler, processors
    tokens, last = iter(state["force"]), state["force"][-1]
    return (lambda logprobs: mx.array([next(tokens, last)])), processors
def start(self, job, planned):
    r = job.request
    user_last = r.messages is not None and r.messages[-1]["role"] == "user"
    tool_last = r.messages is not None and r.messages[-1]["role"] == "tool"
    state["force"] = (forced["tools"] if r.tools and user_last else forced["thinking"] if r.thinking
                      else forced.get("after_tools") if tool_last else None)
    return real_start(self, job, planned)
generation.make_sampling, engine.Engine._start = make_sampling, start
main()
"""


def forced_ids(processor) -> dict:
    eos = next(iter(processor.eos_token_ids))
    calls = processor.encode(CALLS, add_special_tokens=False)
    assert processor.decode(calls) == CALLS
    thought = [processor.thought_start_id, *processor.encode("thought\nthe plan", add_special_tokens=False),
               processor.thought_end_id, *processor.encode("the answer", add_special_tokens=False)]
    return {"tools": calls + [eos], "thinking": thought + [eos]}


@pytest.fixture(scope="module")
def tool_checkpoint(hf_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("tools") / "tiny-with-tools"
    d.mkdir()
    for f in hf_checkpoint.iterdir():
        if f.name not in ("chat_template.jinja", "config.json"):
            (d / f.name).symlink_to(f)
    (d / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    # Declarations in byte tokens are long: a longer context (RoPE has no position table).
    config = json.loads((hf_checkpoint / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 2048
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def forced_server(tool_checkpoint, processor, tmp_path_factory):
    s = Server(tool_checkpoint, tmp_path_factory.mktemp("forced-server") / "log",
               boot=["-c", FORCING_BOOT, json.dumps(forced_ids(processor))])
    yield s
    s.stop()


def test_thoughts_go_to_reasoning_never_content(forced_server, model, processor):
    from mlx_gemma.generation import stream_generate

    forced = forced_ids(processor)["thinking"]
    ids = iter(forced)  # the step after the end is queued too: it samples the end again
    pieces = list(stream_generate(model, processor, [user("plan it")], enable_thinking=True, max_tokens=32,
                                  sampler=lambda logprobs: mx.array([next(ids, forced[-1])]), logits_processors=[]))
    thought = "".join(p.text for p in pieces if p.thinking)
    answer = "".join(p.text for p in pieces if not p.thinking)
    assert thought and answer
    body = {"messages": [user("plan it")], "max_tokens": 32, "chat_template_kwargs": {"enable_thinking": True}}
    status, reply, _ = forced_server.request("POST", CHAT, body)
    assert status == 200, reply
    assert (reply["choices"][0]["message"]["reasoning"], reply["choices"][0]["message"]["content"]) == \
        (thought, answer)
    status, events, _ = forced_server.request("POST", CHAT, dict(body, stream=True))
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in events.splitlines()
              if line.startswith("data: {") and '"choices": [{' in line]
    assert "".join(d.get("reasoning", "") for d in deltas) == thought
    assert "".join(d.get("content") or "" for d in deltas) == answer


def test_tool_calls_parsed_streamed_and_fed_back(forced_server, tool_checkpoint):
    from mlx_gemma import load

    model, tools_processor = load(tool_checkpoint)
    client = forced_server.client()
    ask = [{"role": "system", "content": "use tools"}, user("weather and time in Paris?")]
    r = client.chat.completions.create(model=forced_server.model, messages=ask, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"hours": 2, "zone": "CET"})]
    assert r.usage.prompt_tokens == len(tools_processor.chat_inputs(ask, tools=TOOLS).ids)
    assert r.usage.prompt_tokens > len(tools_processor.chat_inputs(ask).ids)  # the declarations are in

    stream = list(client.chat.completions.create(model=forced_server.model, messages=ask, tools=TOOLS, max_tokens=200,
                                                 stream=True))
    deltas = [d for c in stream for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, *calls[0]), (1, *calls[1])]
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ""
    assert stream[-1].choices[0].finish_reason == "tool_calls"

    back = ask + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
                  {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"},
                  {"role": "tool", "tool_call_id": choice.message.tool_calls[1].id, "content": "14:00"}]
    reply = client.chat.completions.create(model=forced_server.model, messages=back, tools=TOOLS, temperature=0,
                                           max_tokens=8)
    library = ask + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "name": "get_time", "content": "14:00"}]
    inputs = tools_processor.chat_inputs(library, tools=TOOLS)
    rendered = tools_processor.decode(inputs.ids)
    assert rendered.endswith(CALLS + '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
                             '<|tool_response>response:get_time{value:<|"|>14:00<|"|>}<tool_response|>')
    assert reply.usage.prompt_tokens == len(inputs.ids)
    auto = Constraint.tool_calls(TOOLS, "auto")  # tools on "auto": text or well-formed calls
    assert reply.choices[0].message.content == generate(model, tools_processor, inputs, temp=0.0, max_tokens=8,
                                                        constraint=auto)


# --- the README's server examples ----------------------------------------------------------------

def server_examples() -> dict:
    """The sh and py blocks of the README's server section and of docs/server.md."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Server\n"):]
    text = section[:section.index("\n## ", 1)] + "".join((REPO / "docs" / page).read_text()
                                                         for page in ("server.md", "structured.md"))
    return {lang: [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]
            for lang in ("sh", "py")}


# How each example's last line starts: a finish reason or a response's status / stop reason.
ENDINGS = ("stop", "length", "tool_calls", "completed", "incomplete", "end_turn", "max_tokens", "tool_use")


def test_server_examples_in_the_readme_and_docs_run(server, tmp_path):
    from mlx_gemma.server import build_parser

    blocks = server_examples()

    def local(text: str) -> str:
        return text.replace("http://127.0.0.1:8080", server.url).replace("secret", KEY) \
            .replace("google/gemma-4-12B-it", server.model)

    curls = 0
    for block in blocks["sh"]:
        for line in block.splitlines():
            if line.startswith("python -m mlx_gemma.server"):
                build_parser().parse_args(line.split("#")[0].split()[3:])  # the flags it shows exist
                continue
            assert line.startswith("curl "), line
            done = subprocess.run(local(line), shell=True, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            tokens = reply["usage"].get("completion_tokens", reply["usage"].get("output_tokens"))
            assert reply.get("object", reply.get("type")) in ("chat.completion", "message") and tokens >= 1, reply
            curls += 1
    assert curls >= 3

    (tmp_path / "cat.png").write_bytes(png_bytes())
    assert len(blocks["py"]) >= 4
    for script in blocks["py"]:
        done = subprocess.run([sys.executable, "-c", local(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) >= 2 and lines[-1].split()[0] in ENDINGS, (script, done.stdout)


def test_served_context_is_what_the_memory_plan_fits(hf_checkpoint):
    from mlx_gemma import MlxGemmaError
    from mlx_gemma.config import ModelConfig
    from mlx_gemma.memory import KVOptions, make_plan, run_dtype_bytes, weight_bytes
    from mlx_gemma.server import build_parser, plan_server

    config = ModelConfig.from_file(hf_checkpoint / "config.json")
    dtype_bytes = run_dtype_bytes(hf_checkpoint, config)
    weights = weight_bytes(hf_checkpoint, dtype_bytes)
    roomy = plan_server(hf_checkpoint, build_parser().parse_args(["--prompt-cache-bytes", "0"]))
    assert roomy[:2] == (0, config.text_config.max_position_embeddings)
    # A budget that holds the weights and a little KV: the context stops where the plan stops fitting.
    budget = make_plan(config, weights, 100, 0, KVOptions(), dtype_bytes).total
    args = build_parser().parse_args(["--prompt-cache-bytes", "1000", "--memory-limit", f"{budget + 1000}B"])
    cache_bytes, context, plan = plan_server(hf_checkpoint, args)
    assert plan.budget == budget + 1000 and plan.kv(context) > plan.kv(1) > 0
    assert cache_bytes == 1000 and 100 <= context < config.text_config.max_position_embeddings
    assert make_plan(config, weights, context, budget, KVOptions(), dtype_bytes).fits
    assert not make_plan(config, weights, context + 1, budget, KVOptions(), dtype_bytes).fits
    with pytest.raises(MlxGemmaError, match="the weights alone need"):
        plan_server(hf_checkpoint, build_parser().parse_args(["--memory-limit", "1MB", "--prompt-cache-bytes", "0"]))
