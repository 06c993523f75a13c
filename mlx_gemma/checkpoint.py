"""Checkpoint in, checkpoint out: reading an unquantized source (a target or its MTP drafter) and
writing an MLX checkpoint directory without ever losing a file. Both CLIs (convert, quantize) and
the quantize-on-pull cache write through `write_checkpoint`; fuse's PEFT export and the adapter
folders of lora through the `output_folder` underneath it.

Output: safetensors shards of at most 5 GB with `model.safetensors.index.json`, config.json,
the tokenizer / chat template / processor / generation files of the source, and a manifest
(MARKER) naming every file written. Everything goes to a hidden temporary folder beside the
destination, renamed into place when complete; any error, full disk or signal removes it.
An existing non-empty destination is replaced only with `force`, and only if its manifest
says mlx-gemma wrote every file in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .backend import DTYPES
from .config import ModelConfig, hub_form
from . import speculative
from .errors import CheckpointError, ConfigError, InputError
from .loading import check_weights, load_weights, resolve_model_path
from .model import Model, sanitize
from .outputs import MARKER, check_destination, output_folder, save_safetensors
from .quantization import QuantSpec, check_recipe, plan, quantization_entry, quantize, quantized_size

MAX_SHARD_BYTES = 5 << 30
WEIGHT_INDEX = "model.safetensors.index.json"
# Tokenizer, chat template, processor and generation files travel with the weights.
SIDE_FILE_SUFFIXES = {".json", ".jinja", ".model", ".txt"}


# --- reading ---------------------------------------------------------------------------------


def _read_config(config_file: Path):
    """(config, model class, tensor renaming, raw config.json) of a checkpoint: the target, or
    its MTP drafter (`gemma4_unified_assistant`), told apart by model_type."""
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and raw.get("model_type") == speculative.MODEL_TYPE:
        config = speculative.DrafterConfig.from_dict(raw, str(config_file))
        return config, speculative.Drafter, speculative.rename, raw
    return ModelConfig.from_dict(raw, str(config_file)), Model, sanitize, raw


def read_source(hf_path: str) -> tuple[Path, nn.Module, dict, dict[str, mx.array]]:
    """Resolve and check an unquantized source checkpoint: (dir, its model (parameters not
    loaded; `.config` its config), raw config, lazy weights)."""
    src = resolve_model_path(hf_path)
    config_file = src / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{src}: no config.json (not a model checkpoint directory)")
    config, cls, rename, raw = _read_config(config_file)
    if config.quantization:
        raise InputError(f"{src}: already quantized ({config.quantization.get('bits')}-bit); "
                         "start from the unquantized checkpoint")
    # Shard-by-shard progress only on a terminal: a log or a pipe gets the one-line outcome.
    weights = load_weights(src, progress=sys.stderr.isatty(), rename=rename)
    model = cls(config)
    check_weights(model, weights, src)
    raw = hub_form(raw)
    drafter = speculative.drafter_of(hf_path, src, raw) if cls is Model else None
    if drafter:  # what `--draft-model auto` finds for the converted checkpoint
        raw["draft_model"] = drafter
    return src, model, raw, weights


def drain(weights: dict[str, mx.array]):
    """Yield (name, tensor) while dropping each from `weights`, so a tensor's memory is freed
    once it has been written."""
    for name in sorted(weights):
        yield name, weights.pop(name)


# --- where the output may go -----------------------------------------------------------------


def write_checkpoint(dst: Path, src: Path, tensors: Iterable[tuple[str, mx.array, int]], config: dict,
                     total_bytes: int = 0, force: bool = False, desc: str = "Converting",
                     max_shard_bytes: Optional[int] = None) -> Path:
    """Write a stream of (name, tensor, source bytes) + `config` + the side files of `src` as an MLX
    checkpoint at `dst`, atomically. Each tensor is evaluated as it arrives and a shard is written
    as soon as it is full, so memory stays bounded by one shard whatever the model size."""
    limit = max_shard_bytes or MAX_SHARD_BYTES
    with output_folder(dst, force) as tmp:
        files: list[list[str]] = []
        shard: dict[str, mx.array] = {}
        bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                   disable=None)  # None: only on a terminal

        def flush():
            save_safetensors(tmp / f"part-{len(files)}.safetensors", shard, dst)
            files.append(list(shard))
            shard.clear()
            mx.clear_cache()

        for name, tensor, source_bytes in tensors:
            try:
                mx.eval(tensor)
            except RuntimeError as e:  # a shard that changed or broke after its header was checked
                raise CheckpointError(f"{src}: cannot read weight {name} ({e})") from None
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
            if f.is_file() and f.suffix in SIDE_FILE_SUFFIXES and f.name not in ("config.json", WEIGHT_INDEX, MARKER):
                shutil.copyfile(f, tmp / f.name)  # not copy2: new files get the umask's mode, not the source's
    return dst


# --- the two pipelines -----------------------------------------------------------------------


def convert(hf_path: str, mlx_path: str, dtype: Optional[str] = None, force: bool = False) -> Path:
    """A Hugging Face checkpoint -> an MLX checkpoint at `mlx_path`, floating weights cast to `dtype`."""
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    dst = Path(mlx_path).expanduser()
    check_destination(dst, force)  # before minutes of reading
    src, _, raw_config, weights = read_source(hf_path)
    total = sum(v.nbytes for v in weights.values())
    target = DTYPES.get(dtype)

    def tensors():
        for name, w in drain(weights):
            cast = w.astype(target) if target is not None and mx.issubdtype(w.dtype, mx.floating) else w
            yield name, cast, w.nbytes

    return write_checkpoint(dst, src, tensors(), raw_config, total, force=force)


def quantize_checkpoint(src: str, out: str, bits: int = 4, group_size: Optional[int] = None,
                        mode: str = "affine", recipe: str = "default", force: bool = False) -> Path:
    """An unquantized checkpoint -> a group-quantized one at `out`, streaming: peak memory is one
    output shard plus one tensor, not the model. `group_size` None: the mode's own."""
    base = QuantSpec(bits, group_size, mode)
    check_recipe(recipe)
    dst = Path(out).expanduser()
    check_destination(dst, force)
    src_dir, model, raw_config, weights = read_source(src)
    chosen = plan(model, base, recipe, group_size_given=group_size is not None)
    total = sum(v.nbytes for v in weights.values())

    def tensors():
        for name, w in drain(weights):
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in chosen:
                for part, t in quantize(w, chosen[module]).items():
                    yield f"{module}.{part}", t, w.nbytes if part == "weight" else 0
            else:
                yield name, w, w.nbytes

    raw_config["quantization"] = quantization_entry(chosen, base)
    raw_config.pop("quantization_config", None)
    return write_checkpoint(dst, src_dir, tensors(), raw_config, total, force=force,
                            desc=f"Quantizing to {base.bits}-bit")


