"""KV caches: a growing cache for global layers, a bounded window cache for sliding layers.
Both follow mlx-lm's cache interface (offset, state, trim, is_trimmable, nbytes).

Every cache can be trimmed (speculative decoding drops rejected drafts; a chat or server
drops the tail of a shared prefix). The sliding cache keeps `slack` tokens beyond the
window so that it stays trimmable after it has wrapped, which mlx-lm's RotatingKVCache is not.

A cache's `update_and_fetch(k, v)` returns the keys/values that the new queries attend to,
and `make_mask(L)`, called before it, the matching mask (None, "causal" or a boolean array).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import _BaseCache

DEFAULT_SLIDING_SLACK = 128

__all__ = ["GlobalCache", "SlidingWindowCache", "WholeSequence", "DecodeStep", "window_mask", "vision_blocks",
           "reuse_prefix", "DEFAULT_SLIDING_SLACK"]


def vision_blocks(token_types: np.ndarray) -> np.ndarray:
    """Block id of each token: each maximal run of image or video placeholders (one image, one
    video frame: boi/eoi end a run) is a block; everything else, audio too, is -1 (spec 3)."""
    vision = (token_types == 1) | (token_types == 2)
    starts = vision & ~np.concatenate([np.zeros(token_types.shape[:-1] + (1,), bool), vision[..., :-1]], -1)
    return np.where(vision, np.cumsum(starts, axis=-1) - 1, -1)


def window_mask(L: int, offset: int, key_start: int, n_keys: int, window: Optional[int],
                blocks: Optional[np.ndarray] = None, unclipped: bool = False):
    """Boolean mask for queries at positions offset..offset+L-1 over keys at key_start.. .

    A key is visible when kv <= q and, for a sliding layer, kv > q - window (spec 3).
    `blocks` (block ids of the L new tokens, see `vision_blocks`) lets a token see the later
    tokens of its own block too; `unclipped` also lets it see earlier ones the window hides
    (transformers' forward() variant). Blocks are never split across calls, so the overlay
    only concerns the new tokens. Returns None when every key is visible to every query,
    "causal" when plain causal alignment (last query on last key) is exact.
    """
    first_q, last_q = offset, offset + L - 1
    last_k = key_start + n_keys - 1
    windowed = window is not None and key_start <= last_q - window
    overlay = blocks is not None and L > 1 and bool((blocks >= 0).any())
    if L == 1 and not windowed:
        return None
    if not windowed and last_k == last_q and not overlay:
        return "causal"
    q = mx.arange(first_q, last_q + 1)[:, None]
    k = mx.arange(key_start, last_k + 1)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    if overlay:  # per batch row: [B, 1 (heads), L, n_keys]
        b = blocks.reshape(-1, L)
        same = (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
        if not unclipped:
            same &= np.triu(np.ones((L, L), bool), 1)
        same = np.concatenate([np.zeros((len(b), L, n_keys - L), bool), same], axis=2)
        mask = (mask[None] | mx.array(same))[:, None]
    return mask


class WholeSequence:
    """No cache: one call sees the whole sequence (training, scoring). Keys and values pass
    through untouched, so gradients and recomputation (mx.vjp) see a pure function."""

    offset = 0
    one_tensor = False

    def __init__(self, window: Optional[int] = None):
        self.window = window

    def make_mask(self, L: int, blocks=None, unclipped: bool = False):
        return window_mask(L, 0, 0, L, self.window, blocks, unclipped)

    def update_and_fetch(self, keys, values):
        return keys, values


class GlobalCache(_BaseCache):
    """The growing cache of a global layer. It can store less: one tensor's worth on k_eq_v
    layers, and/or group-quantized storage (kv_bits 4 or 8) once `quantize_after` tokens are
    cached.

    One tensor: on k_eq_v layers with partial RoPE the layer stores one tensor's worth of keys
    and values per token, as two arrays (`update_and_fetch_packed`; `Attention.pack`, spec 9).
    Two tensors: keys and values as usual (`update_and_fetch`). Updating returns what is
    stored, as it is stored: arrays, or (codes, scales, biases) that attention reads without
    dequantizing (`model.attend`); `fetch` returns full precision.
    """

    step = 256

    def __init__(self, one_tensor: bool = False, bits: Optional[int] = None, group_size: int = 64,
                 quantize_after: int = 0):
        self.one_tensor = one_tensor
        self.bits, self.group_size, self.quantize_after = bits, group_size, quantize_after
        self.stored = None  # list of tensors, each an array or a (codes, scales, biases) tuple
        self.offset = 0

    @property
    def quantized(self) -> bool:
        return self.stored is not None and isinstance(self.stored[0], tuple)

    def _quantize(self, x):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _capacity(self) -> int:
        if self.stored is None:
            return 0
        first = self.stored[0][0] if self.quantized else self.stored[0]
        return first.shape[2]

    def _layouts(self) -> list:
        """(batch, heads, width, dtype) of each stored tensor, as given to `_update`."""
        if not self.quantized:
            return [(t.shape[0], t.shape[1], t.shape[3], t.dtype) for t in self.stored]
        return [(c.shape[0], c.shape[1], s.shape[3] * self.group_size, s.dtype) for c, s, _ in self.stored]

    def _grow(self, layouts: list, needed: int, quantize: bool) -> None:
        """Reallocate with room for `needed` tokens (a multiple of `step`), keeping the cached ones."""
        size = -(-needed // self.step) * self.step
        grown = []
        for i, (B, H, D, dtype) in enumerate(layouts):
            fresh = mx.zeros((B, H, size - self.offset, D), dtype)
            fresh = self._quantize(fresh) if quantize else fresh
            if not self.offset:
                grown.append(fresh)
            elif quantize:
                grown.append(tuple(mx.concatenate([old[..., :self.offset, :], f], axis=2)
                                   for old, f in zip(self.stored[i], fresh)))
            else:
                grown.append(mx.concatenate([self.stored[i][..., :self.offset, :], fresh], axis=2))
        self.stored = grown

    def reserve(self, n: int, tensors: Optional[list] = None) -> bool:
        """Room for `n` more tokens (shaped like `tensors`, default like the stored ones), in the
        storage kind they go into; True when that is quantized."""
        end = self.offset + n
        # Once quantized, the storage stays so (also after a trim back below quantize_after).
        quantize = self.quantized or (bool(self.bits) and end > self.quantize_after)
        if quantize and self.stored is not None and not self.quantized:
            self.stored = [self._quantize(t) for t in self.stored]  # crossing quantize_after
        if end > self._capacity():
            layouts = self._layouts() if tensors is None else \
                [(t.shape[0], t.shape[1], t.shape[3], t.dtype) for t in tensors]
            self._grow(layouts, end, quantize)
        return quantize

    def _update(self, tensors: list) -> list:
        end = self.offset + tensors[0].shape[2]
        quantize = self.reserve(tensors[0].shape[2], tensors)
        out = []
        for i, t in enumerate(tensors):
            if quantize:
                for part, new in zip(self.stored[i], self._quantize(t)):
                    part[..., self.offset:end, :] = new
                out.append(tuple(part[..., :end, :] for part in self.stored[i]))
            else:
                self.stored[i][..., self.offset:end, :] = t
                out.append(self.stored[i][..., :end, :])
        self.offset = end
        return out

    def update_and_fetch(self, keys, values):
        return tuple(self._update([keys, values]))

    def update_and_fetch_packed(self, parts: list) -> list:
        return self._update(parts)

    @property
    def buffers(self) -> list:
        return self.stored

    def write_index(self) -> int:
        return self.offset

    def advance(self, buffers: list) -> None:
        self.stored = buffers
        self.offset += 1

    def make_mask(self, L: int, blocks=None, unclipped: bool = False):
        return window_mask(L, self.offset, 0, self.offset + L, None, blocks, unclipped)

    def fetch(self, last: Optional[int] = None) -> list:
        """The stored tensors of the newest `last` (default: all) cached tokens, full precision."""
        start = 0 if last is None else max(0, self.offset - last)
        if not self.quantized:
            return [t[..., start:self.offset, :] for t in self.stored]
        return [mx.dequantize(*(p[..., start:self.offset, :] for p in t), group_size=self.group_size,
                              bits=self.bits) for t in self.stored]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.stored is None

    @property
    def state(self):
        if self.stored is None:
            return []
        if self.quantized:
            return [p[..., :self.offset, :] for t in self.stored for p in t]
        return [t[..., :self.offset, :] for t in self.stored]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the buffer grows in steps of 256 tokens)."""
        if self.stored is None:
            return 0
        return sum(p.nbytes for t in self.stored for p in (t if isinstance(t, tuple) else (t,)))


class SlidingWindowCache(_BaseCache):
    """Keys/values of a sliding-window layer, in temporal order, bounded in memory.

    Holds at most `window - 1 + slack` past tokens between calls, in a buffer of that plus
    max(step, chunk) slots, so memory does not depend on the prompt length. A query needs the `window - 1` tokens
    before it; the `slack` extra tokens are what makes `trim` possible after wrapping.
    """

    step = 256

    def __init__(self, window: int, slack: int = DEFAULT_SLIDING_SLACK):
        self.window = window
        self.slack = slack
        self.keys = None
        self.values = None
        self.offset = 0  # absolute position of the next token
        self._len = 0  # valid tokens in the buffer: positions offset-_len .. offset-1

    @property
    def capacity(self) -> int:
        return self.window - 1 + self.slack

    def _history(self) -> int:
        return min(self._len, self.window - 1)

    def make_mask(self, L: int, blocks=None, unclipped: bool = False):
        history = self._history()
        return window_mask(L, self.offset, self.offset - history, history + L, self.window, blocks, unclipped)

    def reserve(self, n: int, tensors: Optional[tuple] = None) -> None:
        """Room for `n` more tokens after the held ones (shaped like `tensors`, the new keys
        and values; default like the held ones)."""
        if self.keys is not None and self._len + n <= self.keys.shape[2]:
            return
        keep = min(self._len, self.capacity)
        grow = max(n, self.step)  # room for this update and the next decode steps
        keys, values = tensors or (self.keys, self.values)
        B, H, _, D = keys.shape
        new_k = mx.zeros((B, H, grow, D), keys.dtype)
        new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
        if keep:
            start = self._len - keep
            new_k = mx.concatenate([self.keys[..., start:self._len, :], new_k], axis=2)
            new_v = mx.concatenate([self.values[..., start:self._len, :], new_v], axis=2)
        self.keys, self.values, self._len = new_k, new_v, keep

    def update_and_fetch(self, keys, values):
        L = keys.shape[2]
        self.reserve(L, (keys, values))
        history = self._history()
        self.keys[..., self._len:self._len + L, :] = keys
        self.values[..., self._len:self._len + L, :] = values
        self._len += L
        self.offset += L
        start = self._len - L - history
        return self.keys[..., start:self._len, :], self.values[..., start:self._len, :]

    @property
    def buffers(self) -> list:
        return [self.keys, self.values]

    def write_index(self) -> int:
        return self._len

    def advance(self, buffers: list) -> None:
        self.keys, self.values = buffers
        self._len += 1
        self.offset += 1

    def fetch(self, last: Optional[int] = None) -> list:
        """Keys and values of the newest `last` (default: all held) tokens."""
        start = 0 if last is None else max(0, self._len - last)
        return [self.keys[..., start:self._len, :], self.values[..., start:self._len, :]]

    @property
    def max_trim(self) -> int:
        """How many of the latest tokens can be dropped keeping `window` of them: the next
        query's window - 1 past tokens, and, once it is fed, the window + 1 keys the MTP
        drafter reads (`Model.shared_kv`)."""
        if self._len == self.offset:  # nothing has been evicted yet
            return self._len
        return max(0, self._len - self.window)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n > self.max_trim:
            raise ValueError(
                f"cannot trim {n} tokens from a sliding-window cache that holds only "
                f"{self.max_trim} beyond its window (slack {self.slack}); rebuild the cache")
        self._len -= n
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., :self._len, :], self.values[..., :self._len, :]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class DecodeStep:
    """A cache as one decode step inside mx.compile sees it (`generation.compiled_decode`).

    The step's input is the cache's buffers and the new token's position and buffer slot, all
    arrays, so one trace serves every step until a buffer is reallocated (`reserve`, outside
    the trace: every 256 tokens for a global layer, once for a sliding one). The new token is
    written at its slot; attention reads a fixed-size span under a mask where the eager path
    slices the valid part (the same keys, weighted the same): a global layer's whole buffer,
    a sliding layer's `window` slots ending at the new token.
    After the step, `cache.advance(step.buffers)` takes the written buffers.
    """

    def __init__(self, cache, buffers: list, offset: mx.array, index: mx.array):
        self.buffers = list(buffers)
        self.offset, self.index = offset, index  # RoPE position; slot in the buffers
        self.window = getattr(cache, "window", None)
        self.one_tensor = getattr(cache, "one_tensor", False)
        self.bits, self.group_size = getattr(cache, "bits", None), getattr(cache, "group_size", 64)
        first = self.buffers[0][0] if isinstance(self.buffers[0], tuple) else self.buffers[0]
        size = first.shape[2]
        self.span = size if self.window is None else min(self.window, size)
        self.start = mx.clip(index - self.span + 1, 0, size - self.span)

    def make_mask(self, L: int, blocks=None, unclipped: bool = False):
        # The span holds no key older than the window: only slots after the new token are hidden.
        return (self.start + mx.arange(self.span) <= self.index)[None, None, None]

    def _read(self, x: mx.array) -> mx.array:
        if self.span == x.shape[2]:
            return x
        return mx.slice(x, self.start[None], (2,), x.shape[:2] + (self.span,) + x.shape[3:])

    def _write(self, i: int, x: mx.array):
        at, buf = self.index[None], self.buffers[i]
        if isinstance(buf, tuple):
            new = mx.quantize(x, group_size=self.group_size, bits=self.bits)
            self.buffers[i] = tuple(mx.slice_update(p, n, at, axes=(2,)) for p, n in zip(buf, new))
            return tuple(self._read(p) for p in self.buffers[i])
        self.buffers[i] = mx.slice_update(buf, x, at, axes=(2,))
        return self._read(self.buffers[i])

    def update_and_fetch(self, keys, values):
        return self._write(0, keys), self._write(1, values)

    def update_and_fetch_packed(self, parts: list) -> list:
        return [self._write(i, p) for i, p in enumerate(parts)]


