"""The speed suites run end to end and report every field; their roofline arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from benchmarks import roofline
from benchmarks.synthetic import HUB_CONFIG, build, drafter_config, synthetic_config
from mlx_gemma.config import ModelConfig
from mlx_gemma.memory import KVOptions, element_bytes, global_bytes_per_token
from mlx_gemma.model import Model
from mlx_gemma.speculative import Drafter, DrafterConfig

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
    # Each global layer's packed cache: its 512-wide scored array read twice, its 128 rotated dims once.
    assert roofline.kv_bytes(text, context, kv, 2) == pytest.approx(sliding + context * 8 * (2 * 512 + 128) * 2)
    two = KVOptions(one_tensor=False)
    assert roofline.kv_bytes(text, context, two, 2) == pytest.approx(sliding + context * global_bytes_per_token(text, two, 2))
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


def test_speculative_quick_writes_every_row(stand_in, tmp_path):
    from benchmarks.speculative import ACCEPTANCE, PROFILES

    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.speculative", "--model", str(stand_in), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "speculative.json").read_text())
    meta = report["meta"]
    for field in ("backend", "chip", "os", "mlx", "mlx_vlm"):
        assert meta["machine"][field], field
    assert meta["drafter"]["quantization"] and meta["drafter"]["assumed"]
    ks = PROFILES["quick"]["ks"]
    runs = report["runs"]
    assert list(runs) == ["mlx-gemma", "mlx-vlm"]
    for name, m in runs.items():
        assert m["activation_dtype"] == "float32"  # mlx-vlm at ours (CPU backend)
        assert sorted(map(int, m["verify"])) == [k + 1 for k in ks]
        assert m["decode"]["median_s"] > 0 and m["draft_step"]["median_s"] > 0
        assert m["plain_loop"]["tokens_per_s"] > 0 and m["mtp_loop"]["tokens_per_s"] > 0
        assert 0 <= m["mtp_loop"]["acceptance"] < 0.5  # random weights: the drafter is nearly always wrong
    assert runs["mlx-gemma"]["kv_export"]["median_s"] > 0 and runs["mlx-vlm"]["head"]["median_s"] > 0
    assert [r["k"] for r in report["rounds"]] == ks
    assert all(r["round_ratio"] > 0 for r in report["rounds"])
    assert [(r["k"], r["a"]) for r in report["tokens_per_s"]] == [(k, a) for k in ks for a in ACCEPTANCE]
    for r in report["tokens_per_s"]:
        assert r["tokens_per_round"] == pytest.approx(roofline.tokens_per_round(r["a"], r["k"]))
        assert r["mlx-gemma"]["tokens_per_s"] > 0 and r["mlx-vlm"]["speedup"] > 0
    md = (out / "speculative.md").read_text()
    assert md.count("\n| 1 |") == 2 and "| M4 Max |" in md and "| mlx-vlm | " in md


def test_mtp_round_bytes():
    """A round reads the target once and the drafter K times; a draft step reads all of the
    drafter but its token table, of which only the top centroids' rows."""
    assert roofline.tokens_per_round(0.0, 5) == 1 and roofline.tokens_per_round(1.0, 3) == 4
    assert roofline.tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    raw = json.loads(HUB_CONFIG.read_text())
    real = ModelConfig.from_file(HUB_CONFIG).text_config
    config = DrafterConfig.from_dict(drafter_config(raw))
    drafter = Drafter(config)
    sizes = {k: p.size for k, p in tree_flatten(drafter.parameters())}
    table = sizes.pop("model.embed_tokens.weight")
    sizes.pop("masked_embedding.token_ordering")
    rows = table * 32 / 2048
    unquantized = roofline.drafter_bytes(config, None)
    assert unquantized == pytest.approx(2 * (sum(sizes.values()) + rows))
    # the drafter recipe: 8.5 bits of 16 (8-bit with group scales), the small centroids kept
    assert 0.5 * unquantized < roofline.drafter_bytes(config) < 0.56 * unquantized
    # 3 sliding layers read the window of layer 46's K and V, the full one all of layer 47's.
    sliding, full = 1024 * 2 * 8 * 256 * 2, 4096 * 2 * 1 * 512 * 2
    assert roofline.drafter_kv_bytes(config.text_config, real, 4096, 2) == 3 * sliding + full
    table_md = roofline.mtp_chip_table(1e9, 0.0, 3, (0.5,))
    assert "1.88x" in table_md and "| M1 | 68.25 | 68.2 | 128.0 |" in table_md


