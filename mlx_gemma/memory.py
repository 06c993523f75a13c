"""The memory budget: how much the GPU may use, and what the weights need."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import InputError
from .loading import SAFETENSORS_DTYPE_BYTES, read_safetensors_header, weight_files

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """'10.5GB', '512M', '1e9' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise InputError(f"--memory-limit: cannot read {text!r} (examples: 10.5GB, 512MB)")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    except ValueError:
        raise InputError(f"--memory-limit: cannot read {text!r} (examples: 10.5GB, 512MB)") from None


def memory_budget(limit: Optional[str] = None) -> int:
    """Bytes the model may use: --memory-limit if given; on a Mac, Metal's recommended
    working-set size (what macOS lets the GPU wire); elsewhere, physical memory."""
    if limit is not None:
        return parse_size(limit)
    if sys.platform == "darwin" and mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} of a checkpoint, from the safetensors headers (nothing is loaded)."""
    sizes = {}
    for f in weight_files(path):
        for name, (dtype, shape) in read_safetensors_header(f).items():
            n = SAFETENSORS_DTYPE_BYTES[dtype]
            for s in shape:
                n *= s
            sizes[name] = n
    return sizes


def weight_bytes(path: Path) -> int:
    return sum(tensor_bytes(path).values())
