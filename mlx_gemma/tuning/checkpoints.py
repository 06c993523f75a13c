"""Training checkpoints in mlx-lm's layout: `adapters.safetensors` (the latest), one
`NNNNNNN_adapters.safetensors` per save and `adapter_config.json`, each written to a temporary
file and renamed, so an interrupted or failed save leaves the previous one whole. The
iteration rides in the safetensors metadata, which is how a resumed run knows where it was.
adapter_config.json is read back here too: what adapters load with, and the base model they name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import CheckpointError

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def checkpoint_name(iteration: int) -> str:
    return f"{iteration:07d}_adapters.safetensors"


def adapter_config(args: dict) -> dict:
    """What mlx-lm writes to adapter_config.json (its run's options), JSON values only."""
    return {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def read_config(path: Path) -> dict:
    """An adapter directory's adapter_config.json (mlx-lm's, ours or PEFT's)."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not an adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def resolve_base_model(model: Optional[str], adapter_path, default: str) -> str:
    """The checkpoint a CLI loads: `model` when given; else the base model the adapters at
    `adapter_path` were trained on, as their adapter_config.json records it (mlx-lm's and ours:
    "model"; PEFT's: "base_model_name_or_path"); else `default`."""
    if model is not None:
        return model
    if adapter_path is None:
        return default
    config = read_config(Path(adapter_path))
    base = config.get("base_model_name_or_path" if "peft_type" in config else "model")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{Path(adapter_path) / CONFIG_FILE}: names no base model ('model', or PEFT's "
                              "'base_model_name_or_path'); give --model")
    return base


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix: mx.save_safetensors appends one otherwise
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot save the adapters ({e.strerror or e}); the last saved ones "
                              "are intact") from None


def save(model, directory: Path, config: dict, iteration: int) -> None:
    """The trainable parameters (the adapters) as the checkpoint of `iteration` and the latest."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    metadata = {"iteration": str(iteration)}
    _replace(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=4)))
    for name in (checkpoint_name(iteration), ADAPTER_FILE):
        _replace(directory / name, lambda p: mx.save_safetensors(str(p), weights, metadata=metadata))


def resume(model, path: Path) -> int:
    """Load adapter weights saved by a run (ours or mlx-lm's) and return the iteration they
    were saved at (0 when the file does not say: mlx-lm's own files)."""
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read adapter weights ({str(e).splitlines()[0]})") from None
    expected = dict(tree_flatten(model.trainable_parameters()))
    wrong = sorted(k for k, v in weights.items() if k not in expected or v.shape != expected[k].shape)
    if wrong or not weights:
        raise CheckpointError(f"{path}: does not fit these adapters ({', '.join(wrong[:3]) or 'no tensors'}; "
                              "same --num-layers, --rank and --fine-tune-type?)")
    model.load_weights(list(weights.items()), strict=False)
    try:
        return int(metadata.get("iteration", 0))
    except ValueError:
        raise CheckpointError(f"{path}: iteration {metadata['iteration']!r} in its metadata is not a number") from None
