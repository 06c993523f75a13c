"""A prompt as the model reads it: chat template, media placeholders expanded to the exact
token ids transformers' processor produces (spec 6), the media arrays behind them, and the
checkpoint's generation defaults."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from . import media
from .config import ModelConfig
from .errors import CheckpointError, InputError

# Special-token strings of the Gemma 4 vocabulary and the config key holding each one's id.
SPECIAL_TOKENS = {
    "<|image>": "boi_token_id",
    "<image|>": "eoi_token_id",
    "<|image|>": "image_token_id",
    "<|video|>": "video_token_id",
    "<|audio>": "boa_token_id",
    "<audio|>": "eoa_token_index",
    "<|audio|>": "audio_token_id",
}
THOUGHT_START, THOUGHT_END = "<|channel>", "<channel|>"
IMAGE, VIDEO, AUDIO = "<|image|>", "<|video|>", "<|audio|>"
BOI, EOI, BOA, EOA = "<|image>", "<image|>", "<|audio>", "<audio|>"
PLACEHOLDER = re.compile("(" + "|".join(map(re.escape, (IMAGE, VIDEO, AUDIO))) + ")")
# While the template renders, each control-token string in the caller's text (and this marker's
# own first character) stands as MARK + index + END: private-use characters no filter changes,
# so only the template's own strings become control tokens.
MARK, END = "\ue000", "\ue001"
# mm_token_type_ids: what each placeholder id is (everything else, boi/eoi/boa/eoa too, is 0).
TYPE_IMAGE, TYPE_VIDEO, TYPE_AUDIO = 1, 2, 3


def token_types(ids, config: ModelConfig) -> np.ndarray:
    """Per-token modality (0 text, 1 image, 2 video, 3 audio), as `mm_token_type_ids`."""
    ids = np.asarray(ids)
    types = np.zeros(ids.shape, np.int32)
    types[ids == config.image_token_id] = TYPE_IMAGE
    types[ids == config.video_token_id] = TYPE_VIDEO
    types[ids == config.audio_token_id] = TYPE_AUDIO
    return types


@dataclass
class MediaOptions:
    """How media become tokens; None budgets mean the checkpoint's processor defaults."""

    image_budget: Optional[int] = None
    video_budget: Optional[int] = None
    fps: float = media.VIDEO_FPS
    video_frames: Optional[int] = None  # transformers' rule: this many frames spread evenly
    video_audio: bool = False  # a video's sound track goes in as audio right after its frames
    allow_long: bool = False  # audio over 30 s / video over 60 s; videos decoded as prefill reads them

    def __post_init__(self):
        if self.image_budget is not None:
            media.check_budget(self.image_budget)
        if self.video_budget is not None:
            media.check_budget(self.video_budget, "--video-budget")
        media.check_sampling_rate(self.fps, self.video_frames)


def _many(media) -> list:
    """`image="a.png"` means one image, not one per character; None means none."""
    if media is None:
        return []
    return [media] if isinstance(media, (str, Path, np.ndarray)) or not isinstance(media, (list, tuple)) \
        else list(media)


def user_content(text: str, image=(), audio=(), video=()) -> list:
    """A user turn's content list: images, then audio, then video, then the text (the order
    the CLI uses)."""
    image, video = _many(image), _many(video)
    audio = [audio] if isinstance(audio, tuple) and len(audio) == 2 and not isinstance(audio[0], (str, Path)) \
        else _many(audio)
    items = [{"type": "image", "image": i} for i in image] + [{"type": "audio", "audio": a} for a in audio]
    items += [{"type": "video", "video": v} for v in video]
    return items + [{"type": "text", "text": text}]


ROLES = ("system", "user", "assistant", "tool")


def check_text(text: str, where: str) -> None:
    """Text the tokenizer can take: a lone surrogate ("\\ud800") is not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: not valid Unicode text (a lone surrogate U+{ord(text[e.start]):04X} at "
                         f"position {e.start})") from None


def check_messages(messages) -> None:
    """Chat messages as the template expects them: dicts with a known role and a string or a
    list of typed items as content."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("prompt: chat messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise InputError(f"prompt: message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"prompt: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"prompt: message {i} content is a {type(content).__name__}; give a string or a list "
                             "of items such as {'type': 'text', 'text': ...}")
        for j, item in enumerate(content, start=1):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise InputError(f"prompt: message {i} item {j} is not a dict with a 'type' "
                                 "('text', 'image', 'audio' or 'video')")


