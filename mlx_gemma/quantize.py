"""`python -m mlx_gemma.quantize`: an unquantized checkpoint -> a group-quantized MLX checkpoint.

Streaming: tensors are read, quantized and written one by one, so peak memory is bounded by
one output shard plus one tensor, not by the model (a 16 GB Mac can quantize the 24 GB
bfloat16 checkpoint). The output is written atomically, like convert's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional


from .convert import drain, read_source, write_checkpoint
from .errors import ArgumentParser, run_cli
from .model import Model
from .quantization import BITS, GROUP_SIZES, MODES, RECIPES, QuantSpec, plan, quantization_entry, quantize


def quantize_checkpoint(src: str, out: str, bits: int = 4, group_size: int = 64, mode: str = "affine",
                        recipe: str = "default", force: bool = False) -> Path:
    base = QuantSpec(bits, group_size, mode)
    src_dir, config, raw_config, weights = read_source(src)
    chosen = plan(Model(config), base, recipe)
    total = sum(v.nbytes for v in weights.values())

    def tensors():
        for name, w in drain(weights):
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in chosen:
                for part, t in quantize(w, chosen[module]).items():
                    yield f"{module}.{part}", t, w.nbytes if part == "weight" else 0
            else:
                yield name, w, w.nbytes

    raw_config["quantization"] = quantization_entry(chosen, base)
    raw_config.pop("quantization_config", None)
    return write_checkpoint(Path(out).expanduser(), src_dir, tensors(), raw_config, total, force=force,
                            desc=f"Quantizing to {bits}-bit")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, choices=BITS, default=4)
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64)
    p.add_argument("--mode", choices=MODES, default="affine")
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="which tensors get how many bits (README: Quantization policy)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.quantize",
                                description="Quantize a Gemma 4 unified checkpoint for MLX (streaming).")
    p.add_argument("--model", required=True, help="unquantized checkpoint directory or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory")
    add_quant_flags(p)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    out = run_cli(lambda: quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.mode,
                                              args.recipe, force=args.force), "interrupted: nothing was written")
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()


def cache_root() -> Path:
    return Path(os.environ.get("MLX_GEMMA_CACHE", Path.home() / ".cache" / "mlx-gemma")).expanduser()


def quantized_copy(model: str, path: Path, why: str) -> Path:
    """The default 4-bit copy of an unquantized checkpoint in the cache, made once (streaming)."""
    spec = QuantSpec()
    name = re.sub(r"[^\w.-]+", "--", model.strip("/")) + f"-{spec.bits}bit-gs{spec.group_size}-default"
    out = cache_root() / name
    if (out / "config.json").exists():
        print(f"Using the {spec.bits}-bit copy of {model} in {out}", file=sys.stderr)
        return out
    print(f"{model}: {why}; quantizing to {spec.bits}-bit once into {out} (delete it to free the space; "
          "--no-quantize skips this)", file=sys.stderr)
    return quantize_checkpoint(str(path), str(out), spec.bits, spec.group_size, spec.mode, force=True)
