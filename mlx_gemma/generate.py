"""`python -m mlx_gemma.generate`: chat with Gemma 4 12B from the command line.

The parser imports nothing heavy (mlx-lm pulls in transformers and torch, seconds of start-up):
`--help` and argument errors answer at once, the library is imported when the run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from .backend import DTYPES
from .errors import ArgumentParser, ContextError, InputError, run_cli
from .media import BUDGETS, VIDEO_FPS, check_file

if TYPE_CHECKING:
    from .generation import GenerationResponse

DEFAULT_MODEL = "google/gemma-4-12B-it"
# The library's defaults, repeated here so that --help shows them without importing the library
# (tests/test_cli.py checks they agree with generation.py and model.py).
DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP = 512
DEFAULT_NUM_DRAFT_TOKENS = 3
VISION_MASKS = ("generate", "forward")


def _bool(text: str) -> bool:
    """mlx-lm's `--verbose True` / `--verbose False`."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.generate",
                       description="Generate text with Gemma 4 12B (gemma4_unified) on MLX.")
    p.add_argument("--model", default=None, help="checkpoint directory or Hugging Face repo id (default: with "
                   f"--adapter-path, the base model its adapter_config.json names; else {DEFAULT_MODEL})")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="LoRA adapters to apply: mlx_gemma.lora's / mlx-lm's output, or a PEFT adapter directory "
                        "(default: none)")
    p.add_argument("--prompt", "-p", default=None,
                   help="the user message; '-' reads standard input (UTF-8) (default: hello)")
    p.add_argument("--system", "--system-prompt", dest="system", default=None,
                   help="system prompt (--system-prompt is mlx-lm's name) (default: none)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help="most tokens to generate (per reply in --chat)")
    p.add_argument("--temp", type=float, default=None, help="sampling temperature; 0 is greedy "
                   "(default: the checkpoint's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold (default: the checkpoint's generation_config.json)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest tokens (default: the checkpoint's generation_config.json)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below this fraction of the likeliest one's probability "
                        "(default: the checkpoint's generation_config.json)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not fixed)")
    p.add_argument("--no-chat-template", "--ignore-chat-template", action="store_true",
                   help="feed the prompt as raw text (--ignore-chat-template is mlx-lm's name)")
    p.add_argument("--raw-prompt", action="store_true",
                   help="let control-token strings typed in --prompt, --system and chat lines (<|turn>, <|image|>, "
                        "...) act as control tokens; without it they are plain text (transformers' "
                        "split_special_tokens)")
    p.add_argument("--enable-thinking", action="store_true", help="turn on the model's thinking mode")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the model's thoughts")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat ('q' quits, 'r' restarts, Ctrl-C stops a reply)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                   help="most prompt tokens per prefill chunk (smaller chunks as the context grows)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="activation dtype (auto: float32 for a quantized model on the CPU backend, "
                        "where it is ~8x faster, else as stored)")
    p.add_argument("--no-quantize", action="store_true",
                   help="never quantize an unquantized checkpoint that does not fit the memory budget")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory budget in decimal units as mlx-lm prints them (10GB = 10^10 bytes; "
                        "GiB/MiB for binary), e.g. 10.5GB (default: Metal's recommended working set on "
                        "a Mac, physical memory elsewhere)")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="cap on the context (prompt + reply) in tokens (default: prompt + --max-tokens; "
                        "in --chat the longest context that fits the memory budget)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the global layers' KV cache to 4 or 8 bits (default: not quantized)")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the KV cache quantization")
    p.add_argument("--quantized-kv-start", type=int, default=0,
                   help="keep the KV cache unquantized until it holds this many tokens")
    p.add_argument("--kv-two-tensor", action="store_true",
                   help="store keys and values separately on global layers (default: one tensor, half the memory)")
    m = p.add_argument_group("media (they go into the user turn before the prompt: images, audio, video)")
    m.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="one or more images; the flag may also be repeated (default: none)")
    m.add_argument("--audio", action="extend", nargs="+", default=[], metavar="PATH",
                   help="one or more sound files (WAV, FLAC, MP3, OGG, M4A/AAC, ...) (default: none)")
    m.add_argument("--video", action="extend", nargs="+", default=[], metavar="PATH",
                   help="one or more video files (default: none)")
    m.add_argument("--image-budget", type=int, default=None, metavar="N",
                   help=f"soft tokens per image, one of {'/'.join(map(str, BUDGETS))} "
                        "(default: the checkpoint's processor setting)")
    m.add_argument("--video-budget", type=int, default=None, metavar="N", help="soft tokens per video frame "
                   "(default: the checkpoint's processor setting, 70)")
    m.add_argument("--fps", type=float, default=VIDEO_FPS, help="video frames sampled per second")
    m.add_argument("--video-frames", type=int, default=None, metavar="N",
                   help="sample N frames spread over the video instead, transformers' rule (default: use --fps)")
    m.add_argument("--video-audio", action="store_true",
                   help="also feed each video's sound track, as audio right after its frames")
    m.add_argument("--allow-long-media", action="store_true",
                   help="accept audio over 30 s and video over 60 s (beyond what the model was trained on); "
                        "video frames are then decoded as prefill reads them, not all up front")
    m.add_argument("--vision-mask", choices=VISION_MASKS, default="generate",
                   help="image attention: 'generate' (whole image on sliding layers, the intended one) or "
                        "'forward' (also on global layers, as transformers' forward() does)")
    d = p.add_argument_group("speculative decoding (MTP: the same tokens when greedy, the same distribution "
                             "when sampling)")
    d.add_argument("--draft-model", default=None, metavar="PATH_OR_REPO|auto|none",
                   help="the MTP drafter (gemma4_unified_assistant) that proposes tokens for the model to "
                        "verify; 'auto': the target's own (google/gemma-4-12B-it-assistant, or the one its "
                        "conversion records), downloaded if needed; 'none': off (default: the target's own if "
                        "it is in the local cache, on a GPU backend: on the CPU backend verifying costs as "
                        "much as decoding)")
    d.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS, metavar="K",
                   help="tokens drafted per step")
    c = p.add_argument_group("structured output (enforced token by token; with --enable-thinking, after the thoughts)")
    c = c.add_mutually_exclusive_group()
    c.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                   help="the reply is JSON valid against this JSON Schema (a file, or the schema itself; default: none)")
    c.add_argument("--regex", default=None, metavar="PATTERN",
                   help="the reply matches this regular expression (default: none)")
    c.add_argument("--grammar", default=None, metavar="FILE",
                   help="the reply follows this Lark grammar, llguidance's dialect (default: none)")
    p.add_argument("--plan", action="store_true", help="print the memory plan as a table and exit")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch with several ranks: split the layers between them (fits bigger weights "
                        "and contexts) instead of splitting every layer's heads (tensor parallel, faster decode)")
    p.add_argument("--verbose", type=_bool, nargs="?", const=True, default=None, metavar="True|False",
                   help="True (or the flag alone): also print loading details and the memory plan; False: "
                        "print only the generated text (default: the text and the stats block)")
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


