"""The training memory plan: weights + adapters + optimizer state + activations for one step,
counted from the config and the safetensors headers before anything is loaded.

Activations are what the backward pass keeps, per token and adapted layer, counted from the
layer's ops (model.DecoderLayer, mlx-lm's LoRALinear): every array an op needs for its
gradient. With gradient checkpointing a layer keeps only its input, and one layer at a time
recomputes the rest. On top of what is kept comes the larger of one layer's backward (fitted to
measured peaks: BACKWARD) and the loss's LOSS_ROWS-row pieces of float32 logits
(trainer.head_loss), which run one after the other, never together. tests/test_lora.py holds a
whole step's peak to the plan within 5%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..backend import default_splits
from ..config import ModelConfig, TextConfig
from ..memory import human, memory_budget, run_dtype_bytes, upcast_scales_bytes, weight_bytes
from .trainer import LOSS_ROWS

# What an adapted layer keeps for its backward, in bytes per token and unit of width, counted
# from its ops (model.DecoderLayer, mlx-lm's LoRALinear, mx.fast.scaled_dot_product_attention's
# unfused form, which MLX runs for training on the CPU and on Metal alike). Within 0.5% of what
# `mx.get_active_memory()` holds after a layer's forward, for float32 and bfloat16 activations.
#   hidden: float32 arrays. Each RMSNorm casts its input to float32 and keeps that (the layer's
#     input, o_proj's and down_proj's outputs, the residual sum); each adapted projection casts
#     its input to float32 for its float32 A (the adapters' dtype) and keeps its own copy: the
#     normed input three times (q, k, v; twice on k_eq_v layers), the MLP's twice (gate, up).
#     With float32 activations the casts are the arrays themselves: one each.
#   intermediate: gelu_approx's input, tanh, 0.5 x and 1 + tanh, its output and up's
#     (activation dtype); down_proj's input in float32.
#   query: q_norm's float32 input, the scaled query the scores keep (activation dtype), o_proj's
#     float32 input.
#   kv: k_norm's and v_norm's float32 inputs (one array on a k_eq_v layer in float32), the roped
#     keys and normed values (activation dtype).
#   head dim: RoPE's cos and sin, for q and k, as the CPU backend keeps them (Metal's RoPE is a
#     kernel: not measured).
#   rank: each adapter's [tokens, rank] float32 product x A.
# And per sequence: the softmax's probabilities [heads, L, L] (activation dtype) and the causal
# mask [L, L] (bool).
def kept_per_token(text: TextConfig, spec, dtype_bytes: int, rank: int) -> int:
    f32 = dtype_bytes == 4
    adapted_inputs = 2 if f32 else (2 if spec.k_eq_v else 3) + 2
    hidden = 4 * (4 + adapted_inputs)
    intermediate = 6 * dtype_bytes + 4
    query = 8 + dtype_bytes
    kv = 4 * (1 if spec.k_eq_v and f32 else 2) + 2 * dtype_bytes
    projections = 6 if spec.k_eq_v else 7
    return (hidden * text.hidden_size + intermediate * text.intermediate_size
            + query * text.num_attention_heads * spec.head_dim + kv * spec.num_kv_heads * spec.head_dim
            + 2 * dtype_bytes * spec.head_dim + 4 * rank * projections)


def kept_per_sequence(text: TextConfig, seq_length: int, dtype_bytes: int) -> int:
    return (text.num_attention_heads * dtype_bytes + 1) * seq_length ** 2


# Beyond what the layers keep, the most one layer's backward holds at once (what a checkpointed
# layer's recomputation keeps is counted with kept_per_token), in bytes per token and unit of
# width: the larger of two moments, read from measured peaks, not counted op by op: MLX's
# scheduler runs ahead of the ops it has finished, so which arrays coexist depends on the graph.
#   mlp: the MLP's backward, gradients of hidden and intermediate width (the final norm's and
#     the head's arrays included).
#   attention: attention's backward, with part of the MLP's kept arrays freed by then (the
#     negative term): gradients of each width, and "scores" bytes per element of [heads, L, L].
# Without checkpointing the step is one graph (nn.value_and_grad), fitted to whole steps' peaks
# over hidden, MLP, head and sequence widths on 6-layer models, the 12B's period of 5 sliding +
# 1 global layer (float32's bytes measured 0.98-0.99x of bfloat16 steps). With checkpointing
# each layer's recomputation and backward is evaluated alone (trainer.checkpointed_value_and_grad),
# fitted on the 12B's proportions at 1/15 of its width (hidden 256, MLP 1024, 4 heads of 64,
# `python -m benchmarks.lora --layers 6 --hidden 256 --intermediate 1024 --heads 4 --head-dim 64`)
# at 128 to 1024 tokens: the MLP moment sets the peak, its float32 bytes 1.7x the widths' fit
# without checkpointing; the scores add about a byte per element beyond the probabilities kept.
_ATTENTION = {False: {"hidden": 13.6, "query": 44.0, "kv": 35.3, "intermediate": -21.9, "scores": 7.8},
              True: {"hidden": 16.8, "query": 43.5, "kv": 47.5, "intermediate": -23.1, "scores": 1.0}}
BACKWARD = {(4, False): {"mlp": {"hidden": 43.3, "intermediate": 12.8}, "attention": _ATTENTION[False]},
            (4, True): {"mlp": {"hidden": 85.1, "intermediate": 31.5}, "attention": _ATTENTION[True]},
            (2, True): {"mlp": {"hidden": 73.3, "intermediate": 17.0}, "attention": _ATTENTION[True]}}
BACKWARD[2, False] = BACKWARD[4, False]
# The loss's pieces: [LOSS_ROWS, vocab] float32 logits and the copies forward and backward make
# (softcap's tanh and derivative, logsumexp, the one-hot difference), by activation bytes,
# checkpointing and whether the head's matmul is split (backend.split_matmuls: the CPU backend,
# its halves and their concatenation on top). Checkpointed, one piece is evaluated at a time:
# 6.1-6.3 pieces' bytes measured unsplit, 7.1-7.2 split with bfloat16 activations, 8.3 with
# float32. Without, one graph, MLX runs the next piece before the last one's arrays are freed,
# by as much as its scheduler runs ahead: 10.0-13.4 measured (a 16K vocabulary on the small
# layers above, where the loss sets the peak), whatever the split; the plan takes the middle.
LOGIT_COPIES = {(2, False): 6.2, (4, False): 6.2, (2, True): 7.2, (4, True): 8.3}  # by (bytes, split)
ONE_GRAPH_LOGIT_COPIES = 11.5
# Adam: the adapter, its gradient and two moments, float32.
ADAPTER_STATE = 4


@dataclass
class TrainingPlan:
    weights: int
    adapters: int  # parameters
    optimizer: int  # bytes: adapters, gradients, optimizer state
    activations: int  # held through the step
    backward: int  # one layer's backward (and its recomputation), at its peak
    loss: int  # the loss's pieces, at their peak (not at the same time as a layer's backward)
    budget: int
    tokens: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + max(self.backward, self.loss)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def rows(self) -> list[tuple[str, str]]:
        return [("tokens per step (batch x length)", f"{self.tokens:,}"),
                ("weights (frozen)", human(self.weights)),
                ("adapter parameters", f"{self.adapters / 1e6:.2f}M"),
                ("adapters + gradients + Adam state", human(self.optimizer)),
                (f"activations ({'checkpointed' if self.checkpointing else 'kept'} layers)", human(self.activations)),
                (f"one layer's backward{' (recomputed)' if self.checkpointing else ''}", human(self.backward)),
                (f"or the loss ({LOSS_ROWS}-row logits)", human(self.loss)),
                ("total", human(self.total)),
                ("budget", human(self.budget)),
                ("fits", "yes" if self.fits else "no")]

    def table(self) -> str:
        return "\n".join(["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.rows()])


def lora_keys(lora_parameters: dict) -> set:
    keys = lora_parameters.get("keys")
    return set(keys) if keys else {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
        {f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def adapter_parameters(text: TextConfig, num_layers: int, lora_parameters: dict) -> int:
    """rank * (in + out) per adapted projection of the last `num_layers` layers (-1: all)."""
    r, h, i, keys = lora_parameters["rank"], text.hidden_size, text.intermediate_size, lora_keys(lora_parameters)
    layers = adapted_layers(text, num_layers)
    n = 0
    for s in layers:
        q, kv = text.num_attention_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv),
                  "self_attn.v_proj": None if s.k_eq_v else (h, kv), "self_attn.o_proj": (q, h),
                  "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
        n += sum(r * sum(shape) for key, shape in shapes.items() if shape and key in keys)
    return n


def adapted_layers(text: TextConfig, num_layers: int) -> list:
    return text.layers[-max(num_layers, 0):]  # mlx-lm's linear_to_lora_layers: -1 (and 0) all


def backward_bytes(text: TextConfig, spec, batch_size: int, seq_length: int, dtype_bytes: int,
                   checkpointing: bool) -> int:
    widths = {"hidden": text.hidden_size, "intermediate": text.intermediate_size,
              "query": text.num_attention_heads * spec.head_dim, "kv": spec.num_kv_heads * spec.head_dim,
              "scores": text.num_attention_heads * seq_length}
    return int(batch_size * seq_length * max(sum(c * widths[k] for k, c in moment.items())
                                             for moment in BACKWARD[dtype_bytes, checkpointing].values()))


def make_training_plan(config: ModelConfig, weights: int, budget: int, *, batch_size: int, seq_length: int,
                       num_layers: int, lora_parameters: dict, checkpointing: bool,
                       dtype_bytes: int, split_head: bool = False) -> TrainingPlan:
    """Layers below the adapted ones keep nothing: no gradient flows through them. `split_head`:
    the head's matmul runs split (backend.split_matmuls)."""
    text, tokens = config.text_config, batch_size * seq_length
    layers, adapters = adapted_layers(text, num_layers), adapter_parameters(text, num_layers, lora_parameters)
    kept = [tokens * kept_per_token(text, s, dtype_bytes, lora_parameters["rank"])
            + batch_size * kept_per_sequence(text, seq_length, dtype_bytes) for s in layers]
    backward = [backward_bytes(text, s, batch_size, seq_length, dtype_bytes, checkpointing) for s in layers]
    stream = tokens * text.hidden_size * dtype_bytes  # a checkpointed layer's input
    if checkpointing:  # one layer at a time recomputes what it keeps
        activations, backward = len(layers) * stream, max(k + b for k, b in zip(kept, backward))
    else:
        activations, backward = sum(kept), max(backward)
    copies = LOGIT_COPIES[dtype_bytes, split_head] if checkpointing else ONE_GRAPH_LOGIT_COPIES
    loss = int(copies * min(LOSS_ROWS, tokens) * text.vocab_size * 4)
    return TrainingPlan(weights=weights + upcast_scales_bytes(config, dtype_bytes),
                        adapters=adapters, optimizer=ADAPTER_STATE * 4 * adapters,
                        activations=activations, backward=backward, loss=loss,
                        budget=budget, tokens=tokens, checkpointing=checkpointing)


