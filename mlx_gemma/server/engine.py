"""The worker that owns the model: a bounded queue of jobs, one thread that runs every MLX call
(MLX is not thread-safe), continuous batching, admission by the memory plan, and the prefix cache.

Running sequences decode together, one forward per step over all of them (`Model.step_rows`:
the weights are read once per step, each sequence attends over its own caches). A newcomer is
admitted when the plan holds the running sequences' KV at their planned lengths (prompt +
max_tokens) plus its own; its prompt is prefilled in chunks with one decode step of the others
between two chunks, so a long prompt does not stall the streams; it then joins the batch.
A sequence that finishes, or whose client went away, leaves at once.

A request for n replies (Chat Completions' `n`) is n sequences: its prompt is prefilled once,
the other n - 1 take copies of that cache and draw their first tokens from the same logits, each
with its own sampler and processors; admission plans KV (and batch rows) for all n."""

import copy
import queue
import threading
import time
from dataclasses import replace
from typing import Optional

from ..errors import MlxGemmaError
from .errors import ApiError, api_error, one_line
from .job import STOP, Cancelled, Job
from .media import remove_files
from .plan import ServingPlan
from .request import Request
from .sequence import Sequence

def engine_stopped() -> ApiError:
    return ApiError(503, "the server's engine has stopped; retry once it is restarted", code="engine_stopped")


