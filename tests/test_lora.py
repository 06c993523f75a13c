"""Fine-tuning: LoRA gradients as torch autograd computes them through transformers + PEFT,
a tiny multimodal set overfit through `python -m mlx_gemma.lora`, resuming, checkpoints that
survive a failed save, the training memory plan, and one-line errors for bad runs."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from PIL import Image

import media_files as mf
import reference
from conftest import ids_of
from mlx_gemma import load
from mlx_gemma.config import ModelConfig
from mlx_gemma.generation import generate
from mlx_gemma.tuning import trainer
from mlx_gemma.tuning.budget import make_training_plan
from mlx_gemma.tuning.data import Example

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_adapter(hf_checkpoint, tmp_path_factory):
    """A PEFT LoRA adapter with random nonzero A and B on every decoder projection."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = reference.load_reference(hf_checkpoint)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(out)
    return out, peft_model


def torch_loss_and_grads(peft_model, ids, trained):
    """The trainer's loss (mean cross entropy over the trained next tokens) and d loss / d lora."""
    peft_model.zero_grad()
    logits = peft_model(input_ids=torch.tensor(ids), use_cache=False).logits[:, :-1].float()
    weights = torch.tensor(trained[:, 1:], dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:]).reshape(-1),
                                           reduction="none")
    value = (ce * weights.reshape(-1)).sum() / weights.sum()
    value.backward()
    return value.item(), {n: p.grad.numpy().copy() for n, p in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mask_prompt,checkpointing", [(False, False), (True, False), (True, True)])
def test_lora_gradients_match_torch_autograd_through_peft(hf_checkpoint, peft_adapter, mask_prompt, checkpointing):
    path, peft_model = peft_adapter
    ids = np.array([ids_of(40, seed=1), ids_of(40, seed=2)])
    trained = np.ones(ids.shape, bool)
    trained[:, 0] = False
    if mask_prompt:
        trained[0, :25], trained[1, :31] = False, False
    # Padding is part of what is checked: the second example is shorter and padded by make_batch.
    examples = [Example(ids[0], trained[0], {}, "a"), Example(ids[1, :36], trained[1, :36], {}, "b")]
    torch_ids = ids.copy()
    torch_ids[1, 36:] = 0
    torch_trained = trained.copy()
    torch_trained[1, 36:] = False
    expected_loss, expected = torch_loss_and_grads(peft_model, torch_ids, torch_trained)

    model, _ = load(hf_checkpoint, dtype=mx.float32, adapter_path=path)
    model.freeze()
    model.apply_to_modules(lambda _, m: m.unfreeze(keys=["lora_a", "lora_b"], strict=False)
                           if hasattr(m, "lora_a") else None)
    trainer.checkpoint_layers(model, checkpointing)
    (value, count), grads = nn.value_and_grad(model, trainer.loss)(model, trainer.make_batch(model, examples))
    trainer.checkpoint_layers(model, False)
    assert count == int(torch_trained[:, 1:].sum())
    assert abs(value.item() - expected_loss) <= 1e-5 * abs(expected_loss)
    ours = dict(tree_flatten(grads))
    compared = 0
    for name, g in expected.items():
        # base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight
        layer_path = name.split("model.language_model.", 1)[1].split(".lora_")[0]
        key = f"language_model.model.{layer_path}.{'lora_a' if '.lora_A.' in name else 'lora_b'}"
        got = np.array(ours[key]).T  # mlx-lm stores A as [in, r] and B as [r, out]: PEFT's transposed
        assert np.abs(got - g).max() <= 1e-3 * np.abs(g).max(), key
        compared += 1
    assert compared == len(expected) == 2 * len(TARGETS) * len(model.layers) - 2 * sum(
        s.k_eq_v for s in model.config.text_config.layers)


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory):
    """Three examples: text, an image, a sound; the answers are what the model must learn."""
    d = tmp_path_factory.mktemp("overfit")
    Image.fromarray(mf.noise_image(96, 96)).save(d / "cat.png")
    mf.write_wav(d / "meow.wav", 16000, 0.3)
    rows = [{"messages": [{"role": "user", "content": "say seven"}, {"role": "assistant", "content": "seven seven"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                       {"type": "text", "text": "what is it"}]},
                          {"role": "assistant", "content": "a cat"}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "meow.wav"},
                                                       {"type": "text", "text": "who speaks"}]},
                          {"role": "assistant", "content": "the cat"}]}]
    for split in ("train", "valid", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, rows


def train_losses(out: str) -> list[tuple[int, float]]:
    return [(int(line.split()[1].rstrip(":")), float(line.split("Train loss ")[1].split(",")[0]))
            for line in out.splitlines() if "Train loss" in line]


def run_lora(capsys, *argv):
    from mlx_gemma.lora import main

    main(list(argv))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(hf_checkpoint, overfit_data, tmp_path_factory):
    """One training run shared by the tests that read its outputs."""
    from mlx_gemma.lora import main

    data, _ = overfit_data
    out = tmp_path_factory.mktemp("run") / "adapters"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "40", "--batch-size", "1",
              "--learning-rate", "1e-3", "--num-layers", "-1", "--rank", "8", "--mask-prompt", "--steps-per-report",
              "5", "--steps-per-eval", "20", "--save-every", "20", "--adapter-path", str(out), "--test"])
    return out, buffer.getvalue()


