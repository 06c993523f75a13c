"""`python -m mlx_gemma.server`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE).

HTTP layer only: a request is checked and turned into chat messages here, and handed to the
`Engine`, which owns the model and runs every MLX call on its one worker thread (MLX is not
thread-safe), one request at a time, in arrival order, from a bounded queue. The event loop
stays free, so /health and new connections answer while a long prefill runs.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .errors import ArgumentParser, InputError, MlxGemmaError, run_cli

DEFAULT_MODEL = "google/gemma-4-12B-it"
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BODY = 64 * 2**20
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1000
MAX_TOP_LOGPROBS = 20
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
log = logging.getLogger("mlx_gemma.server")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.server",
                       description="Serve Gemma 4 12B over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="LoRA adapters to apply: mlx_gemma.lora's / mlx-lm's output, or a PEFT adapter directory "
                        "(default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--prompt-cache-bytes", type=int, default=None,
                   help="bytes of KV-cache snapshots kept across requests (0 turns the prefix cache off; "
                        "default: a quarter of the memory budget left after the weights)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="reply tokens when a request does not say")
    p.add_argument("--temp", type=float, default=None,
                   help="default temperature (default: the checkpoint's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the global layers' KV cache (4 or 8)")
    p.add_argument("--memory-limit", default=None, help="memory budget, e.g. 10GB (decimal) or 10GiB (default: "
                   "Metal's recommended working set on a Mac, physical memory elsewhere); the served context "
                   "is the longest the plan fits in it")
    p.add_argument("--allow-local-media", action="store_true",
                   help="let clients name files on this machine as media (off: only data URLs)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let clients give http(s) URLs of media, fetched by the server")
    p.add_argument("--allow-long-media", action="store_true", help="accept audio over 30 s and video over 60 s")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests waiting for the model; more are refused with 503")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch with several ranks: split the layers between them (fits bigger weights "
                        "and contexts) instead of splitting every layer's heads (tensor parallel, faster decode); "
                        "rank 0 serves HTTP, the others follow it")
    return p


# --- errors in OpenAI's shape ------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, MlxGemmaError):
        return ApiError(400, _one_line(e))
    log.exception("internal error")
    return ApiError(500, f"internal error ({type(e).__name__})", type="server_error")


# --- request checking --------------------------------------------------------------------------

def _typed(body: dict, name: str, types, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # True is an int
        raise ApiError(400, f"{name}: must be {what}, got {type(value).__name__}", param=name)
    return value


def _positive(body: dict, name: str) -> Optional[int]:
    value = _typed(body, name, int, "a whole number")
    if value is not None and value <= 0:
        raise ApiError(400, f"{name}: must be at least 1, got {value}", param=name)
    return value


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
                 "stream_options", "n", "logprobs", "presence_penalty", "frequency_penalty", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "chat_template_kwargs", "image_budget",
                               "tools", "tool_choice", "parallel_tool_calls", "response_format", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}


@dataclass
class Params:
    max_tokens: Optional[int]
    sampling: dict
    seed: Optional[int]
    stop: list
    stream: bool
    include_usage: bool
    top_logprobs: Optional[int] = None  # None: no logprobs; else alternatives per token


def check_common(body: dict, allowed: set, served: str) -> Params:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"{unknown[0]}: not a supported parameter (supported: {', '.join(sorted(allowed))})",
                       param=unknown[0])
    model = _typed(body, "model", str, "a string")
    if model is not None and model != served:
        raise ApiError(404, f"model {model[:200]!r} is not served here; this server serves {served!r}",
                       param="model", code="model_not_found")
    if _typed(body, "n", int, "a whole number", 1) != 1:
        raise ApiError(400, f"n: only n = 1 is supported, got {body['n']}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _typed(body, name, (int, float), "a number", 0) != 0:
            raise ApiError(400, f"{name}: not supported (only 0)", param=name)
    _typed(body, "user", str, "a string")
    max_tokens = _positive(body, "max_tokens")
    if "max_completion_tokens" in body:
        max_tokens = _positive(body, "max_completion_tokens")
    sampling = {}
    for name, key in (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p")):
        value = _typed(body, name, (int, float), "a number")
        if value is not None:
            sampling[key] = value
    seed = _typed(body, "seed", int, "a whole number")
    from .generation import check_sampling

    try:
        check_sampling(sampling.get("temp"), sampling.get("top_p"), sampling.get("top_k"), sampling.get("min_p"),
                       seed)
    except InputError as e:  # the message names the CLI flag; a client knows the field
        names = {"--temp": "temperature", "--top-p": "top_p", "--top-k": "top_k", "--min-p": "min_p",
                 "--seed": "seed"}
        text = str(e)
        flag = text.split(" ", 1)[0]
        raise ApiError(400, names.get(flag, flag) + text[len(flag):], param=names.get(flag)) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    stream = _typed(body, "stream", bool, "a boolean", False)
    options = _typed(body, "stream_options", dict, "an object", {})
    if set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options: only include_usage is supported", param="stream_options")
    include_usage = _typed(options, "include_usage", bool, "a boolean", False)
    return Params(max_tokens, sampling, seed, stop, stream, include_usage)


# --- content parts -> the library's message items -----------------------------------------------

class MediaPolicy:
    """Where media may come from (the server's flags), and how large or long they may be."""

    def __init__(self, allow_local: bool, allow_remote: bool, allow_long: bool, max_bytes: int):
        self.allow_local, self.allow_remote, self.allow_long = allow_local, allow_remote, allow_long
        self.max_bytes = max_bytes

    def fetch(self, url: str, what: str) -> tuple[Optional[bytes], Optional[str]]:
        """(bytes, media type) of a data or http(s) URL, or (None, path) of a local file."""
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{what}: url must be a non-empty string", param="messages")
        if url.startswith("data:"):
            head, comma, data = url.partition(",")
            if not comma or not head.endswith(";base64"):
                raise ApiError(400, f"{what}: a data URL must be base64 (data:TYPE;base64,...)", param="messages")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{what}: the data URL is not valid base64", param="messages") from None
            return raw, head[5:-7]
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise ApiError(400, f"{what}: http(s) URLs are off (start the server with --allow-remote-media)",
                               param="messages")
            return self._download(url, what), None
        if not self.allow_local:
            raise ApiError(400, f"{what}: local paths are off (give a data URL, or start the server with "
                                "--allow-local-media)", param="messages")
        path = url[7:] if url.startswith("file://") else url
        if not Path(path).is_file():
            raise ApiError(400, f"{what}: {path[:200]}: no such file", param="messages")
        return None, path

    def _download(self, url: str, what: str) -> bytes:
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                raw = r.read(self.max_bytes + 1)
        except Exception as e:
            raise ApiError(400, f"{what}: cannot fetch {url[:200]} ({_one_line(e)[:200]})", param="messages") from None
        if len(raw) > self.max_bytes:
            raise ApiError(413, f"{what}: {url[:200]} is over {self.max_bytes} bytes", param="messages")
        return raw


def _image_item(part: dict, policy: MediaPolicy) -> dict:
    from PIL import Image

    from . import media

    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    raw, path = policy.fetch(url, "image_url")
    if raw is None:
        return {"type": "image", "image": path}
    if not raw:
        raise ApiError(400, "image_url: the image is empty (0 bytes)", param="messages")
    try:  # the formats a browser shows: no Pillow plug-in that runs other programs (EPS) on a client's bytes
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Exception:
        raise ApiError(400, "image_url: not an image Pillow can read", param="messages") from None
    return {"type": "image", "image": media.open_image(image)}


def _audio_item(part: dict, policy: MediaPolicy) -> dict:
    from . import media

    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise ApiError(400, "input_audio: must be {'data': BASE64, 'format': 'wav'|'mp3'|'flac'|'ogg'}",
                       param="messages")
    if spec.get("format") not in AUDIO_FORMATS:
        raise ApiError(400, f"input_audio: format {spec.get('format')!r} is not one of {', '.join(AUDIO_FORMATS)}",
                       param="messages")
    try:
        raw = base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "input_audio: data is not valid base64", param="messages") from None
    if not raw:
        raise ApiError(400, "input_audio: the audio is empty (0 bytes)", param="messages")
    try:
        samples, rate = media.read_sound(io.BytesIO(raw), "input_audio", policy.allow_long)
    except MlxGemmaError:
        raise
    except Exception as e:
        raise ApiError(400, f"input_audio: cannot decode the {spec['format']} data ({_one_line(e)[:200]})",
                       param="messages") from None
    return {"type": "audio", "audio": (media.load_audio((samples, rate), policy.allow_long), media.SAMPLE_RATE)}


