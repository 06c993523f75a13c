"""Long media (--allow-long-media): video frames decoded and embedded as prefill reads them
(media.FrameStream, generation.FrameRows), the same logits as the one-shot path, resident memory
that does not grow with the video, and the planner's account of media."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import media_files as mf
import reference
from mlx_gemma import media
from mlx_gemma.errors import InputError
from mlx_gemma.generation import stream_generate
from mlx_gemma.memory import Plan, refusal
from mlx_gemma.prompt import MediaOptions

REPO = Path(__file__).resolve().parent.parent
# The child's high-water resident set (VmHWM; ru_maxrss would include the pytest parent's).
CHILD = """import runpy, sys
sys.argv = ["mlx_gemma.generate"] + sys.argv[1:]
try:
    runpy.run_module("mlx_gemma.generate", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("VmHWM", hwm, file=sys.stderr)
"""


def video_prompt(path):
    return [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "what?"}]}]


def test_streamed_video_equals_one_shot_and_reads_each_frame_once(model, processor, tmp_path, monkeypatch):
    clip = mf.write_video(tmp_path / "clip.mp4", seconds=4, fps=5)
    reads = []
    real = media.FrameStream.patches
    monkeypatch.setattr(media.FrameStream, "patches", lambda self, a, b: (reads.append((a, b)), real(self, a, b))[1])
    runs = []
    for streamed in (False, True):
        options = MediaOptions(video_budget=70, allow_long=streamed)
        # 32-token chunks: every chunk holds at most one frame (a frame is never split)
        out = list(stream_generate(model, processor, video_prompt(clip), max_tokens=6, temp=0.0,
                                   prefill_step_size=32, media_options=options))
        runs.append(([r.token for r in out], np.stack([np.array(r.logprobs) for r in out])))
    assert runs[1][0] == runs[0][0]
    np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-5, rtol=0)
    assert sorted(reads) == [(i, i + 1) for i in range(4)]  # one frame at a time, each once


def test_a_video_gone_before_prefill_is_one_line(model, processor, tmp_path):
    clip = mf.write_video(tmp_path / "gone.mp4", seconds=2, fps=2)
    from mlx_gemma.generation import prompt_to_inputs

    inputs = prompt_to_inputs(processor, video_prompt(clip), media_options=MediaOptions(allow_long=True))
    clip.unlink()
    with pytest.raises(InputError, match=r"gone\.mp4: cannot decode video"):
        list(stream_generate(model, processor, inputs, max_tokens=1, temp=0.0))


def test_media_that_do_not_fit_are_refused_naming_them():
    plan = Plan(context=30_000, weights=10**9, sliding=10**6, global_per_token=160, global_total=5 * 10**6,
                activations=10**8, budget=12 * 10**8, media_tokens=21_000, media=3 * 10**8)
    assert not plan.fits
    message = refusal(plan, None, None)
    assert "of it the prompt's media" in message and "--allow-long-media" in message
    assert ("media tokens", "21,000") in plan.rows()


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """Two layers (one sliding, one global) and a 32K context: 5 minutes of video fit."""
    return reference.build_checkpoint(tmp_path_factory.mktemp("long") / "tiny-32k", max_position_embeddings=32768,
                                      num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])


def resident(checkpoint, clip) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-c", CHILD, "--model", str(checkpoint), "--video", str(clip),
                          "--allow-long-media", "--video-budget", "70", "--max-tokens", "1", "--temp", "0",
                          "--verbose"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stderr.split("VmHWM")[-1].split()[0]) * 1024, run.stderr


def test_five_minute_video_prefills_in_bounded_memory(long_checkpoint, tmp_path):
    """300 frames at budget 70 (18,900 soft tokens) hold what 20 frames do: one-shot, their
    pixel arrays alone would be 10x larger (300 x 70 patches x 6,920 bytes x 2 copies)."""
    short, _ = resident(long_checkpoint, mf.write_video(tmp_path / "20s.mp4", seconds=20, fps=1))
    long, log = resident(long_checkpoint, mf.write_video(tmp_path / "300s.mp4", seconds=300, fps=1))
    one_shot_pixels = 300 * 70 * (48 * 48 * 3 * 4 + 8) * 2
    assert "| media tokens | 18,900 |" in log  # the plan counts them (63 tokens per 96x128 frame)
    assert re.search(r"Prefill: (\d+)/\1 tokens", log)  # to the end, with progress
    assert long - short < 0.2 * one_shot_pixels, (short, long)
