"""Generation: a token loop over (model, cache, tokens), text streaming, stats, multi-turn chat.

`generate_step` is a plain generator of (token, logprobs) that updates the cache it is given;
a caller that wants to keep a conversation, verify draft tokens or reuse a shared prompt
prefix owns the cache and trims it (see `ChatSession`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache import reuse_prefix
from .errors import InputError

DEFAULT_MAX_TOKENS = 256
# Prefill chunk: big enough to keep the matmuls efficient, small enough that the fp32
# attention scores of a chunk (heads x chunk x context) stay modest on a 16 GB Mac.
DEFAULT_PREFILL_STEP = 512

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class GenerationResponse:
    """One streamed piece of `stream_generate` (mlx-lm's fields, plus `thinking`)."""

    text: str
    token: int
    logprobs: mx.array
    thinking: bool  # the text belongs to the model's thought channel
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None


def generate_step(model, prompt: Sequence[int], cache: list, *, sampler: Optional[Callable] = None,
                  logits_processors: Optional[list] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                  prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
                  progress: Optional[Callable[[int, int], None]] = None) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) after feeding `prompt` into `cache` (updated in place).

    `prefill_step_size` is a chunk size, or a function of the tokens already cached giving it
    (the memory planner shrinks chunks as the context grows, keeping peak memory flat).

    The next step is queued before a token is yielded (so the device never waits on Python):
    after the loop the cache holds the prompt and every yielded token, except the last one
    when `max_tokens` was reached.
    """
    prompt = mx.array(list(prompt), dtype=mx.int32)
    if prompt.size == 0:
        raise InputError("prompt: no tokens to process")
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    logits_processors = logits_processors or []
    history = prompt

    def step(ids: mx.array):
        logits = model(ids[None], cache=cache, logits_to_keep=1)[:, -1, :]
        for process in logits_processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]

    chunk_size = prefill_step_size if callable(prefill_step_size) else (lambda _: prefill_step_size)
    total, done = prompt.size, 0
    while total - done > 1:
        n = min(chunk_size(cache[0].offset), total - done - 1)
        model(prompt[done:done + n][None], cache=cache, logits_to_keep=1)
        mx.eval([c.state for c in cache])  # the logits of a prefill chunk are never computed
        done += n
        if progress:
            progress(done, total)
        mx.clear_cache()

    y, logprobs = step(prompt[done:])
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n + 1 < max_tokens:
            if logits_processors:  # only they read the token history
                history = mx.concatenate([history, y])
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        token = y.item()
        if n == 0 and progress:
            progress(total, total)
        yield token, logprobs
        n += 1
        if n >= max_tokens:
            return
        y, logprobs = next_y, next_logprobs
        if n % 256 == 0:
            mx.clear_cache()


def make_sampling(processor, temp=None, top_p=None, top_k=None, min_p=None):
    """mlx-lm's sampler and logits processors; unset values come from generation_config.json."""
    d = processor.defaults
    sampler = make_sampler(temp=d.temperature if temp is None else temp,
                           top_p=d.top_p if top_p is None else top_p,
                           min_p=d.min_p if min_p is None else min_p,
                           top_k=d.top_k if top_k is None else top_k)
    bias = {t: -float("inf") for t in d.suppress_tokens}
    return sampler, make_logits_processors(logit_bias=bias or None)


def prompt_to_ids(processor, prompt: Prompt, system: Optional[str] = None, chat_template: bool = True,
                  enable_thinking: bool = False) -> list[int]:
    """A string goes through the chat template (unless disabled), messages always do,
    token ids are used as they are."""
    if isinstance(prompt, str):
        return processor.prompt_ids(prompt, system=system, chat_template=chat_template,
                                    enable_thinking=enable_thinking)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return processor.chat_ids(prompt, enable_thinking=enable_thinking)
    return [int(t) for t in prompt]


def check_context(limit: int, n_tokens: int, max_tokens: int) -> None:
    if n_tokens >= limit:
        raise InputError(f"prompt: {n_tokens} tokens, longer than the model's context of {limit} tokens")
    if max_tokens <= 0:
        raise InputError(f"--max-tokens: must be a positive number, got {max_tokens}")


class _ThoughtFilter:
    """Splits streamed text into the thought channel and the answer.

    Gemma 4 writes thoughts as `<|channel>thought\\n ... <channel|>`; the two markers are
    single tokens, and the channel name after the first one is not part of the thought.
    """

    CHANNEL_NAME = "thought\n"

    def __init__(self, processor):
        self.start, self.end = processor.thought_start_id, processor.thought_end_id
        self.thinking = False
        self._name_left = ""

    def marker(self, token: int) -> bool:
        if token == self.start and self.start is not None:
            self.thinking, self._name_left = True, self.CHANNEL_NAME
            return True
        if token == self.end and self.end is not None:
            self.thinking = False
            return True
        return False

    def clean(self, text: str) -> str:
        while self._name_left and text:
            if text[0] != self._name_left[0]:
                self._name_left = ""
                break
            text, self._name_left = text[1:], self._name_left[1:]
        return text


