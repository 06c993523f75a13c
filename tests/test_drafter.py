"""The MTP drafter (spec 8) against transformers' own assistant modules, the K/V it reads
against transformers' target cache, and loading (Hub and mlx-vlm layouts, bad checkpoints).

transformers 5.23 cannot run unified MTP end to end (spec 8: the target returns no shared K/V),
so the reference drafter is driven by hand, as `SinglePositionMultiTokenCandidateGenerator`
drives it: inputs_embeds = [target embedding of the last token, h_last], the constant position
len(ids) - 1 (= the tokens in the target cache), and the target's whole last-layer K/V per type,
which it masks itself (`reference._assistant_layers` lets transformers build the layers).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import reference
from conftest import record_parity
from mlx_gemma.errors import CheckpointError, ConfigError, MlxGemmaError
from mlx_gemma.loading import load
from mlx_gemma.speculative import Drafter, DrafterConfig, load_drafter

W = reference.WINDOW
SLIDING, FULL = "sliding_attention", "full_attention"
STEPS = 3  # chained draft steps per round


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(20, reference.VOCAB, size=n - 1).tolist()


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def to_torch(a: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(a.astype(mx.float32)))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")[0]


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    return {ordered: reference.build_drafter(root / ("ordered" if ordered else "plain"), seed=1, ordered=ordered)
            for ordered in (False, True)}


@pytest.fixture(scope="module")
def reference_drafters(drafter_dirs):
    return {ordered: reference.load_reference_drafter(path) for ordered, path in drafter_dirs.items()}


@pytest.fixture(scope="module")
def drafters(drafter_dirs, target):
    return {ordered: load_drafter(path, dtype="float32", target=target) for ordered, path in drafter_dirs.items()}


def last_layers(model) -> dict:
    """{layer type: index of the target's last layer of that type} (what the drafter reads)."""
    return {s.layer_type: s.index for s in model.config.text_config.layers}


def prefill(model, ids: list[int], cache: list, chunk: int = 0):
    """(logits, final-normed hidden) of the prompt's last token; `chunk` > 0 prefills in pieces."""
    chunk = chunk or len(ids)
    for i in range(0, len(ids), chunk):
        logits, hidden = model(mx.array([ids[i:i + chunk]]), cache=cache, return_hidden=True)
    return logits[:, -1:], hidden[:, -1:]


# Two target caches: a 40-token prompt prefilled at once (2.5 windows, two tensors per global
# layer), and a 300-token one prefilled in chunks with slack 2, so that the sliding buffer has
# been reallocated and the oldest tokens evicted (one tensor: the global keys are derived).
CACHES = {
    "40-tokens-two-tensor": dict(n=40, chunk=0, cache=dict(one_tensor=False)),
    "300-tokens-evicted-one-tensor": dict(n=300, chunk=32, cache=dict(one_tensor=True, sliding_slack=2)),
}


@pytest.fixture(scope="module", params=list(CACHES))
def prompt_state(request, target):
    case = CACHES[request.param]
    ids = prompt_ids(case["n"], seed=5)
    cache = target.make_cache(**case["cache"])
    logits, hidden = prefill(target, ids, cache, case["chunk"])
    return request.param, ids, cache, logits, hidden


# --- 1. drafter forward vs transformers' assistant ---------------------------------------------


@pytest.mark.parametrize("ordered", [False, True], ids=["tied-head", "ordered-head"])
def test_draft_steps_match_reference(target, drafters, reference_drafters, prompt_state, ordered):
    name, ids, cache, logits, hidden = prompt_state
    drafter, ref = drafters[ordered], reference_drafters[ordered]
    layers, position = last_layers(target), cache[0].offset
    assert position == len(ids)  # transformers: len(ids + [last]) - 1
    sliding = cache[layers[SLIDING]]
    if "evicted" in name:
        assert sliding.state[0].shape[2] < sliding.offset, "the fixture must evict sliding tokens"

    kv = target.shared_kv(cache)
    # transformers is given everything the target's last layers hold (its loop passes the whole
    # key/value tensors the target returned) and masks them itself: full = all of them, sliding =
    # keys within distance W of the query, i.e. the newest W + 1.
    everything = {t: target.layers[i].self_attn.cached_kv(cache[i]) for t, i in layers.items()}
    assert everything[SLIDING][0].shape[2] > W + 1
    shared = {t: (to_torch(k), to_torch(v)) for t, (k, v) in everything.items()}

    embed = target.language_model.model.embed
    tok = int(mx.argmax(logits[0, -1]).item())
    h_ours = hidden
    h_ref = to_torch(hidden)
    tag = f"drafter {'ordered' if ordered else 'tied'} head, {name}"
    for step in range(STEPS):
        e = embed(mx.array([[tok]]))
        out_logits, h_next = drafter(mx.concatenate([e, h_ours], axis=-1), kv, position)
        with torch.no_grad():
            out = ref(inputs_embeds=torch.cat([to_torch(e), h_ref], dim=-1),
                      position_ids=torch.tensor([[position]]), shared_kv_states=shared, attention_mask=None)
        ours, theirs = np.array(out_logits[0, -1]), out.logits[0, -1].numpy()
        ref_h = out.last_hidden_state.numpy()
        err = rel_err(h_next, ref_h)
        record_parity(f"{tag}: h_next", err)
        assert err <= 1e-4, f"step {step}: h_next off by {err:.2e}"
        if ordered:
            # Exact logits on the candidates only; every other token is min(candidates) - 1.
            ref_mask = theirs == theirs.min()
            ours_mask = ours == ours.min()
            c = drafter.config  # top-k centroids, each owning vocab / centroids tokens
            assert (~ref_mask).sum() == c.centroid_intermediate_top_k * reference.VOCAB // c.num_centroids
            assert np.array_equal(ours_mask, ref_mask), f"step {step}: another candidate set"
            candidates = ~ours_mask
            assert ours.min() == np.float32(ours[candidates].min() - 1)
            err = rel_err(ours[candidates], theirs[candidates])
            record_parity(f"{tag}: candidate logits", err)
            assert err <= 1e-4, f"step {step}: candidate logits off by {err:.2e}"
            assert abs(ours.min() - theirs.min()) <= 1e-4 * np.abs(theirs).max()
        else:
            err = rel_err(ours, theirs)
            record_parity(f"{tag}: logits", err)
            assert err <= 1e-4, f"step {step}: logits off by {err:.2e}"
        y, _ = drafter.hidden(mx.concatenate([e, h_ours], axis=-1), kv, position)
        assert int(drafter.greedy(y).item()) == int(np.argmax(ours)), f"step {step}"
        tok = int(np.argmax(ours))
        assert tok == int(np.argmax(theirs)), f"step {step}"
        h_ours, h_ref = h_next, out.last_hidden_state
    # What ours reads: the newest W + 1 sliding keys, every full one, in time order.
    assert kv[FULL][0].shape[2] == len(ids) and kv[SLIDING][0].shape[2] == W + 1
    for t in (SLIDING, FULL):
        for ours_part, all_part in zip(kv[t], everything[t]):
            assert mx.array_equal(ours_part, all_part[..., -ours_part.shape[2]:, :])


def test_the_oldest_of_the_w_plus_one_sliding_keys_counts(target, drafters, prompt_state):
    """Without the oldest of the newest W + 1 sliding keys (a window of W, what a target query
    sees) the draft changes visibly: the parity above depends on that key."""
    _, ids, cache, logits, hidden = prompt_state
    drafter, position = drafters[False], cache[0].offset
    kv = target.shared_kv(cache)
    e = target.language_model.model.embed(mx.array([[int(mx.argmax(logits[0, -1]).item())]]))
    x = mx.concatenate([e, hidden], axis=-1)
    base = np.array(drafter(x, kv, position)[0])
    fewer = dict(kv, **{SLIDING: tuple(a[..., 1:, :] for a in kv[SLIDING])})
    assert rel_err(np.array(drafter(x, fewer, position)[0]), base) > 1e-3


# --- 2. the target's shared K/V vs transformers' target cache ----------------------------------


def reference_kv(hf_model, ids: list[int], layers: dict) -> dict:
    """transformers' cached keys/values of the target's last layers. Its sliding cache keeps
    only the newest W - 1 tokens; the two before them come from a run on ids[:-2] (keys depend
    only on earlier tokens), giving the newest W + 1."""
    def cached(prompt):
        with torch.no_grad():
            out = hf_model(input_ids=torch.tensor([prompt]), use_cache=True)
        return {t: (out.past_key_values.layers[i].keys.numpy(), out.past_key_values.layers[i].values.numpy())
                for t, i in layers.items()}

    now, before = cached(ids), cached(ids[:-2])
    assert now[SLIDING][0].shape[2] == W - 1 and now[FULL][0].shape[2] == len(ids)
    overlap = W - 3  # positions both runs hold
    for a, b in zip(now[SLIDING], before[SLIDING]):
        np.testing.assert_allclose(a[..., :overlap, :], b[..., -overlap:, :], rtol=0, atol=1e-5)
    return {FULL: now[FULL], SLIDING: tuple(np.concatenate([b[..., :2, :], a], axis=2)
                                           for a, b in zip(now[SLIDING], before[SLIDING]))}


KV_CACHES = {
    "two-tensor": (dict(one_tensor=False), 1e-4),
    "one-tensor": (dict(one_tensor=True), 1e-4),
    # 8-bit affine codes (group 32: the fixture's global head dim) round each stored value by up
    # to half a step, range / 510, i.e. <= 0.4% of a group's largest magnitude. Layer 5's keys
    # and values are stored so too, and its error reaches every later layer's hidden states, so
    # the last layers' K/V (from those states) are off by more: up to 1.5e-2 measured over
    # prompts on this deliberately sharp fixture (9e-3 on this one); 3e-2 leaves 2x margin, far
    # below the O(1) error of a wrong layer, position or order.
    "8-bit-two-tensor": (dict(one_tensor=False, kv_bits=8, kv_group_size=32), 3e-2),
    "8-bit-one-tensor": (dict(one_tensor=True, kv_bits=8, kv_group_size=32), 3e-2),
}


@pytest.fixture(scope="module")
def kv_prompt(hf_model, target):
    ids = prompt_ids(40, seed=7)
    return ids, reference_kv(hf_model, ids, last_layers(target))


@pytest.mark.parametrize("kind", list(KV_CACHES))
def test_shared_kv_matches_reference_cache(target, kv_prompt, kind):
    options, tol = KV_CACHES[kind]
    ids, ref = kv_prompt
    cache = target.make_cache(**options)
    target(mx.array([ids]), cache=cache)
    full = cache[last_layers(target)[FULL]]
    assert full.one_tensor == options["one_tensor"] and len(full.state) == 2 * (
        3 if "kv_bits" in options else 1)  # two stored arrays, quantized: codes, scales, biases
    kv = target.shared_kv(cache)
    assert kv[SLIDING][0].shape[2] == W + 1 and kv[FULL][0].shape[2] == len(ids)
    for t in (SLIDING, FULL):
        for part, ours, theirs in zip(("keys", "values"), kv[t], ref[t]):
            assert ours.dtype == mx.float32 and ours.shape == theirs.shape, (t, part)
            err = rel_err(np.array(ours), theirs)
            record_parity(f"shared_kv {kind} cache, {t} {part}", err)
            assert err <= tol, (t, part, err)


# --- 3. loading -------------------------------------------------------------------------------


def drafter_input(target, seed: int = 0):
    """A draft step's input and K/V from a short prompt."""
    ids = prompt_ids(2 * W + 3, seed=seed)
    cache = target.make_cache()
    logits, hidden = prefill(target, ids, cache)
    e = target.language_model.model.embed(mx.array([[int(mx.argmax(logits[0, -1]).item())]]))
    return mx.concatenate([e, hidden], axis=-1), target.shared_kv(cache), cache[0].offset


def test_loads_transformers_checkpoint(drafters, drafter_dirs):
    for ordered, drafter in drafters.items():
        assert isinstance(drafter, Drafter) and drafter.config.use_ordered_embeddings == ordered
        assert drafter.model.norm.weight.dtype == mx.float32
        if ordered:
            ordering = drafter.masked_embedding.token_ordering
            assert ordering.dtype == mx.int32 and sorted(np.array(ordering).tolist()) == list(range(reference.VOCAB))


@pytest.mark.parametrize("ordered", [False, True], ids=["tied-head", "ordered-head"])
def test_loads_mlx_vlm_layout(tmp_path, target, drafters, drafter_dirs, ordered):
    """mlx-vlm's drafter sanitize keeps the names, casts the token ordering to int32 and drops a
    tied lm_head; it saves with mx.save_safetensors."""
    source = drafter_dirs[ordered]
    weights = mx.load(str(source / "model.safetensors"))
    weights.pop("lm_head.weight", None)
    if ordered:
        assert weights["masked_embedding.token_ordering"].dtype == mx.int64
        weights["masked_embedding.token_ordering"] = weights["masked_embedding.token_ordering"].astype(mx.int32)
    out = tmp_path / "mlx-vlm-drafter"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    shutil.copy(source / "config.json", out / "config.json")
    copy = load_drafter(out, dtype="float32", target=target)
    x, kv, position = drafter_input(target)
    ours_logits, ours_h = copy(x, kv, position)
    hub_logits, hub_h = drafters[ordered](x, kv, position)
    assert mx.array_equal(ours_logits, hub_logits) and mx.array_equal(ours_h, hub_h)


def write_drafter(path, config: dict, seed: int = 0):
    """A self-consistent drafter checkpoint of any config (random weights of the right shapes)."""
    mx.random.seed(seed)
    drafter = Drafter(DrafterConfig.from_dict(config))
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(drafter.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _backbone(c):
    c["backbone_hidden_size"] = 48


def _vocab(c):
    c["text_config"]["vocab_size"] = 256


def _head_dim(c):
    c["text_config"]["per_layer_config"]["3"]["head_dim"] = 16


@pytest.mark.parametrize("change, words", [
    (_backbone, "backbone_hidden_size 48 != the target's hidden_size 64"),
    (_vocab, "vocab_size 256 != the target's 512"),
    (_head_dim, "full_attention head dim 16 != the target's 32"),
], ids=["backbone", "vocab", "head-dim"])
def test_drafter_that_does_not_fit_the_target(tmp_path, target, drafter_dirs, change, words):
    config = json.loads((drafter_dirs[False] / "config.json").read_text())
    change(config)
    path = write_drafter(tmp_path / "bad-drafter", config)
    load_drafter(path, dtype="float32")  # a drafter in itself
    with pytest.raises(CheckpointError) as e:
        load_drafter(path, dtype="float32", target=target)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and words in message


def _no_config(path):
    (path / "config.json").unlink()


def _truncated(path):
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])


