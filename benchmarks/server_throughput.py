"""Serving many agents at once (issue 30): aggregate generated tokens/s and time to first token of
`python -m mlx_gemma.server` at 1, 2, 4, 8 and 16 concurrent streams, mlx-vlm's batched server
beside it, the prefill stall (the longest gap between two tokens of a running stream while a
4K-token prompt joins), and what 8 streams cost on an M-series Mac (bytes per step, the real 12B).

    python -m benchmarks.server_throughput --compare mlx-vlm              # the real-width stand-in
    python -m benchmarks.server_throughput --quick --compare mlx-vlm      # a smoke run (~15 min, 2-core CPU)
    python -m benchmarks.server_throughput --model PATH --compare mlx-vlm # a real checkpoint (a Mac)

Throughput: at each level C, C client threads each send --requests streamed chat requests one
after the other (distinct prompts of --prompt-tokens random-word tokens and the chat template's,
--max-tokens reply tokens, temperature 0; the same prompts for both servers). Aggregate tok/s is
every generated token (the servers' usage counts) over the level's wall time, first request sent
to last reply ended. TTFT is timed at the client, sent ->
the first chunk with text (p50/p95 over the level's requests; p95 of few requests is near their
maximum). Per-stream tok/s is the median over requests of chunks after the first over the time
after the first. Our server's /metrics gives the mean batch of its decode steps during the level:
the check that the streams did decode together. Both servers start with --max-num-seqs at the
largest level (mlx-vlm 0.7.10's server batches continuously by default, unbounded; the flag is
its MLX_VLM_MAX_NUM_SEQS), so neither caps a level.

Prefill stall: --stall-streams streams decode long replies; once each has streamed a few tokens
beside all the others, one request with a --join-tokens-token prompt joins. For each running
stream, the gaps between its consecutive chunks: their median before the join, and the longest
one overlapping the join (sent -> the newcomer's first token). Ours prefills a newcomer in chunks
of generation.DEFAULT_PREFILL_STEP (512) tokens with one decode step of the batch between two
chunks, so its stall should be about one chunk's prefill; a server that prefills the prompt in one
go stalls the streams for all of it. The streams stop reading (closing their connections) once
each has streamed two chunks after the newcomer's first token.

The model: by default the real-width stand-in (benchmarks/synthetic.py; --synthetic LAYERS,
2 by default: a sliding and a global layer), the 12B's widths and 262,144-entry vocabulary,
4-bit default recipe, plus a tokenizer of the real vocabulary's size (benchmarks/constrained.py),
the test chat template (tests/reference.py) and a processor for mlx-vlm, built once into the
mlx-gemma cache. Not tests/reference.py's small model (server_ttft's): batching pays because a
step reads the weights once for every stream, and only at the real widths is a step's cost the
weights' (the tied 262K-entry head alone is 1G parameters); at hidden 256 a step costs Python and
kernel launches, and the batch gain there would measure that overhead, on any machine. On the
CPU backend the served copy stores its floating tensors (quantization scales included) in
float32: mlx-vlm runs at the stored dtype and bfloat16 activations are ~15x slower on the CPU
(benchmarks/results/speed.md), so both servers run float32 there (run.py's "same dtypes"); on
Metal the copy keeps the stand-in's bfloat16. On the CPU backend a matmul of a few rows is bound
by arithmetic, not by reading the weights (its time grows about with the rows), so the batch gain
there is smaller than on a Mac, where a decode step is bound by reading the weights. The bytes
model says what 8 streams cost there: a step of B streams reads the real 12B's weights once and
each stream's KV (roofline.kv_bytes at 4K and 32K tokens each), and B streams' aggregate ceiling
is B x bandwidth / those bytes.

Writes server_throughput.json and server_throughput.md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .run import commit, machine, provenance
from .server_ttft import free_port, start, stop

ROOT = Path(__file__).resolve().parent.parent
PEER = "mlx-vlm"
PROFILES = {
    "full": dict(levels=[1, 2, 4, 8, 16], requests=2, max_tokens=32, prompt_tokens=32, join_tokens=4096,
                 stall_streams=4),
    "quick": dict(levels=[1, 2], requests=1, max_tokens=4, prompt_tokens=16, join_tokens=600, stall_streams=2),
}
SETTLE = 3  # chunks each running stream streams beside all the others before the newcomer is sent
STALL_MAX_TOKENS = 2048  # a running stream's reply: longer than the join lasts (it is stopped after)
HTTP_TIMEOUT = 7200  # a server that prefills 4K tokens in one go on a CPU keeps a stream silent for minutes
GOALS = {"streams": 8, "over_one_stream": 3.0, "over_peer": 1.3}
EXTRA_SPECIALS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                  "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


# --- the checkpoint ----------------------------------------------------------------------------


def serving_checkpoint(layers: int, dtype: str) -> Path:
    """The stand-in with `layers` layers, its floating tensors in `dtype`, with a tokenizer, chat
    template, processor and generation config: what both servers load (built once, cached)."""
    import mlx.core as mx

    from mlx_gemma.backend import DTYPES
    from mlx_gemma.checkpoint import write_checkpoint
    from mlx_gemma.config import ModelConfig
    from mlx_gemma.loading import weight_files

    from .synthetic import synthetic_checkpoint

    src = synthetic_checkpoint(layers)
    out = src.parent / f"{src.name}-served-{dtype}"
    if (out / "tokenizer.json").exists():
        print(f"Using the served stand-in in {out}", file=sys.stderr)
        return out
    raw = json.loads((src / "config.json").read_text())
    raw["dtype"] = dtype
    target = DTYPES[dtype]

    def tensors():
        for f in weight_files(src):
            for name, v in mx.load(str(f)).items():
                yield name, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v, v.nbytes

    with tempfile.TemporaryDirectory() as side:
        write_processor(Path(side), ModelConfig.from_dict(raw))
        return write_checkpoint(out, Path(side), tensors(), raw, force=True,
                                desc=f"Writing the served {layers}-layer stand-in ({dtype})")


def model_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model PATH or --synthetic LAYERS (the default): what `chosen_model` reads."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help=model_help)
    which.add_argument("--synthetic", type=int, metavar="LAYERS", default=2,
                       help="the real-width stand-in with LAYERS layers (default 2; built once, cached)")


def chosen_model(args) -> tuple:
    """(checkpoint, name, dtype served) of `model_flags`' choice."""
    from mlx_gemma.backend import on_cpu
    from mlx_gemma.errors import InputError

    if args.model:
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            raise InputError(f"--model: {model} is not a checkpoint directory (no config.json)")
        return model, args.model, "as stored"
    dtype = "float32" if on_cpu() else "bfloat16"
    return serving_checkpoint(args.synthetic, dtype), f"synthetic 12B widths, {args.synthetic} layers", dtype


