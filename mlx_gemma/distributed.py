"""Splitting the model over the ranks of an `mx.distributed` group (launched by `mlx.launch`).

- Tensor parallel (`shard`, mlx-lm's way): every layer's query heads and MLP are split with
  mlx's distributed linears (q/gate/up by output rows, o/down by input columns, an all-sum
  after each); sliding layers split their key/value heads too, so each rank caches only its
  heads. A layer with ONE key/value head (the 12B's global k_eq_v layers) cannot be split: each
  rank computes and caches it whole while its queries are split. The tied embedding is split
  by vocabulary rows (`VocabShard`): each rank embeds the tokens it holds (an all-sum of the
  hidden state) and computes its slice of the logits (an all-gather of them), so the 262K x
  hidden head, the largest single matrix, is read 1/N per rank too. The media embedders stay
  replicated. Decode gains: each rank reads 1/N of the layer and head weights per token.
  An MTP drafter is replicated too: it reads whole K/V (`shared_kv`), so a split layer's heads
  are gathered from the ranks once per round; every rank then drafts the same tokens.
- Pipeline parallel (`pipeline`): each rank holds a contiguous range of layers, balanced by a
  per-layer cost (`layer_costs`), and reads only its tensors from the checkpoint: memory per
  rank is about 1/N of the layers. Activations go rank to rank with send / recv; the last
  stage's final hidden state is then summed into every rank (the others add zeros), so that
  every rank computes the same logits and samples the same token from its tied embedding:
  hidden-size bytes per step instead of vocabulary-size logits. Every rank therefore holds
  the embedding (for two ranks that is what the first needs for its input and the last for
  its head anyway); the media embedders and the final norm's work live on the first / last.
  An MTP drafter lives on the stage that holds the K/V it reads (the last layer of each type:
  the last stage); its draft tokens (and, when sampling, its logits) are summed into every
  rank the same way (`StageDrafter`), so that every rank runs the same speculative loop.

Every rank runs the same generation loop; the model returns the same logits on every rank.
"""

from __future__ import annotations

import re
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .cache import SlidingWindowCache
from .config import ModelConfig, TextConfig
from .errors import DistributedError
from .model import Model, TextModel, sanitize

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")
_MEDIA = ("vision_embedder.", "embed_vision.", "embed_audio.")
_EMBEDDING = "language_model.model.embed_tokens."
# Matmuls split by output rows (all-to-sharded) and by input columns (sharded-to-all).
_BY_ROWS = ("q_proj", "gate_proj", "up_proj")
_BY_COLUMNS = ("o_proj", "down_proj")
# Per decode step, a layer reads its weights and its cache; the cache is counted at this
# context (tokens), where a global layer's cache is as large as a sliding one's window.
COST_CONTEXT = 8192

MODES = ("tensor", "pipeline")


# --- tensor parallel ---------------------------------------------------------------------------