def _video_item(part: dict, policy: MediaPolicy, temp_files: list) -> dict:
    spec = part.get("video_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    raw, path = policy.fetch(url, "video_url")
    if raw is not None:
        if not raw:
            raise ApiError(400, "video_url: the video is empty (0 bytes)", param="messages")
        # In a folder of its own: a container that names other files (an ffconcat list, say) finds
        # nothing of the host's beside it.
        folder = tempfile.mkdtemp(prefix="mlx-gemma-video-")
        temp_files.append(folder)
        path = os.path.join(folder, "upload.mp4")
        with open(path, "wb") as f:
            f.write(raw)
    return {"type": "video", "video": path}


def _tool_call_for_template(call, i: int, j: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"messages[{i}].tool_calls[{j}]: must be {{'type': 'function', 'function': "
                            "{'name': ..., 'arguments': JSON string}}", param="messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise ApiError(400, f"messages[{i}].tool_calls[{j}]: arguments are not valid JSON",
                           param="messages") from None
    if call.get("id") is not None and not isinstance(call.get("id"), str):
        raise ApiError(400, f"messages[{i}].tool_calls[{j}].id: must be a string", param="messages")
    # Templates read the arguments as a mapping (OpenAI sends a JSON string).
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def convert_messages(messages, policy: MediaPolicy, temp_files: list) -> list:
    """OpenAI chat messages -> the library's (media decoded; paths only as the policy allows)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    out, call_names = [], {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: must be an object with 'role' and 'content'", param="messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role: {str(m.get('role'))[:50]!r} is not one of system, developer, "
                                "user, assistant, tool", param="messages")
        content = m.get("content")
        message: dict[str, Any] = {"role": role}
        if content is None or isinstance(content, str):
            message["content"] = content if content is not None else ""
        elif isinstance(content, list):
            items = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    items.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    items.append(_image_item(part, policy))
                elif kind == "input_audio":
                    items.append(_audio_item(part, policy))
                elif kind == "video_url":
                    items.append(_video_item(part, policy, temp_files))
                else:
                    raise ApiError(400, f"messages[{i}].content[{j}]: expected a part of type text, image_url, "
                                        f"input_audio or video_url, got {str(kind)[:50]!r}", param="messages")
            message["content"] = items
        else:
            raise ApiError(400, f"messages[{i}].content: must be a string or a list of parts, got "
                                f"{type(content).__name__}", param="messages")
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise ApiError(400, f"messages[{i}].tool_calls: must be a list", param="messages")
            message["tool_calls"] = [_tool_call_for_template(c, i, j) for j, c in enumerate(m["tool_calls"])]
            call_names.update((c["id"], c["function"]["name"]) for c in message["tool_calls"])
        if role == "tool":
            # Gemma 4 names the function in its response block; OpenAI gives only the call's id.
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise ApiError(400, f"messages[{i}].tool_call_id: must be a string", param="messages")
            name = m.get("name") if isinstance(m.get("name"), str) else call_names.get(call_id)
            message.update({k: v for k, v in (("tool_call_id", call_id), ("name", name)) if isinstance(v, str)})
        out.append(message)
    return out


def check_tools(body: dict) -> Optional[list]:
    tools = _typed(body, "tools", list, "a list")
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported", param="tool_choice")
    if not tools or choice == "none":
        return None
    for k, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
                and isinstance(tool["function"].get("name"), str)):
            raise ApiError(400, f"tools[{k}]: must be {{'type': 'function', 'function': {{'name': ..., ...}}}}",
                           param="tools")
    return tools


# --- the engine: one model, one thread ----------------------------------------------------------

class Cancelled(Exception):
    """The client went away; raised inside the generation to stop it between steps."""


@dataclass
class Job:
    kind: str  # "chat" or "completion"
    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    messages: Optional[list] = None
    prompt: Optional[str] = None
    enable_thinking: bool = False
    image_budget: Optional[int] = None
    tools: Optional[list] = None
    temp_files: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        if self.loop is None:  # a follower rank's copy of the job: rank 0 answers
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            self.cancelled.set()


class Engine:
    """Owns the model, the processor and the prefix cache; `submit` queues a job.

    The model is loaded on the worker thread too: MLX streams are per thread, and no other
    thread ever touches the model.

    Under mlx.launch (`cluster` of several ranks) rank 0 reads each request's prompt and media
    and shares them with the others (`follow`), and every rank runs the same steps: the same
    prefix-cache decisions (entries weigh the same on every rank), the same sampling seed, and
    one agreement per step on whether rank 0's client is still there."""

    def __init__(self, load, args, prompt_cache_bytes: int, context: int, cluster=None):
        from .cluster import Cluster
        from .prompt_cache import PromptCache, cache_bytes

        self.args, self.context = args, context  # prompt + reply tokens a request may use
        self.cluster = cluster or Cluster()
        self.prompt_cache = (PromptCache(prompt_cache_bytes, lambda c: self.cluster.largest(cache_bytes(c)))
                             if prompt_cache_bytes > 0 else None)
        self.queue: queue.Queue = queue.Queue(maxsize=args.queue_size)
        self.busy = False
        loaded: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, args=(load, loaded), name="mlx-gemma-engine", daemon=True)
        self.thread.start()
        error = loaded.get()
        if error is not None:
            raise error
        self.turn_id = self.processor.tokenizer.get_vocab().get("<|turn>")


    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.args.queue_size} requests waiting); retry shortly",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"}) from None

    def _loop(self, load, loaded: queue.Queue) -> None:
        import mlx.core as mx

        mx.set_default_stream(mx.new_stream(mx.default_device()))
        try:
            self.model, self.processor = load()
        except BaseException as e:
            loaded.put(e)
            return
        loaded.put(None)
        if self.cluster.rank > 0:
            return self._follow()
        while True:
            job = self.queue.get()
            if job is None:  # the server is stopping: so do the other ranks
                self.cluster.share(None)
                return
            if job.cancelled.is_set():
                remove_files(job.temp_files)
                continue
            self.busy = True
            try:
                self._run(job)
            except Cancelled:
                job.emit("error", ApiError(499, "client closed the request"))
            except Exception as e:  # a bad request must not end the worker
                job.emit("error", api_error(e))
                self._check_in_step(e)
            finally:
                self.busy = False
                remove_files(job.temp_files)

    def _check_in_step(self, e: Exception) -> None:
        """A request's errors (ApiError, MlxGemmaError) arise alike on every rank; anything else
        (out of memory, a bug) struck this rank alone, and the ranks no longer agree on what
        runs next: they all stop, naming this one's cause."""
        if self.cluster.size > 1 and not isinstance(e, (ApiError, MlxGemmaError)):
            self.cluster.abort(f"the model failed on rank {self.cluster.rank}: {_one_line(str(e)) or type(e).__name__}")

    def _follow(self) -> None:
        """A rank other than 0: run every job rank 0 shares, until it shares None."""
        while True:
            shared = self.cluster.share()
            if shared is None:
                return
            kind, params, inputs = shared
            try:
                self._answer(Job(kind, params, loop=None, events=None), inputs)
            except Cancelled:
                pass
            except Exception as e:  # rank 0 meets the same and answers it
                self._check_in_step(e)

    def close(self) -> None:
        """Stop the worker once the queue is done (and, under mlx.launch, the other ranks)."""
        self.queue.put(None)
        self.thread.join()

    def stopped(self, job: "Job") -> bool:
        """Whether to stop `job` before the next step: its client went away (on rank 0)."""
        return self.cluster.any(job.cancelled.is_set())

    def _inputs(self, job: Job):
        from .prompt import MediaOptions, PromptInputs

        if job.kind == "completion":
            return PromptInputs(self.processor.encode(job.prompt))
        options = MediaOptions(image_budget=job.image_budget, allow_long=self.args.allow_long_media)
        return self.processor.chat_inputs(job.messages, enable_thinking=job.enable_thinking, options=options,
                                          tools=job.tools)

    def _run(self, job: Job) -> None:
        inputs = self._inputs(job)
        remove_files(job.temp_files)  # decoded: an uploaded video is not kept while it is answered
        if self.cluster.size > 1:
            self.cluster.share((job.kind, job.params, replace(inputs, messages=None)))
        self._answer(job, inputs)

    def _answer(self, job: Job, inputs) -> None:
        import mlx.core as mx

        from .generation import generate_step, make_sampling, stream_generate
        from .prompt_cache import prompt_key

        ids, p = inputs.ids, job.params
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the served context is {self.context}",
                           param="messages", code="context_length_exceeded")
        if p.max_tokens is not None and len(ids) + p.max_tokens > self.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({p.max_tokens}) is over the "
                                f"served context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = p.max_tokens or min(self.args.max_tokens, self.context - len(ids))
        sampling = {"temp": self.args.temp, "top_p": self.args.top_p, "top_k": self.args.top_k,
                    "min_p": self.args.min_p, **p.sampling}
        sampler, processors = make_sampling(self.processor, **sampling)
        sampled = []

        def recording_sampler(logprobs):
            token = sampler(logprobs)
            sampled.append(token)
            return token

        def progress(done, total):
            if self.stopped(job):
                raise Cancelled()

        if p.seed is not None:
            mx.random.seed(p.seed)
        config = self.model.config
        key = prompt_key(inputs, config)
        split = lambda n: inputs.split_point(n, config)  # noqa: E731
        cache, cached = self.prompt_cache.fetch(key, split) if self.prompt_cache is not None else (None, 0)
        if cache is None:
            cache = self.model.make_cache(kv_bits=self.args.kv_bits)
        job.emit("start", {"prompt_tokens": len(ids), "cached_tokens": cached})
        if self.prompt_cache is not None and job.kind == "chat":
            # An exact snapshot where the last user turn starts: the next request that shares
            # everything before it (system prompt, tools, earlier turns) reuses it without a trim.
            turn = self._last_turn_start(ids)
            if turn > cached and split(turn) == turn:
                part = _head(inputs, turn, config).tail(cached, config)
                soft = self.model.embed_media(**part.arrays()) if part.has_media else None
                for _ in generate_step(self.model, part.ids, cache, max_tokens=1, soft_tokens=soft,
                                       progress=progress):
                    pass
                self.prompt_cache.insert(key[:turn], cache, copy_cache=True)
                cached = turn
        pieces = stream_generate(self.model, self.processor, inputs.tail(cached, config) if cached else inputs,
                                 cache=cache, max_tokens=max_tokens, sampler=recording_sampler,
                                 logits_processors=processors, progress=progress)
        finish, generated, consistent = "length", 0, False
        markers = self.processor.eos_token_ids | {self.processor.thought_start_id, self.processor.thought_end_id}
        try:
            for r in pieces:
                if self.stopped(job):
                    raise Cancelled()
                generated = r.generation_tokens
                entry = None
                if p.top_logprobs is not None and not r.thinking and r.token not in markers:
                    entry = self._logprob_entry(r.token, r.logprobs, p.top_logprobs)
                if r.text or entry:
                    job.emit("text", r.text, r.thinking, generated, entry)
                if r.finish_reason:
                    finish = r.finish_reason
            consistent = True
        except Cancelled:  # between two steps: the cache holds what it says it holds
            consistent = True
            raise
        finally:
            pieces.close()
            if self.prompt_cache is not None and consistent:
                held = cache[0].offset
                tokens = [int(t.item()) for t in sampled[:max(held - len(ids), 0)]]
                self.prompt_cache.insert((key + tokens)[:held], cache)
        job.emit("done", finish, generated)

    def _logprob_entry(self, token: int, logprobs, top: int) -> dict:
        """OpenAI's per-token logprobs (after the checkpoint's suppressed tokens are masked)."""
        import mlx.core as mx

        def one(t: int, lp: float) -> dict:
            text = self.processor.decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        entry = one(token, logprobs[token].item())
        best = mx.argsort(-logprobs)[:top].tolist() if top else []
        entry["top_logprobs"] = [one(t, logprobs[t].item()) for t in best]
        return entry

    def _last_turn_start(self, ids: list) -> int:
        """Where the last user turn begins: the next-to-last `<|turn>` (the last opens the reply)."""
        if self.turn_id is None:
            return 0
        starts = [i for i, t in enumerate(ids) if t == self.turn_id]
        return starts[-2] if len(starts) >= 2 else 0