@dataclass
class PromptInputs:
    """Token ids with every placeholder expanded, and the media behind them, in prompt order."""

    ids: list
    images: list = field(default_factory=list)  # media.VisionInput per image
    videos: list = field(default_factory=list)  # media.Video per video
    audio: list = field(default_factory=list)  # 16 kHz waveform per audio (sound tracks included)
    preprocess_seconds: float = 0.0
    messages: Optional[list] = None  # the conversation with its media already loaded

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos or self.audio)

    def _sizes(self) -> dict:
        """Placeholder tokens of each medium, by kind, in prompt order."""
        return {"image": [i.num_tokens for i in self.images],
                "video": [v.frames.num_tokens for v in self.videos],
                "audio": [-(-len(a) // media.FRAME_SAMPLES) for a in self.audio]}

    def token_counts(self) -> dict:
        return {kind: sum(sizes) for kind, sizes in self._sizes().items()}

    def split_point(self, start: int, config: ModelConfig) -> int:
        """The latest position <= start that does not cut through a medium's placeholders."""
        ids = np.asarray(self.ids)
        for kind, sizes in self._sizes().items():
            where = np.flatnonzero(ids == getattr(config, f"{kind}_token_id"))
            before = int(np.searchsorted(where, start))
            ends = np.cumsum([0] + sizes)
            if before not in ends:  # medium k is cut: start at its first placeholder instead
                start = min(start, int(where[ends[np.searchsorted(ends, before) - 1]]))
        return start

    def tail(self, start: int, config: ModelConfig) -> "PromptInputs":
        """ids[start:] and the media whose placeholders lie there (`start` from split_point)."""
        ids = np.asarray(self.ids)
        done = {kind: int(np.sum(ids[:start] == getattr(config, f"{kind}_token_id")))
                for kind in ("image", "video", "audio")}
        skip = {kind: int(np.searchsorted(np.cumsum(sizes), done[kind], side="right"))
                for kind, sizes in self._sizes().items()}
        return PromptInputs(self.ids[start:], self.images[skip["image"]:], self.videos[skip["video"]:],
                            self.audio[skip["audio"]:], self.preprocess_seconds, self.messages)

    @property
    def streams_video(self) -> bool:
        """Whether a video's frames are decoded as prefill reads them (media.FrameStream)."""
        return any(isinstance(v.frames, media.FrameStream) for v in self.videos)

    def arrays(self, videos: bool = True) -> dict:
        """The media as transformers' processor returns them (numpy), by the same names;
        without the videos' frames when `videos` is False."""
        out = {}
        if self.images:
            out["pixel_values"] = np.concatenate([i.pixel_values for i in self.images])
            out["image_position_ids"] = np.concatenate([i.position_ids for i in self.images])
        if self.videos and videos:
            pixels, positions = zip(*(v.frames.patches(0, len(v.frames)) for v in self.videos))
            out["pixel_values_videos"] = np.concatenate(pixels)
            out["video_position_ids"] = np.concatenate(positions)
            out["num_frames_per_video"] = np.array([len(v.frames) for v in self.videos])
        if self.audio:
            frames = [media.audio_frames(a) for a in self.audio]
            longest = max(len(f) for f in frames)
            out["input_features"] = np.stack([np.pad(f, ((0, longest - len(f)), (0, 0))) for f in frames])
            out["input_features_mask"] = np.stack([np.arange(longest) < len(f) for f in frames])
        return out


@dataclass
class GenerationDefaults:
    """What generation_config.json says; the CLI flags override it."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    eos_token_ids: list = field(default_factory=list)
    suppress_tokens: list = field(default_factory=list)

    @classmethod
    def from_file(cls, path: Path) -> "GenerationDefaults":
        if not path.exists():
            return cls()
        g = _read_json(path)
        eos = g.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        sample = g.get("do_sample", False)  # absent means greedy, as in transformers
        return cls(
            temperature=float(g.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(g.get("top_k") or 0),
            top_p=float(g.get("top_p") or 1.0),
            min_p=float(g.get("min_p") or 0.0),
            eos_token_ids=eos,
            suppress_tokens=list(g.get("suppress_tokens") or []),
        )


class Processor:
    """Tokenizer (mlx-lm's wrapper, for streaming detokenization) + chat template + defaults."""

    def __init__(self, tokenizer: TokenizerWrapper, config: ModelConfig, defaults: GenerationDefaults,
                 image_budget: int = media.DEFAULT_IMAGE_BUDGET, video_budget: int = media.DEFAULT_VIDEO_BUDGET):
        self.tokenizer = tokenizer
        self.config = config
        self.defaults = defaults
        self.image_budget, self.video_budget = image_budget, video_budget
        vocab = tokenizer.get_vocab()
        for token, key in SPECIAL_TOKENS.items():
            if token in vocab and vocab[token] != getattr(config, key):
                raise CheckpointError(f"tokenizer: {token} has id {vocab[token]} but config.json says "
                                      f"{key} = {getattr(config, key)}")
        self.thought_start_id = vocab.get(THOUGHT_START)
        self.thought_end_id = vocab.get(THOUGHT_END)
        # The tokens transformers' split_special_tokens keeps out of text: the control tokens.
        self.control_ids = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        controls = [re.escape(t) for t in sorted(self.control_ids, key=len, reverse=True)]
        self._in_user_text = re.compile("|".join(controls + [MARK]))
        self._in_rendered = re.compile("|".join([f"{MARK}(\\d+){END}"] + controls))

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "Processor":
        defaults = GenerationDefaults.from_file(path / "generation_config.json")
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise CheckpointError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
        try:
            tokenizer = load_tokenizer(path, eos_token_ids=defaults.eos_token_ids or None)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
        budgets = _processor_budgets(path)
        try:
            return cls(tokenizer, config, defaults, *budgets)
        except CheckpointError as e:  # the tokenizer and config.json disagree
            raise CheckpointError(f"{path}: {e}") from None

    @property
    def eos_token_ids(self) -> set:
        return set(self.tokenizer.eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """`split_special_tokens`: control-token strings in `text` are plain text (transformers' option)."""
        check_text(text, "prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                     split_special_tokens=split_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 enable_thinking: bool = False, raw_prompt: bool = False) -> list[int]:
        """Token ids of a text-only conversation rendered by the checkpoint's chat template."""
        inputs = self.chat_inputs(messages, add_generation_prompt, enable_thinking, raw_prompt=raw_prompt)
        if inputs.has_media:
            raise InputError("prompt: the conversation has media; use chat_inputs() to get them too")
        return inputs.ids

    def chat_inputs(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool = False, options: Optional[MediaOptions] = None,
                    tools: Optional[list] = None, raw_prompt: bool = False) -> PromptInputs:
        """A conversation whose content lists may hold images, audio and video, in any order:
        `{"type": "image", "image": path | PIL image | array}`, `{"type": "audio", "audio":
        path | (samples, rate)}`, `{"type": "video", "video": path}`, `{"type": "text", ...}`.
        `tools` (OpenAI function schemas) go to the template, which declares them.
        Only the template writes control tokens: a `<turn|>` or `<|image|>` in the messages or the
        tools is tokenized as plain text (transformers' split_special_tokens) unless `raw_prompt`."""
        if not self.has_chat_template:
            raise CheckpointError("tokenizer: the checkpoint has no chat template (use --no-chat-template)")
        check_messages(messages)
        options = options or MediaOptions()
        tic = time.perf_counter()
        loaded, images, videos, audio = self._load_media(messages, options)
        literals = None if raw_prompt else []
        marked = [self._mark(m, f"prompt: message {i}", literals) for i, m in enumerate(loaded, start=1)]
        try:
            text = self.tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt,
                                                      enable_thinking=enable_thinking, tokenize=False,
                                                      **({"tools": self._mark(tools, "prompt: tools", literals)}
                                                         if tools else {}))
        except Exception as e:  # the template's own raise_exception(), or a jinja error
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"prompt: the chat template cannot render this conversation ({first})") from None
        ids = self._tokenize(self._expand(text, images, videos, audio), literals)
        return PromptInputs(ids, images, videos, audio, time.perf_counter() - tic, loaded)

    def _mark(self, value, where: str, literals: Optional[list]):
        """`value` (a message, the tools: the caller's JSON-like data, keys included) with every
        string checked and, unless `literals` is None, each control-token string in it replaced by
        a marker indexing `literals`. Media and other objects pass as they are."""
        if isinstance(value, str):
            check_text(value, where)
            if literals is None:
                return value

            def mark(m: re.Match) -> str:
                literals.append(m.group())
                return f"{MARK}{len(literals) - 1}{END}"

            return self._in_user_text.sub(mark, value)
        if isinstance(value, dict):
            return {self._mark(k, where, literals): self._mark(v, where, literals) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._mark(v, where, literals) for v in value)
        return value

    def _tokenize(self, text: str, literals: Optional[list]) -> list[int]:
        """Ids of a rendered conversation: control tokens where the template wrote them; each
        stretch between two of them tokenized whole, with the caller's control-token strings back
        in place of their markers as plain text. Without any, transformers' tokenization as is."""
        if not literals:
            return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote <bos>
        ids, stretch, start = [], [], 0
        for m in self._in_rendered.finditer(text):
            stretch.append(text[start:m.start()])
            start = m.end()
            if m.group(1) is not None:
                stretch.append(literals[int(m.group(1))])
                continue
            ids += self._plain_ids("".join(stretch)) + [self.control_ids[m.group()]]
            stretch = []
        return ids + self._plain_ids("".join(stretch) + text[start:])

    def _plain_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []

    def _load_media(self, messages: list[dict], options: MediaOptions):
        """Load every medium once; the returned messages hold the loaded media (so a chat can
        re-render its history without reading files again), a video's sound track as an
        audio item right after the video."""
        image_budget = self.image_budget if options.image_budget is None else options.image_budget
        video_budget = self.video_budget if options.video_budget is None else options.video_budget
        images, videos, audio, loaded = [], [], [], []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) or content is None:
                loaded.append(message)
                continue
            items = []
            for item in content:
                kind = item.get("type")
                if kind not in ("image", "audio", "video"):
                    items.append(item)
                    continue
                source = item.get(kind, item.get("path"))
                if source is None:
                    raise InputError(f"prompt: a {kind} item without its {kind!r} (or 'path') entry")
                if kind == "image":
                    image = source if isinstance(source, media.VisionInput) else media.image_input(source, image_budget)
                    images.append(image)
                    items.append({"type": "image", "image": image})
                elif kind == "audio":
                    wave = media.load_audio(source, options.allow_long)
                    audio.append(wave)
                    items.append({"type": "audio", "audio": (wave, media.SAMPLE_RATE)})
                else:
                    video = source if isinstance(source, media.Video) else media.load_video(
                        source, video_budget, options.fps, options.video_frames, options.video_audio,
                        options.allow_long, streamed=options.allow_long)
                    videos.append(video)
                    items.append({"type": "video", "video": media.Video(video.frames, video.timestamps)})
                    if video.audio is not None:
                        audio.append(video.audio)
                        items.append({"type": "audio", "audio": (video.audio, media.SAMPLE_RATE)})
            loaded.append({**message, "content": items})
        return loaded, images, videos, audio

    @staticmethod
    def _expand(text: str, images: list, videos: list, audio: list) -> str:
        """Each placeholder -> its tokens, exactly as transformers' processor writes them."""
        pieces = PLACEHOLDER.split(text)
        found = {p: pieces.count(p) for p in (IMAGE, VIDEO, AUDIO)}
        for token, given, what in ((IMAGE, images, "images"), (VIDEO, videos, "videos"), (AUDIO, audio, "audio clips")):
            if found[token] != len(given):
                raise InputError(f"prompt: the rendered conversation has {found[token]} {token} placeholders "
                                 f"but {len(given)} {what} were given")
        queues = {IMAGE: iter(images), VIDEO: iter(videos), AUDIO: iter(audio)}
        out = []
        for piece in pieces:
            if piece == IMAGE:
                out.append(BOI + IMAGE * next(queues[IMAGE]).tokens_per_frame + EOI)
            elif piece == VIDEO:
                video = next(queues[VIDEO])
                frame = BOI + VIDEO * video.frames.tokens_per_frame + EOI
                out.append(" ".join(f"{media.timestamp(t)} {frame}" for t in video.timestamps))
            elif piece == AUDIO:
                out.append(BOA + AUDIO * -(-len(next(queues[AUDIO])) // media.FRAME_SAMPLES) + EOA)
            else:
                out.append(piece)
        return "".join(out)

    def prompt_ids(self, prompt: str, system: Optional[str] = None, chat_template: bool = True,
                   enable_thinking: bool = False, raw_prompt: bool = False) -> list[int]:
        if not chat_template:
            return self.encode(prompt, split_special_tokens=not raw_prompt)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return self.chat_ids(messages, enable_thinking=enable_thinking, raw_prompt=raw_prompt)


def _processor_budgets(path: Path) -> tuple[int, int]:
    """Default image and video budgets from the checkpoint's processor config (either the
    nested processor_config.json or a flat preprocessor_config.json)."""
    image, video = {}, {}
    nested, flat = path / "processor_config.json", path / "preprocessor_config.json"
    if nested.exists():
        raw = _read_json(nested)
        image, video = raw.get("image_processor", {}), raw.get("video_processor", {})
    elif flat.exists():
        image = _read_json(flat)
    return (media.check_budget(image.get("max_soft_tokens", media.DEFAULT_IMAGE_BUDGET), "max_soft_tokens"),
            media.check_budget(video.get("max_soft_tokens", media.DEFAULT_VIDEO_BUDGET), "max_soft_tokens"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
