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
from typing import Optional

import mlx.core as mx
from tqdm import tqdm

from .config import ModelConfig
from .errors import CheckpointError, InputError, MlxGemmaError
from .loading import check_weights, load_weights, resolve_model_path
from .model import Model

MAX_SHARD_BYTES = 5 << 30
WEIGHT_INDEX = "model.safetensors.index.json"
# Tokenizer, chat template, processor and generation files travel with the weights.
SIDE_FILE_SUFFIXES = {".json", ".jinja", ".model", ".txt"}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def plan_shards(weights: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Names grouped into shards in sorted order, each shard under `max_bytes` (sizes from shapes)."""
    shards, current, size = [], [], 0
    for name in sorted(weights):
        n = weights[name].nbytes
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def _prepare_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise InputError(f"{dst}: exists and is not empty (use --force to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{dst.parent}: cannot create ({e.strerror})") from None


def write_checkpoint(dst: Path, src: Path, weights: dict[str, mx.array], config: dict,
                     force: bool = False, desc: str = "Converting") -> Path:
    """Write `weights` + `config` + the side files of `src` as an MLX checkpoint, atomically."""
    _prepare_destination(dst, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        shards = plan_shards(weights)
        weight_map, total = {}, 0
        bar = tqdm(total=sum(weights[k].nbytes for k in weights), unit="B", unit_scale=True,
                   desc=desc, file=sys.stderr, disable=None)
        for i, names in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = {k: weights[k] for k in names}
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "mlx"})
            for k in names:
                weight_map[k] = fname
                total += shard[k].nbytes
            bar.update(sum(shard[k].nbytes for k in names))
            del shard
            mx.clear_cache()
        bar.close()
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


def convert(hf_path: str, mlx_path: str, dtype: Optional[str] = None, force: bool = False) -> Path:
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    src = resolve_model_path(hf_path)
    config_file = src / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{src}: no config.json (not a model checkpoint directory)")
    config = ModelConfig.from_file(config_file)
    if config.quantization:
        raise InputError(f"{src}: already quantized; convert reads unquantized checkpoints")
    weights = load_weights(src, progress=True)
    check_weights(Model(config), weights, src)
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    raw_config = json.loads(config_file.read_text())
    return write_checkpoint(Path(mlx_path).expanduser(), src, weights, raw_config, force=force)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.convert",
                                description="Convert a Gemma 4 unified Hugging Face checkpoint to MLX.")
    p.add_argument("--hf-path", required=True, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = convert(args.hf_path, args.mlx_path, dtype=args.dtype, force=args.force)
    except MlxGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
