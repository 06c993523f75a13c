"""`python -m mlx_gemma.convert`: a Hugging Face checkpoint -> an MLX checkpoint directory.

The work is `checkpoint.convert` (and `checkpoint.quantize_checkpoint` with -q): streamed shard
by shard, written to a temporary folder renamed on success, so an error or a signal leaves nothing.
"""

from __future__ import annotations

import sys
from typing import Optional

from .backend import DTYPES
from .errors import ArgumentParser, run_cli
from .quantization import add_quant_flags


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.convert",
                       description="Convert a Gemma 4 unified Hugging Face checkpoint (or its MTP drafter) to MLX.")
    p.add_argument("--hf-path", required=True, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating weights to this dtype (default: keep them as stored)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (as python -m mlx_gemma.quantize)")
    add_quant_flags(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder, only if mlx-gemma wrote it")
    return p


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        from .checkpoint import convert, quantize_checkpoint  # after parsing: --help stays instant

        if not args.quantize:
            return convert(args.hf_path, args.mlx_path, dtype=args.dtype, force=args.force)
        return quantize_checkpoint(args.hf_path, args.mlx_path, args.bits, args.group_size, args.mode,
                                   args.recipe, force=args.force)

    out = run_cli(work, "interrupted: nothing was written")
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