def _target_config(path):
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4_unified"
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, error, words", [
    (_no_config, CheckpointError, "no config.json"),
    (_truncated, CheckpointError, "truncated"),
    (_target_config, ConfigError, "'gemma4_unified'"),
], ids=["no-config", "truncated-weights", "target-not-drafter"])
def test_broken_drafter_checkpoint(tmp_path, drafter_dirs, target, damage, error, words):
    path = tmp_path / "broken"
    shutil.copytree(drafter_dirs[True], path)
    damage(path)
    with pytest.raises(MlxGemmaError) as e:
        load_drafter(path, dtype="float32", target=target)
    message = str(e.value)
    assert type(e.value) is error
    assert "\n" not in message and str(path) in message and words in message


# --- 4. mlx-vlm's drafter modules, fed what transformers' drafter sees -----------------------


@pytest.mark.parametrize("ordered", [False, True], ids=["tied-head", "ordered-head"])
def test_matches_mlx_vlm_modules(target, drafters, drafter_dirs, prompt_state, ordered):
    """mlx-vlm 0.7.10's drafter layers, head and projections, with the keys and query position
    transformers uses (its own round loop differs there, spec 10.20, so it is bypassed: every
    layer gets exactly the keys transformers attends to, no mask, position = cached tokens).
    Its text config needs hidden_size_per_layer_input 0 and the global_* form (spec 10.16, 10.20)."""
    from mlx_vlm.speculative.drafters.gemma4_assistant import Gemma4AssistantDraftModel
    from mlx_vlm.speculative.drafters.gemma4_assistant.config import Gemma4AssistantConfig

    config = json.loads((drafter_dirs[ordered] / "config.json").read_text())
    text = config["text_config"]
    text.update(hidden_size_per_layer_input=0, global_head_dim=text["per_layer_config"]["3"]["head_dim"],
                num_global_key_value_heads=text["per_layer_config"]["3"]["num_key_value_heads"])
    theirs = Gemma4AssistantDraftModel(Gemma4AssistantConfig.from_dict(config))
    theirs.load_weights(list(theirs.sanitize(mx.load(str(drafter_dirs[ordered] / "model.safetensors"))).items()),
                        strict=True)
    theirs.bind(target)

    _, _, cache, logits, hidden = prompt_state
    kv, position = target.shared_kv(cache), cache[0].offset
    e = target.language_model.model.embed(mx.array([[int(mx.argmax(logits[0, -1]).item())]]))
    x = mx.concatenate([e, hidden], axis=-1)
    ours_logits, ours_h = drafters[ordered](x, kv, position)
    h = theirs.pre_projection(x)
    for layer in theirs.model.layers:
        h, _, _ = layer(h, mask=None, cache=None, per_layer_input=None, shared_kv=kv[layer.layer_type],
                        offset=mx.array(position))
    h = theirs.model.norm(h)
    err_logits = rel_err(ours_logits, theirs._lm_head_fn(h))
    err_h = rel_err(ours_h, theirs.post_projection(h))
    record_parity(f"drafter {'ordered' if ordered else 'tied'} head vs mlx-vlm modules", max(err_logits, err_h))
    assert err_logits <= 1e-5 and err_h <= 1e-5
