"""The real Gemma 4 12B's memory, from its config alone: weight sizes under each quantization
setting, KV bytes per token by cache kind, and the longest context each Mac holds.

    python -m benchmarks.sizes

On-disk and in-memory weight sizes are the same: MLX keeps weights as stored, and the output
head is the (possibly quantized) embedding itself, not a copy. Mac budgets assume macOS's
default GPU working set (`memory.mac_budget`: 2/3 of unified memory, 11.45 GB on a 16 GB Mac); on
a Mac, `python -m mlx_gemma.generate --plan` uses the real value.
"""

from pathlib import Path

from mlx_gemma.config import ModelConfig, parameter_count
from mlx_gemma.memory import GB, KVOptions, global_bytes_per_token, human, longest_context, mac_budget, make_plan
from mlx_gemma.quantization import QuantSpec, quantized_size

HUB_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma-4-12B-it.config.json"
SETTINGS = [(4, 64, "default"), (4, 64, "small"), (4, 64, "quality"), (4, 32, "default"), (8, 64, "default")]
KV_KINDS = [("two tensors, bfloat16", KVOptions(one_tensor=False)), ("one tensor, bfloat16", KVOptions()),
            ("one tensor, 8-bit", KVOptions(bits=8)), ("one tensor, 4-bit", KVOptions(bits=4))]
MACS = (16, 24, 32)


def main() -> None:
    cfg = ModelConfig.from_file(HUB_CONFIG)
    print("| weights | recipe | size (GB) |\n|---|---|---|")
    for bits, gs, recipe in SETTINGS:
        b = quantized_size(cfg, QuantSpec(bits, gs), recipe)["total_bytes"]
        print(f"| {bits}-bit, group size {gs} | {recipe} | {b / GB:.2f} |")
    print(f"| bfloat16 | - | {parameter_count(cfg)['total'] * 2 / GB:.2f} |")
    weights = int(quantized_size(cfg, QuantSpec(), "default")["total_bytes"])
    print(f"\nWith 4-bit weights ({weights / GB:.2f} GB); sliding-window layers hold a bounded "
          f"{make_plan(cfg, weights, 1, 1, KVOptions()).sliding / GB:.2f} GB whatever the context.\n")
    print("| global KV cache | per token | " + " | ".join(f"max context, {m} GB Mac" for m in MACS) + " |")
    print("|---|---|" + "---|" * len(MACS))
    for label, kv in KV_KINDS:
        per_token = global_bytes_per_token(cfg.text_config, kv, 2)
        contexts = [longest_context(cfg, weights, mac_budget(m), kv) for m in MACS]
        print(f"| {label} | {human(per_token)} | " + " | ".join(f"{c:,}" for c in contexts) + " |")
    for label, kv in KV_KINDS[1:3]:
        print(f"\nThe full 262,144-token context on a 16 GB Mac, global KV cache {label}:\n")
        print(make_plan(cfg, weights, 262_144, mac_budget(16), kv).table())


if __name__ == "__main__":
    main()
