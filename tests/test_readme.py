"""The README's example blocks, executed, so that they cannot drift from the code.

`google/gemma-4-12B-it` is served from a local Hugging Face cache (offline) holding a tiny
checkpoint in the Hub's layout, and the media files the examples name are written into the
folder the examples run in. ```bash blocks run line by line (setup steps - venv, pip, the test
command itself - are skipped); ```python blocks run each as its own script. Blocks without a
language are sample output and are not run. Changes made to the commands (SUBSTITUTIONS): the
speed suite runs its quick profile (the full one is for a Mac) and writes beside the examples,
not over the repository's results; `generate` replies are at most 16 tokens unless the command
sets --max-tokens.
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
DRAFTER_ID = "google/gemma-4-12B-it-assistant"
REVISION = "0123456789abcdef0123456789abcdef01234567"
RUNNABLE = ("python -m mlx_gemma.", "python -m benchmarks.", "python convert.py", "python quantize.py")
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest")
SHELL_TOOLS = ("cat ", "head", "echo ")
SUBSTITUTIONS = {"python -m benchmarks.run ": "python -m benchmarks.run --quick --repeats 1 --out bench-results ",
                 # a reply that says nothing new after a few tokens on random weights; a command's own
                 # --max-tokens comes later and wins
                 "python -m mlx_gemma.generate ": "python -m mlx_gemma.generate --max-tokens 16 "}


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, str]]:
    """("page:line", text) of each fenced block of `language` in the README and the docs pages."""
    out = []
    for page in PAGES:
        text = page.read_text()
        out += [(f"{page.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 2}", m.group(1))
                for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]
    return out


def commands(body: str, start: str) -> list[tuple[str, str]]:
    """(where, shell command) for each runnable command of a bash block, in order."""
    page, _, first = start.rpartition(":")
    out = []
    for i, line in enumerate(body.replace("\\\n", " ").splitlines()):
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            command = shlex.join(words).replace(" '|' ", " | ")
            if not words or command.startswith(SETUP):
                continue
            for stage in command.split(" | "):
                assert stage.startswith(RUNNABLE + SHELL_TOOLS), \
                    f"{page}:{int(first) + i}: not a command the test can run: {stage}"
            out.append((f"{page}:{int(first) + i}", command))
    return out


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    """A Hugging Face cache holding `google/gemma-4-12B-it` (a tiny checkpoint converted to the
    Hub's config form, with room for two images at the largest budget) and its drafter, and a
    folder with the media files the examples name."""
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
    # Its MTP drafter, as Google publishes it beside the model (transformers' names and config).
    drafter = root / "hub" / ("models--" + DRAFTER_ID.replace("/", "--"))
    reference.build_drafter(drafter / "snapshots" / REVISION, backbone_hidden_size=128, head_dim=32,
                            global_head_dim=64)
    (drafter / "refs").mkdir()
    (drafter / "refs" / "main").write_text(REVISION)
    work = root / "work"
    work.mkdir()
    for i, name in enumerate(("photo.jpg", "a.png", "b.png", "a.jpg")):
        Image.fromarray(mf.noise_image(120 + 40 * i, 160, seed=i)).save(work / name)
    soundfile.write(str(work / "speech.flac"), mf.chirp(16000, 1.5), 16000)
    mf.write_video(work / "clip.mp4", seconds=2.0)
    (work / "notes.txt").write_text("Summarise: MLX runs Gemma 4 on a Mac.\n")
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
           "MLX_GEMMA_CACHE": str(root / "mlx-gemma-cache")}
    return work, env


def run(args, work: Path, env: dict, shell: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=work, env=env, input="", capture_output=True, text=True, timeout=600,
                          shell=shell, executable="/bin/bash" if shell else None)


@pytest.mark.parametrize("start, body", blocks("bash"), ids=[where for where, _ in blocks("bash")])
def test_readme_bash_block_runs(readme_env, start, body):
    """The block's commands in order (a later one may use what an earlier one wrote), `python`
    being this interpreter."""
    work, env = readme_env
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    results = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()}
    for where, command in commands(body, start):
        for old, new in SUBSTITUTIONS.items():
            command = command.replace(old, new)
        command = re.sub(r"\bpython (convert|quantize)\.py\b", rf"python {REPO}/\1.py", command)
        done = run(command, work, env, shell=True)
        assert done.returncode == 0, f"{where}: {command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and "error:" not in done.stderr, f"{where}: {done.stderr[-3000:]}"
    assert {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()} == results


@pytest.mark.parametrize("where, code", blocks("python"), ids=[where for where, _ in blocks("python")])
def test_readme_python_runs(readme_env, tmp_path, where, code):
    work, env = readme_env
    script = tmp_path / "example.py"
    script.write_text(code)
    done = run([sys.executable, str(script)], work, env)
    assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"


def test_every_example_block_is_run_or_sample_output():
    for page in PAGES:
        languages = re.findall(r"^```(\w*)\n.*?^```", page.read_text(), re.S | re.M)
        # sh / py: the server's examples, run by tests/test_server.py against a live server; toml: a
        # client's configuration file (docs/server.md)
        assert set(languages) <= {"bash", "python", "sh", "py", "toml", ""}, (page, languages)
    assert sum(len(commands(body, start)) for start, body in blocks("bash")) >= 10 and blocks("python")


def test_the_refusal_sample_is_what_the_planner_says():
    """The sample refusal in docs/memory.md for the real 12B on a 16 GB Mac (4-bit default weights,
    a 2/3 budget)."""
    from benchmarks.sizes import quantized_size
    from mlx_gemma.config import ModelConfig
    from mlx_gemma.memory import KVOptions, mac_budget, make_plan, refusal
    from mlx_gemma.quantization import QuantSpec

    text = (REPO / "docs" / "memory.md").read_text()
    sample = re.search(r"\$ python -m mlx_gemma.generate --kv-two-tensor --max-kv-size (\d+) .*\n(error: .*)\n", text)
    assert sample
    config = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json")
    weights = int(quantized_size(config, QuantSpec(), "default")["total_bytes"])
    kv = KVOptions(one_tensor=False)
    plan = make_plan(config, weights, int(sample.group(1)), mac_budget(16), kv)
    assert f"error: {refusal(plan, config, kv)}" == sample.group(2)


def test_the_readme_links_resolve():
    """Every link of the README and the docs pages to a file of the repository, and every link to
    a heading of the README, points at something that exists."""
    def anchor(heading: str) -> str:  # GitHub's: lower case, punctuation dropped, spaces to hyphens
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    readme = (REPO / "README.md").read_text()
    headings = {anchor(h) for h in re.findall(r"^#+ (.*)$", readme, re.M)}
    docs_linked = set()
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            if not path:
                assert page.name != "README.md" or fragment in headings, (page, target)
                continue
            assert (page.parent / path).is_file(), (page, target)
            docs_linked.add((page.parent / path).resolve())
    assert {p.resolve() for p in PAGES[1:]} <= docs_linked  # every docs page is reachable
