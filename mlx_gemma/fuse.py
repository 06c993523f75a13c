"""`python -m mlx_gemma.fuse --model M --adapter-path A --save-path OUT`: adapters merged into
the weights, as mlx-lm's `mlx_lm.fuse` does; or `--export-peft DIR`: the adapters as a PEFT
directory that transformers + peft load.

A quantized base is dequantized where an adapter sits, merged, and quantized again at that
layer's own bits and group size (`--dequantize`: the whole model stays dequantized;
`--quantize RECIPE`: the merged model is quantized afresh by our recipes, through
`quantize_checkpoint`). Outputs are written to a temporary directory and renamed.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from .errors import ArgumentParser, InputError, run_cli
from .quantization import add_quant_flags


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.fuse",
                       description="Merge LoRA / DoRA adapters into a Gemma 4 checkpoint, or export them for PEFT.")
    p.add_argument("--model", required=True, help="base checkpoint directory or Hugging Face repo id")
    p.add_argument("--adapter-path", required=True, help="adapters (mlx_gemma.lora / mlx-lm output, or PEFT)")
    p.add_argument("--save-path", default=None,
                   help="where to write the merged checkpoint (default: none, only --export-peft)")
    p.add_argument("--dequantize", action="store_true", help="write the merged model unquantized")
    p.add_argument("--quantize", action="store_true",
                   help="quantize the merged model afresh with --bits/--group-size/--mode/--recipe")
    add_quant_flags(p)
    p.add_argument("--export-peft", default=None, metavar="DIR",
                   help="write the adapters as a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors) "
                        "(default: none)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (--save-path, --export-peft), only if mlx-gemma wrote it")
    return p


def fused(model, dequantize: bool = False):
    """Every adapted layer replaced by its merged linear layer, as mlx_lm.fuse does (its
    LoRALinear / DoRALinear `fuse`); with `dequantize`, every other quantized layer too."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    merged = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not merged:
        raise InputError("--adapter-path: the adapters replaced no layer")
    model.update_modules(tree_unflatten(merged))
    return dequantize_model(model) if dequantize else model


def write_fused(model, source: Path, out: Path, dequantize: bool, force: bool) -> Path:
    from mlx.utils import tree_flatten

    from .checkpoint import write_checkpoint
    from .config import hub_form

    config = hub_form(json.loads((source / "config.json").read_text()))
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    params = tree_flatten(model.parameters())
    return write_checkpoint(out, source, ((k, v, v.nbytes) for k, v in params), config,
                            sum(v.nbytes for _, v in params), force=force, desc="Fusing")


def peft_export(model, base: str) -> tuple[dict, dict]:
    """(adapter_config.json, weights) of our LoRA layers as PEFT writes them: A [r, in], B [out, r],
    lora_alpha = scale * r; target_modules a regex of exactly the adapted modules, rank/alpha
    patterns where a module differs from the first one."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    from .tuning.adapters import transformers_name

    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_a")]
    if not layers:
        raise InputError("--export-peft: the adapters replaced no layer")
    if any(not isinstance(m, LoRALinear) for _, m in layers):
        raise InputError("--export-peft: only LoRA adapters export to PEFT (DoRA's magnitudes do not map)")
    names = [transformers_name(n) for n, _ in layers]
    if None in names:
        raise InputError(f"--export-peft: {layers[names.index(None)][0]} has no transformers name PEFT could target")
    ranks = {t: m.lora_a.shape[1] for t, (_, m) in zip(names, layers)}
    alphas = {t: float(m.scale) * ranks[t] for t, (_, m) in zip(names, layers)}
    r, alpha = ranks[names[0]], alphas[names[0]]
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
              "target_modules": "(?:" + "|".join(re.escape(t) for t in names) + ")",
              "rank_pattern": {f"^{re.escape(t)}$": v for t, v in ranks.items() if v != r},
              "alpha_pattern": {f"^{re.escape(t)}$": v for t, v in alphas.items() if v != alpha},
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
    weights = {}
    for t, (_, m) in zip(names, layers):
        weights[f"base_model.model.{t}.lora_A.weight"] = m.lora_a.T.astype(mx.float32)
        weights[f"base_model.model.{t}.lora_B.weight"] = m.lora_b.T.astype(mx.float32)
    return config, weights


def run(args) -> list:
    import mlx.core as mx

    from .checkpoint import quantize_checkpoint
    from .outputs import check_destination, output_folder, save_safetensors
    from .loading import load_model, resolve_model_path

    if not args.save_path and not args.export_peft:
        raise InputError("give --save-path (a merged checkpoint) and/or --export-peft DIR")
    if args.dequantize and args.quantize:
        raise InputError("--dequantize and --quantize: choose one")
    out = Path(args.save_path).expanduser() if args.save_path else None
    export = Path(args.export_peft).expanduser() if args.export_peft else None
    if out and export:
        a, b = out.resolve(), export.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise InputError(f"--save-path {args.save_path} and --export-peft {args.export_peft}: "
                             f"{'the same folder' if a == b else 'one inside the other'}; name two separate folders")
    for path in (out, export):
        if path:
            check_destination(path, args.force)  # before loading anything
    source = resolve_model_path(args.model)
    model = load_model(source, dtype=None, split=1, adapter_path=args.adapter_path)
    written = []
    # The export goes in place only after the merged checkpoint: a fuse that fails leaves neither.
    with output_folder(export, args.force) if export else nullcontext() as peft:
        if export:
            config, weights = peft_export(model, str(args.model))
            save_safetensors(peft / "adapter_model.safetensors", weights, export, metadata={"format": "pt"})
            (peft / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if out and not args.quantize:
            written.append(write_fused(fused(model, args.dequantize), source, out, args.dequantize, args.force))
        elif out:
            # beside the output, on its disk: the merged model is as large as the base
            with tempfile.TemporaryDirectory(dir=next(p for p in out.absolute().parents if p.exists())) as tmp:
                plain = write_fused(fused(model, dequantize=True), source, Path(tmp) / "merged", True, False)
                del model
                mx.clear_cache()
                written.append(quantize_checkpoint(str(plain), str(out), args.bits, args.group_size, args.mode,
                                                   args.recipe, force=args.force))
    return [export, *written] if export else written


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    for path in run_cli(lambda: run(args), "interrupted: nothing was written"):
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