class _Progress:
    """Prefill progress, on stderr only. A terminal shows one line, rewritten in place and erased
    before the first token is printed (the answer never starts after it); elsewhere (a log) only
    long prefills print, a full line per chunk."""

    def __init__(self, step: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.long = 2 * step
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            if done < total:
                self._write(f"\r\033[KPrefill: {done}/{total} tokens")
                self.shown = True
            else:
                self.clear()
        elif total > self.long:
            self._write(f"Prefill: {done}/{total} tokens\n")

    def clear(self) -> None:
        if self.shown:
            self._write("\r\033[K")
            self.shown = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _utf8(text: Optional[str], what: str) -> Optional[str]:
    """Command-line text that is not UTF-8 reaches Python with surrogates: refuse it in one line."""
    try:
        text is not None and text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what}: not UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at position "
                         f"{e.start})") from None
    return text


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start})") from None


def constraint_of(args):
    """The reply's constraint, compiled before the model loads (a bad schema costs no loading)."""
    from .constrain import Constraint, ConstraintError

    try:
        if args.json_schema is not None:
            text = args.json_schema
            if not text.lstrip().startswith("{"):
                path = Path(text)
                if not path.is_file():
                    raise ConstraintError(f"--json-schema {text}: no such file (give a file or the schema's JSON)")
                text = _decode(path.read_bytes(), f"--json-schema {text}")
            return Constraint.json_schema(text)
        if args.regex is not None:
            return Constraint.regex(args.regex)
        if args.grammar is not None:
            path = Path(args.grammar)
            if not path.is_file():
                raise ConstraintError(f"--grammar {args.grammar}: no such file")
            return Constraint.lark(_decode(path.read_bytes(), f"--grammar {args.grammar}"))
    except ConstraintError as e:
        flag = next(f for f in ("--json-schema", "--regex", "--grammar") if getattr(args, f[2:].replace("-", "_")))
        raise ConstraintError(str(e) if str(e).startswith(flag) else f"{flag}: {e.detail}") from None
    return None