class Engine:
    """Owns the model, the processor and the prefix cache; `submit` queues a job.

    The model is loaded on the worker thread too: MLX streams are per thread, and no other
    thread ever touches the model.

    Under mlx.launch (`cluster` of several ranks) one sequence runs at a time: rank 0 reads
    each request's prompt and media and shares them with the others (`follow`), and every rank
    runs the same steps: the same prefix-cache decisions (entries weigh the same on every rank),
    the same sampling seed, and one agreement per step on whether rank 0's client is still there."""

    def __init__(self, load, args, prompt_cache_bytes: int, context: int, plan: ServingPlan, cluster=None,
                 metrics=None, load_drafter=None, seed=None):
        from ..cluster import Cluster
        from ..prompt_cache import PromptCache, cache_bytes

        self.args, self.context, self.plan, self.metrics = args, context, plan, metrics
        self.cluster = cluster or Cluster()
        self.prompt_cache = (PromptCache(prompt_cache_bytes, lambda c: self.cluster.largest(cache_bytes(c)))
                             if prompt_cache_bytes > 0 else None)
        self.max_num_seqs = 1 if self.cluster.size > 1 else args.max_num_seqs or plan.max_num_seqs(
            plan.budget - plan.fixed - prompt_cache_bytes, min(context, 4096))
        self.queue: queue.Queue = queue.Queue(maxsize=args.queue_size)
        self.running: list = []
        self.pending: Optional[Job] = None
        self.load_drafter, self.drafter = load_drafter, None
        self.stopped_serving, self.seed = False, seed
        self.live: list = []  # jobs taken from the queue and not yet answered
        loaded: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, args=(load, loaded), name="mlx-gemma-engine", daemon=True)
        self.thread.start()
        error = loaded.get()
        if error is not None:
            self.thread.join()
            raise error
        self.vocab = self.processor.tokenizer.get_vocab()
        self.turn_id = self.vocab.get("<|turn>")

    @property
    def waiting(self) -> int:
        return self.queue.qsize() + (self.pending is not None)

    def submit(self, job: Job) -> None:
        if self.stopped_serving:
            raise engine_stopped()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.args.queue_size} requests waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        if self.stopped_serving:  # the worker ended while this was queued: nobody else will answer it
            self._abandon([])

    def close(self) -> None:
        """Stop the worker (and, under mlx.launch, the other ranks); what still runs or waits is
        answered 503."""
        self.queue.put(STOP)
        self.thread.join()

    def _loop(self, load, loaded: queue.Queue) -> None:
        import mlx.core as mx

        mx.set_default_stream(mx.new_stream(mx.default_device()))
        if self.seed is not None:
            mx.random.seed(self.seed)
        try:
            self.model, self.processor = load()
            if self.load_drafter is not None:
                self.drafter = self.load_drafter(self.model)
        except BaseException as e:
            loaded.put(e)
            return
        loaded.put(None)
        if self.cluster.rank > 0:
            return self._follow()
        try:
            self._serve()
        finally:  # stopped, or died of what no request's handler caught: answer whoever still waits
            self.stopped_serving = True
            self._abandon(self.live)

    def _serve(self) -> None:
        while True:
            self.live = [job for job in self.live if not job.answered]
            if self.pending is None:
                try:
                    self.pending = self.queue.get(block=not self.running)  # idle: wait for work
                except queue.Empty:
                    pass
                if self.pending is STOP:
                    self.cluster.share(None)
                    return
                if self.pending is not None:
                    self.live.append(self.pending)
            if self.pending is not None:
                self._admit()
            if self.running:
                self._step()
            self._gauges()

    def _abandon(self, jobs: list) -> None:
        """Answer `jobs` and every queued one, unless answered already: the engine has stopped."""
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if isinstance(job, Job) and not job.answered:
                remove_files(job.request.temp_files)
                job.emit("error", engine_stopped())

    def _follow(self) -> None:
        """A rank other than 0: run every job rank 0 shares, until it shares None."""
        while True:
            shared = self.cluster.share()
            if shared is None:
                return
            kind, request, inputs = shared
            job = Job(kind, request, inputs=inputs)
            self._start(job, 0)
            while self.running:
                self._step()

    def stopped(self, job: Job, index: Optional[int] = None) -> bool:
        """Whether to stop `job` (its reply `index` alone, if given) before the next step: its
        client went away, or that reply ended (on rank 0)."""
        return self.cluster.any(job.cancelled.is_set() or (index is not None and job.ended[index].is_set()))

    def _fail(self, job: Job, e: BaseException) -> None:
        job.emit("error", ApiError(499, "client closed the request") if isinstance(e, Cancelled) else api_error(e))
        if not isinstance(e, Cancelled):
            self._check_in_step(e)

    def _check_in_step(self, e: BaseException) -> None:
        """A request's errors (ApiError, MlxGemmaError) arise alike on every rank; anything else
        (out of memory, a bug) struck this rank alone, and the ranks no longer agree on what
        runs next: they all stop, naming this one's cause."""
        if self.cluster.size > 1 and not isinstance(e, (ApiError, MlxGemmaError)):
            self.cluster.abort(f"the model failed on rank {self.cluster.rank}: {one_line(str(e)) or type(e).__name__}")

    # --- admission ---------------------------------------------------------------------------

    def _inputs(self, job: Job):
        from ..prompt import MediaOptions, PromptInputs

        r = job.request
        if job.kind == "completion":
            return PromptInputs(self.processor.encode(r.prompt, split_special_tokens=not r.raw_prompt))
        options = MediaOptions(image_budget=r.image_budget, allow_long=self.args.allow_long_media)
        return self.processor.chat_inputs(r.messages, enable_thinking=r.thinking, options=options, tools=r.tools)

    def _max_tokens(self, job: Job) -> int:
        ids, r = job.inputs.ids, job.request
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the served context is {self.context}",
                           param="messages", code="context_length_exceeded")
        if r.max_tokens is not None and len(ids) + r.max_tokens > self.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({r.max_tokens}) is over the "
                                f"served context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return r.max_tokens or min(self.args.max_tokens, self.context - len(ids))

    def _room(self, need: int) -> bool:
        """Whether `need` more bytes of KV fit beside what runs; the prefix cache gives back
        its least recently used entries first."""
        def free() -> int:
            held = self.prompt_cache.nbytes if self.prompt_cache is not None else 0
            return self.plan.budget - self.plan.fixed - held - sum(s.planned for s in self.running)

        while need > free() and self.prompt_cache is not None and self.prompt_cache.give_back():
            pass
        return need <= free()

    def _admit(self) -> None:
        """Start the waiting job if the batch and the memory plan have room; else it waits."""
        job = self.pending
        if job.cancelled.is_set():
            self.pending = None
            return remove_files(job.request.temp_files)
        n = job.request.n
        if len(self.running) + n > self.max_num_seqs and n <= self.max_num_seqs:
            return  # it waits for rows in the batch
        try:
            if n > self.max_num_seqs:
                raise ApiError(400, f"n: {n} replies run as {n} sequences at once, more than this server runs "
                                    f"together ({self.max_num_seqs}, --max-num-seqs)", param="n")
            if job.inputs is None:
                try:
                    job.inputs = self._inputs(job)
                finally:
                    remove_files(job.request.temp_files)  # decoded: an upload is not kept while answered
            if job.kind == "count":
                self.pending = None
                return job.emit("count", len(job.inputs.ids))
            max_tokens = self._max_tokens(job)
            each = self.plan.kv(len(job.inputs.ids) + max_tokens)  # every reply holds its own copy
            need = n * each + self.plan.media(job.inputs)  # the media only until the prefill is done
            if not self._room(need):
                if self.running:
                    return  # it waits for a sequence to finish
                what = "the prompt and max_tokens" if n == 1 else f"{n} replies (n) of the prompt and max_tokens"
                raise ApiError(400, f"{what} need {need / 1e9:.2f} GB of KV cache and media, more than the memory "
                                    "plan leaves beside the weights", code="context_length_exceeded")
        except Exception as e:
            self.pending = None
            return self._fail(job, e)
        self.pending = None
        if self.cluster.size > 1:
            self.cluster.share((job.kind, replace(job.request, messages=None, temp_files=[]),
                                replace(job.inputs, messages=None)))
        self._start(job, each)

    # --- prefill -----------------------------------------------------------------------------

    def _processors(self, r: Request, index: int = 0):
        """Reply `index`'s sampler and logits processors. With a seed, each reply draws from its
        own key, so a seeded request repeats whatever else the batch runs: the first reply from
        the seed's (what `generate --seed` draws), reply i from a key split off seed + i's (not
        one that seed + i's own first reply draws with)."""
        import mlx.core as mx
        from mlx_lm.sample_utils import make_logits_processors

        from ..constrain import TOOL_CALL, Guide
        from ..generation import completion_penalties, make_sampling, thought_budget

        sampling = {"temp": self.args.temp, "top_p": self.args.top_p, "top_k": self.args.top_k,
                    "min_p": self.args.min_p, **r.sampling}
        key = None if r.seed is None else mx.random.key(r.seed) if index == 0 else \
            mx.random.split(mx.random.key(r.seed + index), 3)[2]
        sampler, processors = make_sampling(self.processor, **sampling, key=key)
        if r.presence_penalty or r.frequency_penalty:
            processors.append(completion_penalties(r.presence_penalty, r.frequency_penalty))
        if r.thinking and r.thinking_budget is not None:
            processors.append(thought_budget(self.processor, r.thinking_budget))
        if r.forbid_tool_calls and TOOL_CALL in self.vocab:
            processors += make_logits_processors(logit_bias={self.vocab[TOOL_CALL]: -float("inf")})
        if r.constraint is not None:  # last: it masks what the others left
            processors.append(Guide(self.processor, r.constraint, thinking=r.thinking))
        return sampler, processors

    def _start(self, job: Job, planned: int) -> None:
        """Prefill a job's prompt, one decode step of the running batch between two chunks, and
        let its sequence (its n sequences: copies of the prefilled cache) join the batch with its
        first token. `planned`: each sequence's KV at its planned length."""
        import mlx.core as mx

        from ..generation import DEFAULT_PREFILL_STEP, generate_step
        from ..prompt_cache import prompt_key

        inputs, r = job.inputs, job.request
        try:
            max_tokens = self._max_tokens(job)
            sampler, processors = self._processors(r)
            config = self.model.config
            key = prompt_key(inputs, config)
            split = lambda n: inputs.split_point(n, config)  # noqa: E731
            cache, cached = self.prompt_cache.fetch(key, split) if self.prompt_cache is not None else (None, 0)
            if cache is None:
                cache = self.model.make_cache(kv_bits=self.args.kv_bits)
            elif self.metrics:
                self.metrics.prefix_hits.inc()
            job.emit("start", {"prompt_tokens": len(inputs.ids), "cached_tokens": cached})
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(inputs.ids))
                self.metrics.cached_tokens.inc(cached)

            def between_chunks(done, total):
                if self.stopped(job):
                    raise Cancelled()
                if self.running:
                    self._step()

            if self.prompt_cache is not None and job.kind == "chat":
                # An exact snapshot where the last user turn starts: the next request that shares
                # everything before it (system prompt, tools, earlier turns) reuses it without a trim.
                turn = self._last_turn_start(inputs.ids)
                if turn > cached and split(turn) == turn:
                    part = _head(inputs, turn, config).tail(cached, config)
                    soft = self.model.embed_media(**part.arrays()) if part.has_media else None
                    for _ in generate_step(self.model, part.ids, cache, max_tokens=1, soft_tokens=soft,
                                           progress=between_chunks):
                        pass
                    self.prompt_cache.insert(key[:turn], cache, copy_cache=True)
                    cached = turn
            seq = Sequence(job, self.processor, cache, key, len(inputs.ids), cached, max_tokens, sampler, processors,
                           planned)
            logits = seq.prefill(self.model, inputs.tail(cached, config) if cached else inputs,
                                 DEFAULT_PREFILL_STEP, between_chunks)
            if self.stopped(job):
                raise Cancelled()
            seqs = [seq]
            if r.n > 1:
                mx.eval(logits, [c.state for c in cache])  # the copies start from computed arrays
            for index in range(1, r.n):  # the other replies: the same prompt, their own draws
                other = Sequence(job, self.processor, copy.deepcopy(cache), key, len(inputs.ids), cached, max_tokens,
                                 *self._processors(r, index), planned, index=index)
                other.history, other.h = seq.history, seq.h
                other.sample(logits)
                seqs.append(other)
            done = [s.take(r.top_logprobs, self._logprob_entry) for s in seqs]
        except Exception as e:
            return self._fail(job, e)
        if self.metrics:
            self.metrics.ttft.observe(time.perf_counter() - seq.started)
            self.metrics.generated_tokens.inc(len(seqs))
        for s, over in zip(seqs, done):
            if over:
                self._finish(s)
            else:
                self.running.append(s)

    # --- decode ------------------------------------------------------------------------------

    def _step(self) -> None:
        """One token for every running sequence, in one forward pass. A failure inside the step
        (out of memory, say) fails that step's requests with a 5xx; the server goes on."""
        import mlx.core as mx

        seqs = list(self.running)
        if self.drafter is not None:
            k = min(self.args.num_draft_tokens, *(s.max_tokens - len(s.sampled) - 1 for s in seqs))
            if k > 0:  # every row verifies k drafts: a round never runs past a reply's max_tokens
                return self._draft_step(seqs, k)
        try:
            ids = mx.array([[s.last] for s in seqs])
            # One sequence goes the model's own way (under mlx.launch a pipeline stage hands its
            # activations on there), several as rows of one batch. The drafter reads the hidden state.
            hidden = self.drafter is not None
            out = (self.model(ids, cache=seqs[0].cache, return_hidden=hidden) if len(seqs) == 1 else
                   self.model.step_rows(ids, [s.cache for s in seqs], return_hidden=hidden))
            logits = (out[0] if hidden else out)[:, -1]
            if hidden:
                for b, s in enumerate(seqs):
                    s.h = out[1][b:b + 1, -1:]
            mx.eval([s.sample(logits[b:b + 1]) for b, s in enumerate(seqs)])
        except Exception as e:
            return self._failed_step(seqs, e)
        if self.metrics:
            self.metrics.batch.observe(len(seqs))
        for s in seqs:
            if self.stopped(s.job, s.index):  # the client went away, or a stop string ended the reply
                self.running.remove(s)
                self._keep(s)
                continue
            before = s.last_time
            try:
                done = s.take(s.job.request.top_logprobs, self._logprob_entry)
            except Exception as e:  # one sequence's processors (a constraint): that request alone
                self.running.remove(s)
                self._fail(s.job, e)
                continue
            if self.metrics:
                self.metrics.generated_tokens.inc()
                self.metrics.token_latency.observe(s.last_time - before)
            if done:
                self.running.remove(s)
                self._finish(s)

    def _draft_step(self, seqs: list, k: int) -> None:
        """One MTP round for every running sequence: each drafts k tokens from its own caches,
        all blocks [last token, drafts] are verified in one forward pass, and each sequence keeps
        its own accepted run, its caches trimmed back to it (spec 8)."""
        import mlx.core as mx

        from ..speculative import draft

        for s in [s for s in seqs if self.stopped(s.job, s.index)]:
            seqs.remove(s)
            self.running.remove(s)
            self._keep(s)
        if not seqs:
            return
        try:
            blocks = []
            for s in seqs:
                guided = any(getattr(p, "guides_drafts", False) for p in s.processors)

                def propose(y_d, drafts, s=s, guided=guided):
                    if not guided:
                        return self.drafter.greedy(y_d)
                    history = mx.concatenate([s.history, *drafts]) if drafts else s.history
                    return mx.argmax(s.process(history, self.drafter.logits(y_d)[:, -1]), axis=-1)

                last = mx.array([s.last], dtype=mx.int32)
                blocks.append(mx.concatenate([last, *draft(self.model, self.drafter, s.cache, last, s.h, k, propose)]))
            block = mx.stack(blocks)
            logits, hidden = self.model.step_rows(block, [s.cache for s in seqs], return_hidden=True)
            drafts = block[:, 1:].tolist()
            verified = [s.verify(logits[b], drafts[b]) for b, s in enumerate(seqs)]
        except Exception as e:
            return self._failed_step(seqs, e)
        for b, (s, out) in enumerate(zip(seqs, verified)):
            s.h = hidden[b:b + 1, len(out) - 1:len(out)]
            s.drafted, s.accepted = s.drafted + k, s.accepted + len(out) - 1
            if self.metrics:
                self.metrics.drafts_proposed.inc(k)
                self.metrics.drafts_accepted.inc(len(out) - 1)
            taken, done = 0, False
            for token, logprobs in out:
                taken += 1
                done = s.accept(token, logprobs, s.job.request.top_logprobs, self._logprob_entry)
                if self.metrics:
                    self.metrics.generated_tokens.inc()
                if done:
                    break
            for c in s.cache:  # the rejected drafts, and accepted ones past the end of the reply
                c.trim(k + 1 - taken)
            if done:
                self.running.remove(s)
                self._finish(s)

    def _failed_step(self, seqs: list, e: Exception) -> None:
        import mlx.core as mx

        for s in seqs:
            self.running.remove(s)
            s.job.emit("error", ApiError(500, f"the model failed in this step ({one_line(e)[:200] or type(e).__name__}"
                                              "); the server goes on", type="server_error", code="step_failed"))
        if self.metrics:
            self.metrics.step_failures.inc()
        mx.clear_cache()
        self._check_in_step(e)

    def _keep(self, seq: Sequence) -> None:
        """The sequence's cache into the prefix cache (it holds what `held_key` says)."""
        if self.prompt_cache is not None:
            self.prompt_cache.insert(seq.held_key(), seq.cache)

    def _finish(self, seq: Sequence) -> None:
        self._keep(seq)
        seq.job.emit("done", seq.index, seq.finish, len(seq.sampled), seq.thought, seq.drafted, seq.accepted)

    def _gauges(self) -> None:
        import mlx.core as mx

        if self.metrics is None:
            return
        m = self.metrics
        held = self.prompt_cache.nbytes if self.prompt_cache is not None else 0
        m.running.set(len(self.running))
        m.waiting.set(self.waiting)
        m.prefix_bytes.set(held)
        m.planned_bytes.set(self.plan.fixed + held + sum(s.planned for s in self.running))
        m.budget_bytes.set(self.plan.budget)
        m.peak_bytes.set(mx.get_peak_memory())

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
