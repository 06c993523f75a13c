"""Constrained decoding's cost: per-token decode time with a JSON Schema constraint vs without,
the mask's own time per token, schema compile time, the llguidance tokenizer's build time, and
mlx-vlm's llguidance logits processor on the same loop, same run.

    python -m benchmarks.constrained [--layers 1] [--tokens 32] [--repeats 3]

The model is the real-width stand-in (benchmarks/synthetic.py: the 12B's widths and 262,144-entry
vocabulary, LAYERS layers, 4-bit default recipe). Its checkpoint has no tokenizer, so one is made
here with the real vocabulary's size and shape: Gemma 4's special tokens at their real ids, 256
byte-fallback tokens, and 261K word pieces (all 1-3 letter strings, with and without the word
marker, then longer pseudo-words, digits and CJK characters), a Unigram model with byte fallback
as Gemma's is. The mask's cost depends on how many tokens the grammar must check, which this
keeps at the real count.

"Mask ms/token" replays the constrained run's tokens through a fresh matcher, timing only what
the CPU does per step (advance the matcher, fill the bitmask); "overhead" is the difference in
decode time per token. An overhead below the mask time means the mask was computed while the
forward pass ran (generation.generate_step queues the step before the processor reads the token).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

from mlx_gemma.config import ModelConfig

from .run import ROOT, commit, machine, provenance
from .synthetic import synthetic_checkpoint

SCHEMA_20 = {"type": "object", "additionalProperties": False, "required": [f"f{i}" for i in range(20)], "properties": {
    **{f"f{i}": {"type": "string", "maxLength": 40} for i in range(0, 8)},
    **{f"f{i}": {"type": "integer", "minimum": 0, "maximum": 10_000} for i in range(8, 12)},
    **{f"f{i}": {"type": "boolean"} for i in range(12, 14)},
    **{f"f{i}": {"enum": ["red", "green", "blue"]} for i in range(14, 16)},
    **{f"f{i}": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4} for i in range(16, 18)},
    **{f"f{i}": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                 "required": ["x", "y"], "additionalProperties": False} for i in range(18, 20)}}}


def stand_in_tokenizer(config: ModelConfig):
    """A `tokenizers.Tokenizer` of the real vocabulary's size (see the module's docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab_size = config.text_config.vocab_size
    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|channel>": 100, "<channel|>": 101,
                "<|turn>": 105, "<turn|>": 106, "<|tool_call>": 48, "<tool_call|>": 49, '<|"|>': 52}
    for token, key in (("<|image>", "boi_token_id"), ("<image|>", "eoi_token_id"), ("<|image|>", "image_token_id"),
                       ("<|video|>", "video_token_id"), ("<|audio>", "boa_token_id"),
                       ("<audio|>", "eoa_token_index"), ("<|audio|>", "audio_token_id")):
        specials[token] = getattr(config, key)
    by_id = {i: (t, 0.0) for t, i in specials.items()}
    for b in range(256):
        by_id[200 + b] = (f"<0x{b:02X}>", 0.0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    short = ["".join(p) for n in (1, 2, 3) for p in itertools.product(letters, repeat=n)]
    pieces = iter([w for w in short] + ["\u2581" + w for w in short] + [str(n) for n in range(1000)] +
                  [chr(c) for c in range(0x4E00, 0x9FA6)] + list("{}[]:,\"'.!?-_()<>/\\ \n\t") +
                  ["\u2581" + "".join(p) for p in itertools.product(letters[::2], letters[1::2], letters, "aeiou")] +
                  ["".join(p) for p in itertools.product(letters, letters[::3], letters, letters[::2])] +
                  ["".join(p) for p in itertools.product(letters[::2], letters, letters[::2], letters, "aeiou")])
    free = (i for i in range(vocab_size) if i not in by_id)
    for i, (n, piece) in zip(free, enumerate(pieces)):
        by_id[i] = (piece, -1.0 - len(piece) - n * 1e-6)
    assert len(by_id) == vocab_size, len(by_id)  # the pieces fill it
    tok = Tokenizer(models.Unigram([by_id[i] for i in range(vocab_size)], unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return tok


def processor_of(tokenizer, config: ModelConfig):
    """What constrain.Guide reads off a processor."""
    fast = SimpleNamespace(backend_tokenizer=tokenizer)
    return SimpleNamespace(tokenizer=SimpleNamespace(_tokenizer=fast), config=config, eos_token_ids={1, 106},
                           thought_start_id=100, thought_end_id=101)


def decode_time(model, prompt: list, tokens: int, processors: list) -> tuple[float, list]:
    """(seconds per token after the first, the tokens) of greedy decode with `processors`."""
    from mlx_gemma.generation import generate_step

    cache = model.make_cache()
    out, tic = [], None
    for token, _ in generate_step(model, prompt, cache, logits_processors=processors, max_tokens=tokens,
                                  compile=False):
        out.append(token)
        if tic is None:
            tic = time.perf_counter()
    return (time.perf_counter() - tic) / (tokens - 1), out


def mask_time(llg_tok, grammar: str, tokens: list) -> float:
    """Seconds per step of the CPU's share alone: advance the matcher by a token, fill the mask."""
    import llguidance
    import numpy as np
    from llguidance.numpy import fill_next_token_bitmask

    matcher = llguidance.LLMatcher(llg_tok, grammar)
    mask = np.zeros((1, (llg_tok.vocab_size + 31) // 32), dtype=np.int32)
    tic = time.perf_counter()
    fill_next_token_bitmask(matcher, mask)
    for t in tokens[:-1]:
        matcher.consume_token(t)
        fill_next_token_bitmask(matcher, mask)
    return (time.perf_counter() - tic) / len(tokens)


def mlx_vlm_processor(tokenizer, schema: dict):
    """mlx-vlm's response_format path: its llguidance logits processor, as our loop's processor."""
    from transformers import PreTrainedTokenizerFast

    from mlx_vlm.structured import build_json_schema_logits_processor

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    processor = build_json_schema_logits_processor(hf, schema)

    def process(tokens, logits):
        return processor(tokens[None], logits)

    return process


def measure(layers: int, tokens: int, repeats: int) -> dict:
    from mlx_gemma.constrain import Constraint, Guide, llg_tokenizer
    from mlx_gemma.loading import load_model

    path = synthetic_checkpoint(layers)
    model = load_model(path, dtype=mx.float32)  # the CPU backend's fast activation dtype
    config = model.config
    tokenizer = stand_in_tokenizer(config)
    processor = processor_of(tokenizer, config)
    tic = time.perf_counter()
    llg_tok = llg_tokenizer(processor)
    tokenizer_s = time.perf_counter() - tic

    compile_s, matcher_s = [], []
    for _ in range(5):
        tic = time.perf_counter()
        constraint = Constraint.json_schema(SCHEMA_20)
        compile_s.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        Guide(processor, constraint)
        matcher_s.append(time.perf_counter() - tic)

    prompt = [2, 105, *range(300, 340), 106, 105]
    decode_time(model, prompt, 4, [])  # warm up
    free, guided, peer, out = [], [], [], []
    peer_error = None
    for _ in range(repeats):  # interleaved, so a slow moment hits both
        free.append(decode_time(model, prompt, tokens, [])[0])
        seconds, out = decode_time(model, prompt, tokens, [Guide(processor, constraint)])
        guided.append(seconds)
        if peer_error is None:
            try:
                peer.append(decode_time(model, prompt, tokens, [mlx_vlm_processor(tokenizer, SCHEMA_20)])[0])
            except Exception as e:  # what mlx-vlm's server answers with, as a 500
                peer_error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    text = tokenizer.decode(out)
    mask = statistics.median(mask_time(llg_tok, constraint.grammar, out) for _ in range(repeats))
    free_s, guided_s = statistics.median(free), statistics.median(guided)
    return {"layers": layers, "tokens": tokens, "vocab": config.text_config.vocab_size,
            "tokenizer_build_s": tokenizer_s, "schema_compile_ms": 1e3 * statistics.median(compile_s),
            "matcher_ms": 1e3 * statistics.median(matcher_s), "free_ms_per_token": 1e3 * free_s,
            "constrained_ms_per_token": 1e3 * guided_s, "ratio": guided_s / free_s,
            "overhead_ms_per_token": 1e3 * (guided_s - free_s), "mask_ms_per_token": 1e3 * mask,
            "mlx_vlm_ms_per_token": 1e3 * statistics.median(peer) if peer else None, "mlx_vlm_error": peer_error,
            "constrained_output_head": text[:120], "runs": {"free": free, "constrained": guided, "mlx_vlm": peer}}


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "constrained.json").write_text(json.dumps(report, indent=2) + "\n")
    r, m = report["row"], report["meta"]
    hidden = min(1.0, max(0.0, 1 - r["overhead_ms_per_token"] / r["mask_ms_per_token"]))
    peer = (f"{r['mlx_vlm_ms_per_token']:.1f} ms ({r['mlx_vlm_ms_per_token'] / r['constrained_ms_per_token']:.2f}x "
            "ours)" if r["mlx_vlm_ms_per_token"] else f"did not run: {r['mlx_vlm_error']}")
    lines = ["# Constrained decoding: JSON Schema vs free decode", "", *provenance(m), "",
             f"Real-width stand-in, {r['layers']} layers, {r['vocab']:,}-entry vocabulary, float32 activations; "
             f"{r['tokens']} greedy tokens, median of {m['repeats']} interleaved runs; a 20-property schema.", "",
             "| what | value |", "|---|---|",
             f"| decode, free | {r['free_ms_per_token']:.1f} ms/token |",
             f"| decode, constrained | {r['constrained_ms_per_token']:.1f} ms/token ({r['ratio']:.3f}x free) |",
             f"| mask alone (advance + fill, CPU) | {r['mask_ms_per_token']:.2f} ms/token |",
             f"| overhead seen in decode | {r['overhead_ms_per_token']:.2f} ms/token (within the runs' spread when "
             f"negative; {hidden:.0%} of the mask hidden behind the forward pass) |",
             f"| schema compile (Constraint.json_schema) | {r['schema_compile_ms']:.1f} ms |",
             f"| matcher for a sequence (Guide) | {r['matcher_ms']:.1f} ms |",
             f"| llguidance tokenizer build (once per process) | {r['tokenizer_build_s']:.2f} s |",
             f"| mlx-vlm 0.7.10's llguidance processor, same loop | {peer} |", "",
             f"Constrained output begins: `{r['constrained_output_head']}`"]
    (out / "constrained.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.constrained", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    row = measure(args.layers, args.tokens, args.repeats)
    report = {"meta": {"machine": machine(), "commit": commit(), "repeats": args.repeats,
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": "python -m benchmarks.constrained " + " ".join(argv or sys.argv[1:])}, "row": row}
    write(report, args.out)
    print((args.out / "constrained.md").read_text())


if __name__ == "__main__":
    main()
