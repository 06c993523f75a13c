"""Build tiny random-weight `gemma4_unified` checkpoints with transformers itself.

The checkpoint has the 12B's structure at small sizes: 5:1 sliding/global layers ending in a
global layer, global head dim twice the sliding one, one global kv head, k_eq_v,
proportional partial RoPE, final softcap, and a sliding window small enough for test prompts
to cross it. Norm scales and layer scalars are drawn away from 1 so a wrong formula shows.
The tokenizer carries the real Gemma 4 special-token strings and a Gemma-style template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WINDOW = 16
VOCAB = 512
# Special tokens: real strings; <|turn>/<turn|> keep their real ids, the rest fit a small vocab.
SPECIALS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|think|>": 10, "<|channel>": 11, "<channel|>": 12,
    "<|image>": 13, "<image|>": 14, "<|image|>": 15, "<|video|>": 16,
    "<|audio>": 17, "<audio|>": 18, "<|audio|>": 19,
    "<|turn>": 105, "<turn|>": 106,
    "<|tool>": 20, "<tool|>": 21, "<|tool_call>": 22, "<tool_call|>": 23, "<|tool_response>": 24,
    "<tool_response|>": 25, '<|"|>': 26,
}
TOKEN_IDS = dict(boi_token_id=13, eoi_token_id=14, image_token_id=15, video_token_id=16,
                 boa_token_id=17, eoa_token_index=18, audio_token_id=19)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking or messages[0]['role'] == 'system' %}"
    "<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<turn|>\n"
    "{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'audio' %}<|audio|>"
    "{% elif item['type'] == 'video' %}<|video|>"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def text_config(**over) -> dict:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=WINDOW,
        final_logit_softcapping=30.0, max_position_embeddings=512, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1_000_000.0},
        },
    )
    cfg.update(over)
    return cfg


# The real 12B's widths (spec 1.1), for benchmarks that need them with few layers.
REAL_WIDTHS = dict(vocab_size=262_144, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=1,
                   sliding_window=1024, max_position_embeddings=262_144)


def make_config(**text_over):
    from transformers import Gemma4UnifiedConfig

    width = text_over.get("hidden_size", 64)
    return Gemma4UnifiedConfig(
        text_config=text_config(**text_over),
        vision_config=dict(mm_embed_dim=width, output_proj_dims=width,
                           mm_posemb_size=1120 if width >= 1024 else 64),  # 64 covers the test images' grids
        audio_config=dict(audio_embed_dim=640),
        **TOKEN_IDS,
    )


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    """Weights with enough spread that a wrong formula changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("q_norm" in name or "k_norm" in name):
            # Attention has no 1/sqrt(d): q/k norm scales set the score range, kept moderate
            # so float32 rounding does not flip near-tied attention (a chaotic fixture).
            p.copy_(0.35 + 0.7 * torch.rand(p.shape, generator=g))
        elif p.ndim == 1 and ("norm" in name or name.endswith("ln1.weight") or name.endswith("ln2.weight")):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))  # norm scales in [0.5, 1.5)
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))  # greedy decoding stays varied
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))


@torch.no_grad()
def trained_like(model, seed: int = 0) -> None:
    """Statistics of a trained model rather than a sharp test fixture: small weights
    (std 0.02, as transformers initialises them), norm scales around 1, layer scalars < 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.15 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(0.5 + 0.5 * torch.rand(b.shape, generator=g))


def make_tokenizer():
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    vocab = dict(SPECIALS)
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = 256 + i
    free = [i for i in range(VOCAB) if i not in vocab.values()]
    pieces = ["▁"] + [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?"] + \
             ["▁the", "▁a", "▁is", "▁of", "▁and", "\n"]
    for piece, i in zip(pieces, free):
        vocab[piece] = i
    for n, i in enumerate(free[len(pieces):]):  # no gaps: detokenizers index the whole vocab
        vocab[f"<unused{n}>"] = i
    tok = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens={
        "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
        "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    })
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIALS if t.startswith("<|") or
                                                          t.endswith("|>")]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_checkpoint(path: Path, seed: int = 0, dtype=torch.float32, stats=randomize, max_shard_size=None,
                     **text_over) -> Path:
    """Write a complete HF checkpoint directory (weights, config, tokenizer, generation config)."""
    from transformers import Gemma4UnifiedForConditionalGeneration, GenerationConfig

    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(make_config(**text_over)).eval()
    stats(model, seed)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=2, pad_token_id=0, eos_token_id=[1, 106], do_sample=True, temperature=1.0,
        top_k=64, top_p=0.95)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    make_processor().save_pretrained(path)
    return Path(path)


def make_processor(tokenizer=None):
    """transformers' Gemma4UnifiedProcessor (default image / video / audio settings) on the
    fixture tokenizer: what `save_pretrained` writes beside the weights, and the reference
    the media tests compare with."""
    from transformers import Gemma4UnifiedImageProcessor, Gemma4UnifiedProcessor, Gemma4UnifiedVideoProcessor
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)

    return Gemma4UnifiedProcessor(feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
                                  image_processor=Gemma4UnifiedImageProcessor(),
                                  tokenizer=tokenizer or make_tokenizer(),
                                  video_processor=Gemma4UnifiedVideoProcessor(), chat_template=CHAT_TEMPLATE)


def load_reference(path: Path, dtype=torch.float32):
    from transformers import Gemma4UnifiedForConditionalGeneration

    return Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def reference_logits(model, ids: list[int]):
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def hub_form_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def drafter_config(ordered: bool = False, backbone_hidden_size: int = 64, **text_over):
    """A tiny `gemma4_unified_assistant` config fitting `make_config()`'s target: the same head
    dims and vocabulary, backbone width = the target's hidden size (spec 8)."""
    from transformers import Gemma4UnifiedAssistantConfig

    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    over = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, layer_types=layer_types)
    over.update(text_over)
    with _assistant_layers():
        return Gemma4UnifiedAssistantConfig(text_config=text_config(**over), backbone_hidden_size=backbone_hidden_size,
                                            use_ordered_embeddings=ordered, num_centroids=16,
                                            centroid_intermediate_top_k=4)


class _assistant_layers:
    """transformers 5.23 cannot build the assistant's layers (spec 8: `kv_sharing_modes` raises
    when every layer is KV-shared). Inside this, every layer of a config is a "reuse" layer,
    which is what the assistant means; the modules and their math are transformers' own."""

    def __enter__(self):
        from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

        self.cls, self.saved = Gemma4UnifiedTextConfig, Gemma4UnifiedTextConfig.kv_sharing_modes
        self.cls.kv_sharing_modes = property(lambda c: ["reuse"] * c.num_hidden_layers)

    def __exit__(self, *exc):
        self.cls.kv_sharing_modes = self.saved


def build_drafter(path: Path, seed: int = 0, ordered: bool = False, stats=randomize, backbone_hidden_size: int = 64,
                  **text_over) -> Path:
    """Write a tiny drafter checkpoint with transformers (authentic names and config); the
    ordered head gets a random permutation as its token ordering."""
    from transformers import Gemma4UnifiedAssistantForCausalLM

    torch.manual_seed(seed)
    with _assistant_layers():
        model = Gemma4UnifiedAssistantForCausalLM(drafter_config(ordered, backbone_hidden_size, **text_over)).eval()
    stats(model, seed)
    if ordered:
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=g))
    model.save_pretrained(path)
    return Path(path)


def load_reference_drafter(path: Path):
    from transformers import Gemma4UnifiedAssistantForCausalLM

    with _assistant_layers():
        return Gemma4UnifiedAssistantForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
