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
    entry: str  # module under mlx_gemma (generate, convert, quantize) or "benchmarks.run"
    args: list
    expect: str  # regex the one stderr line must match
    code: int = 1
    stdin: Optional[bytes] = None
    setup: Optional[str] = None  # name of a workspace preparation in SETUPS
    env: dict = field(default_factory=dict)


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime, mode)} of everything under `root`, folders included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_mode)
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
    environ = {**os.environ, "PYTHONPATH": str(REPO), "MLX_GEMMA_CACHE": str(cwd / ".cache"), **(env or {})}
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
    before = snapshot(ws)
    run = run_entry(case.entry, args, ws, case.stdin, case.env)
    assert_one_line_error(run, case.expect.format(**substitutions), case.code)
    after = snapshot(ws)
    after.pop(".cache", None)
    assert {k: v for k, v in after.items() if not k.startswith(".cache")} == \
           {k: v for k, v in before.items() if not k.startswith(".cache")}, "the workspace changed"
    return run


SETUPS: dict = {}

GENERATE_CASES: list[Case] = []


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: c.id)
def test_cli_error_table(case, workspace, hf_checkpoint, media_paths):
    check_case(case, workspace, {"ckpt": str(hf_checkpoint), "ws": str(workspace), **media_paths})


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
    Case("media-without-template", "generate", ["--model", "{ckpt}", "--image", "{img}", "--ignore-chat-template"],
         r"^error: media need the chat template \(drop --no-chat-template\)$"),
    # In --chat a bad line is reported and the chat goes on: it ends normally at 'q'.
    Case("chat-line-not-utf8", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: standard input: this line: not UTF-8 text \(byte 0xff at position 2\); it was not sent$",
         code=0, stdin=b"hi\xff\nq\n"),
    Case("chat-image-nonexistent", "generate", ["--model", "{ckpt}", "--chat"],
         r"^error: /image: {ws}/my photo\.png: no such file$", code=0, stdin=b"/image '{ws}/my photo.png'\nq\n"),
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
