"""The 16 GB budget: how much memory the GPU may use, what the weights, KV caches and
activations need, and the plan that refuses a run before it runs out (spec 9)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import media
from .config import FULL, SLIDING, LayerSpec, ModelConfig, TextConfig
from .errors import InputError
from .loading import SAFETENSORS_DTYPE_BYTES, read_safetensors_header, weight_files
from .speculative import DEFAULT_NUM_DRAFT_TOKENS, DrafterConfig, read_config, rename

# Decimal units as mlx-lm and macOS print them (1 GB = 1e9 bytes); KiB/MiB/GiB/TiB are binary.
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
SIZE_EXAMPLES = "examples: 10GB, 10.5GB, 512MB, 12GiB; GB = 10^9 bytes, GiB = 2^30"


def parse_size(text: str, flag: str = "--memory-limit") -> int:
    """'10GB' -> 10**9 * 10 bytes, '512MB', '1e9', '12GiB' (binary) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    unit = m and m.group(2)
    if not m or unit not in _UNITS:
        raise InputError(f"{flag}: cannot read {text!r} ({SIZE_EXAMPLES})")
    n = float(m.group(1)) if m.group(1).count(".") <= 1 and m.group(1) != "." else None
    if n is None or n * _UNITS[unit] >= 2**63:
        raise InputError(f"{flag}: cannot read {text!r} ({SIZE_EXAMPLES})")
    if n * _UNITS[unit] < 1:
        raise InputError(f"{flag}: must be at least 1 byte, got {text!r}")
    return int(n * _UNITS[unit])


def memory_budget(limit: Optional[str] = None) -> int:
    """Bytes the model may use: --memory-limit if given; on a Mac, Metal's recommended
    working-set size (what macOS lets the GPU wire); elsewhere, physical memory."""
    if limit is not None:
        return parse_size(limit)
    if sys.platform == "darwin" and mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def mac_budget(memory_gb: int) -> int:
    """What `memory_budget` reads on an Apple-silicon Mac of `memory_gb` GB of unified memory
    (GiB, as Apple counts it): Metal's recommended working set, 2/3 of it, 11.45 GB on a 16 GB
    Mac. The one figure for planning a Mac from elsewhere (tests, benchmarks, the README)."""
    return int(memory_gb * 2**30 * 2 / 3)


def tensor_bytes(path: Path, dtype_bytes: int = 0) -> dict[str, int]:
    """{tensor name: bytes} of a checkpoint once loaded, from the safetensors headers (nothing is
    loaded): as stored, except that a run with float32 activations (`dtype_bytes` 4) casts the
    floating tensors of unquantized modules up (backend.set_dtype: norms, the vision and audio
    projections; the quantized matrices' scales stay as stored)."""
    headers = {name: entry for f in weight_files(path) for name, entry in read_safetensors_header(f).items()}
    quantized = {name.rsplit(".", 1)[0] for name in headers if name.endswith(".scales")}
    sizes = {}
    for name, (dtype, shape) in headers.items():
        n = SAFETENSORS_DTYPE_BYTES[dtype]
        if dtype_bytes == 4 and dtype in ("BF16", "F16") and name.rsplit(".", 1)[0] not in quantized:
            n = 4
        for d in shape:
            n *= d
        sizes[name] = n
    return sizes


def weight_bytes(path: Path, dtype_bytes: int = 0) -> int:
    return sum(tensor_bytes(path, dtype_bytes).values())


def drafter_bytes(path: Path) -> int:
    """Bytes of the MTP drafter checkpoint at `path`, as weight_bytes counts a target's: the
    tensors load_drafter keeps (its int64 token ordering, held as int32, at its stored size)."""
    return sum(n for name, n in tensor_bytes(path).items() if rename(name) is not None)


def activation_dtype_bytes(path: Path) -> int:
    """Bytes per activation when running a checkpoint as stored: its floating dtype's size
    (scales of quantized tensors included)."""
    sizes = [SAFETENSORS_DTYPE_BYTES[d] for f in weight_files(path)
             for d, _ in read_safetensors_header(f).values() if d in ("BF16", "F16", "F32")]
    return max(sizes, default=2)


def run_dtype_bytes(path: Path, config: ModelConfig, requested: str = "auto") -> int:
    """Bytes per activation of a run: the dtype `requested` picks (backend.activation_dtype), or
    the checkpoint's own when it runs as stored."""
    from .backend import activation_dtype

    dtype = activation_dtype(bool(config.quantization), requested)
    return dtype.size if dtype is not None else activation_dtype_bytes(path)


