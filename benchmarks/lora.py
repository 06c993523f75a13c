"""LoRA training speed and peak memory, ours vs mlx-vlm's trainer, same stand-in, same run.

The stand-in is the 12B's config cut to `--layers` layers (benchmarks/synthetic.py), 4-bit by
the default recipe, with `--hidden/--intermediate/--vocab` narrowing it where this machine
cannot run the real widths (a 2-core CPU takes minutes per real-width step). The tiny test
tokenizer is written beside it (its ids fit any vocabulary), so both trainers read the same
jsonl chats, each example rendered to just under `--seq` tokens.

For each sequence length and with / without gradient checkpointing, each trainer runs
`--iters` steps in a child process (batch 1, rank 8 on every projection of every layer, Adam,
no validation) and its own last report gives tokens/s and peak memory (mx.get_peak_memory,
weights included). Our memory planner's prediction for the same run stands beside our peak.

The heads keep the 12B's (16 of 256, global 512) unless `--heads N --head-dim D` narrows them
with its proportions: N heads of D, N / 2 key-value heads, global heads of 2D with one
key-value head; `--hidden 256 --heads 4 --head-dim 64` is the 12B's shape at 1/15 of its width.

    python -m benchmarks.lora [--layers 2] [--hidden 512] [--intermediate 2048] [--vocab 16384]
                              [--heads N --head-dim D] [--seq 256 1024] [--iters 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.synthetic import build  # noqa: E402
from mlx_gemma.loading import load  # noqa: E402
from mlx_gemma.memory import human  # noqa: E402
from mlx_gemma.tuning import budget  # noqa: E402

WORDS = ["cat", "dog", "sky", "blue", "tree", "red", "sun", "moon"]


def stand_in(out: Path, layers: int, **widths) -> Path:
    import reference

    build(out, layers, **widths)
    config = json.loads((out / "config.json").read_text())
    config.update(reference.TOKEN_IDS)  # the test tokenizer's placeholder ids
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = reference.make_tokenizer()
    tokenizer.save_pretrained(out)
    reference.make_processor(tokenizer).save_pretrained(out)
    return out


def write_data(out: Path, processor, seq: int, examples: int = 4) -> Path:
    """Chats of random words, each rendered to at most `seq` tokens (mlx-vlm truncates there)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(examples):
        n = seq
        while True:  # shrink until the rendered chat fits
            messages = [{"role": "user", "content": " ".join(rng.choice(WORDS, 8))},
                        {"role": "assistant", "content": " ".join(rng.choice(WORDS, n))}]
            if len(processor.chat_inputs(messages, add_generation_prompt=False).ids) <= seq:
                break
            n = int(n * 0.9)
        rows.append({"messages": messages})
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def ours(model: Path, data: Path, seq: int, iters: int, checkpoint: bool, tmp: Path, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "mlx_gemma.lora", "--model", str(model), "--train", "--data", str(data), "--dtype", dtype,
           "--iters", str(iters), "--batch-size", "1", "--num-layers", "-1", "--rank", "8",
           "--max-seq-length", str(seq), "--steps-per-report", "1", "--steps-per-eval", str(10 * iters),
           "--save-every", str(10 * iters), "--adapter-path", str(tmp / "ours"), "--force"]
    out = _run(cmd + (["--grad-checkpoint"] if checkpoint else []))
    last = [line for line in out.splitlines() if "Train loss" in line][-1]
    return {"tokens_per_second": float(re.search(r"Tokens/sec ([0-9.]+)", last).group(1)),
            "peak_memory_gb": float(re.search(r"Peak mem ([0-9.]+) GB", last).group(1))}


def theirs(model: Path, data: Path, seq: int, iters: int, checkpoint: bool, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "mlx_vlm.train", "--model", str(model), "--data", str(data), "--iters", str(iters),
           "--batch-size", "1", "--lora-rank", "8", "--max-seq-length", str(seq), "--steps-per-report", "1",
           "--steps-per-eval", str(10 * iters), "--steps-per-save", str(10 * iters), "--output-path",
           str(tmp / "theirs"), "--grad-checkpoint" if checkpoint else "--no-grad-checkpoint"]
    out = _run(cmd)
    last = out[out.rindex("Training (iteration"):]
    return {"tokens_per_second": float(re.search(r" tokens_per_second=([0-9.e+-]+)", last).group(1)),
            "peak_memory_gb": float(re.search(r"peak_memory=([0-9.e+-]+)", last).group(1))}


