"""What a request may read as media, and how large: data URLs always; local files and http(s)
URLs only when the server's flags allow them. Bytes in, the library's message items out."""

import base64
import binascii
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import MlxGemmaError
from .errors import ApiError, one_line

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DETAIL_BUDGETS = {"low": 70, "high": 1120}  # OpenAI's image detail, as Gemma's per-image token budget


class MediaPolicy:
    """Where media may come from (the server's flags), and how large or long they may be."""

    def __init__(self, allow_local: bool, allow_remote: bool, allow_long: bool, max_bytes: int,
                 max_pixels: int = 50_000_000):
        self.allow_local, self.allow_remote, self.allow_long = allow_local, allow_remote, allow_long
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def fetch(self, url: str, what: str, param: str) -> tuple[Optional[bytes], Optional[str]]:
        """(bytes, media type) of a data or http(s) URL, or (None, path) of a local file."""
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{what}: url must be a non-empty string", param=param)
        if url.startswith("data:"):
            head, comma, data = url.partition(",")
            if not comma or not head.endswith(";base64"):
                raise ApiError(400, f"{what}: a data URL must be base64 (data:TYPE;base64,...)", param=param)
            return decode_base64(data, f"{what}: the data URL", param), head[5:-7]
        if url.startswith(("http://", "https://")):
            if not self.allow_remote:
                raise ApiError(400, f"{what}: http(s) URLs are off (start the server with --allow-remote-media)",
                               param=param)
            return self._download(url, what, param), None
        if not self.allow_local:
            raise ApiError(400, f"{what}: local paths are off (give a data URL, or start the server with "
                                "--allow-local-media)", param=param)
        path = url[7:] if url.startswith("file://") else url
        if not Path(path).is_file():
            raise ApiError(400, f"{what}: {path[:200]}: no such file", param=param)
        return None, path

    def _download(self, url: str, what: str, param: str) -> bytes:
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                raw = r.read(self.max_bytes + 1)
        except Exception as e:
            raise ApiError(400, f"{what}: cannot fetch {url[:200]} ({one_line(e)[:200]})", param=param) from None
        if len(raw) > self.max_bytes:
            raise ApiError(413, f"{what}: {url[:200]} is over {self.max_bytes} bytes", param=param)
        return raw


def decode_base64(data, what: str, param: str) -> bytes:
    if not isinstance(data, str):
        raise ApiError(400, f"{what} must be a base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64", param=param) from None


def image_item(url: str, policy: MediaPolicy, what: str, param: str) -> dict:
    raw, path = policy.fetch(url, what, param)
    if raw is None:
        raw = Path(path).read_bytes()
    return image_bytes_item(raw, policy, what, param)


def image_bytes_item(raw: bytes, policy: MediaPolicy, what: str, param: str) -> dict:
    from PIL import Image

    from .. import media

    if not raw:
        raise ApiError(400, f"{what}: the image is empty (0 bytes)", param=param)
    try:  # the formats a browser shows: no Pillow plug-in that runs other programs (EPS) on a client's bytes
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Exception:
        raise ApiError(400, f"{what}: not an image Pillow can read", param=param) from None
    width, height = image.size  # read from the header: nothing is decoded yet
    if width * height > policy.max_pixels:
        raise ApiError(400, f"{what}: the image is {width}x{height} pixels, over the server's limit of "
                            f"{policy.max_pixels:,} (--max-image-pixels)", param=param)
    try:
        return {"type": "image", "image": media.open_image(image)}
    except MlxGemmaError as e:
        raise ApiError(400, one_line(e), param=param) from None


def audio_item(data, fmt, policy: MediaPolicy, what: str, param: str) -> dict:
    from .. import media

    if fmt not in AUDIO_FORMATS:
        raise ApiError(400, f"{what}: format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}", param=param)
    raw = decode_base64(data, f"{what}: data", param)
    if not raw:
        raise ApiError(400, f"{what}: the audio is empty (0 bytes)", param=param)
    try:
        samples, rate = media.read_sound(io.BytesIO(raw), what, policy.allow_long)
        return {"type": "audio", "audio": (media.load_audio((samples, rate), policy.allow_long), media.SAMPLE_RATE)}
    except MlxGemmaError as e:
        raise ApiError(400, one_line(e), param=param) from None
    except Exception as e:
        raise ApiError(400, f"{what}: cannot decode the {fmt} data ({one_line(e)[:200]})", param=param) from None


def video_item(url: str, policy: MediaPolicy, temp_files: list, what: str, param: str) -> dict:
    raw, path = policy.fetch(url, what, param)
    if raw is not None:
        if not raw:
            raise ApiError(400, f"{what}: the video is empty (0 bytes)", param=param)
        # In a folder of its own: a container that names other files (an ffconcat list, say) finds
        # nothing of the host's beside it.
        folder = tempfile.mkdtemp(prefix="mlx-gemma-video-")
        temp_files.append(folder)
        path = os.path.join(folder, "upload.mp4")
        with open(path, "wb") as f:
            f.write(raw)
    return {"type": "video", "video": path}


def detail_budget(detail: Optional[str], budgets: set) -> None:
    """Collect an image's `detail` ("auto": the request's budget) into `budgets`."""
    if detail in DETAIL_BUDGETS:
        budgets.add(DETAIL_BUDGETS[detail])


def one_budget(budgets: set, given: Optional[int], param: str) -> Optional[int]:
    """The request's image budget: the budget is per request, so its images must agree."""
    if given is not None:
        budgets = budgets | {given}
    if len(budgets) > 1:
        raise ApiError(400, f"{param}: images of one request must share one detail (got budgets "
                            f"{sorted(budgets)} tokens)", param=param)
    return next(iter(budgets), None)


def remove_files(paths: list) -> None:
    """The upload folders of a request (each holds one decoded medium)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
