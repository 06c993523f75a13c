"""A prefix cache shared across requests: an LRU of KV-cache snapshots bounded in bytes.

Agents resend the whole conversation on every request; a snapshot of the cache that holds a
prefix of the new prompt saves re-reading that prefix. Learnt from mlx-lm's `LRUPromptCache`,
with two differences that our caches and multimodal prompts need:

- Keys are token ids in which every media placeholder also carries the content hash of its
  medium (`prompt_key`): two prompts with different images have the same placeholder ids, and
  must not share the image's rows.
- Sliding-window layers keep only `slack` tokens beyond their window once it has wrapped, so a
  snapshot can be rolled back only that far (`SlidingWindowCache.max_trim`). A snapshot is
  therefore used only when every layer can be trimmed to the shared prefix, and the server
  also stores an exact snapshot at the start of the last user turn (before the new turn is
  read): a later request that shares the system prompt, tools and earlier turns then needs no
  trim at all, however long the conversation has grown past the window.

Snapshots are deep copies (the caches are written in place); a fetched snapshot is a copy too,
so one request never changes another's entry.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from .cache import max_trim, reuse_prefix, usable_prefix


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prompt_key(inputs, config) -> list:
    """The prompt's token ids, each media placeholder as (id, hash of its medium's arrays)."""
    key: list = list(inputs.ids)
    ids = np.asarray(inputs.ids)
    media = {
        "image": [_digest(i.pixel_values, i.position_ids) for i in inputs.images],
        "video": [_digest(v.frames.pixel_values, v.frames.position_ids, np.asarray(v.timestamps))
                  for v in inputs.videos],
        "audio": [_digest(a) for a in inputs.audio],
    }
    for kind, sizes in inputs._sizes().items():
        token = getattr(config, f"{kind}_token_id")
        where = np.flatnonzero(ids == token)
        owner = np.repeat(np.arange(len(sizes)), sizes)
        for position, medium in zip(where, owner):
            key[position] = (token, media[kind][medium])
    return key


def cache_bytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


class PromptCache:
    """Snapshots keyed by `prompt_key` lists; least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int, measure: Callable[[list], int] = cache_bytes):
        self.max_bytes, self.measure = max_bytes, measure
        self._entries: "OrderedDict[tuple, tuple[list, int]]" = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, key: list, boundary: Optional[Callable[[int], int]] = None) -> tuple[Optional[list], int]:
        """(a copy of the best snapshot trimmed to the prefix it shares with `key`, its length),
        or (None, 0). `boundary` moves a prefix back out of a medium it would cut."""
        best, best_keep = None, 0
        for stored, (cache, _) in self._entries.items():
            keep = usable_prefix(cache, stored, key, boundary)
            if keep > best_keep:
                best, best_keep = stored, keep
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        cache = copy.deepcopy(self._entries[best][0])
        kept = reuse_prefix(cache, list(best), key, boundary)
        assert kept == best_keep, (kept, best_keep)
        return cache, kept

    def insert(self, key: list, cache: list, copy_cache: bool = False) -> None:
        """Store `cache`, which holds exactly `key` (copied first when the caller keeps using it).
        Entries it can stand in for (prefixes it can be trimmed back to) are dropped."""
        size = self.measure(cache)
        if size > self.max_bytes or not key:
            return
        stored = tuple(key)
        for other in [k for k in self._entries if len(k) <= len(stored) and stored[:len(k)] == k]:
            if len(stored) - len(other) <= max_trim(cache):
                self._drop(other)
        if copy_cache:
            cache = copy.deepcopy(cache)
        self._entries[stored] = (cache, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def give_back(self) -> bool:
        """Drop the least recently used entry (memory a request waits for); False if empty."""
        if not self._entries:
            return False
        self._drop(next(iter(self._entries)))
        return True

    def _drop(self, stored: tuple) -> None:
        _, size = self._entries.pop(stored)
        self.nbytes -= size
