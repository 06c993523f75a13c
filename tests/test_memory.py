"""The 16 GB budget: compact global caches, KV quantization, the planner and its refusals."""

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import reference
from conftest import feed, ids_of, record_parity
from mlx_gemma.cache import GlobalCache, SlidingWindowCache
from mlx_gemma.config import ModelConfig
from mlx_gemma.errors import InputError
from mlx_gemma.loading import load_model
from mlx_gemma.memory import (DraftPlan, KVOptions, draft_plan, drafter_bytes, global_bytes_per_token, human,
                              layer_activation_bytes, longest_context, mac_budget, make_plan, prefill_chunk, refusal,
                              sliding_bytes, weight_bytes)

REPO = Path(__file__).resolve().parent.parent
W = reference.WINDOW


@pytest.mark.parametrize("kv", [KVOptions(one_tensor=False), KVOptions(one_tensor=True),
                                KVOptions(one_tensor=True, bits=8, group_size=32),
                                KVOptions(one_tensor=False, bits=4, group_size=32)],
                         ids=["two-tensor", "one-tensor", "one-tensor-8bit", "two-tensor-4bit"])
def test_cache_bytes_equal_the_planner_formula(model, kv):
    text = model.config.text_config
    cache = model.make_cache(one_tensor=kv.one_tensor, kv_bits=kv.bits, kv_group_size=kv.group_size,
                             sliding_slack=kv.sliding_slack)
    ids = ids_of(700)
    feed(model, cache, ids, 100)
    global_bytes = sum(c.nbytes for c in cache if not isinstance(c, SlidingWindowCache))
    allocated = -(-len(ids) // 256) * 256
    assert global_bytes == global_bytes_per_token(text, kv, 4) * allocated
    sliding = sum(c.nbytes for c in cache if isinstance(c, SlidingWindowCache))
    assert sliding <= sliding_bytes(text, kv, 4, 100)


def test_sliding_memory_stays_flat_as_context_grows(model):
    cache = model.make_cache()
    sizes = []
    for i in range(0, 2048, 64):
        model(mx.array([ids_of(64, i)]), cache=cache)
        mx.eval([c.state for c in cache])
        sizes.append(sum(c.nbytes for c in cache if isinstance(c, SlidingWindowCache)))
    assert max(sizes[10:]) == min(sizes[10:])  # after the window wrapped: no growth at all


@pytest.mark.parametrize("chunk", [1, 5, W + 3])
def test_one_tensor_cache_equals_two_tensor_cache(model, chunk):
    """Through prefill, decode and chunked prefill across the window boundary. Not bit-equal:
    the packed scores are (q * w_k) . N where the two-tensor ones are q . (N * w_k), summed in
    another order (float32 rounding)."""
    ids = ids_of(5 * W + 3)
    two = feed(model, model.make_cache(one_tensor=False), ids, chunk)
    one_cache = model.make_cache(one_tensor=True)
    one = feed(model, one_cache, ids, chunk)
    assert any(isinstance(c, GlobalCache) and c.one_tensor for c in one_cache)
    err = float(np.abs(one - two).max() / np.abs(two).max())
    record_parity("one-tensor vs two-tensor global cache logits (float32)", err)
    assert err <= 1e-5


@pytest.mark.parametrize("bits, tolerance", [(8, 5e-2), (4, 4e-1)])
def test_quantized_kv_error_is_bounded(smooth_checkpoint, bits, tolerance):
    """Logit error of a group-quantized global KV cache (one tensor) against the unquantized
    cache, at several context lengths, on trained-like weights."""
    m = load_model(smooth_checkpoint)
    for n in (64, 256, 1024):
        ids = ids_of(n, seed=n)
        ref = np.array(m(mx.array([ids]), cache=m.make_cache())[0, -16:])
        q = np.array(m(mx.array([ids]), cache=m.make_cache(one_tensor=True, kv_bits=bits))[0, -16:])
        err = float(np.abs(q - ref).max() / np.abs(ref).max())
        record_parity(f"{bits}-bit KV cache vs unquantized, {n} tokens (trained-like fixture)", err)
        assert err <= tolerance
        assert (q.argmax(-1) == ref.argmax(-1)).mean() >= (0.9 if bits == 8 else 0.5)


@pytest.mark.parametrize("opts", [dict(one_tensor=True), dict(one_tensor=True, kv_bits=8, kv_group_size=32),
                                  dict(one_tensor=False, kv_bits=4, kv_group_size=32, quantized_kv_start=40)],
                         ids=["one-tensor", "one-tensor-8bit", "two-tensor-4bit-late"])
def test_compact_caches_trim(model, opts):
    prefix, drafts, cont = ids_of(300, 1), ids_of(5, 2)[1:], ids_of(8, 3)[1:]
    cache = model.make_cache(sliding_slack=8, **opts)
    feed(model, cache, prefix, 16)
    feed(model, cache, drafts, 1)
    for c in cache:
        assert c.trim(len(drafts)) == len(drafts)
    got = feed(model, cache, cont, 1)
    fresh = model.make_cache(sliding_slack=8, **opts)
    feed(model, fresh, prefix, 16)
    want = feed(model, fresh, cont, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_quantized_cache_stays_quantized_after_trimming_below_the_start():
    cache = GlobalCache(one_tensor=True, bits=8, group_size=32, quantize_after=10)
    x = mx.random.normal((1, 1, 12, 64))
    cache.update_and_fetch_packed([x, x[..., :32]])
    assert cache.quantized
    cache.trim(6)
    out = cache.update_and_fetch_packed([x[:, :, :2], x[:, :, :2, :32]])
    assert cache.quantized and all(isinstance(o, tuple) and o[0].shape[2] == 8 for o in out)  # codes, as stored


def test_prefill_chunks_shrink_as_context_grows():
    text = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json").text_config
    chunks = [prefill_chunk(text, ctx, 512, 2) for ctx in (0, 8192, 65536, 262144)]
    assert chunks[0] == 512 and chunks == sorted(chunks, reverse=True) and chunks[-1] >= 16


@pytest.mark.parametrize("index, kv, low", [(0, KVOptions(), 0.9), (1, KVOptions(), 0.9),
                                            (1, KVOptions(one_tensor=False), 0.75), (1, KVOptions(bits=8), 0.75)],
                         ids=["sliding", "global-one-tensor", "global-two-tensor", "global-one-tensor-8bit"])
def test_a_prefill_chunk_through_a_layer_holds_what_the_planner_counts(index, kv, low):
    """The 12B's attention geometry (16 heads, head dims 512 / 256, kv heads 1 / 8, the window)
    at narrow widths, float32 on the CPU backend, a 128-token chunk past the window: the memory
    one layer holds beyond its input and the caches it was given (the grown cache included: the
    planner counts the one it replaces) is at most layer_activation_bytes, and close to it. The
    two-tensor and the quantized global layers hold 0.77-0.86x of it (the safe side; where the
    formula over-counts them is not found: not the query's copies alone). The least of three
    runs: MLX's peak moves by about 1 MB between identical runs."""
    from benchmarks.kv_memory import config, fill
    from mlx_gemma.model import Model

    # The last layer is always a global one (spec 1.1): sliding first.
    cfg = config(2, ["sliding_attention", "full_attention"], hidden_size=256, intermediate_size=1024, vocab_size=512)
    model = Model(cfg)
    model.set_dtype(mx.float32)
    text, context, chunk = cfg.text_config, 1280, 128
    x = mx.random.normal((1, chunk, text.hidden_size))
    mx.eval(x, model.parameters())
    runs = []
    for _ in range(3):
        cache = model.make_cache(one_tensor=kv.one_tensor, kv_bits=kv.bits, kv_group_size=kv.group_size)
        fill(cache, text.layers, context)
        mask = cache[index].make_mask(chunk)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(model.language_model.model.layers[index](x, mask, cache[index]), cache[index].state)
        runs.append(mx.get_peak_memory() - base)
        del cache, mask
    held = min(runs)
    planned = layer_activation_bytes(text, text.layers[index], kv, chunk, context, 4)
    assert text.layers[index].is_sliding == (index == 0)
    assert low * planned <= held <= 1.05 * planned, (held, planned)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_are_what_a_run_holds(tmp_path, dtype):
    """A 4-bit checkpoint stored in bfloat16 (the 12B's layout, narrowed): with float32
    activations the unquantized tensors (norms, the vision and audio projections) are cast up
    and the quantized matrices' scales stay bfloat16, as the planner's weights row counts."""
    from mlx.utils import tree_flatten

    from benchmarks.synthetic import build

    path = build(tmp_path / "stand-in", 1, hidden_size=128, intermediate_size=256, vocab_size=512)
    model = load_model(path, dtype=dtype)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert held == weight_bytes(path, getattr(mx, dtype).size)
    assert (held > weight_bytes(path)) == (dtype == "float32")


def test_12b_plan_holds_256k_on_a_16gb_mac():
    """4-bit weights, 8-bit one-tensor global KV, a 16 GB Mac's default GPU budget (11.45 GB)."""
    from mlx_gemma.quantization import QuantSpec, quantized_size

    cfg = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json")
    weights = int(quantized_size(cfg, QuantSpec(), "default")["total_bytes"])
    budget = mac_budget(16)
    assert human(budget) == "11.45 GB"
    assert make_plan(cfg, weights, 262_144, budget, KVOptions(one_tensor=True, bits=8)).fits
    assert not make_plan(cfg, weights, 262_144, budget, KVOptions(one_tensor=False)).fits


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma.generate", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_plan_output_parses(hf_checkpoint):
    r = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--plan", "--max-tokens", "100")
    assert r.returncode == 0, r.stderr
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", r.stdout, re.M))
    assert rows["fits"] == "yes" and rows["context (tokens)"].replace(",", "").isdigit()
    assert {"weights", "sliding-window KV (bounded)", "global KV per token", "total", "budget"} <= rows.keys()
    assert "Prompt:" not in r.stdout  # nothing ran


def test_plan_of_a_run_that_does_not_fit_exits_1(hf_checkpoint):
    r = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--plan", "--memory-limit", "1MB", "--no-quantize")
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", r.stdout, re.M))
    assert r.returncode == 1 and rows["fits"] == "no" and rows["budget"] == "1.0 MB"
    assert r.stderr.startswith("error: the weights alone need ") and r.stderr.count("\n") == 1


def test_plan_cli_shows_the_drafter(hf_checkpoint, drafter_checkpoint):
    from mlx_gemma.memory import drafter_bytes, parse_size

    r = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--plan", "--draft-model", str(drafter_checkpoint),
                "--num-draft-tokens", "5")
    assert r.returncode == 0, r.stderr
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", r.stdout, re.M))
    assert rows["draft activations"].endswith("(K = 5)")
    assert abs(parse_size(rows["drafter weights"].replace(" ", "")) - drafter_bytes(drafter_checkpoint)) <= 0.05e6
    plain = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--plan", "--draft-model", "none")
    assert "drafter" not in plain.stdout and plain.returncode == 0


def test_planner_refuses_before_loading_weights(hf_checkpoint, monkeypatch):
    import mlx_gemma.loading as loading
    from mlx_gemma.generate import build_parser, run

    def must_not_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "load_weights", must_not_load)
    need = weight_bytes(hf_checkpoint)
    args = build_parser().parse_args(["--model", str(hf_checkpoint), "--prompt", "hi", "--no-quantize",
                                      "--memory-limit", f"{need * 2}B"])
    with pytest.raises(InputError, match=r"^needs .* MB, budget .* MB: use "):
        run(args)
    ok = build_parser().parse_args(["--model", str(hf_checkpoint), "--prompt", "hi", "--max-tokens", "1"])
    with pytest.raises(AssertionError, match="weights were loaded"):  # accepted: it goes on to load
        run(ok)