def _head(inputs, n: int, config):
    """ids[:n] and the media whose placeholders lie there (`n` must not cut a medium)."""
    from .prompt import PromptInputs

    tail = inputs.tail(n, config)
    return PromptInputs(inputs.ids[:n], inputs.images[:len(inputs.images) - len(tail.images)],
                        inputs.videos[:len(inputs.videos) - len(tail.videos)],
                        inputs.audio[:len(inputs.audio) - len(tail.audio)])


def remove_files(paths: list) -> None:
    """The upload folders of a request (each holds one decoded medium)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# --- the HTTP app -------------------------------------------------------------------------------

class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what may begin one."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        text = self.held + text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _tool_calls(text: str) -> tuple[str, list]:
    """Gemma 4's `<|tool_call>call:NAME{...}<tool_call|>` blocks -> (the text around them,
    OpenAI tool_calls), parsed by mlx-lm's Gemma 4 parser."""
    from mlx_lm.tool_parsers import gemma4

    start, end = gemma4.tool_call_start, gemma4.tool_call_end
    if start not in text:
        return text, []
    calls, kept, rest = [], [], text
    while start in rest:
        before, _, after = rest.partition(start)
        body, _, rest = after.partition(end)
        kept.append(before)
        try:
            parsed = gemma4.parse_tool_call(body)
        except (ValueError, json.JSONDecodeError):
            kept.append(start + body + end)
            continue
        for call in parsed if isinstance(parsed, list) else [parsed]:
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    kept.append(rest)
    return "".join(kept), calls


