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
from mlx_gemma.checkpoint import quantize_checkpoint  # noqa: E402

HUB_CONFIG = ROOT / "tests" / "data" / "gemma-4-12B-it.config.json"
CANDIDATES = [  # (label, bits, group size, recipe): the recipes at the ecosystem's 4-bit gs64
    ("small: every Linear and the embedding 4-bit", 4, 64, "small"),
    ("default: + multimodal embedders 8-bit", 4, 64, "default"),
    ("quality: + embedding/output head 8-bit", 4, 64, "quality"),
]
KEEP = 16  # positions per prompt whose next-token distributions are compared


def build_source(path: Path) -> Path:
    import torch
    import reference

    return reference.build_checkpoint(path, dtype=torch.bfloat16, stats=reference.trained_like,
                                      num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                      **reference.REAL_WIDTHS)


def raw_prompts(vocab: int, seed: int = 0) -> dict:
    """Token ids, a smooth synthetic image (8x8 patches of 48x48 pixels) and two seconds of a
    chirp in 640-sample frames: the inputs every candidate embeds with its own embedders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:384, 0:384] / 384.0
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1) + 0.05 * rng.standard_normal((384, 384, 3))
    img = np.clip(img, 0, 1).astype(np.float32)
    t = np.arange(32000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)
    return {"ids": mx.array(rng.integers(300, vocab, size=(1, 48))),
            "patches": mx.array(img.reshape(8, 48, 8, 48, 3).transpose(0, 2, 1, 3, 4).reshape(1, 64, 6912)),
            "positions": mx.array(np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="xy"), -1)
                                  .reshape(1, 64, 2)),
            "frames": mx.array(wave.astype(np.float32).reshape(1, 50, 640))}


def prompts(model, raw: dict) -> dict[str, mx.array]:
    """inputs_embeds of a text, an image and an audio prompt, embedded by `model` itself."""
    text = model.language_model.model.embed(raw["ids"]).astype(mx.float32)
    image = model.embed_vision(model.vision_embedder(raw["patches"], raw["positions"])).astype(mx.float32)
    audio = model.embed_audio(raw["frames"]).astype(mx.float32)
    return {"text": text,
            "image": mx.concatenate([text[:, :8], image, text[:, 8:24]], axis=1),
            "audio": mx.concatenate([text[:, :8], audio, text[:, 8:24]], axis=1)}


def next_token_logprobs(model, embeds: mx.array) -> np.ndarray:
    logits = model(inputs_embeds=embeds, logits_to_keep=KEEP)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def capture_inputs(model, raw: dict) -> dict[str, mx.array]:
    """The input each Linear sees on the prompts (what its output error is measured on), and
    the final hidden states (what the tied head sees)."""
    names = {id(m): p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen = {}
    original = nn.Linear.__call__

    def recording(self, x):
        if id(self) in names:
            seen[names[id(self)]] = x.reshape(-1, x.shape[-1])[:32]
        return original(self, x)

    nn.Linear.__call__ = recording
    try:
        embeds = prompts(model, raw)
        h = model.language_model.model(embeds["text"], model.make_cache())
        mx.eval(h, seen)
    finally:
        nn.Linear.__call__ = original
    seen["head"] = h[0, -16:]
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
    ap.add_argument("--render", metavar="JSON", help="only print the table of an earlier result")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())), end="")
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    real = ModelConfig.from_file(HUB_CONFIG)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src = build_source(Path(tmp) / "src")
        print(f"built the real-width checkpoint in {time.time() - t0:.0f} s", file=sys.stderr)
        ref_model = load_model(src)
        ref_model.set_dtype(mx.float32)  # bf16 weights, float32 arithmetic
        raw = raw_prompts(real.text_config.vocab_size)
        reference = {k: next_token_logprobs(ref_model, e) for k, e in prompts(ref_model, raw).items()}
        inputs = capture_inputs(ref_model, raw)
        rows = []
        for label, bits, gs, recipe in CANDIDATES:
            qdir = quantize_checkpoint(str(src), str(Path(tmp) / f"q{bits}-{gs}-{recipe}"), bits, gs,
                                       recipe=recipe)
            q_model = load_model(qdir)
            q_model.set_dtype(mx.float32)
            row = {"policy": label, "bits": bits, "group_size": gs, "recipe": recipe,
                   "size_12b_gb": quantized_size(real, QuantSpec(bits, gs), recipe)["total_bytes"] / 1e9}
            for kind, e in prompts(q_model, raw).items():
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
    table = render(result)
    (out_dir / "quant_policy.md").write_text(table)
    print(table)


def render(result: dict) -> str:
    """Markdown table of a quant_policy.json result."""
    def errors(row, prefixes):
        vals = [v for k, v in row["matrix_rel_error"].items() if k.startswith(prefixes)]
        return max(vals) if vals else float("nan")

    lines = ["| policy | 12B size (GB) | KL text | KL image | KL audio | top-1 text / image / audio | "
             "decoder matrices (median rel. error) | multimodal matrices (max) | output head |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        decoder = [v for k, v in r["matrix_rel_error"].items() if k.startswith("language_model.")]
        head = r["matrix_rel_error"].get("embed_tokens (as head)", float("nan"))
        lines.append(
            f"| {r['policy']} | {r['size_12b_gb']:.2f} | {r['kl_text']:.2e} | {r['kl_image']:.2e} | "
            f"{r['kl_audio']:.2e} | {r['top1_text']:.2f} / {r['top1_image']:.2f} / {r['top1_audio']:.2f} | "
            f"{float(np.median(decoder)):.4f} | {errors(r, ('vision_embedder', 'embed_vision', 'embed_audio')):.4f} | "
            f"{head:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
