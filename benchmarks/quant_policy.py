"""Which tensors to quantize, decided by numbers (issue: quantization policy).

Builds, with transformers, a checkpoint with the real 12B widths (hidden 3840, MLP 15360,
vocabulary 262144, head dims 256/512, the real vision and audio embedders) and 2 decoder
layers (one sliding, one global), with trained-like weight statistics. For each candidate
policy it reports the size the policy gives the real 12B, the KL divergence and top-1
agreement of next-token distributions against the bfloat16 weights on text, image and
audio prompts, and each quantized matrix's relative output error on activations captured
from the bfloat16 model.

    python -m benchmarks.quant_policy [--out benchmarks/results]

Evaluation runs with float32 activations (fast on the CPU backend); the reference is the
unquantized bfloat16 weights, so only weight quantization differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlx_gemma.config import ModelConfig, parameter_count  # noqa: E402
from mlx_gemma.loading import load_model  # noqa: E402
from mlx_gemma.quantization import QuantSpec, quantized_size  # noqa: E402
from mlx_gemma.quantize import quantize_checkpoint  # noqa: E402

HUB_CONFIG = ROOT / "tests" / "data" / "gemma-4-12B-it.config.json"
CANDIDATES = [  # (label, bits, group size, recipe)
    ("4-bit gs64 small (everything 4-bit)", 4, 64, "small"),
    ("4-bit gs64 default (multimodal 8-bit)", 4, 64, "default"),
    ("4-bit gs64 quality (+ embedding/head 8-bit)", 4, 64, "quality"),
    ("4-bit gs32 default", 4, 32, "default"),
    ("8-bit gs64 default", 8, 64, "default"),
]
KEEP = 16  # positions per prompt whose next-token distributions are compared


def build_source(path: Path) -> Path:
    import torch
    import reference

    return reference.build_checkpoint(path, dtype=torch.bfloat16, stats=reference.trained_like,
                                      num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                      **reference.REAL_WIDTHS)


def prompts(model, seed: int = 0) -> dict[str, mx.array]:
    """inputs_embeds for a text prompt, an image prompt and an audio prompt (64 + soft tokens)."""
    rng = np.random.default_rng(seed)
    lm = model.language_model.model
    text = mx.array(rng.integers(300, model.config.text_config.vocab_size, size=(1, 64)))
    embeds = lm.embed(text).astype(mx.float32)
    # A smooth synthetic image: 8x8 patches of 48x48 pixels, gradients plus noise, in [0, 1].
    yy, xx = np.mgrid[0:384, 0:384] / 384.0
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1) + 0.05 * rng.standard_normal((384, 384, 3))
    img = np.clip(img, 0, 1).astype(np.float32)
    patches = img.reshape(8, 48, 8, 48, 3).transpose(0, 2, 1, 3, 4).reshape(1, 64, 48 * 48 * 3)
    pos = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="xy"), -1).reshape(1, 64, 2)
    image = model.embed_vision(model.vision_embedder(mx.array(patches), mx.array(pos))).astype(mx.float32)
    # Two seconds of a chirp with noise, cut into 640-sample frames.
    t = np.arange(32000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)
    audio = model.embed_audio(mx.array(wave.astype(np.float32).reshape(1, 50, 640))).astype(mx.float32)
    return {"text": embeds,
            "image": mx.concatenate([embeds[:, :8], image, embeds[:, 8:24]], axis=1),
            "audio": mx.concatenate([embeds[:, :8], audio, embeds[:, 8:24]], axis=1)}


def next_token_logprobs(model, embeds: mx.array) -> np.ndarray:
    logits = model(inputs_embeds=embeds, logits_to_keep=KEEP)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def capture_inputs(model, embeds: mx.array) -> dict[str, mx.array]:
    """The input each Linear sees on a prompt (what its output error is measured on), and the
    final hidden states (what the tied head sees)."""
    names = {id(m): p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen = {}
    original = nn.Linear.__call__

    def recording(self, x):
        if id(self) in names:
            seen[names[id(self)]] = x.reshape(-1, x.shape[-1])[:64]
        return original(self, x)

    nn.Linear.__call__ = recording
    try:
        h = model.language_model.model(embeds, model.make_cache())
        mx.eval(h, seen)
    finally:
        nn.Linear.__call__ = original
    seen["head"] = h[0, -64:]
    return seen


def matrix_errors(ref_model, q_model, inputs: dict[str, mx.array]) -> dict[str, float]:
    ref_modules, q_modules = dict(ref_model.named_modules()), dict(q_model.named_modules())
    errs = {}
    for path, x in inputs.items():
        if isinstance(q_modules.get(path), nn.QuantizedLinear):
            y, yq = ref_modules[path](x), q_modules[path](x)
            errs[path] = float(mx.linalg.norm(y - yq) / mx.linalg.norm(y))
    emb = q_model.language_model.model.embed_tokens
    if isinstance(emb, nn.QuantizedEmbedding):  # the tied head, on the final hidden states
        h = inputs["head"]
        y = ref_model.language_model.model.embed_tokens.as_linear(h)
        errs["embed_tokens (as head)"] = float(mx.linalg.norm(y - emb.as_linear(h)) / mx.linalg.norm(y))
    return errs


def kl_and_top1(ref: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    p = np.exp(ref)
    kl = float((p * (ref - q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == q.argmax(-1)).mean())
    return kl, top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    real = ModelConfig.from_file(HUB_CONFIG)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src = build_source(Path(tmp) / "src")
        print(f"built the real-width checkpoint in {time.time() - t0:.0f} s", file=sys.stderr)
        ref_model = load_model(src)
        ref_model.set_dtype(mx.float32)  # bf16 weights, float32 arithmetic
        embeds = prompts(ref_model)
        reference = {k: next_token_logprobs(ref_model, e) for k, e in embeds.items()}
        inputs = capture_inputs(ref_model, embeds["text"])
        rows = []
        for label, bits, gs, recipe in CANDIDATES:
            qdir = quantize_checkpoint(str(src), str(Path(tmp) / f"q{bits}-{gs}-{recipe}"), bits, gs,
                                       recipe=recipe)
            q_model = load_model(qdir)
            q_model.set_dtype(mx.float32)
            row = {"policy": label, "bits": bits, "group_size": gs, "recipe": recipe,
                   "size_12b_gb": quantized_size(real, QuantSpec(bits, gs), recipe)["total_bytes"] / 1e9}
            for kind, e in embeds.items():
                row[f"kl_{kind}"], row[f"top1_{kind}"] = kl_and_top1(reference[kind], next_token_logprobs(q_model, e))
            errs = matrix_errors(ref_model, q_model, inputs)
            row["matrix_rel_error_median"] = float(np.median(list(errs.values())))
            row["matrix_rel_error_max"] = max(errs.values())
            row["matrix_rel_error"] = errs
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "matrix_rel_error"}), file=sys.stderr)
            del q_model
            mx.clear_cache()
    result = {"backend": str(mx.default_device()), "mlx": mx.__version__, "activations": "float32",
              "reference": "bfloat16 weights", "layers": 2, "positions_per_prompt": KEEP,
              "bf16_size_12b_gb": parameter_count(real)["total"] * 2 / 1e9, "rows": rows}
    (out_dir / "quant_policy.json").write_text(json.dumps(result, indent=2))
    lines = ["| policy | 12B size (GB) | KL text | KL image | KL audio | top-1 text | top-1 image | "
             "top-1 audio | matrix rel. error (median / max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['size_12b_gb']:.2f} | {r['kl_text']:.2e} | {r['kl_image']:.2e} | "
                     f"{r['kl_audio']:.2e} | {r['top1_text']:.3f} | {r['top1_image']:.3f} | {r['top1_audio']:.3f} | "
                     f"{r['matrix_rel_error_median']:.4f} / {r['matrix_rel_error_max']:.4f} |")
    (out_dir / "quant_policy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
