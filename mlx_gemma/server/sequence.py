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
        self.h = None  # the last hidden state, what an MTP drafter reads (when the engine drafts)
        self.drafted = self.accepted = 0
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
        logits, self.h = model(rest[None], cache=self.cache, logits_to_keep=1, soft_tokens=soft, return_hidden=True)
        self.sample(logits[:, -1])
        return logits[:, -1]

    def process(self, history, logits):
        """Logprobs [1, vocab] of one row of logits, after this sequence's processors."""
        import mlx.core as mx

        for process in self.processors:
            logits = process(history, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def sample(self, logits):
        """This sequence's next token from its row of logits [1, vocab] (lazy)."""
        logprobs = self.process(self.history, logits)
        self.pending = (self.sampler(logprobs), logprobs[0])
        return self.pending[0]

    def verify(self, logits, drafts: list) -> list:
        """[(token, logprobs)] of a verified block: `logits` [k + 1, vocab] for the last token and the
        k drafts after it. Each row is sampled (argmax when greedy) with the drafts before it in its
        history; drafts are kept while they equal those samples, then the first sample that differs
        (or the one after the last draft) comes. Each kept token is a sample of its row, so the
        output is what decoding without drafts gives when greedy, and distributed as it when not."""
        import mlx.core as mx

        rows = [self.process(mx.concatenate([self.history, mx.array(drafts[:i], dtype=self.history.dtype)]),
                             logits[i:i + 1]) for i in range(len(drafts) + 1)]
        samples = self.sampler(mx.concatenate(rows)).tolist()
        n = 0
        while n < len(drafts) and samples[n] == drafts[n]:
            n += 1
        return [(samples[i], rows[i][0]) for i in range(n + 1)]

    def take(self, top_logprobs: Optional[int], entry: Callable) -> bool:
        """Read the sampled token, stream its text; True when the reply is over."""
        y, logprobs = self.pending
        return self.accept(int(y.item()), logprobs, top_logprobs, entry)

    def accept(self, token: int, logprobs, top_logprobs: Optional[int], entry: Callable) -> bool:
        """Add `token` to the reply and stream its text; True when the reply is over."""
        import mlx.core as mx

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
