"""Quantization policy (which tensor, how many bits) and the quantizer itself.

The policy is decided by measurement (benchmarks/quant_policy.py, table in the README).
The quantizer is MLX's affine / mxfp4 group quantization, except that a group whose values
already lie on a 2^bits-level grid (quantization-aware-trained weights) gets that grid back
exactly, so its dequantized values equal the input bit for bit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import InputError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODES = ("affine", "mxfp4")
RECIPES = ("default", "quality", "small")

# Parameter paths (module names) by role, as in model.py.
EMBEDDING = "language_model.model.embed_tokens"
MULTIMODAL_PREFIXES = ("vision_embedder.", "embed_vision.", "embed_audio.")
# The multimodal projectors (embedders.MultimodalEmbedder) cast their input to the dtype of
# their scales, which mxfp4 stores as uint8: quantized_matmul then refuses every image and
# audio prompt. Under mxfp4 they are stored affine instead.
PROJECTORS = ("embed_vision.embedding_projection", "embed_audio.embedding_projection")
# The MTP drafter's modules (speculative.Drafter; no target path starts so), its embedding (the
# tied head) and the centroids that pick the ordered head's candidates.
DRAFTER_PREFIXES = ("model.", "pre_projection", "post_projection", "masked_embedding.")
DRAFTER_EMBEDDING = "model.embed_tokens"
CENTROIDS = "masked_embedding.centroids"
MODE_GROUP_SIZE = {"affine": 64, "mxfp4": 32}  # the group size a mode gets when none is asked for


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: Optional[int] = None  # None: the mode's own (MODE_GROUP_SIZE)
    mode: str = "affine"

    def __post_init__(self):
        if self.group_size is None and self.mode in MODE_GROUP_SIZE:
            object.__setattr__(self, "group_size", MODE_GROUP_SIZE[self.mode])
        if self.mode not in MODES:
            raise InputError(f"--mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "mxfp4" and (self.bits, self.group_size) != (4, 32):
            raise InputError(f"--mode mxfp4 needs --bits 4 --group-size 32 (got {self.bits} and "
                             f"{self.group_size}); affine takes bits {BITS} with group sizes {GROUP_SIZES}")
        if self.mode == "affine" and (self.bits not in BITS or self.group_size not in GROUP_SIZES):
            raise InputError(f"--bits {self.bits} --group-size {self.group_size}: not supported; valid "
                             f"are bits {'/'.join(map(str, BITS))} with group size "
                             f"{'/'.join(map(str, GROUP_SIZES))} (affine), or 4 with 32 (mxfp4)")

    def entry(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def bits_per_weight(self, float_bytes: int = 2) -> float:
        """Stored bits per weight: the codes plus a scale and a bias per group in the weights'
        floating dtype (mxfp4: an 8-bit shared exponent per group, no bias)."""
        extra = 8 if self.mode == "mxfp4" else 2 * 8 * float_bytes
        return self.bits + extra / self.group_size


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise InputError(f"--recipe: {recipe!r} is not one of {', '.join(RECIPES)}")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    """The quantization flags shared by `quantize` and `convert -q`."""
    p.add_argument("--bits", type=int, choices=BITS, default=4, help="bits per quantized weight")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="weights per scale (default: 64 for affine, 32 for mxfp4, the only size it has)")
    p.add_argument("--mode", choices=MODES, default="affine", help="affine: a scale and a bias per group; "
                   "mxfp4: 4-bit floats with a shared exponent per group")
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="which tensors get how many bits (README: Quantization policy)")


def module_spec(path: str, base: QuantSpec, recipe: str) -> Optional[QuantSpec]:
    """How the module at `path` (a Linear or an Embedding, of the target or of its MTP drafter)
    is stored under `recipe`; None keeps it in floating point."""
    check_recipe(recipe)
    multimodal = path.startswith(MULTIMODAL_PREFIXES)
    eight = QuantSpec(8, base.group_size if base.mode == "affine" else 64, "affine")
    if path.startswith(DRAFTER_PREFIXES) and recipe != "small":
        # The drafter's errors cost accepted drafts and its bytes are few: 8-bit keeps 0.90 greedy
        # agreement where 4-bit layers or table give 0.22 / 0.73 (benchmarks/drafter_quant.py); the
        # tiny centroids pick the candidates and stay exact. --bits reaches it under "small" only.
        if path == CENTROIDS:
            return None
        if recipe == "quality" and path != DRAFTER_EMBEDDING:
            return None
        return eight
    if recipe == "small":
        if base.mode == "mxfp4" and path in PROJECTORS:
            return QuantSpec(base.bits, base.group_size, "affine")  # as small, and servable
        return base
    if recipe == "quality":
        if path == EMBEDDING or multimodal:
            return eight
        return base
    # default: the measured trade-off (README, "Quantization policy")
    if multimodal:
        return eight
    return base


def quantizable_paths(model) -> list[tuple[str, tuple[int, ...]]]:
    """(path, weight shape) of every module that can be quantized (Linear, Embedding)."""
    out = []
    for path, m in model.named_modules():
        if hasattr(m, "to_quantized") and "weight" in m:
            out.append((path, tuple(m.weight.shape)))
    return out


def plan(model, base: QuantSpec, recipe: str, group_size_given: bool = False) -> dict[str, QuantSpec]:
    """{module path: spec} for the modules to quantize; checks group sizes divide the inputs.
    `group_size_given`: base's group size is the user's --group-size (else a default, not named so)."""
    chosen = {}
    for path, shape in quantizable_paths(model):
        spec = module_spec(path, base, recipe)
        if spec is None:
            continue
        if shape[-1] % spec.group_size:
            if group_size_given and spec.group_size == base.group_size:
                raise InputError(f"--group-size {spec.group_size}: does not divide the input size {shape[-1]} "
                                 f"of {path}")
            raise InputError(f"group size {spec.group_size} of {spec.bits}-bit {spec.mode}: does not divide the "
                             f"input size {shape[-1]} of {path}; --group-size sets another")
        chosen[path] = spec
    return chosen


def quantization_entry(chosen: dict[str, QuantSpec], base: QuantSpec) -> dict:
    """config.json `quantization`: global bits/group size plus per-module overrides (mlx-lm format)."""
    entry = base.entry()
    for path, spec in sorted(chosen.items()):
        if spec != base:
            entry[path] = spec.entry()
    return entry


# --- the quantizer ---------------------------------------------------------------------------


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (rows, n) into uint32 words, element j of a word in bits [j*bits, (j+1)*bits)."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    return np.bitwise_or.reduce(q << shifts, axis=-1)


# Rows screened for grids at a time: bounds the float32 temporaries to ~64 MB per step, so
# the 1B-element embedding never needs several GB of scratch memory.
SCREEN_ELEMENTS = 1 << 24
PROBE = 4  # columns looked at before a group is checked in full
TOLERANCE = 1e-4


def _on_grid(r: mx.array, k: int) -> mx.array:
    """Whether every r * k is an integer, per row."""
    return mx.all(mx.abs(r * k - mx.round(r * k)) <= TOLERANCE, axis=1)


def _grid_rows(w: mx.array, spec: QuantSpec):
    """Groups (rows of the (-1, group_size) view) whose values are min + step * {0..k} for some
    k < 2^bits, with the step representable in the weights' dtype: the grid of
    quantization-aware-trained weights, unused levels allowed. Yields (rows, step, min, codes).

    A group spanning k steps has (x - min) / (max - min) * k integral; a few probe columns
    reject almost every other group before the full check."""
    levels = 2 ** spec.bits - 1
    x_all = w.reshape(-1, spec.group_size)
    step_rows = max(1, SCREEN_ELEMENTS // spec.group_size)
    for start in range(0, x_all.shape[0], step_rows):
        x = x_all[start:start + step_rows].astype(mx.float32)
        lo, hi = mx.min(x, axis=1, keepdims=True), mx.max(x, axis=1, keepdims=True)
        span = hi - lo
        r = (x[:, :PROBE] - lo) / mx.where(span > 0, span, 1)
        maybe = mx.zeros((x.shape[0],), dtype=mx.bool_)
        for k in range(1, levels + 1):
            maybe = maybe | _on_grid(r, k)
        rows = np.flatnonzero(np.array(maybe & (span[:, 0] > 0)))
        if rows.size == 0:
            continue
        idx = mx.array(rows)
        xr, lor, spanr = x[idx], lo[idx], span[idx]
        r = (xr - lor) / spanr
        k_found = mx.zeros((rows.size,), dtype=mx.int32)
        for k in range(levels, 0, -1):  # ends on the smallest k that fits
            k_found = mx.where(_on_grid(r, k), k, k_found)
        step = spanr[:, 0] / mx.maximum(k_found, 1)
        exact = (step.astype(w.dtype).astype(mx.float32) == step) & (k_found > 0)
        keep = np.flatnonzero(np.array(exact))
        if keep.size:
            kk = mx.array(keep)
            codes = mx.round(r[kk] * k_found[kk][:, None])
            yield start + rows[keep], np.array(step[kk]), np.array(lor[kk][:, 0]), np.array(codes)


def quantize(w: mx.array, spec: QuantSpec) -> dict[str, mx.array]:
    """{"weight", "scales"[, "biases"]} of `w` quantized by `spec`, grid-exact where possible."""
    if spec.mode != "affine":
        wq, scales = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        return {"weight": wq, "scales": scales}
    wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    found = list(_grid_rows(w, spec))
    if not found:
        return {"weight": wq, "scales": scales, "biases": biases}
    wq_np = np.array(wq).reshape(-1, spec.group_size * spec.bits // 32)
    sc_np = np.array(scales.astype(mx.float32)).reshape(-1)
    bi_np = np.array(biases.astype(mx.float32)).reshape(-1)
    for rows, s, lo, codes in found:
        wq_np[rows] = _pack(codes, spec.bits)
        sc_np[rows], bi_np[rows] = s, lo
    return {"weight": mx.array(wq_np).reshape(wq.shape),
            "scales": mx.array(sc_np).astype(scales.dtype).reshape(scales.shape),
            "biases": mx.array(bi_np).astype(biases.dtype).reshape(biases.shape)}


def quantized_size(config: ModelConfig, base: QuantSpec, recipe: str, float_bytes: int = 2) -> dict[str, float]:
    """Bytes of a model under a policy, from the config alone (no weights needed); what is not
    quantized, and the scales, stay in a floating dtype of `float_bytes` (bfloat16: 2)."""
    from .model import Model  # imported here: the CLIs' --help reads this module's constants

    model = Model(config)  # lazy: nothing is allocated
    chosen = plan(model, base, recipe)
    total = quantized = 0.0
    for name, p in tree_flatten(model.parameters()):
        module = name.rsplit(".", 1)[0]
        if module in chosen and name.endswith(".weight"):
            b = p.size * chosen[module].bits_per_weight(float_bytes) / 8
            quantized += b
        else:
            b = p.size * float_bytes
        total += b
    return {"total_bytes": total, "quantized_bytes": quantized}
