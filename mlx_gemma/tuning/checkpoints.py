"""Training checkpoints in mlx-lm's layout: `adapters.safetensors` (the latest), one
`NNNNNNN_adapters.safetensors` per save and `adapter_config.json`, with `loss_curve.png` beside
them, each written to a temporary file and renamed, so an interrupted or failed save leaves the
previous one whole. The iteration and the losses reported so far ride in the safetensors
metadata: a resumed run knows where it was, and its loss curve goes on from the first run's.

The folder is checked before the first step and carries checkpoint.py's manifest. A run's first
save puts the whole folder in place at once (`output_folder`: a new folder, or with --force one
mlx-gemma wrote), so a run that stops before it leaves nothing; a resumed run adds to the folder
of the file it resumed from, if mlx-gemma wrote it and no checkpoint still to come is there.
adapter_config.json is read back here too: what adapters load with, and the base model they name."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..outputs import (cannot_write, check_destination, not_ours, output_folder, record_written,
                       save_safetensors)
from ..errors import CheckpointError, InputError
from .curve import loss_curve

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
CURVE_FILE = "loss_curve.png"


def checkpoint_name(iteration: int) -> str:
    return f"{iteration:07d}_adapters.safetensors"


def adapter_config(args: dict) -> dict:
    """What mlx-lm writes to adapter_config.json (its run's options), JSON values only."""
    return {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def kept(saved: Optional[int]) -> str:
    """What a run that stops leaves behind."""
    return f"the adapters saved at iteration {saved} are intact" if saved else "this run saved nothing"


def non_finite(weights: dict) -> Optional[str]:
    """The first tensor holding NaN or an infinity (None if there is none), in one evaluation."""
    if not weights:
        return None
    finite = np.array(mx.stack([mx.isfinite(w).all() for w in weights.values()]))
    return next((name for name, ok in zip(weights, finite) if not ok), None)


def read_weights(path: Path) -> tuple[dict, dict]:
    """(weights, metadata) of an adapter file, read whole: a cut or garbled file, or a diverged
    run's NaNs (which would only show later as NaN replies), are refused here."""
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
        bad = non_finite(weights)
    except (RuntimeError, ValueError, OSError) as e:
        detail = re.sub(r"^\[\w+\] ", "", str(e).splitlines()[0])  # MLX's "[load_safetensors] " says nothing
        raise CheckpointError(f"{path}: cannot read adapter weights ({detail})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: adapter weight {bad} holds NaN or infinite values (a diverged run?)")
    return weights, metadata


@dataclass
class Resumed:
    """Adapter weights a run goes on from, the iteration they were saved at (0 where the file
    does not say: mlx-lm's own files) and the losses reported up to it."""

    path: Path
    weights: dict
    iteration: int
    losses: list  # [iteration, train loss or None, validation loss or None]


def read_resumed(path: Path) -> Resumed:
    weights, metadata = read_weights(path)
    try:
        iteration = int(metadata.get("iteration", 0))
    except ValueError:
        raise CheckpointError(f"{path}: iteration {metadata['iteration']!r} in its metadata is not a number") from None
    try:
        losses = [[int(it), *(None if x is None else float(x) for x in (train, val))]
                  for it, train, val in json.loads(metadata.get("losses", "[]"))]
    except (ValueError, TypeError):
        raise CheckpointError(f"{path}: the loss history in its metadata is not readable") from None
    return Resumed(path, weights, iteration, losses)


def resume(model, resumed: Resumed) -> None:
    expected = dict(tree_flatten(model.trainable_parameters()))
    weights = resumed.weights
    wrong = sorted(k for k, v in weights.items() if k not in expected or v.shape != expected[k].shape)
    if wrong or not weights:
        raise CheckpointError(f"{resumed.path}: does not fit these adapters ({', '.join(wrong[:3]) or 'no tensors'}; "
                              "same --num-layers, --rank and --fine-tune-type?)")
    model.load_weights(list(weights.items()), strict=False)


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
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C alike: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise


class Output:
    """The adapter folder of a run. `iterations`: those the run will save at."""

    def __init__(self, folder: Path, force: bool, resumed: Optional[Resumed], iterations: Iterable[int]):
        self.folder, self.force, self.saved = folder, force, None
        self.in_place = resumed is not None and not force and resumed.path.resolve().parent == folder.resolve()
        if not self.in_place:
            check_destination(folder, force)
            return
        reason = not_ours(folder)
        if reason:
            raise InputError(f"{folder}: a resumed run adds only to a folder mlx-gemma wrote, and this one {reason} "
                             "(name a new --adapter-path)")
        later = [checkpoint_name(i) for i in iterations if (folder / checkpoint_name(i)).exists()]
        if later:
            raise InputError(f"{folder}: holds {later[0]}, which resuming from iteration {resumed.iteration} would "
                             "replace (resume from the latest checkpoint, or name a new --adapter-path)")
        reason = cannot_write(folder)
        if reason:
            raise CheckpointError(f"{folder}: cannot write ({reason})")

    def save(self, model, config: dict, iteration: int, reports: list) -> None:
        """The adapters as the checkpoint of `iteration` and the latest, with the config and the
        loss curve of `reports` (objects with iteration, train_loss and val_loss)."""
        weights = dict(tree_flatten(model.trainable_parameters()))
        metadata = {"iteration": str(iteration),
                    "losses": json.dumps([[r.iteration, r.train_loss, r.val_loss] for r in reports])}
        curve = loss_curve(reports)
        names = [CONFIG_FILE, checkpoint_name(iteration), ADAPTER_FILE] + ([CURVE_FILE] if curve is not None else [])

        def write(folder: Path) -> None:
            _replace(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=4)))
            for name in names[1:3]:
                _replace(folder / name, lambda p: save_safetensors(p, weights, self.folder, metadata))
            if curve is not None:
                _replace(folder / CURVE_FILE, lambda p: curve.save(p, format="PNG"))

        try:
            if self.in_place or self.saved:
                # Named before they are written, so that a run killed half-way leaves a folder
                # still known as ours; stamped once written.
                record_written(self.folder, names, stamped=False)
                write(self.folder)
                record_written(self.folder, names)
            else:
                with output_folder(self.folder, self.force) as tmp:
                    write(tmp)
        except OSError as e:
            raise CheckpointError(f"{self.folder}: cannot save the adapters of iteration {iteration} "
                                  f"({e.strerror or e}); {kept(self.saved)}") from None
        self.saved = iteration
