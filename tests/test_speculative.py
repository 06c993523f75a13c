"""MTP speculative decoding: the output is the target's, whatever the drafter proposes.

Greedy decoding with a drafter must give token for token what plain greedy decoding gives,
for prompts longer than the sliding window (rejected drafts are trimmed from wrapped sliding
caches), media prompts, chats and every cache kind; between rounds the cache holds exactly the
accepted tokens. Sampling must keep the target's distribution (speculative sampling).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from media_files import noise_image, write_wav

import reference
from mlx_gemma.errors import InputError
from mlx_gemma.generation import ChatSession, Sampling, speculative_generate_step, stream_generate
from mlx_gemma import speculative
from mlx_gemma.speculative import _accept

LONG = list(range(30, 30 + 3 * reference.WINDOW))  # wraps the sliding caches


@pytest.fixture(params=["lazy-head", "one-head-matmul"])
def verify_head(request, monkeypatch):
    """Both ways a greedy verify computes its logits: row by row up to the first rejection (the
    CPU backend's choice) and one matmul over the block (a GPU's)."""
    monkeypatch.setattr(speculative, "lazy_verify_head", lambda: request.param == "lazy-head")


def greedy(model, processor, prompt, cache=None, **kw):
    return [r.token for r in stream_generate(model, processor, prompt, max_tokens=24, temp=0.0, cache=cache,
                                             **kw)]


class Scripted:
    """A stand-in drafter that proposes from a known continuation: the target's own (the oracle)
    or always something else (the adversary), or wrong at every `wrong_every`-th draft of a
    round (partial acceptance). It records the cache length it drafts from."""

    def __init__(self, model, continuation: list, wrong: bool = False, wrong_every: int = 0):
        self.model, self.continuation, self.wrong, self.wrong_every = model, continuation, wrong, wrong_every
        self.rounds, self._round = [], None

    def hidden(self, inputs_embeds, kv, position):
        if self._round != position:  # every round yields a token: the position moves on
            self.rounds.append(position)
            self._round, self._step = position, 0
            assert kv["full_attention"][0].shape[2] == position  # the drafter sees the whole cache
        token = self.continuation[position + 1 + self._step]
        self._step += 1
        wrong = self.wrong or (self.wrong_every and self._step % self.wrong_every == 0)
        vocab = self.model.config.text_config.vocab_size
        return mx.array([[(token + 1) % vocab if wrong else token]]), inputs_embeds[..., :1]

    def greedy(self, y):
        return y


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("cache_kind", [dict(one_tensor=True), dict(one_tensor=False), dict(kv_bits=8, kv_group_size=32)],
                         ids=["one-tensor", "two-tensor", "8-bit"])
def test_greedy_with_the_drafter_is_greedy_without(model, processor, drafter, k, cache_kind, verify_head):
    plain = greedy(model, processor, LONG, cache=model.make_cache(**cache_kind))
    drafted = greedy(model, processor, LONG, cache=model.make_cache(**cache_kind), draft_model=drafter,
                     num_draft_tokens=k)
    assert drafted == plain


@pytest.mark.parametrize("wrong", [False, True], ids=["oracle", "adversary"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_oracle_is_accepted_in_full_and_adversary_never(model, processor, k, wrong, verify_head):
    prompt = LONG
    plain = greedy(model, processor, prompt)
    scripted = Scripted(model, prompt + plain + [0] * 8, wrong=wrong)
    out = list(stream_generate(model, processor, prompt, max_tokens=24, temp=0.0, draft_model=scripted,
                               num_draft_tokens=k))
    assert [r.token for r in out] == plain
    last = out[-1]
    assert last.accepted_tokens == (0 if wrong else last.drafted_tokens) and last.drafted_tokens > 0
    assert [r.from_draft for r in out].count(True) == last.accepted_tokens
    # Each round drafts from a cache holding exactly the accepted tokens: all yielded but the last.
    expected, yielded = [], 1
    while yielded < 24:
        drafts = min(k, 24 - yielded - 1)
        if drafts:
            expected.append(len(prompt) + yielded - 1)
        yielded += 1 if wrong else drafts + 1
    assert scripted.rounds == expected


@pytest.mark.parametrize("cache_kind", [dict(one_tensor=True), dict(kv_bits=8, kv_group_size=32)],
                         ids=["one-tensor", "8-bit"])
def test_partly_accepted_rounds_trim_the_rest(model, processor, cache_kind, verify_head):
    """Rounds of 6 whose 3rd draft is wrong: 2 accepted, 4 trimmed, from wrapped sliding caches."""
    plain = greedy(model, processor, LONG, cache=model.make_cache(**cache_kind))
    mixed = Scripted(model, LONG + plain + [0] * 8, wrong_every=3)
    out = list(stream_generate(model, processor, LONG, max_tokens=24, temp=0.0, draft_model=mixed,
                               num_draft_tokens=6, cache=model.make_cache(**cache_kind)))
    assert [r.token for r in out] == plain
    assert 0 < out[-1].accepted_tokens < out[-1].drafted_tokens


def test_media_prompts_draft_after_prefill(model, processor, drafter, tmp_path):
    image = noise_image(64, 80, seed=1)
    sound = write_wav(tmp_path / "a.wav", 16_000, 0.5)
    for media in (dict(image=[image]), dict(audio=[str(sound)])):
        plain = greedy(model, processor, "describe this", **media)
        assert greedy(model, processor, "describe this", draft_model=drafter, num_draft_tokens=3, **media) == plain


def test_chat_keeps_drafting_across_turns(model, processor, drafter, verify_head):
    turns = ["hello there", "and then?", "the end"]
    plain, drafted = ChatSession(model, processor), ChatSession(model, processor)
    for text in turns:
        a = [r.token for r in plain.send(text, max_tokens=12, temp=0.0)]
        rs = list(drafted.send(text, max_tokens=12, temp=0.0, draft_model=drafter, num_draft_tokens=3))
        assert [r.token for r in rs] == a and rs[-1].drafted_tokens > 0
        assert drafted.cached_ids == plain.cached_ids[:len(drafted.cached_ids)]
        assert drafted.cache[0].offset == len(drafted.cached_ids)


def test_stopping_inside_a_round_leaves_only_what_was_seen(model, processor):
    prompt = LONG
    plain = greedy(model, processor, prompt)
    oracle = Scripted(model, prompt + plain + [0] * 8)
    cache = model.make_cache()
    steps = speculative_generate_step(model, oracle, prompt, cache, num_draft_tokens=6, max_tokens=24)
    seen = [next(steps)[0] for _ in range(4)]  # the first round accepts 6: stop inside it
    steps.close()
    assert seen == plain[:4]
    assert cache[0].offset <= len(prompt) + len(seen)


@pytest.mark.parametrize("k", [0, -1, 129, 2.5, True])
def test_bad_number_of_drafts_is_refused_before_any_work(model, processor, drafter, k):
    with pytest.raises(InputError, match="--num-draft-tokens"):
        next(stream_generate(model, processor, "hi", draft_model=drafter, num_draft_tokens=k))


def _chi_square_critical(df: int, alpha_z: float = 3.09) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty), z = 3.09: a 0.1% false alarm."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_keeps_the_target_distribution():
    """Over a tiny vocabulary with a draft distribution unlike the target's: the first emitted
    token follows p0, and the second (when the first draft is accepted) p1."""
    V, draws = 6, 4000
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(V), size=3).astype(np.float32)  # target rows for a block of k=2
    q = rng.dirichlet(np.ones(V) * 0.5, size=2).astype(np.float32)
    sampling = Sampling(temp=1.0)
    rows, qlog = mx.array(np.log(p)), mx.array(np.log(q))
    mx.random.seed(1)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(draws):
        proposed = [int(rng.choice(V, p=q[i] / q[i].sum())) for i in range(2)]
        n, bonus = _accept(sampling, rows, qlog, proposed)
        emitted = proposed[:n] + [bonus]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    for counts, target in ((first, p[0]), (second, p[1])):
        expected = counts.sum() * target / target.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < _chi_square_critical(V - 1), (counts, expected)
    # And not trivially: the drafts were accepted a fair share of the time.
    assert 0.2 * draws < second.sum() < draws


def test_sampling_with_a_drafter_is_seeded_and_stays_in_the_vocabulary(model, processor, drafter):
    def run():
        mx.random.seed(7)
        return [r.token for r in stream_generate(model, processor, LONG, max_tokens=16, temp=0.8, top_k=20,
                                                 draft_model=drafter, num_draft_tokens=3)]

    a, b = run(), run()
    assert a == b and len(a) == 16 and all(0 <= t < model.config.text_config.vocab_size for t in a)


def test_the_drafter_of_a_target_is_recorded_and_found(tmp_path, hf_checkpoint):
    """`--draft-model auto`: the Hub model's drafter, by repo id or from a Hugging Face cache
    folder; a conversion of it records it in config.json, and that record wins."""
    import json
    import shutil

    from mlx_gemma.checkpoint import convert
    from mlx_gemma.speculative import HUB_DRAFTERS, drafter_of

    hub, drafter = next(iter(HUB_DRAFTERS.items()))
    assert drafter_of(hub, tmp_path, {}) == drafter
    assert drafter_of(str(hf_checkpoint), hf_checkpoint, {}) is None
    snapshot = tmp_path / "hub" / ("models--" + hub.replace("/", "--")) / "snapshots" / "abc"
    shutil.copytree(hf_checkpoint, snapshot)
    out = convert(str(snapshot), str(tmp_path / "converted"))
    raw = json.loads((out / "config.json").read_text())
    assert raw["draft_model"] == drafter and drafter_of(str(out), out, raw) == drafter
    assert drafter_of(str(out), out, {"draft_model": "me/my-drafter"}) == "me/my-drafter"


def test_the_default_drafter_on_a_gpu_and_when_it_does_not_fit(monkeypatch, capsys, hf_checkpoint, drafter_checkpoint):
    """No --draft-model: the target's own drafter where drafting pays (a GPU backend; patched
    here), dropped rather than refusing a run that fits without it."""
    import re

    from mlx_gemma import backend
    from mlx_gemma.generate import build_parser, run
    from mlx_gemma.memory import parse_size

    monkeypatch.setattr(backend, "drafting_pays", lambda: True)
    monkeypatch.setitem(speculative.HUB_DRAFTERS, str(hf_checkpoint), str(drafter_checkpoint))
    base = ["--model", str(hf_checkpoint), "--prompt", "hi", "--max-tokens", "8", "--temp", "0"]
    run(build_parser().parse_args(base))
    assert "Draft: accepted" in capsys.readouterr().out
    run(build_parser().parse_args(base + ["--plan", "--draft-model", "none"]))
    lean = parse_size(re.search(r"^\| total \| ([^|]+) \|$", capsys.readouterr().out, re.M).group(1).replace(" ", ""))
    run(build_parser().parse_args(base + ["--memory-limit", f"{lean + 100_000}B"]))
    out = capsys.readouterr().out
    assert "Generation:" in out and "Draft:" not in out