# --- the quantize-on-pull cache --------------------------------------------------------------

PULL_SPEC, PULL_RECIPE = QuantSpec(), "default"


def cache_root() -> Path:
    return Path(os.environ.get("MLX_GEMMA_CACHE", Path.home() / ".cache" / "mlx-gemma")).expanduser()


def cache_name(model: str, path: Path) -> str:
    """The cache folder of `path`'s 4-bit copy: keyed by what the checkpoint is (its real path,
    config.json and the names, sizes and times of its weight files and of the tokenizer, template
    and generation files the copy carries; in a Hub snapshot the path carries the revision), not
    by the text that reached it, behind a readable prefix."""
    real = path.resolve()
    h = hashlib.sha256(str(real).encode() + b"\0" + (real / "config.json").read_bytes())
    for f in sorted(real.iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.suffix in SIDE_FILE_SUFFIXES):
            st = f.stat()
            h.update(f"\0{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    readable = real.name if Path(model).expanduser().is_dir() else model.strip("/")
    spec = PULL_SPEC
    return (re.sub(r"[^\w.-]+", "--", readable) + f"-{h.hexdigest()[:12]}"
            f"-{spec.bits}bit-gs{spec.group_size}-{PULL_RECIPE}")


def pull_estimate(config: ModelConfig, float_bytes: int) -> Optional[tuple[ModelConfig, int]]:
    """(config, weight bytes) of the 4-bit copy `quantized_copy` would make, from the config alone,
    so that a copy that would not fit the memory plan is refused before minutes are spent on it;
    None when the model's widths do not take the copy's group size (no copy can be made)."""
    try:
        size = quantized_size(config, PULL_SPEC, PULL_RECIPE, float_bytes)["total_bytes"]
    except InputError:
        return None
    return replace(config, quantization=PULL_SPEC.entry()), int(size)


def quantized_copy(model: str, path: Path, why: str) -> Path:
    """The default 4-bit copy of the unquantized checkpoint at `path` (`model` as the user named
    it), made once (streaming) into the cache and reused while the checkpoint is unchanged."""
    out = cache_root() / cache_name(model, path)
    if (out / MARKER).exists():  # outputs appear whole, by rename: one with a manifest is complete
        print(f"Using the {PULL_SPEC.bits}-bit copy of {model} in {out}", file=sys.stderr)
        return out
    print(f"{model}: {why}; quantizing to {PULL_SPEC.bits}-bit once into {out} (delete it to free the "
          "space; --no-quantize skips this)", file=sys.stderr)
    return quantize_checkpoint(str(path), str(out), PULL_SPEC.bits, PULL_SPEC.group_size, PULL_SPEC.mode,
                               PULL_RECIPE, force=True)
