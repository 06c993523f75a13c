"""Global-layer decode attention at the bandwidth limit (issue #14).

    python -m benchmarks.kv_attention [--contexts 1024,8192,32768] [--steps 8] [--out DIR]

One global attention layer of the 12B (hidden 3840, 16 query heads, head dim 512, one k_eq_v kv
head, proportional RoPE over 64 of 256 frequency slots), float32 weights and activations (the
CPU backend's fast path), its cache filled to each context length. Per cache kind:

- bytes read: the cache-sized arrays one decode step's attention is handed, each counted once
  per pass over it, against the bytes the cache stores for those tokens. MLX runs attention at
  head dims 512/640 unfused (its fused kernels stop at 256; the CPU backend has none), and so
  does mlx-lm's quantized attention: a scores pass reads the keys, a values pass the values.
  "fused" is what one pass over each stored array would read. Now (`after`): the packed
  cache's scored array is read by both passes, its rotated N by the values pass
  (`model.Attention.pack`). Before (stop 25's layout, `before_step`): one packed array
  [N, K over the rotated dims], read whole by both passes.
- step time of that layer, before and after, median of `--repeats` runs of `--steps` steps (the
  context stays fixed: each step's token is trimmed again), and its peak memory beyond the
  cache and the weights.
- for the quantized two-tensor cache, the same step with mlx-lm's quantized attention in place
  of `model.folded_attention` (the peer's kernel; it broadcasts the cache over the query heads).
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
from benchmarks.synthetic import fill_global
from mlx_gemma import model as model_module
from mlx_gemma.cache import GlobalCache
from mlx_gemma.config import whole_groups
from mlx_gemma.model import Attention
from mlx_lm.models.base import quantized_scaled_dot_product_attention

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"two-tensor": dict(one_tensor=False), "one-tensor": dict(one_tensor=True),
         "one-tensor 8-bit": dict(one_tensor=True, bits=8), "one-tensor 4-bit": dict(one_tensor=True, bits=4),
         "two-tensor 8-bit": dict(one_tensor=False, bits=8)}


def nbytes(x) -> int:
    return sum(p.nbytes for p in x) if isinstance(x, tuple) else x.nbytes


def before_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    """Stop 25's packed global attention (commit c00f35a): one array per token, [N, K over the
    rotated dims] (640 wide), scored against and then, whole, weighted as the values. `reads`
    gets the bytes of each cache-sized array a pass reads."""
    B, L, _ = x.shape
    q = attn.rope(attn.q_norm(attn.q_proj(x).reshape(B, L, attn.n_heads, -1)).transpose(0, 2, 1, 3), cache.offset)
    k_raw = attn.k_proj(x).reshape(B, L, 1, -1)
    n = attn.v_norm(k_raw).transpose(0, 2, 1, 3)
    k = attn.rope(attn.k_norm(k_raw).transpose(0, 2, 1, 3), cache.offset)
    t, = cache.update_and_fetch_packed([mx.concatenate([n, attn._groups(attn._rotated(k), cache)], axis=-1)])
    d = attn.head_dim
    passing = (mx.arange(d) % (d // 2)) >= attn.spec.rope.rotated_pairs
    query = mx.concatenate([q * (attn.k_norm.weight * passing), attn._groups(attn._rotated(q), cache)], axis=-1)
    reads += [(id(t), nbytes(t))] * 2
    o = model_module.attend(query, t, t, None, cache)[..., :d]
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def after_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    attend = model_module.attend

    def counted(q, k, v, mask, c):
        reads.extend((id(a), nbytes(a)) for a in [k, *(v if isinstance(v, list) else [v])])  # one pass each
        return attend(q, k, v, mask, c)

    model_module.attend = counted
    try:
        return attn(x, None, cache)
    finally:
        model_module.attend = attend


def mlx_lm_step(attn: Attention, x: mx.array, cache: GlobalCache, reads: list) -> mx.array:
    ours = model_module.folded_attention
    model_module.folded_attention = lambda q, k, values, mask, group_size, bits: \
        [quantized_scaled_dot_product_attention(q, k, v, 1.0, mask, group_size, bits) for v in values]
    try:
        return after_step(attn, x, cache, reads)
    finally:
        model_module.folded_attention = ours


def filled(spec, kind: dict, context: int, packed: bool) -> GlobalCache:
    """A cache of `context` random tokens; `packed` False: stop 25's one-array layout."""
    cache = GlobalCache(kind["one_tensor"], kind.get("bits"), 64)
    if kind["one_tensor"] and not packed:  # [N, K over the rotated dims], in whole groups
        width = spec.head_dim + whole_groups(2 * spec.rope.rotated_pairs, cache.bits and cache.group_size)
        cache.update_and_fetch_packed([mx.random.normal((1, 1, context, width)) * 0.1])
    else:
        fill_global(cache, spec, context, scale=0.1)
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
    fused = sum(b for i, (a, b) in enumerate(reads) if i == 0 or a != reads[i - 1][0])  # k is v[0]: once
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
            paths = {"before": before_step} if kind["one_tensor"] else {}
            paths["after"] = after_step
            if kind.get("bits") and not kind["one_tensor"]:
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
             "Bytes read: the cache-sized arrays one decode step's attention reads (each once per pass), over "
             "the bytes the cache stores for its tokens. Before: the packed cache as one array [N, K over the "
             "rotated dims], read whole by the scores and the values (stop 25); after: [N over the dims RoPE "
             "leaves alone, K over the rotated ones] and N over the rotated dims apart, so that the scores "
             "pass reads 512 of the 640 values per token (`model.Attention.pack`). "
             "Step time: the whole layer (projections included), median of "
             f"{result['repeats']} runs of {result['steps']} steps; {result['note'] and result['note'] + ' '}"
             "Peak: the step's memory "
             "beyond the cache and the weights. mlx-lm: the quantized two-tensor cache read by mlx-lm's quantized "
             "attention instead of ours.", "",
             "| context | cache | stored MB | read / stored before | read / stored after | read / stored, fused "
             "| step ms before | step ms after | after / before | step ms, mlx-lm | peak MB before / after / mlx-lm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(x):
        return f"{x['step_ms']:.2f} ± {x['spread_ms'] / 2:.2f}" if x else "–"

    for r in result["rows"]:
        b, a, m = r.get("before"), r["after"], r.get("mlx-lm")
        peaks = " / ".join(f"{x['peak_bytes'] / 1e6:.1f}" if x else "–" for x in (b, a, m))
        before = f"{b['read_over_stored']:.3f}" if b else "–"
        speedup = f"{a['step_ms'] / b['step_ms']:.2f}" if b else "–"
        lines.append(f"| {r['context']} | {r['kind']} | {a['stored_bytes'] / 1e6:.1f} | {before} | "
                     f"{a['read_over_stored']:.3f} | {a['fused_read_over_stored']:.3f} | {ms(b)} | {ms(a)} | "
                     f"{speedup} | {ms(m)} | {peaks} |")
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