def training_plan(path: Path, args) -> TrainingPlan:
    """The plan of a `python -m mlx_gemma.lora` run (its parsed args) on the checkpoint at `path`."""
    config = ModelConfig.from_file(path / "config.json")
    dtype_bytes = run_dtype_bytes(path, config, args.dtype)
    return make_training_plan(config, weight_bytes(path, dtype_bytes), memory_budget(args.memory_limit),
                              batch_size=args.batch_size, seq_length=args.max_seq_length,
                              num_layers=args.num_layers, lora_parameters=args.lora_parameters,
                              checkpointing=bool(args.grad_checkpoint),
                              dtype_bytes=dtype_bytes, split_head=head_split(config))


def head_split(config: ModelConfig) -> bool:
    """Whether load() splits the head's matmul on this backend (backend.split_matmuls' rule)."""
    from ..quantization import EMBEDDING

    q, n = config.quantization, default_splits()
    return bool(q) and q.get(EMBEDDING, q) is not False and n > 1 and config.text_config.vocab_size >= n * 64


def refusal(plan: TrainingPlan) -> str:
    advice = "--grad-checkpoint, " if not plan.checkpointing else ""
    return (f"training needs {human(plan.total)} per step, budget {human(plan.budget)}: use {advice}a smaller "
            "--batch-size or --max-seq-length, or a quantized model (python -m mlx_gemma.quantize)")