@pytest.mark.parametrize("args, message", [
    (["--max-kv-size", "5"], r"error: --max-kv-size 5: smaller than the prompt \(\d+ tokens\)"),
    (["--kv-bits", "3"], r"error: --kv-bits: 3 is not supported \(valid: 4, 8\)"),
    (["--memory-limit", "1MB", "--no-quantize"],
     r"error: the weights alone need [\d.]+ MB, budget 1.0 MB: the memory limit must be at least [\d.]+ MB"),
])
def test_bad_memory_options(hf_checkpoint, args, message):
    r = run_cli("--model", str(hf_checkpoint), "--prompt", "hello there", *args)
    assert r.returncode == 1 and re.match(message, r.stderr.strip()), r.stderr
    assert "Traceback" not in r.stderr


def test_max_kv_size_caps_the_reply(hf_checkpoint, processor):
    n = len(processor.prompt_ids("hi"))
    r = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--max-kv-size", str(n + 3), "--max-tokens", "50",
                "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert int(re.search(r"Generation: (\d+) tokens", r.stdout).group(1)) <= 3


# --- the drafter in the plan -------------------------------------------------------------------


def test_drafter_bytes_are_what_load_drafter_holds(drafter_checkpoint):
    from mlx.utils import tree_flatten
    from mlx_gemma.speculative import load_drafter

    held = sum(p.nbytes for _, p in tree_flatten(load_drafter(drafter_checkpoint, dtype=None).parameters()))
    # the token ordering is stored as int64 and held as int32: counted at its stored size
    assert drafter_bytes(drafter_checkpoint) == held + 4 * reference.VOCAB


