"""The error table: broken and hostile inputs through every entry point, as a user meets them.

Every CLI case asserts: the documented exit code (non-zero for an error), exactly one line on
stderr that names the flag or file and the problem, no traceback, and no file created, changed
or removed in the workspace except the intended output. A sentinel file sits next to every
output folder and must survive. API cases assert the package's own error class with the CLI's
message, and that the next call still works.

Placeholders in a case's arguments: {ckpt} the tiny transformers-built checkpoint, {ws} the
workspace folder (the current directory of the run), {img} / {wav} small valid media files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    id: str
    entry: str  # module under mlx_gemma (generate, convert, quantize, lora, fuse) or "benchmarks.run"
    args: list
    expect: str  # regex the one stderr line must match
    code: int = 1
    stdin: Optional[bytes] = None
    setup: Optional[str] = None  # name of a workspace preparation in SETUPS
    env: dict = field(default_factory=dict)


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime, mode, content hash)} of everything under `root`, folders included."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_mode, digest)
    return out


@pytest.fixture(scope="module")
def media_paths(tmp_path_factory):
    import media_files as mf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    Image.fromarray(mf.noise_image(64, 96)).save(d / "a.png")
    return {"img": str(d / "a.png"), "wav": str(mf.write_wav(d / "a.wav", 16000, 0.5))}


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sentinel.txt").write_text("the user's file")
    return ws


def run_entry(entry: str, args: list, cwd: Path, stdin: Optional[bytes] = None, env: Optional[dict] = None,
              timeout: float = 300):
    module = entry if entry.startswith("benchmarks.") else f"mlx_gemma.{entry}"
    environ = {**os.environ, "MLX_GEMMA_CACHE": str(cwd / ".cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, cwd=cwd,
                          env=environ, timeout=timeout)


def assert_one_line_error(run, expect: str, code: int = 1) -> str:
    stderr = run.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert run.returncode == code, (run.returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(expect, lines[0]), (expect, lines[0])
    return lines[0]


def check_case(case: Case, ws: Path, substitutions: dict, output: Optional[str] = None):
    if case.setup:
        SETUPS[case.setup](ws, substitutions)
    args = [a.format(**substitutions) for a in case.args]
    env = {k: v.format(**substitutions) for k, v in case.env.items()}
    before = snapshot(ws)
    run = run_entry(case.entry, args, ws, case.stdin, env)
    assert_one_line_error(run, case.expect.format(**substitutions), case.code)
    after = snapshot(ws)
    after.pop(".cache", None)
    assert {k: v for k, v in after.items() if not k.startswith(".cache")} == \
           {k: v for k, v in before.items() if not k.startswith(".cache")}, "the workspace changed"
    return run


def _bad_png(ws: Path, subs: dict) -> None:
    (ws / "cut.png").write_bytes(Path(subs["img"]).read_bytes()[:80])


def _wav(ws: Path, name: str, samples) -> None:
    import numpy as np
    import soundfile

    soundfile.write(str(ws / name), np.asarray(samples, np.float32), 16000, subtype="FLOAT")


def _checkpoint_copy(ws: Path, subs: dict, name: str = "ckpt", source: str = "ckpt") -> Path:
    import shutil

    return Path(shutil.copytree(subs[source], ws / name))


def _corrupt(ws: Path, subs: dict, name: str, data: bytes) -> None:
    (_checkpoint_copy(ws, subs) / name).write_bytes(data)


def _edit_config(ws: Path, subs: dict, edit, source: str = "ckpt") -> None:
    import json

    config = _checkpoint_copy(ws, subs, source, source) / "config.json"
    raw = json.loads(config.read_text())
    edit(raw)
    config.write_text(json.dumps(raw))


SETUPS: dict = {
    "width_a_string": lambda ws, subs: _edit_config(ws, subs, lambda c: c["text_config"].update(hidden_size="wide")),
    "negative_heads": lambda ws, subs: _edit_config(ws, subs, lambda c: c["text_config"].update(head_dim=-16)),
    "other_model": lambda ws, subs: _edit_config(ws, subs, lambda c: c.update(model_type="gemma3")),
    "negative_rotary": lambda ws, subs: _edit_config(ws, subs, lambda c: c["text_config"]["rope_parameters"][
        "full_attention"].update(partial_rotary_factor=-1)),
    "token_ids_disagree": lambda ws, subs: _edit_config(ws, subs, lambda c: c.update(image_token_id=99)),
    "cut_png": _bad_png,
    "nan_wav": lambda ws, subs: _wav(ws, "nan.wav", [0.1, float("nan")] * 4000),
    "silent_wav": lambda ws, subs: _wav(ws, "silent.wav", [0.0] * 8000),
    "bad_config": lambda ws, subs: _corrupt(ws, subs, "config.json", b"{not json"),
    "cut_shard": lambda ws, subs: _corrupt(ws, subs, "model.safetensors",
                                           (Path(subs["ckpt"]) / "model.safetensors").read_bytes()[:5000]),
    "bad_generation_config": lambda ws, subs: _corrupt(ws, subs, "generation_config.json", b"[1, 2"),
    "no_tokenizer": lambda ws, subs: (_checkpoint_copy(ws, subs) / "tokenizer.json").unlink(),
    "drafter_too_narrow": lambda ws, subs: _edit_config(ws, subs, lambda c: c.update(backbone_hidden_size=96),
                                                        source="drafter"),
    "drafter_other_vocab": lambda ws, subs: _edit_config(ws, subs, lambda c: c["text_config"].update(
        vocab_size=1024), source="drafter"),
    "adapters_without_base": lambda ws, subs: (ws / "adapters").mkdir() or (ws / "adapters" / "adapter_config.json")
    .write_text('{"fine_tune_type": "lora", "num_layers": 16}'),
    "drafter_cut_shard": lambda ws, subs: (_checkpoint_copy(ws, subs, "drafter", "drafter") / "model.safetensors")
    .write_bytes((Path(subs["drafter"]) / "model.safetensors").read_bytes()[:3000]),
}

M = ["--model", "{ckpt}", "--max-tokens", "2"]
GENERATE_CASES = [
    Case("temp-negative", "generate", M + ["--temp", "-1"], r"--temp -1.0: must be a number >= 0"),
    Case("temp-nan", "generate", M + ["--temp", "nan"], r"--temp nan: must be a number >= 0"),
    Case("temp-inf", "generate", M + ["--temp", "inf"], r"--temp inf: must be a number >= 0"),
    Case("top-p-2", "generate", M + ["--top-p", "2"], r"--top-p 2.0: must be a number from 0 to 1"),
    Case("top-k-negative", "generate", M + ["--top-k", "-5"], r"--top-k -5: must be a whole number >= 0"),
    Case("min-p-5", "generate", M + ["--min-p", "5"], r"--min-p 5.0: must be a number from 0 to 1"),
    Case("seed-negative", "generate", M + ["--seed", "-1"], r"--seed -1: must be a whole number from 0 to 4294967295"),
    Case("fps-0", "generate", M + ["--fps", "0"], r"--fps 0.0: must be a number of frames per second above 0"),
    Case("fps-nan", "generate", M + ["--fps", "nan"], r"--fps nan: must be a number"),
    Case("image-budget-0", "generate", M + ["--image", "{img}", "--image-budget", "0"],
         r"--image-budget 0: not a visual budget; use one of 70, 140, 280, 560, 1120"),
    Case("video-budget-99", "generate", M + ["--video-budget", "99"], r"--video-budget 99: not a visual budget"),
    Case("video-frames-0", "generate", M + ["--video-frames", "0"], r"--video-frames 0: must be a whole number"),
    Case("max-tokens-0", "generate", M + ["--max-tokens", "0"], r"--max-tokens: must be a positive number, got 0"),
    Case("max-tokens-negative", "generate", M + ["--max-tokens", "-5"], r"--max-tokens: must be a positive number"),
    Case("max-kv-size-0", "generate", M + ["--max-kv-size", "0"], r"--max-kv-size: must be a positive number"),
    Case("max-kv-size-below-prompt", "generate", M + ["--max-kv-size", "3"],
         r"--max-kv-size 3: smaller than the prompt \(\d+ tokens\)"),
    Case("prefill-step-0", "generate", M + ["--prefill-step-size", "0"], r"--prefill-step-size: must be a positive"),
    Case("quantized-kv-start-negative", "generate", M + ["--quantized-kv-start", "-3"],
         r"--quantized-kv-start: must be 0 or more, got -3"),
    Case("kv-bits-3", "generate", M + ["--kv-bits", "3"], r"--kv-bits: 3 is not supported \(valid: 4, 8\)"),
    Case("kv-group-size-7", "generate", M + ["--kv-bits", "8", "--kv-group-size", "7"],
         r"--kv-group-size: 7 is not supported"),
    Case("temp-not-a-number", "generate", M + ["--temp", "warm"], r"argument --temp: invalid float value: 'warm'",
         code=2),
    Case("vision-mask-bad", "generate", M + ["--vision-mask", "both"], r"argument --vision-mask: invalid choice",
         code=2),
    Case("model-missing", "generate", ["--model", "{ws}/nowhere"],
         r"{ws}/nowhere: neither a local directory nor a Hugging Face repo id"),
    Case("model-is-a-file", "generate", ["--model", "{ws}/sentinel.txt"], r"sentinel.txt: is a file"),
    Case("model-relative-folder-missing", "generate", ["--model", "models/my-ckpt"],
         r"^error: models/my-ckpt: no such folder, and as a Hub repo it could not be downloaded and is not in the "
         r"local Hugging Face cache \(.+\)$", env={"HF_HUB_OFFLINE": "1"}),
    Case("model-not-a-checkpoint", "generate", ["--model", "{ws}"], r"{ws}: no config.json"),
    Case("model-bad-config", "generate", ["--model", "{ws}/ckpt"], r"ckpt/config.json: not valid JSON",
         setup="bad_config"),
    Case("model-truncated-shard", "generate", ["--model", "{ws}/ckpt", "--prompt", "hi"],
         r"model.safetensors: (corrupt or )?truncated", setup="cut_shard"),
    Case("model-bad-generation-config", "generate", ["--model", "{ws}/ckpt"],
         r"generation_config.json: not valid JSON", setup="bad_generation_config"),
    Case("config-width-a-string", "generate", ["--model", "{ws}/ckpt"],
         r"ckpt/config.json: hidden_size is 'wide', expected a positive int", setup="width_a_string"),
    Case("config-negative-head-dim", "generate", ["--model", "{ws}/ckpt"],
         r"ckpt/config.json: head_dim is -16, expected a positive int", setup="negative_heads"),
    Case("config-negative-rotary-factor", "generate", ["--model", "{ws}/ckpt"],
         r"ckpt/config.json: partial_rotary_factor of full_attention is -1, expected a number above 0",
         setup="negative_rotary"),
    Case("config-another-model", "generate", ["--model", "{ws}/ckpt"],
         r"ckpt/config.json: model_type is 'gemma3', expected 'gemma4_unified'", setup="other_model"),
    Case("config-and-tokenizer-disagree", "generate", ["--model", "{ws}/ckpt"],
         r"ckpt: tokenizer: <\|image\|> has id \d+ but config.json says image_token_id = 99",
         setup="token_ids_disagree"),
    Case("model-no-tokenizer", "generate", ["--model", "{ws}/ckpt"], r"ckpt: no tokenizer \(tokenizer.json or tokenizer.model\)",
         setup="no_tokenizer"),
    Case("image-missing", "generate", M + ["--image", "{ws}/none.png"], r"none.png: no such file"),
    Case("image-a-folder", "generate", M + ["--image", "{ws}"], r"^error: {ws}: is a folder, not a file$"),
    Case("audio-a-folder", "generate", M + ["--audio", "{ws}"], r"^error: {ws}: is a folder, not a file$"),
    Case("video-a-folder", "generate", M + ["--video", "{ws}"], r"^error: {ws}: is a folder, not a file$"),
    Case("image-not-an-image", "generate", M + ["--image", "{ws}/sentinel.txt"],
         r"sentinel.txt: not an image file Pillow can read"),
    Case("image-truncated", "generate", M + ["--image", "{ws}/cut.png"], r"cut.png: truncated or corrupt image",
         setup="cut_png"),
    Case("audio-missing", "generate", M + ["--audio", "{ws}/none.wav"], r"none.wav: no such file"),
    Case("audio-not-audio", "generate", M + ["--audio", "{ws}/sentinel.txt"], r"sentinel.txt: cannot read audio"),
    Case("audio-nan", "generate", M + ["--audio", "{ws}/nan.wav"], r"nan.wav: the audio holds NaN or infinite",
         setup="nan_wav"),
    Case("audio-silent", "generate", M + ["--audio", "{ws}/silent.wav"], r"silent.wav: the audio is silent",
         setup="silent_wav"),
    Case("video-missing", "generate", M + ["--video", "{ws}/none.mp4"], r"none.mp4: no such file"),
    Case("video-not-a-video", "generate", M + ["--video", "{ws}/sentinel.txt"], r"sentinel.txt: cannot decode video"),
    Case("prompt-over-context", "generate", M + ["--prompt", "x" * 600],
         r"prompt: needs \d+ tokens, more than the model's context of 512 tokens"),
    Case("memory-limit-unreadable", "generate", M + ["--memory-limit", "lots"], r"--memory-limit: cannot read 'lots'"),
    Case("memory-limit-too-small", "generate", M + ["--memory-limit", "1MB", "--no-quantize"],
         r"the weights alone need .* budget"),
    # Its widths do not take the 4-bit copy's group size: the refusal is about the checkpoint as it
    # is, and names no --group-size (generate has none).
    Case("memory-limit-too-small-no-copy", "generate", M + ["--memory-limit", "1MB"],
         r"^error: the weights alone need [\d.]+ MB, budget 1.0 MB: the memory limit must be at least [\d.]+ MB "
         r"\(or quantize the weights: python -m mlx_gemma.quantize\)$"),
    Case("plan-does-not-fit", "generate", M + ["--plan", "--memory-limit", "1MB", "--no-quantize"],
         r"^error: the weights alone need [\d.]+ MB, budget 1.0 MB: the memory limit must be at least [\d.]+ MB"),
    Case("num-draft-tokens-0", "generate", M + ["--draft-model", "{drafter}", "--num-draft-tokens", "0"],
         r"--num-draft-tokens 0: must be a whole number from 1 to 128"),
    Case("num-draft-tokens-over-slack", "generate", M + ["--draft-model", "{drafter}", "--num-draft-tokens", "500"],
         r"--num-draft-tokens 500: must be a whole number from 1 to 128 \(what the sliding-window cache can take"),
    Case("draft-model-missing", "generate", M + ["--draft-model", "{ws}/nowhere"],
         r"{ws}/nowhere: neither a local directory nor a Hugging Face repo id"),
    Case("draft-model-is-a-target", "generate", M + ["--draft-model", "{ckpt}"],
         r"config.json: model_type is 'gemma4_unified', expected 'gemma4_unified_assistant'"),
    Case("draft-model-too-narrow", "generate", M + ["--draft-model", "{ws}/drafter"],
         r"{ws}/drafter: this drafter does not fit the target \(backbone_hidden_size 96 != the target's hidden_size 64",
         setup="drafter_too_narrow"),
    Case("draft-model-other-vocabulary", "generate", M + ["--draft-model", "{ws}/drafter"],
         r"{ws}/drafter: this drafter does not fit the target \(vocab_size 1024 != the target's 512",
         setup="drafter_other_vocab"),
    Case("draft-model-truncated", "generate", M + ["--draft-model", "{ws}/drafter"],
         r"drafter/model.safetensors: (corrupt or )?truncated", setup="drafter_cut_shard"),
    Case("adapters-name-no-base-model", "generate", ["--adapter-path", "{ws}/adapters", "--prompt", "hi"],
         r"^error: {ws}/adapters/adapter_config.json: names no base model \('model', or PEFT's "
         r"'base_model_name_or_path'\); give --model$", setup="adapters_without_base"),
    Case("adapters-missing-without-model", "generate", ["--adapter-path", "{ws}/none", "--prompt", "hi"],
         r"^error: {ws}/none: no adapter_config.json \(not an adapter directory\)$"),
    Case("draft-model-auto-unknown", "generate", M + ["--draft-model", "auto"],
         r"--draft-model auto: no drafter is known for"),
]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: c.id)
def test_generate_error_table(case, workspace, hf_checkpoint, drafter_checkpoint, media_paths):
    check_case(case, workspace, {"ckpt": str(hf_checkpoint), "drafter": str(drafter_checkpoint), "ws": str(workspace),
                                 **media_paths})


# --- the Python API: the same checks, the package's own errors, and the next call works -------

def _nan_audio():
    import numpy as np

    return [(np.array([0.1, np.nan] * 800, np.float32), 16000)]


API_CASES = [
    ("id-over-vocab", dict(prompt=[2, 106, 600_000]), r"prompt: token id 600000 is outside the vocabulary \(0 to 511\)"),
    ("id-negative", dict(prompt=[2, -5, 7]), r"prompt: token id -5 is outside the vocabulary"),
    ("id-not-a-number", dict(prompt=[2, "x", 7]), r"prompt: 'x' is not a token id"),
    ("prompt-none", dict(prompt=None), r"prompt: a NoneType is not a prompt"),
    ("prompt-empty", dict(prompt=[]), r"prompt: no tokens to process"),
    ("temp-negative", dict(temp=-1.0), r"--temp -1.0: must be a number >= 0"),
    ("min-p-5", dict(min_p=5.0), r"--min-p 5.0: must be a number from 0 to 1"),
    ("top-p-2", dict(top_p=2.0), r"--top-p 2.0: must be a number from 0 to 1"),
    ("top-k-fraction", dict(top_k=2.5), r"--top-k 2.5: must be a whole number"),
    ("top-k-infinite", dict(top_k=float("inf")), r"--top-k inf: must be a whole number"),
    ("top-k-huge", dict(top_k=10**400), r"--top-k 10000000000000000000\.\.\.: must be a whole number"),
    ("temp-nan", dict(temp=float("nan")), r"--temp nan: must be a number >= 0"),
    ("max-tokens-0", dict(max_tokens=0), r"--max-tokens: must be a positive number, got 0"),
    ("max-tokens-text", dict(max_tokens="8"), r"--max-tokens: must be a positive number, got '8'"),
    ("max-tokens-fraction", dict(max_tokens=2.5), r"--max-tokens: must be a positive number, got 2.5"),
    ("prefill-step-0", dict(prefill_step_size=0), r"--prefill-step-size: must be a positive number, got 0"),
    ("prefill-step-negative", dict(prefill_step_size=-5), r"--prefill-step-size: must be a positive number"),
    ("max-kv-size-text", dict(max_kv_size="big"), r"--max-kv-size: must be a positive number, got 'big'"),
    ("max-kv-size-below-prompt", dict(max_kv_size=2), r"--max-kv-size 2: smaller than the prompt"),
    ("image-missing", dict(image=["/nonexistent/a.png"]), r"/nonexistent/a.png: no such file"),
    ("image-wrong-type", dict(image=[123]), r"image: a int is not an image"),
    ("image-float-array", dict(image=[[[0.5]]]), r"image: a list is not an image"),
    ("audio-nan", dict(audio=_nan_audio()), r"audio: the audio holds NaN or infinite samples"),
    ("audio-rate-0", dict(audio=[([0.1, 0.2] * 800, 0)]), r"audio: sample rate 0 is not a whole number of Hz"),
    ("audio-bad-tuple", dict(audio=[(1, 2, 3)]), r"audio: expected \(samples, sample_rate\)"),
    ("audio-empty", dict(audio=[([], 16000)]), r"audio: the audio has no samples"),
    ("image-one-path-not-a-list", dict(image="/nonexistent/b.png"), r"^/nonexistent/b.png: no such file"),
    ("image-one-array-not-a-list", dict(image=__import__("numpy").zeros((4, 4, 3), "float32")),
     r"image: expected a uint8 array"),
    ("message-not-a-dict", dict(prompt=[{"role": "user", "content": "a"}, "b"]), r"prompt: message 2 is a str"),
    ("message-without-role", dict(prompt=[{"content": "hi"}]), r"prompt: message 1 has role None"),
    ("message-unknown-role", dict(prompt=[{"role": "wizard", "content": "hi"}]), r"message 1 has role 'wizard'"),
    ("content-a-number", dict(prompt=[{"role": "user", "content": 5}]), r"message 1 content is a int"),
    ("content-item-untyped", dict(prompt=[{"role": "user", "content": [{"text": "hi"}]}]),
     r"message 1 item 1 is not a dict with a 'type'"),
    ("media-item-without-source", dict(prompt=[{"role": "user", "content": [{"type": "image"}]}]),
     r"a image item without its 'image'"),
    ("image-five-channels", dict(image=__import__("numpy").zeros((8, 8, 5), "uint8")),
     r"^image: a uint8 array with 5 channels; give \(H, W\) gray, \(H, W, 3\) RGB or \(H, W, 4\) RGBA, "
     r"channels last$"),
    ("prompt-lone-surrogate", dict(prompt="\ud800"),
     r"^prompt: message 1: not valid Unicode text \(a lone surrogate U\+D800 at position 0\)$"),
    ("system-lone-surrogate", dict(system="be \udfff"),
     r"^prompt: message 1: not valid Unicode text \(a lone surrogate U\+DFFF at position 3\)$"),
    ("item-lone-surrogate", dict(prompt=[{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]),
     r"^prompt: message 1: not valid Unicode text \(a lone surrogate U\+D800 at position 1\)$"),
    ("raw-text-lone-surrogate", dict(prompt="ab\ud800", chat_template=False),
     r"^prompt: not valid Unicode text \(a lone surrogate U\+D800 at position 2\)$"),
    ("raw-prompt-placeholder-without-media", dict(prompt="look: <|image|>", raw_prompt=True),
     r"^prompt: the rendered conversation has 1 <\|image\|> placeholders but 0 images were given$"),
    ("draft-model-a-path", dict(draft_model="drafters/tiny"),
     r"^draft_model: 'drafters/tiny' is a path; pass the loaded drafter: draft_model=load_drafter\('drafters/tiny'\)$"),
]


def test_top_k_beyond_the_vocabulary_keeps_every_token(model, processor):
    """mlx-lm's top-k refuses k >= vocabulary (and its failure used to break sampling for the rest
    of the process); keeping the whole vocabulary is the same as no top-k."""
    import mlx.core as mx

    from mlx_gemma.generation import generate

    results = []
    for top_k in (model.config.text_config.vocab_size * 4, 0):
        mx.random.seed(7)
        results.append(generate(model, processor, "hi", max_tokens=4, temp=1.0, top_k=top_k))
    assert results[0] == results[1]


@pytest.mark.parametrize("name, kwargs, expect", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_error_table(model, processor, name, kwargs, expect):
    from mlx_gemma import MlxGemmaError, generate

    kwargs = {"prompt": "hi", "max_tokens": 3, **kwargs}
    with pytest.raises(MlxGemmaError, match=expect):
        generate(model, processor, kwargs.pop("prompt"), **kwargs)
    # Still usable, greedy and sampled alike (a sampler that raised inside mlx-lm's compiled
    # functions used to break every later sampled call of the process).
    assert generate(model, processor, "hi", max_tokens=3, temp=0.0) == \
        generate(model, processor, "hi", max_tokens=3, temp=0.0)
    generate(model, processor, "hi", max_tokens=3, temp=0.7, top_p=0.9, min_p=0.05, top_k=20)


@pytest.mark.parametrize("make, expect", [
    (lambda: __import__("mlx_gemma.prompt").prompt.MediaOptions(fps=0), r"--fps 0: must be a number"),
    (lambda: __import__("mlx_gemma.prompt").prompt.MediaOptions(image_budget=0), r"--image-budget 0: not a visual"),
    (lambda: __import__("mlx_gemma.prompt").prompt.MediaOptions(video_frames=-2), r"--video-frames -2"),
    (lambda: __import__("mlx_gemma").load("/nonexistent/model"), r"/nonexistent/model: neither a local directory"),
], ids=["media-fps-0", "media-budget-0", "media-frames-negative", "load-missing"])
def test_api_constructors_raise_package_errors(make, expect):
    from mlx_gemma import MlxGemmaError

    with pytest.raises(MlxGemmaError, match=expect):
        make()


@pytest.mark.parametrize("dtype", ["int8", "fp16", __import__("mlx.core").core.int8, 16])
def test_load_refuses_a_dtype_it_does_not_run_in(hf_checkpoint, drafter_checkpoint, dtype):
    from mlx_gemma import MlxGemmaError, load, load_drafter

    expect = (rf"^dtype={re.escape(repr(dtype))}: use 'auto', None \(as stored\) or one of 'bfloat16', 'float16', "
              r"'float32' \(a name or the mx dtype\)$")
    for loader, path in ((load, hf_checkpoint), (load_drafter, drafter_checkpoint)):
        with pytest.raises(MlxGemmaError, match=expect):
            loader(path, dtype=dtype)


def test_chat_session_survives_a_bad_turn(model, processor):
    from mlx_gemma import MlxGemmaError
    from mlx_gemma.generation import ChatSession

    def reply(chat, text, **kw):
        return "".join(r.text for r in chat.send(text, temp=0.0, max_tokens=4, **kw) if not r.thinking)

    chat, clean = ChatSession(model, processor), ChatSession(model, processor)
    first = reply(chat, "hello")
    assert first == reply(clean, "hello")
    for bad in (dict(image=["/nonexistent/c.png"]), dict(audio=[([float("inf")] * 900, 16000)])):
        with pytest.raises(MlxGemmaError):
            reply(chat, "and this?", **bad)
    with pytest.raises(MlxGemmaError, match="--temp"):
        list(chat.send("and this?", temp=-2.0))
    # The failed turns left no trace: the next turn is what a session without them says.
    assert reply(chat, "and then?") == reply(clean, "and then?")
    assert chat.reused_tokens > 0

# --- convert and quantize ---------------------------------------------------------------------
# {qckpt}: a checkpoint every group size divides. Refusals come before any work: arguments,
# then the destination, then the source.

def _taken(ws, subs):
    (ws / "out").mkdir()
    (ws / "out" / "keep.txt").write_text("mine")


def _ours_plus_a_user_file(ws, subs):
    from mlx_gemma.outputs import MARKER

    (ws / "out").mkdir()
    (ws / "out" / "config.json").write_text("{}")
    (ws / "out" / MARKER).write_text('{"written_by": "mlx-gemma", "files": ["config.json"]}')
    (ws / "out" / "notes.txt").write_text("mine")


def _home(ws, subs):
    (ws / "home").mkdir()
    (ws / "home" / "notes.txt").write_text("mine")


def _not_a_checkpoint(ws, subs):
    (ws / "src").mkdir()
    (ws / "src" / "readme.txt").write_text("not weights")


def _quantized_source(ws, subs):
    import json

    src = _checkpoint_copy(ws, subs, "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization": {"bits": 4, "group_size": 64}}))


def _truncated_shard(ws, subs):
    shard = _checkpoint_copy(ws, subs, "src") / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _missing_shard(ws, subs):
    import json

    src = _checkpoint_copy(ws, subs, "src")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model.safetensors", "y": "model-00002-of-00002.safetensors"}}))


def _read_only_parent(ws, subs):
    (ws / "locked").mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system instead
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(ws / "locked")], check=True)
    else:
        (ws / "locked").chmod(0o555)


SETUPS.update(taken=_taken, ours_plus_a_user_file=_ours_plus_a_user_file, home=_home,
              not_a_checkpoint=_not_a_checkpoint, quantized_source=_quantized_source,
              truncated_shard=_truncated_shard, missing_shard=_missing_shard, read_only_parent=_read_only_parent,
              source_copy=lambda ws, subs: _checkpoint_copy(ws, subs, "src"))

CONVERT = ["--hf-path", "{ckpt}", "--mlx-path"]
QUANTIZE = ["--model", "{qckpt}", "--out"]

CHECKPOINT_CASES: list[Case] = [
    Case("convert-existing-output", "convert", [*CONVERT, "out"], r"^error: out: exists and is not empty "
         r"\(use --force to replace it\)$", setup="taken"),
    Case("quantize-existing-output", "quantize", [*QUANTIZE, "out"], r"^error: out: exists and is not empty",
         setup="taken"),
    Case("force-on-a-folder-not-ours", "convert", [*CONVERT, "out", "--force"],
         r"^error: out: --force replaces only a folder mlx-gemma wrote, and this one has no "
         r"\.mlx-gemma-output\.json manifest$", setup="taken"),
    Case("force-on-ours-plus-a-user-file", "quantize", [*QUANTIZE, "out", "--force"],
         r"^error: out: --force replaces only a folder mlx-gemma wrote, and this one holds notes\.txt, "
         r"which mlx-gemma did not write$", setup="ours_plus_a_user_file"),
    Case("force-on-the-source-itself", "convert", ["--hf-path", "src", "--mlx-path", "src", "--force"],
         r"^error: src: --force replaces only a folder mlx-gemma wrote", setup="source_copy"),
    Case("force-on-the-current-folder", "convert", [*CONVERT, ".", "--force"],
         r"^error: \.: is the current folder or one above it; name a new folder for the output$"),
    Case("current-folder-without-force", "quantize", [*QUANTIZE, "."], r"^error: \.: is the current folder"),
    Case("force-on-the-parent-folder", "convert", [*CONVERT, "..", "--force"],
         r"^error: \.\.: is the current folder or one above it"),
    Case("force-on-home", "quantize", [*QUANTIZE, "~", "--force"],
         r"^error: {ws}/home: is the home folder; name a new folder for the output$", setup="home",
         env={"HOME": "{ws}/home"}),
    Case("output-is-a-file", "convert", [*CONVERT, "sentinel.txt", "--force"],
         r"^error: sentinel\.txt: exists and is not a directory$"),
    Case("output-parent-is-a-file", "convert", [*CONVERT, "sentinel.txt/out"],
         r"^error: sentinel\.txt: exists and is not a directory$"),
    Case("unwritable-parent", "convert", [*CONVERT, "locked/out"],
         r"^error: locked/out: cannot write \((Read-only file system|Permission denied)\)$",
         setup="read_only_parent"),
    Case("source-missing", "convert", ["--hf-path", "{ws}/missing", "--mlx-path", "out"],
         r"^error: {ws}/missing: neither a local directory nor a Hugging Face repo id"),
    Case("source-not-a-checkpoint", "quantize", ["--model", "src", "--out", "out"],
         r"^error: src: no config\.json \(not a model checkpoint directory\)$", setup="not_a_checkpoint"),
    Case("source-already-quantized", "quantize", ["--model", "src", "--out", "out"],
         r"^error: src: already quantized \(4-bit\); start from the unquantized checkpoint$",
         setup="quantized_source"),
    Case("source-truncated-shard", "convert", ["--hf-path", "src", "--mlx-path", "out"],
         r"^error: src/model\.safetensors: (corrupt or )?truncated safetensors file", setup="truncated_shard"),
    Case("source-index-names-a-missing-shard", "quantize", ["--model", "src", "--out", "out"],
         r"^error: src/model\.safetensors\.index\.json: names shard model-00002-of-00002\.safetensors, "
         r"which is missing from src$", setup="missing_shard"),
    Case("bits-not-offered", "quantize", [*QUANTIZE, "out", "--bits", "3"],
         r"^error: argument --bits: invalid choice: 3", code=2),
    Case("group-size-not-offered", "convert", [*CONVERT, "out", "-q", "--group-size", "48"],
         r"^error: argument --group-size: invalid choice: 48", code=2),
    Case("mode-not-offered", "quantize", [*QUANTIZE, "out", "--mode", "nf4"],
         r"^error: argument --mode: invalid choice: 'nf4'", code=2),
    Case("dtype-not-offered", "convert", [*CONVERT, "out", "--dtype", "int8"],
         r"^error: argument --dtype: invalid choice: 'int8'", code=2),
    Case("mxfp4-with-group-size-64", "quantize", [*QUANTIZE, "out", "--mode", "mxfp4", "--group-size", "64"],
         r"^error: --mode mxfp4 needs --bits 4 --group-size 32 \(got 4 and 64\)"),
    Case("mxfp4-with-8-bits", "convert", [*CONVERT, "out", "-q", "--mode", "mxfp4", "--bits", "8"],
         r"^error: --mode mxfp4 needs --bits 4 --group-size 32 \(got 8 and 32\)"),
    Case("default-group-size-does-not-divide", "quantize", ["--model", "{ckpt}", "--out", "out"],
         r"^error: group size 64 of 4-bit affine: does not divide the input size 96 of "
         r"language_model\.model\.layers\.\d+\.mlp\.down_proj; --group-size sets another$"),
    Case("group-size-does-not-divide", "quantize", ["--model", "{ckpt}", "--out", "out", "--group-size", "128"],
         r"^error: --group-size 128: does not divide the input size 64 of embed_vision\.embedding_projection$"),
]


def _checkpoint_subs(ws, hf_checkpoint, quant_source) -> dict:
    return {"ckpt": str(hf_checkpoint), "qckpt": str(quant_source), "ws": str(ws)}


def _unmount(ws: Path):
    if os.path.ismount(ws / "locked"):
        subprocess.run(["umount", str(ws / "locked")], check=True)


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.id)
def test_checkpoint_error_table(case, workspace, hf_checkpoint, quant_source):
    try:
        check_case(case, workspace, _checkpoint_subs(workspace, hf_checkpoint, quant_source))
    finally:
        _unmount(workspace)


@pytest.mark.parametrize("case", [c for c in CHECKPOINT_CASES if c.code == 1], ids=lambda c: c.id)
def test_checkpoint_api_errors(case, workspace, hf_checkpoint, quant_source, monkeypatch):
    """The same refusals through the Python API: the package's own class, the CLI's message, the
    workspace unchanged, and the next call works."""
    from mlx_gemma import MlxGemmaError
    from mlx_gemma.checkpoint import convert, quantize_checkpoint
    from mlx_gemma.convert import build_parser as convert_parser
    from mlx_gemma.quantize import build_parser as quantize_parser

    subs = _checkpoint_subs(workspace, hf_checkpoint, quant_source)
    if case.setup:
        SETUPS[case.setup](workspace, subs)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.format(**subs))
    monkeypatch.chdir(workspace)
    args = [a.format(**subs) for a in case.args]
    before = snapshot(workspace)
    try:
        with pytest.raises(MlxGemmaError) as e:
            if case.entry == "convert":
                a = convert_parser().parse_args(args)
                if a.quantize:
                    quantize_checkpoint(a.hf_path, a.mlx_path, a.bits, a.group_size, a.mode, a.recipe, force=a.force)
                else:
                    convert(a.hf_path, a.mlx_path, dtype=a.dtype, force=a.force)
            else:
                a = quantize_parser().parse_args(args)
                quantize_checkpoint(a.model, a.out, a.bits, a.group_size, a.mode, a.recipe, force=a.force)
        after = snapshot(workspace)
    finally:
        _unmount(workspace)
    assert re.search(case.expect.format(**subs), f"error: {e.value}"), str(e.value)
    assert after == before
    assert (convert(subs["ckpt"], str(workspace / "next")) / "config.json").exists()
# --- fine-tuning: lora's outputs and arguments, adapters through generate and fuse ---------------
# {data}: a two-example data set; {adapters}: a folder a lora run wrote (saves at iterations 2
# and 4). Every refusal comes before the first step and leaves the workspace as it was.

@pytest.fixture(scope="module")
def lora_data(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("lora-data")
    rows = [{"messages": [{"role": "user", "content": "say seven"}, {"role": "assistant", "content": "seven"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    for split in ("train", "valid", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def trained_adapters(hf_checkpoint, lora_data, tmp_path_factory):
    import contextlib
    import io

    from mlx_gemma.lora import main

    out = tmp_path_factory.mktemp("lora-run") / "adapters"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["--model", str(hf_checkpoint), "--train", "--data", str(lora_data), "--iters", "4", "--batch-size",
              "1", "--save-every", "2", "--adapter-path", str(out)])
    return out


def _adapter_copy(ws, subs, damage=None):
    import shutil

    folder = Path(shutil.copytree(subs["adapters"], ws / "ad"))
    if damage:
        damage(folder / "adapters.safetensors")


def _nan_weights(file: Path) -> None:
    import mlx.core as mx

    weights, metadata = mx.load(str(file), return_metadata=True)
    first = sorted(weights)[0]
    weights[first] = weights[first] * float("nan")
    mx.save_safetensors(str(file), weights, metadata=metadata)


def _peft_adapter(ws, subs):
    (ws / "ad").mkdir()
    (ws / "ad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')


def _foreign_adapters(ws, subs):
    """Adapters as mlx-lm writes them: no manifest of ours."""
    from mlx_gemma.outputs import MARKER

    _adapter_copy(ws, subs)
    (ws / "ad" / MARKER).unlink()


SETUPS.update(
    adapters=_adapter_copy, peft_adapter=_peft_adapter, foreign_adapters=_foreign_adapters,
    adapters_no_weights=lambda ws, subs: _adapter_copy(ws, subs, lambda f: f.unlink()),
    adapters_garbage=lambda ws, subs: _adapter_copy(ws, subs, lambda f: f.write_bytes(b"not safetensors")),
    adapters_cut=lambda ws, subs: _adapter_copy(ws, subs, lambda f: f.write_bytes(f.read_bytes()[:30000])),
    adapters_nan=lambda ws, subs: _adapter_copy(ws, subs, _nan_weights),
)

T = ["--model", "{ckpt}", "--train", "--data", "{data}", "--batch-size", "1", "--iters", "4"]
F = ["--model", "{ckpt}", "--adapter-path", "{adapters}"]
LORA_CASES: list[Case] = [
    Case("lora-seed-negative", "lora", [*T, "--seed", "-1"], r"^error: --seed -1: must be a whole number from 0 to "
         r"4294967295$"),
    Case("lora-learning-rate-inf", "lora", [*T, "--learning-rate", "inf"],
         r"^error: --learning-rate must be a finite positive number, got inf$"),
    Case("lora-existing-folder", "lora", [*T, "--adapter-path", "out"],
         r"^error: out: exists and is not empty \(use --force to replace it\)$", setup="taken"),
    Case("lora-over-a-peft-adapter", "lora", [*T, "--adapter-path", "ad"],
         r"^error: ad: exists and is not empty \(use --force to replace it\)$", setup="peft_adapter"),
    Case("lora-force-over-a-peft-adapter", "lora", [*T, "--adapter-path", "ad", "--force"],
         r"^error: ad: --force replaces only a folder mlx-gemma wrote, and this one has no "
         r"\.mlx-gemma-output\.json manifest$", setup="peft_adapter"),
    Case("lora-into-another-runs-folder", "lora", [*T, "--adapter-path", "ad"],
         r"^error: ad: exists and is not empty \(use --force to replace it\)$", setup="adapters"),
    Case("lora-resume-into-another-runs-folder", "lora",
         [*T, "--iters", "6", "--adapter-path", "ad", "--resume-adapter-file", "{adapters}/adapters.safetensors"],
         r"^error: ad: exists and is not empty \(use --force to replace it\)$", setup="adapters"),
    Case("lora-resume-would-replace-a-later-checkpoint", "lora",
         [*T, "--iters", "6", "--save-every", "2", "--adapter-path", "ad", "--resume-adapter-file",
          "ad/0000002_adapters.safetensors"],
         r"^error: ad: holds 0000004_adapters\.safetensors, which resuming from iteration 2 would replace \(resume "
         r"from the latest checkpoint, or name a new --adapter-path\)$", setup="adapters"),
    Case("lora-resume-in-a-folder-not-ours", "lora",
         [*T, "--iters", "6", "--adapter-path", "ad", "--resume-adapter-file", "ad/adapters.safetensors"],
         r"^error: ad: a resumed run adds only to a folder mlx-gemma wrote, and this one has no "
         r"\.mlx-gemma-output\.json manifest \(name a new --adapter-path\)$", setup="foreign_adapters"),
    Case("lora-resume-past-iters", "lora",
         [*T, "--iters", "3", "--adapter-path", "new", "--resume-adapter-file", "{adapters}/adapters.safetensors"],
         r"^error: {adapters}/adapters\.safetensors: already at iteration 4, not below --iters 3 \(the total here, "
         r"where mlx-lm's --iters counts more\)$"),
    Case("lora-resume-from-nan-weights", "lora",
         [*T, "--iters", "6", "--adapter-path", "new", "--resume-adapter-file", "ad/adapters.safetensors"],
         r"^error: ad/adapters\.safetensors: adapter weight \S+ holds NaN or infinite values \(a diverged run\?\)$",
         setup="adapters_nan"),
    Case("lora-adapter-path-is-a-file", "lora", [*T, "--adapter-path", "sentinel.txt"],
         r"^error: sentinel\.txt: exists and is not a directory$"),
    Case("lora-adapter-path-under-a-file", "lora", [*T, "--adapter-path", "sentinel.txt/ad"],
         r"^error: sentinel\.txt: exists and is not a directory$"),
    # root writes through permission bits: the setup mounts a read-only file system (chmod otherwise)
    Case("lora-adapter-path-read-only", "lora", [*T, "--adapter-path", "locked/ad"],
         r"^error: locked/ad: cannot write \((Read-only file system|Permission denied)\)$", setup="read_only_parent"),
    Case("lora-diverges-before-the-first-save", "lora", [*T, "--learning-rate", "1e39", "--adapter-path", "new"],
         r"^error: iteration 1: adapter weight \S+ holds NaN or infinite values: the run stopped, this run saved "
         r"nothing \(try a lower --learning-rate\)$"),
    Case("generate-adapters-without-weights", "generate", ["--model", "{ckpt}", "--adapter-path", "ad"],
         r"^error: ad: no adapters\.safetensors \(the adapter weights\)$", setup="adapters_no_weights"),
    Case("generate-adapters-garbage-weights", "generate", ["--model", "{ckpt}", "--adapter-path", "ad"],
         r"^error: ad/adapters\.safetensors: cannot read adapter weights \(Invalid json header length",
         setup="adapters_garbage"),
    Case("generate-adapters-nan-weights", "generate", ["--model", "{ckpt}", "--adapter-path", "ad"],
         r"^error: ad/adapters\.safetensors: adapter weight \S+ holds NaN or infinite values \(a diverged run\?\)$",
         setup="adapters_nan"),
    Case("fuse-adapters-cut-weights", "fuse", ["--model", "{ckpt}", "--adapter-path", "ad", "--save-path", "out"],
         r"^error: ad/adapters\.safetensors: cannot read adapter weights \(.*exceeding the size of the file",
         setup="adapters_cut"),
    Case("fuse-adapters-nan-weights", "fuse", ["--model", "{ckpt}", "--adapter-path", "ad", "--export-peft", "out"],
         r"^error: ad/adapters\.safetensors: adapter weight \S+ holds NaN or infinite values", setup="adapters_nan"),
    Case("fuse-export-is-the-save-path", "fuse", [*F, "--save-path", "out", "--export-peft", "out"],
         r"^error: --save-path out and --export-peft out: the same folder; name two separate folders$"),
    Case("fuse-export-inside-the-save-path", "fuse", [*F, "--save-path", "out", "--export-peft", "out/peft"],
         r"^error: --save-path out and --export-peft out/peft: one inside the other; name two separate folders$"),
    Case("fuse-export-existing-folder", "fuse", [*F, "--export-peft", "out"],
         r"^error: out: exists and is not empty \(use --force to replace it\)$", setup="taken"),
    Case("fuse-export-force-not-ours", "fuse", [*F, "--export-peft", "out", "--force"],
         r"^error: out: --force replaces only a folder mlx-gemma wrote, and this one has no "
         r"\.mlx-gemma-output\.json manifest$", setup="taken"),
    Case("fuse-export-read-only", "fuse", [*F, "--save-path", "out", "--export-peft", "locked/peft"],
         r"^error: locked/peft: cannot write \((Read-only file system|Permission denied)\)$",
         setup="read_only_parent"),
    Case("fuse-export-under-a-file", "fuse", [*F, "--export-peft", "sentinel.txt/peft"],
         r"^error: sentinel\.txt: exists and is not a directory$"),
]


@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: c.id)
def test_lora_error_table(case, workspace, hf_checkpoint, lora_data, trained_adapters):
    try:
        check_case(case, workspace, {"ckpt": str(hf_checkpoint), "ws": str(workspace), "data": str(lora_data),
                                     "adapters": str(trained_adapters)})
    finally:
        _unmount(workspace)


# --- `python -m mlx_gemma.generate` at the terminal: arguments, standard input, chat commands --------

NOT_UTF8 = "caf\udce9"  # what Python makes of the bytes b"caf\xe9" on a command line; passed back as them

CLI_CASES: list[Case] = [
    Case("unknown-flag", "generate", ["--frobnicate"], r"unrecognized arguments: --frobnicate", code=2),
    Case("missing-value", "generate", ["--max-tokens"], r"argument --max-tokens/-m: expected one argument", code=2),
    Case("not-a-number", "generate", ["--max-tokens", "many"], r"argument --max-tokens/-m: invalid int value: "
         r"'many'", code=2),
    Case("image-without-path", "generate", ["--image"], r"argument --image: expected at least one argument",
         code=2),
    Case("verbose-not-bool", "generate", ["--verbose", "maybe"],
         r"argument --verbose: expected True or False, got 'maybe'", code=2),
    Case("dtype-choice", "generate", ["--dtype", "fp8"], r"argument --dtype: invalid choice: 'fp8'", code=2),
    Case("memory-limit-text", "generate", ["--model", "{ckpt}", "--memory-limit", "ten gigs"],
         r"^error: --memory-limit: cannot read 'ten gigs' \(examples: 10GB, .*GB = 10\^9 bytes, GiB = 2\^30\)$"),
    Case("memory-limit-unit", "generate", ["--model", "{ckpt}", "--memory-limit", "10XB"],
         r"^error: --memory-limit: cannot read '10XB' \("),
    Case("memory-limit-zero", "generate", ["--model", "{ckpt}", "--memory-limit", "0GB"],
         r"^error: --memory-limit: must be at least 1 byte, got '0GB'$"),
    Case("memory-limit-overflow", "generate", ["--model", "{ckpt}", "--memory-limit", "1e999GB"],
         r"^error: --memory-limit: cannot read '1e999GB' \("),
    Case("stdin-not-utf8", "generate", ["--model", "{ckpt}", "--prompt", "-"],
         r"^error: --prompt -: standard input: not UTF-8 text \(byte 0xe9 at position 3\)$", stdin=b"caf\xe9 ?\n"),
    Case("prompt-not-utf8", "generate", ["--model", "{ckpt}", "--prompt", NOT_UTF8],
         r"^error: --prompt: not UTF-8 text \(byte 0xe9 at position 3\)$"),
    Case("system-not-utf8", "generate", ["--model", "{ckpt}", "--system-prompt", NOT_UTF8],
         r"^error: --system: not UTF-8 text \(byte 0xe9 at position 3\)$"),
    Case("image-nonexistent", "generate", ["--model", "{ckpt}", "--image", "{img}", "{ws}/nope.png"],
         r"^error: {ws}/nope\.png: no such file$"),
    Case("audio-nonexistent", "generate", ["--model", "{ckpt}", "--audio", "{ws}/nope.m4a"],
         r"^error: {ws}/nope\.m4a: no such file$"),
    Case("video-nonexistent", "generate", ["--model", "{ckpt}", "--video", "{ws}/nope.mp4"],
         r"^error: {ws}/nope\.mp4: no such file$"),
    Case("raw-prompt-placeholder-without-media", "generate", ["--model", "{ckpt}", "--raw-prompt", "--prompt", "<|audio|>?"],
         r"^error: prompt: the rendered conversation has 1 <\|audio\|> placeholders but 0 audio clips were given$"),
    Case("media-without-template", "generate", ["--model", "{ckpt}", "--image", "{img}", "--ignore-chat-template"],
         r"^error: media need the chat template \(drop --no-chat-template\)$"),
    # In --chat a bad line is reported and the chat goes on: it ends normally at 'q'.
    Case("chat-line-not-utf8", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: standard input: this line: not UTF-8 text \(byte 0xff at position 2\); it was not sent$",
         code=0, stdin=b"hi\xff\nq\n"),
    Case("chat-image-nonexistent", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: /image: {ws}/my photo\.png: no such file$", code=0, stdin=b"/image '{ws}/my photo.png'\nq\n"),
    Case("chat-image-a-folder", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: /image: {ws}: is a folder, not a file$", code=0, stdin=b"/image {ws}\nq\n"),
    Case("chat-unbalanced-quote", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: /audio: cannot read the paths \(No closing quotation\)$", code=0, stdin=b"/audio 'a b.wav\nq\n"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_generate_cli_error_table(case, workspace, hf_checkpoint, media_paths):
    substitutions = {"ckpt": str(hf_checkpoint), "ws": str(workspace), **media_paths}
    if case.stdin is not None:  # chat commands name workspace paths too
        case = Case(**{**case.__dict__, "stdin": case.stdin.decode("utf-8", "surrogateescape")
                       .format(**substitutions).encode("utf-8", "surrogateescape")})
    check_case(case, workspace, substitutions)


def test_generate_is_the_function_after_the_cli_module_is_imported(model, processor):
    import mlx_gemma.generate  # noqa: F401  (what `python -m mlx_gemma.generate` and the CLI tests do)
    from mlx_gemma import generate
    from mlx_gemma.generation import generate as the_function

    assert generate(model, processor, "hi", max_tokens=3, temp=0.0) == \
        the_function(model, processor, "hi", max_tokens=3, temp=0.0)


@pytest.mark.parametrize("error, expect", [
    ("GatedRepoError", r"google/gemma-4-12B-it: the repo is gated: accept its licence at "
                       r"https://huggingface.co/google/gemma-4-12B-it and log in with `hf auth login`"),
    ("RepositoryNotFoundError", r"^google/gemma-4-12B-it: no such folder, and no such repo on the Hugging Face Hub "
                                r"\(or a private one: log in with `hf auth login`\)$"),
    ("LocalEntryNotFoundError", r"^google/gemma-4-12B-it: no such folder, and as a Hub repo it could not be downloaded "
                                r"and is not in the local Hugging Face cache \(offline\)$"),
])
def test_hub_refusals_say_what_to_do(monkeypatch, tmp_path, error, expect):
    import huggingface_hub
    import huggingface_hub.errors

    from mlx_gemma import MlxGemmaError
    from mlx_gemma.loading import resolve_model_path

    def refuse(*args, **kwargs):
        cls = getattr(huggingface_hub.errors, error)
        if issubclass(cls, huggingface_hub.errors.HfHubHTTPError):
            import importlib

            from huggingface_hub.errors import Response  # whichever HTTP library this hub version uses

            request = importlib.import_module(Response.__module__).Request("GET", "https://huggingface.co")
            raise cls("refused", response=Response(401, request=request))
        raise cls("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MlxGemmaError, match=expect):
        resolve_model_path("google/gemma-4-12B-it")
