"""Per-backend execution choices, each made by measurement (benchmarks/backend_choices.py).

- Activation dtype. MLX's CPU kernels for quantized matmuls are ~8x faster with float32
  activations than with bfloat16 (benchmarks/backend_choices.py); on Metal both are fast and
  bfloat16 moves half the bytes. So a quantized model runs in float32 on the CPU backend and as
  stored elsewhere; an unquantized one stays as stored (float32 would double its weights).
- Matmuls across cores. Each MLX CPU op runs on one thread, so a decode step of a
  bandwidth-light CPU run uses one core. On the CPU backend every quantized matmul (the
  projections and the tied head) is split by output rows over one CPU stream per core, and the
  streams run at once. On a GPU the kernels already fill the device: nothing is split there.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import InputError

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def activation_dtype(quantized: bool, requested: Optional[str] = None) -> Optional[mx.Dtype]:
    """The dtype to run in: `requested` ("auto" or None: the measured choice above); None keeps
    the checkpoint's."""
    if requested not in (None, "auto"):
        return DTYPES[requested]
    return mx.float32 if quantized and on_cpu() else None


def load_dtype(quantized: bool, dtype) -> Optional[mx.Dtype]:
    """What `load(dtype=...)` asks for: "auto" (the measured choice above), a name or an mx dtype
    of DTYPES, or None (as stored)."""
    if dtype is None or isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in ("auto", *DTYPES):
        return activation_dtype(quantized, dtype)
    raise InputError(f"dtype={dtype!r}: use 'auto', None (as stored) or one of {', '.join(map(repr, DTYPES))} "
                     "(a name or the mx dtype)")


def set_dtype(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast the model's floating parameters to `dtype`, except that an upcast to float32 leaves
    the scales and biases of quantized weights as stored, so memory and the bytes a decode step
    reads stay the checkpoint's (what the memory planner counts). The CPU kernel is ~20% slower
    per matmul with bfloat16 scales than with float32 ones (benchmarks/backend_choices.py), still
    ~8x faster than with bfloat16 activations; float32 scales would cost 0.06 bytes per weight."""
    if dtype != mx.float32:
        model.set_dtype(dtype)
        return
    for _, m in model.named_modules():
        if "scales" in m:
            continue
        m.update({k: v.astype(dtype) for k, v in m.items()
                  if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)})


def drafting_pays() -> bool:
    """Whether MTP drafting is on by default. Verifying K+1 tokens costs about one decode step
    where decode is bound by memory bandwidth (a GPU); on the CPU backend it is bound by compute
    and costs about K+1 steps, more than drafting saves (benchmarks/speculative.py)."""
    return not on_cpu()


def lazy_verify_head() -> bool:
    """Whether a greedy MTP verify computes the head row by row, stopping at the first rejected
    draft. On the CPU backend the 262K-token head is about half a step's compute, and rows past
    a rejection are never needed; on a GPU one matmul over all rows costs what one row does
    (the head's bytes), and a read-back per row would stall the device
    (benchmarks/speculative.py)."""
    return on_cpu()


def compiled_decode_pays() -> bool:
    """Whether decode steps run compiled (`generation.compiled_decode`) by default. On a GPU
    the trace is built in milliseconds and saves the step's Python and kernel launches. The CPU
    backend builds each fused kernel with the system C++ compiler, about 30 s for a first
    decode on a clean machine (cached on disk afterwards), which a one-off CPU run never earns
    back (benchmarks/decode_overhead.py measures the steady state both ways)."""
    return not on_cpu()


def default_splits() -> int:
    """How many ways to split a matmul: one per core on the CPU backend, else none."""
    return max(1, min(os.cpu_count() or 1, 8)) if on_cpu() else 1


class _Streams:
    """The CPU streams of a split matmul (a plain object: module attributes that are lists
    would be taken for child modules)."""

    def __init__(self, n: int):
        self.streams = [mx.new_stream(mx.cpu) for _ in range(n)]


def _split_quantized_matmul(x, module, streams: _Streams) -> mx.array:
    """x @ W.T for a quantized W, each block of output rows on its own stream."""
    rows = module.weight.shape[0]
    n = len(streams.streams)
    step = -(-rows // n)
    biases = module.get("biases")
    outs = []
    for i, s in enumerate(streams.streams):
        a, b = i * step, min(rows, (i + 1) * step)
        with mx.stream(s):
            outs.append(mx.quantized_matmul(x, module.weight[a:b], module.scales[a:b],
                                            None if biases is None else biases[a:b], transpose=True,
                                            group_size=module.group_size, bits=module.bits, mode=module.mode))
    return mx.concatenate(outs, axis=-1)


class SplitQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _split_quantized_matmul(x, self, self._streams)
        return y + self["bias"] if "bias" in self else y


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _split_quantized_matmul(x, self, self._streams)


_SPLIT = {nn.QuantizedLinear: SplitQuantizedLinear, nn.QuantizedEmbedding: SplitQuantizedEmbedding}


def split_matmuls(model: nn.Module, n: Optional[int] = None) -> int:
    """Make every quantized matmul of `model` run `n` ways in parallel (default: one per core
    on the CPU backend, else 1, which changes nothing). The parameters stay the same arrays,
    under the same names. Returns how many modules were split."""
    n = default_splits() if n is None else n
    if n <= 1:
        return 0
    streams = _Streams(n)
    swapped = []
    for path, m in model.named_modules():
        split_class = _SPLIT.get(type(m))
        # A small matrix (the tiny test models') is not worth the streams' synchronisation.
        if split_class is None or m.weight.shape[0] < n * 64:
            continue
        new = split_class.__new__(split_class)
        dict.update(new, m)  # the same parameters and attributes: no copy
        new.__dict__.update(m.__dict__)
        new._streams = streams
        swapped.append((path, new))
    model.update_modules(tree_unflatten(swapped))
    return len(swapped)
