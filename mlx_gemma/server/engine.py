"""The worker that owns the model: a bounded queue of jobs, one thread that runs every MLX call
(MLX is not thread-safe), and the prefix cache. Jobs run one at a time, in arrival order; each
streams its events back to the event loop that queued it."""

import asyncio
import queue
import threading
from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import MlxGemmaError
from .errors import ApiError, api_error, one_line
from .media import remove_files
from .request import Request


class Cancelled(Exception):
    """The client went away; raised inside the generation to stop it between steps."""


@dataclass
class Job:
    """`kind`: "chat" (messages through the template), "completion" (a raw prompt) or "count"
    (the prompt's tokens only). Events: ("start", info), ("text", text, thinking, generated,
    logprob entry), ("done", finish, generated, thought tokens), ("count", n), ("error", ApiError)."""

    kind: str
    request: Request
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
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
        from ..cluster import Cluster
        from ..prompt_cache import PromptCache, cache_bytes

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
            self.thread.join()
            raise error
        self.vocab = self.processor.tokenizer.get_vocab()
        self.turn_id = self.vocab.get("<|turn>")

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.args.queue_size} requests waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None

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
                remove_files(job.request.temp_files)
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
                remove_files(job.request.temp_files)

    def _check_in_step(self, e: Exception) -> None:
        """A request's errors (ApiError, MlxGemmaError) arise alike on every rank; anything else
        (out of memory, a bug) struck this rank alone, and the ranks no longer agree on what
        runs next: they all stop, naming this one's cause."""
        if self.cluster.size > 1 and not isinstance(e, (ApiError, MlxGemmaError)):
            self.cluster.abort(f"the model failed on rank {self.cluster.rank}: {one_line(str(e)) or type(e).__name__}")

    def _follow(self) -> None:
        """A rank other than 0: run every job rank 0 shares, until it shares None."""
        while True:
            shared = self.cluster.share()
            if shared is None:
                return
            kind, request, inputs = shared
            try:
                self._answer(Job(kind, request), inputs)
            except Cancelled:
                pass
            except Exception as e:  # rank 0 meets the same and answers it
                self._check_in_step(e)

    def close(self) -> None:
        """Stop the worker once the queue is done (and, under mlx.launch, the other ranks)."""
        self.queue.put(None)
        self.thread.join()

    def stopped(self, job: Job) -> bool:
        """Whether to stop `job` before the next step: its client went away (on rank 0)."""
        return self.cluster.any(job.cancelled.is_set())

    def _inputs(self, job: Job):
        from ..prompt import MediaOptions, PromptInputs

        r = job.request
        if job.kind == "completion":
            return PromptInputs(self.processor.encode(r.prompt, split_special_tokens=not r.raw_prompt))
        options = MediaOptions(image_budget=r.image_budget, allow_long=self.args.allow_long_media)
        return self.processor.chat_inputs(r.messages, enable_thinking=r.thinking, options=options, tools=r.tools)

    def _run(self, job: Job) -> None:
        inputs = self._inputs(job)
        remove_files(job.request.temp_files)  # decoded: an uploaded video is not kept while it is answered
        if job.kind == "count":
            return job.emit("count", len(inputs.ids))
        if self.cluster.size > 1:
            request = replace(job.request, messages=None, temp_files=[])
            self.cluster.share((job.kind, request, replace(inputs, messages=None)))
        self._answer(job, inputs)

    def _processors(self, r: Request):
        from mlx_lm.sample_utils import make_logits_processors

        from ..constrain import TOOL_CALL, Guide
        from ..generation import completion_penalties, make_sampling, thought_budget

        sampling = {"temp": self.args.temp, "top_p": self.args.top_p, "top_k": self.args.top_k,
                    "min_p": self.args.min_p, **r.sampling}
        sampler, processors = make_sampling(self.processor, **sampling)
        if r.presence_penalty or r.frequency_penalty:
            processors.append(completion_penalties(r.presence_penalty, r.frequency_penalty))
        if r.thinking and r.thinking_budget is not None:
            processors.append(thought_budget(self.processor, r.thinking_budget))
        if r.forbid_tool_calls and TOOL_CALL in self.vocab:
            processors += make_logits_processors(logit_bias={self.vocab[TOOL_CALL]: -float("inf")})
        if r.constraint is not None:  # last: it masks what the others left
            processors.append(Guide(self.processor, r.constraint, thinking=r.thinking))
        return sampler, processors

    def _answer(self, job: Job, inputs) -> None:
        import mlx.core as mx

        from ..generation import generate_step, stream_generate
        from ..prompt_cache import prompt_key

        ids, r = inputs.ids, job.request
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the served context is {self.context}",
                           param="messages", code="context_length_exceeded")
        if r.max_tokens is not None and len(ids) + r.max_tokens > self.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({r.max_tokens}) is over the "
                                f"served context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = r.max_tokens or min(self.args.max_tokens, self.context - len(ids))
        sampler, processors = self._processors(r)
        sampled = []

        def recording_sampler(logprobs):
            token = sampler(logprobs)
            sampled.append(token)
            return token

        def progress(done, total):
            if self.stopped(job):
                raise Cancelled()

        if r.seed is not None:
            mx.random.seed(r.seed)
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
        finish, generated, thought, consistent = "length", 0, 0, False
        markers = self.processor.eos_token_ids | {self.processor.thought_start_id, self.processor.thought_end_id}
        try:
            for piece in pieces:
                if self.stopped(job):
                    raise Cancelled()
                generated = piece.generation_tokens
                thought += piece.thinking
                entry = None
                if r.top_logprobs is not None and not piece.thinking and piece.token not in markers:
                    entry = self._logprob_entry(piece.token, piece.logprobs, r.top_logprobs)
                if piece.text or entry:
                    job.emit("text", piece.text, piece.thinking, generated, entry)
                if piece.finish_reason:
                    finish = piece.finish_reason
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
        job.emit("done", finish, generated, thought)

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
    from ..prompt import PromptInputs

    tail = inputs.tail(n, config)
    return PromptInputs(inputs.ids[:n], inputs.images[:len(inputs.images) - len(tail.images)],
                        inputs.videos[:len(inputs.videos) - len(tail.videos)],
                        inputs.audio[:len(inputs.audio) - len(tail.audio)])
