"""Quantization: round trip, error bounds, exact QAT grids, recipes, interop with mlx-vlm, CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import record_parity
from mlx_gemma.config import hub_form
from mlx_gemma.errors import CheckpointError, InputError
from mlx_gemma.loading import load, load_weights
from mlx_gemma.quantization import QuantSpec, quantize
from mlx_gemma.checkpoint import quantize_checkpoint

REPO = Path(__file__).resolve().parent.parent
IDS = mx.array([[2] + list(range(30, 80))])


def run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def quantized(quant_source, tmp_path_factory):
    return quantize_checkpoint(str(quant_source), str(tmp_path_factory.mktemp("q") / "q4"))


def test_round_trip_and_error_bound(quant_source, quantized):
    q_model, _ = load(quantized)
    entry = json.loads((quantized / "config.json").read_text())["quantization"]
    assert (entry["bits"], entry["group_size"], entry["mode"]) == (4, 64, "affine")
    source = load_weights(quant_source)
    stored = load_weights(quantized)
    n_quantized = 0
    for path, m in q_model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        n_quantized += 1
        w = source[f"{path}.weight"].astype(mx.float32)
        deq = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits, dtype=mx.float32)
        # MLX shifts each group's grid so that zero is a level; a value is then at most one
        # step (the group's scale) from its level: half a step of rounding inside the range,
        # under one step of clipping at the far edge.
        step = mx.repeat(mx.abs(m.scales.astype(mx.float32)), m.group_size, axis=-1)
        err = mx.abs(deq - w)
        assert mx.all(err <= step * 1.001 + 1e-7).item(), path
        assert mx.mean((err <= step / 2 * 1.001 + 1e-7).astype(mx.float32)).item() > 0.95, path
        assert m.bits == (entry.get(path, entry)["bits"])
        assert stored[f"{path}.scales"].shape == m.scales.shape
    assert n_quantized == 6 * 7 - 1 + 1 + 3  # 7 linears a layer (the global one has no v_proj), embedding, 3 multimodal
    assert np.isfinite(np.array(q_model(IDS))).all()


def test_already_quantized_is_refused(quantized, tmp_path):
    with pytest.raises(InputError, match="already quantized"):
        quantize_checkpoint(str(quantized), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def grid_weights(symmetric: bool, rows=64, gs=64, seed=0) -> mx.array:
    """bfloat16 weights on a 4-bit grid per group, using only some of the 16 levels."""
    rng = np.random.default_rng(seed)
    scale = (rng.integers(1, 16, size=(rows, 1)) * 2.0 ** -8).astype(np.float32)
    if symmetric:  # levels -8..7 around zero (QAT q4_0), here only -6..5 used
        codes, bias = rng.integers(-6, 6, size=(rows, gs)), 0.0
    else:  # levels 0..15 from a per-group offset, here only 2..12 used
        codes, bias = rng.integers(2, 13, size=(rows, gs)), (rng.integers(-64, 0, size=(rows, 1)) * 2.0 ** -8)
    w = (codes * scale + bias).astype(np.float32)
    out = mx.array(w).astype(mx.bfloat16)
    assert np.array_equal(np.array(out.astype(mx.float32)), w), "grid must be exact in bfloat16"
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_qat_grid_is_recovered_exactly(symmetric, monkeypatch):
    monkeypatch.setattr("mlx_gemma.quantization.SCREEN_ELEMENTS", 64 * 5)  # screened in several chunks
    w = grid_weights(symmetric)
    exact = np.array(w.astype(mx.float32))
    plain = mx.dequantize(*mx.quantize(w, group_size=64, bits=4), group_size=64, bits=4, dtype=mx.float32)
    q = quantize(w, QuantSpec(4, 64))
    ours = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=64, bits=4, dtype=mx.float32)
    kind = "symmetric" if symmetric else "asymmetric"
    record_parity(f"QAT {kind} 4-bit grid: plain quantizer max |error|", float(np.abs(np.array(plain) - exact).max()))
    record_parity(f"QAT {kind} 4-bit grid: mlx-gemma max |error|", float(np.abs(np.array(ours) - exact).max()))
    assert np.abs(np.array(plain) - exact).max() > 0, "missing levels must defeat min/max quantization"
    assert np.array_equal(np.array(ours), exact)


def test_non_grid_weights_match_plain_quantizer():
    w = mx.random.normal((32, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    q = quantize(w, QuantSpec(4, 64))
    plain = mx.quantize(w, group_size=64, bits=4)
    for a, b in zip((q["weight"], q["scales"], q["biases"]), plain):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("recipe, eight_bit", [
    ("small", set()),
    ("default", {"vision_embedder.patch_dense", "embed_vision.embedding_projection",
                 "embed_audio.embedding_projection"}),
    ("quality", {"language_model.model.embed_tokens", "vision_embedder.patch_dense",
                 "embed_vision.embedding_projection", "embed_audio.embedding_projection"}),
])
def test_recipe_changes_what_it_says(quant_source, tmp_path, recipe, eight_bit):
    out = quantize_checkpoint(str(quant_source), str(tmp_path / recipe), recipe=recipe)
    entry = json.loads((out / "config.json").read_text())["quantization"]
    assert {k for k, v in entry.items() if isinstance(v, dict) and v["bits"] == 8} == eight_bit
    model, _ = load(out)
    bits = {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits")}
    assert {p for p, b in bits.items() if b == 8} == eight_bit
    assert all(b == 4 for p, b in bits.items() if p not in eight_bit)


def test_mlx_gemma_checkpoint_loads_in_mlx_vlm(quantized):
    from mlx_vlm import load as vlm_load

    ours, _ = load(quantized)
    theirs, _ = vlm_load(str(quantized))
    # mlx-vlm caches keys and values as two tensors: with ours so too, the arithmetic is bit for bit theirs
    assert np.array_equal(np.array(theirs(IDS).logits), np.array(ours(IDS, cache=ours.make_cache(one_tensor=False))))


def test_mlx_vlm_quantized_checkpoint_loads_in_mlx_gemma(quant_source, tmp_path):
    from mlx_vlm import load as vlm_load

    hub = tmp_path / "hub-form"  # what the Hub ships: mlx-vlm reads only this config form
    subprocess.run(["cp", "-r", str(quant_source), str(hub)], check=True)
    (hub / "config.json").write_text(json.dumps(hub_form(json.loads((quant_source / "config.json").read_text()))))
    out = tmp_path / "vlm-q4"
    conv = run("mlx_vlm", "convert", "--hf-path", str(hub), "--mlx-path", str(out), "-q", "--q-bits", "4",
               "--q-group-size", "64")
    assert conv.returncode == 0, conv.stderr
    theirs, _ = vlm_load(str(out))
    ours, _ = load(out)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in ours.named_modules())
    two_tensor = ours.make_cache(one_tensor=False)  # as mlx-vlm caches: bit for bit the same arithmetic
    assert np.array_equal(np.array(ours(IDS, cache=two_tensor)), np.array(theirs(IDS).logits))


def test_cli_and_convert_q(quant_source, tmp_path):
    a = run("mlx_gemma.quantize", "--model", str(quant_source), "--out", str(tmp_path / "a"), "--bits", "8",
            "--group-size", "32")
    assert a.returncode == 0, a.stderr
    b = run("mlx_gemma.convert", "--hf-path", str(quant_source), "--mlx-path", str(tmp_path / "b"), "-q",
            "--bits", "8", "--group-size", "32")
    assert b.returncode == 0, b.stderr
    for d in ("a", "b"):
        entry = json.loads((tmp_path / d / "config.json").read_text())["quantization"]
        assert (entry["bits"], entry["group_size"]) == (8, 32)
    assert load_weights(tmp_path / "a").keys() == load_weights(tmp_path / "b").keys()


@pytest.mark.parametrize("args, message", [
    (["--mode", "mxfp4", "--group-size", "64"],
     "error: --mode mxfp4 needs --bits 4 --group-size 32 (got 4 and 64); affine takes bits (4, 8) "
     "with group sizes (32, 64, 128)"),
])
def test_invalid_combination_lists_valid_ones(quant_source, tmp_path, args, message):
    r = run("mlx_gemma.quantize", "--model", str(quant_source), "--out", str(tmp_path / "x"), *args)
    assert r.returncode == 1 and r.stderr.strip() == message
    assert not (tmp_path / "x").exists()


def test_group_size_that_does_not_divide_names_the_layer(hf_checkpoint, tmp_path):
    r = run("mlx_gemma.quantize", "--model", str(hf_checkpoint), "--out", str(tmp_path / "x"),
            "--group-size", "128")
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: --group-size 128: does not divide the input size 64 of "
                                "embed_vision.embedding_projection")


@pytest.mark.parametrize("where, error", [
    ("pathlib.Path.mkdir", OSError(30, "Read-only file system")),  # making the temporary folder
    ("mlx.core.save_safetensors", OSError(28, "No space left on device")),
], ids=["read-only", "disk-full"])
def test_unwritable_destination_is_a_clear_error(quant_source, tmp_path, monkeypatch, where, error):
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def fail(*a, **k):
        if where == "pathlib.Path.mkdir" and not str(a[0]).endswith(".tmp"):
            return real_mkdir(*a, **k)
        raise error

    monkeypatch.setattr(where, fail)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'out'}: cannot write \\({error.strerror}\\)"):
        quantize_checkpoint(str(quant_source), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_quantize_leaves_nothing(quant_source, tmp_path, monkeypatch):
    import mlx_gemma.checkpoint as qmod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qmod, "quantize", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(str(quant_source), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_generate_quantizes_a_checkpoint_that_does_not_fit_once(quant_source, tmp_path):
    env = dict(os.environ, MLX_GEMMA_CACHE=str(tmp_path / "cache"))
    args = ("--model", str(quant_source), "--prompt", "hi", "--max-tokens", "2", "--memory-limit", "8MB")
    first = run("mlx_gemma.generate", *args, env=env)
    assert first.returncode == 0, first.stderr
    assert re.search(r"needs [\d.]+ MB unquantized, budget 8.0 MB; quantizing to 4-bit once into", first.stderr)
    copies = list((tmp_path / "cache").iterdir())
    assert len(copies) == 1 and json.loads((copies[0] / "config.json").read_text())["quantization"]["bits"] == 4
    second = run("mlx_gemma.generate", *args, env=env)
    assert second.returncode == 0 and f"Using the 4-bit copy of {quant_source} in {copies[0]}" in second.stderr
    off = run("mlx_gemma.generate", *args, "--no-quantize", env=env)
    assert off.returncode == 1 and off.stderr.startswith("error: needs ")  # does not fit unquantized
    fits = run("mlx_gemma.generate", *args[:-1], "1GB", env=env)
    assert fits.returncode == 0 and "4-bit" not in fits.stderr


def test_backend_choices_keep_the_logits(quantized):
    """Float32 activations with the scales as stored, and matmuls split over CPU streams: the
    split runs the same kernel on blocks of rows, so the logits are bit-identical."""
    from mlx_gemma.backend import SplitQuantizedEmbedding, activation_dtype
    from mlx_gemma.loading import load_model

    assert activation_dtype(True, "auto") == (mx.float32 if mx.default_device() == mx.cpu else None)
    assert activation_dtype(False, "auto") is None and activation_dtype(True, "bfloat16") == mx.bfloat16
    stored = load_weights(quantized)["language_model.model.embed_tokens.scales"].dtype
    whole = load_model(quantized, dtype=mx.float32, split=1)
    split = load_model(quantized, dtype=mx.float32, split=2)
    head = split.language_model.model.embed_tokens
    assert isinstance(head, SplitQuantizedEmbedding) and head.scales.dtype == stored
    assert split.language_model.model.norm.weight.dtype == mx.float32
    assert np.array_equal(np.array(whole(IDS)), np.array(split(IDS)))


def test_mxfp4_picks_its_group_size(quant_source, tmp_path):
    r = run("mlx_gemma.quantize", "--model", str(quant_source), "--out", str(tmp_path / "m"), "--mode", "mxfp4")
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert (entry["bits"], entry["group_size"], entry["mode"]) == (4, 32, "mxfp4")
    assert QuantSpec(mode="mxfp4").group_size == 32 and QuantSpec().group_size == 64


def test_mxfp4_small_serves_image_and_audio_prompts(quant_source, tmp_path):
    """The multimodal projectors cast their input to their scales' dtype, uint8 under mxfp4:
    every image or audio prompt used to fail in quantized_matmul. They are stored affine."""
    import media_files as mf
    from PIL import Image

    from mlx_gemma.generation import generate, prompt_to_inputs

    out = quantize_checkpoint(str(quant_source), str(tmp_path / "m"), mode="mxfp4", recipe="small")
    model, processor = load(out)
    stored = {p: (m.mode, m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "bits")}
    projectors = {"embed_vision.embedding_projection", "embed_audio.embedding_projection"}
    assert {p for p, s in stored.items() if s != ("mxfp4", 4, 32)} == projectors
    assert {stored[p] for p in projectors} == {("affine", 4, 32)}
    Image.fromarray(mf.noise_image(64, 96)).save(tmp_path / "a.png")
    wav = mf.write_wav(tmp_path / "a.wav", 16000, 0.5)
    inputs = prompt_to_inputs(processor, "describe", image=[str(tmp_path / "a.png")], audio=[str(wav)])
    assert inputs.token_counts()["image"] > 0 and inputs.token_counts()["audio"] > 0
    generate(model, processor, inputs, max_tokens=2, temp=0.0)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_pull_cache_is_keyed_by_the_checkpoint_not_the_text(quant_source, smooth_checkpoint, tmp_path,
                                                            monkeypatch):
    from mlx_gemma.checkpoint import quantized_copy

    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    for where, src in (("a", quant_source), ("b", smooth_checkpoint)):  # two checkpoints, both "./ckpt"
        (tmp_path / where).mkdir()
        copy_checkpoint(src, tmp_path / where / "ckpt")
    monkeypatch.chdir(tmp_path / "a")
    a = quantized_copy("ckpt", Path("ckpt"), "test")
    monkeypatch.chdir(tmp_path / "b")
    b = quantized_copy("ckpt", Path("ckpt"), "test")
    assert a != b and a.name.startswith("ckpt-") and b.name.startswith("ckpt-")
    name = "language_model.model.layers.0.mlp.down_proj.scales"
    for copy, src in ((a, quant_source), (b, smooth_checkpoint)):  # each copy is of its own checkpoint
        assert mx.array_equal(load_weights(copy)[name], quantize(load_weights(src)[name[:-6] + "weight"],
                                                                 QuantSpec())["scales"]).item()
    # the same checkpoint, however it is named, is one copy, reused
    made = (a / "config.json").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert quantized_copy("a/ckpt", Path("a/ckpt"), "test") == a
    assert (a / "config.json").stat().st_mtime_ns == made
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # the checkpoint changed in place (its weights file rewritten): a new copy
    shard = tmp_path / "a" / "ckpt" / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    changed = quantized_copy("a/ckpt", Path("a/ckpt"), "test")
    assert changed != a
    # a fixed chat template travels with the copy: a new copy, carrying the new template
    template = tmp_path / "a" / "ckpt" / "chat_template.jinja"
    template.write_text(template.read_text() + "\n")
    fixed = quantized_copy("a/ckpt", Path("a/ckpt"), "test")
    assert fixed != changed and (fixed / "chat_template.jinja").read_text() == template.read_text()


def test_pull_estimate_is_the_size_of_the_copy(quant_source, quantized):
    from mlx_gemma.checkpoint import pull_estimate
    from mlx_gemma.config import ModelConfig
    from mlx_gemma.memory import activation_dtype_bytes, weight_bytes

    config = ModelConfig.from_file(quant_source / "config.json")
    q_config, size = pull_estimate(config, activation_dtype_bytes(quant_source))
    assert size == weight_bytes(quantized)  # the module fixture is the default 4-bit policy
    assert q_config.quantization == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_plan_plans_the_copy_a_run_would_make_and_makes_none(quant_source, quantized, tmp_path):
    from mlx_gemma.memory import human, weight_bytes

    env = dict(os.environ, MLX_GEMMA_CACHE=str(tmp_path / "cache"))
    args = ("--model", str(quant_source), "--prompt", "hi", "--max-tokens", "2", "--plan")
    fits = run("mlx_gemma.generate", *args, "--memory-limit", "8MB", env=env)
    assert fits.returncode == 0, fits.stderr
    assert re.fullmatch(rf"{re.escape(str(quant_source))}: needs [\d.]+ MB unquantized, budget 8.0 MB; a run quantizes "
                        r"it to 4-bit first, planned here from its config \(--no-quantize plans it as it is\)\n",
                        fits.stderr)
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", fits.stdout, re.M))
    assert rows["fits"] == "yes" and rows["weights"] == human(weight_bytes(quantized))  # the estimate is the copy
    as_is = run("mlx_gemma.generate", *args, "--memory-limit", "8MB", "--no-quantize", env=env)
    assert as_is.returncode == 1 and "| fits | no |" in as_is.stdout and as_is.stderr.startswith("error: ")
    assert not (tmp_path / "cache").exists()


def test_generate_refuses_a_copy_that_would_not_fit_before_making_it(quant_source, tmp_path):
    env = dict(os.environ, MLX_GEMMA_CACHE=str(tmp_path / "cache"))
    args = ("--model", str(quant_source), "--prompt", "hi", "--max-tokens", "2", "--memory-limit", "2MB")
    four_bit, as_is = (run("mlx_gemma.generate", *args, *extra, env=env) for extra in ((), ("--no-quantize",)))
    for r in (four_bit, as_is):
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    # the 4-bit weights (about 1.4 MB) would fit, their KV cache and activations not; unquantized,
    # the weights alone do not fit
    assert re.fullmatch(r"error: needs [\d.]+ MB, budget 2.0 MB: use a larger --memory-limit\n", four_bit.stderr)
    assert as_is.stderr.startswith("error: the weights alone need 8.0 MB, budget 2.0 MB")
    assert not (tmp_path / "cache").exists()  # refused before minutes were spent making the copy


# --- the MTP drafter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_drafter(drafter_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("qd") / "drafter-q"
    r = run("mlx_gemma.quantize", "--model", str(drafter_checkpoint), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_quantized_drafter_loads_and_stays_close(model, drafter_checkpoint, quantized_drafter):
    from mlx.utils import tree_flatten

    from drafting import draft_step
    from mlx_gemma.memory import drafter_bytes
    from mlx_gemma.speculative import load_drafter, rename

    entry = json.loads((quantized_drafter / "config.json").read_text())["quantization"]
    assert (entry["bits"], entry["group_size"], entry["mode"]) == (4, 64, "affine")
    source, drafter = (load_drafter(p, target=model) for p in (drafter_checkpoint, quantized_drafter))
    bits = {p: m.bits for p, m in drafter.named_modules() if hasattr(m, "bits")}
    assert bits and all(entry[p]["bits"] == b for p, b in bits.items())  # per-module overrides, mlx-lm style
    stored, original = load_weights(quantized_drafter, rename=rename), load_weights(drafter_checkpoint, rename=rename)
    ordering = stored["masked_embedding.token_ordering"]
    assert ordering.dtype == mx.int64 and mx.array_equal(ordering, original["masked_embedding.token_ordering"])
    (logits, h), (ref_logits, ref_h) = draft_step(drafter, model, IDS), draft_step(source, model, IDS)
    logits, ref_logits = np.array(logits), np.array(ref_logits)
    err = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    record_parity("default-recipe drafter vs unquantized, draft logits", err)
    assert err <= 0.05 and (logits.argmax(-1) == ref_logits.argmax(-1)).all()
    assert float(mx.linalg.norm(h - ref_h) / mx.linalg.norm(ref_h)) <= 0.05
    # what the memory plan counts: the bytes held (the int64 ordering at its stored size)
    held = sum(p.nbytes for _, p in tree_flatten(load_drafter(quantized_drafter, dtype=None).parameters()))
    assert drafter_bytes(quantized_drafter) == held + 4 * ordering.size


@pytest.mark.parametrize("recipe, bits_of", [
    ("small", lambda path: 4),
    ("default", lambda path: None if path == "masked_embedding.centroids" else 8),
    ("quality", lambda path: 8 if path == "model.embed_tokens" else None),
])
def test_drafter_recipes(drafter_checkpoint, recipe, bits_of):
    from mlx_gemma.quantization import plan
    from mlx_gemma.speculative import Drafter, read_config

    drafter = Drafter(read_config(drafter_checkpoint))
    paths = [p for p, m in drafter.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert "masked_embedding.centroids" in paths and "model.embed_tokens" in paths
    chosen = plan(drafter, QuantSpec(), recipe)
    assert {p: s.bits for p, s in chosen.items()} == {p: bits_of(p) for p in paths if bits_of(p)}
