"""Checkpoint -> Model: resolve a directory or Hub id, read shards lazily, map names
(`model.sanitize`, beside the model), check shapes."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .backend import load_dtype, set_dtype, split_matmuls
from .config import ModelConfig
from .errors import CheckpointError
from .model import Model, sanitize

# Files a run needs from a Hub repo: config, weights, tokenizer, chat template, processor.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                       "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    """A local directory as is; a Hub repo id downloaded (only the needed files) or taken
    from the local Hugging Face cache when offline."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_repo)
    if p.exists():
        raise CheckpointError(f"{name}: is a file, expected a checkpoint directory or a Hub repo id")
    if not _REPO_ID.match(name):
        raise CheckpointError(f"{name}: neither a local directory nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as online_error:  # no network, gated repo, unknown repo ...
        try:
            return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            pass
        if isinstance(online_error, GatedRepoError):
            raise CheckpointError(f"{name}: the repo is gated: accept its licence at https://huggingface.co/{name} "
                                  "and log in with `hf auth login` (or set HF_TOKEN)") from None
        # `name` is also how a relative folder is written (models/my-ckpt): say it is not one either.
        if isinstance(online_error, RepositoryNotFoundError):
            raise CheckpointError(f"{name}: no such folder, and no such repo on the Hugging Face Hub (or a private "
                                  "one: log in with `hf auth login`)") from None
        reason = str(online_error).splitlines()[0] if str(online_error) else type(online_error).__name__
        raise CheckpointError(f"{name}: no such folder, and as a Hub repo it could not be downloaded and is not in "
                              f"the local Hugging Face cache ({reason})") from None


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, checking the file is complete."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes "
                                      f"in a file of {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expected = SAFETENSORS_DTYPE_BYTES[dtype]
            for s in shape:
                expected *= s
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors file (bad entry for {name})") from None
        if stop - begin != expected:
            raise CheckpointError(f"{path}: corrupt safetensors file ({name} has {stop - begin} bytes, "
                                  f"its shape needs {expected})")
        out[name] = (dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return out


def weight_files(path: Path) -> list[Path]:
    """The shards of a checkpoint: those the index names, or every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return files


def load_weights(path: Path, progress: bool = False, rename=sanitize) -> dict[str, mx.array]:
    """All tensors of a checkpoint under the model's names (`rename`: checkpoint name -> name or
    None to skip), lazily: a shard is read when used."""
    weights: dict[str, mx.array] = {}
    files = weight_files(path)
    for i, f in enumerate(files):
        header = read_safetensors_header(f)
        if progress and len(files) > 1:
            # A terminal shows one line, rewritten in place; a log gets one line per shard.
            tty = sys.stderr.isatty()
            line = f"Loading shard {i + 1}/{len(files)}: {f.name}"
            print("\r\033[K" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        try:
            tensors = mx.load(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        for k, v in tensors.items():
            if k not in header:
                raise CheckpointError(f"{f}: corrupt safetensors file")
            name = rename(k)
            if name is not None:
                weights[name] = v
    if progress and len(files) > 1 and sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)  # cleared: the answer starts on a clean line
    return weights


def quantization_of(config: ModelConfig) -> Optional[dict]:
    q = config.quantization
    if not q:
        return None
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        raise CheckpointError(f"config.json: unsupported quantization entry {q!r}")
    return q


def build_model(config, weights: dict[str, mx.array], source: Path, cls: type = Model) -> nn.Module:
    """`cls(config)` with `weights`, quantized as the config's quantization entry says."""
    model = cls(config)
    q = quantization_of(config)
    if q is not None:
        # Quantize exactly the modules the checkpoint stores quantized (per-module overrides
        # such as {"bits": 8} in the entry are honoured, as mlx-lm does).
        def predicate(path, module):
            if f"{path}.scales" not in weights:
                return False
            override = q.get(path)
            return override if isinstance(override, dict) else True

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=predicate)
    check_weights(model, weights, source)
    model.load_weights(list(weights.items()), strict=False)
    return model


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    """Every parameter present, with its shape; no tensor the model does not know."""
    params = dict(tree_flatten(model.parameters()))
    missing = [k for k in params if k not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing weight {', '.join(missing[:3])}{more}")
    unexpected = [k for k in weights if k not in params]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{source}: unexpected weight {', '.join(unexpected[:3])}{more} "
                              f"(not part of a {model.config.model_type} model)")
    for k, p in params.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: weight {k} has shape {tuple(weights[k].shape)}, "
                                  f"expected {tuple(p.shape)}")


def load_model(path: Path, dtype: Union[mx.Dtype, str, None] = "auto", lazy: bool = False,
               progress: bool = False, split: Optional[int] = None, group=None, parallel: str = "tensor",
               adapter_path: Union[str, Path, None] = None) -> Model:
    """`dtype`: an mx dtype, a name, None (as stored) or "auto" (backend.activation_dtype);
    `split`: ways to split each quantized matmul (default: one per core on the CPU backend);
    `group` (an `mx.distributed` group of more than one rank): this rank's part of the model,
    `parallel` "tensor" or "pipeline" (see distributed.py); `adapter_path`: LoRA adapters
    (mlx-lm's layout or PEFT's, tuning/adapters.py). `model.tensors_read` counts the
    checkpoint tensors read."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a model checkpoint directory)")
    config = ModelConfig.from_file(config_file)
    dtype = load_dtype(bool(config.quantization), dtype)
    rename, cls, finish = sanitize, Model, None
    if group is not None and group.size() > 1:
        from .distributed import loader

        rename, cls, finish = loader(config, group, parallel)
    weights = load_weights(path, progress, rename)
    model = build_model(config, weights, path, cls)
    model.tensors_read = len(weights)
    if finish is not None:
        finish(model)
    if dtype is not None:
        set_dtype(model, dtype)
    if adapter_path is not None:
        if group is not None and group.size() > 1:
            raise CheckpointError(f"{adapter_path}: adapters across several ranks are not supported yet "
                                  "(fuse them first: python -m mlx_gemma.fuse)")
        from .tuning.adapters import load_adapters

        load_adapters(model, adapter_path)
    split_matmuls(model, split)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    return model


def load(path_or_repo: Union[str, Path], dtype: Union[mx.Dtype, str, None] = "auto", lazy: bool = False,
         progress: bool = False, group=None, parallel: str = "tensor", adapter_path: Union[str, Path, None] = None):
    """`model, processor = load("google/gemma-4-12B-it")`; a local directory works too.
    `group=mx.distributed.init()` under mlx.launch: this rank's part (`parallel` "tensor" or
    "pipeline"); every rank then runs the same generation calls."""
    from .prompt import Processor

    path = resolve_model_path(path_or_repo)
    model = load_model(path, dtype=dtype, lazy=lazy, progress=progress, group=group, parallel=parallel,
                       adapter_path=adapter_path)
    return model, Processor.from_pretrained(path, model.config)
