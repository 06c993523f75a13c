"""What the hardware allows: bytes a decode step must read, FLOPs a prefill token costs, and the
decode ceilings of Apple-Silicon chips from their published memory bandwidths.

A decode step reads every language-model weight once (the tied embedding as the head; the
lookup of one row is noise) and the KV cache: the sliding layers' last `window` tokens, the
global layers' whole context, as often as attention reads it (`global_read_values_per_token`).
A prefill token costs 2 FLOPs per multiply-add of every projection, plus attention (QK^T and
AV) over the keys it sees; the head runs for the last token only.

With MTP (spec 8) a round of K drafts reads the target's weights and KV once (verifying K+1
tokens costs the bytes of one step) and the drafter's K times: its layers and projections, the
ordered head's centroids and the table rows of the top centroids only, and the K/V of the two
target layers it attends to. (Exporting the one-tensor global keys to it, 1 KiB per token each
way once per round, is left out: ~0.1% of a round at 32K.)

Serving B streams at once (issue 30), a step decodes one token of each: it reads the weights
once and each stream's own KV, so B streams' aggregate ceiling is B x bandwidth / (weights +
B x KV), nearly B times one stream's while the KV is small beside the weights.
"""

from __future__ import annotations

from typing import Optional

from mlx.utils import tree_flatten

from mlx_gemma.config import LayerSpec, ModelConfig, TextConfig
from mlx_gemma.memory import KVOptions, element_bytes, global_values_per_token
from mlx_gemma.model import Model
from mlx_gemma.quantization import QuantSpec, plan
from mlx_gemma.speculative import Drafter, DrafterConfig

# Published unified-memory bandwidths, GB/s (Apple's spec sheets; the top configuration of each).
CHIPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
}

LANGUAGE = "language_model."


def is_decode_weight(name: str) -> bool:
    """Whether a decode step reads this tensor: the language model's (media embedders are
    used by prefill only)."""
    return name.startswith(LANGUAGE)


def weight_bytes_min(config: ModelConfig, base: Optional[QuantSpec] = QuantSpec(), recipe: str = "default",
                     float_bytes: int = 2) -> float:
    """Bytes of the language-model weights under a quantization policy (None: unquantized),
    from the config alone: the minimum a decode step reads."""
    return _param_bytes(Model(config), is_decode_weight, base, recipe, float_bytes)  # lazy: nothing allocated


def _param_bytes(model, keep, base: Optional[QuantSpec], recipe: str, float_bytes: int) -> float:
    """Bytes of the parameters whose names `keep` accepts, quantized as `plan` says."""
    chosen = plan(model, base, recipe) if base is not None else {}
    total = 0.0
    for name, p in tree_flatten(model.parameters()):
        if not keep(name):
            continue
        module = name.rsplit(".", 1)[0]
        total += p.size * (chosen[module].bits_per_weight() / 8 if module in chosen else float_bytes)
    return total


def drafter_bytes(config: DrafterConfig, base: Optional[QuantSpec] = QuantSpec(), recipe: str = "default",
                  float_bytes: int = 2) -> float:
    """Weight bytes one draft step reads: all but the token table and its ordering, plus the
    rows of the table the head scores (top-k centroids' tokens; the whole table without
    ordered embeddings)."""
    drafter = Drafter(config)  # lazy
    table = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    rest = _param_bytes(drafter, lambda n: n != table and not n.endswith("token_ordering"), base, recipe,
                        float_bytes)
    rows = _param_bytes(drafter, lambda n: n == table, base, recipe, float_bytes)
    if config.use_ordered_embeddings:
        rows *= config.centroid_intermediate_top_k / config.num_centroids
    return rest + rows


def drafter_kv_bytes(drafter: TextConfig, target: TextConfig, context: int, dtype_bytes: int) -> float:
    """K/V bytes one draft step reads: each drafter layer attends to the keys and values of the
    target's last layer of its type (the window of a sliding one)."""
    last = {s.layer_type: s for s in target.layers}
    total = 0.0
    for d in drafter.layers:
        s = last[d.layer_type]
        tokens = min(context, s.window) if s.is_sliding else context
        total += tokens * 2 * s.num_kv_heads * s.head_dim * dtype_bytes
    return total


def tokens_per_round(a: float, k: int) -> float:
    """Expected tokens from a round of k drafts, each accepted with probability a once the
    ones before it are: accepted drafts + the target's own token, (1 - a^(k+1)) / (1 - a)."""
    return k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)


def global_read_values_per_token(s: LayerSpec, kv: KVOptions) -> int:
    """Values per cached token that a global layer's decode attention reads, as MLX runs it
    (unfused at head dims 512/640: a scores pass over the keys, a values pass over the values):
    the packed cache's scored array twice and its rotated N once (`model.Attention.pack`), or
    keys and values once each. tests/test_benchmarks.py checks it against the arrays a step
    hands to attention."""
    if kv.one_tensor and s.packs_kv:
        scored, rotated = s.packed_widths(kv.bits and kv.group_size)
        return s.num_kv_heads * (2 * scored + rotated)
    return global_values_per_token(s, kv)


