"""KV cache and long-context memory (issue: the 16 GB budget).

    python -m benchmarks.kv_memory [--context 8192] [--decode-contexts 1024,8192,32768] [--out DIR]

1. Decode cost of the one-tensor global cache vs the two-tensor cache (and 8-bit KV): time per
   decode step of a model with the real 12B geometry (5 sliding : 1 global layer, head dims
   256/512, kv heads 8/1, window 1024, hidden 3840, MLP 15360) and 4-bit weights, with its
   caches filled to each context length.
2. The long-context claim, scaled down: a model with the real attention geometry (16 heads,
   head dims 256/512, kv heads 8/1, window 1024) but a narrow residual stream (512), a small
   vocabulary and 3 layers (sliding, global, global) prefills `--context` tokens
   through the generation path (adaptive chunks); the measured peak memory is compared with
   the planner's prediction.

Backend, MLX version and dtype are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma.cache import SlidingWindowCache
from mlx_gemma.config import ModelConfig
from mlx_gemma.generation import generate_step
from mlx_gemma.memory import KVOptions, make_plan, prefill_chunk
from mlx_gemma.model import Model

from .synthetic import fill_global

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / "tests" / "data" / "gemma-4-12B-it.config.json").read_text())


def config(layers: int, types=None, **text) -> ModelConfig:
    d = json.loads(json.dumps(HUB))
    types = types or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    d["text_config"].update(num_hidden_layers=layers, layer_types=types, **text)
    d.pop("vision_config")
    d.pop("audio_config")
    return ModelConfig.from_dict(d)


def fill(cache: list, layers: list, context: int) -> None:
    """Caches (of the LayerSpecs `layers`) holding `context` tokens of random keys/values (what a
    prefill would leave)."""
    for c, spec in zip(cache, layers):
        if isinstance(c, SlidingWindowCache):
            n = min(context, c.window - 1 + c.slack)
            c.offset = context - n  # as if the first tokens had been evicted
            c._len = 0
            x = mx.random.normal((1, 8, n, 256)) * 0.1
            c.update_and_fetch(x, x)
        else:
            fill_global(c, spec, context, scale=0.1)
    mx.eval([c.state for c in cache])


def decode_cost(contexts: list[int], steps: int = 8, repeats: int = 3) -> list[dict]:
    cfg = config(6)
    model = Model(cfg)
    nn.quantize(model, group_size=64, bits=4)
    model.set_dtype(mx.float32)  # float32 activations: the CPU backend's fast path
    mx.eval(model.parameters())
    rows = []
    for ctx in contexts:
        row = {"context": ctx}
        for name, opts in [("two_tensor", dict(one_tensor=False)), ("one_tensor", dict(one_tensor=True)),
                           ("one_tensor_8bit", dict(one_tensor=True, kv_bits=8))]:
            times = []
            for _ in range(repeats):
                cache = model.make_cache(**opts)
                fill(cache, cfg.text_config.layers, ctx)
                token = mx.array([[1000]])
                mx.eval(model(token, cache=cache))  # warm-up
                t0 = time.perf_counter()
                for _ in range(steps):
                    mx.eval(model(token, cache=cache))
                times.append((time.perf_counter() - t0) / steps * 1000)
                del cache
            row[f"{name}_ms"] = statistics.median(times)
            row[f"{name}_spread_ms"] = max(times) - min(times)
        row["one_tensor_over_two"] = row["one_tensor_ms"] / row["two_tensor_ms"]
        rows.append(row)
        print(json.dumps(row))
    return rows


def long_context(context: int) -> dict:
    # sliding, global, global: a prefill chunk's cache needs no attention in the last layer
    # (MLX never computes it), so a global layer must come before the last one.
    layers = 3
    cfg = config(layers, ["sliding_attention", "full_attention", "full_attention"], hidden_size=512,
                 intermediate_size=1024, vocab_size=4096)
    model = Model(cfg)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    kv = KVOptions(one_tensor=True)
    plan = make_plan(cfg, weights, context + 1, budget=1 << 40, kv=kv, dtype_bytes=4)
    ids = np.random.default_rng(0).integers(10, 4000, size=context).tolist()
    cache = model.make_cache(one_tensor=True)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    steps = generate_step(model, ids, cache, max_tokens=1,
                          prefill_step_size=lambda done: prefill_chunk(cfg.text_config, done, 512, 4))
    next(steps)
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    return {"context": context, "layers": layers, "predicted_peak_bytes": plan.total, "measured_peak_bytes": peak,
            "measured_over_predicted": peak / plan.total, "prefill_seconds": seconds,
            "plan": dict(plan.rows())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--decode-contexts", default="1024,8192,32768",
                    help="'' skips part 1 and keeps the decode rows already in the results file")
    ap.add_argument("--note", default="", help="conditions of the run (e.g. other load on the machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    if not args.decode_contexts and not (out / "kv_memory.json").is_file():
        ap.error(f"--decode-contexts '': {out / 'kv_memory.json'} holds no decode rows to keep")
    result = {"backend": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
              "system": platform.system(), "activations": "float32", "weights": "4-bit gs64 (decode)",
              "note": args.note}
    result["long_context"] = long_context(args.context)
    print(json.dumps(result["long_context"], indent=2))
    if args.decode_contexts:
        result["decode"] = decode_cost([int(c) for c in args.decode_contexts.split(",")])
    else:
        result["decode"] = json.loads((out / "kv_memory.json").read_text())["decode"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