def write_processor(out: Path, config) -> None:
    """Tokenizer (the real vocabulary's size), chat template, processor and generation config."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from .constrained import stand_in_tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import reference

    # The generic class keeps the Unigram model as built (GemmaTokenizer would rebuild a BPE
    # without merges from the vocabulary: one token per letter).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=stand_in_tokenizer(config), bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens=EXTRA_SPECIALS)
    tokenizer.chat_template = reference.CHAT_TEMPLATE
    reference.make_processor(tokenizer).save_pretrained(out)
    GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=[1, 106]).save_pretrained(out)


def token_counter(path: Path) -> Optional[Callable]:
    """text -> its token offsets, from the checkpoint's tokenizer.json (None without one)."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception:
        return None
    return lambda text: tok.encode(text, add_special_tokens=False).offsets


def prompt_text(offsets: Optional[Callable], rng, tokens: int) -> str:
    """Random words, `tokens` tokens long by the tokenizer (about, without one: ~2 per word)."""
    words = " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8)))
                     for _ in range(tokens))
    if offsets is None:
        return " ".join(words.split()[:max(1, tokens // 2)])
    spans = offsets(words)
    return words[:spans[min(tokens, len(spans)) - 1][1]]


# --- the client --------------------------------------------------------------------------------


def stream(port: int, model: str, text: str, max_tokens: int, rec: Optional[dict] = None,
           stop_reading: Optional[threading.Event] = None) -> dict:
    """One streamed chat request; `rec` gets, as they come, the time it was sent, the times of its
    chunks with text, and at the end the server's usage, the finish reason and the end time. Once
    `stop_reading` is set it stops at the next chunk and closes the connection (the server cancels)."""
    rec = {} if rec is None else rec
    rec.update(times=[], tokens=None, prompt_tokens=None, finish=None)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        rec["sent"] = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        for line in r:
            now = time.perf_counter()
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(f"error event: {json.dumps(chunk['error'])[:300]}")
            usage = chunk.get("usage") or {}
            rec["tokens"] = usage.get("completion_tokens", rec["tokens"])
            rec["prompt_tokens"] = usage.get("prompt_tokens", rec["prompt_tokens"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if any(delta.get(k) for k in ("content", "reasoning", "reasoning_content")):
                    rec["times"].append(now)
                rec["finish"] = choice.get("finish_reason") or rec["finish"]
            if stop_reading is not None and stop_reading.is_set():
                rec["finish"] = rec["finish"] or "stopped by the client"
                break
    finally:
        conn.close()
        rec["end"] = time.perf_counter()
    if rec["tokens"] is None:  # no usage chunk: one token per chunk with text
        rec["tokens"] = len(rec["times"])
    return rec


def ttft(rec: dict) -> float:
    return (rec["times"][0] if rec["times"] else rec["end"]) - rec["sent"]


def percentile(values: list, q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def scrape(port: int) -> Optional[dict]:
    """Our /metrics: decode steps, rows decoded over them, tokens generated (None elsewhere)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
    except OSError:
        return None
    if r.status != 200:
        return None
    names = {"mlx_gemma_batch_size_count": "steps", "mlx_gemma_batch_size_sum": "rows",
             "mlx_gemma_generated_tokens_total": "tokens"}
    found = {names[m[1]]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M) if m[1] in names}
    return found if len(found) == len(names) else None


def summarize(streams: int, recs: list, before: Optional[dict], after: Optional[dict]) -> dict:
    """A level's figures from its requests' records and the /metrics before and after it."""
    wall = max(r["end"] for r in recs) - min(r["sent"] for r in recs)
    tokens = sum(r["tokens"] for r in recs)
    ttfts = [ttft(r) for r in recs]
    rates = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in recs
             if len(r["times"]) > 1 and r["times"][-1] > r["times"][0]]
    row = {"streams": streams, "requests": len(recs), "generated_tokens": tokens,
           "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] or 0 for r in recs), "wall_s": wall,
           "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
           "per_stream_tokens_per_s": statistics.median(rates) if rates else None, "ttft_s": ttfts,
           "finish": dict(Counter(str(r["finish"]) for r in recs))}
    if before and after and after["steps"] > before["steps"]:
        row["mean_batch"] = (after["rows"] - before["rows"]) / (after["steps"] - before["steps"])
        row["decode_steps"] = int(after["steps"] - before["steps"])
    return row


def level(port: int, model: str, streams: int, args, offsets) -> dict:
    """`streams` clients at once, each sending `args.requests` requests one after the other."""
    rng = np.random.default_rng([7, streams])
    texts = [[prompt_text(offsets, rng, args.prompt_tokens) for _ in range(args.requests)] for _ in range(streams)]
    recs: list = [[] for _ in range(streams)]
    errors: list = []
    go = threading.Barrier(streams)

    def client(i):
        go.wait()
        for text in texts[i]:
            try:
                recs[i].append(stream(port, model, text, args.max_tokens))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return

    before = scrape(port)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return summarize(streams, [r for rs in recs for r in rs], before, scrape(port))


# --- the prefill stall ---------------------------------------------------------------------------


def stall(times: list, baseline_from: float, join_sent: float, join_first: float) -> dict:
    """Per running stream (the times of its chunks): the median gap between two chunks from
    `baseline_from` to the join being sent, the longest gap overlapping the join (sent -> the
    newcomer's first token), and how many chunks it streamed meanwhile; then over all streams."""
    per, before_all = [], []
    for ts in times:
        pairs = list(zip(ts, ts[1:]))
        before = [b - a for a, b in pairs if a >= baseline_from and b <= join_sent]
        during = [b - a for a, b in pairs if b > join_sent and a < join_first]
        before_all += before
        per.append({"median_gap_before_s": statistics.median(before) if before else None,
                    "longest_gap_during_s": max(during) if during else None,
                    "chunks_during_join": sum(join_sent < t < join_first for t in ts)})
    longest = [p["longest_gap_during_s"] for p in per if p["longest_gap_during_s"] is not None]
    median = statistics.median(before_all) if before_all else None
    worst = max(longest) if longest else None
    return {"median_gap_before_s": median, "longest_gap_during_s": worst,
            "longest_over_median": worst / median if worst and median else None,
            "join_s": join_first - join_sent, "streams": per}


def wait_until(cond: Callable[[], bool], recs: list, what: str, timeout: float = HTTP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for r in recs:
            if r.get("error"):
                raise RuntimeError(r["error"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stall_run(port: int, model: str, args, offsets) -> dict:
    """`args.stall_streams` streams decode; a `args.join_tokens`-token prompt joins them."""
    rng = np.random.default_rng([11])
    recs = [{} for _ in range(args.stall_streams)]
    join: dict = {}
    stop_reading = threading.Event()

    def guarded(rec, *a):
        try:
            stream(*a, rec=rec, **({"stop_reading": stop_reading} if rec is not join else {}))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=guarded, args=(rec, port, model, prompt_text(offsets, rng, args.prompt_tokens),
                                                      STALL_MAX_TOKENS), daemon=True) for rec in recs]
    join_text = prompt_text(offsets, rng, args.join_tokens)
    everyone = recs + [join]
    try:
        for t in threads:
            t.start()
        done = lambda r: "end" in r  # noqa: E731  (a stream that ended early waits for nothing)
        wait_until(lambda: all(r.get("times") or done(r) for r in recs), everyone, "the running streams' first tokens")
        started = max(r["times"][0] for r in recs if r["times"])
        wait_until(lambda: all(sum(t > started for t in r["times"]) >= SETTLE or done(r) for r in recs), everyone,
                   "the running streams to settle")
        joiner = threading.Thread(target=guarded, args=(join, port, model, join_text, 2), daemon=True)
        joiner.start()
        wait_until(lambda: join.get("times") or done(join), everyone, "the newcomer's first token")
        first = join["times"][0] if join["times"] else join["end"]
        wait_until(lambda: all(sum(t > first for t in r["times"]) >= 2 or done(r) for r in recs), everyone,
                   "the running streams after the join")
    finally:
        stop_reading.set()
        for t in threads:
            t.join(timeout=60)
    result = stall([r["times"] for r in recs], started, join["sent"], first)
    result.update(running_streams=len(recs), join_prompt_tokens=join.get("prompt_tokens"),
                  join_ttft_s=first - join["sent"],
                  ended_early=sum(1 for r in recs if r["finish"] not in (None, "stopped by the client")))
    return result


# --- the servers ---------------------------------------------------------------------------------


def server_command(name: str, model: Path, port: int, seqs: int) -> list:
    if name == PEER:
        return [sys.executable, "-m", "mlx_vlm.server", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(port), "--max-num-seqs", str(seqs)]
    return [sys.executable, "-m", "mlx_gemma.server", "--model", str(model), "--port", str(port),
            "--max-num-seqs", str(seqs)]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"


def measure(name: str, model: Path, args, offsets, log: Path) -> dict:
    """Every level, then the stall, on one server. The peer's failures are recorded, ours raise."""
    result: dict = {"levels": [], "stall": None, "log": str(log)}
    port = free_port()
    try:
        proc = start(server_command(name, model, port, max(max(args.levels), args.stall_streams + 1)), port, log)
    except RuntimeError as e:
        if name != PEER:
            raise
        result["error"] = f"did not start ({one_line(e)})"
        return result
    try:
        print(f"{name}: warm-up", file=sys.stderr, flush=True)
        stream(port, str(model), "warm up", 2)
        for c in args.levels:
            print(f"{name}: {c} stream(s) x {args.requests} request(s)", file=sys.stderr, flush=True)
            try:
                result["levels"].append(level(port, str(model), c, args, offsets))
            except Exception as e:
                if name != PEER:
                    raise
                result["levels"].append({"streams": c, "error": one_line(e)})
        if args.join_tokens:
            print(f"{name}: {args.stall_streams} streams, a {args.join_tokens}-token prompt joins", file=sys.stderr,
                  flush=True)
            try:
                result["stall"] = stall_run(port, str(model), args, offsets)
            except Exception as e:
                if name != PEER:
                    raise
                result["stall"] = {"error": one_line(e)}
    except Exception as e:
        if name != PEER:
            raise
        result["error"] = one_line(e)
    finally:
        stop(proc)
    if name == PEER and (result.get("error") or any("error" in r for r in result["levels"] + [result["stall"] or {}])):
        result["log_tail"] = log.read_text(errors="replace")[-2000:]
    return result


# --- the report ----------------------------------------------------------------------------------


def bytes_model(contexts=(4096, 32768), batches=(1, 8)) -> dict:
    """The real 12B (4-bit default recipe, bfloat16 one-tensor KV): bytes of a step of B streams."""
    from mlx_gemma.config import ModelConfig
    from mlx_gemma.memory import KVOptions

    from . import roofline
    from .synthetic import HUB_CONFIG

    from mlx.utils import tree_flatten

    from mlx_gemma.model import Model

    real = ModelConfig.from_file(HUB_CONFIG)
    weights = roofline.weight_bytes_min(real)
    kv = {c: roofline.kv_bytes(real.text_config, c, KVOptions(), 2) for c in contexts}
    params = sum(p.size for name, p in tree_flatten(Model(real).parameters()) if roofline.is_decode_weight(name))
    return {"weights": weights, "kv_per_stream": kv, "flops_per_stream": 2 * params,
            "step_bytes": {f"B={b} at {c}": roofline.batch_step_bytes(weights, kv[c], b) for c in contexts
                           for b in batches},
            "gain": {f"B={b} at {c}": b * roofline.batch_step_bytes(weights, kv[c], 1)
                     / roofline.batch_step_bytes(weights, kv[c], b) for c in contexts for b in batches}}


def by_streams(run) -> dict:
    return {r["streams"]: r for r in (run or {}).get("levels", []) if "error" not in r}


def goals(runs: dict) -> dict:
    n = GOALS["streams"]
    ours = by_streams(runs.get("mlx-gemma"))
    theirs = by_streams(runs.get(PEER))
    out = {}
    for key, base in (("over_one_stream", ours.get(1)), ("over_peer", theirs.get(n))):
        if n in ours and base:
            ratio = ours[n]["tokens_per_s"] / base["tokens_per_s"]
            out[key] = {"ratio": ratio, "goal": GOALS[key], "met": ratio >= GOALS[key]}
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def render(report: dict) -> str:
    from . import roofline

    m, s, runs = report["meta"], report["meta"]["settings"], report["runs"]
    lines = [f"# Serving many streams at once: {m['model']}", "", *provenance(m), "",
             f"Checkpoint {m['checkpoint']} (floating tensors {m['served_dtype']}). Each level: every stream sends "
             f"{s['requests']} streamed chat request(s), one after the other: ~{s['prompt_tokens']}-token prompts, "
             f"{s['max_tokens']} reply tokens, temperature 0. Both servers run with --max-num-seqs "
             f"{s['max_num_seqs']}.", "", "## Aggregate throughput and time to first token", "",
             "| server | streams | requests | generated tokens | wall s | aggregate tok/s | vs 1 stream | "
             "per-stream tok/s | TTFT p50 s | TTFT p95 s | mean batch per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if run.get("error") and not run.get("levels"):
            lines.append(f"| {name} | {run['error']} |" + " |" * 9)
            continue
        one = by_streams(run).get(1)
        for r in run["levels"]:
            if "error" in r:
                lines.append(f"| {name} | {r['streams']} | {r['error']} |" + " |" * 8)
                continue
            gain = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
            lines.append(f"| {name} | {r['streams']} | {r['requests']} | {r['generated_tokens']} | {r['wall_s']:.1f} | "
                         f"{r['tokens_per_s']:.3g} | {gain} | {fmt(r['per_stream_tokens_per_s'], '.3g')} | "
                         f"{fmt(r['ttft_p50_s'], '.2f')} | {fmt(r['ttft_p95_s'], '.2f')} | "
                         f"{fmt(r.get('mean_batch'), '.2f')} |")
        if run.get("error"):
            lines.append(f"\n{name} stopped: {run['error']}\n")
    ours, theirs = by_streams(runs.get("mlx-gemma")), by_streams(runs.get(PEER))
    common = [c for c in ours if c in theirs]
    if common:
        lines += ["", f"Aggregate tok/s, ours / {PEER}'s, by streams: " + ", ".join(
            f"{c}: {ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f}x" for c in common) + "."]
    g = report["goals"]
    lines.append("")
    if "over_one_stream" in g:
        x = g["over_one_stream"]
        lines.append(f"Goal: aggregate at {GOALS['streams']} streams >= {x['goal']}x one stream on this backend: "
                     f"{x['ratio']:.2f}x ({'met' if x['met'] else 'not met'}).")
    if "over_peer" in g:
        x = g["over_peer"]
        lines.append(f"Goal: aggregate at {GOALS['streams']} streams >= {x['goal']}x {PEER}'s: {x['ratio']:.2f}x "
                     f"({'met' if x['met'] else 'not met'}).")
    lines += ["", "## Prefill stall", "",
              f"{s['stall_streams']} streams decode; a ~{s['join_tokens']}-token prompt joins. Gaps between two "
              "chunks of a running stream: the median before the join, the longest during it (sent -> the "
              "newcomer's first token).", "",
              "| server | join prompt tokens | join TTFT s | median gap before s | longest gap during join s | "
              "longest / median | chunks per stream during join |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        st = run.get("stall")
        if not st:
            continue
        if "error" in st:
            lines.append(f"| {name} | {st['error']} |" + " |" * 5)
            continue
        chunks = ", ".join(str(p["chunks_during_join"]) for p in st["streams"])
        lines.append(f"| {name} | {st['join_prompt_tokens']} | {st['join_ttft_s']:.2f} | "
                     f"{fmt(st['median_gap_before_s'])} | {fmt(st['longest_gap_during_s'])} | "
                     f"{fmt(st['longest_over_median'], '.1f')} | {chunks} |")
        if st["ended_early"]:
            lines.append(f"\n{name}: {st['ended_early']} running stream(s) ended before the join did.\n")
    b = report["bytes_model"]
    kv = b["kv_per_stream"]
    lines += ["", "## What 8 streams cost on an M-series Mac (the real 12B, 4-bit default recipe, bfloat16 KV)", "",
              f"A decode step of B streams reads the weights once ({b['weights'] / 1e9:.2f} GB) and each stream's KV ("
              + ", ".join(f"{v / 1e9:.3f} GB at {c} tokens" for c, v in kv.items()) + "): "
              + "; ".join(f"{k}: {v / 1e9:.2f} GB" for k, v in b["step_bytes"].items()) + ". Aggregate ceilings, "
              "B x bandwidth / bytes per step. They assume the step stays bound by its bytes: at B = 8 it also "
              f"costs {8 * b['flops_per_stream'] / 1e12:.2f} TFLOP (2 per weight per stream), which must take the "
              "GPU less time than reading the bytes does.", "",
              roofline.batch_chip_table(b["weights"], {int(c): v for c, v in kv.items()}), ""]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    from mlx_gemma.errors import InputError, run_cli

    p = argparse.ArgumentParser(prog="python -m benchmarks.server_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags(p, "a checkpoint directory with a tokenizer and chat template (as is)")
    p.add_argument("--quick", action="store_true",
                   help="1 and 2 streams, one 4-token reply each, 16-token prompts, a 600-token join beside 2 streams")
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="concurrent streams per level, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=None, help="requests each stream sends per level (default 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="reply tokens per request (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt tokens per request, before the chat template's (default 32)")
    p.add_argument("--join-tokens", type=int, default=None,
                   help="the joining prompt's tokens in the stall run (default 4096; 0 skips the run)")
    p.add_argument("--stall-streams", type=int, default=None, help="streams running when it joins (default 4)")
    p.add_argument("--compare", choices=[PEER], default=None, help="run mlx-vlm's server on the same checkpoint too")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    profile = "quick" if args.quick else "full"
    for key, value in PROFILES[profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    def work():
        for key in ("requests", "max_tokens", "prompt_tokens", "stall_streams"):
            if getattr(args, key) < 1:
                raise InputError(f"--{key.replace('_', '-')}: must be at least 1, got {getattr(args, key)}")
        if not args.levels or min(args.levels) < 1:
            raise InputError(f"--levels: positive stream counts, got {args.levels}")
        if args.join_tokens < 0:
            raise InputError(f"--join-tokens: 0 (skip) or more, got {args.join_tokens}")
        model, name, dtype = chosen_model(args)
        offsets = token_counter(model)
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for server in ["mlx-gemma"] + ([PEER] if args.compare else []):
                runs[server] = measure(server, model, args, offsets, Path(tmp) / f"{server}.log")
                runs[server].pop("log")
        settings = {k: getattr(args, k) for k in PROFILES["full"]}
        settings["max_num_seqs"] = max(max(args.levels), args.stall_streams + 1)
        report = {"meta": {"model": name, "checkpoint": str(model), "served_dtype": dtype, "machine": machine(),
                           "commit": commit(), "profile": profile, "settings": settings,
                           "command": "python -m benchmarks.server_throughput "
                                      + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": datetime.datetime.now().isoformat(timespec="seconds")},
                  "runs": runs, "bytes_model": bytes_model()}
        report["goals"] = goals(runs)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "server_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "server_throughput.md").write_text(render(report))
        print(render(report))

    run_cli(work, "interrupted")


if __name__ == "__main__":
    main()