class Guard:
    """The ASGI layer around the routes: the API key, errors in OpenAI's shape for anything that escapes,
    and one log line per request when its response has been sent (a stream at its end)."""

    def __init__(self, app, api_key: Optional[str]):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tic, status, usage = time.perf_counter(), [0], {}
        scope.setdefault("state", {})["usage"] = usage

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def reply(e: ApiError):
            from fastapi.responses import JSONResponse

            await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, tracked)

        try:
            if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                await reply(ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                     type="authentication_error", code="invalid_api_key"))
            else:
                await self.app(scope, receive, tracked)
        except Exception as e:
            if not status[0]:
                await reply(api_error(e))
            elif not isinstance(e, OSError):
                log.exception("error after the response started")
        finally:
            log.info("%s %s %d prompt=%s cached=%s generated=%s %.3fs", scope["method"], scope["path"], status[0],
                     usage.get("prompt", "-"), usage.get("cached", "-"), usage.get("generated", "-"),
                     time.perf_counter() - tic)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())


def create_app(engine: Engine, args, served: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="mlx-gemma", docs_url=None, redoc_url=None, openapi_url=None)
    policy = MediaPolicy(args.allow_local_media, args.allow_remote_media, args.allow_long_media, args.max_body_bytes)

    def error_response(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    app.add_middleware(Guard, api_key=args.api_key)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes, over the limit of {args.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > args.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {args.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep, too many digits
            raise ApiError(400, f"the body is not valid JSON ({_one_line(e)[:200]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def run(request: Request, job: Job, params: Params, chat: bool):
        try:
            engine.submit(job)
        except ApiError:  # a full queue: the job's uploads go now, nobody else will remove them
            remove_files(job.temp_files)
            raise
        usage = request.state.usage
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        async def next_event():
            # Once streaming, Starlette itself listens for the disconnect (and cancels us).
            while True:
                try:
                    return await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if not usage.get("streaming") and await request.is_disconnected():
                        job.cancelled.set()
                        raise Cancelled() from None

        try:
            first = await next_event()
        except Cancelled:
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            raise first[1]
        info = first[1]
        usage.update(prompt=info["prompt_tokens"], cached=info["cached_tokens"])

        def usage_body(generated: int) -> dict:
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": generated,
                    "total_tokens": info["prompt_tokens"] + generated,
                    "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}

        stops = StopMatcher(params.stop)
        tools = bool(job.tools)

        async def pieces():
            """(kind, text) until the reply ends; then ('finish', reason, generated tokens)."""
            generated = 0
            while True:
                event = await next_event()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    tail = stops.flush()
                    if tail:
                        yield ("content", tail)
                    yield ("finish", event[1], event[2])
                    return
                _, text, thinking, generated, entry = event
                if entry is not None:
                    yield ("logprob", entry)
                if thinking:
                    yield ("reasoning", text)
                    continue
                text = stops.feed(text)
                if text:
                    yield ("content", text)
                if stops.stopped:
                    job.cancelled.set()  # the worker stops at its next step
                    yield ("finish", "stop", generated)
                    return

        if not params.stream:
            content, reasoning, entries, finish, generated = [], [], [], "stop", 0
            try:
                async for piece in pieces():
                    if piece[0] == "finish":
                        finish, generated = piece[1], piece[2]
                    else:
                        {"content": content, "reasoning": reasoning, "logprob": entries}[piece[0]].append(piece[1])
            except Cancelled:
                return JSONResponse({}, status_code=499)
            finally:
                job.cancelled.set()
            usage["generated"] = generated
            text = "".join(content)
            if chat:
                text, calls = _tool_calls(text) if tools else (text, [])
                message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
                if reasoning:
                    message["reasoning"] = "".join(reasoning)
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
                logprobs = {"content": entries} if params.top_logprobs is not None else None
                choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": served,
                                 "choices": [choice], "usage": usage_body(generated)})

        usage["streaming"] = True

        def sse(choices: list, extra: Optional[dict] = None) -> str:
            chunk = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": served,
                     "choices": choices, **(extra or {})}
            return f"data: {json.dumps(chunk)}\n\n"

        pending: list = []  # logprobs ride with the next chunk

        def delta(fields: dict, finish=None) -> list:
            if chat:
                logprobs = {"content": pending[:]} if pending else None
                pending.clear()
                return [{"index": 0, "delta": fields, "finish_reason": finish, "logprobs": logprobs}]
            return [{"index": 0, "text": fields.get("content", ""), "finish_reason": finish, "logprobs": None}]

        def indexed(calls: list, before: int) -> list:
            return [dict(c, index=before + k) for k, c in enumerate(calls)]

        async def events():
            generated, held, calls_sent = 0, "", 0
            try:
                if chat:
                    yield sse(delta({"role": "assistant", "content": ""}))
                async for piece in pieces():
                    if piece[0] == "finish":
                        finish, generated = piece[1], piece[2]
                        if held:  # an unfinished call is text after all
                            yield sse(delta({"content": held}))
                        if calls_sent:
                            finish = "tool_calls"
                        yield sse(delta({}, finish))
                        break
                    if piece[0] == "logprob":
                        pending.append(piece[1])
                        continue
                    if piece[0] == "reasoning":
                        yield sse(delta({"reasoning": piece[1]}))
                        continue
                    text, calls = piece[1], []
                    if tools:  # a call is sent whole, once its end marker has arrived
                        text, calls, held = take_calls(held + text)
                    if text:
                        yield sse(delta({"content": text}))
                    if calls:
                        yield sse(delta({"tool_calls": indexed(calls, calls_sent)}))
                        calls_sent += len(calls)
                usage["generated"] = generated
                if params.include_usage:
                    yield sse([], {"usage": usage_body(generated)})
                yield "data: [DONE]\n\n"
            except Cancelled:
                pass
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception as e:
                yield f"data: {json.dumps(api_error(e).body())}\n\n"
            finally:
                job.cancelled.set()  # the client is gone or the reply is over: free the worker

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        params = check_common(body, CHAT_FIELDS, served)
        kwargs = _typed(body, "chat_template_kwargs", dict, "an object", {})
        if set(kwargs) - {"enable_thinking"}:
            raise ApiError(400, "chat_template_kwargs: only enable_thinking is supported", param="chat_template_kwargs")
        thinking = _typed(kwargs, "enable_thinking", bool, "a boolean", False)
        budget = _typed(body, "image_budget", int, "a whole number")
        if budget is not None:
            from . import media

            if budget not in media.BUDGETS:
                raise ApiError(400, f"image_budget: must be one of {', '.join(map(str, media.BUDGETS))}",
                               param="image_budget")
        top = _typed(body, "top_logprobs", int, "a whole number")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs: must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
        if _typed(body, "logprobs", bool, "a boolean", False):
            params.top_logprobs = top or 0
        elif top:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        fmt = _typed(body, "response_format", dict, "an object")
        if fmt is not None and fmt.get("type") != "text":
            raise ApiError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
        if _typed(body, "parallel_tool_calls", bool, "a boolean", True) is False:
            raise ApiError(400, "parallel_tool_calls: false is not supported", param="parallel_tool_calls")
        tools = check_tools(body)
        temp_files: list = []
        try:
            messages = await run_in_threadpool(convert_messages, body.get("messages"), policy, temp_files)
        except MlxGemmaError as e:
            remove_files(temp_files)
            raise ApiError(400, _one_line(e), param="messages") from None
        except ApiError:
            remove_files(temp_files)
            raise
        job = Job("chat", params, asyncio.get_running_loop(), asyncio.Queue(), messages=messages,
                  enable_thinking=thinking, image_budget=budget, tools=tools, temp_files=temp_files)
        return await run(request, job, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        params = check_common(body, COMPLETION_FIELDS, served)
        if _typed(body, "echo", bool, "a boolean", False):
            raise ApiError(400, "echo: not supported by this server", param="echo")
        if _typed(body, "logprobs", (bool, int), "a number", False):
            raise ApiError(400, "logprobs: not supported on /v1/completions (use /v1/chat/completions)",
                           param="logprobs")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt: must be a non-empty string", param="prompt")
        job = Job("completion", params, asyncio.get_running_loop(), asyncio.Queue(), prompt=prompt)
        return await run(request, job, params, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "mlx-gemma"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": engine.busy, "waiting": engine.queue.qsize()}

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code=code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e):
        return error_response(ApiError(400, _one_line(e)[:300]))

    return app


def take_calls(held: str) -> tuple[str, list, str]:
    """Streamed text so far -> (text to send now, whole tool calls, what must wait: a call
    without its end marker yet, or a tail that may begin one)."""
    from mlx_lm.tool_parsers import gemma4

    start, end = gemma4.tool_call_start, gemma4.tool_call_end
    content, calls = [], []
    while True:
        at = held.find(start)
        if at < 0:
            keep = max((k for k in range(1, len(start)) if held.endswith(start[:k])), default=0)
            content.append(held[:len(held) - keep])
            held = held[len(held) - keep:]
            break
        content.append(held[:at])
        held = held[at:]
        close = held.find(end)
        if close < 0:
            break
        block, held = held[:close + len(end)], held[close + len(end):]
        text, found = _tool_calls(block)
        content.append(text)
        calls += found
    return "".join(content), calls, held


def check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise InputError(f"--port {port}: cannot listen on {host} ({e.strerror})") from None


def plan_server(path: Path, args, cluster=None) -> tuple[int, int]:
    """(prefix-cache bytes, context) within the memory budget: by default a quarter of what the
    weights leave goes to the prefix cache; a request may use the longest context whose plan
    fits in the rest (the model's maximum where memory allows). Under mlx.launch each rank
    plans its own part and all serve what the tightest one fits."""
    from .cluster import Cluster
    from .config import ModelConfig
    from .memory import KVOptions, longest_context, make_plan, memory_budget, refusal, run_dtype_bytes, weight_bytes

    cluster = cluster or Cluster()
    config = ModelConfig.from_file(path / "config.json")
    budget, kv = cluster.smallest(memory_budget(args.memory_limit)), KVOptions(bits=args.kv_bits)
    dtype_bytes = run_dtype_bytes(path, config)
    shares = cluster.shares(config, weight_bytes(path, dtype_bytes), args.pipeline)
    cache_bytes = (args.prompt_cache_bytes if args.prompt_cache_bytes is not None
                   else min(max(0, (budget - weights) // 4) for _, weights in shares))
    for rank, (view, weights) in enumerate(shares):
        if longest_context(view, weights, budget - cache_bytes, kv, dtype_bytes) == 0:
            plan = make_plan(view, weights, 1, budget - cache_bytes, kv, dtype_bytes)
            where = f"rank {rank}: " if cluster.size > 1 else ""
            raise InputError(f"{path}: {where}{refusal(plan, view, kv, dtype_bytes)} (the prefix cache holds "
                             f"{cache_bytes} bytes of the budget; --prompt-cache-bytes sets it)")
    context = min(longest_context(view, weights, budget - cache_bytes, kv, dtype_bytes) for view, weights in shares)
    return cache_bytes, context


def check_flags(args) -> None:
    """Flags first, before the seconds of importing MLX and the minutes of loading."""
    for name in ("max_tokens", "queue_size", "max_body_bytes"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}: must be a positive number, got {getattr(args, name)}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise InputError(f"--prompt-cache-bytes: must be 0 (off) or more, got {args.prompt_cache_bytes}")
    if args.kv_bits not in (None, 4, 8):
        raise InputError(f"--kv-bits: must be 4 or 8, got {args.kv_bits}")
    if not 0 < args.port < 65536:
        raise InputError(f"--port: must be from 1 to 65535, got {args.port}")


def serve(args, cluster) -> None:
    """Rank 0 (the only one, unless launched) serves HTTP; the other ranks follow its engine."""
    if cluster.rank == 0:
        check_port(args.host, args.port)
    import uvicorn

    from .generation import check_sampling
    from .loading import load, resolve_model_path

    check_sampling(args.temp, args.top_p, args.top_k, args.min_p)
    path = resolve_model_path(args.model)
    cluster.check_same_checkpoint(path)
    cache_bytes, context = plan_server(path, args, cluster)
    cluster.seed(None)
    mode = "pipeline" if args.pipeline else "tensor"
    engine = Engine(lambda: load(path, group=cluster.group, parallel=mode, adapter_path=args.adapter_path), args,
                    cache_bytes, context, cluster)
    if cluster.rank > 0:
        # Ctrl-C in the terminal reaches every rank: rank 0 stops serving and then stops this one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.thread.join()
        return
    app = create_app(engine, args, args.model)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    ranks = f", {cluster.size} ranks, {mode} parallel" if cluster.size > 1 else ""
    log.info("serving %s on http://%s:%d (context %d tokens, prefix cache %d bytes%s)", args.model, args.host,
             args.port, context, cache_bytes, ranks)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.close()


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        check_flags(args)
        from .cluster import join

        cluster = join()  # one rank of several under mlx.launch, else a single process
        with cluster.running():
            serve(args, cluster)

    run_cli(work, interrupted="server stopped")


if __name__ == "__main__":
    main()