def test_training_overfits_text_image_and_audio(trained, hf_checkpoint, overfit_data):
    out, log = trained
    losses = train_losses(log)
    assert [it for it, _ in losses] == list(range(5, 41, 5))
    assert losses[-1][1] < losses[0][1] / 5, losses
    assert "Val loss" in log and "Test loss" in log and "Peak mem" in log and "Tokens/sec" in log
    assert {p.name for p in out.iterdir()} >= {"adapters.safetensors", "adapter_config.json", "loss_curve.png",
                                               "0000020_adapters.safetensors", "0000040_adapters.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert config["lora_parameters"]["rank"] == 8
    assert Image.open(out / "loss_curve.png").size[0] > 100
    # The adapter changes what the model says on the training prompts, towards the answer.
    base, processor = load(hf_checkpoint)
    tuned, _ = load(hf_checkpoint, adapter_path=out)
    _, rows = overfit_data
    prompt = rows[0]["messages"][:1]
    before = generate(base, processor, prompt, max_tokens=10, verbose=False)
    after = generate(tuned, processor, prompt, max_tokens=10, verbose=False)
    assert after != before
    assert after.startswith("seven") and not before.startswith("seven"), (before, after)


def test_resume_continues_from_the_saved_iteration(trained, hf_checkpoint, overfit_data, capsys, tmp_path):
    out, _ = trained
    data, _ = overfit_data
    log = run_lora(capsys, "--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "25",
                   "--batch-size", "1", "--num-layers", "-1", "--rank", "8", "--steps-per-report", "5",
                   "--resume-adapter-file", str(out / "0000020_adapters.safetensors"), "--adapter-path", str(tmp_path))
    assert "Resuming from" in log and "at iteration 20" in log
    assert [it for it, _ in train_losses(log)] == [25]
    assert (tmp_path / "0000025_adapters.safetensors").exists()


def test_a_failed_save_leaves_the_last_checkpoint_intact(hf_checkpoint, overfit_data, tmp_path, monkeypatch, capsys):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    saved = mx.save_safetensors
    calls = []

    def failing(path, weights, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's first file: half written, then the disk is full
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return saved(path, weights, metadata=metadata) if metadata else saved(path, weights)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(SystemExit):
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "6", "--batch-size", "1",
              "--save-every", "2", "--adapter-path", str(tmp_path)])
    monkeypatch.setattr(mx, "save_safetensors", saved)
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    checkpoint = mx.load(str(tmp_path / "0000002_adapters.safetensors"))
    assert all(np.array_equal(np.array(weights[k]), np.array(checkpoint[k])) for k in weights)


def test_plan_counts_checkpointing_and_fits_the_12b_on_a_16gb_mac():
    config = ModelConfig.from_file(Path(__file__).parent / "data" / "gemma-4-12B-it.config.json")
    lora = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    common = dict(batch_size=1, seq_length=2048, num_layers=-1, lora_parameters=lora, dtype_bytes=2)
    # 4-bit weights of the 12B (benchmarks/sizes.py: 6.7 GB), the GPU share of a 16 GB Mac.
    kept = make_training_plan(config, int(6.7e9), int(11.8e9), checkpointing=False, **common)
    checkpointed = make_training_plan(config, int(6.7e9), int(11.8e9), checkpointing=True, **common)
    assert checkpointed.fits and not kept.fits
    assert checkpointed.activations < kept.activations / 10
    # rank 8 on q, k, (v), o, gate, up, down of 48 layers: r * (in + out) each.
    text = config.text_config
    expected = sum(8 * ((text.hidden_size + text.num_attention_heads * s.head_dim) * 2
                        + (text.hidden_size + s.num_kv_heads * s.head_dim) * (1 if s.k_eq_v else 2)
                        + 3 * (text.hidden_size + text.intermediate_size)) for s in text.layers)
    assert checkpointed.adapters == expected


def test_plan_flag_prints_the_table_and_refuses_what_does_not_fit(hf_checkpoint, overfit_data, capsys):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    log = run_lora(capsys, "--model", str(hf_checkpoint), "--plan", "--data", str(data))
    assert "adapters + gradients + Adam state" in log and "| fits | yes |" in log
    with pytest.raises(SystemExit) as e:
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--memory-limit", "1MB"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.count("\n") == 0
    assert err.startswith("error: training needs") and "--grad-checkpoint" in err


@pytest.mark.parametrize("args,message", [
    (["--fine-tune-type", "full"], "only lora and dora"),
    (["--rank", "0"], "--rank must be a positive integer"),
    (["--iters", "0"], "--iters must be a positive integer"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--data", "/nonexistent"], "--data /nonexistent: not a directory"),
    (["--config", "CONFIG"], "unknown options batch_sise"),
    (["--report-to", "wandb"], "not supported"),
    ([], "train.jsonl:2: invalid JSON"),
])
def test_bad_runs_are_one_line_errors(hf_checkpoint, overfit_data, tmp_path, capsys, args, message):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    (tmp_path / "config.yaml").write_text("batch_sise: 2\n")
    args = [str(tmp_path / "config.yaml") if a == "CONFIG" else a for a in args]
    base = ["--model", str(hf_checkpoint), "--train", "--data", str(bad if not args else data)]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    err = capsys.readouterr().err.strip()
    assert e.value.code in (1, 2) and err.startswith("error:"), err
    assert message in err, err
    if args:
        assert err.count("\n") == 0, err
