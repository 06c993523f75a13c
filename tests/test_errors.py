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
    env = {k: v.format(**substitutions) for k, v in case.env.items()}
    before = snapshot(ws)
    run = run_entry(case.entry, args, ws, case.stdin, env)
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



# --- convert and quantize ---------------------------------------------------------------------
# {qckpt}: a checkpoint every group size divides. Refusals come before any work: arguments,
# then the destination, then the source.

def _copy_ckpt(ws: Path, subs: dict, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(subs["ckpt"], ws / name))


def _taken(ws, subs):
    (ws / "out").mkdir()
    (ws / "out" / "keep.txt").write_text("mine")


def _ours_plus_a_user_file(ws, subs):
    from mlx_gemma.checkpoint import MARKER

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

    src = _copy_ckpt(ws, subs, "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization": {"bits": 4, "group_size": 64}}))


def _truncated_shard(ws, subs):
    shard = _copy_ckpt(ws, subs, "src") / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _missing_shard(ws, subs):
    import json

    src = _copy_ckpt(ws, subs, "src")
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
              source_copy=lambda ws, subs: _copy_ckpt(ws, subs, "src"))

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