# --- the planner -----------------------------------------------------------------------------

GB = 1e9
# Scratch memory for one prefill chunk's attention scores: the chunk shrinks as the context
# grows so that this stays fixed (peak memory flat in prompt length).
ATTENTION_SCRATCH = 1 << 30
MIN_CHUNK = 16
SLIDING_GROWTH = 256  # SlidingWindowCache.step and GlobalCache.step
KV_BITS = (4, 8)


@dataclass
class KVOptions:
    one_tensor: bool = True
    bits: Optional[int] = None
    group_size: int = 64
    quantized_start: int = 0
    sliding_slack: int = 128

    def check(self, text: TextConfig) -> None:
        if self.quantized_start < 0:
            raise InputError(f"--quantized-kv-start: must be 0 or more, got {self.quantized_start}")
        if self.bits is not None and self.bits not in KV_BITS:
            raise InputError(f"--kv-bits: {self.bits} is not supported (valid: {', '.join(map(str, KV_BITS))})")
        if self.bits is not None and self.group_size not in (32, 64, 128):
            raise InputError(f"--kv-group-size: {self.group_size} is not supported (valid: 32, 64, 128)")
        for s in text.layers:
            if self.bits is not None and not s.is_sliding and s.head_dim % self.group_size:
                raise InputError(f"--kv-group-size {self.group_size}: does not divide the head dim "
                                 f"{s.head_dim} of layer {s.index}")


def element_bytes(dtype_bytes: int, bits: Optional[int], group_size: int) -> float:
    """Bytes per cached value: the dtype, or codes plus a scale and a bias per group."""
    return dtype_bytes if bits is None else bits / 8 + 2 * dtype_bytes / group_size


def global_values_per_token(s: LayerSpec, kv: KVOptions) -> int:
    """Values a global layer caches per token: the packed arrays (640 per kv head for the 12B,
    spec 9) or keys and values."""
    per_head = s.packed_width(kv.bits and kv.group_size) if (kv.one_tensor and s.packs_kv) else 2 * s.head_dim
    return s.num_kv_heads * per_head


def global_bytes_per_token(text: TextConfig, kv: KVOptions, dtype_bytes: int) -> float:
    per = element_bytes(dtype_bytes, kv.bits, kv.group_size)
    return sum(global_values_per_token(s, kv) * per for s in text.layers_of(FULL))


def sliding_bytes(text: TextConfig, kv: KVOptions, dtype_bytes: int, chunk: int) -> int:
    """The sliding caches at their largest: window - 1 + slack kept, plus room for a chunk."""
    slots = text.sliding_window - 1 + kv.sliding_slack + max(chunk, SLIDING_GROWTH)
    return sum(2 * slots * s.num_kv_heads * s.head_dim * dtype_bytes for s in text.layers_of(SLIDING))