def kv_options(args):
    from .memory import KVOptions

    return KVOptions(one_tensor=not args.kv_two_tensor, bits=args.kv_bits, group_size=args.kv_group_size,
                     quantized_start=args.quantized_kv_start)


def draft_model_path(args, path: Path, config) -> Optional[Path]:
    """The drafter directory `--draft-model` asks for, its fit with the target checked (before
    any weights are read); None when decoding without one."""
    from .backend import drafting_pays
    from .loading import read_safetensors_header, resolve_model_path, weight_files
    from .speculative import check_fits, check_num_draft_tokens, find_drafter, read_config

    choice = args.draft_model
    if choice == "none":
        return None
    check_num_draft_tokens(args.num_draft_tokens)
    raw = json.loads((path / "config.json").read_text())
    if choice is None:
        found = find_drafter(args.model, path, raw, download=False) if drafting_pays() else None
    elif choice == "auto":
        found = find_drafter(args.model, path, raw, download=True)
        if found is None:
            raise InputError(f"--draft-model auto: no drafter is known for {args.model} (give its path or repo id)")
    else:
        found = resolve_model_path(choice)
    if found is not None:
        check_fits(read_config(found), config.text_config, found)
        for f in weight_files(found):  # a truncated or corrupt file is refused before the target loads
            read_safetensors_header(f)
    return found


