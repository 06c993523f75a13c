"""Adapters on a loaded model, from mlx-lm's layout (what `python -m mlx_gemma.lora` writes)
or from a PEFT LoRA directory (trained with PEFT or Unsloth on transformers' Gemma 4).

PEFT's names are transformers' module names, mapped by the one checkpoint renaming
(`model.sanitize`); its A [r, in] and B [out, r] are mlx-lm's lora_a and lora_b transposed,
its scale lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module where
rank_pattern / alpha_pattern say so.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import load_adapters as load_mlx_lm_adapters

from ..errors import CheckpointError
from ..model import sanitize
from .checkpoints import ADAPTER_FILE, CONFIG_FILE, read_config, read_weights

PEFT_WEIGHTS = "adapter_model.safetensors"
# PEFT options whose non-default values change the computation in ways LoRALinear does not.
UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "lora_bias": False,
               "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None}


def load_adapters(model: nn.Module, path) -> nn.Module:
    path = Path(path)
    config = read_config(path)
    if "peft_type" in config:
        return load_peft(model, path, config)
    if not (path / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_FILE} (the adapter weights)")
    read_weights(path / ADAPTER_FILE)  # mlx-lm's loader would take a garbled file with a traceback, NaNs silently
    try:
        return load_mlx_lm_adapters(model, str(path))
    except (ValueError, KeyError, FileNotFoundError, AttributeError, TypeError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: cannot apply these adapters ({detail[:300]})") from None


def load_peft(model: nn.Module, path: Path, config: dict) -> nn.Module:
    where = path / CONFIG_FILE
    if config["peft_type"] != "LORA":
        raise CheckpointError(f"{where}: peft_type {config['peft_type']!r} is not supported (LORA only)")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"{where}: {key} = {config[key]!r} is not supported")
    weights_file = path / PEFT_WEIGHTS
    if not weights_file.is_file():
        raise CheckpointError(f"{path}: no {PEFT_WEIGHTS} (adapters saved as .bin are not read; "
                              "save_pretrained(safe_serialization=True) writes safetensors)")
    check_targets(model, config.get("target_modules"), where)
    weights, _ = read_weights(weights_file)
    pairs: dict[str, dict] = {}
    for name, w in weights.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", name)
        if m is None:
            raise CheckpointError(f"{weights_file}: {name} is not a LoRA A or B weight (lora_embedding and "
                                  "other PEFT layers are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = w
    modules = dict(model.named_modules())
    replaced = []
    for peft_name, ab in sorted(pairs.items()):
        ours = (sanitize(peft_name + ".weight") or "").removesuffix(".weight")
        base = modules.get(ours)
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_file}: {peft_name} has lora_{next(iter(ab))} but not its partner")
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise CheckpointError(f"{weights_file}: target module {peft_name} is not a linear layer of this model")
        a, b = ab["A"], ab["B"]
        packed = 32 // base.bits if isinstance(base, nn.QuantizedLinear) else 1
        out_dims, in_dims = base.weight.shape[0], base.weight.shape[1] * packed
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dims or b.shape != (out_dims, r):
            raise CheckpointError(f"{weights_file}: {peft_name} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                  f"the layer needs [r, {in_dims}] and [{out_dims}, r]")
        rank = _pattern(config.get("rank_pattern"), peft_name, config.get("r", r))
        alpha = _pattern(config.get("alpha_pattern"), peft_name, config.get("lora_alpha", rank))
        if rank != r:
            raise CheckpointError(f"{where}: {peft_name} has rank {r} in its weights, {rank} in the config")
        lora = LoRALinear.from_base(base, r=r, scale=alpha / (math.sqrt(r) if config.get("use_rslora") else r))
        lora.lora_a, lora.lora_b = a.T.astype(mx.float32), b.T.astype(mx.float32)
        replaced.append((ours, lora))
    if not replaced:
        raise CheckpointError(f"{weights_file}: no LoRA weights")
    model.update_modules(tree_unflatten(replaced))
    return model


def transformers_name(ours: str) -> Optional[str]:
    """Our module path -> transformers' (the inverse of loading.sanitize), None for a module
    transformers does not have."""
    name = "model." + ours.replace("language_model.model.", "language_model.", 1)
    return name if sanitize(name + ".weight") == ours + ".weight" else None


def check_targets(model: nn.Module, targets, where: Path) -> None:
    """PEFT's target_modules, matched as PEFT matches them (a regex over the whole module name,
    or names that end a module's name), must each name a linear layer of this model."""
    if targets is None or targets == "all-linear":
        return
    names = [t for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
             for t in [transformers_name(n)] if t]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, n) for n in names)
        except re.error as e:
            raise CheckpointError(f"{where}: target_modules {targets!r} is not a regex ({e})") from None
        if not found:
            raise CheckpointError(f"{where}: target_modules {targets!r} matches no linear layer of this model")
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{where}: target_modules must be a regex or a list of module names")
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise CheckpointError(f"{where}: target_modules names {', '.join(missing)}, which this model does not have "
                              "(as a linear layer)")


def _pattern(patterns, name: str, default):
    """PEFT's per-module override: a key matches a module whose name ends with it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default
