"""How to quantize the MTP drafter (spec 8), decided by numbers.

A synthetic drafter with the widths the 12B fixes (vocabulary 262144, backbone 3840, head dims
256 / 512, 2048 centroids of 128 tokens, top-32) and a stand-in hidden size (--hidden: the real
one is in the drafter's own config). Weights are trained-like (std 0.02, norms near 1), and the
embedding is clustered the way the ordered head assumes: the rows of the tokens a centroid owns
lie near that centroid, so its scores do predict where the best tokens are.

For each candidate: the bytes held, the bytes one draft step reads (the ordered head reads only
its 4096 candidate rows of the table), the relative error of the drafter's final state, its
greedy-token agreement with the unquantized (bfloat16) drafter, and the share of the top-32
centroids (the candidates) it keeps. Steps are rows of one call: each row is one draft step
(random embedding and hidden state) against the same random target K/V, which is all it attends to.

    python -m benchmarks.drafter_quant [--hidden 1024] [--steps 512] [--out benchmarks/results]

Arithmetic in float32 on bfloat16 weights (quantized ones dequantized), so only weight quantization
differs. A random drafter is unsure (its top two logits lie ~0.18 std apart), so the agreements are
pessimistic in absolute terms: the ranking is the finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlx_gemma.loading import build_model  # noqa: E402
from mlx_gemma.quantization import (CENTROIDS, DRAFTER_EMBEDDING, RECIPES, QuantSpec, module_spec,  # noqa: E402
                                    quantizable_paths)
from mlx_gemma.speculative import Drafter, DrafterConfig  # noqa: E402

B4, B8 = QuantSpec(4, 64), QuantSpec(8, 64)


def policy(rest: Optional[QuantSpec], embedding: Optional[QuantSpec], centroids: Optional[QuantSpec]) -> Callable:
    return lambda path: embedding if path == DRAFTER_EMBEDDING else centroids if path == CENTROIDS else rest


CANDIDATES = [  # (label, module path -> spec or None for bfloat16); layers: every other Linear
    ("all 4-bit", policy(B4, B4, B4)),
    ("4-bit, centroids bf16", policy(B4, B4, None)),
    ("layers 8-bit, embedding 4-bit, centroids bf16", policy(B8, B4, None)),
    ("layers bf16, embedding 4-bit, centroids bf16", policy(None, B4, None)),
    ("8-bit, centroids bf16", policy(B8, B8, None)),
    ("all 8-bit", policy(B8, B8, B8)),
    ("layers bf16, embedding 8-bit, centroids bf16", policy(None, B8, None)),
]
CONTEXT = 256  # target tokens the drafter attends to


def synthetic_config(hidden: int) -> DrafterConfig:
    import reference

    text = reference.text_config(**reference.REAL_WIDTHS)
    text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                layer_types=["sliding_attention"] * 3 + ["full_attention"], num_kv_shared_layers=4)
    return DrafterConfig.from_dict({"model_type": "gemma4_unified_assistant", "text_config": text,
                                    "backbone_hidden_size": 3840, "use_ordered_embeddings": True,
                                    "num_centroids": 2048, "centroid_intermediate_top_k": 32})


def synthetic_weights(config: DrafterConfig, seed: int = 0) -> dict[str, mx.array]:
    """bfloat16 weights; embedding rows = their centroid + as much noise again, scaled to std 0.02."""
    params = tree_flatten(Drafter(config).parameters())
    out = {}
    for (name, p), k in zip(params, mx.random.split(mx.random.key(seed), len(params))):
        if name.endswith("layer_scalar"):
            out[name] = 0.5 + 0.5 * mx.random.uniform(shape=p.shape, key=k)
        elif p.ndim == 1:  # norm scales (and the token ordering, set below)
            out[name] = 1 + 0.15 * mx.random.normal(p.shape, key=k)
        else:
            out[name] = 0.02 * mx.random.normal(p.shape, key=k)
    t, c = config.text_config, config.num_centroids
    k1, k2, k3 = mx.random.split(mx.random.key(seed + 1), 3)
    ordering = mx.random.permutation(t.vocab_size, key=k1).astype(mx.int32)
    means = mx.random.normal((c, t.hidden_size), key=k2)
    rows = mx.repeat(means, t.vocab_size // c, axis=0) + mx.random.normal((t.vocab_size, t.hidden_size), key=k3)
    out["model.embed_tokens.weight"] = 0.02 / 2**0.5 * rows[mx.argsort(ordering)]  # row j is token ordering[j]
    out["masked_embedding.centroids.weight"] = 0.02 * means
    out["masked_embedding.token_ordering"] = ordering
    return {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in out.items()}


def quantized_drafter(config: DrafterConfig, weights: dict, spec_of: Callable) -> tuple[Drafter, dict, dict]:
    """(the drafter with `spec_of`'s weights quantized and dequantized again, in float32, its
    stored tensors, the modules quantized). Fake quantization gives the quantized drafter's values
    (up to summation order) at dense float32 speed: the CPU's quantized matmul is much slower."""
    chosen = {path: spec_of(path) for path, _ in quantizable_paths(Drafter(config)) if spec_of(path)}
    stored, dense = dict(weights), {k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v
                                    for k, v in weights.items()}
    for path, spec in chosen.items():
        # Random weights lie on no QAT grid, where quantization.quantize is mx.quantize exactly
        # (tests/test_quantize.py): the plain one skips the grid search.
        w = stored.pop(f"{path}.weight")
        q, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
        stored.update({f"{path}.weight": q, f"{path}.scales": scales, f"{path}.biases": biases})
        dense[f"{path}.weight"] = mx.dequantize(q, scales, biases, group_size=spec.group_size, bits=spec.bits,
                                                dtype=mx.float32)
    return build_model(config, dense, Path("synthetic"), Drafter), stored, chosen


