"""Files -> arrays: images, video frames and audio as the model reads them (spec 4, 5).

Pure numpy, element for element what transformers' Gemma4Unified processors produce:
- an image is resized to its visual budget (70...1120 soft tokens), cut into 48x48 patches
  in row-major order, each flattened (y, x, c), with (x, y) grid positions, padded to the
  budget with zero patches at position (-1, -1);
- audio is mono float32 at 16 kHz, cut into 640-sample (40 ms) frames;
- a video is frames sampled from the file, each one an image at the video budget.

The model's limits (30 s of audio, 60 s of video) are errors unless the caller opts in.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError

BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_IMAGE_BUDGET = 280
DEFAULT_VIDEO_BUDGET = 70  # the model's own video demo, and transformers' video default
PATCH = 48  # 16-px patches merged 3x3 (spec 4.1)
SAMPLE_RATE = 16_000
FRAME_SAMPLES = 640  # 40 ms per audio soft token
AUDIO_LIMIT_S = 30.0  # 750 tokens: what the model was trained on
VIDEO_LIMIT_S = 60.0
VIDEO_FPS = 1.0  # the model card's contract: 1 frame per second
# FFmpeg demuxers of single-file video containers; not those (concat, hls, image2, ...) that read
# other files a video names.
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpeg", "mpegts", "ogg", "flv", "asf",
                    "gif", "h264", "hevc", "m4v", "mjpeg"}
UNKNOWN_VIDEO_FPS = 24.0  # what transformers assumes when a file does not say
# soxr's "very high quality" (flat to 0.91 of Nyquist, > 170 dB stop band): 30 s of audio
# resamples in milliseconds, so nothing is gained by a cheaper setting.
RESAMPLE_QUALITY = "VHQ"

ImageSource = Union[str, Path, np.ndarray]  # or a PIL image
AudioSource = Union[str, Path, tuple]  # a file, or (samples, sample_rate)


@dataclass
class VisionInput:
    """One image, or every frame of one video, as the vision embedder reads it."""

    pixel_values: np.ndarray  # [frames, budget, 48*48*3] float32 in [0, 1]
    position_ids: np.ndarray  # [frames, budget, 2] int32 (x, y); padding rows (-1, -1)
    tokens_per_frame: int

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_frame * len(self.pixel_values)

    def __len__(self) -> int:
        return len(self.pixel_values)

    @property
    def budget(self) -> int:
        return self.pixel_values.shape[1]

    def patches(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and positions of frames first..last-1 (what `FrameStream` decodes on demand)."""
        return self.pixel_values[first:last], self.position_ids[first:last]


