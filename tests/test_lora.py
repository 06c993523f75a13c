"""Fine-tuning: LoRA gradients as torch autograd computes them through transformers + PEFT,
a tiny multimodal set overfit through `python -m mlx_gemma.lora`, resuming, checkpoints that
survive a failed save, the training memory plan, and one-line errors for bad runs."""

import contextlib
import io
import json
import re
import shutil
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
from mlx_gemma.memory import mac_budget
from mlx_gemma.tuning import trainer
from mlx_gemma.tuning.budget import make_training_plan
from mlx_gemma.tuning.data import Example

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(hf_checkpoint, out, **options):
    """A PEFT LoRA adapter with random nonzero A and B on every decoder projection."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = reference.load_reference(hf_checkpoint)
    config = LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **{"r": 4, "lora_alpha": 8, **options})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    return out, peft_model


@pytest.fixture(scope="module")
def peft_adapter(hf_checkpoint, tmp_path_factory):
    return make_peft(hf_checkpoint, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "rank_pattern": {"down_proj": 2},
                                          "alpha_pattern": {"q_proj": 3}}], ids=["plain", "rslora-patterns"])
def test_peft_adapter_logits_match_transformers_and_peft(hf_checkpoint, processor, tmp_path, options):
    from test_multimodal import compare, image, user

    path, peft_model = make_peft(hf_checkpoint, tmp_path / "adapter", **options)
    model, _ = load(hf_checkpoint, dtype=mx.float32, adapter_path=path)
    ids = ids_of(40)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    base = np.array(load(hf_checkpoint, dtype=mx.float32)[0](mx.array([ids]))[0])
    got = np.array(model(mx.array([ids]))[0])
    assert np.abs(expected - base).max() > 1e-2  # the adapter matters
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    inputs = processor.chat_inputs([user({"type": "image", "image": image()})])
    compare(model, peft_model, inputs, "PEFT adapter, one image", variants=("forward",))


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
    value, count, grads = trainer.value_and_grad(model, trainer.make_batch(model, examples), checkpointing)
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


def losses_saved(file: Path) -> list:
    return json.loads(mx.load(str(file), return_metadata=True)[1]["losses"])


def test_resume_continues_from_the_saved_iteration(trained, hf_checkpoint, overfit_data, capsys, tmp_path):
    out, first_log = trained
    data, _ = overfit_data
    log = run_lora(capsys, "--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "25",
                   "--batch-size", "1", "--num-layers", "-1", "--rank", "8", "--steps-per-report", "5",
                   "--resume-adapter-file", str(out / "0000020_adapters.safetensors"), "--adapter-path", str(tmp_path))
    assert "at iteration 20: --iters 25 is the total, so iterations 21 to 25 follow (mlx-lm's --iters" in log
    assert [it for it, _ in train_losses(log)] == [25]
    assert (tmp_path / "0000025_adapters.safetensors").exists()
    # The loss history goes on from the first run's, up to the iteration resumed from.
    history = losses_saved(tmp_path / "adapters.safetensors")
    assert [(it, round(t, 3)) for it, t, _ in history if t is not None] == \
        [(it, t) for it, t in train_losses(first_log) if it <= 20] + train_losses(log)


def test_resume_in_place_adds_to_the_folder_and_force_replaces_it(trained, hf_checkpoint, overfit_data, capsys,
                                                                   tmp_path):
    from mlx_gemma.outputs import MARKER, not_ours

    out, _ = trained
    data, _ = overfit_data
    folder = Path(shutil.copytree(out, tmp_path / "adapters"))
    earlier = {p.name: p.read_bytes() for p in folder.glob("00*_adapters.safetensors")}
    common = ["--model", str(hf_checkpoint), "--train", "--data", str(data), "--batch-size", "1", "--num-layers",
              "-1", "--rank", "8", "--adapter-path", str(folder)]
    run_lora(capsys, *common, "--iters", "42", "--steps-per-report", "1",
             "--resume-adapter-file", str(folder / "0000040_adapters.safetensors"))
    assert {p.name: p.read_bytes() for p in folder.glob("00*_adapters.safetensors") if p.name in earlier} == earlier
    assert (folder / "0000042_adapters.safetensors").exists() and not_ours(folder) is None
    assert [it for it, t, _ in losses_saved(folder / "adapters.safetensors") if t is not None][-3:] == [40, 41, 42]
    # --force: the folder becomes this run's alone, the earlier run's checkpoints gone
    run_lora(capsys, *common, "--iters", "2", "--force")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "0000002_adapters.safetensors", "adapter_config.json",
                                                       "adapters.safetensors", "loss_curve.png"]


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(hf_checkpoint, overfit_data, tmp_path, capsys):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    with pytest.raises(SystemExit) as e:
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "8", "--batch-size", "1",
              "--save-every", "1", "--learning-rate", "1e30", "--adapter-path", str(tmp_path / "ad")])
    err = capsys.readouterr().err.strip()
    m = re.fullmatch(r"error: iteration (\d+): the training loss is (?:nan|inf): the run stopped, the adapters "
                     r"saved at iteration (\d+) are intact \(try a lower --learning-rate\)", err)
    assert e.value.code == 1 and m, err
    stopped, kept = int(m[1]), int(m[2])
    assert kept == stopped - 1
    assert sorted(p.name for p in (tmp_path / "ad").glob("00*")) == \
        [f"{it:07d}_adapters.safetensors" for it in range(1, stopped)]
    load(hf_checkpoint, adapter_path=tmp_path / "ad")  # finite, so it loads


def test_a_full_disk_at_the_first_save_leaves_nothing(hf_checkpoint, overfit_data, tiny_tmpfs, capsys):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    (tiny_tmpfs / "sentinel.txt").write_text("the user's file")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "2", "--batch-size", "1",
              "--adapter-path", str(tiny_tmpfs / "runs" / "ad")])
    assert e.value.code == 1
    out = tiny_tmpfs / "runs" / "ad"
    assert capsys.readouterr().err.strip() == f"error: {out}: cannot write (No space left on device)"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["sentinel.txt"]


def test_a_failed_save_leaves_the_last_checkpoint_intact(hf_checkpoint, overfit_data, tmp_path, monkeypatch, capsys):
    from mlx_gemma.lora import main

    data, _ = overfit_data
    saved = mx.save_safetensors
    calls = []

    def failing(file, weights, metadata=None):
        calls.append(file)
        if len(calls) > 2:  # the second checkpoint's first file: half written, then the disk is full
            file.write(b"partial")
            raise OSError(28, "No space left on device")
        return saved(file, weights, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(SystemExit):
        main(["--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "6", "--batch-size", "1",
              "--save-every", "2", "--adapter-path", str(tmp_path)])
    monkeypatch.setattr(mx, "save_safetensors", saved)
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: cannot save the adapters of iteration 4 (No space "
                                               "left on device); the adapters saved at iteration 2 are intact")
    assert not list(tmp_path.glob(".tmp-*"))
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    checkpoint = mx.load(str(tmp_path / "0000002_adapters.safetensors"))
    assert all(np.array_equal(np.array(weights[k]), np.array(checkpoint[k])) for k in weights)


def test_plan_counts_checkpointing_and_fits_the_12b_on_a_16gb_mac():
    from mlx_gemma.quantization import QuantSpec, quantized_size

    config = ModelConfig.from_file(Path(__file__).parent / "data" / "gemma-4-12B-it.config.json")
    lora = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    common = dict(batch_size=1, seq_length=2048, num_layers=-1, lora_parameters=lora, dtype_bytes=2)
    # 4-bit default-recipe weights of the 12B and a 16 GB Mac's GPU budget.
    weights = int(quantized_size(config, QuantSpec(), "default")["total_bytes"])
    budget = mac_budget(16)
    kept = make_training_plan(config, weights, budget, checkpointing=False, **common)
    checkpointed = make_training_plan(config, weights, budget, checkpointing=True, **common)
    assert checkpointed.fits and not kept.fits
    assert checkpointed.activations < kept.activations / 10
    # rank 8 on q, k, (v), o, gate, up, down of 48 layers: r * (in + out) each.
    text = config.text_config
    expected = sum(8 * ((text.hidden_size + text.num_attention_heads * s.head_dim) * 2
                        + (text.hidden_size + s.num_kv_heads * s.head_dim) * (1 if s.k_eq_v else 2)
                        + 3 * (text.hidden_size + text.intermediate_size)) for s in text.layers)
    assert checkpointed.adapters == expected


@pytest.mark.parametrize("checkpointing,vocab,lengths", [
    (False, 1024, (128, 256, 512)), (True, 1024, (128, 256, 512)), (True, 16384, (128, 256))],
    ids=["kept", "checkpointed", "checkpointed-loss"])
def test_a_training_step_holds_what_the_plan_counts(checkpointing, vocab, lengths):
    """One step of trainer.train on a 4-bit stand-in of the 12B's period (5 sliding layers, 1
    global), narrowed with its proportions (MLP 4x hidden, query 1x / 2x hidden, one global kv
    head, k_eq_v), rank 8 on every projection, float32 activations (the CPU backend's choice):
    what the step holds beyond the weights, adapters and Adam's moments (`mx.get_peak_memory()`
    over the active memory before it) is within 5% of the plan's activations, backward and loss
    at 128 to 512 tokens, where the scores per token grow from 2x to 8x the hidden width (the
    12B's at 2048 tokens: 8.5x). With a 16K vocabulary (the 12B's vocabulary to hidden width)
    the loss's pieces set a checkpointed step's peak at short lengths. (Without checkpointing
    the loss runs in one graph with the layers and its peak moves with MLX's scheduler, 10 to
    13 pieces' worth: not held to 5% here; benchmarks/lora.py holds whole runs to it.) The
    least of two runs after a warm-up: MLX's peak moves by about 1 MB between identical runs."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from benchmarks.kv_memory import config as make_config
    from mlx_gemma.model import Model

    cfg = make_config(6, None, hidden_size=256, intermediate_size=1024, vocab_size=vocab, num_attention_heads=4,
                      head_dim=64, global_head_dim=128, num_key_value_heads=2)
    mx.random.seed(0)
    model = Model(cfg)
    nn.quantize(model, group_size=64, bits=4)
    cfg.quantization = {"group_size": 64, "bits": 4}
    model.freeze()
    lora = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, -1, lora)
    optimizer = optim.Adam(learning_rate=1e-5)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    args = TrainingArgs(batch_size=1, iters=1, grad_checkpoint=checkpointing)
    rng = np.random.default_rng(0)
    for length in lengths:
        ids = rng.integers(10, cfg.text_config.vocab_size, length).astype(np.int32)
        examples = [Example(ids, np.arange(length) > 0, {}, "x")]
        runs = []
        for _ in range(3):
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            trainer.train(model, optimizer, examples, [], args, save=lambda it: None, report=lambda r: None)
            runs.append(mx.get_peak_memory() - base)
        plan = make_training_plan(cfg, 0, 1 << 40, batch_size=1, seq_length=length, num_layers=-1,
                                  lora_parameters=lora, checkpointing=checkpointing, dtype_bytes=4)
        # Held before the step: the adapters and Adam's moments. The gradients, the plan's fourth
        # copy of the adapters, form as the backward goes: few of them are there at its peak.
        planned = plan.total - plan.optimizer
        held = min(runs[1:])
        assert 0.95 * planned <= held <= 1.05 * planned, (length, held, planned, held / planned)


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