def test_plan_counts_the_drafter(drafter_checkpoint):
    cfg = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json")
    tiny = draft_plan(drafter_checkpoint)
    draft = DraftPlan(tiny.config, 400 * 10**6, 3)  # its config at a 12B drafter's size
    plain = make_plan(cfg, 6 * 10**9, 8192, 10**10, KVOptions())
    with_draft = make_plan(cfg, 6 * 10**9, 8192, 10**10, KVOptions(), draft=draft)
    rows = dict(with_draft.rows())
    assert rows["drafter weights"] == "0.40 GB" and rows["draft activations"].endswith("(K = 3)")
    assert "drafter weights" not in dict(plain.rows())
    assert with_draft.total == plain.total + draft.weights + with_draft.draft_activations
    # the verify block: (K + 1) rows of float32 logits over 262,144 tokens, and a few copies
    assert 4 * 262_144 * 4 < with_draft.draft_activations < 100 * 10**6
    more = make_plan(cfg, 6 * 10**9, 8192, 10**10, KVOptions(), draft=DraftPlan(tiny.config, draft.weights, 7))
    assert more.draft_activations - with_draft.draft_activations == 4 * (3 + 1) * 262_144 * 4


def test_drafter_shortens_the_context_and_the_refusal_says_so(drafter_checkpoint):
    cfg = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json")
    draft = DraftPlan(draft_plan(drafter_checkpoint).config, 400 * 10**6)
    kv, weights, budget = KVOptions(bits=8), 6 * 10**9, 10 * 10**9
    alone, drafted = (longest_context(cfg, weights, budget, kv, draft=d) for d in (None, draft))
    assert 0 < drafted < alone
    plan = make_plan(cfg, weights, alone, budget, kv, draft=draft)
    assert not plan.fits
    assert re.fullmatch(rf"needs [\d.]+ GB, budget 10.00 GB: use --kv-bits 4 or --max-kv-size {drafted} "
                        r"\(or drop --draft-model\)", refusal(plan, cfg, kv))
    heavy = make_plan(cfg, weights, 1000, budget, kv, draft=DraftPlan(draft.config, 5 * 10**9))
    assert refusal(heavy, cfg, kv).startswith("the weights alone need 11.00 GB (5.00 GB of them the drafter's), ")