def kv_split(num_kv_heads: int, size: int) -> int:
    """How many ranks a layer's key/value heads are split over: all of them, or 1 (every rank
    holds the layer's only head); anything else is refused."""
    if num_kv_heads % size == 0:
        return size
    if num_kv_heads == 1:
        return 1
    raise DistributedError(f"tensor parallel over {size} ranks: {num_kv_heads} key/value heads do not divide "
                           f"by {size} (use --pipeline, or {num_kv_heads} ranks)")


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse, in one line and before any weight is read, a model whose heads or widths do not
    split over `size` ranks (a quantized matrix splits its columns in whole groups only)."""
    text = config.text_config
    group = (config.quantization or {}).get("group_size") or 1
    if text.num_attention_heads % size:
        raise DistributedError(f"tensor parallel over {size} ranks: {text.num_attention_heads} attention heads "
                               f"do not divide by {size} (use --pipeline)")
    for s in text.layers:
        kv_split(s.num_kv_heads, size)
        for name, width in (("o_proj", text.num_attention_heads * s.head_dim), ("down_proj", text.intermediate_size)):
            if width % (size * group):
                raise DistributedError(f"tensor parallel over {size} ranks: {name} of layer {s.index} has "
                                       f"{width} inputs, not {size} whole parts of {group}-wide quantization "
                                       "groups (use --pipeline)")


class VocabShard(nn.Module):
    """Rows [start, start + n) of a tied embedding table (plain or quantized), one rank's
    share: lookups and logits over the whole vocabulary, exactly as the whole table gives."""

    def __init__(self, table: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.group = group
        self.n = table.weight.shape[0] // group.size()
        self.start = group.rank() * self.n
        for name, value in table.items():  # weight, and a quantized table's scales / biases
            if isinstance(value, mx.array):
                table[name] = value[self.start:self.start + self.n]
        self.table = table

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        mine = (local >= 0) & (local < self.n)
        rows = self.table(mx.where(mine, local, 0))
        return mx.distributed.all_sum(mx.where(mine[..., None], rows, mx.zeros_like(rows)), group=self.group)

    def as_linear(self, h: mx.array) -> mx.array:
        part = self.table.as_linear(h)  # [..., n]: this rank's slice of the logits
        parts = mx.distributed.all_gather(part[None], group=self.group)  # [ranks, ..., n]
        return mx.moveaxis(parts, 0, -2).reshape(*part.shape[:-1], -1)


class TensorParallelModel(Model):
    """A model whose layers `shard` split: what the drafter reads is gathered whole."""

    def shared_kv(self, cache: list) -> dict:
        size = self.group.size()
        last = {s.layer_type: s for s in self.config.text_config.layers}
        out = super().shared_kv(cache)
        for kind, kv in out.items():
            if kv_split(last[kind].num_kv_heads, size) > 1:  # rank r holds heads [r*n, (r+1)*n)
                out[kind] = tuple(mx.distributed.all_gather(x.swapaxes(0, 1), group=self.group).swapaxes(0, 1)
                                  for x in kv)
        return out


def shard(model, group: mx.distributed.Group):
    """Tensor parallel, in place (see the module docstring); returns `model`."""
    size = group.size()
    check_tensor_parallel(model.config, size)
    model.__class__ = TensorParallelModel
    model.group = group
    for layer, spec in model.language_model.model.held:
        attn, kv_ways = layer.self_attn, kv_split(spec.num_kv_heads, size)
        by_rows = ["q_proj"] + ([name for name in ("k_proj", "v_proj") if name in attn] if kv_ways > 1 else [])
        for name in by_rows:
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= size
        attn.n_kv_heads //= kv_ways
        mlp = layer.mlp
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    text = model.language_model.model
    if model.config.text_config.vocab_size % size == 0:  # else it stays whole on every rank
        text.embed_tokens = VocabShard(text.embed_tokens, group)
    return model


def tensor_share(name: str, config: ModelConfig, size: int) -> float:
    """The fraction of checkpoint tensor `name` (model naming) one rank holds under tensor parallel."""
    m = _LAYER.match(name)
    if m is None:
        split = name.startswith(_EMBEDDING) and config.text_config.vocab_size % size == 0
        return 1 / size if split else 1.0
    module = name.split(".")[-2]
    if module in _BY_ROWS + _BY_COLUMNS:
        return 1 / size
    if module in ("k_proj", "v_proj"):
        return 1 / kv_split(config.text_config.layers[int(m.group(1))].num_kv_heads, size)
    return 1.0


# --- pipeline parallel ---------------------------------------------------------------------------


def layer_costs(text: TextConfig, context: int = COST_CONTEXT) -> list[float]:
    """Elements a decode step reads per layer: its weights plus its KV cache at `context`
    tokens. The 12B's global layers weigh ~8% more (twice the head dim on q and o) and their
    cache grows with the context; sliding layers read at most a window of keys."""
    costs = []
    for s in text.layers:
        h, q = text.hidden_size, text.num_attention_heads * s.head_dim
        kv = s.num_kv_heads * s.head_dim
        weights = h * (2 * q + kv * (1 if s.k_eq_v else 2)) + 3 * h * text.intermediate_size
        cached = min(context, s.window or context) * kv * 2
        costs.append(float(weights + cached))
    return costs


def split_layers(text: TextConfig, size: int, context: int = COST_CONTEXT) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, each holding about 1/size of the
    total cost (the boundary nearest each multiple of total/size in the running cost). Every
    stage keeps a sliding layer when there are enough: how far a cache can be trimmed (chat,
    drafts) is bounded by its sliding layers, and all ranks must agree on it."""
    n = text.num_hidden_layers
    if size > n:
        raise DistributedError(f"pipeline over {size} ranks: the model has only {n} layers")
    costs = layer_costs(text, context)
    sliding = [int(s.is_sliding) for s in text.layers]
    need = min(1, sum(sliding) // size)  # sliding layers each stage must hold
    prefix = [sum(costs[:i]) for i in range(n + 1)]
    bounds = [0]
    for r in range(1, size):
        target = prefix[n] * r / size
        fits = [i for i in range(bounds[-1] + 1, n - (size - r) + 1)
                if sum(sliding[bounds[-1]:i]) >= need and sum(sliding[i:]) >= need * (size - r)]
        bounds.append(min(fits, key=lambda i: abs(prefix[i] - target)))
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


def stage_keeps(name: str, rank: int, size: int, layers: tuple[int, int]) -> bool:
    """Whether pipeline stage `rank` (holding `layers`) reads tensor `name` (model naming)."""
    m = _LAYER.match(name)
    if m is not None:
        return layers[0] <= int(m.group(1)) < layers[1]
    if name.startswith(_MEDIA):
        return rank == 0
    return True  # the embedding (input and tied head) and the final norm


class _Elsewhere(nn.Module):
    """A media embedder held by the first stage: later stages only need the number of rows its
    output has (their input arrives from the previous stage; these rows are never computed)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def __call__(self, x: mx.array, *_) -> mx.array:
        return mx.zeros((x.shape[0], self.width))


def _tie(cache: list, sent: mx.array) -> None:
    """Make this stage's caches depend on the send: a prefill chunk evaluates only the caches,
    and the next stage waits for these activations (as mlx-lm does with `mx.depends`)."""
    c = cache[0]
    if isinstance(c, SlidingWindowCache):
        c.keys = mx.depends(c.keys, sent)
    else:
        first = c.stored[0]
        c.stored[0] = tuple(mx.depends(list(first), sent)) if isinstance(first, tuple) else mx.depends(first, sent)


class PipelineStage(TextModel):
    """The decoder of one pipeline stage: receive, run the held layers, send on; the last
    stage's normed output is summed into every rank (the others contribute zeros)."""

    def __call__(self, h, cache, blocks=None, vision_mask="generate"):
        rank, size, group = self.group.rank(), self.group.size(), self.group
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=group)
        h = self.run_layers(h, cache, blocks, vision_mask)
        if rank == size - 1:
            return mx.distributed.all_sum(self.norm(h), group=group)
        sent = mx.distributed.send(h, rank + 1, group=group)
        _tie(cache, sent)
        return mx.distributed.all_sum(mx.depends(mx.zeros_like(h), sent), group=group)


