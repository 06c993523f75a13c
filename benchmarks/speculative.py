"""MTP speculative decoding: what a round costs, and what it buys at a given acceptance (issue 13).

    python -m benchmarks.speculative --synthetic 6          # real widths, 6 layers: minutes on 2 cores
    python -m benchmarks.speculative --model PATH --quick   # the suite's smoke run

The target is a checkpoint (or the real-width stand-in, benchmarks/synthetic.py); the drafter
is a stand-in built to fit it: the target's vocabulary, head dims and RoPE, 4 layers [sliding
x3, full], ordered embeddings (2048 centroids, top 32), random weights, quantized as the target
is (4-bit default recipe). The 12B drafter's own widths are not published here, so they are
assumed: hidden 1024, MLP 4096, 8 query heads (synthetic.DRAFTER_WIDTHS); --quick uses a tiny one.

Measured for mlx-gemma and mlx-vlm 0.7.10 in one process, on one filled cache (random keys and
values at --context tokens, as benchmarks/runners.py fills decode cases), each through its own
code, at the same activation dtype:
- a plain decode step;
- verify(n): one target pass over n = K+1 tokens, its greedy tokens read back, and the cache
  trimmed again (what a round does with rejected drafts), for K = 1..8;
- one draft step (one draft token). mlx-gemma also pays once per round for exporting the
  target's K/V to the drafter (`Model.shared_kv`: the global keys are re-derived from the packed
  cache); mlx-vlm reads them from the verify pass, but projects the target's logits one
  position at a time until the first rejection, so each accepted draft costs it one more head.

With acceptance a per draft token, a round yields E = (1 - a^(K+1)) / (1 - a) tokens and costs
K draft steps + verify(K+1) (+ the export, or + (E - 1) heads), so tokens/s = E / round cost.
Random weights accept nothing: the real loops (`speculative_generate_step`, and mlx-vlm's
generate_step with the drafter) at acceptance ~0 check that model against the clock.

The Mac projection (roofline.mtp_chip_table) is bytes only: a round reads the target's weights
and KV once and the drafter's K times, on the real 12B with the assumed drafter.
"""

from __future__ import annotations

import datetime
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma.backend import lazy_verify_head
from mlx_gemma.config import ModelConfig
from mlx_gemma.errors import InputError
from mlx_gemma.loading import resolve_model_path
from mlx_gemma.memory import KVOptions
from mlx_gemma.speculative import DEFAULT_NUM_DRAFT_TOKENS, DrafterConfig

from . import roofline
from .run import commit, machine, our_dtype, parser, provenance, run_benchmark
from .runners import MlxGemma, MlxVlm, prompt
from .synthetic import DRAFTER_WIDTHS, HUB_CONFIG, build_drafter, drafter_config, synthetic_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ACCEPTANCE = (0.3, 0.5, 0.6, 0.7, 0.9)
PROFILES = {
    "full": dict(context=1024, ks=list(range(1, 9)), repeats=3, loop_tokens=24, drafter={}),
    "quick": dict(context=64, ks=[1, DEFAULT_NUM_DRAFT_TOKENS], repeats=1, loop_tokens=6,
                  drafter=dict(hidden_size=64, intermediate_size=128)),
}
IMPLS = ("mlx-gemma", "mlx-vlm")