def run_fuse(*argv):
    from mlx_gemma.fuse import main

    main([str(a) for a in argv])


def test_adapter_trained_here_exports_to_peft_with_the_same_logits(trained, hf_checkpoint, tmp_path):
    from peft import PeftModel

    out, _ = trained
    run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--export-peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    peft_model = PeftModel.from_pretrained(reference.load_reference(hf_checkpoint), tmp_path / "peft").eval()
    ids = ids_of(30)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    ours, _ = load(hf_checkpoint, dtype=mx.float32, adapter_path=out)
    got = np.array(ours(mx.array([ids]))[0])
    base = reference.reference_logits(reference.load_reference(hf_checkpoint), ids)
    assert np.abs(expected - base).max() > 1e-2  # the export carries the training
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # and it comes back: the PEFT directory loads here with the same logits
    again, _ = load(hf_checkpoint, dtype=mx.float32, adapter_path=tmp_path / "peft")
    assert np.array_equal(np.array(again(mx.array([ids]))[0]), got)


def test_export_force_replaces_our_export_and_a_failed_fuse_leaves_none(trained, hf_checkpoint, tmp_path,
                                                                          tiny_tmpfs, capsys):
    from mlx_gemma.outputs import MARKER

    out, _ = trained
    run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--export-peft", tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()  # what --force must bring back
    run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--export-peft", tmp_path / "peft", "--force")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [MARKER, "adapter_config.json",
                                                                     "adapter_model.safetensors"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the merged checkpoint does not fit: the export is not left either
        run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--export-peft", tmp_path / "peft2",
                 "--save-path", tiny_tmpfs / "fused")
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tiny_tmpfs / 'fused'}: cannot write (No space left on device)"
    assert not (tmp_path / "peft2").exists() and not list(tiny_tmpfs.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft", "small-disk"]


def test_fused_checkpoint_equals_base_plus_adapter_here_and_in_mlx_vlm(trained, hf_checkpoint, tmp_path):
    from mlx_vlm import load as vlm_load

    from mlx_gemma.checkpoint import quantize_checkpoint

    out, _ = trained
    run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--save-path", tmp_path / "fused")
    ids = mx.array([ids_of(30)])
    with_adapter = np.array(load(hf_checkpoint, dtype=mx.float32, adapter_path=out)[0](ids))
    merged_model, _ = load(tmp_path / "fused", dtype=mx.float32)
    merged = np.array(merged_model(ids, cache=merged_model.make_cache(one_tensor=False)))
    assert np.abs(merged - with_adapter).max() <= 1e-4 * np.abs(with_adapter).max()
    theirs, _ = vlm_load(str(tmp_path / "fused"))
    vlm = np.array(theirs(ids).logits.astype(mx.float32))
    assert np.abs(vlm - merged).max() <= 1e-4 * np.abs(merged).max()
    # --quantize: the recipes applied to the merged weights, exactly as quantize would
    run_fuse("--model", hf_checkpoint, "--adapter-path", out, "--save-path", tmp_path / "q8", "--quantize",
             "--bits", "8", "--group-size", "32")
    expected = quantize_checkpoint(str(tmp_path / "fused"), str(tmp_path / "q8-expected"), bits=8, group_size=32)
    got_model, expected_model = load(tmp_path / "q8")[0], load(expected)[0]
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    assert np.array_equal(np.array(got_model(ids)), np.array(expected_model(ids)))


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora = True is not supported"),
    ({"bias": "all"}, "bias = 'all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("vision", "is not a linear layer of this model"),
    ("shape", "the layer needs"),
    ("no-weights", "no adapter_model.safetensors"),
    ("bad-json", "cannot read it as JSON"),
    ({"target_modules": ["q_proj", "patch_conv"]}, "target_modules names patch_conv, which this model does not have"),
    ({"target_modules": r"vision_tower\..*"}, r"target_modules 'vision_tower\\..*' matches no linear layer"),
    ("nan", "adapter_model.safetensors: adapter weight base_model.model.model.language_model.layers.0.mlp.down_proj"
            ".lora_A.weight holds NaN or infinite values"),
])
def test_bad_peft_adapters_are_one_line_errors(peft_adapter, hf_checkpoint, tmp_path, change, message):
    from mlx_gemma.errors import CheckpointError

    src, _ = peft_adapter
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    weights = mx.load(str(bad / "adapter_model.safetensors"))
    if isinstance(change, dict):
        config.update(change)
    elif change in ("vision", "shape"):
        name = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        if change == "vision":  # a module of transformers' vision stack that this model does not have
            for part in ("A", "B"):
                key = name.replace("lora_A", f"lora_{part}")
                weights[key.replace("language_model.layers.0", "vision_tower.encoder.layers.0")] = weights.pop(key)
        else:
            weights[name] = weights[name][:, :-1]
    elif change == "nan":
        name = "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight"
        weights[name] = weights[name] * float("inf")
    if change == "no-weights":
        (bad / "adapter_model.safetensors").unlink()
    else:
        mx.save_safetensors(str(bad / "adapter_model.safetensors"), weights)
    (bad / "adapter_config.json").write_text("{not json" if change == "bad-json" else json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load(hf_checkpoint, adapter_path=bad)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(bad) in str(e.value)


def test_generate_and_server_take_adapter_path(trained, hf_checkpoint, capsys):
    from mlx_gemma.generate import main as generate_main
    from mlx_gemma.server import build_parser

    out, _ = trained
    replies = []
    for extra in ([], ["--adapter-path", str(out)]):
        generate_main(["--model", str(hf_checkpoint), "--prompt", "say seven", "--max-tokens", "6",
                       "--temp", "0", "--verbose", "False", *extra])
        replies.append(capsys.readouterr().out.strip())
    assert replies[1].startswith("seven") and replies[0] != replies[1], replies
    assert build_parser().parse_args(["--adapter-path", str(out)]).adapter_path == str(out)


def test_generate_without_model_loads_the_base_the_adapters_name(peft_adapter, hf_checkpoint, tmp_path, capsys):
    """The README's `generate --adapter-path DIR`: PEFT's base_model_name_or_path, mlx-lm's model."""
    from mlx_gemma.generate import DEFAULT_MODEL, main as generate_main
    from mlx_gemma.tuning.checkpoints import resolve_base_model

    path, _ = peft_adapter
    assert resolve_base_model(None, path, DEFAULT_MODEL) == str(hf_checkpoint)
    replies = []
    for model in (["--model", str(hf_checkpoint)], []):
        generate_main([*model, "--adapter-path", str(path), "--prompt", "hi", "--max-tokens", "4", "--temp", "0",
                       "--verbose", "False"])
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()
    mlx_lm = tmp_path / "adapters"
    mlx_lm.mkdir()
    (mlx_lm / "adapter_config.json").write_text(json.dumps({"model": "org/base", "fine_tune_type": "lora"}))
    assert resolve_base_model(None, mlx_lm, DEFAULT_MODEL) == "org/base"
    assert resolve_base_model("mine", mlx_lm, DEFAULT_MODEL) == "mine"
    assert resolve_base_model(None, None, DEFAULT_MODEL) == DEFAULT_MODEL


def test_dora_trains_saves_and_loads(hf_checkpoint, overfit_data, tmp_path, capsys):
    data, _ = overfit_data
    log = run_lora(capsys, "--model", str(hf_checkpoint), "--train", "--data", str(data), "--iters", "3",
                   "--batch-size", "1", "--fine-tune-type", "dora", "--learning-rate", "1e-3",
                   "--steps-per-report", "3", "--adapter-path", str(tmp_path))
    assert [it for it, _ in train_losses(log)] == [3]
    assert any(k.endswith(".m") for k in mx.load(str(tmp_path / "adapters.safetensors")))
    tuned, _ = load(hf_checkpoint, adapter_path=tmp_path)
    ids = mx.array([ids_of(20)])
    base = np.array(load(hf_checkpoint)[0](ids))
    assert np.abs(np.array(tuned(ids)) - base).max() > 1e-4  # the magnitudes and adapters were applied
