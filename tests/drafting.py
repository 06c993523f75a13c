"""The drafter's first step, shared by the tests and the ranks they start (which run without
torch, so this is not in conftest, which imports the transformers reference)."""

import mlx.core as mx


def draft_step(drafter, model, ids):
    """(logits, h_next) of the first draft step after `model` has read `ids`: the drafter's
    input is the last token's embedding and hidden state, its keys the target's cache."""
    cache = model.make_cache()
    _, hidden = model(ids, cache=cache, return_hidden=True)
    e = model.language_model.model.embed(ids[:, -1:])
    return drafter(mx.concatenate([e, hidden[:, -1:].astype(e.dtype)], axis=-1), model.shared_kv(cache),
                   cache[0].offset)
