"""MTP speculative decoding with Gemma 4's drafter (`gemma4_unified_assistant`, spec 8).

The drafter is a few decoder layers with queries only: they attend to the target's own cache
(the last layer of each type), so it needs no prefill and no cache of its own. One round:
draft K tokens from the last accepted one, verify all of them in one target pass, keep the
longest agreeing prefix plus the target's own next token, and trim the rest from the cache.
Greedy output is the target's greedy output; sampled output has the target's distribution
(standard speculative sampling: accept with min(1, p/q), else resample from (p - q)+).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .backend import lazy_verify_head
from .cache import DEFAULT_SLIDING_SLACK
from .config import TextConfig, _check_fields, _pick
from .errors import CheckpointError, ConfigError, InputError
from .model import DecoderLayer, RMSNorm, RoPE

MODEL_TYPE = "gemma4_unified_assistant"
DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx-vlm's block of 4; measured in benchmarks/speculative.py
# Where Google publishes the drafter of a target (spec 8); `--draft-model auto` looks here.
HUB_DRAFTERS = {"google/gemma-4-12B-it": "google/gemma-4-12B-it-assistant"}


@dataclass
class DrafterConfig:
    text_config: TextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    model_type: str = MODEL_TYPE
    quantization: Optional[dict] = None

    def __post_init__(self):
        _check_fields(self)
        if not self.tie_word_embeddings:  # Google's drafters tie theirs (transformers ties it by name)
            raise ConfigError("config.json: tie_word_embeddings=false (a separate drafter head) is not supported")
        t = self.text_config
        if self.use_ordered_embeddings and (t.vocab_size % self.num_centroids
                                            or self.centroid_intermediate_top_k > self.num_centroids):
            raise ConfigError(f"config.json: {self.num_centroids} centroids with top-k "
                              f"{self.centroid_intermediate_top_k} do not fit a vocabulary of {t.vocab_size}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "DrafterConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r} "
                              "(a Gemma 4 unified MTP drafter)")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError(f"{source}: no text_config object")
        try:
            text = dict(d["text_config"])
            # Every drafter layer reuses the target's K/V (transformers forces this); a KV-shared
            # layer's MLP is twice as wide when use_double_wide_mlp is set.
            text.pop("num_kv_shared_layers", None)
            if text.get("use_double_wide_mlp"):
                text["intermediate_size"] = 2 * text["intermediate_size"]
                text["use_double_wide_mlp"] = False
            top = {k: v for k, v in _pick(cls, d).items() if k != "text_config"}
            top["quantization"] = d.get("quantization") or d.get("quantization_config")
            return cls(text_config=TextConfig(**_pick(TextConfig, text)), **top)
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{source}: malformed config ({e})") from None


class SharedKV(NamedTuple):
    """What one drafter layer attends to: the target's keys/values and the query position."""

    keys: mx.array
    values: mx.array
    position: int


