"""`python -m mlx_gemma.generate`: chat with Gemma 4 12B from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import mlx.core as mx

from .backend import DTYPES, activation_dtype
from .errors import ArgumentParser, InputError, run_cli
from .generation import (DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP, ChatSession, GenerationResponse,
                         check_context, check_sampling, print_stats, prompt_to_inputs, stream_generate)
from .media import BUDGETS, VIDEO_FPS
from .model import VISION_MASKS
from .prompt import MediaOptions
from .memory import (KVOptions, activation_dtype_bytes, human, make_plan, memory_budget, prefill_chunk,
                     refusal, weight_bytes)

DEFAULT_MODEL = "google/gemma-4-12B-it"
CHAT_CONTEXT = 32768  # --chat plans for this many tokens unless --max-kv-size says otherwise


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.generate",
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
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="activation dtype (auto: float32 for a quantized model on the CPU backend, "
                        "where it is ~8x faster, else as stored)")
    p.add_argument("--no-quantize", action="store_true",
                   help="never quantize an unquantized checkpoint that does not fit the memory budget")
    p.add_argument("--memory-limit", default=None,
                   help="memory budget, e.g. 10.5GB (default: Metal's recommended working set on a Mac, "
                        "physical memory elsewhere)")
    p.add_argument("--max-kv-size", type=int, default=None, help="cap on the context (prompt + reply) in tokens")
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the global layers' KV cache (4 or 8)")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--quantized-kv-start", type=int, default=0,
                   help="keep the KV cache unquantized until it holds this many tokens")
    p.add_argument("--kv-two-tensor", action="store_true",
                   help="store keys and values separately on global layers (default: one tensor, half the memory)")
    m = p.add_argument_group("media (they go into the user turn before the prompt: images, audio, video)")
    m.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    m.add_argument("--audio", action="append", default=[], metavar="PATH", help="a sound file (repeatable)")
    m.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    m.add_argument("--image-budget", type=int, default=None, metavar="N",
                   help=f"soft tokens per image, one of {'/'.join(map(str, BUDGETS))} "
                        "(default: the checkpoint's processor setting)")
    m.add_argument("--video-budget", type=int, default=None, metavar="N", help="soft tokens per video frame "
                   "(default: the checkpoint's processor setting, 70)")
    m.add_argument("--fps", type=float, default=VIDEO_FPS, help="video frames sampled per second")
    m.add_argument("--video-frames", type=int, default=None, metavar="N",
                   help="sample N frames spread over the video instead (transformers' rule)")
    m.add_argument("--video-audio", action="store_true",
                   help="also feed each video's sound track, as audio right after its frames")
    m.add_argument("--allow-long-media", action="store_true",
                   help="accept audio over 30 s and video over 60 s (beyond what the model was trained on)")
    m.add_argument("--vision-mask", choices=VISION_MASKS, default="generate",
                   help="image attention: 'generate' (whole image on sliding layers, the intended one) or "
                        "'forward' (also on global layers, as transformers' forward() does)")
    p.add_argument("--plan", action="store_true", help="print the memory plan as a table and exit")
    p.add_argument("--verbose", action="store_true", help="print loading details and the memory plan")
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


def kv_options(args) -> KVOptions:
    return KVOptions(one_tensor=not args.kv_two_tensor, bits=args.kv_bits, group_size=args.kv_group_size,
                     quantized_start=args.quantized_kv_start)


def run(args) -> None:
    from .config import ModelConfig
    from .loading import load_model, resolve_model_path
    from .prompt import Processor
    from .checkpoint import pull_estimate, quantized_copy

    if args.max_tokens <= 0:
        raise InputError(f"--max-tokens: must be a positive number, got {args.max_tokens}")
    if args.prefill_step_size <= 0:
        raise InputError(f"--prefill-step-size: must be a positive number, got {args.prefill_step_size}")
    if args.max_kv_size is not None and args.max_kv_size <= 0:
        raise InputError(f"--max-kv-size: must be a positive number, got {args.max_kv_size}")
    check_sampling(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
    media_options = MediaOptions(args.image_budget, args.video_budget, args.fps, args.video_frames,
                                 args.video_audio, args.allow_long_media)
    if args.seed is not None:
        mx.random.seed(args.seed)
    path = resolve_model_path(args.model)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: no config.json (not a model checkpoint directory)")
    config = ModelConfig.from_file(path / "config.json")
    processor = Processor.from_pretrained(path, config)
    limit = config.text_config.max_position_embeddings
    if args.chat:
        inputs, ids, context = None, [], args.max_kv_size or min(limit, CHAT_CONTEXT)
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt if args.prompt is not None else "hello")
        inputs = prompt_to_inputs(processor, prompt, args.system, not args.no_chat_template, args.enable_thinking,
                                  args.image, args.audio, args.video, media_options)
        ids = inputs.ids
        check_context(limit, len(ids), args.max_tokens, sum(inputs.token_counts().values()))
        context = min(len(ids) + args.max_tokens, args.max_kv_size or limit)
    if args.max_kv_size is not None and len(ids) >= args.max_kv_size:
        raise InputError(f"--max-kv-size {args.max_kv_size}: smaller than the prompt ({len(ids)} tokens)")

    def dtype_bytes_of(path, config) -> int:
        dtype = activation_dtype(bool(config.quantization), args.dtype)
        return dtype.size if dtype is not None else activation_dtype_bytes(path)

    dtype_bytes = dtype_bytes_of(path, config)
    kv, budget = kv_options(args), memory_budget(args.memory_limit)
    plan = make_plan(config, weight_bytes(path), context, budget, kv, dtype_bytes, args.prefill_step_size)
    if not plan.fits and not config.quantization and not args.no_quantize and not args.plan:
        # An unquantized checkpoint that does not fit (the 12B in bfloat16 on a 16 GB Mac): run its
        # 4-bit copy, made only if the config says it will fit; if not, the refusal below is about it.
        q_config, q_bytes = pull_estimate(config, activation_dtype_bytes(path))
        if make_plan(q_config, q_bytes, context, budget, kv, dtype_bytes_of(path, q_config),
                     args.prefill_step_size).fits:
            path = quantized_copy(args.model, path, f"needs {human(plan.total)} unquantized, budget {human(budget)}")
            q_config, q_bytes = ModelConfig.from_file(path / "config.json"), weight_bytes(path)
        config, dtype_bytes = q_config, dtype_bytes_of(path, q_config)
        plan = make_plan(config, q_bytes, context, budget, kv, dtype_bytes, args.prefill_step_size)
    if args.plan:
        print(plan.table())
        return
    if not plan.fits:
        raise InputError(refusal(plan, config, kv, dtype_bytes, args.prefill_step_size))
    model = load_model(path, dtype=args.dtype, progress=True)
    model.vision_mask = args.vision_mask
    if args.verbose:
        q = config.quantization
        weights = f"{q['bits']}-bit, group size {q['group_size']} ({q.get('mode', 'affine')})" if q else "unquantized"
        print(f"Loaded {args.model} from {path} ({mx.default_device()}); weights {weights}, "
              f"{weight_bytes(path) / 1e9:.2f} GB\n{plan.table()}", file=sys.stderr)

    def make_cache():
        return model.make_cache(one_tensor=kv.one_tensor, kv_bits=kv.bits, kv_group_size=kv.group_size,
                                quantized_kv_start=kv.quantized_start)

    def chunk(done: int) -> int:
        return prefill_chunk(config.text_config, done, args.prefill_step_size, dtype_bytes)

    options = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   prefill_step_size=chunk, progress=_prefill_progress, max_kv_size=context)
    if args.chat:
        return chat_loop(model, processor, args, dict(options, max_tokens=args.max_tokens), make_cache,
                         media_options)
    printer, last = _Printer(args.hide_thinking), None
    for last in stream_generate(model, processor, inputs, cache=make_cache(), max_tokens=args.max_tokens,
                                **options):
        printer(last)
    printer.close()
    print_stats(last)


CHAT_HELP = ("Chat with the model: 'q' or Ctrl-D to quit, 'r' to restart; '/image PATH', '/audio PATH' "
             "and '/video PATH' add media to your next message.")


def chat_loop(model, processor, args, options, make_cache, media_options) -> None:
    def new_session():
        return ChatSession(model, processor, system=args.system, enable_thinking=args.enable_thinking,
                           make_cache=make_cache, media_options=media_options)

    session = new_session()
    # Media given on the command line open the first turn.
    pending = {"image": list(args.image), "audio": list(args.audio), "video": list(args.video)}
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return
        command, _, rest = line.strip().partition(" ")
        if command == "q":
            return
        if command == "r":
            session, pending = new_session(), {kind: [] for kind in pending}
            continue
        if command.startswith("/") and command[1:] in pending:
            if not rest.strip():
                print(f"{command} needs a path", file=sys.stderr)
                continue
            pending[command[1:]].append(rest.strip())
            continue
        printer, last = _Printer(args.hide_thinking), None
        try:
            for last in session.send(line, **pending, **options):
                printer(last)
        except InputError as e:  # a bad file or too long a turn: say so and keep chatting
            print(f"error: {e}", file=sys.stderr)
            continue
        finally:
            pending = {kind: [] for kind in pending}
        printer.close()
        if args.verbose and last is not None:
            print(f"(reused {session.reused_tokens} cached prompt tokens)", file=sys.stderr)
            print_stats(last, file=sys.stderr)


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
