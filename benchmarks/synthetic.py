"""A stand-in for the real checkpoint, built here without network: the 12B's config (widths,
262K vocabulary, vision and audio front ends) with fewer layers and random weights, quantized by
mlx-gemma's default recipe and written as an MLX checkpoint that mlx-gemma and mlx-vlm both load.

The layers are the last LAYERS of the real 48 (5 sliding : 1 global, ending on a global one), so
even 2 layers time one global layer.

Beside it, a stand-in MTP drafter (`gemma4_unified_assistant`, spec 8) fitting a target: the
target's vocabulary, head dims and RoPE, 4 layers [sliding x3, full], ordered embeddings with
2048 centroids (top 32). The 12B drafter's own widths are not published here: DRAFTER_WIDTHS is
an assumption (hidden 1024, MLP 4096, 8 query heads: a multiple of the target's 8 sliding kv heads).
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

from mlx_gemma.checkpoint import cache_root, write_checkpoint
from mlx_gemma.config import ModelConfig
from mlx_gemma.model import Model
from mlx_gemma.quantization import QuantSpec, plan, quantization_entry
from mlx_gemma.speculative import MODEL_TYPE as DRAFTER_TYPE, Drafter, DrafterConfig

ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIG = ROOT / "tests" / "data" / "gemma-4-12B-it.config.json"
DRAFTER_WIDTHS = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8)  # assumed
DRAFTER_LAYERS = ["sliding_attention"] * 3 + ["full_attention"]


def synthetic_config(layers: int, **text) -> dict:
    """The Hub config.json of the 12B cut to its last `layers` layers (`text` overrides widths,
    and `layer_types` those layers' types)."""
    raw = json.loads(HUB_CONFIG.read_text())
    types = text.pop("layer_types", raw["text_config"]["layer_types"][-layers:])
    raw["text_config"].update(num_hidden_layers=layers, layer_types=types, **text)
    return raw


def build(out: Path, layers: int, seed: int = 0, spec: QuantSpec = QuantSpec(), recipe: str = "default",
          **text) -> Path:
    """Write the stand-in checkpoint to `out` (atomically)."""
    raw = synthetic_config(layers, **text)
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(raw))  # MLX's initialisers: fan-in scaled, as a trained model's
    return _write(model, raw, out, spec, recipe, f"Building the {layers}-layer stand-in")


def drafter_config(target: dict, **widths) -> dict:
    """The config.json of a stand-in drafter for the target config `target` (Hub form);
    `widths` override DRAFTER_WIDTHS."""
    text = dict(target["text_config"])  # vocabulary, head dims, kv heads, RoPE, window
    text.update(DRAFTER_WIDTHS, num_hidden_layers=len(DRAFTER_LAYERS), layer_types=DRAFTER_LAYERS,
                num_kv_shared_layers=len(DRAFTER_LAYERS), **widths)
    text["hidden_size_per_layer_input"] = 0  # mlx-vlm's drafter config defaults it to 256 (per-layer inputs)
    return {"model_type": DRAFTER_TYPE, "backbone_hidden_size": target["text_config"]["hidden_size"],
            "use_ordered_embeddings": True, "num_centroids": 2048, "centroid_intermediate_top_k": 32,
            "tie_word_embeddings": True, "text_config": text}


def build_drafter(out: Path, target: dict, seed: int = 0, spec: Optional[QuantSpec] = QuantSpec(),
                  recipe: str = "default", **widths) -> Path:
    """Write a stand-in drafter for the target config `target` to `out`, quantized as the
    target is (`spec` None: bfloat16); its token ordering is a random permutation."""
    raw = drafter_config(target, **widths)
    mx.random.seed(seed)
    drafter = Drafter(DrafterConfig.from_dict(raw))
    vocab = raw["text_config"]["vocab_size"]
    drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    return _write(drafter, raw, out, spec, recipe, "Building the stand-in drafter")


def _write(model: nn.Module, raw: dict, out: Path, spec: Optional[QuantSpec], recipe: str, desc: str) -> Path:
    """Cast to bfloat16, quantize by `spec` and `recipe` (None: not at all), write atomically."""
    model.set_dtype(mx.bfloat16)  # leaves integer buffers (the token ordering) alone
    if spec is not None:
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
                                total, force=True, desc=desc)


def fill_global(cache, spec, n: int, dtype: mx.Dtype = mx.float32, scale: float = 1.0) -> None:
    """`n` random tokens into the global-layer cache `cache` of layer `spec`, in the layout it
    stores: the packed arrays (spec 9) or keys and values (one array for both: the cost of a
    step does not depend on their values)."""
    def normal(width):
        return (mx.random.normal((1, spec.num_kv_heads, n, width)) * scale).astype(dtype)

    if cache.one_tensor:
        cache.update_and_fetch_packed([normal(w) for w in spec.packed_widths(cache.bits and cache.group_size)])
    else:
        x = normal(spec.head_dim)
        cache.update_and_fetch(x, x)


def synthetic_checkpoint(layers: int, root: Optional[Path] = None) -> Path:
    """The stand-in with `layers` layers, built once into the mlx-gemma cache."""
    out = (root or cache_root()) / f"synthetic-gemma-4-12B-{layers}-layers-4bit-default"
    if (out / "config.json").exists():
        print(f"Using the stand-in checkpoint in {out}", file=sys.stderr)
        return out
    return build(out, layers)