def drafter_layers(text: TextConfig) -> list[int]:
    """The layers whose caches an MTP drafter reads: the last of each type (`Model.shared_kv`)."""
    return sorted({s.layer_type: s.index for s in text.layers}.values())


def drafting_rank(text: TextConfig, size: int) -> Optional[int]:
    """The pipeline stage holding every layer the drafter reads, if one does."""
    needed = drafter_layers(text)
    for rank, (start, end) in enumerate(split_layers(text, size)):
        if all(start <= i < end for i in needed):
            return rank
    return None


class PipelineModel(Model):
    """A pipeline stage's model: the K/V a drafter reads exist on one stage only."""

    # A stage's step ends in a send that only the caches depend on (`_tie`): kept eager.
    compiles_decode = False

    def shared_kv(self, cache: list) -> Optional[dict]:
        return super().shared_kv(cache) if self.drafts_here else None


class StageDrafter:
    """The drafter of a pipeline (`Drafter`'s interface): held by the stage with the K/V it
    reads; what it proposes is summed into every rank, the other stages adding zeros. Those
    zeros are computed from the step's input, so that each rank issues the draft steps'
    collectives in the same order (a graph of independent sums could be run in any)."""

    def __init__(self, drafter, group: mx.distributed.Group, vocab_size: int):
        self.drafter, self.group, self.vocab_size = drafter, group, vocab_size

    def _everywhere(self, mine: Optional[mx.array], shape: tuple, dtype, after: mx.array) -> mx.array:
        """`mine` (this stage's, or None elsewhere: zeros that wait for `after`) summed over the ranks."""
        if mine is None:
            mine = mx.depends(mx.zeros(shape, dtype), after)
        return mx.distributed.all_sum(mine.astype(dtype), group=self.group)

    def hidden(self, inputs_embeds: mx.array, kv: Optional[dict], position: int) -> tuple[mx.array, mx.array]:
        if self.drafter is None:  # nothing to compute here: a stand-in that follows the input
            zero = mx.depends(mx.zeros(inputs_embeds.shape[:-1] + (1,)), inputs_embeds)
            return zero, zero
        return self.drafter.hidden(inputs_embeds, kv, position)

    def greedy(self, y: mx.array) -> mx.array:
        mine = self.drafter.greedy(y) if self.drafter is not None else None
        return self._everywhere(mine, y.shape[:-1], mx.int32, y)

    def logits(self, y: mx.array) -> mx.array:
        mine = self.drafter.logits(y) if self.drafter is not None else None
        return self._everywhere(mine, (*y.shape[:-1], self.vocab_size), mx.float32, y)

    def __call__(self, inputs_embeds: mx.array, kv: Optional[dict], position: int) -> tuple[mx.array, mx.array]:
        y, h_next = self.hidden(inputs_embeds, kv, position)
        return self.logits(y), h_next


