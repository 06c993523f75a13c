"""Convert: round trip, dtype, refusal to overwrite, and nothing left behind on interruption."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.convert import convert
from mlx_gemma.errors import CheckpointError
from mlx_gemma.loading import load, load_weights

REPO = Path(__file__).resolve().parent.parent
IDS = mx.array([[2] + list(range(30, 90))])


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


def test_cli_casts_to_dtype(hf_checkpoint, tmp_path):
    out = tmp_path / "bf16"
    run = subprocess.run([sys.executable, "-m", "mlx_gemma.convert", "--hf-path", str(hf_checkpoint),
                          "--mlx-path", str(out), "--dtype", "bfloat16"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    dtypes = {v.dtype for v in load_weights(out).values()}
    assert dtypes == {mx.bfloat16}


def test_refuses_non_empty_destination_without_force(hf_checkpoint, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, "-m", "mlx_gemma.convert", "--hf-path", str(hf_checkpoint),
                          "--mlx-path", str(dst)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == \
        f"error: {dst}: exists and is not empty (use --force to replace it)"
    assert "Traceback" not in run.stderr and (dst / "keep.txt").read_text() == "mine"
    convert(str(hf_checkpoint), str(dst), force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


@pytest.mark.parametrize("interruption, expected", [
    (KeyboardInterrupt, KeyboardInterrupt),
    (OSError(28, "No space left on device"), CheckpointError),
], ids=["ctrl-c", "disk-full"])
def test_interrupted_convert_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, interruption, expected):
    calls = []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise interruption
        return real_save(path, *args, **kwargs)

    real_save = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    monkeypatch.setattr("mlx_gemma.convert.MAX_SHARD_BYTES", 100_000)
    with pytest.raises(expected):
        convert(str(hf_checkpoint), str(tmp_path / "out"))
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
