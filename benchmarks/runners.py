"""One implementation, one process: load a checkpoint, time each case, report JSON.

    python -m benchmarks.runners IMPL CHECKPOINT DTYPE CASES_JSON OUT_JSON

Both implementations get the same token ids and the same preprocessed media arrays (mlx-gemma's
media.py builds them; its preprocessing time is reported beside), and run through their own
generation loop (`generate_step` of each), greedy, with their default prefill chunking and caches.

A case is [kind, value, tokens]: ["prefill", N, 1] (a fresh cache, N prompt tokens, time to the
first token), ["decode", C, T] (T tokens after a cache filled with C random keys/values: the cost
of a step does not depend on their values), ["image", budget, 1], ["audio", seconds, 1],
["video", seconds, 1] (time to the first token of a prompt holding that medium).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gemma import media
from mlx_gemma.backend import DTYPES
from mlx_gemma.config import ModelConfig
from mlx_gemma.prompt import PromptInputs, token_types

from .synthetic import fill_global

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import media_files  # noqa: E402  (the tests' synthetic media)

TEXT_IDS = (1000, 200_000)  # Gemma 4's ordinary vocabulary, clear of every special token


def text_ids(config: ModelConfig) -> np.ndarray:
    """Ids to draw text from: Gemma 4's ordinary range cut to the checkpoint's vocabulary (a
    small test vocabulary keeps its upper seven eighths), without the config's special ids."""
    vocab = config.text_config.vocab_size
    ids = np.arange(min(TEXT_IDS[0], vocab // 8), min(TEXT_IDS[1], vocab))
    special = [config.image_token_id, config.video_token_id, config.audio_token_id, config.boi_token_id,
               config.eoi_token_id, config.boa_token_id, config.eoa_token_index, config.text_config.bos_token_id]
    return ids[~np.isin(ids, special)]


class Implementation:
    name = ""

    def __init__(self, path: Path, dtype: str):
        self.config = ModelConfig.from_file(path / "config.json")

    def make_cache(self) -> list:
        raise NotImplementedError

    def steps(self, ids: list, cache: list, max_tokens: int, arrays: dict):
        raise NotImplementedError

    def fill(self, cache: list, context: int) -> None:
        """`context` random tokens in every cache (a sliding one keeps its window's worth)."""
        for spec, c in zip(self.config.text_config.layers, cache):
            n = min(context, spec.window) if spec.is_sliding else context
            if hasattr(c, "one_tensor"):  # an mlx-gemma global cache
                fill_global(c, spec, n, self.dtype)
            else:
                x = mx.random.normal((1, spec.num_kv_heads, n, spec.head_dim)).astype(self.dtype)
                c.update_and_fetch(x, x)
        mx.eval([c.state for c in cache])


class MlxGemma(Implementation):
    name = "mlx-gemma"
    compile = None  # decode compiled or not: the backend's default (backend.compiled_decode_pays)

    def __init__(self, path: Path, dtype: str):
        super().__init__(path, dtype)
        from mlx_gemma.loading import load_model

        self.model = load_model(path, dtype=dtype)
        self.dtype = self.model.language_model.model.norm.weight.dtype

    def make_cache(self):
        return self.model.make_cache()

    def steps(self, ids, cache, max_tokens, arrays):
        from mlx_gemma.generation import generate_step

        soft = self.model.embed_media(**arrays) if arrays else None
        return generate_step(self.model, ids, cache, max_tokens=max_tokens, soft_tokens=soft, compile=self.compile)


class MlxGemmaCompiled(MlxGemma):
    name, compile = "mlx-gemma:compiled", True


class MlxGemmaEager(MlxGemma):
    name, compile = "mlx-gemma:eager", False


class MlxVlm(Implementation):
    name = "mlx-vlm"

    def __init__(self, path: Path, dtype: str):
        super().__init__(path, dtype)
        from mlx_vlm.utils import load_model

        self.model = load_model(path)
        if dtype in DTYPES:
            self.model.set_dtype(DTYPES[dtype])  # how an mlx-vlm user changes it
        self.dtype = self.model.language_model.model.norm.weight.dtype

    def make_cache(self):
        return self.model.language_model.make_cache()

    def steps(self, ids, cache, max_tokens, arrays):
        from mlx_vlm.generate.ar import generate_step

        kwargs = {k: mx.array(v) for k, v in arrays.items()}
        if arrays:
            kwargs["mm_token_type_ids"] = mx.array(token_types(np.array(ids), self.config))[None]
        pixel_values = kwargs.pop("pixel_values", None)
        return generate_step(mx.array(ids)[None], self.model, pixel_values, None, prompt_cache=cache,
                             max_tokens=max_tokens, temperature=0.0, **kwargs)


IMPLEMENTATIONS = {c.name: c for c in (MlxGemma, MlxGemmaCompiled, MlxGemmaEager, MlxVlm)}


def prompt(config: ModelConfig, kind: str, value: int, seed: int = 0):
    """(ids, media arrays, preprocessing seconds) for a case."""
    rng = np.random.default_rng(seed)

    ordinary = text_ids(config)

    def text(n):
        return rng.choice(ordinary, n).tolist()

    bos = config.text_config.bos_token_id
    if kind in ("prefill", "decode"):
        return [bos] + text(value - 1), {}, 0.0
    tic = time.perf_counter()
    if kind == "image":
        image = media.image_input(media_files.noise_image(768, 1024, seed), value)
        inputs = PromptInputs([], images=[image])
        body = [config.boi_token_id] + [config.image_token_id] * image.num_tokens + [config.eoi_token_id]
    elif kind == "audio":
        wave = media.to_16k_mono(media_files.chirp(16000, value), 16000)
        inputs = PromptInputs([], audio=[wave])
        n = -(-len(wave) // media.FRAME_SAMPLES)
        body = [config.boa_token_id] + [config.audio_token_id] * n + [config.eoa_token_index]
    elif kind == "video":
        frames = [media.image_input(media_files.noise_image(360, 640, seed + i), media.DEFAULT_VIDEO_BUDGET)
                  for i in range(value)]  # 1 fps
        clip = media.VisionInput(np.concatenate([f.pixel_values for f in frames]),
                                 np.concatenate([f.position_ids for f in frames]), frames[0].tokens_per_frame)
        inputs = PromptInputs([], videos=[media.Video(clip, list(range(value)))])
        frame = [config.boi_token_id] + [config.video_token_id] * clip.tokens_per_frame + [config.eoi_token_id]
        body = [t for _ in range(value) for t in text(3) + frame]  # "MM:SS" before each frame
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    arrays = inputs.arrays()
    seconds = time.perf_counter() - tic
    return [bos] + text(8) + body + text(8), arrays, seconds


def time_case(impl: Implementation, kind: str, value: int, tokens: int, repeats: int) -> dict:
    ids, arrays, preprocess = prompt(impl.config, kind, value)
    if kind == "decode":
        ids = ids[-1:]
    runs, peaks = [], []
    for _ in range(repeats):
        cache = impl.make_cache()
        if kind == "decode":
            impl.fill(cache, value)
        mx.clear_cache()
        mx.reset_peak_memory()
        stamps = []
        tic = time.perf_counter()
        for _token, _ in impl.steps(ids, cache, tokens + (kind == "decode"), arrays):
            stamps.append(time.perf_counter())
        peaks.append(mx.get_peak_memory())
        # decode: the steps after the first (which feeds the one prompt token); else: the first token
        runs.append((stamps[-1] - stamps[0]) / tokens if kind == "decode" else stamps[0] - tic)
        del cache
    return {"kind": kind, "value": value, "tokens": tokens, "prompt_tokens": len(ids), "runs_s": runs,
            "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
            "peak_memory_bytes": max(peaks), "preprocess_s": preprocess}


def run(name: str, path: Path, dtype: str, cases: list, repeats: int, warmup: bool = True) -> dict:
    tic = time.perf_counter()
    impl = IMPLEMENTATIONS[name](path, dtype)
    mx.eval(impl.model.parameters())
    load_s = time.perf_counter() - tic
    tic = time.perf_counter()
    if warmup:  # compile kernels, size the allocator: a short prompt and one decode step
        for _ in impl.steps(prompt(impl.config, "prefill", 4)[0], impl.make_cache(), 2, {}):
            pass
    warmup_s = time.perf_counter() - tic
    results = []
    for kind, value, tokens in cases:
        print(f"  {name} ({impl.dtype}): {kind} {value}", file=sys.stderr, flush=True)
        results.append(time_case(impl, kind, value, tokens, repeats))
    return {"implementation": name, "activation_dtype": str(impl.dtype).removeprefix("mlx.core."),
            "load_s": load_s, "warmup_s": warmup_s, "cases": results}


def main(argv=None) -> None:
    name, path, dtype, cases, out = argv or sys.argv[1:]
    spec = json.loads(cases)
    result = run(name, Path(path), dtype, spec["cases"], spec["repeats"], spec.get("warmup", True))
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
