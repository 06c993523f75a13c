"""Generation: a token loop over (model, cache, tokens), text streaming, stats, multi-turn chat.

`generate_step` is a plain generator of (token, logprobs) that updates the cache it is given;
a caller that wants to keep a conversation, verify draft tokens or reuse a shared prompt
prefix owns the cache and trims it (see `ChatSession`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import (apply_min_p, apply_top_k, apply_top_p, make_frequency_penalty, make_logits_processors,
                                 make_presence_penalty, make_sampler)

from .backend import compiled_decode_pays
from .cache import DecodeStep, reuse_prefix, vision_blocks
from .constrain import Guide, as_constraint
from .errors import ContextError, InputError
from .prompt import MediaOptions, PromptInputs, token_types, user_content
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, check_num_draft_tokens, speculative_decode

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
    media_tokens: Optional[dict] = None  # prompt tokens per medium ("image", "audio", "video")
    preprocess_time: float = 0.0  # seconds spent turning media files into arrays
    from_draft: bool = False  # a drafter proposed this token and the target accepted it
    num_draft_tokens: int = 0  # drafts per round (0: no drafter)
    drafted_tokens: int = 0  # so far
    accepted_tokens: int = 0


def _soft_slices(soft_tokens: Optional[dict], ids: np.ndarray):
    """Per prefill chunk [start, end): the soft tokens of the placeholders inside it."""
    if not soft_tokens:
        return lambda start, end: None
    before = {t: np.concatenate([[0], np.cumsum(ids == t)]) for t in soft_tokens}
    return lambda start, end: {t: rows[int(before[t][start]):int(before[t][end])]
                               for t, rows in soft_tokens.items()}


class FrameRows:
    """The soft tokens of a prompt's videos, embedded a prefill chunk at a time: `rows[a:b]`
    decodes (media.FrameStream) and embeds only the frames holding rows a..b-1, so a long video
    never holds all its frames, pixel arrays or soft tokens at once. Prefill chunks end between
    frames, so each frame is read once."""

    def __init__(self, model, videos: list):
        self.model, self.clips = model, [v.frames for v in videos]
        self.starts = np.cumsum([0] + [c.num_tokens for c in self.clips])
        self.shape = (int(self.starts[-1]), model.config.text_config.hidden_size)

    def __getitem__(self, rows: slice) -> mx.array:
        out = []
        for clip, start in zip(self.clips, self.starts):
            lo, hi = max(rows.start, start) - start, min(rows.stop, start + clip.num_tokens) - start
            if lo >= hi:
                continue
            n = clip.tokens_per_frame
            first, last = lo // n, -(-hi // n)
            pixels, positions = clip.patches(first, last)
            soft = self.model.embed_media(pixel_values_videos=pixels, video_position_ids=positions)
            out.append(soft[self.model.config.video_token_id][lo - first * n:hi - first * n])
        return mx.concatenate(out) if out else mx.zeros((0, self.shape[1]))


def embed_prompt_media(model, inputs: PromptInputs) -> Optional[dict]:
    """Soft tokens of the prompt's media (`Model.embed_media`); streamed videos' frames are
    embedded when prefill reads them (`FrameRows`)."""
    if not inputs.has_media:
        return None
    soft = model.embed_media(**inputs.arrays(videos=not inputs.streams_video))
    if inputs.streams_video:
        soft[model.config.video_token_id] = FrameRows(model, inputs.videos)
    return soft


def _block_safe_end(blocks: np.ndarray, start: int, end: int) -> int:
    """Move a chunk end out of a vision block: back to the block's start, or, when the block
    began at the chunk's start, past its end (a block is attended as a whole, spec 3)."""
    if end >= len(blocks) or blocks[end] < 0 or blocks[end] != blocks[end - 1]:
        return end
    members = np.flatnonzero(blocks == blocks[end])
    return int(members[0]) if members[0] > start else int(members[-1]) + 1


