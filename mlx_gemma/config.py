"""The nested config.json of a `gemma4_unified` checkpoint, as dataclasses.

Per-layer geometry (layer type, head dim, kv heads, k_eq_v, RoPE) is computed once here,
in `TextConfig.layers`; nothing else in the package re-derives it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

MODEL_TYPE = "gemma4_unified"
SLIDING = "sliding_attention"
FULL = "full_attention"


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,)}


def _check_fields(obj) -> None:
    """Each value of the right JSON type; sizes and counts positive (a string or negative
    width would otherwise fail deep inside MLX, far from the config that caused it)."""
    for f in fields(obj):
        if not f.init:
            continue
        value, kind = getattr(obj, f.name), f.type.removeprefix("Optional[").removesuffix("]")
        if value is None and f.type.startswith("Optional["):
            continue
        allowed = _TYPES.get(kind)
        if allowed is None:
            continue
        wrong = not isinstance(value, allowed) or (kind in ("int", "float") and isinstance(value, bool))
        if not wrong and kind in ("int", "float"):
            may_be_zero = f.name.endswith(("_id", "_index")) or f.name == "num_kv_shared_layers"
            floor = 0 if may_be_zero else 1e-12
            wrong = not math.isfinite(value) or value < floor
        if wrong:
            raise ConfigError(f"config.json: {f.name} is {value!r}, expected "
                              f"{'a positive ' + kind if kind in ('int', 'float') else 'a ' + kind}")


def _pick(cls, d: dict) -> dict:
    """Keep only the keys that are fields of dataclass `cls`."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer type. `rotated_pairs` frequencies rotate; the rest pass through.

    Proportional RoPE keeps the exponent denominator at the full head dim, so only the
    first `rotated_pairs` of `head_dim // 2` frequency slots are non-zero (spec 2.5).
    """

    theta: float
    head_dim: int
    rotated_pairs: int

    @property
    def is_partial(self) -> bool:
        return self.rotated_pairs < self.head_dim // 2


def whole_groups(n: int, group_size: Optional[int]) -> int:
    """`n` rounded up to whole quantization groups (`group_size` None: unquantized, as is)."""
    return -(-n // group_size) * group_size if group_size else n


@dataclass(frozen=True)
class LayerSpec:
    index: int
    layer_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # keys and values come from one projection (no v_proj)
    rope: RopeSpec
    window: Optional[int]  # sliding window (query + window-1 past tokens); None for full

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def packs_kv(self) -> bool:
        """Keys and values fit one tensor's worth of storage (spec 9): V = N and K = rope(N * w_k)
        differ only in the dims partial RoPE rotates. Full RoPE rotates every dim: nothing to
        share then."""
        return self.k_eq_v and self.rope.is_partial

    def packed_widths(self, group_size: Optional[int] = None) -> tuple[int, int]:
        """Widths per token and kv head of the two arrays the packed cache stores: the keys as
        scored ([N over the dims RoPE leaves alone, K over the 2 * rotated_pairs it rotates]:
        head_dim wide) and N over the rotated dims, which only the values need (128 for the
        12B). Quantized, each of the three pieces fills whole groups (zero-padded), so no group
        mixes N with K; that costs nothing at the 12B's widths (384 / 128 / 128), but pads a
        narrow head: 3 groups of 128 for a head dim of 32."""
        rotated = whole_groups(2 * self.rope.rotated_pairs, group_size)
        return whole_groups(self.head_dim - 2 * self.rope.rotated_pairs, group_size) + rotated, rotated

    def packed_width(self, group_size: Optional[int] = None) -> int:
        """Values per token and kv head the packed cache stores (640 for the 12B)."""
        return sum(self.packed_widths(group_size))


def _rope_spec(params: dict, head_dim: int, layer_type: str) -> RopeSpec:
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters of {layer_type} is a {type(params).__name__}, "
                          "expected an object")
    rope_type = params.get("rope_type", "default")
    theta = params.get("rope_theta", 10_000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1 < theta < math.inf:
        raise ConfigError(f"config.json: rope_theta of {layer_type} is {theta!r}, expected a number above 1")
    if head_dim <= 0:
        raise ConfigError(f"config.json: head dim {head_dim} of {layer_type} layers, expected a positive int")
    if rope_type == "default":
        return RopeSpec(float(theta), head_dim, head_dim // 2)
    if rope_type == "proportional":
        factor = params.get("partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ConfigError(f"config.json: partial_rotary_factor of {layer_type} is {factor!r}, "
                              "expected a number above 0, at most 1")
        return RopeSpec(float(theta), head_dim, int(factor * head_dim / 2))
    raise ConfigError(f"config.json: rope_type {rope_type!r} for {layer_type} is not supported "
                      "(expected 'default' or 'proportional')")


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15360
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    per_layer_config: Optional[dict] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    bos_token_id: int = 2
    rope_parameters: Optional[dict] = None
    sliding_window: int = 1024
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = "vision"
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 262_144
    layers: tuple = field(init=False, repr=False)

    def __post_init__(self):
        _check_fields(self)
        if self.num_kv_shared_layers:
            raise ConfigError("config.json: num_kv_shared_layers > 0 (KV-shared layers) is not supported")
        if self.attention_bias:
            raise ConfigError("config.json: attention_bias=true is not supported by gemma4_unified")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"config.json: hidden_activation {self.hidden_activation!r} is not supported")
        if self.layer_types is None:  # transformers' default: 5 sliding then 1 full
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = FULL  # transformers forces the last layer to be global
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        overrides = self._per_layer_overrides()
        specs = []
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in (SLIDING, FULL):
                raise ConfigError(f"config.json: unknown layer type {layer_type!r} at layer {i}")
            o = overrides.get(i, {})
            head_dim = int(o.get("head_dim", self.head_dim))
            specs.append(LayerSpec(
                index=i,
                layer_type=layer_type,
                head_dim=head_dim,
                num_kv_heads=int(o.get("num_key_value_heads", self.num_key_value_heads)),
                k_eq_v=bool(self.attention_k_eq_v) and layer_type == FULL,
                rope=_rope_spec(self.rope_parameters[layer_type], head_dim, layer_type),
                window=self.sliding_window if layer_type == SLIDING else None,
            ))
        self.layers = tuple(specs)

    def _per_layer_overrides(self) -> dict[int, dict]:
        """Both on-disk forms (spec 1.3): `per_layer_config` wins; else build it from global_*."""
        if self.per_layer_config is not None:
            return {int(k): dict(v) for k, v in self.per_layer_config.items()}
        o: dict[str, Any] = {"head_dim": self.global_head_dim or 512}
        # transformers gates the kv-head override by attention_k_eq_v (its class default: False).
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            o["num_key_value_heads"] = self.num_global_key_value_heads
        return {i: o for i, t in enumerate(self.layer_types) if t == FULL}

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def layers_of(self, layer_type: str) -> list[LayerSpec]:
        return [s for s in self.layers if s.layer_type == layer_type]


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self)

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size ** 2 * 3


@dataclass
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        d = dict(d)
        for alias in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            if alias in d and "audio_embed_dim" not in d:
                d["audio_embed_dim"] = d[alias]
        return cls(**_pick(cls, d))


@dataclass
class ModelConfig:
    text_config: TextConfig
    vision_config: Optional[VisionConfig] = None
    audio_config: Optional[AudioConfig] = None
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883
    audio_token_id: int = 258_881
    tie_word_embeddings: bool = True
    model_type: str = MODEL_TYPE
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} "
                              "(mlx-gemma runs Gemma 4 unified checkpoints only)")
        if "text_config" not in d:
            raise ConfigError(f"{source}: no text_config")
        for key in ("text_config", "vision_config", "audio_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{source}: {key} is a {type(d[key]).__name__}, expected an object")
        try:
            text = TextConfig(**_pick(TextConfig, d["text_config"]))
            vision = VisionConfig(**_pick(VisionConfig, d["vision_config"])) if d.get("vision_config") else None
            audio = AudioConfig.from_dict(d["audio_config"]) if d.get("audio_config") else None
            top = _pick(cls, d)
            for k in ("text_config", "vision_config", "audio_config"):
                top.pop(k, None)
            # mlx-vlm writes eoa_token_id; transformers' key is eoa_token_index.
            if "eoa_token_index" not in d and "eoa_token_id" in d:
                top["eoa_token_index"] = d["eoa_token_id"]
            top["quantization"] = d.get("quantization") or d.get("quantization_config")
            return cls(text_config=text, vision_config=vision, audio_config=audio, **top)
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{source}: malformed config ({e})") from None

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose rows are overwritten by soft tokens."""
        return (self.image_token_id, self.video_token_id, self.audio_token_id)


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters counted from the shapes the config implies (spec 7), by part."""
    t = cfg.text_config
    h, inter = t.hidden_size, t.intermediate_size
    decoder = 0
    for s in t.layers:
        q = t.num_attention_heads * s.head_dim
        kv = s.num_kv_heads * s.head_dim
        attn = h * q + h * kv * (1 if s.k_eq_v else 2) + q * h + 2 * s.head_dim
        decoder += attn + 3 * h * inter + 4 * h + 1
    counts = {"embedding": t.vocab_size * h, "decoder": decoder + h}
    if cfg.vision_config is not None:
        v = cfg.vision_config
        e = v.mm_embed_dim
        counts["vision"] = (2 * v.patch_dim + v.patch_dim * e + e + 2 * e
                            + v.mm_posemb_size * 2 * e + 2 * e + v.output_proj_dims * h)
    if cfg.audio_config is not None:
        counts["audio"] = cfg.audio_config.audio_embed_dim * h
    counts["total"] = sum(counts.values())
    return counts


def hub_form(raw: dict) -> dict:
    """config.json with `per_layer_config` folded back into global_head_dim /
    num_global_key_value_heads (the Hub's form), when the overrides are exactly that.

    Checkpoints we write use it: mlx-vlm reads only the Hub form (spec 1.3)."""
    text = dict(raw.get("text_config", {}))
    overrides = text.get("per_layer_config")
    if not overrides:
        return raw
    # A drafter's num_kv_shared_layers (all its layers) says nothing about which layers are global.
    cfg = TextConfig(**_pick(TextConfig, {k: v for k, v in text.items() if k != "num_kv_shared_layers"}))
    full = {s.index for s in cfg.layers if s.layer_type == FULL}
    values = {tuple(sorted(v.items())) for v in overrides.values()}
    if {int(k) for k in overrides} != full or len(values) != 1:
        return raw
    o = dict(values.pop())
    if set(o) - {"head_dim", "num_key_value_heads"}:
        return raw
    text.pop("per_layer_config")
    text["global_head_dim"] = o.get("head_dim", cfg.head_dim)
    if "num_key_value_heads" in o:
        text["num_global_key_value_heads"] = o["num_key_value_heads"]
    out = dict(raw, text_config=text)
    folded = TextConfig(**_pick(TextConfig, dict(text, num_kv_shared_layers=0))).layers
    return out if [(s.head_dim, s.num_kv_heads) for s in folded] == \
        [(s.head_dim, s.num_kv_heads) for s in cfg.layers] else raw