def kv_bytes(text: TextConfig, context: int, kv: KVOptions, dtype_bytes: int) -> float:
    """KV bytes a decode step at `context` reads: sliding layers hold at most `window` tokens."""
    total = 0.0
    for s in text.layers:
        if s.is_sliding:
            total += min(context, s.window) * 2 * s.num_kv_heads * s.head_dim * dtype_bytes
        else:
            total += context * global_read_values_per_token(s, kv) * element_bytes(dtype_bytes, kv.bits, kv.group_size)
    return total


def prefill_flops(text: TextConfig, tokens: int, start: int = 0) -> float:
    """FLOPs to prefill `tokens` tokens after `start` cached ones (the head once)."""
    h, heads = text.hidden_size, text.num_attention_heads
    total = 0.0
    for s in text.layers:
        d, kvh = s.head_dim, s.num_kv_heads
        proj = h * heads * d * 2 + h * kvh * d * (1 if s.k_eq_v else 2) + 3 * h * text.intermediate_size
        # Keys seen by the query at position p: p + 1, or at most the window.
        q = range(start, start + tokens)
        seen = sum(min(p + 1, s.window) if s.is_sliding else p + 1 for p in q)
        total += 2 * proj * tokens + 2 * 2 * heads * d * seen
    return total + 2 * h * text.vocab_size


def chip_table(weights: float, kv_short: float, kv_long: float, long_context: int) -> str:
    """Markdown: each chip's decode ceiling (bandwidth / bytes per step) for the given model."""
    lines = ["| chip | bandwidth GB/s | decode ceiling, short context (tok/s) | "
             f"decode ceiling at {long_context} tokens (tok/s) |", "|---|---|---|---|"]
    for chip, bw in CHIPS.items():
        lines.append(f"| {chip} | {bw:g} | {bw * 1e9 / (weights + kv_short):.1f} | "
                     f"{bw * 1e9 / (weights + kv_long):.1f} |")
    return "\n".join(lines)


def mtp_chip_table(target: float, drafter: float, k: int, acceptances) -> str:
    """Markdown: each chip's decode ceiling without and with MTP at K = k (bandwidth x tokens
    per round / bytes per round), for target bytes per step and drafter bytes per draft step.
    The gain is the same on every chip; the last row gives the best K (1-8) for each acceptance."""

    def gain(a, kk):
        return tokens_per_round(a, kk) * target / (target + kk * drafter)

    head = " | ".join(f"MTP K={k}, a = {a}: {gain(a, k):.2f}x (tok/s)" for a in acceptances)
    lines = [f"| chip | bandwidth GB/s | plain (tok/s) | {head} |", "|---|---|---|" + "---|" * len(acceptances)]
    for chip, bw in CHIPS.items():
        plain = bw * 1e9 / target
        cells = " | ".join(f"{plain * gain(a, k):.1f}" for a in acceptances)
        lines.append(f"| {chip} | {bw:g} | {plain:.1f} | {cells} |")
    best = [max(range(1, 9), key=lambda kk: gain(a, kk)) for a in acceptances]
    lines.append("| best K | | | " + " | ".join(f"K={kk}: {gain(a, kk):.2f}x" for a, kk in zip(acceptances, best))
                 + " |")
    return "\n".join(lines)


def batch_step_bytes(weights: float, kv_per_stream: float, streams: int) -> float:
    """Bytes one decode step of `streams` sequences reads: the weights once, each one's KV."""
    return weights + streams * kv_per_stream


def batch_chip_table(weights: float, kv_per_stream: dict, batches=(1, 8)) -> str:
    """Markdown: each chip's aggregate decode ceiling (B x bandwidth / bytes of a B-stream step)
    for each batch B and each context (`kv_per_stream`: context -> one stream's KV bytes per step).
    The header gives the largest batch's gain over one stream at each context: the same on every chip."""
    cells = []
    for context, kv in kv_per_stream.items():
        for b in batches:
            gain = b * batch_step_bytes(weights, kv, 1) / batch_step_bytes(weights, kv, b)
            cells.append(f"B={b} at {context} tokens" + (f": {gain:.2f}x" if b != batches[0] else "") + " (tok/s)")
    lines = ["| chip | bandwidth GB/s | " + " | ".join(cells) + " |", "|---|---|" + "---|" * len(cells)]
    for chip, bw in CHIPS.items():
        row = [f"{b * bw * 1e9 / batch_step_bytes(weights, kv, b):.1f}"
               for kv in kv_per_stream.values() for b in batches]
        lines.append(f"| {chip} | {bw:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)