def checked_ids(model, prompt: Sequence[int]) -> np.ndarray:
    """A prompt's token ids as int32, each checked to index the vocabulary."""
    try:
        ids = np.asarray(list(prompt), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise InputError("prompt: token ids must be whole numbers") from None
    if ids.size == 0:
        raise InputError("prompt: no tokens to process")
    check_tokens(ids, model.config.text_config.vocab_size)
    return ids.astype(np.int32)


def prefill(model, ids: np.ndarray, cache: list,
            prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None,
            soft_tokens: Optional[dict] = None) -> tuple[mx.array, Optional[dict]]:
    """Feed all of `ids` but a tail into `cache`, in chunks that never end inside an image or
    video frame; return the tail (at least the last token) and its soft tokens, for the
    step that computes the first logits."""
    prompt = mx.array(ids)
    blocks = vision_blocks(token_types(ids, model.config))
    soft_in = _soft_slices(soft_tokens, ids)
    if not callable(prefill_step_size):
        check_count("--prefill-step-size", prefill_step_size)
    chunk_size = prefill_step_size if callable(prefill_step_size) else (lambda _: prefill_step_size)
    total, done = prompt.size, 0
    while total - done > 1:
        end = _block_safe_end(blocks, done, done + min(chunk_size(cache[0].offset), total - done - 1))
        if end >= total:  # the last block runs to the end: it goes in with the final step
            break
        model(prompt[done:end][None], cache=cache, logits_to_keep=1, soft_tokens=soft_in(done, end))
        mx.eval([c.state for c in cache])  # the logits of a prefill chunk are never computed
        done = end
        if progress:
            progress(done, total)
        mx.clear_cache()
    return prompt[done:], soft_in(done, total)


def compiled_decode(model, cache: list) -> Optional[Callable[[mx.array], mx.array]]:
    """One decode step, `tokens [1] -> logits [1, vocab]` updating `cache`, traced by mx.compile
    and replayed: a step's ops (about thirty per layer) are not rebuilt in Python each token,
    and the elementwise ones (casts around the norms, GELU, softcap) fuse into fewer kernels.
    The caches are the step's state: their buffers go in and come back (`cache.DecodeStep`);
    a reallocated buffer (every 256 tokens for a global layer) means one new trace.
    None when the model or a cache cannot run so (a pipeline stage sends and receives).
    """
    if not getattr(model, "compiles_decode", False) or not all(hasattr(c, "advance") for c in cache):
        return None

    def forward(tokens, positions, buffers):
        steps = [DecodeStep(c, b, positions[i, 0], positions[i, 1]) for i, (c, b) in enumerate(zip(cache, buffers))]
        logits = model(tokens[None], cache=steps, logits_to_keep=1)[:, -1, :]
        return logits, [s.buffers for s in steps]

    forward = mx.compile(forward)

    def decode(tokens: mx.array) -> mx.array:
        for c in cache:
            c.reserve(1)
        positions = mx.array([[c.offset, c.write_index()] for c in cache], dtype=mx.int32)
        # One dtype for every step's token (a prompt's int32, a sampler's uint32): one trace.
        logits, buffers = forward(tokens.astype(mx.int32), positions, [c.buffers for c in cache])
        for c, b in zip(cache, buffers):
            c.advance(b)
        return logits

    return decode


def generate_step(model, prompt: Sequence[int], cache: list, *, sampler: Optional[Callable] = None,
                  logits_processors: Optional[list] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                  prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
                  progress: Optional[Callable[[int, int], None]] = None,
                  soft_tokens: Optional[dict] = None, compile: Optional[bool] = None) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) after feeding `prompt` into `cache` (updated in place).

    `prefill_step_size` is a chunk size, or a function of the tokens already cached giving it
    (the memory planner shrinks chunks as the context grows, keeping peak memory flat).
    Chunks never end inside an image or video frame. `soft_tokens` (`model.embed_media`)
    fill the prompt's media placeholders. Decode steps run compiled (`compiled_decode`) when `compile`
    is True (default: `backend.compiled_decode_pays`); the sampler and logits processors run as
    given, outside the trace.

    The next step is queued before a token is yielded (so the device never waits on Python):
    after the loop the cache holds the prompt and every yielded token, except the last one
    when `max_tokens` was reached.
    """
    ids = checked_ids(model, prompt)
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    logits_processors = logits_processors or []
    history = mx.array(ids)

    compile = compiled_decode_pays() if compile is None else compile
    decode = compiled_decode(model, cache) if compile else None

    def step(tokens: mx.array, soft: Optional[dict] = None):
        if decode and tokens.size == 1 and not soft:
            logits = decode(tokens)
        else:
            logits = model(tokens[None], cache=cache, logits_to_keep=1, soft_tokens=soft)[:, -1, :]
        for process in logits_processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]

    y, logprobs = step(*prefill(model, ids, cache, prefill_step_size, progress, soft_tokens))
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
            progress(ids.size, ids.size)
        yield token, logprobs
        n += 1
        if n >= max_tokens:
            return
        y, logprobs = next_y, next_logprobs
        if n % 256 == 0:
            mx.clear_cache()


def speculative_generate_step(model, drafter, prompt: Sequence[int], cache: list, *,
                              num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
                              sampler: Optional[Callable] = None, sampling: Optional["Sampling"] = None,
                              logits_processors: Optional[list] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                              prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
                              progress: Optional[Callable[[int, int], None]] = None,
                              soft_tokens: Optional[dict] = None,
                              stats: Optional[dict] = None) -> Iterator[tuple[int, mx.array, bool]]:
    """`generate_step` with MTP drafting (`speculative.speculative_decode`): yields
    (token, logprobs, from_draft). `sampling` (temperature > 0) turns on speculative
    sampling; without it drafts are kept where `sampler` (default greedy) agrees."""
    check_num_draft_tokens(num_draft_tokens, cache)
    ids = checked_ids(model, prompt)
    rest, soft = prefill(model, ids, cache, prefill_step_size, progress, soft_tokens)
    first = model(rest[None], cache=cache, logits_to_keep=1, soft_tokens=soft, return_hidden=True)
    for n, out in enumerate(speculative_decode(model, drafter, first, cache, num_draft_tokens=num_draft_tokens,
                                               history=ids.tolist(), max_tokens=max_tokens, sampler=sampler,
                                               sampling=sampling, logits_processors=logits_processors or (),
                                               stats=stats)):
        if n == 0 and progress:
            progress(ids.size, ids.size)
        yield out


def _number(name: str, value, low: float, high: float, integer: bool = False, what: str = "") -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and low <= value <= high and (high < math.inf or value < 2**63)  # NaN fails the comparison
    if ok and integer:
        ok = value == int(value)
    if not ok:
        kind = "a whole number" if integer else "a number"
        span = f">= {low:g}" if high == math.inf else f"from {low:g} to {high:.0f}" if integer else \
            f"from {low:g} to {high:g}"
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        raise InputError(f"{name} {shown}: must be {kind} {span}{what}")


def check_sampling(temp=None, top_p=None, top_k=None, min_p=None, seed=None) -> None:
    """Sampling values as a user gives them (None: the checkpoint's default). Checked before
    mlx-lm's sampler is built: its compiled sampling functions are left unusable for the rest
    of the process by a value they reject."""
    if temp is not None:
        _number("--temp", temp, 0, math.inf, what=" (0 is greedy)")
    if top_p is not None:
        _number("--top-p", top_p, 0, 1, what=" (1 or 0 turns it off)")
    if top_k is not None:
        _number("--top-k", top_k, 0, math.inf, integer=True, what=" (0 turns it off)")
    if min_p is not None:
        _number("--min-p", min_p, 0, 1, what=" (0 turns it off)")
    if seed is not None:
        _number("--seed", seed, 0, 2**32 - 1, integer=True)


def check_tokens(ids: np.ndarray, vocab_size: int) -> None:
    """Token ids must index the vocabulary: MLX does not bounds-check an embedding lookup."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise InputError(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab_size - 1})")


