"""Session fixtures: one tiny checkpoint written by transformers, its reference model, our load.

Parity errors measured by the tests are collected in `PARITY` and printed at the end of the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import reference  # noqa: E402

PARITY: dict[str, float] = {}


@pytest.fixture(scope="session", autouse=True)
def runtime_only_subprocesses():
    """Every process a test starts finds the repository (`benchmarks`, `mlx_gemma`) and runs
    without the test-only torch (tests/runtime_only/sitecustomize.py). Set here, in the process
    that runs the tests, not at import: pytest-xdist's workers must keep torch for the reference."""
    repo = Path(__file__).resolve().parent.parent
    patch = pytest.MonkeyPatch()
    patch.setenv("PYTHONPATH", os.pathsep.join([str(repo), str(repo / "tests" / "runtime_only"),
                                                *filter(None, [os.environ.get("PYTHONPATH")])]))
    yield
    patch.undo()


def record_parity(name: str, value: float) -> None:
    PARITY[name] = max(value, PARITY.get(name, 0.0))


def pytest_sessionfinish(session):
    # Under pytest-xdist each worker measures its share; the controller prints them all.
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity"] = dict(PARITY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for name, value in getattr(node, "workeroutput", {}).get("parity", {}).items():
        record_parity(name, value)


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("measured errors (parity with transformers: max relative error)")
        for name, value in sorted(PARITY.items()):
            terminalreporter.write_line(f"{name:<60} {value:.3e}")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB file system (we are root in the test sandbox); skipped where mounting is not
    permitted, leaving the in-process disk-full tests."""
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    return reference.build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-gemma4-unified")


@pytest.fixture(scope="session")
def quant_source(tmp_path_factory) -> Path:
    """A checkpoint whose widths every group size divides (the main one has hidden size 64)."""
    return reference.build_checkpoint(tmp_path_factory.mktemp("hfq") / "tiny-128", hidden_size=128,
                                      intermediate_size=256, num_hidden_layers=6, head_dim=32,
                                      global_head_dim=64)


@pytest.fixture(scope="session")
def smooth_checkpoint(tmp_path_factory) -> Path:
    """Trained-like weight statistics (std 0.02, norms near 1): errors measured on it are not
    amplified by a deliberately sharp fixture. Global head dim 64 fits every KV group size."""
    return reference.build_checkpoint(tmp_path_factory.mktemp("smooth") / "tiny-smooth", stats=reference.trained_like,
                                      hidden_size=128, intermediate_size=256, num_hidden_layers=6, head_dim=32,
                                      global_head_dim=64)


@pytest.fixture(scope="session")
def hf_model(hf_checkpoint):
    return reference.load_reference(hf_checkpoint)


@pytest.fixture(scope="session")
def loaded(hf_checkpoint):
    from mlx_gemma import load

    return load(hf_checkpoint)


@pytest.fixture(scope="session")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="session")
def processor(loaded):
    return loaded[1]


@pytest.fixture(scope="session")
def drafter_checkpoint(tmp_path_factory) -> Path:
    """A tiny ordered-head MTP drafter fitting `hf_checkpoint` (its widths divisible by the
    default group size 64, so it quantizes)."""
    return reference.build_drafter(tmp_path_factory.mktemp("drafter") / "tiny-drafter", ordered=True,
                                   hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def drafter(drafter_checkpoint, model):
    from mlx_gemma.speculative import load_drafter

    return load_drafter(drafter_checkpoint, target=model)


def ids_of(n, seed=0):
    """A prompt of `n` ordinary token ids of the tiny checkpoint, bos first."""
    import numpy as np

    return [2] + np.random.default_rng(seed).integers(20, reference.VOCAB, size=n - 1).tolist()


def feed(model, cache, ids, chunk):
    """The logits of `ids` fed into `cache` `chunk` tokens at a time."""
    import mlx.core as mx
    import numpy as np

    return np.concatenate([np.array(model(mx.array([ids[i:i + chunk]]), cache=cache)[0])
                           for i in range(0, len(ids), chunk)])