def test_bad_number_of_draft_tokens(drafter_checkpoint):
    with pytest.raises(InputError, match=r"^--num-draft-tokens 0: must be a whole number, at least 1$"):
        draft_plan(drafter_checkpoint, 0)


def test_float32_activations_upcast_the_heads_scales_as_planned():
    """A 4-bit quantized matmul with float32 activations casts the matrix's bfloat16 scales and
    biases to float32 first: the transient the planner adds for the 12B's head on the CPU path
    (and not with bfloat16 activations, a Mac's)."""
    from mlx_gemma.memory import upcast_scales_bytes

    cfg = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json")
    cfg.quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    text = cfg.text_config
    text.vocab_size //= 8  # the 12B's head cut to 32,768 rows: the bfloat16 pass is ~8x slower on the CPU
    codes = mx.zeros((text.vocab_size, text.hidden_size // 8), mx.uint32)
    scales, biases = (mx.zeros((text.vocab_size, text.hidden_size // 64), mx.bfloat16) for _ in range(2))
    x = mx.ones((1, text.hidden_size))
    mx.eval(codes, scales, biases, x)
    for dtype in (mx.float32, mx.bfloat16):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.quantized_matmul(x.astype(dtype), codes, scales, biases, transpose=True, group_size=64, bits=4,
                                    stream=mx.cpu))  # the CPU backend's kernel, on any machine
        extra = mx.get_peak_memory() - base
        planned = upcast_scales_bytes(cfg, dtype.size)
        if dtype == mx.float32:
            assert abs(extra - planned) < 0.02 * planned, (extra, planned)
        else:
            assert planned == 0 and extra < 0.02 * upcast_scales_bytes(cfg, 4)
