"""Time to first token of each turn of a 10-turn conversation through `python -m mlx_gemma.server`,
with the prefix cache and without it (`--prompt-cache-bytes 0`), and `mlx_vlm.server` beside them.

    python -m benchmarks.server_ttft                       # builds a small checkpoint (a CPU: ~2 min)
    python -m benchmarks.server_ttft --model PATH --compare mlx-vlm

An agent resends the whole conversation every turn: each request here is the conversation so far
plus a new user message of --turn-tokens tokens. TTFT is measured at the client, as the time of a
streamed request for one token (sent -> the chunk carrying it or the end), so that servers which
send an early empty chunk, or none for special tokens, are timed alike. The assistant turns of the
history are fixed text of --reply-tokens tokens: every server reads the same conversation. The
default checkpoint is built by tests/reference.py (transformers, random trained-like weights, a
128-token sliding window, so the conversation soon outgrows window and slack; global head dim 512,
which mlx-vlm 0.7.10 assumes). Writes server_ttft.json and server_ttft.md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, head_dim=64, global_head_dim=512,
             sliding_window=128, max_position_embeddings=8192)


def build_checkpoint(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import reference

    return reference.build_checkpoint(out, stats=reference.trained_like, **SMALL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited:\n{log.read_text()[-2000:]}")
        for path in ("/health", "/v1/models"):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return proc
            except OSError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def streamed_turn(port: int, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed request: TTFT, total time, the reply, and the server's usage if it sends it."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    tic = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    ttft, text, usage = None, [], None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if ttft is None and (piece or choice.get("finish_reason")):
                ttft = time.perf_counter() - tic
            text.append(piece)
    total = time.perf_counter() - tic
    conn.close()
    return {"ttft": ttft if ttft is not None else total, "total": total, "reply": "".join(text), "usage": usage}


def user_turn(rng, tokens: int) -> str:
    """About `tokens` tokens for the test vocabulary (a letter, a space or a short word each)."""
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 7))) for _ in range(tokens // 4)]
    return " ".join(words)


def conversation(port: int, model: str, turns: int, turn_tokens: int, reply_tokens: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    messages = [{"role": "system", "content": "You are a helpful assistant. " + user_turn(rng, turn_tokens)}]
    rows = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": user_turn(rng, turn_tokens)})
        r = streamed_turn(port, model, messages, 1)
        usage = r["usage"] or {}
        rows.append({"turn": turn, "ttft": r["ttft"], "total": r["total"],
                     "prompt_tokens": usage.get("prompt_tokens"),
                     "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")})
        messages.append({"role": "assistant", "content": user_turn(rng, reply_tokens)})
    return rows


def server_command(name: str, model: Path, port: int) -> list:
    if name == "mlx-vlm":
        return [sys.executable, "-m", "mlx_vlm.server", "--model", str(model), "--port", str(port)]
    cmd = [sys.executable, "-m", "mlx_gemma.server", "--model", str(model), "--port", str(port)]
    return cmd + (["--prompt-cache-bytes", "0"] if name == "mlx-gemma uncached" else [])


def measure(name: str, model: Path, args, log: Path) -> list:
    port = free_port()
    proc = start(server_command(name, model, port), port, log)
    try:
        streamed_turn(port, str(model), [{"role": "user", "content": "warm up"}], 2)
        return conversation(port, str(model), args.turns, args.turn_tokens, args.reply_tokens)
    finally:
        stop(proc)


def render(result: dict) -> str:
    runs = result["runs"]
    names = list(runs)
    lines = [f"# Server TTFT over a {result['turns']}-turn conversation", "",
             f"Machine: {result['machine']}; checkpoint {result['model']}; {result['turn_tokens']} new user tokens "
             f"per turn, {result['reply_tokens']}-token assistant turns; {result['date']}.",
             f"Command: `{result['command']}`", "",
             "| turn | prompt tokens | " + " | ".join(f"{n} TTFT s (cached tokens)" for n in names) + " | "
             + " | ".join(f"{names[0]} / {n}" for n in names[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(names) - 1)]
    for i, row in enumerate(runs[names[0]]):
        cells = []
        for n in names:
            r = runs[n][i] if isinstance(runs[n], list) else None
            cells.append("-" if r is None else f"{r['ttft']:.3f} ({r['cached_tokens'] if r['cached_tokens'] is not None else '?'})")
        ratios = []
        for n in names[1:]:
            r = runs[n][i] if isinstance(runs[n], list) else None
            ratios.append("-" if r is None else f"{row['ttft'] / r['ttft']:.2f}x")
        lines.append(f"| {row['turn']} | {row['prompt_tokens']} | " + " | ".join(cells) + " | "
                     + " | ".join(ratios) + " |")
    for n, r in runs.items():
        if not isinstance(r, list):
            lines.append(f"\n{n}: {r}")
    lines.append("\nRatios are the first column's TTFT over the other's (below 1: ours is faster).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> None:
    from benchmarks.run import machine

    p = argparse.ArgumentParser(prog="python -m benchmarks.server_ttft", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint with a tokenizer and chat template (default: build one)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-tokens", type=int, default=250)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--compare", choices=["mlx-vlm"], default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else build_checkpoint(tmp / "small-gemma4-unified")
        runs = {}
        for name in ["mlx-gemma cached", "mlx-gemma uncached"] + (["mlx-vlm"] if args.compare else []):
            try:
                runs[name] = measure(name, model, args, tmp / f"{name}.log")
            except RuntimeError as e:  # the peer may not load the checkpoint: say so in the table
                if name != "mlx-vlm":
                    raise
                runs[name] = f"did not run ({str(e).strip().splitlines()[-1][:300]})"
    info = machine()
    result = {"machine": f"{info['chip']}, {info['os']}; backend MLX {info['mlx']} {info['backend']}"
                         + (f"; mlx-vlm {info['mlx_vlm']}" if "mlx_vlm" in info else ""),
              "model": args.model or f"tests/reference.py build {SMALL}", "turns": args.turns,
              "turn_tokens": args.turn_tokens, "reply_tokens": args.reply_tokens,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m benchmarks.server_ttft " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_ttft.json").write_text(json.dumps(result, indent=1))
    (args.out / "server_ttft.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