@dataclass(frozen=True)
class Sampling:
    """Sampling values, resolved. `sampler()` is mlx-lm's sampler; `logprobs()` the
    distribution it draws from, in its order (top-p, min-p, top-k, then the temperature),
    which speculative sampling needs explicitly."""

    temp: float
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0

    def sampler(self, key: Optional[mx.array] = None) -> Callable:
        """With `key`, the sampler draws from that key alone, as mlx-lm's draws after
        `mx.random.seed` (split the key, draw with the second half): a seeded request's samples
        then do not depend on what else draws from MLX's shared generator (the server's batch)."""
        if key is None or self.temp == 0:
            return make_sampler(temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)
        state = [key]

        def sample(logprobs: mx.array) -> mx.array:
            state[0], draw = mx.random.split(state[0])
            return mx.random.categorical(self.filtered(logprobs) * (1 / self.temp), key=draw)

        return sample

    def filtered(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def logprobs(self, logprobs: mx.array) -> mx.array:
        scaled = self.filtered(logprobs) * (1 / self.temp)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def resolve_sampling(processor, temp=None, top_p=None, top_k=None, min_p=None) -> Sampling:
    """Checked values; unset ones come from generation_config.json."""
    check_sampling(temp, top_p, top_k, min_p)
    d = processor.defaults
    top_k = int(d.top_k if top_k is None else top_k)
    return Sampling(temp=d.temperature if temp is None else temp, top_p=d.top_p if top_p is None else top_p,
                    min_p=d.min_p if min_p is None else min_p,
                    # keeping the whole vocabulary is no top-k (mlx-lm refuses k >= vocabulary)
                    top_k=0 if top_k >= processor.config.text_config.vocab_size else top_k)


def make_sampling(processor, temp=None, top_p=None, top_k=None, min_p=None, key=None):
    """mlx-lm's sampler (drawing from `key` alone, if given: `Sampling.sampler`) and logits
    processors; unset values come from generation_config.json."""
    sampler = resolve_sampling(processor, temp, top_p, top_k, min_p).sampler(key)
    bias = {t: -float("inf") for t in processor.defaults.suppress_tokens}
    return sampler, make_logits_processors(logit_bias=bias or None)


def completion_penalties(presence: float = 0.0, frequency: float = 0.0) -> Callable:
    """OpenAI's presence and frequency penalties, over the tokens generated so far (mlx-lm's count
    a fixed window of the history, which reaches into the prompt). A logits processor that reads
    the history it is given: its first call sees the prompt, later ones the generated tokens after
    it (the MTP drafter's rows included)."""
    prompt = []

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if not prompt:
            prompt.append(tokens.size)
        n = tokens.size - prompt[0]
        for make, value in ((make_presence_penalty, presence), (make_frequency_penalty, frequency)):
            if n and value:
                logits = make(value, n)(tokens, logits)
        return logits

    return process


def thought_budget(processor, budget: int) -> Callable:
    """Closes Gemma's thought channel once `budget` tokens were generated inside it (Anthropic's
    `budget_tokens`): then only the channel's end token may come. Read off the history it is given
    (see `completion_penalties`), with lazy MLX ops: the next step is still queued before a token
    is read."""
    start, end = processor.thought_start_id, processor.thought_end_id
    prompt = []

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if not prompt:
            prompt.append(tokens.size)
        generated = tokens[prompt[0]:]
        if generated.size == 0:
            return logits
        at = mx.arange(generated.size)
        opened = mx.max(mx.where(generated == start, at, -1))
        closed = mx.max(mx.where(generated == end, at, -1))
        over = (opened > closed) & (generated.size - 1 - opened >= budget)
        only_end = mx.where(mx.arange(logits.shape[-1]) == end, 0.0, -mx.inf).astype(logits.dtype)
        return mx.where(over, only_end, logits)

    return process


def prompt_to_inputs(processor, prompt: Prompt, system: Optional[str] = None, chat_template: bool = True,
                     enable_thinking: bool = False, image=(), audio=(), video=(),
                     media_options: Optional[MediaOptions] = None, raw_prompt: bool = False) -> PromptInputs:
    """A string goes through the chat template (unless disabled) as the user turn, with any
    `image` / `audio` / `video` before its text; messages always go through the template;
    token ids and `PromptInputs` are used as they are. Control-token strings in the text are
    plain text unless `raw_prompt` (`Processor.chat_inputs`)."""
    if isinstance(prompt, PromptInputs):
        return prompt
    if isinstance(prompt, str):
        content = user_content(prompt, image, audio, video)
        has_media = len(content) > 1
        if not chat_template:
            if has_media:
                raise InputError("media need the chat template (drop --no-chat-template)")
            return PromptInputs(processor.encode(prompt, split_special_tokens=not raw_prompt))
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content if has_media else prompt})
        return processor.chat_inputs(messages, enable_thinking=enable_thinking, options=media_options,
                                     raw_prompt=raw_prompt)
    if not isinstance(prompt, (list, tuple, np.ndarray, mx.array)):
        raise InputError(f"prompt: a {type(prompt).__name__} is not a prompt (give a string, chat messages "
                         "or a list of token ids)")
    prompt = prompt.tolist() if isinstance(prompt, (np.ndarray, mx.array)) else list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return processor.chat_inputs(prompt, enable_thinking=enable_thinking, options=media_options,
                                     raw_prompt=raw_prompt)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        bad = next(t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
        raise InputError(f"prompt: {bad!r} is not a token id (a prompt is a string, chat messages or "
                         "a list of token ids)")
    return PromptInputs([int(t) for t in prompt])


def check_context(limit: int, n_tokens: int, max_tokens: int, media_tokens: int = 0) -> None:
    if n_tokens >= limit:
        of_which = f" ({media_tokens} of them for media)" if media_tokens else ""
        raise ContextError(f"prompt: needs {n_tokens} tokens{of_which}, more than the model's context "
                           f"of {limit} tokens", n_tokens, limit)
    check_count("--max-tokens", max_tokens)


def check_count(flag: str, value) -> None:
    """A whole number of tokens, at least 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{flag}: must be a positive number, got {value!r}")


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


class TextStream:
    """Generated tokens -> (text, thinking) pieces: the thought channel told apart from the answer
    (its markers and name left out), an end-of-turn token left out."""

    def __init__(self, processor):
        self.detokenizer = processor.tokenizer.detokenizer
        self.detokenizer.reset()
        self.thoughts = _ThoughtFilter(processor)

    def feed(self, token: int, finish: Optional[str]) -> tuple[str, bool]:
        thinking = self.thoughts.thinking
        if finish != "stop" and self.thoughts.marker(token):
            # The text before a channel marker belongs to the channel the marker closes.
            self.detokenizer.finalize()
            text = self.thoughts.clean(self.detokenizer.last_segment)
            self.detokenizer.reset()
            return text, thinking
        if finish != "stop":
            self.detokenizer.add_token(token)
        if finish:
            self.detokenizer.finalize()
        return self.thoughts.clean(self.detokenizer.last_segment), self.thoughts.thinking


def stream_generate(model, processor, prompt: Prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    cache: Optional[list] = None, system: Optional[str] = None,
                    chat_template: bool = True, enable_thinking: bool = False,
                    temp: Optional[float] = None, top_p: Optional[float] = None,
                    top_k: Optional[int] = None, min_p: Optional[float] = None,
                    sampler: Optional[Callable] = None, logits_processors: Optional[list] = None,
                    prefill_step_size: Union[int, Callable[[int], int]] = DEFAULT_PREFILL_STEP,
                    progress: Optional[Callable[[int, int], None]] = None,
                    max_kv_size: Optional[int] = None, image=(), audio=(), video=(),
                    media_options: Optional[MediaOptions] = None, draft_model=None,
                    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
                    compile: Optional[bool] = None, constraint=None,
                    raw_prompt: bool = False) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` as `GenerationResponse` pieces; the last one has a
    `finish_reason` ("stop" at an end-of-sequence / end-of-turn token, else "length": at
    `max_tokens`, or where the context, the model's or `max_kv_size`, is full).
    `max_kv_size` caps prompt + reply (with what the cache already holds). `image`, `audio`
    and `video` (paths, PIL images, arrays, (samples, rate) pairs) join a string prompt.
    `draft_model` (`load_drafter`) drafts `num_draft_tokens` per round: the same tokens when
    greedy, the same distribution when sampling. `compile`: decode steps compiled or not
    (`generate_step`; default: the backend's choice). `constraint` (a `constrain.Constraint`, a JSON
    Schema dict or a pydantic model class) holds the reply to a grammar (after the thought
    channel, when thinking is on). `raw_prompt`: control-token strings in the prompt's text
    (`<|turn>`, `<|image|>`) act as control tokens; by default they are plain text."""
    inputs = prompt_to_inputs(processor, prompt, system, chat_template, enable_thinking, image, audio, video,
                              media_options, raw_prompt)
    ids = inputs.ids
    counts = {k: n for k, n in inputs.token_counts().items() if n}
    cache = model.make_cache() if cache is None else cache
    if draft_model is not None:
        if isinstance(draft_model, (str, os.PathLike)):
            raise InputError(f"draft_model: {str(draft_model)!r} is a path; pass the loaded drafter: "
                             f"draft_model=load_drafter({str(draft_model)!r})")
        check_num_draft_tokens(num_draft_tokens, cache)
    held = cache[0].offset
    check_context(model.config.text_config.max_position_embeddings, len(ids) + held, max_tokens,
                  sum(counts.values()))
    max_tokens = min(max_tokens, model.config.text_config.max_position_embeddings - len(ids) - held)
    if max_kv_size is not None:
        check_count("--max-kv-size", max_kv_size)
        if len(ids) + held >= max_kv_size:
            raise ContextError(f"--max-kv-size {max_kv_size}: smaller than the prompt ({len(ids) + held} tokens)",
                               len(ids) + held, max_kv_size)
        max_tokens = min(max_tokens, max_kv_size - len(ids) - held)
    # Speculative sampling needs the distribution, not just a sampler: only for our own.
    sampling = resolve_sampling(processor, temp, top_p, top_k, min_p) if sampler is None else None
    if sampler is None or logits_processors is None:
        default_sampler, default_processors = make_sampling(processor, temp, top_p, top_k, min_p)
        sampler = sampler or default_sampler
        logits_processors = default_processors if logits_processors is None else logits_processors
    constraint = as_constraint(constraint)
    if constraint is not None:
        logits_processors = [*logits_processors, Guide(processor, constraint, thinking=enable_thinking)]
    eos = processor.eos_token_ids
    text_stream = TextStream(processor)

    draft_stats = {"drafted": 0, "accepted": 0}

    def response(text, token, logprobs, n, finish, thinking):
        elapsed = max(time.perf_counter() - tic, 1e-9)
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, thinking=thinking,
            prompt_tokens=len(ids), prompt_tps=len(ids) / prompt_time, generation_tokens=n,
            generation_tps=n / elapsed, peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
            media_tokens=counts, preprocess_time=inputs.preprocess_seconds, from_draft=from_draft,
            num_draft_tokens=num_draft_tokens if draft_model is not None else 0,
            drafted_tokens=draft_stats["drafted"], accepted_tokens=draft_stats["accepted"])

    with wired_limit(model):
        tic = time.perf_counter()
        prompt_time, n, token, logprobs = 1e-9, 0, None, None
        soft = embed_prompt_media(model, inputs)
        common = dict(logits_processors=logits_processors, max_tokens=max_tokens,
                      prefill_step_size=prefill_step_size, progress=progress, soft_tokens=soft)
        if draft_model is None:
            steps = _undrafted(generate_step(model, ids, cache, sampler=sampler, compile=compile, **common))
        else:
            steps = speculative_generate_step(
                model, draft_model, ids, cache, num_draft_tokens=num_draft_tokens, stats=draft_stats,
                sampler=sampler, sampling=sampling if sampling is not None and sampling.temp > 0 else None,
                **common)
        # One response per generated token (the caller can rebuild what the cache holds from
        # them); the last one carries the finish reason. Closing this generator closes the
        # token loop at once, so that the cache is settled when the caller looks at it.
        try:
            for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
                if n == 1:
                    prompt_time = time.perf_counter() - tic
                    tic = time.perf_counter()
                finish = "stop" if token in eos else "length" if n == max_tokens else None
                text, thinking = text_stream.feed(token, finish)
                yield response(text, token, logprobs, n, finish, thinking)
                if finish:
                    return
        finally:
            steps.close()


