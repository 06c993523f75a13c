"""A stand-in for the real checkpoint, built here without network: the 12B's config (widths,
262K vocabulary, vision and audio front ends) with fewer layers and random weights, quantized by
mlx-gemma's default recipe and written as an MLX checkpoint that mlx-gemma and mlx-vlm both load.

The layers are the last LAYERS of the real 48 (5 sliding : 1 global, ending on a global one), so
even 2 layers time one global layer.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma.config import ModelConfig
from mlx_gemma.checkpoint import write_checkpoint
from mlx_gemma.model import Model
from mlx_gemma.quantization import QuantSpec, plan, quantization_entry
from mlx_gemma.checkpoint import cache_root

ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIG = ROOT / "tests" / "data" / "gemma-4-12B-it.config.json"


def synthetic_config(layers: int, **text) -> dict:
    """The Hub config.json of the 12B cut to its last `layers` layers (`text` overrides widths)."""
    raw = json.loads(HUB_CONFIG.read_text())
    types = raw["text_config"]["layer_types"][-layers:]
    raw["text_config"].update(num_hidden_layers=layers, layer_types=types, **text)
    return raw


def build(out: Path, layers: int, seed: int = 0, spec: QuantSpec = QuantSpec(), recipe: str = "default",
          **text) -> Path:
    """Write the stand-in checkpoint to `out` (atomically)."""
    raw = synthetic_config(layers, **text)
    config = ModelConfig.from_dict(raw)
    mx.random.seed(seed)
    model = Model(config)  # MLX's initialisers: fan-in scaled, as a trained model's magnitudes
    model.set_dtype(mx.bfloat16)
    chosen = plan(model, spec, recipe)

    def predicate(path, module):
        s = chosen.get(path)
        return False if s is None else {"group_size": s.group_size, "bits": s.bits, "mode": s.mode}

    nn.quantize(model, class_predicate=predicate)
    raw["quantization"] = quantization_entry(chosen, spec)
    raw["dtype"] = "bfloat16"
    params = tree_flatten(model.parameters())
    total = sum(p.nbytes for _, p in params)
    with tempfile.TemporaryDirectory() as empty:  # no side files: prompts are built from ids
        return write_checkpoint(out, Path(empty), ((k, v, v.nbytes) for k, v in params), raw,
                                total, force=True, desc=f"Building the {layers}-layer stand-in")


def synthetic_checkpoint(layers: int, root: Optional[Path] = None) -> Path:
    """The stand-in with `layers` layers, built once into the mlx-gemma cache."""
    out = (root or cache_root()) / f"synthetic-gemma-4-12B-{layers}-layers-4bit-default"
    if (out / "config.json").exists():
        print(f"Using the stand-in checkpoint in {out}", file=sys.stderr)
        return out
    return build(out, layers)
