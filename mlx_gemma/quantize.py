"""`python -m mlx_gemma.quantize`: an unquantized checkpoint -> a group-quantized MLX checkpoint.

The work is `checkpoint.quantize_checkpoint`: tensors are read, quantized and written one by one,
so peak memory is one output shard plus one tensor, not the model (a 16 GB Mac can quantize the
24 GB bfloat16 checkpoint), and the output appears whole or not at all.
"""

from __future__ import annotations

import sys
from typing import Optional

from .errors import ArgumentParser, run_cli
from .quantization import add_quant_flags


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.quantize",
                       description="Quantize a Gemma 4 unified checkpoint (or its MTP drafter) for MLX (streaming).")
    p.add_argument("--model", required=True, help="unquantized checkpoint directory or Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory")
    add_quant_flags(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder, only if mlx-gemma wrote it")
    return p


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        from .checkpoint import quantize_checkpoint  # after parsing: --help stays instant

        return quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.mode, args.recipe,
                                   force=args.force)

    out = run_cli(work, "interrupted: nothing was written")
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
