"""The speed suite runs end to end and reports every field; its roofline arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from benchmarks import roofline
from benchmarks.synthetic import build, synthetic_config
from mlx_gemma.config import ModelConfig
from mlx_gemma.memory import KVOptions, global_bytes_per_token
from mlx_gemma.model import Model

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(hidden_size=64, intermediate_size=128)  # real vocabulary, heads and head dims


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bench") / "synthetic", 2, **SMALL)


def test_synthetic_layers_end_on_a_global_layer():
    real = json.loads((ROOT / "tests" / "data" / "gemma-4-12B-it.config.json").read_text())["text_config"]
    for n in (1, 2, 6, 7):
        types = synthetic_config(n)["text_config"]["layer_types"]
        assert types == real["layer_types"][-n:] and types[-1] == "full_attention"


def test_quick_profile_writes_every_field(stand_in, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.run", "--model", str(stand_in), "--quick", "--compare", "mlx-vlm",
           "--repeats", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "speed.json").read_text())
    meta = report["meta"]
    for field in ("model", "checkpoint", "quantization", "commit", "command", "date", "profile"):
        assert meta[field], field
    for field in ("chip", "os", "backend", "mlx", "mlx_vlm"):
        assert meta["machine"][field], field
    runs = report["runs"]
    assert [r["implementation"] for r in runs][:2] == ["mlx-gemma", "mlx-vlm"]
    # CPU backend, bfloat16 checkpoint: ours runs float32, so the peer runs at both dtypes.
    assert [(r["setting"], r["activation_dtype"]) for r in runs] == [
        ("default", "float32"), ("same dtypes", "float32"), ("defaults", "bfloat16")]
    kinds = {c["kind"] for c in runs[0]["cases"]}
    assert kinds == {"prefill", "decode", "image"}
    for r in runs:
        assert r["load_s"] > 0
        for c in r["cases"]:
            assert c["min_s"] <= c["median_s"] <= c["max_s"] and len(c["runs_s"]) == 1
            assert c["peak_memory_bytes"] > 0 and c["tokens_per_s"] > 0
            assert c["achieved_gb_s" if c["kind"] == "decode" else "achieved_gflop_s"] > 0
    for r in runs[1:]:
        assert r["ratios"] and all(v["tokens_per_s"] > 0 and v["peak_memory"] > 0 for v in r["ratios"].values())
    assert set(runs[1]["ratios"]) == {f"{c['kind']} {c['value']}" for c in runs[0]["cases"]}
    # The stand-in holds exactly the bytes its quantization needs.
    assert abs(report["bytes_check"]["ratio"] - 1) < 0.05
    assert "| case |" in (out / "speed.md").read_text()
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_bytes_match_the_planner_and_prefill_flops_the_parameters():
    config = ModelConfig.from_file(ROOT / "tests" / "data" / "gemma-4-12B-it.config.json")
    text = config.text_config
    kv = KVOptions()
    context = 40_000
    sliding = sum(2 * min(context, s.window) * s.num_kv_heads * s.head_dim * 2 for s in text.layers if s.is_sliding)
    assert roofline.kv_bytes(text, context, kv, 2) == pytest.approx(
        sliding + context * global_bytes_per_token(text, kv, 2))
    # One token at position 0: 2 FLOPs per weight of every projection, attention over one key, the head.
    model = Model(config)
    linear = sum(m.weight.size for name, m in model.language_model.named_modules()
                 if isinstance(m, nn.Linear))
    attention = sum(4 * text.num_attention_heads * s.head_dim for s in text.layers)
    assert roofline.prefill_flops(text, 1) == 2 * linear + attention + 2 * text.hidden_size * text.vocab_size
    # The default recipe's decode weights of the real 12B, from the config alone.
    weights = roofline.weight_bytes_min(config)
    counted = sum(p.size for k, p in tree_flatten(model.parameters()) if k.startswith("language_model."))
    assert 0.5 * counted < weights < 0.6 * counted  # 4 bits + a bfloat16 scale and bias per 64


def test_quick_profile_runs_on_a_small_vocabulary(hf_checkpoint, tmp_path):
    """Prompt ids come from the checkpoint's own vocabulary (the tiny one has 512 ids): the worker
    used to draw ids up to 200,000 and crash the process on anything smaller than Gemma's."""
    from benchmarks.runners import prompt, text_ids

    config = ModelConfig.from_file(hf_checkpoint / "config.json")
    ordinary = text_ids(config)
    assert ordinary.max() < config.text_config.vocab_size
    assert config.image_token_id not in ordinary and config.text_config.bos_token_id not in ordinary
    ids, _, _ = prompt(config, "image", 70)
    assert max(ids) < config.text_config.vocab_size
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--model", str(hf_checkpoint), "--quick",
                           "--repeats", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads((out / "speed.json").read_text())["runs"][0]["cases"]
    assert {c["kind"] for c in cases} == {"prefill", "decode", "image"}
    assert all(c["tokens_per_s"] > 0 for c in cases)
