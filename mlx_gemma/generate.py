"""`python -m mlx_gemma.generate`: chat with Gemma 4 12B from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import mlx.core as mx

from .errors import InputError, MlxGemmaError
from .generation import (DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP, ChatSession, GenerationResponse,
                         print_stats, stream_generate)

DEFAULT_MODEL = "google/gemma-4-12B-it"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.generate",
                                description="Generate text with Gemma 4 12B (gemma4_unified) on MLX.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--prompt", "-p", default=None, help="the user message ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=None, help="sampling temperature; 0 is greedy "
                   "(default: the checkpoint's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--enable-thinking", action="store_true", help="turn on the model's thinking mode")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the model's thoughts")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="activation/weight dtype (default: as stored)")
    p.add_argument("--no-quantize", action="store_true",
                   help="never quantize an unquantized checkpoint that does not fit the memory budget")
    p.add_argument("--memory-limit", default=None,
                   help="memory budget, e.g. 10.5GB (default: Metal's recommended working set on a Mac, "
                        "physical memory elsewhere)")
    p.add_argument("--verbose", action="store_true", help="print loading details")
    return p


class _Printer:
    """Streams answer text to stdout and thoughts (dimmed on a terminal) apart from it."""

    def __init__(self, hide_thinking: bool):
        self.hide = hide_thinking
        self.in_thought = False
        self.tty = sys.stdout.isatty()

    def __call__(self, r: GenerationResponse) -> None:
        if r.thinking and self.hide:
            return
        if r.thinking != self.in_thought and r.text:
            self.in_thought = r.thinking
            if r.thinking:
                print("[thinking]\n" + ("\033[2m" if self.tty else ""), end="")
            else:
                print(("\033[0m" if self.tty else "") + "\n[/thinking]\n", end="")
        print(r.text, end="", flush=True)

    def close(self) -> None:
        if self.in_thought:
            print(("\033[0m" if self.tty else "") + "\n[/thinking]", end="")
        self.in_thought = False
        print()


def _prefill_progress(done: int, total: int) -> None:
    if total > 2 * DEFAULT_PREFILL_STEP or (done < total and sys.stderr.isatty()):
        end = "\n" if done == total else ""
        print(f"\rPrefill: {done}/{total} tokens", end=end, file=sys.stderr, flush=True)


def run(args) -> None:
    from .loading import load, resolve_model_path
    from .quantize import quantized_copy_for

    if args.max_tokens <= 0:
        raise InputError(f"--max-tokens: must be a positive number, got {args.max_tokens}")
    if args.prefill_step_size <= 0:
        raise InputError(f"--prefill-step-size: must be a positive number, got {args.prefill_step_size}")
    if args.seed is not None:
        mx.random.seed(args.seed)
    dtype = getattr(mx, args.dtype) if args.dtype else None
    path = resolve_model_path(args.model)
    if not args.no_quantize:
        path = quantized_copy_for(args.model, path, args.memory_limit) or path
    model, processor = load(path, dtype=dtype, progress=True)
    if args.verbose:
        print(f"Loaded {args.model} ({mx.default_device()}, dtype "
              f"{model.language_model.model.norm.weight.dtype})", file=sys.stderr)
    options = dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                   min_p=args.min_p, prefill_step_size=args.prefill_step_size, progress=_prefill_progress)
    if args.chat:
        return chat_loop(model, processor, args, options)
    prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt if args.prompt is not None else "hello")
    printer, last = _Printer(args.hide_thinking), None
    for last in stream_generate(model, processor, prompt, system=args.system,
                                chat_template=not args.no_chat_template,
                                enable_thinking=args.enable_thinking, **options):
        printer(last)
    printer.close()
    print_stats(last)


def chat_loop(model, processor, args, options) -> None:
    session = ChatSession(model, processor, system=args.system, enable_thinking=args.enable_thinking)
    print("Chat with the model: 'q' or Ctrl-D to quit, 'r' to restart.", file=sys.stderr)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return
        if line.strip() == "q":
            return
        if line.strip() == "r":
            session = ChatSession(model, processor, system=args.system, enable_thinking=args.enable_thinking)
            continue
        printer, last = _Printer(args.hide_thinking), None
        for last in session.send(line, **options):
            printer(last)
        printer.close()
        if args.verbose and last is not None:
            print(f"(reused {session.reused_tokens} cached prompt tokens)", file=sys.stderr)
            print_stats(last, file=sys.stderr)


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except MlxGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
