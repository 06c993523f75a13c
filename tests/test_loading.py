"""Loading: layouts (single, sharded, Hub cache), laziness, and every bad checkpoint input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.checkpoint import write_checkpoint
from mlx_gemma.errors import CheckpointError, ConfigError
from mlx_gemma.loading import load, load_model, load_weights

REPO = Path(__file__).resolve().parent.parent
IDS = mx.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50] * 3])


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path) -> Path:
    """A private copy of the fixture checkpoint that a test may damage."""
    return Path(shutil.copytree(hf_checkpoint, tmp_path / "ckpt"))


def logits(model):
    return np.array(model(IDS))


def test_sharded_checkpoint_loads_identically(model, hf_checkpoint, tmp_path):
    tensors = ((k, v, v.nbytes) for k, v in load_weights(hf_checkpoint).items())
    out = write_checkpoint(tmp_path / "sharded", hf_checkpoint, tensors,
                           json.loads((hf_checkpoint / "config.json").read_text()), max_shard_bytes=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").exists()
    assert np.array_equal(logits(load_model(out)), logits(model))


def test_lazy_load_reads_nothing_until_used(hf_checkpoint):
    mx.clear_cache()
    before = mx.get_active_memory()
    m = load_model(hf_checkpoint, lazy=True)
    assert mx.get_active_memory() - before < 10_000
    _ = logits(m)
    assert mx.get_active_memory() - before > 100_000


def test_hub_repo_id_loads_offline_from_the_local_cache(hf_checkpoint, processor, tmp_path):
    """A cache laid out like huggingface_hub's: blobs, a snapshot of symlinks, refs/main; in a
    process with the run-time dependencies only (no torch, tests/runtime_only)."""
    repo_dir = tmp_path / "hub" / "models--tiny--gemma4-unified"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    for f in hf_checkpoint.iterdir():
        blob = repo_dir / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = ("import sys; from mlx_gemma import load; m, p = load('tiny/gemma4-unified'); "
            "print(m.config.text_config.num_hidden_layers, *p.encode('hi there'), sys.modules['torch'])")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["12", *map(str, processor.encode("hi there")), "None"]
    missing = subprocess.run([sys.executable, "-c", "from mlx_gemma import load; load('tiny/not-there')"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert ("tiny/not-there: no such folder, and as a Hub repo it could not be downloaded and is not in the local "
            "Hugging Face cache") in missing.stderr


@pytest.mark.parametrize("path", ["/no/such/dir", "not a repo id", "a/b/c"])
def test_path_that_is_neither_directory_nor_repo_id(path):
    with pytest.raises(CheckpointError, match="neither a local directory nor a Hugging Face repo id"):
        load(path)


def test_directory_without_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{ckpt}: no config.json"):
        load(ckpt)


def test_wrong_model_type_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'gemma4_unified'"):
        load(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    index = {"weight_map": {"model.language_model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        load(ckpt)


def test_truncated_safetensors_is_named(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{f}: truncated safetensors file"):
        load(ckpt)


def test_corrupt_safetensors_is_named(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{f}: corrupt safetensors file"):
        load(ckpt)


def test_weight_with_wrong_shape_is_named(ckpt):
    f = ckpt / "model.safetensors"
    tensors = mx.load(str(f))
    tensors["model.language_model.layers.3.self_attn.q_proj.weight"] = mx.zeros((10, 64))
    mx.save_safetensors(str(f), tensors)
    with pytest.raises(CheckpointError, match=r"weight language_model\.model\.layers\.3\.self_attn\.q_proj\.weight "
                                              r"has shape \(10, 64\), expected \(64, 64\)"):
        load(ckpt)


def test_missing_weight_is_named(ckpt):
    f = ckpt / "model.safetensors"
    tensors = mx.load(str(f))
    del tensors["model.language_model.layers.0.mlp.up_proj.weight"]
    mx.save_safetensors(str(f), tensors)
    with pytest.raises(CheckpointError, match=r"missing weight language_model\.model\.layers\.0\.mlp\.up_proj"):
        load(ckpt)


def test_transformers_in_memory_names_are_accepted(model, hf_model, tmp_path, hf_checkpoint):
    """A state_dict saved without transformers' name mapping (embed_vision.multimodal_embedder...)."""
    state = {k: mx.array(v.float().numpy()) for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.embed_vision.multimodal_embedder") for k in state)
    out = tmp_path / "raw"
    shutil.copytree(hf_checkpoint, out)
    mx.save_safetensors(str(out / "model.safetensors"), state)
    assert np.array_equal(logits(load_model(out)), logits(model))


def test_no_module_imports_one_that_imports_it_back():
    """design.md: lower modules never import higher ones; an import inside a function counts too
    (distributed, loading and tuning/adapters used to reach each other through `sanitize`)."""
    import ast

    def name(path):
        parts = path.relative_to(REPO).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for p in (REPO / "mlx_gemma").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                                ([node.module] if node.module else []))
                # `from . import x` names module x, not the package it sits in
                targets |= ({base} if node.module else set()) | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a in reachable(b))
    assert not cycles
