"""The measurements behind mlx_gemma/backend.py's choices, on the backend this runs on.

    python -m benchmarks.backend_choices [--out DIR]

1. One 4-bit quantized matmul of the MLP's size (15360 x 3840, group 64), one token: bfloat16
   activations, float32 activations with bfloat16 scales, float32 with float32 scales.
2. A decode step of the 2-layer stand-in shape (real widths, sliding + global layer, 4-bit, float32
   activations) with each quantized matmul whole, and split over one stream per core; and whether
   the logits are identical.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma.backend import default_splits, set_dtype, split_matmuls
from mlx_gemma.config import ModelConfig
from mlx_gemma.model import Model

from .preprocess import timed
from .synthetic import synthetic_config

ROOT = Path(__file__).resolve().parent.parent


def matmul_dtypes() -> dict:
    w = (mx.random.normal((15360, 3840)) * 0.02).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(wq, scales, biases)
    x = mx.random.normal((1, 3840))
    out = {}
    for name, xs, s, b in [("bfloat16 activations", x.astype(mx.bfloat16), scales, biases),
                           ("float32 activations, bfloat16 scales", x, scales, biases),
                           ("float32 activations, float32 scales", x, scales.astype(mx.float32),
                            biases.astype(mx.float32))]:
        out[name] = timed(lambda: mx.eval(mx.quantized_matmul(xs, wq, s, b, transpose=True, group_size=64, bits=4)), 5)
    return out


def decode_split() -> dict:
    model = Model(ModelConfig.from_dict(synthetic_config(2)))
    nn.quantize(model, group_size=64, bits=4)
    set_dtype(model, mx.float32)
    mx.eval(model.parameters())
    out, logits = {}, {}
    for name, n in [("whole", 1), (f"split over {default_splits()} streams", None)]:
        split_matmuls(model, n)
        cache = model.make_cache()
        mx.eval(model(mx.array([[2, 5, 7]]), cache=cache, logits_to_keep=1))
        out[name] = timed(lambda: mx.eval(model(mx.array([[9]]), cache=cache)), 3)
        cache = model.make_cache()
        logits[name] = np.array(model(mx.array([[2, 5, 7, 9]]), cache=cache))
    a, b = logits.values()
    out["identical_logits"] = bool(np.array_equal(a, b))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    results = {"meta": {"backend": str(mx.default_device()), "mlx": mx.__version__, "system": platform.platform(),
                        "cores": default_splits()},
               "matmul_15360x3840_4bit_one_token": matmul_dtypes(), "decode_step_2_layers": decode_split()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backend_choices.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