class DraftAttention(nn.Module):
    """Queries only: the keys and values are the target's (`SharedKV`), already masked by
    what they include (every key is in the past, spec 8)."""

    def __init__(self, cfg: TextConfig, spec):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, spec.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * spec.head_dim, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * spec.head_dim, cfg.hidden_size, bias=False)
        self.rope = RoPE(spec.rope)

    def __call__(self, x: mx.array, mask, kv: SharedKV) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), kv.position)
        o = mx.fast.scaled_dot_product_attention(q, kv.keys.astype(q.dtype), kv.values.astype(q.dtype),
                                                 scale=1.0, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MaskedEmbedding(nn.Module):
    """The ordered-embeddings head: score the centroids, keep the tokens of the top-k of them
    (each centroid owns vocab / centroids token ids), dot-product logits for those only."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        t = cfg.text_config
        self.top_k, self.num_centroids = cfg.centroid_intermediate_top_k, cfg.num_centroids
        self.centroids = nn.Linear(t.hidden_size, cfg.num_centroids, bias=False)
        self.token_ordering = mx.zeros((t.vocab_size,), dtype=mx.int32)

    def candidates(self, y: mx.array, table: nn.Module) -> tuple[mx.array, mx.array]:
        """(token ids [..., top_k * per_centroid], their logits)."""
        top = mx.argpartition(-self.centroids(y), self.top_k - 1, axis=-1)[..., :self.top_k]
        ids = self.token_ordering.reshape(self.num_centroids, -1)[top].reshape(*y.shape[:-1], -1)
        rows = table(ids)  # [..., n, hidden]: dequantized rows when the table is quantized
        return ids, (rows @ y[..., None])[..., 0]

    def __call__(self, y: mx.array, table: nn.Module) -> mx.array:
        """Full-vocabulary logits: every token outside the candidates gets min(candidates) - 1."""
        ids, logits = self.candidates(y, table)
        full = mx.full((*y.shape[:-1], self.token_ordering.size), logits.min() - 1, dtype=logits.dtype)
        return mx.put_along_axis(full, ids, logits, axis=-1)


class DraftModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the head only
        self.layers = [DecoderLayer(cfg, spec, attention=DraftAttention) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Drafter(nn.Module):
    """`logits, h_next = drafter(inputs_embeds, kv, position)` for one draft step.

    inputs_embeds = [target_embed(last token) (scaled by sqrt(hidden)), h_last], h_last the
    target's final-normed hidden state (or the previous step's h_next); kv = the target's
    `Model.shared_kv(cache)`; position = the number of cached tokens (the query is the token
    after them, the same for every step of a round). Logits have no softcap.
    """

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        t = config.text_config
        self.model = DraftModel(t)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(config)

    def hidden(self, inputs_embeds: mx.array, kv: dict, position: int) -> tuple[mx.array, mx.array]:
        """(final-normed drafter state y, h_next = post_projection(y))."""
        x = self.pre_projection(inputs_embeds.astype(self.model.norm.weight.dtype))
        for layer, spec in zip(self.model.layers, self.config.text_config.layers):
            keys, values = kv[spec.layer_type]
            x = layer(x, None, SharedKV(keys, values, position))
        y = self.model.norm(x)
        return y, self.post_projection(y)

    def logits(self, y: mx.array) -> mx.array:
        """The tied head (the drafter's own embedding table), or the ordered-embeddings head."""
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(y, self.model.embed_tokens)
        return self.model.embed_tokens.as_linear(y)

    def greedy(self, y: mx.array) -> mx.array:
        """The argmax token, without full-vocabulary logits for the ordered head."""
        if not self.config.use_ordered_embeddings:
            return mx.argmax(self.logits(y), axis=-1)
        ids, logits = self.masked_embedding.candidates(y, self.model.embed_tokens)
        return mx.take_along_axis(ids, mx.argmax(logits, axis=-1)[..., None], axis=-1)[..., 0]

    def __call__(self, inputs_embeds: mx.array, kv: dict, position: int) -> tuple[mx.array, mx.array]:
        y, h_next = self.hidden(inputs_embeds, kv, position)
        return self.logits(y), h_next


def rename(name: str) -> Optional[str]:
    """Checkpoint tensor name -> `Drafter` parameter name (the Hub's and mlx-vlm's are ours);
    None for what is not stored: rotary buffers, and a tied head."""
    if "rotary_emb." in name or name.endswith("embed_scale") or name == "lm_head.weight":
        return None
    return name


def read_config(path: Path) -> DrafterConfig:
    """The config of the drafter checkpoint directory `path` (what the memory plan reads too)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a drafter checkpoint directory)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: not a JSON object")
    return DrafterConfig.from_dict(raw, str(config_file))


def check_fits(config: DrafterConfig, target: TextConfig, source) -> None:
    """The drafter's widths against the target's: its input is the target's embedding and
    hidden state, its queries attend to the target's keys (spec 8)."""
    d, problems = config.text_config, []
    if config.backbone_hidden_size != target.hidden_size:
        problems.append(f"backbone_hidden_size {config.backbone_hidden_size} != the target's hidden_size "
                        f"{target.hidden_size}")
    if d.vocab_size != target.vocab_size:
        problems.append(f"vocab_size {d.vocab_size} != the target's {target.vocab_size}")
    if any(s.is_sliding for s in d.layers) and d.sliding_window != target.sliding_window:
        # its mask reaches back its own window over the target's sliding keys
        problems.append(f"sliding_window {d.sliding_window} != the target's {target.sliding_window}")
    dims = {s.layer_type: (s.head_dim, s.num_kv_heads) for s in target.layers}
    for s in d.layers:
        if s.layer_type not in dims:
            problems.append(f"layer {s.index} is {s.layer_type}, which the target has none of")
        elif s.head_dim != dims[s.layer_type][0]:
            problems.append(f"{s.layer_type} head dim {s.head_dim} != the target's {dims[s.layer_type][0]}")
        elif d.num_attention_heads % dims[s.layer_type][1]:
            problems.append(f"{d.num_attention_heads} query heads do not share the target's "
                            f"{dims[s.layer_type][1]} {s.layer_type} kv heads evenly")
    if problems:
        raise CheckpointError(f"{source}: this drafter does not fit the target ({'; '.join(dict.fromkeys(problems))})")


def load_drafter(path_or_repo: Union[str, Path], dtype: Union[mx.Dtype, str, None] = "auto",
                 target=None) -> Drafter:
    """A `gemma4_unified_assistant` checkpoint (Hub or mlx-vlm layout, quantized or not);
    checked against the `target` model when given. `dtype` as in `load`."""
    from .backend import load_dtype, set_dtype, split_matmuls
    from .loading import build_model, load_weights, resolve_model_path

    path = resolve_model_path(path_or_repo)
    config = read_config(path)
    dtype = load_dtype(bool(config.quantization), dtype)
    if target is not None:
        check_fits(config, target.config.text_config, path)
    if target is not None and hasattr(target, "drafts_here"):  # pipeline stages: one holds the drafter
        from .distributed import place_drafter

        return place_drafter(target, lambda: load_drafter(path, dtype))
    weights = load_weights(path, rename=rename)
    if "masked_embedding.token_ordering" in weights:  # transformers stores it as int64
        weights["masked_embedding.token_ordering"] = weights["masked_embedding.token_ordering"].astype(mx.int32)
    drafter = build_model(config, weights, path, Drafter)
    if dtype is not None:
        set_dtype(drafter, dtype)
    split_matmuls(drafter)
    try:
        mx.eval(drafter.parameters())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    return drafter


def drafter_of(model: str, path: Path, config_raw: dict) -> Optional[str]:
    """The drafter of a target: the one its config.json records (`draft_model`, written by our
    conversions), else Google's for the Hub repo `model` names (as a repo id, or as a snapshot
    folder `models--owner--name/...` of the Hugging Face cache)."""
    if config_raw.get("draft_model"):
        return config_raw["draft_model"]
    repo = str(model).rstrip("/")
    for part in Path(path).resolve().parts:
        if part.startswith("models--"):
            repo = part.removeprefix("models--").replace("--", "/", 1)
    return HUB_DRAFTERS.get(repo)


def find_drafter(model: str, path: Path, config_raw: dict, download: bool) -> Optional[Path]:
    """The directory of `drafter_of` the target: from the local Hugging Face cache, or
    downloaded when `download`; None when there is none, or it is not here and not to be fetched."""
    from .loading import resolve_model_path

    name = drafter_of(model, path, config_raw)
    if not name:
        return None
    if download or Path(name).expanduser().is_dir():
        return resolve_model_path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache
        return None


# --- the draft / verify loop -----------------------------------------------------------------


def check_num_draft_tokens(k, cache: Optional[list] = None) -> None:
    """K drafts are trimmed back after a round in which none is accepted: the sliding-window
    caches guarantee that for up to their slack beyond the window."""
    limit = min((c.slack for c in cache if hasattr(c, "slack")), default=DEFAULT_SLIDING_SLACK) \
        if cache is not None else DEFAULT_SLIDING_SLACK
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise InputError(f"--num-draft-tokens {k!r}: must be a whole number from 1 to {limit} (what the "
                         "sliding-window cache can take back)")


def _log_normalize(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def draft(model, drafter: Drafter, cache: list, y: mx.array, h: mx.array, k: int, propose: Callable) -> list:
    """`k` drafts after the token `y` (not yet in `cache`), as one lazy graph: each drafter step reads
    the target's K/V and the last hidden state (`h`, then its own); `propose(y_d, drafts so far)`
    picks a draft from the drafter's output."""
    embed = model.language_model.model.embed
    kv, position = model.shared_kv(cache), cache[0].offset
    drafts, tok = [], y.reshape(1, 1)
    for _ in range(k):
        e = embed(tok)
        y_d, h = drafter.hidden(mx.concatenate([e, h.astype(e.dtype)], axis=-1), kv, position)
        tok = propose(y_d, drafts).reshape(1, 1)
        drafts.append(tok.reshape(1))
    return drafts


def speculative_decode(model, drafter: Drafter, first: tuple, cache: list, *, num_draft_tokens: int,
                       history: list, max_tokens: int, sampler: Optional[Callable] = None,
                       sampling=None, logits_processors: Sequence = (),
                       stats: Optional[dict] = None) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs, from_draft) from the prompt's last logits and hidden state
    (`first`), `cache` holding the prompt (`history` its ids).

    With `sampling` (a `generation.Sampling`, temperature > 0) drafts are sampled from the drafter's distribution and
    accepted by speculative sampling; otherwise each draft is the drafter's argmax and is kept
    when the target's `sampler` (default argmax) picks the same token. Between rounds the
    cache holds exactly the accepted tokens; a caller that stops early finds it holding the
    yielded tokens at most. `stats` gets "drafted" and "accepted" counts.
    """
    check_num_draft_tokens(num_draft_tokens, cache)
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0)
    stats.setdefault("accepted", 0)
    past = mx.array(history, dtype=mx.int32)  # what the logits processors see
    guided = any(getattr(p, "guides_drafts", False) for p in logits_processors)  # reading each draft pays

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        for p in logits_processors:
            logits = p(tokens, logits)
        return _log_normalize(logits)

    logits, hidden = first
    logprobs = process(past, logits[:, -1])
    y = (sampler(logprobs) if sampling is None else mx.random.categorical(sampling.logprobs(logprobs))).reshape(1)
    h = hidden[:, -1:]
    start = cache[0].offset  # the cache holds the prompt; each yield adds a token after it
    yielded = 0
    try:
        yield int(y.item()), logprobs[0], False
        yielded = 1
        while yielded < max_tokens:
            past = mx.concatenate([past, y])
            k = min(num_draft_tokens, max_tokens - yielded - 1)
            draft_lp = []

            def propose(y_d: mx.array, drafts: list) -> mx.array:
                if sampling is None and not guided:
                    return drafter.greedy(y_d)
                if sampling is None:  # a constraint masks the drafts too, so none is wasted on a masked token
                    return mx.argmax(process(mx.concatenate([past] + drafts), drafter.logits(y_d)[:, -1]), axis=-1)
                # Any proposal keeps the output exact, as long as q is what drafts are drawn from.
                q = sampling.logprobs(process(mx.concatenate([past] + drafts),
                                              drafter.logits(y_d)[:, -1].astype(mx.float32)))
                draft_lp.append(q)
                return mx.random.categorical(q)

            drafts = draft(model, drafter, cache, y, h, k, propose)
            block = mx.concatenate([y] + drafts)
            logits, hidden = model(block[None], cache=cache, mm_token_type_ids=mx.zeros((1, k + 1), mx.int32),
                                   return_hidden=True)

            def row(i: int, logits_i: mx.array) -> mx.array:
                # Row i predicts the token after block[i]: its processors see the drafts before it.
                return process(mx.concatenate([past, block[1:i + 1]]), logits_i)

            if sampling is None and lazy_verify_head():
                proposed, rows, n = block[1:].tolist(), [], 0
                while True:  # one row of the head at a time, up to the first disagreement
                    rows.append(row(n, model.language_model.head(hidden[:, n])))
                    bonus = int(sampler(rows[-1]).item())
                    if n == k or bonus != proposed[n]:
                        break
                    n += 1
            elif sampling is None:
                rows = [row(i, logits[:, i]) for i in range(k + 1)]
                read = mx.concatenate([sampler(mx.concatenate(rows)).astype(mx.int32),
                                       block[1:].astype(mx.int32)]).tolist()
                target, proposed = read[:k + 1], read[k + 1:]
                n = 0
                while n < k and proposed[n] == target[n]:
                    n += 1
                bonus = target[n]
            else:
                rows = [row(i, logits[:, i]) for i in range(k + 1)]
                proposed = block[1:].tolist()
                n, bonus = _accept(sampling, mx.concatenate(rows), mx.concatenate(draft_lp) if k else None, proposed)
            for c in cache:
                c.trim(k - n)
            stats["drafted"] += k
            stats["accepted"] += n
            for i in range(n):
                yield proposed[i], rows[i][0], True
                yielded += 1
            yield bonus, rows[n][0], False
            yielded += 1
            past = mx.concatenate([past, block[1:n + 1]])
            y, h = mx.array([bonus], dtype=mx.int32), hidden[:, n:n + 1]
    finally:
        # A caller that stops inside a round (an end-of-turn token among accepted drafts):
        # the cache must not hold tokens it never saw.
        extra = cache[0].offset - (start + yielded)
        if extra > 0:
            for c in cache:
                c.trim(extra)


def _accept(sampling, rows: mx.array, q: Optional[mx.array], proposed: list) -> tuple[int, int]:
    """Speculative sampling over one verified block: (accepted drafts, the next token)."""
    p = sampling.logprobs(rows)  # [k + 1, V]
    k = len(proposed)
    if k:
        idx = mx.array(proposed)[:, None]
        ratio = mx.exp(mx.take_along_axis(p[:k], idx, -1) - mx.take_along_axis(q, idx, -1))[:, 0]
        accept = (mx.random.uniform(shape=(k,)) < ratio).tolist()
        n = accept.index(False) if False in accept else k
    else:
        n = 0
    if n == k:
        return n, int(mx.random.categorical(p[k]).item())
    residual = mx.maximum(mx.exp(p[n]) - mx.exp(q[n]), 0)
    return n, int(mx.random.categorical(mx.log(residual)).item())
