"""Config parsing: the 12B's real values in both on-disk forms, checked against transformers."""

import json
from pathlib import Path

import pytest

from mlx_gemma.config import FULL, SLIDING, ModelConfig, parameter_count
from mlx_gemma.errors import ConfigError

HUB_CONFIG = Path(__file__).parent / "data" / "gemma-4-12B-it.config.json"


@pytest.fixture(scope="module")
def hub_dict():
    return json.loads(HUB_CONFIG.read_text())


def saved_by_transformers(d: dict, tmp_path: Path) -> dict:
    """The same config after transformers' save_pretrained (the per_layer_config form)."""
    from transformers import Gemma4UnifiedConfig

    Gemma4UnifiedConfig.from_dict(d).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def reference_geometry(d: dict) -> list[tuple]:
    from transformers import Gemma4UnifiedConfig

    t = Gemma4UnifiedConfig.from_dict(d).text_config
    return [(t.layer_types[i], t.per_layer_config[i].head_dim, t.per_layer_config[i].num_key_value_heads)
            for i in range(t.num_hidden_layers)]


def our_geometry(cfg: ModelConfig) -> list[tuple]:
    return [(s.layer_type, s.head_dim, s.num_kv_heads) for s in cfg.text_config.layers]


def test_12b_geometry(hub_dict):
    cfg = ModelConfig.from_dict(hub_dict)
    layers = cfg.text_config.layers
    sliding = [s for s in layers if s.layer_type == SLIDING]
    full = [s for s in layers if s.layer_type == FULL]
    assert (len(sliding), len(full)) == (40, 8)
    assert [s.index for s in full] == [5, 11, 17, 23, 29, 35, 41, 47]
    assert layers[-1].layer_type == FULL
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v, s.window) for s in sliding} == {(256, 8, False, 1024)}
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v, s.window) for s in full} == {(512, 1, True, None)}
    assert {(s.rope.theta, s.rope.rotated_pairs) for s in sliding} == {(1e4, 128)}
    assert {(s.rope.theta, s.rope.rotated_pairs) for s in full} == {(1e6, 64)}
    assert cfg.eoa_token_index == 258883 and cfg.image_token_id == 258880
    assert our_geometry(cfg) == reference_geometry(hub_dict)


def test_12b_parameter_count(hub_dict):
    counts = parameter_count(ModelConfig.from_dict(hub_dict))
    assert 11.9e9 <= counts["total"] < 12.0e9  # "11.9B"; the exact count is checked on the fixture
    assert round(counts["embedding"] / 1e9, 2) == 1.01
    assert round(counts["decoder"] / 1e9, 1) == 10.9


def test_parameter_count_matches_transformers(hf_checkpoint, hf_model):
    cfg = ModelConfig.from_file(hf_checkpoint / "config.json")
    reference_total = sum(p.numel() for p in hf_model.parameters()) + sum(
        b.numel() for n, b in hf_model.named_buffers() if n.endswith("layer_scalar"))
    assert parameter_count(cfg)["total"] == reference_total


def test_save_pretrained_form_gives_same_geometry(hub_dict, tmp_path):
    saved = saved_by_transformers(hub_dict, tmp_path)
    assert "per_layer_config" in saved["text_config"] and "global_head_dim" not in saved["text_config"]
    assert our_geometry(ModelConfig.from_dict(saved)) == our_geometry(ModelConfig.from_dict(hub_dict))


@pytest.mark.parametrize("change", [
    {"num_global_key_value_heads": None},  # full layers keep num_key_value_heads
    {"attention_k_eq_v": False},  # the kv-head override is gated by k_eq_v
    {"global_head_dim": None},  # default 512
])
def test_edge_forms_match_transformers(hub_dict, change, tmp_path):
    d = json.loads(json.dumps(hub_dict))
    for k, v in change.items():
        if v is None:
            d["text_config"].pop(k)
        else:
            d["text_config"][k] = v
    assert our_geometry(ModelConfig.from_dict(d)) == reference_geometry(d)
    assert our_geometry(ModelConfig.from_dict(saved_by_transformers(d, tmp_path))) == reference_geometry(d)


def test_wrong_model_type_is_named(hub_dict):
    d = dict(hub_dict, model_type="gemma3")
    with pytest.raises(ConfigError, match="model_type is 'gemma3'"):
        ModelConfig.from_dict(d)