class FrameStream:
    """The sampled frames of a video file, decoded and patchified only when asked for
    (`patches`), in order, a prefill chunk's worth at a time: a long video (--allow-long-media)
    never holds all its frames or pixel arrays. `pixel_values` / `position_ids` decode them all
    (what needs transformers' processor arrays, e.g. fine-tuning)."""

    def __init__(self, source, wanted: np.ndarray, budget: int, height: int, width: int):
        self.source, self.wanted, self.budget = source, wanted, budget
        h, w = target_size(height, width, budget)
        self.tokens_per_frame = (h // PATCH) * (w // PATCH)
        self._decoded = None  # [container, enumerate(its frames), index of the next frame]

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_frame * len(self.wanted)

    def __len__(self) -> int:
        return len(self.wanted)

    def _frames(self, first: int):
        import av

        if self._decoded is None or self._decoded[2] > self.wanted[first]:  # (re)start from the top
            self.close()
            container = av.open(str(self.source))
            self._decoded = [container, enumerate(container.decode(video=0)), 0]
        return self._decoded

    def patches(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        import av

        pixels, positions = [], []
        try:
            decoded = self._frames(first)
            for want in self.wanted[first:last]:
                for i, frame in decoded[1]:
                    decoded[2] = i + 1
                    if i == want:
                        p, q, _ = _frame_patches(frame.to_ndarray(format="rgb24"), self.budget, self.source)
                        pixels.append(p)
                        positions.append(q)
                        break
                else:
                    raise InputError(f"{self.source}: frame {want} could not be decoded (the stream ended)")
        except (av.error.FFmpegError, OSError) as e:  # e.g. the file is gone since it was loaded
            self.close()
            raise InputError(f"{self.source}: cannot decode video ({e})") from None
        return np.concatenate(pixels), np.concatenate(positions)

    @property
    def pixel_values(self) -> np.ndarray:
        return self.patches(0, len(self))[0]

    @property
    def position_ids(self) -> np.ndarray:
        return self.patches(0, len(self))[1]

    def close(self) -> None:
        if self._decoded is not None:
            self._decoded[0].close()
            self._decoded = None


@dataclass
class Video:
    frames: Union[VisionInput, FrameStream]
    timestamps: list  # seconds of each sampled frame in the file
    audio: Optional[np.ndarray] = None  # the sound track, 16 kHz mono, when asked for


def check_budget(budget: int, flag: str = "--image-budget") -> int:
    if isinstance(budget, bool) or budget not in BUDGETS:
        raise InputError(f"{flag} {budget!r}: not a visual budget; use one of {', '.join(map(str, BUDGETS))}")
    return int(budget)


def check_sampling_rate(fps: Optional[float], num_frames: Optional[int]) -> None:
    """Video frame sampling: `fps` frames per second, or `num_frames` spread over the clip."""
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer))
                                   or num_frames < 1):
        raise InputError(f"--video-frames {num_frames!r}: must be a whole number of at least 1")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float, np.number))
                            or not math.isfinite(fps) or fps <= 0):
        raise InputError(f"--fps {fps!r}: must be a number of frames per second above 0")


def _warn_long(source, seconds: float, limit: float, what: str) -> None:
    print(f"warning: {source}: {seconds:.1f} s of {what} is beyond the {limit:.0f} s the model was "
          f"trained on; the result may degrade", file=sys.stderr)


def _check_length(source, seconds: float, limit: float, what: str, allow_long: bool) -> None:
    if seconds <= limit:
        return
    if not allow_long:
        raise InputError(f"{source}: {seconds:.1f} s of {what}, over the model's {limit:.0f} s limit "
                         f"(pass --allow-long-media to use it anyway)")
    _warn_long(source, seconds, limit, what)


# --- images ---------------------------------------------------------------------------------

def target_size(height: int, width: int, budget: int, patch: int = PATCH) -> tuple[int, int]:
    """The largest size of the same aspect ratio, in whole patches, within `budget` patches.
    Small images are upscaled too (transformers' get_aspect_ratio_preserving_size)."""
    factor = math.sqrt(budget * patch * patch / (height * width))
    h = int(math.floor(factor * height / patch)) * patch
    w = int(math.floor(factor * width / patch)) * patch
    if h == 0:
        h, w = patch, min(int(math.floor(width / height)) * patch, budget * patch)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * patch, budget * patch), patch
    return h, w


