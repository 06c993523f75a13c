"""`python -m mlx_gemma.convert`: a Hugging Face checkpoint -> an MLX checkpoint directory.

Output: safetensors shards of at most 5 GB with `model.safetensors.index.json`, the original
config.json, and the tokenizer / chat template / processor / generation files. Tensors are
streamed shard by shard, so memory stays bounded by one output shard. Everything is written
to a temporary directory beside DST and renamed on success: an error or Ctrl-C leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
from tqdm import tqdm

from .backend import DTYPES
from .config import ModelConfig, hub_form
from .errors import ArgumentParser, CheckpointError, InputError, run_cli
from .loading import check_weights, load_weights, resolve_model_path
from .model import Model

MAX_SHARD_BYTES = 5 << 30
WEIGHT_INDEX = "model.safetensors.index.json"
# Tokenizer, chat template, processor and generation files travel with the weights.
SIDE_FILE_SUFFIXES = {".json", ".jinja", ".model", ".txt"}


def _prepare_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise InputError(f"{dst}: exists and is not empty (use --force to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{dst.parent}: cannot create ({e.strerror})") from None


def write_checkpoint(dst: Path, src: Path, tensors: Iterable[tuple[str, mx.array, int]], config: dict,
                     total_bytes: int = 0, force: bool = False, desc: str = "Converting",
                     max_shard_bytes: Optional[int] = None) -> Path:
    """Write a stream of (name, tensor, source bytes) + `config` + the side files of `src` as an MLX
    checkpoint, atomically. Each tensor is evaluated as it arrives and a shard is written as
    soon as it is full, so memory stays bounded by one shard whatever the model size."""
    _prepare_destination(dst, force)
    limit = max_shard_bytes or MAX_SHARD_BYTES
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write ({e.strerror or e})") from None
    try:
        files: list[list[str]] = []
        shard: dict[str, mx.array] = {}
        bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                   disable=None)

        def flush():
            mx.save_safetensors(str(tmp / f"part-{len(files)}.safetensors"), shard, metadata={"format": "mlx"})
            files.append(list(shard))
            shard.clear()
            mx.clear_cache()

        for name, tensor, source_bytes in tensors:
            mx.eval(tensor)
            if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > limit:
                flush()
            shard[name] = tensor
            bar.update(source_bytes)
        if shard:
            flush()
        bar.close()
        weight_map, total = {}, 0
        for i, names in enumerate(files):
            fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (tmp / f"part-{i}.safetensors").rename(tmp / fname)
            for k in names:
                weight_map[k] = fname
            total += (tmp / fname).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / WEIGHT_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in SIDE_FILE_SUFFIXES and f.name not in ("config.json", WEIGHT_INDEX):
                shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{dst}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_source(hf_path: str) -> tuple[Path, ModelConfig, dict, dict[str, mx.array]]:
    """Resolve and check an unquantized source checkpoint: (dir, config, raw config, lazy weights)."""
    src = resolve_model_path(hf_path)
    config_file = src / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{src}: no config.json (not a model checkpoint directory)")
    config = ModelConfig.from_file(config_file)
    if config.quantization:
        raise InputError(f"{src}: already quantized ({config.quantization.get('bits')}-bit); "
                         "start from the unquantized checkpoint")
    weights = load_weights(src, progress=True)
    check_weights(Model(config), weights, src)
    return src, config, hub_form(json.loads(config_file.read_text())), weights


def drain(weights: dict[str, mx.array]):
    """Yield (name, tensor) while dropping each from `weights`, so a tensor's memory is freed
    once it has been written."""
    for name in sorted(weights):
        yield name, weights.pop(name)


def convert(hf_path: str, mlx_path: str, dtype: Optional[str] = None, force: bool = False) -> Path:
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    src, _, raw_config, weights = read_source(hf_path)
    total = sum(v.nbytes for v in weights.values())
    target = DTYPES.get(dtype)

    def tensors():
        for name, w in drain(weights):
            cast = w.astype(target) if target is not None and mx.issubdtype(w.dtype, mx.floating) else w
            yield name, cast, w.nbytes

    return write_checkpoint(Path(mlx_path).expanduser(), src, tensors(), raw_config, total, force=force)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.convert",
                                description="Convert a Gemma 4 unified Hugging Face checkpoint to MLX.")
    p.add_argument("--hf-path", required=True, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating weights (default: keep)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (as python -m mlx_gemma.quantize)")
    from .quantize import add_quant_flags

    add_quant_flags(p)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        if not args.quantize:
            return convert(args.hf_path, args.mlx_path, dtype=args.dtype, force=args.force)
        from .quantize import quantize_checkpoint

        return quantize_checkpoint(args.hf_path, args.mlx_path, args.bits, args.group_size, args.mode,
                                   args.recipe, force=args.force)

    out = run_cli(work, "interrupted: nothing was written")
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
