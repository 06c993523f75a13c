"""Text side of a prompt: the checkpoint's tokenizer, chat template and generation defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import ModelConfig
from .errors import CheckpointError

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
        try:
            g = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        eos = g.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        sample = g.get("do_sample", True)
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

    def __init__(self, tokenizer: TokenizerWrapper, config: ModelConfig, defaults: GenerationDefaults):
        self.tokenizer = tokenizer
        self.config = config
        self.defaults = defaults
        vocab = tokenizer.get_vocab()
        for token, key in SPECIAL_TOKENS.items():
            if token in vocab and vocab[token] != getattr(config, key):
                raise CheckpointError(f"tokenizer: {token} has id {vocab[token]} but config.json says "
                                      f"{key} = {getattr(config, key)}")
        self.thought_start_id = vocab.get(THOUGHT_START)
        self.thought_end_id = vocab.get(THOUGHT_END)

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "Processor":
        defaults = GenerationDefaults.from_file(path / "generation_config.json")
        try:
            tokenizer = load_tokenizer(path, eos_token_ids=defaults.eos_token_ids or None)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
        return cls(tokenizer, config, defaults)

    @property
    def eos_token_ids(self) -> set:
        return set(self.tokenizer.eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 enable_thinking: bool = False) -> list[int]:
        """Token ids of a conversation rendered by the checkpoint's chat template."""
        if not self.has_chat_template:
            raise CheckpointError("tokenizer: the checkpoint has no chat template (use --no-chat-template)")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 enable_thinking=enable_thinking, tokenize=True)
        return list(ids)

    def prompt_ids(self, prompt: str, system: Optional[str] = None, chat_template: bool = True,
                   enable_thinking: bool = False) -> list[int]:
        if not chat_template:
            return self.encode(prompt)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return self.chat_ids(messages, enable_thinking=enable_thinking)
