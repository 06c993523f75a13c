"""Peak memory of a chunked prefill: ours vs mlx-vlm, same run, same checkpoint, each at its
default chunking, and the memory planner's prediction for ours.

    python -m benchmarks.prefill_memory [--prompt 4096]
    python -m benchmarks.prefill_memory --replan   # the current planner against the recorded peaks

The stand-in has 3 layers, global, sliding, global: a prefill chunk computes every layer's
attention but the last one's (only the last layer's cache is evaluated), so the first global
layer is the one whose attention a chunk holds at its peak, as 7 of the 12B's 8 global layers
are; then the 12B's last two. Widths narrowed as benchmarks.decode_overhead's (hidden 256, MLP
1024, vocabulary 8192; 4-bit): the attention geometry (16 heads, head dims 256 / 512, kv heads
8 / 1, the window) is the 12B's, so what a prefill holds beyond its weights (a chunk's attention
scores, the caches) is at the 12B's size per layer, while the weights, most of the 12B's peak,
are small enough for the difference to show. Each implementation runs in its own process
(benchmarks.runners): a warm-up, then one prefill of PROMPT tokens into a fresh cache; the peak
includes the weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from mlx_gemma.config import ModelConfig
from mlx_gemma.memory import weight_bytes

from .decode_overhead import WIDTHS, worker
from .run import ROOT, commit, machine, our_dtype, provenance, predict_peaks
from .synthetic import build

LAYERS = ["full_attention", "sliding_attention", "full_attention"]


def measure(prompt: int, root: Path) -> dict:
    path = build(root / "stand-in", len(LAYERS), layer_types=LAYERS, **WIDTHS)
    config = ModelConfig.from_file(path / "config.json")
    dtype = our_dtype(path, config, "auto")
    spec = {"cases": [["prefill", prompt, 1]], "repeats": 1}
    row = {"layers": ", ".join(t.split("_")[0] for t in LAYERS), "dtype": dtype, "prompt": prompt,
           "weights_bytes": weight_bytes(path)}
    for name in ("mlx-gemma", "mlx-vlm"):
        print(f"{name} ({dtype}): prefill {prompt}", file=sys.stderr, flush=True)
        result = worker(name, path, dtype, spec, tempfile.mkdtemp(dir=root))
        if name == "mlx-gemma":
            predict_peaks(result, path, config)
        row[name] = result["cases"][0]
    ours, theirs = row["mlx-gemma"]["peak_memory_bytes"], row["mlx-vlm"]["peak_memory_bytes"]
    row["peak_ratio"] = ours / theirs
    row["beyond_weights_ratio"] = (ours - row["weights_bytes"]) / (theirs - row["weights_bytes"])
    return row


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["meta"]
    replanned = [f"Planned by the planner at commit {m['planned_at']} (`python -m benchmarks.prefill_memory "
                 "--replan`: the stand-in rebuilt, same seed), against the peaks measured in the run above."] \
        if "planned_at" in m else []
    lines = ["# Peak memory of a chunked prefill: mlx-gemma vs mlx-vlm", "", *provenance(m), *replanned, "",
             f"Stand-in: 3 layers (a global layer, then the 12B's last two) narrowed to {m['widths']}, 4-bit; "
             "the 12B's attention geometry; one prefill into a fresh "
             "cache, each implementation at its default chunking; peaks include the weights.", "",
             "| layers | prompt tokens | dtype | weights | mlx-gemma peak | mlx-vlm peak | ratio | beyond the weights: "
             "ours / theirs | ours / planned | prefill s: ours / theirs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        o, t = r["mlx-gemma"], r["mlx-vlm"]
        lines.append(f"| {r['layers']} | {r['prompt']:,} | {r['dtype']} | {r['weights_bytes'] / 1e6:.1f} MB "
                     f"| {o['peak_memory_bytes'] / 1e6:.1f} MB | {t['peak_memory_bytes'] / 1e6:.1f} MB "
                     f"| {r['peak_ratio']:.2f}x | {(o['peak_memory_bytes'] - r['weights_bytes']) / 1e6:.1f} / "
                     f"{(t['peak_memory_bytes'] - r['weights_bytes']) / 1e6:.1f} MB ({r['beyond_weights_ratio']:.2f}x) "
                     f"| {o['measured_over_predicted']:.3f}x | {o['median_s']:.1f} / {t['median_s']:.1f} |")
    (out / "prefill_memory.md").write_text("\n".join(lines) + "\n")


def replan(out: Path) -> None:
    """The current planner's predictions for the peaks recorded in `out`."""
    recorded = out / "prefill_memory.json"
    if not recorded.is_file():
        raise SystemExit(f"error: {recorded}: no recorded run to replan (run python -m benchmarks.prefill_memory)")
    report = json.loads(recorded.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "stand-in", len(LAYERS), layer_types=LAYERS, **WIDTHS)
        config = ModelConfig.from_file(path / "config.json")
        for row in report["rows"]:
            predict_peaks({"activation_dtype": row["dtype"], "cases": [row["mlx-gemma"]]}, path, config)
    report["meta"]["planned_at"] = commit()
    write(report, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefill_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--replan", action="store_true", help="recompute the planned peaks of the recorded run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.replan:
        replan(args.out)
        print((args.out / "prefill_memory.md").read_text())
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args.prompt, Path(tmp))]
    report = {"meta": {"machine": machine(), "commit": commit(), "widths": WIDTHS,
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": "python -m benchmarks.prefill_memory " + " ".join(argv or sys.argv[1:])},
              "rows": rows}
    write(report, args.out)
    print((args.out / "prefill_memory.md").read_text())


if __name__ == "__main__":
    main()