def place_drafter(model: PipelineModel, load) -> StageDrafter:
    """The pipeline's drafter: `load()` runs on the stage that drafts only."""
    if drafting_rank(model.config.text_config, model.group.size()) is None:
        raise DistributedError(f"MTP drafting over {model.group.size()} pipeline stages: the layers the drafter "
                               "reads are on different stages; use tensor parallel or --draft-model none")
    return StageDrafter(load() if model.drafts_here else None, model.group, model.config.text_config.vocab_size)


def pipeline(model, group: mx.distributed.Group, layers: Optional[tuple[int, int]] = None):
    """Keep only this rank's stage of `model` (before its weights are loaded); returns it."""
    rank, size = group.rank(), group.size()
    text = model.config.text_config
    start, end = layers or split_layers(text, size)[rank]
    model.__class__ = PipelineModel
    model.group = group
    model.drafts_here = all(start <= i < end for i in drafter_layers(text))
    stage = model.language_model.model
    stage.layers = [layer if start <= i < end else None for i, layer in enumerate(stage.layers)]
    stage.__class__ = PipelineStage
    stage.group = group
    if rank > 0:
        hidden = text.hidden_size
        for name in ("vision_embedder", "embed_vision", "embed_audio"):
            if name in model:
                setattr(model, name, _Elsewhere(hidden))
    return model


def weight_share(config: ModelConfig, rank: int, size: int, mode: str) -> float:
    """The fraction of the model's weights `rank` holds, by parameter count."""
    from mlx.utils import tree_flatten

    params = tree_flatten(Model(config).parameters())  # lazy: nothing is allocated
    if mode == "tensor":
        held = sum(p.size * tensor_share(n, config, size) for n, p in params)
    else:
        layers = split_layers(config.text_config, size)[rank]
        held = sum(p.size for n, p in params if stage_keeps(n, rank, size, layers))
    return held / sum(p.size for _, p in params)


def rank_config(config: ModelConfig, rank: int, size: int, mode: str) -> ModelConfig:
    """A view of `config` with the layers, heads and MLP width one rank holds: what the memory
    planner sizes that rank's KV cache and activations from."""
    import copy
    from dataclasses import replace

    text = copy.copy(config.text_config)
    if mode == "tensor":
        text.num_attention_heads //= size
        text.intermediate_size //= size
        text.layers = tuple(replace(s, num_kv_heads=s.num_kv_heads // kv_split(s.num_kv_heads, size))
                            for s in text.layers)
    else:
        start, end = split_layers(text, size)[rank]
        text.layers = text.layers[start:end]
    view = copy.copy(config)
    view.text_config = text
    return view


def loader(config: ModelConfig, group: mx.distributed.Group, mode: str):
    """(rename, build, finish) for `loading.load_model` on one rank: which checkpoint tensors it
    reads, how its model is built before they load, what is done once they are in."""
    if mode not in MODES:
        raise DistributedError(f"unknown parallel mode {mode!r} (valid: {', '.join(MODES)})")
    rank, size = group.rank(), group.size()
    if mode == "tensor":
        check_tensor_parallel(config, size)
        return sanitize, Model, lambda model: shard(model, group)
    layers = split_layers(config.text_config, size)[rank]

    def rename(name: str) -> Optional[str]:
        name = sanitize(name)
        return name if name is not None and stage_keeps(name, rank, size, layers) else None

    return rename, lambda c: pipeline(Model(c), group, layers), lambda model: model