def _cubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Keys' cubic as Pillow and torch's antialiased bicubic use it
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _taps(n_in: int, n_out: int):
    """Input indices, int16 fixed-point weights and their precision for each output pixel.

    This is torch's uint8 antialiased bicubic (a port of Pillow-SIMD), which transformers'
    processor runs: the filter widens by the scale when shrinking, weights are normalised in
    float64 and rounded to int16 with the most bits the largest weight allows.
    """
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    invscale = 1.0 / scale if scale >= 1 else 1.0
    ksize = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - first, 0, ksize)
    j = np.arange(ksize)
    w = _cubic((j[None] + first[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(j[None] < count[:, None], w, 0.0)
    total = w.sum(1, keepdims=True)
    w = w / np.where(total != 0, total, 1.0)
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = w * (1 << precision)
    fixed = np.where(fixed < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5)).astype(np.int32)
    return np.minimum(first[:, None] + j[None], n_in - 1), fixed, precision


def _resample_axis(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    index, weight, precision = _taps(img.shape[axis], n_out)
    src = np.moveaxis(img, axis, 0).astype(np.int32)
    acc = np.full((n_out,) + src.shape[1:], 1 << (precision - 1), np.int32)
    per_row = (slice(None),) + (None,) * (src.ndim - 1)
    for k in range(index.shape[1]):
        acc += src[index[:, k]] * weight[:, k][per_row]
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a uint8 HWC image; bit-exact with transformers' processor
    (horizontal pass, then vertical, each rounded to uint8)."""
    if img.shape[1] != width:
        img = _resample_axis(img, width, 1)
    if img.shape[0] != height:
        img = _resample_axis(img, height, 0)
    return img


def patchify(img: np.ndarray, budget: int, patch: int = PATCH) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 HWC image (sides multiples of `patch`) -> (patches [budget, patch*patch*3] in [0, 1],
    (x, y) positions [budget, 2], number of real patches)."""
    rows, cols = img.shape[0] // patch, img.shape[1] // patch
    n = rows * cols
    tiles = img.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    pixels = np.zeros((budget, patch * patch * 3), np.float32)
    pixels[:n] = tiles.astype(np.float32) / np.float32(255)
    positions = np.full((budget, 2), -1, np.int32)
    y, x = np.divmod(np.arange(n), cols)
    positions[:n, 0], positions[:n, 1] = x, y
    return pixels, positions, n


def check_file(path) -> None:
    """A medium's path names a file (a folder is said to be one, not missing)."""
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")


def open_image(source: ImageSource) -> np.ndarray:
    """A path, PIL image or uint8 HWC array -> uint8 RGB HWC array, EXIF orientation applied,
    transparency composited on white, other modes converted as transformers does."""
    from PIL import Image, ImageOps

    name = source if isinstance(source, (str, Path)) else "image"
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise InputError(f"image: expected a uint8 array of shape (H, W) or (H, W, C), got "
                             f"{source.dtype} {source.shape}")
        if 0 in source.shape[:2]:
            raise InputError(f"image: has no pixels ({source.shape[0]}x{source.shape[1]})")
        if source.ndim == 3 and source.shape[2] not in (1, 2, 3, 4):
            raise InputError(f"image: a uint8 array with {source.shape[2]} channels; give (H, W) gray, (H, W, 3) "
                             "RGB or (H, W, 4) RGBA, channels last")
        source = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    try:
        if isinstance(source, (str, Path)):
            check_file(source)
            image = Image.open(source)
        elif isinstance(source, Image.Image):
            image = source
        else:
            raise InputError(f"image: a {type(source).__name__} is not an image (give a path, a PIL image "
                             "or a uint8 array)")
        if image.width == 0 or image.height == 0:
            raise InputError(f"{name}: image has no pixels ({image.width}x{image.height})")
        image.load()
        image = ImageOps.exif_transpose(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: truncated or corrupt image ({e})") from None


def image_input(source: ImageSource, budget: int = DEFAULT_IMAGE_BUDGET) -> VisionInput:
    check_budget(budget)
    return VisionInput(*_frame_patches(open_image(source), budget, source))


def _check_shape(height: int, width: int, budget: int, source) -> None:
    # A grid of `budget` patches is at most budget:1; more elongated images are squeezed along
    # their long side (as transformers does). Beyond 2x squeezing the content is gone.
    if max(height, width) > 2 * budget * min(height, width):
        name = source if isinstance(source, (str, Path)) else "image"
        raise InputError(f"{name}: {width}x{height} pixels is too elongated for budget {budget} "
                         f"(aspect ratios up to {2 * budget}:1 are accepted)")


def _frame_patches(img: np.ndarray, budget: int, source) -> tuple[np.ndarray, np.ndarray, int]:
    height, width = img.shape[:2]
    _check_shape(height, width, budget, source)
    h, w = target_size(height, width, budget)
    pixels, positions, n = patchify(resize(img, h, w), budget)
    return pixels[None], positions[None], n


# --- audio ----------------------------------------------------------------------------------

def _audio_formats() -> str:
    import soundfile

    return ", ".join(sorted(soundfile.available_formats()))


def to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mix down to mono (channel mean) and resample to 16 kHz with soxr."""
    import soxr

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY).astype(np.float32)
    return samples


def _decode_audio(container, stream) -> Optional[np.ndarray]:
    """Every sample of an audio stream as float32 [samples, channels]; None when there are none."""
    import av

    to_float = av.AudioResampler(format="fltp")  # any sample format -> float planar, same rate
    chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
    chunks += [f.to_ndarray() for f in to_float.resample(None)]
    return np.concatenate(chunks, axis=1).T.astype(np.float32) if chunks else None


def _read_audio_av(source) -> tuple:
    """(samples [n, channels], rate) of a file's first audio stream with PyAV, (None, None) if it has none
    or FFmpeg cannot read it."""
    import av

    try:
        with av.open(str(source)) as container:
            if not container.streams.audio:
                return None, None
            stream = container.streams.audio[0]
            samples = _decode_audio(container, stream)
            return (np.zeros((0, 1), np.float32) if samples is None else samples), stream.rate
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError):
        return None, None


def read_sound(file, name, allow_long: bool = False) -> tuple[np.ndarray, int]:
    """(samples [n, channels] float32, rate) of a sound file soundfile reads (a path or a file
    object). Over the limit is refused before decoding it all: a few kilobytes of FLAC can hold
    hours of silence, gigabytes once decoded."""
    import soundfile

    with soundfile.SoundFile(file) as f:
        rate = f.samplerate
        limit = None if allow_long else int(AUDIO_LIMIT_S * rate) + 1
        if limit and f.frames > limit:
            _check_length(name, f.frames / rate, AUDIO_LIMIT_S, "audio", allow_long)
        samples = f.read(frames=limit or -1, dtype="float32", always_2d=True)
    if limit and len(samples) >= limit:  # a header that does not say (or understates) the length
        _check_length(name, len(samples) / rate, AUDIO_LIMIT_S, "audio", allow_long)
    return samples, rate


def load_audio(source: AudioSource, allow_long: bool = False) -> np.ndarray:
    """A sound file soundfile reads (WAV, FLAC, OGG, MP3, ...; others, such as AAC in .m4a, through
    PyAV) or (samples, rate) -> 16 kHz mono
    float32. Empty and all-silent audio are errors (the model would hear nothing)."""
    import soundfile

    if isinstance(source, tuple):
        if len(source) != 2:
            raise InputError(f"audio: expected (samples, sample_rate), got a tuple of {len(source)} items")
        name, (samples, rate) = "audio", source
        try:
            samples = np.asarray(samples)
        except ValueError:
            raise InputError("audio: samples must be a 1-D or 2-D array of numbers") from None
        if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
            samples = samples.T  # (channels, samples) as most libraries return it
    else:
        name = source
        check_file(source)
        try:
            samples, rate = read_sound(str(source), name, allow_long)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            # What libsndfile cannot open (AAC in .m4a / .mp4, ...) FFmpeg may: through PyAV.
            samples, rate = _read_audio_av(source)
            if samples is None:
                raise InputError(f"{name}: cannot read audio ({str(e).splitlines()[0]}); readable formats: "
                                 f"{_audio_formats()}, and M4A/AAC through FFmpeg") from None
    if samples.size == 0:
        raise InputError(f"{name}: the audio has no samples")
    if not np.issubdtype(samples.dtype, np.number) or samples.ndim not in (1, 2):
        raise InputError(f"{name}: samples must be a 1-D (mono) or 2-D (multichannel) array of numbers, "
                         f"got {samples.dtype} with shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise InputError(f"{name}: the audio holds NaN or infinite samples")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)) or not 0 < rate < 10_000_000 \
            or rate != int(rate):
        raise InputError(f"{name}: sample rate {rate!r} is not a whole number of Hz above 0")
    seconds = len(samples) / rate
    _check_length(name, seconds, AUDIO_LIMIT_S, "audio", allow_long)
    wave = to_16k_mono(samples, int(rate))
    if not np.any(wave):
        raise InputError(f"{name}: the audio is silent (every sample is 0)")
    return wave


def audio_frames(wave: np.ndarray) -> np.ndarray:
    """[samples] -> [frames, 640], the last frame zero-padded (and still a real token)."""
    pad = (-len(wave)) % FRAME_SAMPLES
    return np.pad(wave, (0, pad)).reshape(-1, FRAME_SAMPLES).astype(np.float32)


# --- video ----------------------------------------------------------------------------------

def sample_indices(total: int, video_fps: float, fps: Optional[float], num_frames: Optional[int]) -> np.ndarray:
    """transformers' rule: n = num_frames, or max(1, int(duration * fps)); frames i * total // n."""
    n = num_frames if num_frames is not None else max(1, int(total / video_fps * fps))
    n = min(n, total)  # transformers raises here; a short clip simply gives all its frames
    return np.arange(n, dtype=np.int64) * total // n


def load_video(source: Union[str, Path], budget: int = DEFAULT_VIDEO_BUDGET, fps: Optional[float] = VIDEO_FPS,
               num_frames: Optional[int] = None, with_audio: bool = False,
               allow_long: bool = False, streamed: bool = False) -> Video:
    """Decode with PyAV and sample frames at `fps` (or `num_frames` spread evenly), each one
    patchified at `budget`; with `with_audio`, the sound track as 16 kHz mono. `streamed`:
    the frames are decoded later, when read (`FrameStream`)."""
    import av

    check_budget(budget, "--video-budget")
    check_sampling_rate(fps, num_frames)
    check_file(source)
    try:
        with av.open(str(source)) as container:
            if container.format.name not in VIDEO_CONTAINERS:  # playlists and lists name other files
                raise InputError(f"{source}: a {container.format.name!r} file is not a video container "
                                 "mlx-gemma reads (MP4/MOV, MKV/WebM, AVI, MPEG, OGG, FLV, ASF, GIF)")
            if not container.streams.video:
                raise InputError(f"{source}: the file has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or _count_frames(container)
            video_fps = float(stream.average_rate) if stream.average_rate else UNKNOWN_VIDEO_FPS
            if total == 0:
                raise InputError(f"{source}: the video stream has no frames")
            _check_length(source, total / video_fps, VIDEO_LIMIT_S, "video", allow_long)
            wanted = sample_indices(total, video_fps, None if num_frames else fps, num_frames)
            if streamed:
                height, width = stream.codec_context.height, stream.codec_context.width
                if not height or not width:  # the header does not say: the first frame does
                    height, width = next(container.decode(video=0)).to_ndarray(format="rgb24").shape[:2]
                _check_shape(height, width, budget, source)
                audio = _sound_track(container, source, allow_long) if with_audio else None
                return Video(FrameStream(source, wanted, budget, height, width),
                             [float(i) / video_fps for i in wanted], audio)
            container.seek(0)
            frames = []
            keep = set(wanted.tolist())
            for i, frame in enumerate(container.decode(video=0)):
                if i > wanted[-1]:
                    break
                if i in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
            if not frames:
                raise InputError(f"{source}: no frame could be decoded")
            audio = _sound_track(container, source, allow_long) if with_audio else None
    except InputError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InputError(f"{source}: cannot decode video ({e})") from None
    pixels, positions, counts = zip(*(_frame_patches(f, budget, source) for f in frames))
    indices = wanted[:len(frames)]
    return Video(VisionInput(np.concatenate(pixels), np.concatenate(positions), counts[0]),
                 [float(i) / video_fps for i in indices], audio)


def _count_frames(container) -> int:
    container.seek(0)
    return sum(1 for _ in container.decode(video=0))


def _sound_track(container, source, allow_long: bool) -> np.ndarray:
    if not container.streams.audio:
        raise InputError(f"{source}: --video-audio asked for the sound track, but the file has none")
    container.seek(0)
    stream = container.streams.audio[0]
    samples = _decode_audio(container, stream)  # [samples, channels]
    if samples is None:
        raise InputError(f"{source}: the sound track has no samples")
    _check_length(f"{source} (sound track)", len(samples) / stream.rate, AUDIO_LIMIT_S, "audio", allow_long)
    return to_16k_mono(samples, stream.rate)


def timestamp(seconds: float) -> str:
    """transformers' MM:SS label of a video frame."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