def _run(cmd: list) -> str:
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{run.stderr[-2000:]}")
    return run.stdout


def predicted(model: Path, seq: int, checkpoint: bool, dtype: str) -> int:
    args = types.SimpleNamespace(memory_limit=None, dtype=dtype, batch_size=1, max_seq_length=seq, num_layers=-1,
                                 lora_parameters={"rank": 8, "scale": 20.0, "dropout": 0.0},
                                 grad_checkpoint=checkpoint)
    return budget.training_plan(model, args).total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the 12B's)")
    ap.add_argument("--head-dim", type=int, default=None, help="with --heads: their dimension")
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if (args.heads is None) != (args.head_dim is None) or (args.heads is not None and args.heads < 2):
        ap.error("--heads N (at least 2) and --head-dim D go together")
    heads = {} if args.heads is None else dict(num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                                                head_dim=args.head_dim, global_head_dim=2 * args.head_dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = stand_in(tmp / "stand-in", args.layers, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, vocab_size=args.vocab, **heads)
        _, processor = load(model, lazy=True)
        for seq in args.seq:
            data = write_data(tmp / f"data-{seq}", processor, seq)
            for checkpoint in (False, True):
                # bfloat16: mlx-vlm's activations (the stand-in's dtype); auto: our default
                row = {"seq": seq, "grad_checkpoint": checkpoint,
                       "ours": ours(model, data, seq, args.iters, checkpoint, tmp, "bfloat16"),
                       "ours_default": ours(model, data, seq, args.iters, checkpoint, tmp, "auto"),
                       "mlx_vlm": theirs(model, data, seq, args.iters, checkpoint, tmp),
                       "planned_gb": predicted(model, seq, checkpoint, "bfloat16") / 1e9,
                       "planned_default_gb": predicted(model, seq, checkpoint, "auto") / 1e9}
                row["speed_ratio"] = row["ours"]["tokens_per_second"] / row["mlx_vlm"]["tokens_per_second"]
                row["memory_ratio"] = row["ours"]["peak_memory_gb"] / row["mlx_vlm"]["peak_memory_gb"]
                row["default_speed_ratio"] = row["ours_default"]["tokens_per_second"] / row["mlx_vlm"]["tokens_per_second"]
                row["plan_error"] = row["planned_gb"] / row["ours"]["peak_memory_gb"] - 1
                row["default_plan_error"] = row["planned_default_gb"] / row["ours_default"]["peak_memory_gb"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"backend": "gpu" if mx.metal.is_available() or mx.cuda.is_available() else "cpu",
            "machine": f"{platform.machine()} {platform.system()}, {platform.processor() or ''}".strip(", "),
            "mlx": mx.__version__, "layers": args.layers, "hidden": args.hidden,
            "intermediate": args.intermediate, "vocab": args.vocab, "heads": args.heads, "head_dim": args.head_dim,
            "iters": args.iters,
            "dtypes": "same dtype: bfloat16 activations for both (mlx-vlm's, as stored); ours at defaults: "
                      "float32 activations on the CPU backend for a quantized model"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"LoRA training, batch 1, rank 8 on every projection; {args.layers}-layer stand-in "
             f"(hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}"
             + (f", {args.heads} heads of {args.head_dim}" if args.heads else ", the 12B's heads")
             + f"), 4-bit; {meta['backend']}, "
             f"MLX {meta['mlx']}; {meta['dtypes']}", "",
             "| seq | checkpointing | ours tok/s | mlx-vlm tok/s | speed | ours peak | mlx-vlm peak | memory | "
             "planned | plan error | ours at defaults: tok/s, speed, peak, plan error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq']} | {'yes' if r['grad_checkpoint'] else 'no'} | {r['ours']['tokens_per_second']:.2f} | "
                     f"{r['mlx_vlm']['tokens_per_second']:.2f} | {r['speed_ratio']:.2f}x | "
                     f"{r['ours']['peak_memory_gb']:.3f} GB | {r['mlx_vlm']['peak_memory_gb']:.3f} GB | "
                     f"{r['memory_ratio']:.2f}x | {human(r['planned_gb'] * 1e9)} | {100 * r['plan_error']:+.1f}% | "
                     f"{r['ours_default']['tokens_per_second']:.2f}, {r['default_speed_ratio']:.2f}x, "
                     f"{r['ours_default']['peak_memory_gb']:.3f} GB, {100 * r['default_plan_error']:+.1f}% |")
    (out / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
