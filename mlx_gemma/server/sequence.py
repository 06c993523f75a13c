"""One request's generation inside the engine's batch: its own caches, sampler and logits
processors (penalties, thought budget, constraint), the history they read, its text stream and
its limits. The engine prefills it (`prefill`), then samples it from its row of each batched
step's logits (`sample`, `take`)."""

import time
from typing import Callable, Optional

from ..generation import TextStream, checked_ids, embed_prompt_media, prefill


class Sequence:
    def __init__(self, job, processor, cache: list, key: list, prompt_tokens: int, cached: int, max_tokens: int,
                 sampler: Callable, processors: list, planned: int, index: int = 0):
        self.job, self.cache, self.key, self.index = job, cache, key, index  # index: which of the job's replies
        self.sampler, self.processors = sampler, processors
        self.prompt_tokens, self.cached, self.max_tokens = prompt_tokens, cached, max_tokens
        self.planned = planned  # KV bytes held at its planned length (admission counts them)
        self.stream = TextStream(processor)
        self.eos = processor.eos_token_ids
        self.markers = self.eos | {processor.thought_start_id, processor.thought_end_id}
        self.history = None  # what the logits processors read: the fed prompt, then each token
        self.sampled: list = []
        self.thought, self.finish, self.pending = 0, None, None
        self.started, self.last_time = time.perf_counter(), None

    @property
    def last(self) -> int:
        return self.sampled[-1]

    def prefill(self, model, inputs, step: Callable[[int], int], progress: Callable):
        """Feed the uncached prompt (in chunks, `progress` between them) and sample the first token;
        the last position's logits [1, vocab] (lazy), for the other replies to sample too."""
        import mlx.core as mx

        ids = checked_ids(model, inputs.ids)
        rest, soft = prefill(model, ids, self.cache, step, progress, embed_prompt_media(model, inputs))
        self.history = mx.array(ids)
        logits = model(rest[None], cache=self.cache, logits_to_keep=1, soft_tokens=soft)[:, -1]
        self.sample(logits)
        return logits

    def sample(self, logits):
        """This sequence's next token from its row of logits [1, vocab] (lazy)."""
        import mlx.core as mx

        for process in self.processors:
            logits = process(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self.pending = (self.sampler(logprobs), logprobs[0])
        return self.pending[0]

    def take(self, top_logprobs: Optional[int], entry: Callable) -> bool:
        """Read the sampled token, stream its text; True when the reply is over."""
        import mlx.core as mx

        y, logprobs = self.pending
        token = int(y.item())
        self.sampled.append(token)
        if self.processors:
            self.history = mx.concatenate([self.history, mx.array([token], dtype=self.history.dtype)])
        n = len(self.sampled)
        self.finish = "stop" if token in self.eos else "length" if n >= self.max_tokens else None
        text, thinking = self.stream.feed(token, self.finish)
        self.thought += thinking
        logprob = entry(token, logprobs, top_logprobs) \
            if top_logprobs is not None and not thinking and token not in self.markers else None
        if text or logprob:
            self.job.emit("text", self.index, text, thinking, n, logprob)
        self.last_time = time.perf_counter()
        return self.finish is not None

    def held_key(self) -> list:
        """The prefix-cache key of what the cache holds now (the prompt, then the tokens fed)."""
        held = self.cache[0].offset
        return (self.key + self.sampled[:max(held - len(self.key), 0)])[:held]
