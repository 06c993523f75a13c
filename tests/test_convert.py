"""Convert: round trip, dtype, what --force may replace, modes, and nothing left behind by an
error, a full disk or a signal. Refusals are rows of the error table (test_errors.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from drafting import draft_step
from mlx_gemma.outputs import MARKER
from mlx_gemma.checkpoint import convert
from mlx_gemma.errors import CheckpointError, InputError
from mlx_gemma.loading import load, load_weights
from mlx_gemma.speculative import load_drafter, rename

REPO = Path(__file__).resolve().parent.parent
IDS = mx.array([[2] + list(range(30, 90))])


def cli(*args, cwd=REPO, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlx_gemma.convert", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, **kwargs)


def tree(root: Path) -> dict:
    """{relative path: bytes} of every file under `root` (hidden ones included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_gives_identical_logits(model, hf_checkpoint, tmp_path):
    out = convert(str(hf_checkpoint), str(tmp_path / "mlx"))
    converted, processor = load(out)
    assert np.array_equal(np.array(converted(IDS)), np.array(model(IDS)))
    assert processor.encode("hello") == load(hf_checkpoint)[1].encode("hello")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json", "model.safetensors.index.json"):
        assert (out / f).exists(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_weights(out))
    manifest = json.loads((out / MARKER).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MARKER}


def test_cli_casts_to_dtype(hf_checkpoint, tmp_path):
    out = tmp_path / "bf16"
    run = cli("--hf-path", str(hf_checkpoint), "--mlx-path", str(out), "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    dtypes = {v.dtype for v in load_weights(out).values()}
    assert dtypes == {mx.bfloat16}


def test_force_replaces_our_own_output_and_nothing_else(hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert(str(hf_checkpoint), str(out))
    (tmp_path / "sentinel.txt").write_text("the user's file")
    run = cli("--hf-path", str(hf_checkpoint), "--mlx-path", "out", "--dtype", "bfloat16", "--force", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert {v.dtype for v in load_weights(out).values()} == {mx.bfloat16}
    # the previous output was moved aside and deleted: nothing hidden is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sentinel.txt"]
    assert (tmp_path / "sentinel.txt").read_text() == "the user's file"


def _add_notes(out: Path) -> None:
    (out / "notes.txt").write_text("mine")


def _edit_template(out: Path) -> None:
    template = out / "chat_template.jinja"
    template.write_text(template.read_text() + "{# my fix #}")


@pytest.mark.parametrize("change, reason", [
    (_add_notes, "holds notes.txt, which mlx-gemma did not write"),
    (_edit_template, "holds chat_template.jinja, changed since mlx-gemma wrote it"),
], ids=["added-a-file", "edited-a-file"])
def test_force_refuses_once_the_user_changed_the_output(hf_checkpoint, tmp_path, change, reason):
    out = convert(str(hf_checkpoint), str(tmp_path / "out"))
    change(out)
    before = tree(tmp_path)
    with pytest.raises(InputError, match=r"out: --force replaces only a folder mlx-gemma wrote, and this one "
                                         + re.escape(reason)):
        convert(str(hf_checkpoint), str(out), force=True)
    assert tree(tmp_path) == before


def test_force_through_a_symlink_replaces_the_real_folder(hf_checkpoint, tmp_path):
    real = convert(str(hf_checkpoint), str(tmp_path / "real"))
    (tmp_path / "link").symlink_to(real)
    convert(str(hf_checkpoint), str(tmp_path / "link"), dtype="bfloat16", force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == real
    assert {v.dtype for v in load_weights(real).values()} == {mx.bfloat16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_failed_replacement_keeps_the_previous_output(hf_checkpoint, tmp_path, monkeypatch):
    out = convert(str(hf_checkpoint), str(tmp_path / "out"))
    before = tree(tmp_path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(CheckpointError, match=r"out: cannot write \(No space left on device\)"):
        convert(str(hf_checkpoint), str(out), dtype="bfloat16", force=True)
    assert tree(tmp_path) == before


def test_outputs_get_the_umask_mode(hf_checkpoint, tmp_path):
    previous = os.umask(0o027)
    try:
        out = convert(str(hf_checkpoint), str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}  # side files too, not the source's


@pytest.mark.parametrize("interruption, expected", [
    (KeyboardInterrupt, KeyboardInterrupt),
    (OSError(28, "No space left on device"), CheckpointError),
    (RuntimeError("[write] Unable to write 3145822 bytes to file."), CheckpointError),
], ids=["ctrl-c", "disk-full", "mlx-write-error"])
def test_interrupted_convert_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, interruption, expected):
    calls = []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise interruption
        return real_save(path, *args, **kwargs)

    real_save = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    monkeypatch.setattr("mlx_gemma.checkpoint.MAX_SHARD_BYTES", 100_000)
    with pytest.raises(expected):
        convert(str(hf_checkpoint), str(tmp_path / "out"))
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["out", "new/folders/out"])  # the folders made for it go too
def test_full_disk_is_one_line_and_leaves_nothing(hf_checkpoint, tiny_tmpfs, out):
    (tiny_tmpfs / "sentinel.txt").write_text("the user's file")
    run = cli("--hf-path", str(hf_checkpoint), "--mlx-path", str(tiny_tmpfs / out))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: {tiny_tmpfs / out}: cannot write (No space left on device)"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["sentinel.txt"]


@pytest.fixture(scope="module")
def big_source(quant_source, tmp_path_factory) -> Path:
    """quant_source with a 262,144-token vocabulary: a 134 MB embedding, enough that writing it
    is still going on when the temporary folder appears."""
    out = tmp_path_factory.mktemp("big") / "big"
    out.mkdir()
    for f in quant_source.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((quant_source / "config.json").read_text())
    config["text_config"]["vocab_size"] = 262_144
    (out / "config.json").write_text(json.dumps(config))
    weights = load_weights(quant_source)
    weights["language_model.model.embed_tokens.weight"] = mx.random.normal((262_144, 128), key=mx.random.key(0))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


@pytest.mark.parametrize("module", ["convert", "quantize"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_leaves_nothing(big_source, tmp_path, module, sig):
    """The real CLI, signalled while it writes: once the temporary folder is there the process
    is frozen (SIGSTOP) so that the signal surely lands mid-write, then sent `sig` and resumed."""
    (tmp_path / "sentinel.txt").write_text("the user's file")
    flags = ["--hf-path", str(big_source), "--mlx-path", "out"] if module == "convert" else \
            ["--model", str(big_source), "--out", "out"]
    proc = subprocess.Popen([sys.executable, "-m", f"mlx_gemma.{module}", *flags], cwd=tmp_path,
                            stderr=subprocess.PIPE,
                            # a shell may start background jobs with SIGINT ignored; Python then keeps it so
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + sig, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[0].startswith("interrupted: nothing was written") and len(lines) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]
    assert (tmp_path / "sentinel.txt").read_text() == "the user's file"


def test_ctrl_c_while_the_output_is_swapped_in_waits_for_the_swap(hf_checkpoint, tmp_path, monkeypatch):
    """A signal between moving the old output aside and renaming the new one in must not leave
    the old one under its hidden name (MLX's threads can take a signal a thread mask blocks)."""
    import os
    import signal

    out = tmp_path / "out"
    convert(str(hf_checkpoint), str(out))
    real = Path.rename

    def rename(self, target):
        if self == out:  # the old output is being moved aside: Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    convert(str(hf_checkpoint), str(out), force=True)  # complete: the signal is not acted on after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


# --- the MTP drafter -------------------------------------------------------------------------


def test_drafter_round_trip_gives_identical_logits(model, drafter_checkpoint, tmp_path):
    out = convert(str(drafter_checkpoint), str(tmp_path / "drafter"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    source, converted = (load_drafter(p, target=model) for p in (drafter_checkpoint, out))
    for a, b in zip(draft_step(converted, model, IDS), draft_step(source, model, IDS)):
        assert np.array_equal(np.array(a), np.array(b))


def test_cli_casts_a_drafter_but_not_its_token_ordering(drafter_checkpoint, tmp_path):
    out = tmp_path / "bf16"
    run = cli("--hf-path", str(drafter_checkpoint), "--mlx-path", str(out), "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    weights = load_weights(out, rename=rename)
    ordering = weights.pop("masked_embedding.token_ordering")
    assert ordering.dtype == mx.int64  # as stored: an index, never cast
    assert mx.array_equal(ordering, load_weights(drafter_checkpoint, rename=rename)["masked_embedding.token_ordering"])
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}


@pytest.mark.parametrize("module", ["convert", "quantize"])
def test_drafter_with_a_missing_weight_is_one_line(drafter_checkpoint, tmp_path, module):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in drafter_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_weights(drafter_checkpoint, rename=lambda name: name)
    del weights["post_projection.weight"]
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    flags = ["--hf-path", str(broken), "--mlx-path", "out"] if module == "convert" else \
        ["--model", str(broken), "--out", "out"]
    run = subprocess.run([sys.executable, "-m", f"mlx_gemma.{module}", *flags], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 1 and run.stderr == f"error: {broken}: missing weight post_projection.weight\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