def timed(fn, repeats: int, reset=None) -> dict:
    """Seconds per call of `fn` (which evaluates what it computes) after one untimed warm-up;
    `reset`, untimed, puts the cache back after each call."""
    runs = []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - tic
        if reset:
            reset()
        if i:
            runs.append(elapsed)
    return {"runs_s": runs, "median_s": statistics.median(runs)}


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def loop_rate(impl, steps, context: int, tokens: int) -> dict:
    """Tokens/s of a generation loop `steps(cache, max_tokens)` after a filled cache, as
    runners.time_case times decode (the first token, from the prompt's own step, starts the
    clock). It may run K + 1 tokens further than it is read: both loops draft fewer than K
    in their last rounds, which the timed ones should not be."""
    cache = impl.make_cache()
    impl.fill(cache, context)
    gen = steps(cache, tokens + DEFAULT_NUM_DRAFT_TOKENS + 1)
    stamps = [time.perf_counter() for _ in itertools.islice(gen, tokens)]
    gen.close()
    return {"tokens": len(stamps), "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def measure_ours(path: Path, drafter_path: Path, dtype: str, p: dict, ids: list) -> dict:
    from mlx_gemma.generation import generate_step, speculative_generate_step
    from mlx_gemma.speculative import load_drafter

    impl = MlxGemma(path, dtype)
    model = impl.model
    drafter = load_drafter(drafter_path, dtype=impl.dtype, target=model)
    embed = model.language_model.model.embed
    tok = mx.array([ids[:1]])
    cache = impl.make_cache()
    impl.fill(cache, p["context"])
    out = {"activation_dtype": str(impl.dtype).removeprefix("mlx.core.")}

    def trim(n):
        for c in cache:
            c.trim(n)

    out["decode"] = timed(lambda: mx.eval(greedy(model(tok, cache=cache, logits_to_keep=1)[:, -1])),
                          p["repeats"], lambda: trim(1))

    lazy = lazy_verify_head()

    def verify(n):  # speculative_decode's greedy verify pass at acceptance 0, read back
        block = mx.array([ids[:n]])
        logits, hidden = model(block, cache=cache, mm_token_type_ids=mx.zeros(block.shape, mx.int32),
                               return_hidden=True)
        if lazy:  # the head row by row: one row when the first draft is rejected
            logits = model.language_model.head(hidden[:, :1])[0]
        greedy(logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)).tolist()
        mx.eval(hidden)
        trim(n)

    out["verify"] = {n: timed(lambda: verify(n), p["repeats"]) for n in [k + 1 for k in p["ks"]]}
    # A draft step after a round: the cache holds the bonus token, h is its hidden state.
    _, hidden = model(tok, cache=cache, return_hidden=True)
    position = cache[0].offset
    out["kv_export"] = timed(lambda: mx.eval(model.shared_kv(cache)), p["repeats"])
    kv = model.shared_kv(cache)
    mx.eval(kv, hidden)

    def draft():
        e = embed(tok)
        y, h = drafter.hidden(mx.concatenate([e, hidden.astype(e.dtype)], axis=-1), kv, position)
        mx.eval(drafter.greedy(y), h)

    out["draft_step"] = timed(draft, p["repeats"])
    if lazy:  # each accepted draft costs one more head row
        def head():
            logits = model.language_model.head(hidden[:, :1])[0]
            greedy(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()

        out["head"] = timed(head, p["repeats"])
    trim(1)
    k = DEFAULT_NUM_DRAFT_TOKENS
    out["plain_loop"] = loop_rate(impl, lambda c, n: generate_step(model, ids[:1], c, max_tokens=n),
                                  p["context"], p["loop_tokens"])
    stats = {}
    out["mtp_loop"] = loop_rate(impl, lambda c, n: speculative_generate_step(
        model, drafter, ids[:1], c, num_draft_tokens=k, max_tokens=n, stats=stats), p["context"], p["loop_tokens"])
    out["mtp_loop"].update(k=k, acceptance=stats["accepted"] / max(stats["drafted"], 1))
    return out


def vlm_drafter(path: Path, dtype: mx.Dtype):
    """mlx-vlm's drafter from our stand-in checkpoint. Its ordered-embedding head indexes
    `embed_tokens.weight` as a float table, which a quantized table is not (the packed codes
    fail to reshape), so the table is dequantized here; the head reads 4096 of its rows."""
    from mlx_vlm.speculative.drafters import load_drafter

    drafter, _ = load_drafter(str(path), kind="mtp")
    drafter.set_dtype(dtype)
    table = drafter.model.embed_tokens
    if isinstance(table, nn.QuantizedEmbedding):
        weight = mx.dequantize(table.weight, table.scales, table.biases, group_size=table.group_size,
                               bits=table.bits, mode=table.mode)
        drafter.model.embed_tokens = nn.Embedding(*weight.shape)
        drafter.model.embed_tokens.weight = weight
    return drafter


def measure_vlm(path: Path, drafter_path: Path, dtype: str, p: dict, ids: list) -> dict:
    """The same costs through mlx-vlm's MTP round (speculative/mtp.py `_mtp_rounds`): its verify,
    acceptance walk and commit, and `draft_block` after `set_shared_kv`."""
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.speculative.mtp import (_buffer_mtp_target_cache, _mtp_acceptance_walk, _mtp_logits_from_hidden,
                                         _mtp_verify_target)

    impl = MlxVlm(path, dtype)
    model, lm = impl.model, impl.model.language_model
    drafter = vlm_drafter(drafter_path, impl.dtype)
    tok = mx.array([ids[:1]])
    cache = impl.make_cache()
    impl.fill(cache, p["context"])
    out = {"activation_dtype": str(impl.dtype).removeprefix("mlx.core.")}
    # Its plain step (generate_step's _step) on its own cache, which a wrapped rotating cache
    # cannot trim: the context grows by a few tokens.
    out["decode"] = timed(lambda: mx.eval(greedy(lm(tok, cache=cache, logits_to_keep=1).logits[:, -1])),
                          p["repeats"])
    # Its MTP loop first swaps the sliding caches for trimmable buffered ones.
    _buffer_mtp_target_cache(cache, drafter, max(p["ks"]) + 1)

    def trim(n):
        for c in cache:
            c.trim(n)

    last = {}

    def verify(n):
        block = mx.array([ids[:n]])
        last["v"] = v = _mtp_verify_target(lm, block, cache, greedy, sample_target_tokens=True)
        last["accepted"], _ = _mtp_acceptance_walk(lm, v, block[:, 1:], greedy, n)
        v.commit(lm, cache, last["accepted"], n)  # trims the rejected drafts, keeps accepted + bonus

    out["verify"] = {n: timed(lambda: verify(n), p["repeats"], lambda: trim(last["accepted"] + 1))
                     for n in [k + 1 for k in p["ks"]]}
    # A draft step after a round, as _mtp_rounds sets it up.
    verify(1)
    v = last["v"]
    hidden = lm.speculative_draft_hidden(v.hidden[:, :1])
    offset = cache[0].offset
    drafter.reset(model)
    drafter.set_shared_kv(v.shared_kv_states, offset, position=offset - 1, kv_valid_len=offset)
    mx.eval(hidden)
    out["draft_step"] = timed(lambda: mx.eval(drafter.draft_block(ids[0], hidden, None, 2, greedy, greedy=True)),
                              p["repeats"])
    # Each accepted draft costs its deferred walk one more head projection.
    def head():
        logits = _mtp_logits_from_hidden(lm, v.hidden[:, :1])[:, 0]
        greedy(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()

    out["head"] = timed(head, p["repeats"])
    trim(1)
    k = DEFAULT_NUM_DRAFT_TOKENS

    def steps(c, n, draft=False):
        kwargs = dict(draft_model=drafter, draft_kind="mtp", draft_block_size=k + 1) if draft else {}
        return generate_step(mx.array([ids[:1]]), model, None, None, prompt_cache=c, max_tokens=n,
                             temperature=0.0, **kwargs)

    out["plain_loop"] = loop_rate(impl, steps, p["context"], p["loop_tokens"])
    out["mtp_loop"] = loop_rate(impl, lambda c, n: steps(c, n, draft=True), p["context"], p["loop_tokens"])
    drafted = sum(drafter.draft_lens) or 1
    out["mtp_loop"].update(k=k, acceptance=sum(drafter.accept_lens) / drafted)
    return out


def round_cost(m: dict, impl: str, k: int, a: float) -> float:
    """Seconds of one round of K drafts at acceptance a, from the measured parts."""
    cost = k * m["draft_step"]["median_s"] + m["verify"][k + 1]["median_s"]
    if impl == "mlx-gemma":
        cost += m["kv_export"]["median_s"]
    if "head" in m:  # a verify that computes the head row by row, up to the first rejection
        cost += (roofline.tokens_per_round(a, k) - 1) * m["head"]["median_s"]
    return cost


def model_rows(runs: dict, ks: list) -> tuple[list, list]:
    """(per-K round costs at acceptance 0, tokens/s per K and acceptance)."""
    rounds, rates = [], []
    for k in ks:
        row = {"k": k}
        for name, m in runs.items():
            row[name] = {"verify_over_decode": m["verify"][k + 1]["median_s"] / m["decode"]["median_s"],
                         "round_s": round_cost(m, name, k, 0.0)}
        row["round_ratio"] = row["mlx-gemma"]["round_s"] / row["mlx-vlm"]["round_s"]
        rounds.append(row)
        for a in ACCEPTANCE:
            e = roofline.tokens_per_round(a, k)
            r = {"k": k, "a": a, "tokens_per_round": e}
            for name, m in runs.items():
                tps = e / round_cost(m, name, k, a)
                r[name] = {"tokens_per_s": tps, "speedup": tps * m["decode"]["median_s"]}
            r["round_ratio"] = round_cost(runs["mlx-gemma"], "mlx-gemma", k, a) / round_cost(
                runs["mlx-vlm"], "mlx-vlm", k, a)
            rates.append(r)
    return rounds, rates


def mac_projection(context: int) -> dict:
    """Bytes per round of the real 12B (4-bit default recipe) with the assumed drafter."""
    raw = json.loads(HUB_CONFIG.read_text())
    real = ModelConfig.from_dict(raw)
    drafter = DrafterConfig.from_dict(drafter_config(raw))
    return {"context": context,
            "target_bytes": roofline.weight_bytes_min(real) + roofline.kv_bytes(real.text_config, context,
                                                                                KVOptions(), 2),
            "drafter_step_bytes": roofline.drafter_bytes(drafter) + roofline.drafter_kv_bytes(
                drafter.text_config, real.text_config, context, 2)}


def benchmark(args) -> dict:
    p = dict(PROFILES["quick" if args.quick else "full"])
    if args.context is not None:
        if args.context < 1:
            raise InputError(f"--context: must be at least 1, got {args.context}")
        p["context"] = args.context
    if args.synthetic:
        path, model_name = synthetic_checkpoint(args.synthetic), f"synthetic 12B widths, {args.synthetic} layers"
    else:
        path, model_name = resolve_model_path(args.model), args.model
    target = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_dict(target)
    dtype = our_dtype(path, config, args.dtype)  # mlx-vlm runs at it too
    ids = prompt(config, "decode", max(p["ks"]) + 2)[0][1:]  # ordinary text ids
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        drafter_path = build_drafter(Path(tmp) / "drafter", target, **p["drafter"])
        for name, measure in zip(IMPLS, (measure_ours, measure_vlm)):
            print(f"{name}:", file=sys.stderr, flush=True)
            runs[name] = measure(path, drafter_path, dtype, p, ids)
            mx.clear_cache()
        drafter_raw = json.loads((drafter_path / "config.json").read_text())
    rounds, rates = model_rows(runs, p["ks"])
    return {
        "meta": {"model": model_name, "checkpoint": str(path), "quantization": target.get("quantization"),
                 "layers": target["text_config"]["num_hidden_layers"], "machine": machine(), "commit": commit(),
                 "command": "python -m benchmarks.speculative " + " ".join(args.argv),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "profile": "quick" if args.quick else "full", "context": p["context"], "repeats": p["repeats"],
                 "drafter": {"text_config": {k: drafter_raw["text_config"][k] for k in
                                             ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "layer_types")},
                             **{k: drafter_raw[k] for k in ("backbone_hidden_size", "num_centroids",
                                                            "centroid_intermediate_top_k", "quantization")},
                             "assumed": "the 12B drafter's widths are not published here: hidden, MLP "
                                        "and query heads are assumptions"}},
        "runs": runs,
        "rounds": rounds,
        "tokens_per_s": rates,
        "mac_projection": mac_projection(p["context"]),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def tables(report: dict) -> list:
    runs = report["runs"]
    lines = ["| implementation | decode step | draft step | K/V export / round | head / accepted draft |",
             "|---|---|---|---|---|"]
    for name, m in runs.items():
        lines.append(f"| {name} ({m['activation_dtype']}) | {ms(m['decode']['median_s'])} | "
                     f"{ms(m['draft_step']['median_s'])} | "
                     f"{ms(m['kv_export']['median_s']) if 'kv_export' in m else '-'} | "
                     f"{ms(m['head']['median_s']) if 'head' in m else '-'} |")
    lines += ["", "Per round at acceptance 0 (verify includes trimming the cache back):", "",
              "| K | verify(K+1) / decode, mlx-gemma | mlx-vlm | round, mlx-gemma | mlx-vlm | ratio |",
              "|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        g, v = r["mlx-gemma"], r["mlx-vlm"]
        lines.append(f"| {r['k']} | {g['verify_over_decode']:.2f}x | {v['verify_over_decode']:.2f}x | "
                     f"{ms(g['round_s'])} | {ms(v['round_s'])} | {r['round_ratio']:.2f}x |")
    plain = {n: 1 / m["decode"]["median_s"] for n, m in runs.items()}
    lines += ["", f"Tokens/s by acceptance per draft token (modelled from the parts above); plain decode: "
              f"mlx-gemma {plain['mlx-gemma']:.2f}, mlx-vlm {plain['mlx-vlm']:.2f} tok/s. "
              "Each cell: mlx-gemma / mlx-vlm tok/s (speedup over its own plain decode).", "",
              "| K | " + " | ".join(f"a = {a}" for a in ACCEPTANCE) + " |", "|---|" + "---|" * len(ACCEPTANCE)]
    for k in [r["k"] for r in report["rounds"]]:
        cells = []
        for r in (x for x in report["tokens_per_s"] if x["k"] == k):
            g, v = r["mlx-gemma"], r["mlx-vlm"]
            cells.append(f"{g['tokens_per_s']:.2f} ({g['speedup']:.2f}x) / {v['tokens_per_s']:.2f} "
                         f"({v['speedup']:.2f}x)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "The real loops at acceptance ~0 (random weights), greedy; the modelled slowdown is a "
              "round at acceptance 0 in plain decode steps: K draft steps + K/V export + verify(K+1):", "",
              "| implementation | plain tok/s | MTP tok/s (K, acceptance) | slowdown | modelled |",
              "|---|---|---|---|---|"]
    for name, m in runs.items():
        loop, k, decode = m["mtp_loop"], m["mtp_loop"]["k"], m["decode"]["median_s"]
        parts = [k * m["draft_step"]["median_s"], m.get("kv_export", {}).get("median_s", 0.0),
                 m["verify"][k + 1]["median_s"]]
        lines.append(f"| {name} | {m['plain_loop']['tokens_per_s']:.2f} | {loop['tokens_per_s']:.2f} "
                     f"(K={k}, {loop['acceptance']:.2f}) | "
                     f"{m['plain_loop']['tokens_per_s'] / loop['tokens_per_s']:.2f}x | "
                     + " + ".join(f"{x / decode:.2f}" for x in parts) + f" = {sum(parts) / decode:.2f}x |")
    return lines


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(report, indent=2) + "\n")
    m, d, mac = report["meta"], report["meta"]["drafter"], report["mac_projection"]
    dt = d["text_config"]
    md = [f"# MTP speculative decoding: {m['model']}", "", *provenance(m), "",
          f"Target: {m['layers']} layers, quantization {m['quantization']}; KV cache filled to {m['context']} "
          f"tokens; median of {m['repeats']} after a warm-up. Drafter (stand-in, random weights, "
          f"{'4-bit' if d['quantization'] else 'bfloat16'}): hidden {dt['hidden_size']}, MLP "
          f"{dt['intermediate_size']}, {dt['num_attention_heads']} query heads, layers "
          f"{', '.join(t.split('_')[0] for t in dt['layer_types'])}, {d['num_centroids']} centroids top "
          f"{d['centroid_intermediate_top_k']}; {d['assumed']} (assumed: {DRAFTER_WIDTHS}).", "",
          *tables(report), "",
          f"## The real 12B on Apple Silicon (bytes only, context {mac['context']})", "",
          f"A round reads the target's weights and KV once ({mac['target_bytes'] / 1e9:.2f} GB) and the "
          f"drafter's K times ({mac['drafter_step_bytes'] / 1e6:.1f} MB per step: its layers, the centroids "
          "and 4096 table rows, and the two target layers' K/V it attends to).", "",
          roofline.mtp_chip_table(mac["target_bytes"], mac["drafter_step_bytes"], DEFAULT_NUM_DRAFT_TOKENS,
                                  ACCEPTANCE), ""]
    (out / "speculative.md").write_text("\n".join(md))


def main(argv=None) -> None:
    p = parser("python -m benchmarks.speculative", __doc__, "a tiny drafter, 64 tokens of context, K 1 and 3, one repeat")
    p.add_argument("--context", type=int, default=None, help="tokens in the cache (default 1024; quick 64)")
    run_benchmark(p, argv, benchmark, write, "speculative")


if __name__ == "__main__":
    main()
