"""What one decode step of B sequences costs in process (`Model.step_rows`, the forward the
server's batch runs), with no server around it: the ceiling of a batched server's throughput on
this backend (issue 30).

    python -m benchmarks.batch_step [--synthetic 2] [--batches 1,2,4,8,16] [--context 32]

A step of B rows reads the weights once; where a step is bound by reading them (Metal, CUDA),
B rows cost little more than one and the aggregate grows about B-fold. Where it is bound by
arithmetic (the CPU backend's quantized matmul dequantizes per row), a step costs B times one
and batching cannot raise the aggregate. The table gives seconds per step and per row, the
aggregate it allows (B / step), and the bytes each step reads (weights once, each row's KV)
over its time: the achieved bandwidth. The model is server_throughput's real-width stand-in
(the 12B's widths and vocabulary, --synthetic layers, float32 on the CPU backend) or --model.
Each row's caches hold --context tokens. Writes batch_step.json and batch_step.md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .run import commit, machine, provenance
from .server_throughput import chosen_model, model_flags

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3


def measure(model, batches: list, context: int) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma.prompt_cache import cache_bytes

    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rows = []
    for b in batches:
        caches = [model.make_cache() for _ in range(b)]
        for c in caches:
            model(mx.array([[5] * context]), cache=c, logits_to_keep=1)
        mx.eval([x.state for c in caches for x in c])
        kv = sum(cache_bytes(c) for c in caches)
        ids = mx.array([[7]] * b)
        mx.eval(model.step_rows(ids, caches))  # warm-up (the caches grow one token a step)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            mx.eval(model.step_rows(ids, caches))
            times.append(time.perf_counter() - start)
        step = min(times)
        rows.append({"batch": b, "step_s": step, "per_row_s": step / b, "aggregate_tok_s": b / step,
                     "bytes": nbytes + kv, "gb_s": (nbytes + kv) / step / 1e9})
        print(f"B={b}: {step:.3f} s a step", file=sys.stderr, flush=True)
    return rows


def render(report: dict) -> str:
    rows = report["rows"]
    one = rows[0]
    lines = [f"# One decode step of B sequences: {report['meta']['model']}", "", *provenance(report["meta"]), "",
             f"Each row's caches hold {report['meta']['context']} tokens; the least of {REPEATS} steps after a "
             "warm-up.", "",
             "| B | step s | per row s | step / B=1 step | aggregate tok/s | vs B=1 | bytes read GB | achieved GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['step_s']:.3f} | {r['per_row_s']:.3f} | {r['step_s'] / one['step_s']:.2f}x | "
                     f"{r['aggregate_tok_s']:.2f} | {r['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x | "
                     f"{r['bytes'] / 1e9:.2f} | {r['gb_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> None:
    from mlx_gemma.errors import InputError, run_cli

    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p, "a checkpoint directory")
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8, 16],
                   help="batch sizes, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--context", type=int, default=32, help="tokens each row's caches hold (default 32)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    def work():
        from mlx_gemma.loading import load

        if not args.batches or min(args.batches) < 1:
            raise InputError(f"--batches: positive batch sizes, got {args.batches}")
        if args.context < 1:
            raise InputError(f"--context: at least 1, got {args.context}")
        path, name, _ = chosen_model(args)
        model, _ = load(path)
        report = {"meta": {"model": name, "checkpoint": str(path), "context": args.context, "machine": machine(),
                           "commit": commit(), "command": "python -m benchmarks.batch_step "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": datetime.datetime.now().isoformat(timespec="seconds")},
                  "rows": measure(model, args.batches, args.context)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batch_step.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "batch_step.md").write_text(render(report))
        print(render(report))

    run_cli(work)


if __name__ == "__main__":
    main()
