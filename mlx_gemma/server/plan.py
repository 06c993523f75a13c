"""What the memory plan gives the server: the prefix cache, the longest context a request may
use, and the room the running sequences share (memory.make_plan, spec 10)."""

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass
class ServingPlan:
    """What the memory plan gives the sequences: `fixed` (weights and the peak activations of a
    prefill chunk, one prefill at a time) and each sequence's KV at a length."""

    budget: int
    fixed: int
    sliding: int  # one sequence's sliding-window caches (bounded)
    global_per_token: float
    hidden: int = 0  # for what a prompt's media hold while it is prefilled
    dtype_bytes: int = 2

    def kv(self, tokens: int) -> int:
        return self.sliding + int(self.global_per_token * tokens)

    def media(self, inputs) -> int:
        """What a prompt's decoded media hold until its prefill is done (memory.media_bytes)."""
        from ..generation import DEFAULT_PREFILL_STEP
        from ..memory import media_bytes

        return media_bytes(inputs, self.hidden, self.dtype_bytes, DEFAULT_PREFILL_STEP) if inputs.has_media else 0

    def max_num_seqs(self, free: int, tokens: int) -> int:
        """How many sequences of `tokens` tokens `free` bytes hold (at least 1, at most 64)."""
        return max(1, min(64, free // max(self.kv(tokens), 1)))


def plan_server(path: Path, args, cluster=None):
    """(prefix-cache bytes, context, ServingPlan) within the memory budget: by default a
    quarter of what the weights leave goes to the prefix cache; a request may use the longest
    context whose plan fits in the rest (the model's maximum where memory allows); the sequences
    decoded together share what the weights and the peak activations leave. Under mlx.launch
    each rank plans its own part and all serve what the tightest one fits."""
    from ..cluster import Cluster
    from ..config import ModelConfig
    from ..loading import resolve_model_path
    from ..memory import (KVOptions, draft_plan, longest_context, make_plan, memory_budget, refusal, run_dtype_bytes,
                          weight_bytes)

    cluster = cluster or Cluster()
    config = ModelConfig.from_file(path / "config.json")
    budget, kv = cluster.smallest(memory_budget(args.memory_limit)), KVOptions(bits=args.kv_bits)
    dtype_bytes = run_dtype_bytes(path, config)
    shares = cluster.shares(config, weight_bytes(path, dtype_bytes), args.pipeline)
    cache_bytes = (args.prompt_cache_bytes if args.prompt_cache_bytes is not None
                   else min(max(0, (budget - weights) // 4) for _, weights in shares))
    for rank, (view, weights) in enumerate(shares):
        if longest_context(view, weights, budget - cache_bytes, kv, dtype_bytes) == 0:
            plan = make_plan(view, weights, 1, budget - cache_bytes, kv, dtype_bytes)
            where = f"rank {rank}: " if cluster.size > 1 else ""
            raise InputError(f"{path}: {where}{refusal(plan, view, kv, dtype_bytes)} (the prefix cache holds "
                             f"{cache_bytes} bytes of the budget; --prompt-cache-bytes sets it)")
    context = min(longest_context(view, weights, budget - cache_bytes, kv, dtype_bytes) for view, weights in shares)
    view, weights = shares[0]
    draft = draft_plan(resolve_model_path(args.draft_model), args.num_draft_tokens) if args.draft_model else None
    plan = make_plan(view, weights, context, budget - cache_bytes, kv, dtype_bytes, draft=draft)
    fixed = plan.weights + plan.activations + plan.drafter_weights + plan.draft_activations
    return cache_bytes, context, ServingPlan(budget, fixed, plan.sliding, plan.global_per_token,
                                             config.text_config.hidden_size, dtype_bytes)
