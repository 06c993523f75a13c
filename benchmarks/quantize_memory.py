"""Peak memory of streaming quantization vs the size of the checkpoint it reads.

Builds (with transformers) a multi-shard bfloat16 checkpoint with the real 12B widths and
a few layers, runs `python -m mlx_gemma.quantize` on it in a child process and reports the
child's peak resident memory next to the checkpoint, its largest shard and largest tensor.

    python -m benchmarks.quantize_memory [--layers 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlx_gemma.loading import weight_files  # noqa: E402
from mlx_gemma.memory import tensor_bytes, weight_bytes  # noqa: E402

GB = 1e9
# The quantize CLI in a child that reports its own peak resident memory, in bytes. On Linux
# that is VmHWM: getrusage's ru_maxrss would count the parent's pages shared at fork time.
CHILD = """
import resource, runpy, sys
sys.argv = ["mlx_gemma.quantize", "--model", sys.argv[1], "--out", sys.argv[2]]
runpy.run_module("mlx_gemma.quantize", run_name="__main__")
if sys.platform == "darwin":
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
else:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) * 1024)
"""


def main() -> None:
    import torch
    import reference

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(args.layers)]
    with tempfile.TemporaryDirectory() as tmp:
        src = reference.build_checkpoint(Path(tmp) / "src", dtype=torch.bfloat16, stats=reference.trained_like,
                                         max_shard_size="1GB", num_hidden_layers=args.layers, layer_types=types,
                                         **reference.REAL_WIDTHS)
        shards = weight_files(src)
        largest_tensor = max(tensor_bytes(src).values())
        t0 = time.time()
        run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "q4")], cwd=ROOT,
                             capture_output=True, text=True)
        seconds = time.time() - t0
        if run.returncode:
            sys.exit(run.stderr)
        peak = int(run.stdout.split()[-1])
        result = {
            "backend": str(mx.default_device()), "mlx": mx.__version__, "layers": args.layers,
            "checkpoint_gb": weight_bytes(src) / GB, "shards": len(shards),
            "largest_shard_gb": max(f.stat().st_size for f in shards) / GB,
            "largest_tensor_gb": largest_tensor / GB,
            "output_gb": weight_bytes(Path(tmp) / "q4") / GB,
            "peak_rss_gb": peak / GB, "seconds": seconds,
        }
    result["peak_over_checkpoint"] = result["peak_rss_gb"] / result["checkpoint_gb"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
