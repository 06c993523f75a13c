"""Global-layer decode attention at the bandwidth limit (issue #14).

    python -m benchmarks.kv_attention [--contexts 1024,8192,32768] [--steps 8] [--out DIR]

One global attention layer of the 12B (hidden 3840, 16 query heads, head dim 512, one k_eq_v kv
head, proportional RoPE over 64 of 256 frequency slots), float32 weights and activations (the
CPU backend's fast path), its cache filled to each context length. Per cache kind:

- bytes read: the cache-sized arrays one decode step's attention reads, against the bytes the
  cache stores for those tokens (the goal: within 5%), counted per pass over the cache. MLX runs
  attention at head dims 512/640 unfused (its fused kernels stop at 256; the CPU backend has
  none), and so does mlx-lm's quantized attention: a scores pass reads the keys, a values pass
  the values, so a packed array is read twice. "fused" is what one pass would read (a packed
  array once). Now: the arrays `model.attend` is handed, as stored. Before (the previous
  commit's path, `before_step`): also the derived keys' rescale and RoPE, dequantized copies.
- step time of that layer, before and after, median of `--repeats` runs of `--steps` steps (the
  context stays fixed: each step's token is trimmed again), and its peak memory beyond the
  cache and the weights.
- for the quantized caches, the same step with mlx-lm's quantized attention in place of
  `model.quantized_attention` (the peer's kernel; it broadcasts the cache over the query heads).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.kv_memory import config
from mlx_gemma import model as model_module
from mlx_gemma.cache import GlobalCache
from mlx_gemma.model import Attention
from mlx_lm.models.base import quantized_scaled_dot_product_attention

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"two-tensor": dict(one_tensor=False), "one-tensor": dict(one_tensor=True),
         "one-tensor 8-bit": dict(one_tensor=True, bits=8), "one-tensor 4-bit": dict(one_tensor=True, bits=4),
         "two-tensor 8-bit": dict(one_tensor=False, bits=8)}


def nbytes(x) -> int:
    return sum(p.nbytes for p in x) if isinstance(x, tuple) else x.nbytes


def dense(stored, bits: int) -> mx.array:
    return mx.dequantize(*stored, group_size=64, bits=bits) if isinstance(stored, tuple) else stored


def before_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    """The previous commit's global attention: one-tensor caches hold N alone and derive the keys
    over the whole cache each step; quantized caches are dequantized before sdpa. `reads` gets
    the bytes of each cache-sized array an op reads."""
    B, L, _ = x.shape
    q = attn.rope(attn.q_norm(attn.q_proj(x).reshape(B, L, attn.n_heads, -1)).transpose(0, 2, 1, 3), cache.offset)
    k_raw = attn.k_proj(x).reshape(B, L, 1, -1)
    v = attn.v_norm(k_raw).transpose(0, 2, 1, 3)
    if cache.one_tensor:
        stored = [cache.update_and_fetch_one(v)]
    else:
        stored = list(cache.update_and_fetch(attn.rope(attn.k_norm(k_raw).transpose(0, 2, 1, 3), cache.offset), v))
    reads += [(id(s), nbytes(s)) for s in stored if isinstance(s, tuple)]  # dequantize reads the codes
    tensors = [dense(s, cache.bits) for s in stored]
    if cache.one_tensor:
        n = tensors[0]
        scaled = attn.k_norm.rescale(n)
        reads += [(id(n), n.nbytes), (id(scaled), scaled.nbytes)]  # rescale reads N, RoPE reads N * w_k
        tensors = [attn.rope(scaled, 0), n]
    reads += [(id(t), t.nbytes) for t in tensors]  # sdpa reads keys and values
    o = mx.fast.scaled_dot_product_attention(q, *tensors, scale=1.0, mask=None)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def after_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    attend = model_module.attend

    def counted(q, k, v, mask, c):
        reads.extend([(id(k), nbytes(k)), (id(v), nbytes(v))])  # a packed array: k is v
        return attend(q, k, v, mask, c)

    model_module.attend = counted
    try:
        return attn(x, None, cache)
    finally:
        model_module.attend = attend


def mlx_lm_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    ours = model_module.quantized_attention
    model_module.quantized_attention = lambda q, k, v, mask, group_size, bits: \
        quantized_scaled_dot_product_attention(q, k, v, 1.0, mask, group_size, bits)
    try:
        return after_step(attn, x, cache, reads)
    finally:
        model_module.quantized_attention = ours


def filled(spec, kind: dict, context: int, packed: bool) -> GlobalCache:
    """A cache of `context` random tokens; `packed` False: the previous commit's N-only layout."""
    cache = GlobalCache(kind["one_tensor"], kind.get("bits"), 64)
    width = spec.packed_width(cache.bits and cache.group_size) if packed and cache.one_tensor else spec.head_dim
    x = mx.random.normal((1, 1, context, width)) * 0.1
    cache.update_and_fetch_one(x) if kind["one_tensor"] else cache.update_and_fetch(x, x)
    mx.eval(cache.state)
    return cache


