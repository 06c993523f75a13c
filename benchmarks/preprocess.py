"""Media preprocessing time (issue: multimodal input): files -> the arrays the model reads.

    python -m benchmarks.preprocess [--repeats 3] [--out DIR]

Writes, then times (median of `--repeats`, after one warm-up):
- a 4000x3000 JPEG at the 1120-token budget (decode, EXIF, resize, patchify);
- 30 s of 44.1 kHz stereo audio (WAV read, mix-down, soxr resample to 16 kHz, framing);
- 60 s of 640x360 24 fps MPEG-4 video with an AAC sound track at 1 fps, 70 tokens a frame,
  sound track included (PyAV decode, sampling, resize, patchify, resample; the 60 s track is
  over the 30 s audio limit, so it runs with allow_long).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_gemma import media

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import media_files  # noqa: E402  (the tests' synthetic media writers)


def timed(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "photo.jpg"
        Image.fromarray(media_files.noise_image(3000, 4000)).save(image, quality=90)
        audio = tmp / "speech.wav"
        sweep = media_files.chirp(44100, 30.0)
        soundfile.write(str(audio), np.stack([sweep, 0.5 * sweep], 1), 44100)
        video = tmp / "clip.mp4"
        media_files.write_video(video, seconds=60.0, fps=24, size=(360, 640))
        results = {
            "image 4000x3000 JPEG, budget 1120": timed(lambda: media.image_input(image, 1120), args.repeats),
            "audio 30 s, 44.1 kHz stereo WAV": timed(lambda: media.audio_frames(media.load_audio(audio)),
                                                     args.repeats),
            "video 60 s 640x360 24 fps + sound track, 1 fps, budget 70": timed(
                lambda: media.load_video(video, 70, with_audio=True, allow_long=True), args.repeats),
        }
    meta = {"machine": platform.machine(), "system": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "numpy": np.__version__, "repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| medium | median | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median_s']:.3f} s | {v['min_s']:.3f} s | {v['max_s']:.3f} s |" for k, v in results.items()]
    table = "\n".join(lines)
    (args.out / "preprocess.md").write_text(f"{meta['system']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