def test_distributed_quick_measures_traffic(stand_in, tmp_path):
    """1 and 2 ranks on loopback, ours (tensor, pipeline) and mlx-lm's: every case timed, and
    the counted traffic is what the splits send (tensor: 2 all-sums of the hidden state per
    layer, and ours one more for the embedding and an all-gather of the logits; pipeline: one
    send and one all-sum per step, whatever the layers)."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--model", str(stand_in), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "distributed.json").read_text())
    assert report["meta"]["machine"]["backend"] and report["meta"]["backend"].startswith("ring")
    cases = {(c["implementation"], c["mode"]): c for c in report["cases"]}
    assert set(cases) == {("mlx-gemma", "tensor"), ("mlx-gemma", "pipeline"), ("mlx-lm", "tensor")}
    hidden = 4 * SMALL["hidden_size"]  # float32 activations on the CPU
    for (impl, mode), c in cases.items():
        for ranks in ("one_rank", "two_ranks"):
            assert c[ranks]["prefill_s"] > 0 and c[ranks]["decode_s_per_token"] > 0
        want = (2 * 2 * 2, 2 * 2 * hidden) if mode == "tensor" else (1 + 2, 2 * hidden)  # (messages, bytes)
        step, outside = c["decode_per_token"], c["outside_layers_per_token"]
        assert (step["messages"] - outside["messages"], step["bytes"] - outside["bytes"]) == want, (impl, mode)
        if (impl, mode) == ("mlx-gemma", "tensor"):  # the split embedding's all-sum, the head's all-gather
            assert outside["messages"] == 2 + 1 and outside["bytes"] >= 4 * 262_144 / 2, outside
        else:
            assert outside == {"messages": 0, "bytes": 0}, (impl, mode)
    assert report["projection"]["per_token"]["tensor"]["messages"] == 8 * 48 / 2 + 3  # the layers' part scaled
    assert (out / "distributed.md").read_text().count("tok/s") > 10


def test_decode_attention_reads_what_the_roofline_counts():
    """One 12B global layer: the bytes of the arrays a decode step's attention is handed, each
    once per pass, are what the roofline counts for each cache kind: the packed cache's scored
    array twice and its rotated N once (1.8x what it stores), keys and values once each."""
    from benchmarks import kv_attention

    context = 512
    rows = {r["kind"]: r for r in kv_attention.run([context], steps=1, repeats=1)}
    spec = kv_attention.config(6).text_config.layers[5]
    for kind, r in rows.items():
        opts = kv_attention.KINDS[kind]
        kv = KVOptions(one_tensor=opts["one_tensor"], bits=opts.get("bits"), group_size=64)
        per_token = roofline.global_read_values_per_token(spec, kv) * element_bytes(4, kv.bits, kv.group_size)
        assert r["after"]["read_bytes"] == pytest.approx((context + 1) * per_token, rel=1e-9), kind
        assert r["after"]["read_over_stored"] == pytest.approx(1.8 if kv.one_tensor else 1, rel=0.01), kind
        assert r["after"]["fused_read_over_stored"] == pytest.approx(1, rel=0.01), kind
        if kv.bits and not kv.one_tensor:  # mlx-lm's quantized attention holds the cache broadcast over 16 heads
            assert r["after"]["peak_bytes"] < r["mlx-lm"]["peak_bytes"] / 4, kind


def test_batch_step_bytes_and_the_prefill_stall():
    """A step of B streams reads the weights once and B streams' KV; the stall is the longest gap
    between two chunks of a running stream that overlaps the join, beside the median before it."""
    from benchmarks.server_throughput import percentile, stall

    assert roofline.batch_step_bytes(6e9, 0.25e9, 8) == 8e9
    table = roofline.batch_chip_table(6e9, {4096: 0.25e9}, (1, 8))
    # M1: 68.25 GB/s / 6.25 GB one stream; 8 x 68.25 / 8 GB; the gain 8 x 6.25 / 8 on every chip.
    assert "B=8 at 4096 tokens: 6.25x (tok/s)" in table and "| M1 | 68.25 | 10.9 | 68.2 |" in table
    # Two streams, a chunk every 0.1 s; the join is sent at 1.05 and its first token comes at 2.0.
    # The first stream is stalled from 1.2 to 1.7 (a chunk's prefill), the second never.
    steady = [round(0.1 * i, 2) for i in range(13)]
    first = steady + [1.7, 1.8, 1.9, 2.1, 2.2]
    second = [round(0.1 * i + 0.05, 2) for i in range(25)]
    r = stall([first, second], baseline_from=0.3, join_sent=1.05, join_first=2.0)
    assert r["median_gap_before_s"] == pytest.approx(0.1)
    assert r["longest_gap_during_s"] == pytest.approx(0.5) and r["longest_over_median"] == pytest.approx(5)
    assert r["join_s"] == pytest.approx(0.95)
    assert [s["chunks_during_join"] for s in r["streams"]] == [5, 9]  # 1.1, 1.2, 1.7, 1.8, 1.9 | 1.15 ... 1.95
    assert r["streams"][1]["longest_gap_during_s"] == pytest.approx(0.1)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 95) is None


def test_batch_step_times_every_batch_and_counts_the_bytes_it_reads(hf_checkpoint, tmp_path):
    """One row per batch size; each step reads the weights once and every row's KV."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.batch_step", "--model", str(hf_checkpoint), "--batches",
                           "1,3", "--context", "8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "batch_step.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    one, three = rows
    assert all(r["step_s"] > 0 and r["aggregate_tok_s"] == pytest.approx(r["batch"] / r["step_s"]) for r in rows)
    from mlx_gemma.loading import load

    model, _ = load(hf_checkpoint)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    kv = one["bytes"] - weights  # the weights once in both, and each row's KV (8 tokens each)
    assert kv > 0 and three["bytes"] == weights + 3 * kv
    assert "| 3 |" in (out / "batch_step.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.batch_step", "--model", str(hf_checkpoint), "--batches",
                          "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "error: --batches: positive batch sizes, got [0]"