def _undrafted(steps):
    try:
        for token, logprobs in steps:
            yield token, logprobs, False
    finally:
        steps.close()


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
    if r.media_tokens:
        tokens = ", ".join(f"{kind} {n}" for kind, n in r.media_tokens.items())
        print(f"Media: {tokens} tokens; preprocessing {r.preprocess_time:.3f} s, prefill "
              f"{r.prompt_tokens / r.prompt_tps:.3f} s", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    if r.num_draft_tokens:
        rate = 100 * r.accepted_tokens / max(r.drafted_tokens, 1)
        print(f"Draft: accepted {r.accepted_tokens} of {r.drafted_tokens} drafted tokens ({rate:.1f}%), "
              f"{r.num_draft_tokens} per step", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each turn renders the whole conversation with the chat template, keeps the longest
    cached prefix of it (trimming whatever the template renders differently, e.g. a reply
    cut at max tokens) and feeds only the rest.
    """

    def __init__(self, model, processor, system: Optional[str] = None, enable_thinking: bool = False,
                 make_cache: Optional[Callable[[], list]] = None, media_options: Optional[MediaOptions] = None,
                 raw_prompt: bool = False):
        self.model, self.processor = model, processor
        self.enable_thinking, self.raw_prompt = enable_thinking, raw_prompt
        self.media_options = media_options
        self.messages = [{"role": "system", "content": system}] if system else []
        self.make_cache = make_cache or model.make_cache
        self.cache = self.make_cache()
        self.cached_ids: list[int] = []
        self.reused_tokens = 0  # prompt tokens the last turn did not have to re-read

    def send(self, content, image=(), audio=(), video=(), **kwargs) -> Iterator[GenerationResponse]:
        """One user turn: text, or a content list; `image` / `audio` / `video` join text."""
        if isinstance(content, str):
            items = user_content(content, image, audio, video)
            content = items if len(items) > 1 else content
        inputs = self.processor.chat_inputs(self.messages + [{"role": "user", "content": content}],
                                            enable_thinking=self.enable_thinking, options=self.media_options,
                                            raw_prompt=self.raw_prompt)
        keep = reuse_prefix(self.cache, self.cached_ids, inputs.ids,
                            lambda n: inputs.split_point(n, self.model.config))
        if keep == 0 and self.cache[0].offset:
            self.cache = self.make_cache()
        self.cached_ids, self.reused_tokens = inputs.ids[:keep], keep
        reply, tokens = [], []
        stream = stream_generate(self.model, self.processor, inputs.tail(keep, self.model.config),
                                 cache=self.cache, **kwargs)
        try:
            for r in stream:
                tokens.append(r.token)
                if not r.thinking:
                    reply.append(r.text)
                yield r
        finally:
            stream.close()
            # Also for a reply stopped early (the caller closed this generator at a token, or
            # prefill was interrupted between chunks): `cached_ids` says what the cache holds, and
            # a partial reply stays in the conversation (as Ollama keeps it).
            self.cached_ids = (inputs.ids + tokens)[:self.cache[0].offset]
            if tokens:
                # The history keeps its media loaded: later turns re-render it without reading files.
                self.messages = inputs.messages + [{"role": "assistant", "content": "".join(reply)}]

