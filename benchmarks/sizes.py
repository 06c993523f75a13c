"""Size of the real Gemma 4 12B under each quantization setting, from its config alone.

    python -m benchmarks.sizes

On-disk and in-memory sizes are the same: MLX keeps weights as stored, and the output head
is the (possibly quantized) embedding itself, not a copy.
"""

from pathlib import Path

from mlx_gemma.config import ModelConfig, parameter_count
from mlx_gemma.quantization import QuantSpec, quantized_size

HUB_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma-4-12B-it.config.json"
SETTINGS = [(4, 64, "default"), (4, 64, "small"), (4, 64, "quality"), (4, 32, "default"), (8, 64, "default")]


def main() -> None:
    cfg = ModelConfig.from_file(HUB_CONFIG)
    print("| weights | recipe | size (GB) | size (GiB) |\n|---|---|---|---|")
    for bits, gs, recipe in SETTINGS:
        b = quantized_size(cfg, QuantSpec(bits, gs), recipe)["total_bytes"]
        print(f"| {bits}-bit, group size {gs} | {recipe} | {b / 1e9:.2f} | {b / 2**30:.2f} |")
    b = parameter_count(cfg)["total"] * 2
    print(f"| bfloat16 | - | {b / 1e9:.2f} | {b / 2**30:.2f} |")


if __name__ == "__main__":
    main()
