"""The LoRA training loop: batches of examples (tuning/data.py) -> loss -> adapter updates.

mlx-lm's `TrainingArgs`, optimizers and schedules are used as they are. Its `train()` is not:
it compiles the step, and ours cannot be traced (media placement and vision masks are
computed on the host from the token ids); it patches `__call__` of the layer *class* for
checkpointing, which would leave every later inference in the process recomputing; and it
writes adapters in place, so an interrupted save loses the last good one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import TrainingArgs

from ..cache import WholeSequence, vision_blocks
from ..errors import InputError
from ..prompt import token_types
from .checkpoints import kept, non_finite

# Rows of hidden states whose logits are formed at once: [rows, vocab] float32 and its few
# copies in the backward are the largest activations of a step (262K vocab: 67 MB each; 64
# rows keep the 12B's 2048-token step inside a 16 GB Mac, tuning/budget.py).
LOSS_ROWS = 64


@dataclass
class Batch:
    """Examples padded to one length: `embeds` [B, L, hidden] (media rows in place), the
    positions whose next token is trained (`rows`, flat indices into B * L) and those tokens."""

    embeds: mx.array
    blocks: Optional[np.ndarray]
    rows: mx.array
    targets: mx.array

    @property
    def tokens(self) -> int:
        return self.targets.size


def make_batch(model, examples: list) -> Batch:
    """Pad with the pad token on the right (causal attention never looks at it, the loss skips
    it); embed the media of every example in order, which is the order of their placeholders."""
    cfg = model.config
    L = max(len(e) for e in examples)
    ids = np.full((len(examples), L), cfg.text_config.pad_token_id, np.int32)
    trained = np.zeros((len(examples), L), bool)
    for b, e in enumerate(examples):
        ids[b, :len(e)], trained[b, :len(e)] = e.ids, e.trained
    soft: dict = {}
    for e in examples:
        for token, rows in (model.embed_media(**e.media) if e.media else {}).items():
            soft.setdefault(token, []).append(rows)
    soft = {t: mx.concatenate(r) for t, r in soft.items()}
    embeds = mx.stop_gradient(model.embed_inputs(mx.array(ids), soft))
    # Position i predicts token i + 1: row b * L + i of the hidden states, target ids[b, i + 1].
    b, i = np.divmod(np.flatnonzero(trained[:, 1:]), max(L - 1, 1))
    return Batch(embeds, vision_blocks(token_types(ids, cfg)), mx.array(b * L + i), mx.array(ids[b, i + 1]))


def piece_loss(head: Callable, h: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(head(h).astype(mx.float32), targets, reduction="sum")


def head_loss(head: Callable, h: mx.array, targets: mx.array) -> mx.array:
    """Summed cross entropy of head(h) (float32) against `targets`, LOSS_ROWS rows at a time,
    one after the other in the forward and again in the backward: the logits of the whole
    sequence ([tokens, 262K] float32, several copies in the backward) would not fit a 16 GB Mac.
    mx.depends chains the pieces, or the graph would hold all of them at once; MLX's scheduler
    still runs ahead into the next piece (budget.ONE_GRAPH_LOGIT_COPIES), which a checkpointed
    step avoids by evaluating each piece (checkpointed_value_and_grad)."""

    @mx.custom_function
    def summed(h, targets):
        total = mx.array(0.0, mx.float32)
        for start in range(0, targets.size, LOSS_ROWS):
            x = mx.depends(h[start:start + LOSS_ROWS], total)
            total = total + piece_loss(head, x, targets[start:start + LOSS_ROWS])
        return total

    @summed.vjp
    def summed_vjp(primals, cotangent, output):
        h, targets = primals
        grads = []
        for start in range(0, targets.size, LOSS_ROWS):
            x = h[start:start + LOSS_ROWS]
            if grads:
                x = mx.depends(x, grads[-1])
            t = targets[start:start + LOSS_ROWS]
            grads.append(mx.vjp(lambda x: piece_loss(head, x, t), [x], [cotangent])[1][0])
        return mx.concatenate(grads) if grads else mx.zeros_like(h), mx.zeros_like(targets)

    return summed(h, targets)


def loss(model, batch: Batch) -> tuple[mx.array, int]:
    """Mean cross entropy over the trained tokens, and their number."""
    lm = model.language_model
    cache = [WholeSequence(spec.window) for _, spec in lm.model.held]
    h = lm.model(batch.embeds, cache, batch.blocks, model.vision_mask)
    h = h.reshape(-1, h.shape[-1])[batch.rows]
    return head_loss(lm.head, h, batch.targets) / max(batch.tokens, 1), batch.tokens


def value_and_grad(model, batch: Batch, checkpointing: bool = False) -> tuple[mx.array, int, dict]:
    """The mean loss over the trained tokens, their number and the gradients of the model's
    trainable parameters (a tree like model.trainable_parameters())."""
    if checkpointing:
        return checkpointed_value_and_grad(model, batch)
    (value, count), grads = nn.value_and_grad(model, loss)(model, batch)
    return value, count, grads


def checkpointed_value_and_grad(model, batch: Batch) -> tuple[mx.array, int, dict]:
    """Gradient checkpointing by hand, evaluated one piece at a time: the forward keeps each
    layer's input; the loss and its gradient at the last layer's output follow, LOSS_ROWS rows
    at a time; then each layer, the last first, runs again from its input under mx.vjp. As one
    lazy graph (mx.checkpoint), MLX's scheduler ran ahead of the ops it had finished, so the
    arrays of several loss pieces or of a layer and the loss were held at once, a peak that moved with
    the graph's shape (8 to 15 pieces' worth); evaluated piece by piece, a step holds one
    layer's recomputation and backward, or one piece of the loss, which the plan counts
    (tuning/budget.py). The same compute: one forward, one recomputation, one backward."""
    grads = model.trainable_parameters()
    outside = [k for k, _ in tree_flatten(grads) if not k.startswith("language_model.model.layers.")]
    if outside:
        raise ValueError(f"gradient checkpointing trains the decoder layers' parameters only, not {outside[0]}")
    lm = model.language_model
    held = lm.model.held
    caches = [WholeSequence(spec.window) for _, spec in held]
    masks = lm.model.masks(batch.embeds.shape[1], caches, batch.blocks, model.vision_mask)
    h, inputs = batch.embeds, []
    for (layer, _), mask, c in zip(held, masks, caches):
        inputs.append(h)
        h = layer(h, mask, c)
        mx.eval(h)
    shape = h.shape
    h = h.reshape(-1, shape[-1])
    x, scale = h[batch.rows], mx.array(1 / max(batch.tokens, 1), mx.float32)
    total, dx = mx.array(0.0, mx.float32), []
    for start in range(0, batch.tokens, LOSS_ROWS):
        t = batch.targets[start:start + LOSS_ROWS]
        (value,), (g,) = mx.vjp(lambda x: piece_loss(lm.head, lm.model.norm(x), t), [x[start:start + LOSS_ROWS]],
                                [scale])
        total = total + value
        mx.eval(total, g)
        dx.append(g)
    dh = mx.zeros_like(h).at[batch.rows].add(mx.concatenate(dx).astype(h.dtype)).reshape(shape) if dx else \
        mx.zeros(shape, h.dtype)
    del h, x, dx
    layer_grads = grads["language_model"]["model"]["layers"]
    index = [j for j, layer in enumerate(lm.model.layers) if layer is not None]  # of each held layer
    # Below the lowest adapted layer no gradient is needed.
    lowest = min((i for i, (layer, _) in enumerate(held) if tree_flatten(layer.trainable_parameters())),
                 default=len(held))
    for i in reversed(range(lowest, len(held))):
        layer = held[i][0]
        flat = tree_flatten(layer.trainable_parameters())
        keys, values = [k for k, _ in flat], [v for _, v in flat]

        def run(*args, layer=layer, mask=masks[i], cache=caches[i], keys=keys):
            layer.update(tree_unflatten(list(zip(keys, args[:-1]))))
            return layer(args[-1], mask, cache)

        _, vjps = mx.vjp(run, [*values, inputs[i]], [dh])
        layer.update(tree_unflatten(list(zip(keys, values))))
        mx.eval(vjps)
        dh, inputs[i] = vjps[-1], None
        layer_grads[index[i]] = tree_unflatten(list(zip(keys, vjps[:-1])))
    return total * scale, batch.tokens, grads


def iterate_batches(examples: list, batch_size: int, loop: bool = False, seed: int = 0) -> Iterator[list]:
    """Batches of similar length (mlx-lm's scheme: sort by length, cut, shuffle the batches)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for k in (rng.permutation(len(batches)) if loop else range(len(batches))):
            yield [examples[i] for i in batches[k]]
        if not loop:
            return


def evaluate(model, examples: list, batch_size: int, num_batches: int) -> float:
    """Token-weighted mean loss over `num_batches` batches (-1: all)."""
    total, tokens = 0.0, 0
    for n, group in enumerate(iterate_batches(examples, batch_size)):
        if n == num_batches:
            break
        value, count = loss(model, make_batch(model, group))
        total += value.item() * count
        tokens += count
    return total / max(tokens, 1)


@dataclass
class Report:
    iteration: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    learning_rate: Optional[float] = None
    iterations_per_second: Optional[float] = None
    tokens_per_second: Optional[float] = None
    trained_tokens: Optional[int] = None
    peak_memory: Optional[float] = None  # GB

    def line(self) -> str:
        # The columns and wording of mlx-lm's reports before its table UI, so logs parse alike.
        if self.val_loss is not None:
            return f"Iter {self.iteration}: Val loss {self.val_loss:.3f}"
        return (f"Iter {self.iteration}: Train loss {self.train_loss:.3f}, Learning Rate "
                f"{self.learning_rate:.3e}, It/sec {self.iterations_per_second:.3f}, Tokens/sec "
                f"{self.tokens_per_second:.3f}, Trained Tokens {self.trained_tokens}, "
                f"Peak mem {self.peak_memory:.3f} GB")


def save_points(start: int, iters: int, every: int) -> list[int]:
    """The iterations a run from `start` to `iters` saves at: every `every` steps and the last."""
    return [it for it in range(start + 1, iters + 1) if it % every == 0 or it == iters]


def train(model, optimizer, train_set: list, val_set: list, args: TrainingArgs, *,
          save: Callable[[int], None], start: int = 0, seed: int = 0,
          report: Callable[[Report], None] = lambda r: print(r.line(), flush=True)) -> list[Report]:
    """Iterations start + 1 .. args.iters; `save(iteration)` at `save_points`. A loss or an
    adapter weight that stops being finite ends the run (an InputError) before it is saved.
    Returns the reports (for the loss curve)."""
    reports, losses, tokens, steps, elapsed, trained, accumulated = [], 0.0, 0, 0, 0.0, 0, None
    batches = iterate_batches(train_set, args.batch_size, loop=True, seed=seed)
    saves, saved = set(save_points(start, args.iters, args.steps_per_save)), None

    def diverged(it: int, problem: str) -> InputError:
        return InputError(f"iteration {it}: {problem}: the run stopped, {kept(saved)} (try a lower --learning-rate)")

    try:
        model.train()
        for it in range(start + 1, args.iters + 1):
            group = next(batches)
            if val_set and (it == start + 1 or it % args.steps_per_eval == 0 or it == args.iters):
                tic = time.perf_counter()
                model.eval()
                reports.append(Report(it, val_loss=evaluate(model, val_set, args.batch_size, args.val_batches)))
                if not math.isfinite(reports[-1].val_loss):
                    raise diverged(it, f"the validation loss is {reports[-1].val_loss}")
                model.train()
                report(reports[-1])
                print(f"Iter {it}: Val took {time.perf_counter() - tic:.3f}s", flush=True)
            tic = time.perf_counter()
            batch = make_batch(model, group)
            value, count, grads = value_and_grad(model, batch, args.grad_checkpoint)
            if accumulated is not None:
                grads = tree_map(lambda x, y: x + y, grads, accumulated)
            if it % args.grad_accumulation_steps == 0:
                if args.grad_accumulation_steps > 1:
                    grads = tree_map(lambda x: x / args.grad_accumulation_steps, grads)
                optimizer.update(model, grads)
                accumulated = None
            else:
                accumulated = grads
            mx.eval(model.trainable_parameters(), optimizer.state, value, accumulated)
            elapsed += time.perf_counter() - tic
            if not math.isfinite(value.item()):
                raise diverged(it, f"the training loss is {value.item()}")
            bad = non_finite(dict(tree_flatten(model.trainable_parameters())))
            if bad is not None:
                raise diverged(it, f"adapter weight {bad} holds NaN or infinite values")
            losses, tokens, steps = losses + value.item(), tokens + count, steps + 1
            if it % args.steps_per_report == 0 or it == args.iters:
                trained += tokens
                reports.append(Report(it, train_loss=losses / steps, learning_rate=optimizer.learning_rate.item(),
                                      iterations_per_second=steps / elapsed, tokens_per_second=tokens / elapsed,
                                      trained_tokens=trained, peak_memory=mx.get_peak_memory() / 1e9))
                report(reports[-1])
                losses, tokens, steps, elapsed = 0.0, 0, 0, 0.0
            if it in saves:
                save(it)
                saved = it
    finally:
        model.eval()
    return reports


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

