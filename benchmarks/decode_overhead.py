"""Per-step overhead of decode: our step eager and compiled (`generation.compiled_decode`), and
mlx-vlm's, same run, same checkpoint, same activation dtype.

    python -m benchmarks.decode_overhead [--layers 1 6] [--context 1024] [--tokens 32]

The stand-ins are the 12B's config cut to LAYERS layers and narrowed (hidden 256, MLP 1024,
vocabulary 8192; benchmarks/synthetic.py, 4-bit default recipe): the matmuls are small, so a
step's time is mostly what does not scale with the weights (building the graph, launching
kernels, elementwise passes), the part compiling removes. Each implementation runs in its own
process (benchmarks.runners), caches pre-filled with CONTEXT tokens; a row is the median step
of three runs. "first decode" is the warm-up (a 4-token prompt and one step) with a cold kernel
cache (a fresh TMPDIR), i.e. what a first compiled run on a clean machine pays up front.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_gemma.config import ModelConfig
from mlx_gemma.errors import InputError

from .run import ROOT, commit, machine, our_dtype, provenance
from .synthetic import build

WIDTHS = dict(hidden_size=256, intermediate_size=1024, vocab_size=8192)
IMPLS = ("mlx-gemma:eager", "mlx-gemma:compiled", "mlx-vlm")


def worker(name: str, path: Path, dtype: str, spec: dict, tmpdir: str) -> dict:
    """benchmarks.runners in a child process whose temporary directory (MLX's kernel cache on
    the CPU backend) is `tmpdir`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.runners", name, str(path), dtype, json.dumps(spec), str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": tmpdir})
        if done.returncode != 0:
            raise InputError(f"{name}: benchmark worker failed (exit {done.returncode})")
        return json.loads(out.read_text())


def measure(layers: int, context: int, tokens: int, root: Path) -> dict:
    path = build(root / f"stand-in-{layers}", layers, **WIDTHS)
    dtype = our_dtype(path, ModelConfig.from_file(path / "config.json"), "auto")
    spec = {"cases": [["decode", context, tokens]], "repeats": 3}
    row = {"layers": layers, "dtype": dtype}
    kernels = tempfile.mkdtemp(dir=root)  # shared by the timed runs: they start warm
    for name in IMPLS:
        print(f"{layers} layers, {name} ({dtype})", file=sys.stderr, flush=True)
        worker(name, path, dtype, {**spec, "cases": [["decode", 8, 1]], "repeats": 1}, kernels)  # warm the cache
        r = worker(name, path, dtype, spec, kernels)
        row[name] = {"step_s": r["cases"][0]["median_s"], "min_s": r["cases"][0]["min_s"],
                     "max_s": r["cases"][0]["max_s"], "warm_first_decode_s": r["warmup_s"]}
        cold = worker(name, path, dtype, {"cases": [], "repeats": 1}, tempfile.mkdtemp(dir=root))
        row[name]["cold_first_decode_s"] = cold["warmup_s"]
    eager, compiled, peer = (row[n]["step_s"] for n in IMPLS)
    row["compiled_over_eager"] = compiled / eager
    row["speed_vs_mlx_vlm_eager"] = peer / eager
    row["speed_vs_mlx_vlm_compiled"] = peer / compiled
    return row


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["meta"]
    lines = ["# Decode step overhead: eager vs compiled vs mlx-vlm", "", *provenance(m), "",
             f"Stand-in: the 12B's layers narrowed to {m['widths']}, 4-bit; decode after {m['context']} "
             f"cached tokens, median of 3 runs of {m['tokens']} steps; same activation dtype for all.", "",
             "| layers | dtype | ours eager ms/step | ours compiled ms/step | mlx-vlm ms/step | compiled / eager "
             "| speed vs mlx-vlm (eager) | speed vs mlx-vlm (compiled) | first decode, cold kernel cache: "
             "eager / compiled / mlx-vlm s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        e, c, p = (r[n] for n in IMPLS)
        lines.append(f"| {r['layers']} | {r['dtype']} | {e['step_s'] * 1e3:.2f} ({e['min_s'] * 1e3:.2f}-"
                     f"{e['max_s'] * 1e3:.2f}) | {c['step_s'] * 1e3:.2f} ({c['min_s'] * 1e3:.2f}-{c['max_s'] * 1e3:.2f}) "
                     f"| {p['step_s'] * 1e3:.2f} ({p['min_s'] * 1e3:.2f}-{p['max_s'] * 1e3:.2f}) "
                     f"| {r['compiled_over_eager']:.2f} | {r['speed_vs_mlx_vlm_eager']:.2f}x "
                     f"| {r['speed_vs_mlx_vlm_compiled']:.2f}x | {e['cold_first_decode_s']:.1f} / "
                     f"{c['cold_first_decode_s']:.1f} / {p['cold_first_decode_s']:.1f} |")
    (out / "decode_overhead.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, args.context, args.tokens, Path(tmp)) for n in args.layers]
    report = {"meta": {"machine": machine(), "commit": commit(), "widths": WIDTHS, "context": args.context,
                       "tokens": args.tokens, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": "python -m benchmarks.decode_overhead " + " ".join(argv or sys.argv[1:])},
              "rows": rows}
    write(report, args.out)
    print((args.out / "decode_overhead.md").read_text())


if __name__ == "__main__":
    main()
