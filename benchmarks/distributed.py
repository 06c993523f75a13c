"""Several ranks on one machine: what tensor and pipeline parallel cost per token (issue 16).

    python -m benchmarks.distributed --synthetic 2            # real widths, 2 layers: minutes on 2 cores
    python -m benchmarks.distributed --synthetic 2 --quick    # the suite's smoke run

One process (1 rank), then 2 ranks of the ring backend on 127.0.0.1 (as `mlx.launch --backend
ring -n 2` starts them, without the launcher process: see `_run`), each
timing, through its own generation loop, greedy: prefill of a random-token prompt (time to the
first token) and decode (time per token after it). Cases: mlx-gemma tensor and pipeline
parallel on the checkpoint, and mlx-lm's own tensor parallel (`Model.shard(group)`) on a
random llama built in the process with the stand-in's layer widths (hidden 3840, MLP 15360,
16 x 256 query heads, 8 key/value heads, as many layers, 4-bit, the same vocabulary: no download),
at the same float32 activations as ours on the CPU. Per-token overhead = 2-rank minus 1-rank
time per decode token, for each implementation.

Traffic is measured, not derived: the worker wraps `mx.distributed.all_sum / all_gather / send /
recv_like` (what distributed.py and mlx's sharded linears call) with a counter of calls and
payload bytes, and runs one decode step and one prefill with it on.

Projection for two Macs (the real 12B, bfloat16 activations, 4-bit default recipe) from the
measured messages and bytes per token: a 2-rank ring all-sum of N bytes is 2 messages (reduce-
scatter, all-gather) and N bytes out of each rank, a send 1 message and its bytes; tensor mode's
traffic in the layers grows with them (scaled from the stand-in's to 48; what the embedding and
the head exchange is measured apart and not scaled), pipeline's does not. Links:
Thunderbolt 5 at 80 Gb/s and 5-10 us per message, 10 GbE at 10 Gb/s and 50 us. A rank's decode
step reads its share of the weights at the chip's bandwidth (roofline: an upper bound); tensor
ranks read theirs at the same time, pipeline stages one after the other.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gemma.config import ModelConfig
from mlx_gemma.errors import InputError
from mlx_gemma.loading import resolve_model_path

from . import roofline
from .run import commit, machine, parser, run_benchmark
from .synthetic import HUB_CONFIG, synthetic_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {"full": dict(prompt=64, decode=8, repeats=2), "quick": dict(prompt=16, decode=4, repeats=1)}
CASES = [("mlx-gemma", "tensor"), ("mlx-gemma", "pipeline"), ("mlx-lm", "tensor")]
# (name, bits per second, seconds per message): assumptions, see the module docstring.
LINKS = [("Thunderbolt 5", 80e9, 5e-6), ("Thunderbolt 5", 80e9, 10e-6), ("10 GbE", 10e9, 50e-6)]
MAC_CHIPS = ("M4 Pro", "M4 Max")
MESSAGES = {"all_sum": 2, "all_gather": 1, "send": 1, "recv_like": 0}  # per call, out of one rank (2 ranks)
WORKER_TIMEOUT = 1800  # seconds a measurement may take before its ranks are killed


# --- in each rank ---------------------------------------------------------------------------------


class Traffic:
    """Calls and payload bytes of every collective / send this process makes while `on`."""

    def __init__(self):
        self.on, self.counts = False, {}
        for name in MESSAGES:
            setattr(mx.distributed, name, self._wrap(name, getattr(mx.distributed, name)))

    def _wrap(self, name, real):
        def counted(x, *args, **kwargs):
            if self.on:
                calls, nbytes = self.counts.get(name, (0, 0))
                self.counts[name] = (calls + 1, nbytes + x.nbytes)
            return real(x, *args, **kwargs)

        return counted

    def measure(self, fn) -> dict:
        self.on, self.counts = True, {}
        mx.eval(fn())
        self.on = False
        return {name: {"calls": c, "bytes": b} for name, (c, b) in self.counts.items()}


def _ours(path: Path, group, mode: str, dtype: str):
    from mlx_gemma.generation import generate_step
    from mlx_gemma.loading import load_model

    model = load_model(path, dtype=dtype, group=group, parallel=mode)

    def generate(ids, cache, n):
        return generate_step(model, ids, cache, max_tokens=n)

    def forward(ids, cache):
        return model(mx.array(ids)[None], cache=cache, logits_to_keep=1)

    def outside(ids):  # what a step does besides its layers: the embedding and the head
        return model.language_model.head(model.language_model.model.embed(mx.array(ids)[None]))

    return model.config.text_config.num_hidden_layers, model.make_cache, generate, forward, outside


def _theirs(path: Path, group, mode: str, dtype: str):
    """mlx-lm's llama at the checkpoint's layer widths, random, 4-bit, the same on every rank
    (float32 activations unless `dtype` names one, as ours on the CPU)."""
    from mlx_gemma.backend import DTYPES
    import mlx.nn as nn
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    text = ModelConfig.from_file(path / "config.json").text_config
    sliding = next(s for s in text.layers if s.is_sliding)
    args = llama.ModelArgs(model_type="llama", hidden_size=text.hidden_size, num_hidden_layers=len(text.layers),
                           intermediate_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
                           head_dim=sliding.head_dim, num_key_value_heads=sliding.num_kv_heads,
                           rms_norm_eps=1e-6, vocab_size=text.vocab_size, tie_word_embeddings=True)
    mx.random.seed(0)  # every rank builds the same weights, then keeps its slices
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    if dtype in DTYPES:
        model.set_dtype(DTYPES[dtype])
    if group.size() > 1:
        model.shard(group)
    mx.eval(model.parameters())

    def generate(ids, cache, n):
        return generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=cache)

    def forward(ids, cache):
        return model(mx.array(ids)[None], cache=cache)

    def outside(ids):
        table = model.model.embed_tokens
        return table.as_linear(table(mx.array(ids)[None]))

    return len(text.layers), lambda: make_prompt_cache(model), generate, forward, outside


def _time(make_cache, generate, ids, decode: int, repeats: int) -> dict:
    """Time to the first token and seconds per decode token after it, one warm-up."""
    first, per_token = [], []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        steps = generate(ids, make_cache(), decode + 1)
        next(steps)
        t = time.perf_counter()
        for _ in steps:
            pass
        if i:
            first.append(t - tic)
            per_token.append((time.perf_counter() - t) / decode)
    return {"prefill_s": statistics.median(first), "decode_s_per_token": statistics.median(per_token),
            "decode_runs": per_token}


def worker(job_file: str, out_prefix: str) -> None:
    job = json.loads(Path(job_file).read_text())
    group = mx.distributed.init()
    traffic = Traffic()
    path = Path(job["path"])
    ids = np.random.default_rng(0).integers(1000, 20000, job["prompt"]).tolist()  # ordinary text ids
    results = []
    for impl, mode in job["cases"]:
        layers, make_cache, generate, forward, outside = (_ours if impl == "mlx-gemma" else _theirs)(
            path, group, mode, job["dtype"])
        r = {"implementation": impl, "mode": mode, "ranks": group.size(), "layers": layers,
             **_time(make_cache, generate, ids, job["decode"], job["repeats"])}
        cache = make_cache()
        r["prefill_traffic"] = traffic.measure(lambda: forward(ids, cache))
        r["decode_traffic"] = traffic.measure(lambda: forward(ids[:1], cache))
        r["outside_layers_traffic"] = traffic.measure(lambda: outside(ids[:1]))
        results.append(r)
        mx.clear_cache()
    Path(f"{out_prefix}.{group.rank()}.json").write_text(json.dumps(results))


# --- the driver -----------------------------------------------------------------------------------


def _run(ranks: int, job: dict, tmp: Path) -> list[list[dict]]:
    """The worker on `ranks` ranks of the ring backend on 127.0.0.1, started as mlx.launch starts
    them (its hostfile, MLX_RANK) but without the launcher, which busy-polls: on a 2-core
    machine it took as much CPU as each rank."""
    (tmp / "job.json").write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--worker", str(tmp / "job.json"), str(tmp / "out")]
    env = dict(os.environ)
    if ranks > 1:
        loopback_hostfile(tmp / "hosts.json", ranks)
        env["MLX_HOSTFILE"] = str(tmp / "hosts.json")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, MLX_RANK=str(r)) if ranks > 1 else env)
             for r in range(ranks)]
    deadline = time.monotonic() + WORKER_TIMEOUT
    while any(p.poll() is None for p in procs):
        # a rank that fails leaves the others waiting on it; a hung one would hold them all
        if any(p.poll() for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
        time.sleep(0.5)
    codes = [p.wait() for p in procs]
    files = [tmp / f"out.{r}.json" for r in range(ranks)]
    if any(codes) or not all(f.exists() for f in files):
        late = f", or ran past {WORKER_TIMEOUT} s" if time.monotonic() > deadline else ""
        raise InputError(f"{ranks}-rank benchmark worker failed (exit {max(codes)}{late})")
    return [json.loads(f.read_text()) for f in files]


def loopback_hostfile(path: Path, ranks: int) -> Path:
    """A ring-backend hostfile (as mlx.launch writes it) of `ranks` free ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(ranks)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    path.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]))
    for s in socks:
        s.close()
    return path


