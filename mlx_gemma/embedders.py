"""Encoder-free front ends (spec 4.2, 5): raw patches and raw waveform frames -> decoder rows.

There is no vision or audio tower. An image patch (48x48x3 pixels) goes through
LayerNorm -> Dense -> LayerNorm -> + factorized (x, y) position rows -> LayerNorm, then the
shared multimodal projector (scale-free RMSNorm -> Linear). An audio frame (640 samples)
goes through the projector alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


class MultimodalEmbedder(nn.Module):
    """RMSNorm without weight, then a bias-free projection into the decoder's width."""

    def __init__(self, in_dims: int, out_dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dims, out_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        proj = self.embedding_projection
        # transformers casts the input to the projection's dtype before the norm.
        dtype = proj.scales.dtype if "scales" in proj else proj.weight.dtype
        normed = mx.fast.rms_norm(x.astype(dtype).astype(mx.float32), None, self.eps)
        return proj(normed.astype(dtype))


class VisionEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, cfg.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(cfg.mm_embed_dim)
        self.pos_embedding = mx.zeros((cfg.mm_posemb_size, 2, cfg.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(cfg.mm_embed_dim)

    def __call__(self, patches: mx.array, position_ids: mx.array) -> mx.array:
        """patches [N, T, patch_dim] in [0, 1]; position_ids [N, T, 2] as (x, y), -1 = padding."""
        dtype = self.pos_embedding.dtype
        # transformers casts the pixels to the weight dtype before the first LayerNorm, which
        # it computes in float32. Pixels sit far from zero (mean ~0.5): centring them first
        # (LayerNorm ignores a shift) keeps the fused kernel's variance exact (9e-6 -> 1e-7).
        x = patches.astype(dtype).astype(mx.float32)
        x = self.patch_ln1(x - x.mean(axis=-1, keepdims=True)).astype(dtype)
        h = self.patch_ln2(self.patch_dense(x))
        valid = (position_ids != -1).astype(h.dtype)[..., None]
        pos = mx.maximum(position_ids, 0)
        h = h + self.pos_embedding[pos[..., 0], 0] * valid[..., 0, :] \
              + self.pos_embedding[pos[..., 1], 1] * valid[..., 1, :]
        return self.pos_norm(h)
