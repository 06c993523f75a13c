"""The Gemma 4 unified decoder (spec 2): 5 sliding : 1 global layers, tied head, softcap.

Module and parameter names follow the checkpoint as mlx-vlm lays it out
(`language_model.model.layers.N...`, `vision_embedder.*`, `embed_vision.*`, `embed_audio.*`),
so checkpoints move between the two without renaming.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import DEFAULT_SLIDING_SLACK, GlobalCache, SlidingWindowCache, vision_blocks
from .config import LayerSpec, ModelConfig, RopeSpec, TextConfig, whole_groups
from .embedders import MultimodalEmbedder, VisionEmbedder
from .errors import InputError
from .prompt import token_types


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: x / rms(x) * w, the weight used as is (not 1 + w).

    transformers multiplies by the weight in float32 and casts afterwards; running the fused
    kernel on float32 input keeps that rounding in bfloat16 too (spec 2.2).
    """

    def __init__(self, dims: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32) if "weight" in self else None
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)

    def rescale(self, normed: mx.array) -> mx.array:
        """The weight multiply alone, for input that is already normalised."""
        return (normed.astype(mx.float32) * self.weight.astype(mx.float32)).astype(normed.dtype)


class RoPE(nn.Module):
    """Rotate-half RoPE over the whole head; proportional RoPE rotates only the first
    `rotated_pairs` frequency slots, with exponents over the full head dim (spec 2.5)."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.dims = spec.head_dim
        self.base = spec.theta
        self._freqs = None
        if spec.is_partial:
            exponents = mx.arange(0, 2 * spec.rotated_pairs, 2, dtype=mx.float32) / spec.head_dim
            still = mx.full((spec.head_dim // 2 - spec.rotated_pairs,), mx.inf, dtype=mx.float32)
            self._freqs = mx.concatenate([spec.theta ** exponents, still])

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        if self._freqs is None:
            return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)


def attend(q: mx.array, k, v, mask, cache):
    """Attention (scale 1.0: q_norm and k_norm take the place of 1/sqrt(d)) over keys/values as
    the cache stores them. `v` may be a list of arrays (the packed global cache, spec 9): each
    is weighted by the same probabilities, and a list of outputs comes back. Quantized storage
    is read as codes, scales and biases by quantized_matmul: dequantizing first would write and
    read the whole cache again each step."""
    if isinstance(v, list):
        return folded_attention(q, k, v, mask, cache.group_size, cache.bits)
    if isinstance(k, tuple):
        return folded_attention(q, k, [v], mask, cache.group_size, cache.bits)[0]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


def _matmul(x: mx.array, w, transpose: bool, group_size: int, bits: int) -> mx.array:
    """x @ w (w.T with `transpose`) for w an array or (codes, scales, biases)."""
    if isinstance(w, tuple):
        return mx.quantized_matmul(x, *w, transpose=transpose, group_size=group_size, bits=bits)
    return x @ (w.swapaxes(-1, -2) if transpose else w)


def folded_attention(q: mx.array, k, values: list, mask, group_size: int, bits: int) -> list:
    """[softmax(q k^T + mask) v for v in values], each array (or quantized tuple) read as stored.
    The query heads that share a kv head are folded into rows, [B, kv heads, heads per kv head
    * L, D], so each matmul multiplies by the cache as it is. mlx-lm's quantized attention
    broadcasts the cache over a heads axis instead, which the CPU kernel materialises: about 33
    times the 12B's 8-bit global cache per step (peak and time: `python -m benchmarks.kv_attention`)."""
    B, heads, L, D = q.shape
    kv_heads = (k[0] if isinstance(k, tuple) else k).shape[1]
    rows = q.reshape(B, kv_heads, heads // kv_heads * L, D)
    scores = _matmul(rows, k, True, group_size, bits)
    if mask is not None:
        scores = scores.reshape(B, kv_heads, heads // kv_heads, L, -1)
        if isinstance(mask, str):  # "causal": the last query sees the last key
            n = scores.shape[-1]
            mask = mx.arange(n - L, n)[:, None] >= mx.arange(n)[None]
        if mask.ndim == 4:  # [B, 1, L, keys]: one mask for every head
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min) if mask.dtype == mx.bool_ else scores + mask
        scores = scores.reshape(B, kv_heads, heads // kv_heads * L, -1)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return [_matmul(probs, v, False, group_size, bits).reshape(B, heads, L, -1) for v in values]


class Rows:
    """One layer's caches of sequences decoded together, a row each: the projections and the MLP
    run once over every row (a step reads the weights once, however many sequences it serves),
    attention runs per row over that sequence's own cache (its offset, window state and storage)."""

    def __init__(self, caches: list):
        self.caches = caches


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h, d = cfg.hidden_size, spec.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, spec.num_kv_heads, d
        self.k_eq_v, self.spec = spec.k_eq_v, spec
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        if not spec.k_eq_v:
            self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)
        self.rope = RoPE(spec.rope)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k_raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        # k_eq_v: the values are the *raw* key projection, normalised without scale (spec 2.4).
        v_raw = k_raw if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_norm(v_raw).transpose(0, 2, 1, 3)
        k = self.k_norm(k_raw).transpose(0, 2, 1, 3)
        if isinstance(cache, Rows):  # each row its own sequence: its own cache, offset and mask
            o = mx.concatenate([self._attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], m, c)
                                for b, (c, m) in enumerate(zip(cache.caches, mask))])
        else:
            o = self._attend(q, k, v, mask, cache)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """RoPE at the cache's offset, the cache updated, attention over what it holds."""
        q, k = self.rope(q, cache.offset), self.rope(k, cache.offset)
        if getattr(cache, "one_tensor", False):
            # One tensor's worth of keys and values; only new tokens are roped.
            scored, rotated_n = cache.update_and_fetch_packed(self.pack(k, v, cache))
            o_scored, o_rotated = attend(self.packed_query(q, cache), scored, [scored, rotated_n], mask, cache)
            return self._merge(o_rotated[..., :self._rotated_width], o_scored[..., :self._passing_width])
        k, v = cache.update_and_fetch(k, v)
        return attend(q, k, v, mask, cache)

    # The packed global cache (spec 9, `LayerSpec.packed_widths`). Partial RoPE rotates dims
    # [0, rp) and their rotate-half partners [d/2, d/2 + rp); the other dims pass through, where
    # K = N * w_k. Per token it stores `scored` = [N over the passing dims, K over the rotated
    # ones] (head_dim wide) and N over the rotated dims. Scores read `scored` once, with the
    # query rewritten to match; the values are N, i.e. `scored`'s first part beside the second
    # array. So a step reads 2 * head_dim + 2 * rp values per token (1,152 for the 12B) of the
    # 640 stored, where keys and values apart would store and read 1,024.

    @property
    def _rotated_width(self) -> int:
        return 2 * self.spec.rope.rotated_pairs

    @property
    def _passing_width(self) -> int:
        return self.head_dim - self._rotated_width

    def _rotated(self, x: mx.array) -> mx.array:
        half, rp = self.head_dim // 2, self.spec.rope.rotated_pairs
        return mx.concatenate([x[..., :rp], x[..., half:half + rp]], axis=-1)

    def _passing(self, x: mx.array) -> mx.array:
        half, rp = self.head_dim // 2, self.spec.rope.rotated_pairs
        return mx.concatenate([x[..., rp:half], x[..., half + rp:]], axis=-1)

    def _merge(self, rotated: mx.array, passing: mx.array) -> mx.array:
        """The head dims in order again, from `_rotated` and `_passing` parts."""
        half, rp = self.head_dim // 2, self.spec.rope.rotated_pairs
        return mx.concatenate([rotated[..., :rp], passing[..., :half - rp], rotated[..., rp:],
                               passing[..., half - rp:]], axis=-1)

    @staticmethod
    def _groups(x: mx.array, cache) -> mx.array:
        """x zero-padded to whole quantization groups of the cache (none for the 12B's widths)."""
        extra = whole_groups(x.shape[-1], cache.bits and cache.group_size) - x.shape[-1]
        return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x

    def pack(self, k: mx.array, v: mx.array, cache) -> list:
        """The new tokens' [scored, rotated N] (v is N)."""
        scored = [self._groups(self._passing(v), cache), self._groups(self._rotated(k), cache)]
        return [mx.concatenate(scored, axis=-1), self._groups(self._rotated(v), cache)]

    def packed_query(self, q: mx.array, cache) -> mx.array:
        """q' with q'.scored = q.K: [q * w_k over the passing dims, q over the rotated ones].
        q * w_k is formed in float32 and rounded once; N is stored rounded, so in bfloat16 the
        scores differ from q . bf16(N * w_k) by rounding (spec 9 caveat). Only the passing dims
        are scaled: k_norm.rescale of the whole query holds one more query-sized array at the
        layer's peak (measured: 1.04-1.12x the plan instead of 0.95x)."""
        w = self._passing(self.k_norm.weight).astype(mx.float32)
        passing = (self._passing(q).astype(mx.float32) * w).astype(q.dtype)
        return mx.concatenate([self._groups(passing, cache), self._groups(self._rotated(q), cache)], axis=-1)

    def cached_kv(self, cache, last: Optional[int] = None) -> tuple[mx.array, mx.array]:
        """Keys and values of the (newest `last`) cached tokens, in time order, as this layer
        attends to them: what the MTP drafter reads (spec 8)."""
        stored = cache.fetch(last)
        if not getattr(cache, "one_tensor", False):
            return stored[0], stored[1]
        scored, rotated_n = stored
        v = self._merge(rotated_n[..., :self._rotated_width], scored[..., :self._passing_width])
        start = whole_groups(self._passing_width, cache.bits and cache.group_size)
        k_rotated = scored[..., start:start + self._rotated_width]
        return self._merge(k_rotated, self._passing(self.k_norm.rescale(v))), v


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # gelu_approx is the tanh form, i.e. gelu_pytorch_tanh.
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, attention: type = Attention):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = attention(cfg, spec)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, h: mx.array, mask, cache) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), mask, cache))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        # A learned per-layer scale on the whole residual stream, after both adds.
        return h * self.layer_scalar.astype(h.dtype)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, ids: mx.array) -> mx.array:
        # The stream runs in the norms' dtype: a quantized table dequantizes to its scales' dtype,
        # which may be narrower (backend.set_dtype).
        h = self.embed_tokens(ids).astype(self.norm.weight.dtype)
        # transformers casts sqrt(hidden) to the weight dtype first: 62.0, not 61.97, in bf16.
        return h * mx.array(self.config.embed_scale, mx.float32).astype(h.dtype)

    @property
    def held(self) -> list:
        """(layer, spec) of the layers this process runs: all of them, or the contiguous range
        of a pipeline stage (distributed.pipeline leaves None for the other stages' layers)."""
        return [(layer, spec) for layer, spec in zip(self.layers, self.config.layers) if layer is not None]

    def __call__(self, h: mx.array, cache: list, blocks: Optional[np.ndarray] = None,
                 vision_mask: str = "generate") -> mx.array:
        return self.norm(self.run_layers(h, cache, blocks, vision_mask))

    def run_layers(self, h: mx.array, cache: list, blocks: Optional[np.ndarray] = None,
                   vision_mask: str = "generate") -> mx.array:
        """`blocks`: vision block ids of the new tokens. With vision_mask "generate" (the
        intended semantics, spec 3) only sliding layers see a whole block, clipped by the
        window; with "forward" (transformers' forward()) every layer does, unclipped."""
        for (layer, _), mask, c in zip(self.held, self.masks(h.shape[1], cache, blocks, vision_mask), cache):
            h = layer(h, mask, c)
        return h

    def masks(self, L: int, cache: list, blocks: Optional[np.ndarray] = None, vision_mask: str = "generate") -> list:
        """The attention mask of each held layer for L new tokens (run_layers' `blocks` and
        `vision_mask`)."""
        forward = vision_mask == "forward"
        by_type = {}
        for (_, spec), c in zip(self.held, cache):
            # Layers of one type share offset and window, hence one mask per type.
            if spec.layer_type not in by_type:
                overlay = blocks if (spec.is_sliding or forward) else None
                by_type[spec.layer_type] = c.make_mask(L, overlay, unclipped=forward)
        return [by_type[spec.layer_type] for _, spec in self.held]


    def run_rows(self, h: mx.array, caches: list) -> mx.array:
        """`h` [B, L, hidden]: L new tokens of each of B sequences, `caches[b]` sequence b's
        caches (no media: decode steps and draft blocks)."""
        L, masks = h.shape[1], [{} for _ in caches]
        for i, (layer, spec) in enumerate(self.held):
            rows = [c[i] for c in caches]
            for m, c in zip(masks, rows):
                if spec.layer_type not in m:
                    m[spec.layer_type] = c.make_mask(L)
            h = layer(h, [m[spec.layer_type] for m in masks], Rows(rows))
        return h


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.softcap = cfg.final_logit_softcapping

    def __call__(self, h: mx.array, cache: list, logits_to_keep: int = 0,
                 blocks: Optional[np.ndarray] = None, vision_mask: str = "generate", return_hidden: bool = False):
        h = self.model(h, cache, blocks, vision_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.head(h)
        return (logits, h) if return_hidden else logits

    def head(self, h: mx.array) -> mx.array:
        """Logits of final-normed hidden states: the tied embedding, then the softcap."""
        logits = self.model.embed_tokens.as_linear(h)
        if self.softcap:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return logits


VISION_MASKS = ("generate", "forward")


class Model(nn.Module):
    """`logits = model(input_ids, cache=None)`, input_ids [batch, length] -> [batch, length, vocab].

    Media go in as transformers' processor arrays (`model(ids, pixel_values=...,
    image_position_ids=...)`, what fine-tuning and evaluation use) or as soft tokens already
    embedded (`soft_tokens=model.embed_media(...)`, what chunked prefill uses): either way
    they replace the rows of their placeholder tokens, and image / video-frame tokens attend
    to their whole block (`vision_mask`, spec 3).
    """

    compiles_decode = True  # generation.compiled_decode may trace a decode step

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_mask = "generate"
        self.language_model = LanguageModel(config.text_config)
        if config.vision_config is not None:
            self.vision_embedder = VisionEmbedder(config.vision_config)
            self.embed_vision = MultimodalEmbedder(config.vision_config.output_proj_dims,
                                                   config.text_config.hidden_size,
                                                   config.vision_config.rms_norm_eps)
        if config.audio_config is not None:
            self.embed_audio = MultimodalEmbedder(config.audio_config.audio_embed_dim,
                                                  config.text_config.hidden_size,
                                                  config.audio_config.rms_norm_eps)

    @property
    def layers(self):
        return self.language_model.model.layers

    def make_cache(self, sliding_slack: int = DEFAULT_SLIDING_SLACK, one_tensor: bool = True,
                   kv_bits: Optional[int] = None, kv_group_size: int = 64, quantized_kv_start: int = 0) -> list:
        """Per-layer caches (of the layers held here). Global layers: one tensor's worth on k_eq_v
        layers with partial RoPE (`one_tensor`, spec 9) and/or group-quantized storage (`kv_bits`)
        from `quantized_kv_start` tokens on."""
        return [SlidingWindowCache(s.window, sliding_slack) if s.is_sliding else
                GlobalCache(one_tensor and s.packs_kv, kv_bits, kv_group_size, quantized_kv_start)
                for _, s in self.language_model.model.held]

    def embed_text(self, input_ids: mx.array) -> mx.array:
        # Placeholder ids may lie outside the vocabulary: embed pad instead (spec 2.1).
        pad = self.config.text_config.pad_token_id
        placeholder = mx.zeros(input_ids.shape, dtype=mx.bool_)
        for tid in self.config.multimodal_token_ids:
            placeholder = placeholder | (input_ids == tid)
        return self.language_model.model.embed(mx.where(placeholder, pad, input_ids))

    def embed_media(self, pixel_values=None, image_position_ids=None, pixel_values_videos=None,
                    video_position_ids=None, input_features=None, input_features_mask=None,
                    num_frames_per_video=None) -> dict:
        """Soft tokens {placeholder id: rows [n, hidden]} from transformers' processor arrays
        (numpy or mx), padding dropped: the rows fill that id's placeholders in prompt order
        (so `num_frames_per_video` is not needed; it is accepted with the processor's output)."""
        cfg, soft = self.config, {}
        for token, pixels, positions in ((cfg.image_token_id, pixel_values, image_position_ids),
                                         (cfg.video_token_id, pixel_values_videos, video_position_ids)):
            if pixels is None:
                continue
            positions = np.asarray(positions).reshape(-1, 2)
            # Padding rows are dropped before the embedder (every step is per row), not after.
            keep = mx.array(np.flatnonzero((positions != -1).all(axis=-1)))
            patches = mx.array(pixels).reshape(-1, pixels.shape[-1])[keep]
            soft[token] = self.embed_vision(self.vision_embedder(patches, mx.array(positions)[keep]))
        if input_features is not None:
            mask = np.ones(input_features.shape[:2], bool) if input_features_mask is None \
                else np.asarray(input_features_mask)
            keep = mx.array(np.flatnonzero(mask.reshape(-1)))
            frames = mx.array(input_features).reshape(-1, input_features.shape[-1])[keep]
            soft[cfg.audio_token_id] = self.embed_audio(frames)
        return soft

    def embed_inputs(self, input_ids: mx.array, soft_tokens: Optional[dict] = None) -> mx.array:
        """Token embeddings with each placeholder row replaced by its soft token."""
        h = self.embed_text(input_ids)
        if not soft_tokens:  # decode steps: reading the ids on the host would wait for the sampler
            return h
        ids = np.asarray(input_ids).reshape(-1)
        soft_tokens = {t: r for t, r in soft_tokens.items() if r.shape[0] or np.any(ids == t)}
        if not soft_tokens:
            return h
        index, rows, start = np.zeros(ids.size, np.int32), [], 0
        for token, r in soft_tokens.items():
            where = np.flatnonzero(ids == token)
            if where.size != r.shape[0]:
                raise InputError(f"prompt: {where.size} placeholder tokens (id {token}) for "
                                 f"{r.shape[0]} soft tokens")
            index[where] = start + np.arange(where.size)
            rows.append(r.astype(h.dtype))
            start += where.size
        is_soft = mx.array(np.isin(ids, list(soft_tokens)).reshape(input_ids.shape))[..., None]
        return mx.where(is_soft, mx.concatenate(rows)[mx.array(index)].reshape(h.shape), h)

    def __call__(self, input_ids: Optional[mx.array] = None, cache: Optional[list] = None,
                 inputs_embeds: Optional[mx.array] = None, logits_to_keep: int = 0, *,
                 soft_tokens: Optional[dict] = None, mm_token_type_ids=None, return_hidden: bool = False,
                 **media) -> mx.array:
        """Logits for the new tokens; `cache` is updated in place. `logits_to_keep=n` computes
        only the last n positions' logits (prefill needs just the last one).
        `mm_token_type_ids` (for the vision blocks) defaults to what `input_ids` say.
        `return_hidden`: (logits, final-normed hidden states), what the MTP drafter reads."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if media:
            soft_tokens = self.embed_media(**media)
        h = self.embed_inputs(input_ids, soft_tokens) if inputs_embeds is None else inputs_embeds
        if mm_token_type_ids is None and input_ids is not None and h.shape[1] > 1:
            mm_token_type_ids = token_types(input_ids, self.config)
        blocks = None if mm_token_type_ids is None else vision_blocks(np.asarray(mm_token_type_ids))
        if cache is None:
            cache = self.make_cache()
        return self.language_model(h, cache, logits_to_keep, blocks, self.vision_mask, return_hidden)

    def step_rows(self, ids: mx.array, caches: list, return_hidden: bool = False):
        """Logits [B, L, vocab] of L new tokens for each of B sequences decoded together
        (`ids` [B, L], `caches[b]` sequence b's caches, each updated in place)."""
        lm = self.language_model
        h = lm.model.norm(lm.model.run_rows(self.embed_text(ids), caches))
        logits = lm.head(h)
        return (logits, h) if return_hidden else logits

    def shared_kv(self, cache: list) -> dict:
        """{layer type: (keys, values)} of the last layer of each type, what Gemma 4's MTP
        drafter attends to (spec 8): every cached token of the global layer, the newest
        `window + 1` of the sliding one (all earlier than the drafter's query). transformers'
        drafter mask keeps keys at distance <= window (`abs(q - kv) <= sliding_window`, flipped
        onto the newest keys), i.e. window + 1 of them, one more than a target query sees."""
        last = {s.layer_type: s for s in self.config.text_config.layers}  # the last one of each type
        held = [s.index for _, s in self.language_model.model.held]  # what `cache` has, in order
        return {t: self.layers[s.index].self_attn.cached_kv(cache[held.index(s.index)], s.window and s.window + 1)
                for t, s in last.items()}


# --- checkpoint names ---------------------------------------------------------------------------

# Kept beside the model whose names they map to: loading, distributed loading and adapters all
# rename through here, and none of them needs the others for it.
_VISION_MODULES = ("patch_ln1", "patch_ln2", "patch_dense", "pos_embedding", "pos_norm")


def sanitize(name: str) -> Optional[str]:
    """Checkpoint tensor name -> parameter name of `Model`; None for tensors not stored.

    Accepted layouts: the Hub's (`model.language_model.*`, `model.vision_embedder.*`,
    `model.embed_vision.embedding_projection`), transformers' in-memory names
    (`model.embed_vision.patch_ln1`, `model.embed_vision.multimodal_embedder.*`), and mlx-vlm's /
    ours (`language_model.model.*`)."""
    if name.endswith("rotary_emb.inv_freq") or "rotary_emb." in name or name in ("lm_head.weight",
                                                                                 "model.lm_head.weight"):
        return None  # recomputed buffers; the head is tied to the embedding
    name = name.removeprefix("model.")
    if name.startswith("language_model.") and not name.startswith("language_model.model."):
        name = "language_model.model." + name[len("language_model."):]
    if name.startswith("embed_vision.multimodal_embedder."):
        name = "embed_vision." + name[len("embed_vision.multimodal_embedder."):]
    for m in _VISION_MODULES:
        if name.startswith(f"embed_vision.{m}"):
            name = "vision_embedder." + name[len("embed_vision."):]
    return name