def run(args, cluster=None) -> None:
    from .cluster import Cluster
    from .config import ModelConfig
    from .generation import (check_context, check_count, check_sampling, print_stats, prompt_to_inputs,
                             stream_generate)
    from .checkpoint import PULL_SPEC, pull_estimate, quantized_copy
    from .loading import load_model, resolve_model_path
    from .memory import (KVOptions, activation_dtype_bytes, draft_plan, human, longest_context, make_plan,
                         media_bytes, memory_budget, prefill_chunk, refusal, run_dtype_bytes, weight_bytes)
    from .prompt import MediaOptions, Processor
    from .tuning.checkpoints import resolve_base_model

    check_count("--max-tokens", args.max_tokens)
    check_count("--prefill-step-size", args.prefill_step_size)
    if args.max_kv_size is not None:
        check_count("--max-kv-size", args.max_kv_size)
    check_sampling(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
    constraint = constraint_of(args)
    media_options = MediaOptions(args.image_budget, args.video_budget, args.fps, args.video_frames,
                                 args.video_audio, args.allow_long_media)
    _utf8(args.prompt, "--prompt")
    _utf8(args.system, "--system")
    cluster = cluster or Cluster()
    budget = memory_budget(args.memory_limit)  # a bad --memory-limit is refused before anything is read
    budget = cluster.smallest(budget)  # every rank plans alike, so all take the same decisions
    cluster.seed(args.seed)
    args.model = resolve_base_model(args.model, args.adapter_path, DEFAULT_MODEL)
    path = resolve_model_path(args.model)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: no config.json (not a model checkpoint directory)")
    cluster.check_same_checkpoint(path)
    config = ModelConfig.from_file(path / "config.json")
    processor = Processor.from_pretrained(path, config)
    limit = config.text_config.max_position_embeddings
    if args.chat:
        inputs, ids, context = None, [], args.max_kv_size or limit  # without --max-kv-size: what fits, below
    else:
        if args.prompt == "-":
            prompt = cluster.from_rank0(lambda: _decode(sys.stdin.buffer.read(), "--prompt -: standard input"))()
        else:
            prompt = args.prompt if args.prompt is not None else "hello"
        inputs = prompt_to_inputs(processor, prompt, args.system, not args.no_chat_template, args.enable_thinking,
                                  args.image, args.audio, args.video, media_options, args.raw_prompt)
        ids = inputs.ids
        check_context(limit, len(ids), args.max_tokens, sum(inputs.token_counts().values()))
        context = min(len(ids) + args.max_tokens, args.max_kv_size or limit)
    if args.max_kv_size is not None and len(ids) >= args.max_kv_size:
        raise InputError(f"--max-kv-size {args.max_kv_size}: smaller than the prompt ({len(ids)} tokens)")
    drafter_path = draft_model_path(args, path, config) if cluster.drafter(args.draft_model, args.pipeline, config) else None

    def fitting(kv_options, most=limit) -> int:  # the longest context this budget holds
        return longest_context(config, weights, budget, kv_options, dtype_bytes, args.prefill_step_size, most, draft)

    dtype_bytes = run_dtype_bytes(path, config, args.dtype)
    weights = weight_bytes(path, dtype_bytes)
    kv = kv_options(args)
    draft = draft_plan(drafter_path, args.num_draft_tokens) if drafter_path is not None else None
    if args.chat and args.max_kv_size is None:
        context = fitting(kv) or limit  # nothing fits: plan the model's context, which is refused below
    plan = make_plan(config, weights, context, budget, kv, dtype_bytes, args.prefill_step_size, draft)
    if not plan.fits and draft is not None and args.draft_model is None:
        # The default drafter is a speed-up, not a requirement: without it the run may fit.
        lean = make_plan(config, weights, context, budget, kv, dtype_bytes, args.prefill_step_size)
        if lean.fits:
            plan, draft, drafter_path = lean, None, None
    copy = None if plan.fits or config.quantization or args.no_quantize else \
        pull_estimate(config, activation_dtype_bytes(path))
    if copy is not None:
        # An unquantized checkpoint that does not fit (the 12B in bfloat16 on a 16 GB Mac): run its
        # 4-bit copy, made only if the config says it will fit (--plan plans it and makes nothing);
        # if not, the refusal below is about it.
        why = f"needs {human(plan.total)} unquantized, budget {human(budget)}"
        config, weights = copy
        dtype_bytes = run_dtype_bytes(path, config, args.dtype)
        plan = make_plan(config, weights, context, budget, kv, dtype_bytes, args.prefill_step_size, draft)
        if plan.fits and args.plan:
            print(f"{args.model}: {why}; a run quantizes it to {PULL_SPEC.bits}-bit first, planned here from its "
                  "config (--no-quantize plans it as it is)", file=sys.stderr)
        elif plan.fits:
            path = quantized_copy(args.model, path, why)
            config = ModelConfig.from_file(path / "config.json")
            dtype_bytes = run_dtype_bytes(path, config, args.dtype)
            weights = weight_bytes(path, dtype_bytes)
            plan = make_plan(config, weights, context, budget, kv, dtype_bytes, args.prefill_step_size, draft)
    if args.chat and args.max_kv_size is None and plan.fits:  # the weights may be quantized now: more room
        context = fitting(kv) or context
        plan = make_plan(config, weights, context, budget, kv, dtype_bytes, args.prefill_step_size, draft)
    if inputs is not None and inputs.has_media:
        chunk = prefill_chunk(config.text_config, 0, args.prefill_step_size, dtype_bytes)
        plan = dataclasses.replace(plan, media_tokens=sum(inputs.token_counts().values()),
                                   media=media_bytes(inputs, config.text_config.hidden_size, dtype_bytes, chunk))
    if args.plan:  # the table, then the refusal of a run that does not fit (exit status 1)
        print(cluster.plan(plan, config, kv, dtype_bytes, args.prefill_step_size, args.pipeline, refuse=False).table())
    plan = cluster.plan(plan, config, kv, dtype_bytes, args.prefill_step_size, args.pipeline)
    if not plan.fits:
        raise InputError(refusal(plan, config, kv, dtype_bytes, args.prefill_step_size))
    if args.plan:
        return
    model = load_model(path, dtype=args.dtype, progress=True, group=cluster.group,
                       parallel="pipeline" if args.pipeline else "tensor", adapter_path=args.adapter_path)
    model.vision_mask = args.vision_mask
    drafter = None
    if drafter_path is not None:
        from .speculative import load_drafter

        drafter = load_drafter(drafter_path, dtype=args.dtype, target=model)
    if args.verbose:
        q = config.quantization
        stored = f"{q['bits']}-bit, group size {q['group_size']} ({q.get('mode', 'affine')})" if q else "unquantized"
        print(f"Loaded {args.model} from {path} ({mx.default_device()}); weights {stored}, "
              f"{human(weight_bytes(path))}\n{plan.table()}", file=sys.stderr)

    def make_cache():
        return model.make_cache(one_tensor=kv.one_tensor, kv_bits=kv.bits, kv_group_size=kv.group_size,
                                quantized_kv_start=kv.quantized_start)

    def chunk(done: int) -> int:
        return prefill_chunk(config.text_config, done, args.prefill_step_size, dtype_bytes)

    progress = _Progress(args.prefill_step_size)
    options = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   prefill_step_size=chunk, progress=progress, max_kv_size=context, draft_model=drafter,
                   num_draft_tokens=args.num_draft_tokens, constraint=constraint)
    if args.chat:
        if args.max_kv_size is not None:
            more = fitting(kv)
            why, restart = "set by --max-kv-size", [f"--max-kv-size {more}"] if more > context else []
        elif context >= limit:
            why, restart = "the model's maximum", []
        else:
            why, restart = f"what fits the memory budget of {human(budget)}", []
            if kv.bits is None:
                eight = KVOptions(kv.one_tensor, 8, kv.group_size, kv.quantized_start, kv.sliding_slack)
                try:
                    if fitting(eight) > context:
                        restart.append("--kv-bits 8")
                except InputError:  # the group size does not suit this model's head dims
                    pass
            restart.append("a larger --memory-limit")
        full = (f"the chat's context holds {context:,} tokens ({why}): start a new conversation with 'r'"
                + (f", or restart with {' or '.join(restart)}" if restart else ""))
        return chat_loop(model, processor, args, dict(options, max_tokens=args.max_tokens), make_cache,
                         media_options, progress, full, cluster.from_rank0(lambda: _read_line(">> ")))
    printer, last = _Printer(args.hide_thinking), None
    for last in stream_generate(model, processor, inputs, cache=make_cache(), max_tokens=args.max_tokens,
                                **options):
        printer(last)
    printer.close()
    if _cut(last, args.max_tokens):
        why = f"--max-kv-size {args.max_kv_size}" if (args.max_kv_size or limit) < limit else "the model's maximum"
        _warn_cut(last, args.max_tokens, f"prompt and reply fill the context of {min(args.max_kv_size or limit, limit):,} "
                                         f"tokens ({why})")
    if args.verbose is not False:
        print_stats(last)