def inputs(config: DrafterConfig, steps: int, seed: int = 1):
    """(inputs_embeds of `steps` draft steps, the target K/V they attend to). Keys are scaled so
    that attention scores have a std of about 2: unit-RMS random keys would give sqrt(256) = 16, a
    near one-hot attention that any perturbation flips (a chaotic fixture, not a trained model)."""
    ks = mx.random.split(mx.random.key(seed), 5)
    kv = {}
    for i, s in enumerate({s.layer_type: s for s in config.text_config.layers}.values()):
        shape = (1, s.num_kv_heads, CONTEXT, s.head_dim)
        keys = 2 / s.head_dim ** 0.5 * mx.random.normal(shape, key=ks[2 * i])
        kv[s.layer_type] = (keys, mx.random.normal(shape, key=ks[2 * i + 1]))
    return mx.random.normal((1, steps, 2 * config.backbone_hidden_size), key=ks[4]), kv


def outcome(drafter: Drafter, embeds: mx.array, kv: dict, chunk: int = 64) -> dict[str, np.ndarray]:
    """The drafter state y, its greedy token and its top-k centroids; `chunk` steps at a time
    (the ordered head gathers 4096 rows of the table per step)."""
    head, out = drafter.masked_embedding, []
    for i in range(0, embeds.shape[1], chunk):
        y, _ = drafter.hidden(embeds[:, i:i + chunk], kv, CONTEXT)
        top = mx.argpartition(-head.centroids(y), head.top_k - 1, axis=-1)[..., :head.top_k]
        out.append({"y": y, "greedy": drafter.greedy(y), "centroids": top})
        mx.eval(out[-1])
    return {k: np.concatenate([np.array(o[k][0]) for o in out]) for k in out[0]}


def compare(got: dict, ref: dict) -> dict[str, float]:
    kept = [len(set(a) & set(b)) / len(a) for a, b in zip(got["centroids"], ref["centroids"])]
    return {"y_rel_error": float(np.linalg.norm(got["y"] - ref["y"]) / np.linalg.norm(ref["y"])),
            "agree": float((got["greedy"] == ref["greedy"]).mean()),
            "centroids_kept": float(np.mean(kept))}


def step_bytes(config: DrafterConfig, stored: dict) -> dict[str, int]:
    """Bytes held, and bytes one draft step reads: everything but the table, plus its candidate rows."""
    held = sum(v.nbytes for v in stored.values())
    table = sum(v.nbytes for k, v in stored.items() if k.startswith(DRAFTER_EMBEDDING + "."))
    rows = config.centroid_intermediate_top_k * (config.text_config.vocab_size // config.num_centroids)
    return {"held": held, "per_step": held - table + table * rows // config.text_config.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024, help="the drafter's hidden size (a stand-in)")
    ap.add_argument("--steps", type=int, default=512, help="draft steps compared")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    t0 = time.time()
    config = synthetic_config(args.hidden)
    weights = synthetic_weights(config)
    embeds, kv = inputs(config, args.steps)
    paths = [path for path, _ in quantizable_paths(Drafter(config))]
    reference, stored, _ = quantized_drafter(config, weights, lambda path: None)
    rows = [{"policy": "bf16 (reference)", **step_bytes(config, stored), "y_rel_error": 0.0, "agree": 1.0,
             "centroids_kept": 1.0, "recipes": []}]
    ref = outcome(reference, embeds, kv)
    del reference
    for label, spec_of in CANDIDATES:
        drafter, stored, chosen = quantized_drafter(config, weights, spec_of)
        recipes = [r for r in RECIPES if chosen == {p: s for p in paths if (s := module_spec(p, B4, r))}]
        rows.append({"policy": label, **step_bytes(config, stored), **compare(outcome(drafter, embeds, kv), ref),
                     "recipes": recipes})
        print(json.dumps(rows[-1]), file=sys.stderr)
        del drafter, stored
        mx.clear_cache()
    result = {"backend": str(mx.default_device()), "mlx": mx.__version__, "hidden_size": args.hidden,
              "steps": args.steps, "context": CONTEXT, "seconds": round(time.time() - t0), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"drafter_quant_h{args.hidden}.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (out / f"drafter_quant_h{args.hidden}.md").write_text(table)
    print(table)


def render(result: dict) -> str:
    lines = [f"hidden size {result['hidden_size']}, {result['steps']} draft steps against {result['context']} "
             "target tokens of K/V; agreement: the same greedy token as the bf16 drafter", "",
             "| policy | held (MB) | read per step (MB) | state y rel. error | greedy agreement | "
             "top-32 centroids kept | --recipe |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['policy']} | {r['held'] / 1e6:.1f} | {r['per_step'] / 1e6:.1f} | {r['y_rel_error']:.4f} | "
                     f"{r['agree']:.3f} | {r['centroids_kept']:.3f} | "
                     f"{', '.join(r['recipes'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
