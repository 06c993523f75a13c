"""Media the tests feed both pipelines: images, sound files and videos written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def noise_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise: resampling errors show in both flat and busy regions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 128 // max(height - 1, 1))[..., None]
    noise = rng.integers(0, 96, (height, width, channels))
    return ((base + noise) % 256).astype(np.uint8)


def chirp(rate: int, seconds: float, f0: float = 100.0, f1: float = 6000.0) -> np.ndarray:
    """A linear sine sweep f0 -> f1, computed analytically at `rate`."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t * t))).astype(np.float64)


def write_wav(path: Path, rate: int, seconds: float, channels: int = 1) -> Path:
    import soundfile

    wave = chirp(rate, seconds)
    data = np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else wave
    soundfile.write(str(path), data, rate, subtype="FLOAT")
    return path


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, size=(96, 128), audio: bool = True,
                video: bool = True) -> Path:
    """An MPEG-4 file with moving gradients and, optionally, a 44.1 kHz AAC sweep."""
    import av

    height, width = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps) if video else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = out.add_stream("aac", rate=44100) if audio else None
        if aus is not None:
            aus.layout = "mono"
        for i in range(int(seconds * fps) if video else 0):
            frame = np.roll(noise_image(height, width, seed=i % 3), 7 * i, axis=1)
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        if vs is not None:
            for packet in vs.encode():
                out.mux(packet)
        if aus is not None:
            wave = chirp(44100, seconds).astype(np.float32)
            step = 1024
            for start in range(0, len(wave), step):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + step], format="fltp", layout="mono")
                frame.sample_rate = 44100
                frame.pts = start
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode():
                out.mux(packet)
    return path