def _cut(last: Optional[GenerationResponse], max_tokens: int) -> bool:
    """Whether a reply ended because the context was full, short of --max-tokens."""
    return last is not None and last.finish_reason == "length" and last.generation_tokens < max_tokens


def _warn_cut(last: GenerationResponse, max_tokens: int, why: str) -> None:
    print(f"warning: the reply stopped at {last.generation_tokens} tokens, short of --max-tokens {max_tokens}: {why}",
          file=sys.stderr)


CHAT_HELP = ("Chat with the model: 'q' or Ctrl-D quits, 'r' starts a new conversation, Ctrl-C stops a reply "
             "(at the prompt it quits); '/image PATH...', '/audio PATH...' and '/video PATH...' add media to "
             "your next message (quote or backslash-escape spaces, as a shell does).")
MEDIA_COMMANDS = {"/image": "image", "/audio": "audio", "/video": "video"}


class _StopReply(Exception):
    """Ctrl-C during a prefill: raised between chunks, where the cache is whole."""


class _Interrupt:
    """While a reply streams, Ctrl-C asks it to stop at the next token or prefill chunk, where the
    conversation's cache is consistent; a second Ctrl-C before then interrupts at once."""

    def __init__(self):
        self.pending = False

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __enter__(self):
        self.pending = False
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def _read_line(prompt: str) -> Optional[str]:
    """One line from standard input (bytes, decoded here so that a line that is not UTF-8 is
    reported and skipped); None at end of input or on Ctrl-C."""
    try:
        print(prompt, end="", flush=True)
        raw = sys.stdin.buffer.readline()
    except KeyboardInterrupt:
        print()
        return None
    if not raw:
        print()
        return None
    return _decode(raw.rstrip(b"\r\n"), "standard input: this line")


