"""`python -m mlx_gemma.server`: flags, the memory plan of what the server may hold, and
starting the engine and uvicorn (rank 0 serves HTTP; under mlx.launch the others follow)."""

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from ..errors import ArgumentParser, InputError, run_cli

DEFAULT_MODEL = "google/gemma-4-12B-it"
DEFAULT_NUM_DRAFT_TOKENS = 3  # speculative.DEFAULT_NUM_DRAFT_TOKENS (not imported: flags come before MLX)
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BODY = 64 * 2**20


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlx_gemma.server",
                       description="Serve Gemma 4 12B over HTTP: OpenAI Chat Completions and Responses, Anthropic "
                                   "Messages.")
    p.add_argument("--model", default=None,
                   help=f"checkpoint directory or Hugging Face repo id (default: the base model --adapter-path's "
                        f"config names, else {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id in responses and /v1/models (default: the adapters' folder name with "
                        "--adapter-path, else the checkpoint's folder name or the repo id); requests may name any model")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="LoRA adapters to apply: mlx_gemma.lora's / mlx-lm's output, or a PEFT adapter directory "
                        "(default: none)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes the server); requests must name it (or localhost) as "
                        "their Host unless it is 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on /v1/*")
    p.add_argument("--cors-allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable "
                        "(default: none)")
    p.add_argument("--prompt-cache-bytes", type=int, default=None,
                   help="bytes of KV-cache snapshots kept across requests (0 turns the prefix cache off; "
                        "default: a quarter of the memory budget left after the weights)")
    p.add_argument("--responses-store-count", type=int, default=1000,
                   help="stored Responses kept for previous_response_id, least recently used out first")
    p.add_argument("--responses-store-bytes", type=int, default=256 * 2**20,
                   help="bytes of stored Responses (their conversations, media included)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="reply tokens when a request does not say")
    p.add_argument("--temp", type=float, default=None,
                   help="default temperature (default: the checkpoint's generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the global layers' KV cache (4 or 8)")
    p.add_argument("--memory-limit", default=None, help="memory budget, e.g. 10GB (decimal) or 10GiB (default: "
                   "Metal's recommended working set on a Mac, physical memory elsewhere); the served context "
                   "is the longest the plan fits in it")
    p.add_argument("--allow-local-media", action="store_true",
                   help="let clients name files on this machine as media (off: only data URLs)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let clients give http(s) URLs of media, fetched by the server")
    p.add_argument("--allow-long-media", action="store_true", help="accept audio over 30 s and video over 60 s")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="largest image (width x height) a request may send; refused before it is decoded")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests waiting for admission; more are refused with 503")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="sequences decoded together (default: what the memory plan holds at 4,096 tokens each, "
                        "at most 64; 1 under mlx.launch); a request also waits until the plan holds its KV")
    p.add_argument("--draft-model", default=None, metavar="PATH_OR_REPO",
                   help="an MTP drafter (gemma4_unified_assistant) every sequence drafts with: the same tokens when "
                        "greedy, the same distribution when sampling (default: none)")
    p.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS, metavar="K",
                   help="drafts per round")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch with several ranks: split the layers between them (fits bigger weights "
                        "and contexts) instead of splitting every layer's heads (tensor parallel, faster decode); "
                        "rank 0 serves HTTP, the others follow it")
    return p


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    path = Path(args.adapter_path or args.model)
    return path.resolve().name if path.is_dir() else args.model


def check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise InputError(f"--port {port}: cannot listen on {host} ({e.strerror})") from None


def check_flags(args) -> None:
    """Flags first, before the seconds of importing MLX and the minutes of loading."""
    if args.max_num_seqs is not None and args.max_num_seqs <= 0:
        raise InputError(f"--max-num-seqs: must be a positive number, got {args.max_num_seqs}")
    for name in ("max_tokens", "queue_size", "max_body_bytes", "responses_store_count", "responses_store_bytes"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}: must be a positive number, got {getattr(args, name)}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise InputError(f"--prompt-cache-bytes: must be 0 (off) or more, got {args.prompt_cache_bytes}")
    if args.kv_bits not in (None, 4, 8):
        raise InputError(f"--kv-bits: must be 4 or 8, got {args.kv_bits}")
    if not 0 < args.port < 65536:
        raise InputError(f"--port: must be from 1 to 65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key: must not be empty (leave the flag out to serve without a key)")
    if args.max_image_pixels <= 0:
        raise InputError(f"--max-image-pixels: must be a positive number, got {args.max_image_pixels}")
    for origin in args.cors_allow_origin or []:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise InputError(f"--cors-allow-origin {origin}: must be an origin like http://localhost:3000 (or *)")


def serve(args, cluster) -> None:
    """Rank 0 (the only one, unless launched) serves HTTP; the other ranks follow its engine."""
    if cluster.rank == 0:
        check_port(args.host, args.port)
    import uvicorn

    from ..generation import check_sampling
    from ..loading import load, resolve_model_path
    from ..memory import human
    from .app import create_app
    from .engine import Engine

    check_sampling(args.temp, args.top_p, args.top_k, args.min_p)
    path = resolve_model_path(args.model)
    cluster.check_same_checkpoint(path)
    from .plan import plan_server

    cache_bytes, context, plan = plan_server(path, args, cluster)
    seed = cluster.seed(None)  # the engine thread's generator, alike on every rank
    mode = "pipeline" if args.pipeline else "tensor"
    from .metrics import Metrics

    metrics = Metrics()
    if args.draft_model is not None and cluster.size > 1:
        raise InputError("--draft-model: not supported under mlx.launch yet (one process drafts)")
    drafter = None
    if args.draft_model is not None:
        from ..speculative import check_num_draft_tokens, load_drafter

        check_num_draft_tokens(args.num_draft_tokens)

        drafter_path = resolve_model_path(args.draft_model)
        drafter = lambda model: load_drafter(drafter_path, target=model)  # noqa: E731
    engine = Engine(lambda: load(path, group=cluster.group, parallel=mode, adapter_path=args.adapter_path), args,
                    cache_bytes, context, plan, cluster, metrics, drafter, seed)
    if cluster.rank > 0:
        # Ctrl-C in the terminal reaches every rank: rank 0 stops serving and then stops this one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.thread.join()
        return
    served = served_name(args)
    app = create_app(engine, args, served, metrics)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    ranks = f", {cluster.size} ranks, {mode} parallel" if cluster.size > 1 else ""
    adapters = f" with the adapters in {args.adapter_path}" if args.adapter_path else ""
    logging.getLogger("mlx_gemma.server").info(
        "serving %s%s as %r on http://%s:%d (context %d tokens, up to %d sequences at once, prefix cache %s%s)",
        args.model, adapters, served, args.host, args.port, context, engine.max_num_seqs,
        human(cache_bytes) if cache_bytes else "off", ranks)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.close()


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)

    def work():
        check_flags(args)
        from ..cluster import join
        from ..tuning.checkpoints import resolve_base_model

        args.model = resolve_base_model(args.model, args.adapter_path, DEFAULT_MODEL)

        cluster = join()  # one rank of several under mlx.launch, else a single process
        with cluster.running():
            serve(args, cluster)

    try:
        run_cli(work, interrupted="server stopped")
    except SystemExit as e:
        # The engine thread's MLX stream must not be torn down by the interpreter's exit: when the
        # thread ended early (a failed load), that aborts the process (std::terminate, exit 134)
        # after the error line. Everything is said and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