def max_trim(cache: list) -> int:
    """How many of the newest tokens every layer of `cache` can still drop."""
    return min(getattr(c, "max_trim", c.offset) for c in cache)


def usable_prefix(cache: list, cached_ids, new_ids, boundary: Optional[Callable[[int], int]] = None) -> int:
    """How many leading tokens of `new_ids` `cache` (holding `cached_ids`) can keep: the longest
    shared prefix, moved back by `boundary` (e.g. to the start of a medium the prefix would cut),
    leaving at least one token to feed; 0 when trimming back to it is beyond the cache."""
    common = 0
    for a, b in zip(cached_ids, new_ids):
        if a != b:
            break
        common += 1
    common = min(common, len(new_ids) - 1)
    if boundary is not None:
        common = boundary(common)
    if common <= 0 or len(cached_ids) - common > max_trim(cache):
        return 0
    return common


def reuse_prefix(cache: list, cached_ids: list, new_ids: list,
                 boundary: Optional[Callable[[int], int]] = None) -> int:
    """Trim `cache`, which holds `cached_ids`, to `usable_prefix` of `new_ids` and return it;
    0 means nothing could be reused and the cache must be rebuilt."""
    common = usable_prefix(cache, cached_ids, new_ids, boundary)
    if common:
        for c in cache:
            c.trim(len(cached_ids) - common)
    return common