def _media_paths(command: str, rest: str) -> list:
    """The paths after /image, /audio or /video: quoted or backslash-escaped as a shell takes them
    (what dragging a file from the Finder types), or one path typed as it is; each must be a file."""
    if rest.strip() and Path(rest.strip()).is_file():
        return [rest.strip()]
    try:
        paths = shlex.split(rest)
    except ValueError as e:
        raise InputError(f"{command}: cannot read the paths ({e})") from None
    if not paths:
        raise InputError(f"{command}: needs a path")
    for path in paths:
        try:
            check_file(path)
        except InputError as e:
            raise InputError(f"{command}: {e}") from None
    return paths


def chat_loop(model, processor, args, options, make_cache, media_options, progress: Optional[_Progress] = None,
              context_advice: str = "", read_line=lambda: _read_line(">> ")) -> None:
    from .generation import ChatSession, print_stats

    def new_session():
        return ChatSession(model, processor, system=args.system, enable_thinking=args.enable_thinking,
                           make_cache=make_cache, media_options=media_options, raw_prompt=args.raw_prompt)

    session = new_session()
    # Media given on the command line open the first turn.
    pending = {"image": list(args.image), "audio": list(args.audio), "video": list(args.video)}
    interrupt = _Interrupt()

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if interrupt.pending and done < total:
            raise _StopReply

    if sys.stdin.isatty():
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = read_line()
        except InputError as e:
            print(f"error: {e}; it was not sent", file=sys.stderr)
            continue
        if line is None:  # Ctrl-D, end of input, or Ctrl-C at the prompt: quit (exit status 0)
            return
        command, _, rest = line.strip().partition(" ")
        if not command:
            continue
        if command == "q":
            return
        if command == "r":
            session, pending = new_session(), {kind: [] for kind in pending}
            continue
        if command in MEDIA_COMMANDS:
            try:
                pending[MEDIA_COMMANDS[command]] += _media_paths(command, rest)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        printer, last = _Printer(args.hide_thinking), None
        with interrupt:
            reply = session.send(line, **pending, **dict(options, progress=on_progress))
            try:
                for last in reply:
                    printer(last)
                    if interrupt.pending:
                        break
            except _StopReply:
                pass
            except ContextError as e:  # the conversation is kept; the turn was not sent
                print(f"error: this message brings the conversation to {e.needed:,} tokens; {context_advice}",
                      file=sys.stderr)
                continue
            except InputError as e:  # a bad file: say so and keep chatting
                print(f"error: {e}", file=sys.stderr)
                continue
            finally:
                reply.close()  # a reply stopped early is kept in the conversation as far as it got
                if progress is not None:
                    progress.clear()
                pending = {kind: [] for kind in pending}
        printer.close()
        if _cut(last, options["max_tokens"]) and not interrupt.pending:
            _warn_cut(last, options["max_tokens"], context_advice)
        if args.verbose and last is not None and not interrupt.pending:
            print(f"(reused {session.reused_tokens} cached prompt tokens)", file=sys.stderr)
            print_stats(last, file=sys.stderr)


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        from .cluster import join

        cluster = join()  # one rank of several under mlx.launch, else a single process
        with cluster.running():
            return run(args, cluster)

    run_cli(work)


class _Module(types.ModuleType):
    """Once this CLI module is imported, Python sets it as the package's `generate` attribute,
    hiding the function `from mlx_gemma import generate` means: calling the module runs it."""

    def __call__(self, *args, **kwargs):
        from .generation import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _Module


if __name__ == "__main__":
    main()