def stream_generate(model, processor, prompt: Prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    cache: Optional[list] = None, system: Optional[str] = None,
                    chat_template: bool = True, enable_thinking: bool = False,
                    temp: Optional[float] = None, top_p: Optional[float] = None,
                    top_k: Optional[int] = None, min_p: Optional[float] = None,
                    sampler: Optional[Callable] = None, logits_processors: Optional[list] = None,
                    prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
                    progress: Optional[Callable[[int, int], None]] = None,
                    max_kv_size: Optional[int] = None) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` as `GenerationResponse` pieces; the last one has a
    `finish_reason` ("stop" at an end-of-sequence / end-of-turn token, else "length").
    `max_kv_size` caps prompt + reply (with what the cache already holds)."""
    ids = prompt_to_ids(processor, prompt, system, chat_template, enable_thinking)
    cache = model.make_cache() if cache is None else cache
    held = cache[0].offset
    check_context(model.config.text_config.max_position_embeddings, len(ids) + held, max_tokens)
    if max_kv_size is not None:
        if len(ids) + held >= max_kv_size:
            raise InputError(f"--max-kv-size {max_kv_size}: smaller than the prompt ({len(ids) + held} tokens)")
        max_tokens = min(max_tokens, max_kv_size - len(ids) - held)
    if sampler is None or logits_processors is None:
        default_sampler, default_processors = make_sampling(processor, temp, top_p, top_k, min_p)
        sampler = sampler or default_sampler
        logits_processors = default_processors if logits_processors is None else logits_processors
    eos = processor.eos_token_ids
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    thoughts = _ThoughtFilter(processor)

    def response(text, token, logprobs, n, finish=None, thinking=None):
        elapsed = max(time.perf_counter() - tic, 1e-9)
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs,
            thinking=thoughts.thinking if thinking is None else thinking,
            prompt_tokens=len(ids), prompt_tps=len(ids) / prompt_time, generation_tokens=n,
            generation_tps=n / elapsed, peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish)

    with wired_limit(model):
        tic = time.perf_counter()
        prompt_time, n, token, logprobs = 1e-9, 0, None, None
        steps = generate_step(model, ids, cache, sampler=sampler, logits_processors=logits_processors,
                              max_tokens=max_tokens, prefill_step_size=prefill_step_size, progress=progress)
        for n, (token, logprobs) in enumerate(steps, start=1):
            if n == 1:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            if token in eos:
                break
            was_thinking = thoughts.thinking
            if thoughts.marker(token):
                detokenizer.finalize()
                text = thoughts.clean(detokenizer.last_segment)
                detokenizer.reset()
                if text:
                    yield response(text, token, logprobs, n, thinking=was_thinking)
                continue
            detokenizer.add_token(token)
            if n == max_tokens:
                break
            yield response(thoughts.clean(detokenizer.last_segment), token, logprobs, n)
        detokenizer.finalize()
        finish = "stop" if token in eos else "length"
        yield response(thoughts.clean(detokenizer.last_segment), token, logprobs, n, finish)


def generate(model, processor, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
    """The reply to `prompt` as one string (thoughts left out); `verbose` streams it and prints stats."""
    text, last = [], None
    for last in stream_generate(model, processor, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        if not last.thinking:
            text.append(last.text)
    if verbose and last is not None:
        print()
        print_stats(last)
    return "".join(text)


def print_stats(r: GenerationResponse, file=None) -> None:
    file = file or sys.stdout
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each turn renders the whole conversation with the chat template, keeps the longest
    cached prefix of it (trimming whatever the template renders differently, e.g. a reply
    cut at max tokens) and feeds only the rest.
    """

    def __init__(self, model, processor, system: Optional[str] = None, enable_thinking: bool = False,
                 make_cache: Optional[Callable[[], list]] = None):
        self.model, self.processor = model, processor
        self.enable_thinking = enable_thinking
        self.messages = [{"role": "system", "content": system}] if system else []
        self.make_cache = make_cache or model.make_cache
        self.cache = self.make_cache()
        self.cached_ids: list[int] = []
        self.reused_tokens = 0  # prompt tokens the last turn did not have to re-read

    def send(self, content, **kwargs) -> Iterator[GenerationResponse]:
        self.messages.append({"role": "user", "content": content})
        ids = self.processor.chat_ids(self.messages, enable_thinking=self.enable_thinking)
        keep = reuse_prefix(self.cache, self.cached_ids, ids)
        if keep == 0 and self.cache[0].offset:
            self.cache = self.make_cache()
        self.reused_tokens = keep
        reply, tokens = [], []
        for r in stream_generate(self.model, self.processor, ids[keep:], cache=self.cache, **kwargs):
            tokens.append(r.token)
            if not r.thinking:
                reply.append(r.text)
            yield r
        self.cached_ids = (ids + tokens)[:self.cache[0].offset]
        self.messages.append({"role": "assistant", "content": "".join(reply)})