def prefill_chunk(text: TextConfig, context: int, step: int, dtype_bytes: int) -> int:
    """Tokens per prefill chunk when the cache already holds `context` tokens."""
    per_query = text.num_attention_heads * (context + step) * dtype_bytes  # one row of attention scores
    return int(max(MIN_CHUNK, min(step, ATTENTION_SCRATCH // per_query)))


# Copies of a layer's arrays that its attention and MLP hold at their peak on the CPU backend,
# measured per piece and checked whole by tests/test_memory.py (the layer) and
# `python -m benchmarks.prefill_memory` (a prefill). Metal fuses the query's norm and RoPE:
# fewer copies there, so the plan errs on the safe side.
QUERY_COPIES = 7  # the query's projection, norm and RoPE
# A sliding layer holds about two query-sized arrays more: its keys and values (8 kv heads, each
# half the query's size, where a global layer's one kv head is a sixteenth) and the copy of the
# query that sdpa's CPU fallback scales. Measured 0.97x of the plan with them, 1.01-1.07x without.
SLIDING_EXTRA_COPIES = 2
OUTPUT_COPIES = 2  # attention's output and its relayout for o_proj
MLP_COPIES = 6  # gate and up projections, the GELU product: each twice


def layer_activation_bytes(text: TextConfig, s: LayerSpec, kv: KVOptions, chunk: int, context: int,
                           dtype_bytes: int) -> int:
    """Peak temporaries of layer `s` over `chunk` new tokens with `context` cached: attention
    (one copy of its scores: the softmax overwrites them; the query, and in a sliding layer its
    keys and values; the output, as wide as the packed cache for a one-tensor layer; the
    layer's cache as it was, while it is copied into its grown buffer), or the MLP after it,
    whichever is larger."""
    heads = text.num_attention_heads
    if s.is_sliding:
        keys = min(context, text.sliding_window - 1 + kv.sliding_slack) + chunk
        cache = sliding_bytes(text, kv, dtype_bytes, chunk) // len(text.layers_of(SLIDING))
    else:
        keys = context + chunk
        cache = int(global_values_per_token(s, kv) * element_bytes(dtype_bytes, kv.bits, kv.group_size) * context)
    width = s.packed_width(kv.bits and kv.group_size) if (kv.one_tensor and s.packs_kv) else s.head_dim
    query = QUERY_COPIES + (SLIDING_EXTRA_COPIES if s.is_sliding else 0)
    attention = chunk * heads * (keys + query * s.head_dim + OUTPUT_COPIES * width) * dtype_bytes + cache
    return max(attention, MLP_COPIES * chunk * text.intermediate_size * dtype_bytes)


def activation_bytes(text: TextConfig, kv: KVOptions, context: int, step: int, dtype_bytes: int,
                     head_scales: int = 0) -> int:
    """Peak temporaries of a prefill to `context` tokens in chunks of at most `step`: one layer's
    at a time (a chunk's graph frees a layer's temporaries before the next layer's: measured),
    the largest layer at either end of the chunking: the last full-size chunk, and the last
    chunk (smaller, over the most keys). Every layer counts, though a prefill chunk never
    computes the last layer's attention (only its cache is evaluated): the final step does.
    The head runs after the last layer has freed its temporaries but the cast scales of its
    matmuls: its float32 logits, and with `head_scales` (step_upcast_bytes) the cast scales,
    peak on their own."""
    first, last = (min(prefill_chunk(text, c, step, dtype_bytes), max(context, 1)) for c in (0, context))
    # The most tokens cached under a first-size chunk, then the (tokens cached, chunk) of each end.
    full = ATTENTION_SCRATCH // (text.num_attention_heads * first * dtype_bytes) - first
    ends = {(max(0, min(full, context - first)), first), (max(0, context - last), last)}
    layers = max(layer_activation_bytes(text, s, kv, chunk, cached, dtype_bytes) for cached, chunk in ends
                 for s in text.layers)
    stream = 3 * first * text.hidden_size * dtype_bytes  # the residual, a layer's input and output
    head = 2 * text.vocab_size * 4 + head_scales
    return stream + max(layers, head)


def _cast_scales_bytes(rows: int, text: TextConfig, spec: dict) -> int:
    """A [rows, hidden] quantized matrix's scales (and, affine, biases) cast to float32."""
    per_group = 2 if spec.get("mode", "affine") == "affine" else 1
    return rows * text.hidden_size // spec["group_size"] * per_group * 4


def upcast_scales_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """With float32 activations (the CPU backend's choice, backend.set_dtype) a quantized matmul
    first casts its matrix's scales and biases, stored in bfloat16, to float32: a transient the
    size of the largest quantized matrix's, the tied head's (measured: 127 MB for the 12B's
    4-bit head, `python -m benchmarks.run --long`)."""
    q = config.quantization
    if not q or dtype_bytes != 4:
        return 0
    from .quantization import EMBEDDING

    text, head = config.text_config, q.get(EMBEDDING, q)
    if head is False:  # the embedding kept unquantized: the largest quantized matrix is an MLP's
        return _cast_scales_bytes(text.intermediate_size, text, q)
    return _cast_scales_bytes(text.vocab_size, text, {**q, **head})


def step_upcast_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """The cast scales a forward step holds at its head: the head's (when quantized), and the
    last layer's three MLP matrices', still held when the head runs: without them the decode
    peaks of `python -m benchmarks.run --synthetic 2 --long` were 23 MB over the plan."""
    if not upcast_scales_bytes(config, dtype_bytes):
        return 0
    from .quantization import EMBEDDING

    q, text = config.quantization, config.text_config
    head = 0 if q.get(EMBEDDING, q) is False else upcast_scales_bytes(config, dtype_bytes)
    return head + 3 * _cast_scales_bytes(text.intermediate_size, text, q)


@dataclass
class DraftPlan:
    """Speculative decoding in a plan: the drafter's config (speculative.read_config), its
    weights (drafter_bytes) and the drafts per round, K."""
    config: DrafterConfig
    weights: int
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS

    def __post_init__(self):
        k = self.num_draft_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"--num-draft-tokens {k!r}: must be a whole number, at least 1")


def draft_plan(path: Path, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS) -> DraftPlan:
    """The DraftPlan of the drafter checkpoint directory `path`, from its config and safetensors
    headers (nothing is loaded)."""
    return DraftPlan(read_config(path), drafter_bytes(path), num_draft_tokens)


def draft_activation_bytes(text: TextConfig, draft: DraftPlan, context: int, dtype_bytes: int,
                           kv: KVOptions) -> int:
    """Temporaries of a speculative round that a plain decode step does not have."""
    d, k = draft.config.text_config, draft.num_draft_tokens
    # The verify block's K+1 rows of float32 logits over the whole vocabulary, their processed
    # copies and (sampling) their sampling log-probs, and the K draft distributions q kept for
    # the acceptance test: the big term for a 262,144-token vocabulary.
    verify = (3 * (k + 1) + k) * text.vocab_size * 4
    # One drafter step: a few vectors (the 2 x backbone input, q, the MLP), its attention scores
    # over the target's keys, its head's logits (the candidates' rows; full-vocabulary logits
    # when sampling).
    width = max(2 * draft.config.backbone_hidden_size, d.intermediate_size,
                d.num_attention_heads * max(s.head_dim for s in d.layers))
    scores = 2 * d.num_attention_heads * context * dtype_bytes
    rows = draft.config.centroid_intermediate_top_k * (d.vocab_size // draft.config.num_centroids) \
        if draft.config.use_ordered_embeddings else 0
    head = rows * (d.hidden_size + 1) * dtype_bytes + 2 * d.vocab_size * 4
    # The target's K/V the drafter reads (Model.shared_kv), held for the whole round: derived
    # keys of a one-tensor cache, dequantized values of a quantized one.
    shared = 0
    if kv.one_tensor or kv.bits:
        last = {s.layer_type: s for s in text.layers}.values()
        shared = sum(2 * min(context, s.window or context) * s.num_kv_heads * s.head_dim * dtype_bytes for s in last)
    return verify + 8 * width * dtype_bytes + scores + head + shared


def human(n: float) -> str:
    """Bytes in decimal units, as mlx-lm prints them (1 GB = 1e9 bytes)."""
    if n >= 0.1 * GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.2f} KB"


@dataclass
class Plan:
    context: int
    weights: int
    sliding: int
    global_per_token: float
    global_total: int
    activations: int
    budget: int
    draft: Optional[DraftPlan] = None
    draft_activations: int = 0
    media_tokens: int = 0  # the prompt's soft tokens (in `context`)
    media: int = 0  # what its media hold while it is prefilled (`media_bytes`)

    @property
    def drafter_weights(self) -> int:
        return self.draft.weights if self.draft else 0

    @property
    def total(self) -> int:
        # Draft activations are added to the prefill peak though the two never coexist: safe,
        # and by at most that row.
        return self.weights + self.sliding + self.global_total + self.activations + \
            self.drafter_weights + self.draft_activations + self.media

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def rows(self) -> list[tuple[str, str]]:
        draft = [] if self.draft is None else [
            ("drafter weights", human(self.drafter_weights)),
            ("draft activations", f"{human(self.draft_activations)} (K = {self.draft.num_draft_tokens})")]
        return [("context (tokens)", f"{self.context:,}"),
                ("weights", human(self.weights)),
                ("sliding-window KV (bounded)", human(self.sliding)),
                ("global KV per token", human(self.global_per_token)),
                ("global KV at this context", human(self.global_total)),
                ("activations (peak, prefill chunk)", human(self.activations)),
                *draft,
                *([("media tokens", f"{self.media_tokens:,}"), ("media inputs (while prefilling)", human(self.media))]
                  if self.media_tokens else []),
                ("total", human(self.total)),
                ("budget", human(self.budget)),
                ("fits", "yes" if self.fits else "no")]

    def table(self) -> str:
        return "\n".join(["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.rows()])


def make_plan(config: ModelConfig, weights: int, context: int, budget: int, kv: KVOptions,
              dtype_bytes: int = 2, step: int = 512, draft: Optional[DraftPlan] = None) -> Plan:
    """`draft`: speculative decoding's drafter and K, counted when given."""
    text = config.text_config
    kv.check(text)
    per_token = global_bytes_per_token(text, kv, dtype_bytes)
    allocated = -(-context // SLIDING_GROWTH) * SLIDING_GROWTH
    return Plan(context=context, weights=weights, sliding=sliding_bytes(text, kv, dtype_bytes, step),
                global_per_token=per_token, global_total=int(per_token * allocated),
                activations=activation_bytes(text, kv, context, step, dtype_bytes,
                                             step_upcast_bytes(config, dtype_bytes)),
                budget=budget, draft=draft,
                draft_activations=draft_activation_bytes(text, draft, context, dtype_bytes, kv) if draft else 0)


PATCH_BYTES = media.PATCH ** 2 * 3 * 4 + 2 * 4  # one patch's float32 pixels and its int32 (x, y)


def media_bytes(inputs, hidden: int, dtype_bytes: int, chunk: int) -> int:
    """What a prompt's media (`prompt.PromptInputs`) hold while it is prefilled: their processor
    arrays twice (the numpy arrays and their copy on the device) and their soft tokens; of a
    streamed video (media.FrameStream) only the frames one prefill chunk reads."""
    total = 0
    for v in [*inputs.images, *(v.frames for v in inputs.videos)]:
        per_frame = v.tokens_per_frame * hidden * dtype_bytes + 2 * v.budget * PATCH_BYTES
        frames = min(len(v), chunk // v.tokens_per_frame + 2) if isinstance(v, media.FrameStream) else len(v)
        total += frames * per_frame
    for wave in inputs.audio:
        total += 2 * wave.nbytes + -(-len(wave) // media.FRAME_SAMPLES) * hidden * dtype_bytes
    return total


def longest_context(config: ModelConfig, weights: int, budget: int, kv: KVOptions, dtype_bytes: int = 2,
                    step: int = 512, most: Optional[int] = None, draft: Optional[DraftPlan] = None) -> int:
    """The longest context (prompt + reply, tokens) whose plan fits `budget`, at most `most`
    (default: the model's max_position_embeddings); 0 when not even one token fits."""
    lo, hi = 0, config.text_config.max_position_embeddings if most is None else most
    while lo < hi:  # fitting is monotonic in the context: binary search
        mid = (lo + hi + 1) // 2
        if make_plan(config, weights, mid, budget, kv, dtype_bytes, step, draft).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def refusal(plan: Plan, config: ModelConfig, kv: KVOptions, dtype_bytes: int = 2, step: int = 512) -> str:
    """One line saying what needs changing for a plan that does not fit (its drafter included)."""
    fixes, draft = [], plan.draft
    weights = plan.weights + plan.drafter_weights
    if weights > plan.budget:
        minimum = make_plan(config, plan.weights, 1, plan.budget, kv, dtype_bytes, step, draft).total
        theirs = f" ({human(plan.drafter_weights)} of them the drafter's)" if draft else ""
        return (f"the weights alone need {human(weights)}{theirs}, budget {human(plan.budget)}: the memory "
                f"limit must be at least {human(minimum)} (or quantize the weights: python -m mlx_gemma.quantize)")
    if plan.media and plan.total - plan.media <= plan.budget:
        return (f"needs {human(plan.total)}, budget {human(plan.budget)}, {human(plan.media)} of it the prompt's "
                "media: use a smaller --video-budget or fewer frames (--fps, --video-frames), or "
                "--allow-long-media (decodes video frames as they are read)")
    for bits in (8, 4):
        if kv.bits is None or bits < kv.bits:
            alt = KVOptions(kv.one_tensor, bits, kv.group_size, kv.quantized_start, kv.sliding_slack)
            try:
                fits = make_plan(config, plan.weights, plan.context, plan.budget, alt, dtype_bytes, step, draft).fits
            except InputError:  # that group size does not suit this model's head dims
                fits = False
            if fits:
                fixes.append(f"--kv-bits {bits}")
                break
    lo = longest_context(config, plan.weights, plan.budget, kv, dtype_bytes, step, plan.context, draft)
    if lo > 0:
        fixes.append(f"--max-kv-size {lo}")
    advice = " or ".join(fixes) if fixes else "a larger --memory-limit"
    if draft and make_plan(config, plan.weights, plan.context, plan.budget, kv, dtype_bytes, step).fits:
        advice += " (or drop --draft-model)"
    return f"needs {human(plan.total)}, budget {human(plan.budget)}: use {advice}"
