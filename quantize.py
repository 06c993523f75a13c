"""Quantize a checkpoint to 4-bit: see `python quantize.py --help`."""

from mlx_gemma.quantize import main

if __name__ == "__main__":
    main()
