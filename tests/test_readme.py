"""The README's example blocks, executed, so that they cannot drift from the code.

`google/gemma-4-12B-it` is served from a local Hugging Face cache (offline) holding a tiny
checkpoint in the Hub's layout, and the media files the examples name are written into the
folder the examples run in. ```bash blocks run line by line (setup steps - venv, pip, the test
command itself - are skipped); ```python blocks run each as its own script. Blocks without a
language are sample output and are not run. The one change made to a command: the speed suite
runs its quick profile (the full one is for a Mac).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "google/gemma-4-12B-it"
REVISION = "0123456789abcdef0123456789abcdef01234567"
RUNNABLE = ("python -m mlx_gemma.", "python -m benchmarks.", "python convert.py", "python quantize.py")
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest")
SUBSTITUTIONS = {"python -m benchmarks.run ": "python -m benchmarks.run --quick --repeats 1 "}


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of each fenced block of `language` in the README."""
    text = (REPO / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def commands() -> list[tuple[str, str]]:
    """(id, command) for every runnable command of the README's bash blocks."""
    out = []
    for start, body in blocks("bash"):
        for i, line in enumerate(body.replace("\\\n", " ").splitlines()):
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                command = shlex.join(words)
                if not words or command.startswith(SETUP):
                    continue
                assert command.startswith(RUNNABLE), f"README.md:{start + i}: not a command the test can run: {command}"
                out.append((f"README.md:{start + i}", command))
    return out


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    """A Hugging Face cache holding `google/gemma-4-12B-it` (a tiny checkpoint converted to the
    Hub's config form, with room for two images at the largest budget), and a folder with the
    media files the examples name."""
    import media_files as mf
    import reference
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("readme")
    source = reference.build_checkpoint(root / "source", hidden_size=128, intermediate_size=256, head_dim=32,
                                        global_head_dim=64, num_hidden_layers=6, max_position_embeddings=4096)
    repo = root / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.convert", "--hf-path", str(source),
                           "--mlx-path", str(snapshot)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    work = root / "work"
    work.mkdir()
    for i, name in enumerate(("photo.jpg", "a.png", "b.png", "a.jpg")):
        Image.fromarray(mf.noise_image(120 + 40 * i, 160, seed=i)).save(work / name)
    soundfile.write(str(work / "speech.flac"), mf.chirp(16000, 1.5), 16000)
    mf.write_video(work / "clip.mp4", seconds=2.0)
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
           "MLX_GEMMA_CACHE": str(root / "mlx-gemma-cache"), "PYTHONPATH": str(REPO)}
    return work, env


def run(args: list, work: Path, env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where, command", commands(), ids=[c[0] for c in commands()])
def test_readme_command_runs(readme_env, where, command):
    work, env = readme_env
    for old, new in SUBSTITUTIONS.items():
        command = command.replace(old, new)
    words = shlex.split(command)
    words[0] = sys.executable
    if words[1].endswith(".py"):  # the top-level convert.py / quantize.py
        words[1] = str(REPO / words[1])
    done = run(words, work, env)
    assert done.returncode == 0, f"{where}: {command}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where, code", [(f"README.md:{n}", b) for n, b in blocks("python")],
                         ids=[f"README.md:{n}" for n, _ in blocks("python")])
def test_readme_python_runs(readme_env, tmp_path, where, code):
    work, env = readme_env
    script = tmp_path / "example.py"
    script.write_text(code)
    done = run([sys.executable, str(script)], work, env)
    assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"


def test_every_example_block_is_run_or_sample_output():
    text = (REPO / "README.md").read_text()
    languages = re.findall(r"^```(\w*)\n.*?^```", text, re.S | re.M)
    assert set(languages) <= {"bash", "python", "", "text"}, languages
    assert commands() and blocks("python")
