"""The training memory plan: weights + adapters + optimizer state + activations for one step,
counted from the config and the safetensors headers before anything is loaded.

Activations are what the backward pass keeps, per token and layer, counted from the layer's
ops (model.DecoderLayer, trainer.loss): every array an op needs for its gradient. With
gradient checkpointing a layer keeps only its input, and one layer at a time recomputes the
rest. The loss adds its LOSS_ROWS-row pieces of float32 logits (trainer.head_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, TextConfig
from ..memory import human, memory_budget, run_dtype_bytes, upcast_scales_bytes, weight_bytes
from .trainer import LOSS_ROWS

# Arrays of each width a layer keeps per token for its backward (model.py, spec 2):
#   hidden: the two norms' inputs and outputs of each block, the residual sums, the layer scalar's
#     input and output, o_proj's and down_proj's outputs;
#   intermediate: gate and up outputs, gelu_approx's tanh-form temporaries (x^3, its argument,
#     tanh, 1 + tanh), their product (down_proj's input);
#   query width (heads * head_dim): q, q_norm's output, the roped q, attention's output and its
#     [B, L, heads * d] transposed copy (o_proj's input);
#   kv width: k and v before and after their norms and the roped k.
KEPT = {"hidden": 10, "intermediate": 7, "query": 5, "kv": 5}
# A layer's backward holds, beside what it keeps, gradients of about this many hidden-wide and
# intermediate-wide arrays at once.
BACKWARD = {"hidden": 4, "intermediate": 3}
# Attention's backward forms one layer's [B, heads, L, L] scores at a time: the scores, the
# probabilities and their gradient (float32).
SCORE_COPIES = 3
# head_loss's piece: its [LOSS_ROWS, vocab] float32 logits and the copies its backward makes
# (softcap's tanh and derivative, softmax, the one-hot difference, the cast): measured 7 on the
# CPU backend (262K vocab, one 256-row piece: 1.97 GB).
LOGIT_COPIES = 7
# Adam: the adapter, its gradient and two moments, float32.
ADAPTER_STATE = 4


@dataclass
class TrainingPlan:
    weights: int
    adapters: int  # parameters
    optimizer: int  # bytes: adapters, gradients, optimizer state
    activations: int
    loss: int
    budget: int
    tokens: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.loss

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def rows(self) -> list[tuple[str, str]]:
        return [("tokens per step (batch x length)", f"{self.tokens:,}"),
                ("weights (frozen)", human(self.weights)),
                ("adapter parameters", f"{self.adapters / 1e6:.2f}M"),
                ("adapters + gradients + Adam state", human(self.optimizer)),
                (f"activations ({'checkpointed' if self.checkpointing else 'kept'} layers)", human(self.activations)),
                (f"loss ({LOSS_ROWS}-row logits)", human(self.loss)),
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
    layers = text.layers if num_layers < 0 else text.layers[-num_layers:]
    n = 0
    for s in layers:
        q, kv = text.num_attention_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv),
                  "self_attn.v_proj": None if s.k_eq_v else (h, kv), "self_attn.o_proj": (q, h),
                  "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
        n += sum(r * sum(shape) for key, shape in shapes.items() if shape and key in keys)
    return n


def layer_bytes(text: TextConfig, spec, tokens: int, dtype_bytes: int) -> int:
    """What one layer keeps for its backward over `tokens` tokens."""
    widths = {"hidden": text.hidden_size, "intermediate": text.intermediate_size,
              "query": text.num_attention_heads * spec.head_dim, "kv": spec.num_kv_heads * spec.head_dim}
    return tokens * dtype_bytes * sum(KEPT[k] * w for k, w in widths.items())


def backward_bytes(text: TextConfig, tokens: int, dtype_bytes: int) -> int:
    return tokens * dtype_bytes * (BACKWARD["hidden"] * text.hidden_size
                                   + BACKWARD["intermediate"] * text.intermediate_size)


def make_training_plan(config: ModelConfig, weights: int, budget: int, *, batch_size: int, seq_length: int,
                       num_layers: int, lora_parameters: dict, checkpointing: bool,
                       dtype_bytes: int) -> TrainingPlan:
    text, tokens = config.text_config, batch_size * seq_length
    adapters = adapter_parameters(text, num_layers, lora_parameters)
    per_layer = [layer_bytes(text, s, tokens, dtype_bytes) for s in text.layers]
    stream = tokens * text.hidden_size * dtype_bytes  # a layer's input (and the embeddings)
    if checkpointing:
        activations = (len(per_layer) + 1) * stream + max(per_layer)
    else:
        activations = stream + sum(per_layer)
    activations += backward_bytes(text, tokens, dtype_bytes)
    activations += SCORE_COPIES * batch_size * text.num_attention_heads * seq_length ** 2 * 4
    loss = LOGIT_COPIES * min(LOSS_ROWS, tokens) * text.vocab_size * 4
    return TrainingPlan(weights=weights + upcast_scales_bytes(config, dtype_bytes), adapters=adapters,
                        optimizer=ADAPTER_STATE * 4 * adapters, activations=activations, loss=loss,
                        budget=budget, tokens=tokens, checkpointing=checkpointing)


def training_plan(path: Path, args) -> TrainingPlan:
    """The plan of a `python -m mlx_gemma.lora` run (its parsed args) on the checkpoint at `path`."""
    config = ModelConfig.from_file(path / "config.json")
    return make_training_plan(config, weight_bytes(path), memory_budget(args.memory_limit),
                              batch_size=args.batch_size, seq_length=args.max_seq_length,
                              num_layers=args.num_layers, lora_parameters=args.lora_parameters,
                              checkpointing=bool(args.grad_checkpoint),
                              dtype_bytes=run_dtype_bytes(path, config, args.dtype))


def refusal(plan: TrainingPlan) -> str:
    advice = "--grad-checkpoint, " if not plan.checkpointing else ""
    return (f"training needs {human(plan.total)} per step, budget {human(plan.budget)}: use {advice}a smaller "
            "--batch-size or --max-seq-length, or a quantized model (python -m mlx_gemma.quantize)")
