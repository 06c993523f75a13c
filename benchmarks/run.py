"""Speed and memory of mlx-gemma, side by side with mlx-vlm (issue 6).

    python -m benchmarks.run --model PATH_OR_REPO --compare mlx-vlm        # the full profile (a Mac)
    python -m benchmarks.run --synthetic 2 --quick --compare mlx-vlm       # minutes on a 2-core CPU
    python -m benchmarks.run --synthetic 2 --long --compare mlx-vlm        # decode at 1K/8K/32K context

Full profile: prefill at 512, 4K and 32K prompt tokens; decode over 128 tokens at 512 and 32K
context; time to first token for an image at budgets 70, 280 and 1120, 30 s of audio and 60 s of
video; peak memory of each; one warm-up, 3 repetitions (median, min..max). Quick: a 16-token
prefill, 4 decode tokens at 32 and 1024 context, one budget-70 image, 2 repetitions. Long: 4
decode tokens at 1K, 8K and 32K context, caches pre-filled (issue 14: how decode cost and peak
memory grow with the context); each of our cases also gets the memory planner's prediction
for it (`memory.make_plan` at that context, a one-token step), beside the measured peak.

`--synthetic LAYERS` stands in for the real checkpoint (benchmarks/synthetic.py). Each
implementation runs in its own process (benchmarks/runners.py), so peak memory is its own.
With `--compare mlx-vlm` the ratios (ours / theirs; for times and memory, lower is better for
us) come two ways: each at its default settings (what a user gets), and both at the same weight
and activation dtypes (what the implementation is worth). Writes speed.json, speed.md and
speed.png (matplotlib, the `bench` extra) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_gemma.backend import DTYPES, activation_dtype
from mlx_gemma.config import ModelConfig
from mlx_gemma.errors import InputError, run_cli
from mlx_gemma.loading import resolve_model_path
from mlx_gemma.memory import KVOptions, activation_dtype_bytes, make_plan, tensor_bytes, weight_bytes
from mlx_gemma.quantization import QuantSpec

from . import roofline
from .synthetic import HUB_CONFIG, synthetic_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {
    "full": dict(cases=[["prefill", 512, 1], ["prefill", 4096, 1], ["prefill", 32768, 1],
                        ["decode", 512, 128], ["decode", 32768, 128],
                        ["image", 70, 1], ["image", 280, 1], ["image", 1120, 1],
                        ["audio", 30, 1], ["video", 60, 1]], repeats=3),
    "quick": dict(cases=[["prefill", 16, 1], ["decode", 32, 4], ["decode", 1024, 4], ["image", 70, 1]],
                  repeats=2),
    "long": dict(cases=[["decode", 1024, 4], ["decode", 8192, 4], ["decode", 32768, 4]], repeats=1),
}
# The peer at its defaults when those differ from ours (bfloat16 activations on the CPU backend,
# ~8x slower there): the quick profile times just a prefill and a short decode, once.
QUICK_PEER_DEFAULTS = dict(cases=[["prefill", 16, 1], ["decode", 32, 2]], repeats=1)
PEERS = ("mlx-vlm",)


def stored_dtype(path: Path) -> str:
    return {4: "float32", 2: "bfloat16"}[activation_dtype_bytes(path)]


def our_dtype(path: Path, config: ModelConfig, requested: str) -> str:
    dtype = activation_dtype(bool(config.quantization), requested)
    return str(dtype).removeprefix("mlx.core.") if dtype is not None else stored_dtype(path)


def run_worker(name: str, path: Path, dtype: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.runners", name, str(path), dtype, json.dumps(spec), str(out)]
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            raise InputError(f"{name}: benchmark worker failed (exit {done.returncode})")
        return json.loads(out.read_text())


def machine() -> dict:
    info = {"os": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "backend": str(mx.default_device()), "mlx": mx.__version__, "chip": platform.processor()}
    if platform.system() == "Darwin":
        chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        info["chip"] = chip.stdout.strip() or info["chip"]
    else:
        try:
            names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name")]
            info["chip"] = f"{names[0]} ({len(names)} cores)" if names else info["chip"]
        except OSError:
            pass
    try:
        import mlx_vlm

        info["mlx_vlm"] = mlx_vlm.__version__
    except ImportError:
        pass
    return info


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True)
    return (rev.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def annotate(result: dict, config: ModelConfig, weights: float, kv_layout: KVOptions) -> None:
    """Per case: tokens/s, and what it achieves against the roofline (bytes or FLOPs)."""
    text = config.text_config
    dtype_bytes = 4 if result["activation_dtype"] == "float32" else 2
    for c in result["cases"]:
        t = c["median_s"]
        if c["kind"] == "decode":
            step = weights + roofline.kv_bytes(text, c["value"], kv_layout, dtype_bytes)
            c.update(tokens_per_s=1 / t, bytes_per_step=step, achieved_gb_s=step / t / 1e9)
        else:
            flops = roofline.prefill_flops(text, c["prompt_tokens"])
            c.update(tokens_per_s=c["prompt_tokens"] / t, ttft_s=t, flops=flops, achieved_gflop_s=flops / t / 1e9)


def predict_peaks(result: dict, path: Path, config: ModelConfig) -> None:
    """What the memory planner predicts for each of our cases (weights + KV + activations; a
    decode case's step is one token), and the measured peak over it."""
    from mlx_gemma.generation import DEFAULT_PREFILL_STEP

    dtype_bytes = 4 if result["activation_dtype"] == "float32" else 2
    for c in result["cases"]:
        decode = c["kind"] == "decode"
        context = c["value"] + c["tokens"] if decode else c["prompt_tokens"] + 1
        plan = make_plan(config, weight_bytes(path, dtype_bytes), context, 1 << 50, KVOptions(), dtype_bytes,
                         1 if decode else DEFAULT_PREFILL_STEP)
        c.update(predicted_peak_bytes=plan.total, measured_over_predicted=c["peak_memory_bytes"] / plan.total)


def key(c: dict) -> str:
    return f"{c['kind']} {c['value']}"


def ratios(ours: dict, theirs: dict) -> dict:
    """ours / theirs per shared case: tokens/s (higher is better), and peak memory and, for
    time-to-first-token cases, time (lower is better)."""
    theirs_by = {key(c): c for c in theirs["cases"]}
    out = {}
    for c in ours["cases"]:
        t = theirs_by.get(key(c))
        if t is None:
            continue
        r = {"tokens_per_s": c["tokens_per_s"] / t["tokens_per_s"],
             "peak_memory": c["peak_memory_bytes"] / t["peak_memory_bytes"]}
        if c["kind"] != "decode":
            r["ttft"] = c["median_s"] / t["median_s"]
        out[key(c)] = r
    return out


def bytes_check(path: Path, config: ModelConfig) -> dict:
    """The decode weights the checkpoint holds vs the minimum for its quantization (config only)."""
    held = sum(n for name, n in tensor_bytes(path).items() if roofline.is_decode_weight(name))
    q = config.quantization
    base = QuantSpec(q["bits"], q["group_size"], q.get("mode", "affine")) if q else None
    minimum = roofline.weight_bytes_min(config, base)
    return {"decode_weight_bytes": held, "minimum_bytes": minimum, "ratio": held / minimum}


def table(report: dict) -> str:
    runs = report["runs"]
    ours = runs[0]
    head = ["case", f"mlx-gemma ({ours['activation_dtype']})"]
    peers = runs[1:]
    head += [f"{r['implementation']} ({r['activation_dtype']})" for r in peers]
    head += [f"ratio vs {r['implementation']} {r['setting']}" for r in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(c):
        if c is None:
            return "-"
        spread = f"{c['min_s']:.2f}-{c['max_s']:.2f} s"
        peak = f"peak {c['peak_memory_bytes'] / 1e9:.3f} GB"
        if "predicted_peak_bytes" in c:
            peak += f" (planned {c['predicted_peak_bytes'] / 1e9:.3f} GB, {c['measured_over_predicted']:.3f}x)"
        if c["kind"] == "decode":
            return f"{c['tokens_per_s']:.3g} tok/s ({spread}/tok), {c['achieved_gb_s']:.2f} GB/s, {peak}"
        return (f"TTFT {c['median_s']:.2f} s ({spread}), {c['tokens_per_s']:.3g} tok/s, "
                f"{c['achieved_gflop_s']:.2f} GFLOP/s, {peak}")

    for c in ours["cases"]:
        k = key(c)
        row = [f"{k} ({c['prompt_tokens']} prompt tokens)" if c["kind"] != "decode" else
               f"decode at {c['value']} ctx, {c['tokens']} tokens"]
        row.append(cell(c))
        for r in peers:
            row.append(cell(next((x for x in r["cases"] if key(x) == k), None)))
        for r in peers:
            rr = r["ratios"].get(k)
            row.append("-" if rr is None else
                       f"{rr['tokens_per_s']:.2f}x tok/s, {rr['peak_memory']:.2f}x memory" +
                       (f", {rr['ttft']:.2f}x TTFT" if "ttft" in rr else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in report["runs"]:
        label = f"{r['implementation']} ({r['activation_dtype']})"
        for ax, kind in zip(axes, ("prefill", "decode")):
            pts = sorted((c["value"], c["tokens_per_s"]) for c in r["cases"] if c["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
    for ax, title in zip(axes, ("prefill (prompt tokens)", "decode (context tokens)")):
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"{m['model']} - {m['machine']['chip']}, MLX {m['machine']['mlx']} {m['machine']['backend']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def benchmark(args) -> dict:
    layers = len(json.loads(HUB_CONFIG.read_text())["text_config"]["layer_types"])
    if args.synthetic is not None and not 1 <= args.synthetic <= layers:
        raise InputError(f"--synthetic: {args.synthetic} layers; the 12B has 1 to {layers}")
    if args.repeats is not None and args.repeats < 1:
        raise InputError(f"--repeats: must be at least 1, got {args.repeats}")
    if args.synthetic:
        path, model_name = synthetic_checkpoint(args.synthetic), f"synthetic 12B widths, {args.synthetic} layers"
    else:
        path, model_name = resolve_model_path(args.model), args.model
    config = ModelConfig.from_file(path / "config.json")
    profile_name = "quick" if args.quick else "long" if args.long else "full"
    profile = dict(PROFILES[profile_name])
    if args.repeats:
        profile["repeats"] = args.repeats
    mine = our_dtype(path, config, args.dtype)
    # (implementation, dtype, setting, profile): ours at its choice; the peer at the same dtype,
    # and at its own default (the checkpoint's dtype) when that differs.
    plan = [("mlx-gemma", args.dtype, "default", profile)]
    if args.compare:
        plan.append((args.compare, mine, "same dtypes", profile))
        theirs = stored_dtype(path)
        if theirs != mine:
            plan.append((args.compare, theirs, "defaults", profile if profile_name == "full" else QUICK_PEER_DEFAULTS))
    check = bytes_check(path, config)
    runs = []
    for name, dtype, setting, spec in plan:
        print(f"{name}, {setting} ({dtype}):", file=sys.stderr, flush=True)
        result = run_worker(name, path, dtype, spec)
        result["setting"] = setting
        layout = KVOptions(one_tensor=name == "mlx-gemma")  # mlx-vlm keeps keys and values
        annotate(result, config, check["decode_weight_bytes"], layout)
        if name == "mlx-gemma":
            predict_peaks(result, path, config)
        runs.append(result)
    for r in runs[1:]:
        r["ratios"] = ratios(runs[0], r)
    text = config.text_config
    real = ModelConfig.from_file(HUB_CONFIG)
    real_weights = roofline.weight_bytes_min(real)
    one = KVOptions()
    return {
        "meta": {"model": model_name, "checkpoint": str(path), "quantization": config.quantization,
                 "layers": text.num_hidden_layers, "machine": machine(), "commit": commit(),
                 "command": "python -m benchmarks.run " + " ".join(args.argv),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "profile": profile_name},
        "runs": runs,
        "bytes_check": check,
        "real_12b_decode_bytes": {"weights": real_weights,
                                  "kv_at_512": roofline.kv_bytes(real.text_config, 512, one, 2),
                                  "kv_at_32768": roofline.kv_bytes(real.text_config, 32768, one, 2)},
    }


def stem(profile: str) -> str:
    """Results file names: the long profile's beside the speed suite's, not over them."""
    return "speed_long" if profile == "long" else "speed"


def provenance(meta: dict) -> list[str]:
    """The lines under a results page's title: machine, backend, versions, commit, date, command."""
    m = meta["machine"]
    return [f"Machine: {m['chip']}, {m['os']}; backend MLX {m['mlx']} {m['backend']}; mlx-vlm "
            f"{m.get('mlx_vlm', '-')}; commit {meta['commit']}; {meta['date']}.", f"Command: `{meta['command']}`"]


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = stem(report["meta"]["profile"])
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    m, real = report["meta"], report["real_12b_decode_bytes"]
    check = report["bytes_check"]
    md = [f"# Speed: {m['model']}", "", *provenance(m), "", table(report), "",
          f"Decode weights held: {check['decode_weight_bytes'] / 1e9:.3f} GB, "
          f"{check['ratio']:.3f}x the minimum for the quantization ({check['minimum_bytes'] / 1e9:.3f} GB).", "",
          "## What the real 12B (4-bit default recipe, bfloat16 KV, one-tensor global cache) allows", "",
          f"A decode step reads {real['weights'] / 1e9:.2f} GB of weights plus "
          f"{real['kv_at_512'] / 1e9:.3f} GB of KV at 512 tokens, {real['kv_at_32768'] / 1e9:.3f} GB at 32K.", "",
          roofline.chip_table(real["weights"], real["kv_at_512"], real["kv_at_32768"], 32768), ""]
    (out / f"{name}.md").write_text("\n".join(md))
    plot(report, out / f"{name}.png")


def parser(prog: str, doc: str, quick: str) -> argparse.ArgumentParser:
    """The flags every speed benchmark shares: what to run on, its dtype, where results go."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint directory or Hugging Face repo id")
    which.add_argument("--synthetic", type=int, metavar="LAYERS",
                       help="a stand-in with the real widths and LAYERS layers (built once, cached)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="our activation dtype (auto: mlx-gemma's per-backend choice); the peer runs at it too")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def run_benchmark(p: argparse.ArgumentParser, argv, benchmark, write, name: str) -> None:
    """Parse, measure, write `name`.{json,md} (and print the markdown), errors in one line;
    `name` may be a function of the parsed arguments."""
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])

    def work():
        report = benchmark(args)
        write(report, args.out)
        print((args.out / f"{name(args) if callable(name) else name}.md").read_text())

    run_cli(work, "interrupted")


def main(argv=None) -> None:
    p = parser("python -m benchmarks.run", __doc__, "short prompts, few decode tokens, one small image")
    p.add_argument("--long", action="store_true", help="decode at 1K, 8K and 32K context (caches pre-filled), "
                   "with the memory planner's prediction beside each measured peak")
    p.add_argument("--compare", choices=PEERS, default=None, help="run the peer on the same checkpoint too")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    run_benchmark(p, argv, benchmark, write, lambda args: stem("long" if args.long else "full"))


if __name__ == "__main__":
    main()