def measure(attn: Attention, spec, step, kind: dict, context: int, packed: bool, steps: int, repeats: int) -> dict:
    cache = filled(spec, kind, context, packed)
    x = mx.random.normal((1, 1, attn.o_proj.weight.shape[0])) * 0.1  # the residual stream
    reads: list = []
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(step(attn, x, cache, reads))  # warm-up, the bytes read and the peak
    peak = mx.get_peak_memory() - base
    cache.trim(1)
    stored = cache.nbytes * context // cache._capacity()  # what `context` tokens occupy
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            mx.eval(step(attn, x, cache, []))
            cache.trim(1)
        times.append((time.perf_counter() - t0) / steps * 1000)
    read = sum(b for _, b in reads)
    fused = sum(b for i, (a, b) in enumerate(reads) if i == 0 or a != reads[i - 1][0])  # k is v: once
    return {"read_bytes": read, "stored_bytes": stored, "read_over_stored": read / stored,
            "fused_read_over_stored": fused / stored,
            "step_ms": statistics.median(times), "spread_ms": max(times) - min(times), "peak_bytes": peak}


def run(contexts: list[int], steps: int, repeats: int) -> list[dict]:
    cfg = config(6)
    spec = cfg.text_config.layers[5]
    attn = Attention(cfg.text_config, spec)
    attn.set_dtype(mx.float32)
    mx.eval(attn.parameters())
    rows = []
    for context in contexts:
        for name, kind in KINDS.items():
            row = {"context": context, "kind": name}
            paths = {"before": before_step, "after": after_step}
            if kind.get("bits"):
                paths["mlx-lm"] = mlx_lm_step
            for when, step in paths.items():
                row[when] = measure(attn, spec, step, kind, context, when != "before", steps, repeats)
            rows.append(row)
            print(json.dumps(row))
    return rows


def table(result: dict) -> str:
    lines = ["# Global-layer decode attention: bytes read and step time (issue #14)", "",
             f"Backend: {result['backend']} (MLX {result['mlx']}, {result['system']} {result['machine']}), "
             f"{result['activations']} activations, {result['weights']} projections; one 12B global layer "
             "(16 heads, head dim 512, 1 kv head). Made by `python -m benchmarks.kv_attention`.", "",
             "Bytes read: the cache-sized arrays one decode step's attention reads, over the bytes the cache "
             "stores for its tokens. Step time: the whole layer (projections included), median of "
             f"{result['repeats']} runs of {result['steps']} steps; {result['note']} Peak: the step's memory "
             "beyond the cache and the weights. mlx-lm: the quantized caches read by mlx-lm's quantized "
             "attention instead of ours.", "",
             "| context | cache | stored MB before | stored MB after | read / stored before | read / stored after | "
             "read / stored after, fused | step ms before | step ms after | after / before | step ms, mlx-lm "
             "| peak MB before / after / mlx-lm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b, a, m = r["before"], r["after"], r.get("mlx-lm")
        peaks = " / ".join(f"{x['peak_bytes'] / 1e6:.1f}" for x in (b, a, m) if x)
        lines.append(f"| {r['context']} | {r['kind']} | {b['stored_bytes'] / 1e6:.1f} | {a['stored_bytes'] / 1e6:.1f} | "
                     f"{b['read_over_stored']:.2f} | {a['read_over_stored']:.3f} | {a['fused_read_over_stored']:.3f} | "
                     f"{b['step_ms']:.2f} ± {b['spread_ms'] / 2:.2f} | {a['step_ms']:.2f} ± {a['spread_ms'] / 2:.2f} | "
                     f"{a['step_ms'] / b['step_ms']:.2f} | "
                     + (f"{m['step_ms']:.2f} ± {m['spread_ms'] / 2:.2f} | " if m else "– | ") + f"{peaks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--note", default="", help="conditions of the run (e.g. other load on the machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    result = {"backend": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
              "system": platform.system(), "activations": "float32", "weights": "float32",
              "steps": args.steps, "repeats": args.repeats, "note": args.note,
              "rows": run([int(c) for c in args.contexts.split(",")], args.steps, args.repeats)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_attention.json").write_text(json.dumps(result, indent=2))
    (out / "kv_attention.md").write_text(table(result))


if __name__ == "__main__":
    main()
