"""The server's prefix cache: media-aware keys, copies, trimming limits, an LRU bounded in bytes."""

import numpy as np
from PIL import Image

import media_files as mf
import reference
from mlx_gemma.generation import generate_step
from mlx_gemma.prompt_cache import PromptCache, cache_bytes, prompt_key


def filled(model, ids):
    cache = model.make_cache()
    for _ in generate_step(model, ids, cache, max_tokens=1):
        pass
    assert cache[0].offset == len(ids)
    return cache


def ids_of(n: int, seed: int) -> list:
    return np.random.default_rng(seed).integers(20, reference.VOCAB, size=n).tolist()


def test_keys_carry_the_content_of_each_medium(processor, model):
    def key(seed):
        image = Image.fromarray(mf.noise_image(40, 56, seed))
        inputs = processor.chat_inputs([{"role": "user", "content": [{"type": "image", "image": image},
                                                                    {"type": "text", "text": "describe"}]}])
        return inputs.ids, prompt_key(inputs, model.config)

    (ids1, a), (ids2, b), (_, again) = key(1), key(2), key(1)
    assert ids1 == ids2 and a == again
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert differ == [i for i, t in enumerate(ids1) if t == model.config.image_token_id]


def test_fetch_gives_a_trimmed_copy(model):
    prefix = ids_of(30, 0)
    stored_ids = prefix + ids_of(10, 1)
    store = PromptCache(10**9)
    store.insert(stored_ids, filled(model, stored_ids))
    cache, kept = store.fetch(prefix + ids_of(5, 2))
    assert kept == 30 and all(c.offset == 30 for c in cache)
    (entry, _), = store._entries.values()
    assert all(c.offset == 40 for c in entry)  # the stored snapshot is untouched
    assert store.fetch(ids_of(8, 3)) == (None, 0)


def test_what_the_window_has_dropped_is_not_reused(model):
    ids = ids_of(420, 4)  # past the sliding window, its slack and one buffer regrowth
    cache = filled(model, ids)
    depth = min(c.max_trim for c in cache if hasattr(c, "max_trim"))
    assert depth < 420 - 10
    store = PromptCache(10**9)
    store.insert(ids, cache)
    assert store.fetch(ids[:10] + ids_of(5, 5)) == (None, 0)
    shallow, kept = store.fetch(ids[:420 - depth] + ids_of(5, 6))
    assert kept == 420 - depth and shallow[0].offset == kept


def test_lru_bounded_in_bytes_and_prefixes_replaced(model):
    entries = [ids_of(20, 10 + i) for i in range(3)]
    caches = [filled(model, e) for e in entries]
    size = cache_bytes(caches[0])
    store = PromptCache(int(2.5 * size))
    store.insert(entries[0], caches[0])
    store.insert(entries[1], caches[1])
    store.fetch(entries[0][:10] + [7])  # the first entry becomes the most recent one
    store.insert(entries[2], caches[2])
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    assert store.fetch(entries[1][:10] + [7]) == (None, 0)  # the least recently used went
    assert store.fetch(entries[0][:10] + [7])[1] == 10

    longer = entries[2] + ids_of(5, 20)
    store.insert(longer, filled(model, longer))
    assert tuple(entries[2]) not in store._entries  # the longer one can be trimmed back to it