def wire(traffic: dict) -> tuple[int, int]:
    """(messages, bytes) one rank sends for `traffic` (see MESSAGES)."""
    return (sum(MESSAGES[op] * t["calls"] for op, t in traffic.items()),
            sum(t["bytes"] for op, t in traffic.items() if MESSAGES[op]))


def per_token(ranks: list[dict], tokens: int) -> dict:
    """The busiest rank's messages and bytes out per token."""
    sent = [wire(r) for r in ranks]
    messages, nbytes = max(m for m, _ in sent), max(b for _, b in sent)
    return {"messages": messages / tokens, "bytes": nbytes / tokens}


def project(decode: dict, outside: dict, mode: str, layers: int, dtype_bytes: int) -> dict:
    """Messages and bytes per decode token for the real 12B at bfloat16 (see the docstring):
    the layers' part scaled to its 48 layers, the embedding's and head's (`outside`) as is."""
    real = ModelConfig.from_file(HUB_CONFIG)
    scale = real.text_config.num_hidden_layers / layers if mode == "tensor" else 1
    return {k: ((decode[k] - outside[k]) * scale + outside[k]) * (2 / dtype_bytes if k == "bytes" else 1)
            for k in ("messages", "bytes")}


def mac_table(projected: dict) -> tuple[str, dict]:
    """Markdown and numbers: the real 12B's decode ceiling on one Mac and on two over each link."""
    from mlx_gemma import distributed

    real = ModelConfig.from_file(HUB_CONFIG)
    weights = roofline.weight_bytes_min(real)
    share = distributed.weight_share(real, 0, 2, "tensor")
    head = ["chip", "1 Mac"] + [f"{m}, {n} ({bits / 1e9:g} Gb/s, {lat * 1e6:g} us)"
                                for m in projected for n, bits, lat in LINKS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    numbers = {}
    for chip in MAC_CHIPS:
        bw = roofline.CHIPS[chip] * 1e9
        row, numbers[chip] = [chip, f"{bw / weights:.1f} tok/s"], {"1 Mac": bw / weights}
        for mode, p in projected.items():
            compute = (share if mode == "tensor" else 1.0) * weights / bw
            for name, bits, lat in LINKS:
                comm = p["messages"] * lat + p["bytes"] * 8 / bits
                numbers[chip][f"{mode} {name} {lat * 1e6:g}us"] = 1 / (compute + comm)
                row.append(f"{1 / (compute + comm):.1f} tok/s (link {comm * 1e6:.0f} us/tok)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), {"weights": weights, "tensor_rank_share": share, "ceilings": numbers}


def benchmark(args) -> dict:
    if args.synthetic:
        path, name = synthetic_checkpoint(args.synthetic), f"synthetic 12B widths, {args.synthetic} layers"
    else:
        path, name = resolve_model_path(args.model), args.model
    profile = PROFILES["quick" if args.quick else "full"]
    job = dict(profile, path=str(path), dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, dict(job, cases=[("mlx-gemma", "tensor"), ("mlx-lm", "tensor")]), Path(tmp))[0]
        two = _run(2, dict(job, cases=CASES), Path(tmp))
    alone = {r["implementation"]: r for r in one}
    rows = []
    for i, (impl, mode) in enumerate(CASES):
        ranks = [two[r][i] for r in range(2)]
        r0, base = ranks[0], alone[impl]
        rows.append({"implementation": impl, "mode": mode, "layers": r0["layers"],
                     "one_rank": {k: base[k] for k in ("prefill_s", "decode_s_per_token")},
                     "two_ranks": {k: r0[k] for k in ("prefill_s", "decode_s_per_token")},
                     "overhead_s_per_token": r0["decode_s_per_token"] - base["decode_s_per_token"],
                     "decode_per_token": per_token([r["decode_traffic"] for r in ranks], 1),
                     "outside_layers_per_token": per_token([r["outside_layers_traffic"] for r in ranks], 1),
                     "prefill_per_token": per_token([r["prefill_traffic"] for r in ranks], profile["prompt"]),
                     "traffic": [{k: r[k] for k in ("decode_traffic", "prefill_traffic", "outside_layers_traffic")}
                                 for r in ranks]})
    dtype_bytes = 4  # float32 activations on the CPU backend (a Mac runs the 4-bit 12B in bfloat16)
    projected = {r["mode"]: project(r["decode_per_token"], r["outside_layers_per_token"], r["mode"], r["layers"],
                                    dtype_bytes)
                 for r in rows if r["implementation"] == "mlx-gemma"}
    _, macs = mac_table(projected)
    return {"meta": {"model": name, "checkpoint": str(path), "machine": machine(), "commit": commit(),
                     "command": "python -m benchmarks.distributed " + " ".join(args.argv),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "profile": "quick" if args.quick else "full", **profile,
                     "backend": "ring backend, 2 ranks on 127.0.0.1"},
            "cases": rows, "projection": {"per_token": projected, "links": LINKS, **macs}}


def table(report: dict) -> str:
    prompt = report["meta"]["prompt"]
    lines = ["| case | 1 rank: prefill / decode | 2 ranks: prefill / decode | decode overhead (2 - 1 rank) | "
             "out of the busiest rank per decode token | per prefill token |", "|---|---|---|---|---|---|"]
    for c in report["cases"]:
        cells = []
        for k in ("one_rank", "two_ranks"):
            t = c[k]
            cells.append(f"{prompt / t['prefill_s']:.1f} / {1 / t['decode_s_per_token']:.2f} tok/s")
        d, p = c["decode_per_token"], c["prefill_per_token"]
        lines.append(f"| {c['implementation']} {c['mode']} | {cells[0]} | {cells[1]} | "
                     f"{c['overhead_s_per_token'] * 1e3:+.1f} ms/tok | {d['messages']:g} messages, "
                     f"{d['bytes'] / 1e3:.1f} kB | {p['messages']:.2f} messages, {p['bytes'] / 1e3:.1f} kB |")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    m, proj = report["meta"], report["projection"]
    per = ", ".join(f"{mode}: {p['messages']:g} messages and {p['bytes'] / 1e3:.1f} kB out per decode token"
                    for mode, p in proj["per_token"].items())
    macs, _ = mac_table(proj["per_token"])
    md = [f"# Two ranks: {m['model']}", "",
          f"Machine: {m['machine']['chip']}, {m['machine']['os']}; MLX {m['machine']['mlx']} "
          f"{m['machine']['backend']}; {m['backend']}; commit {m['commit']}; {m['date']}.",
          f"Command: `{m['command']}`. Prompt {m['prompt']} tokens, {m['decode']} decode tokens, "
          f"{m['repeats']} timed run(s), median.", "", table(report), "",
          "Traffic: calls and payload bytes of every all_sum / all_gather / send, counted in each rank "
          "(a 2-rank all-sum: 2 messages).", "",
          "## Projection: the real 12B on two Macs", "", f"Scaled to 48 layers and bfloat16: {per}.", "",
          "Decode ceilings (weights / bandwidth per step, plus messages x latency + bytes / link rate):", "",
          macs, ""]
    (out / "distributed.md").write_text("\n".join(md))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(*argv[1:])
    p = parser("python -m benchmarks.distributed", __doc__, "a 16-token prompt, 4 decode tokens, one repetition")
    run_benchmark(p, argv, benchmark, write, "distributed")


if __name__ == "__main__":
    main()
