"""Multimodal logits and generation against transformers (expected values computed here).

Both sides read the same prompt: our processor's arrays, which test_media checks against
transformers' processor element by element."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import media_files as mf
import reference
from conftest import record_parity
from mlx_gemma.generation import generate_step, stream_generate
from mlx_gemma.prompt import MediaOptions, token_types
from test_parity import rel_err

W = reference.WINDOW


def image(h=300, w=400, seed=0):
    return Image.fromarray(mf.noise_image(h, w, seed))


def user(*items, text="describe"):
    return {"role": "user", "content": list(items) + [{"type": "text", "text": text}]}


def hf_logits(hf_model, inputs, ids, variant):
    """transformers' logits: `forward` is its forward() (default generate) masks; `generate`
    the masks its ForConditionalGeneration.create_masks_for_generate builds (static cache)."""
    arrays = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.arrays().items()}
    input_ids = torch.tensor([ids])
    types = torch.from_numpy(token_types(ids, reference.make_config())[None]).long()
    kwargs = dict(input_ids=input_ids, mm_token_type_ids=types, use_cache=False, **arrays)
    if variant == "generate":
        embeds = torch.zeros(1, len(ids), hf_model.config.text_config.hidden_size)
        kwargs["attention_mask"] = type(hf_model).create_masks_for_generate(
            hf_model.config, embeds, None, None, torch.arange(len(ids))[None], mm_token_type_ids=types)
    with torch.no_grad():
        return hf_model(**kwargs).logits[0].float().numpy()


def our_logits(model, inputs, ids, variant):
    model.vision_mask = variant
    try:
        return np.array(model(mx.array([ids]), **inputs.arrays())[0])
    finally:
        model.vision_mask = "generate"


def compare(model, hf_model, inputs, label, variants=("generate", "forward")):
    for variant in variants:
        err = rel_err(our_logits(model, inputs, inputs.ids, variant), hf_logits(hf_model, inputs, inputs.ids, variant))
        record_parity(f"float32 logits, {label} ({variant} mask)", err)
        assert err <= 1e-4, f"{label}, {variant} mask: {err}"


@pytest.mark.parametrize("budget", [70, 140, 280, 560, 1120])
def test_image_logits_at_every_budget(model, processor, hf_model, budget):
    inputs = processor.chat_inputs([user({"type": "image", "image": image()})],
                                   options=MediaOptions(image_budget=budget))
    assert inputs.token_counts()["image"] > W  # a block wider than the sliding window
    compare(model, hf_model, inputs, "one image, every budget")


def test_two_images_audio_and_text(model, processor, hf_model, tmp_path):
    wav = mf.write_wav(tmp_path / "a.wav", 44100, 0.7)
    two = processor.chat_inputs([user({"type": "image", "image": image()},
                                      {"type": "image", "image": image(120, 90, seed=1)})],
                                options=MediaOptions(image_budget=70))
    compare(model, hf_model, two, "two images")
    audio = processor.chat_inputs([user({"type": "audio", "audio": str(wav)})])
    compare(model, hf_model, audio, "audio", variants=("generate",))
    mixed = processor.chat_inputs([user({"type": "image", "image": image()}, {"type": "audio", "audio": str(wav)})],
                                  options=MediaOptions(image_budget=70))
    compare(model, hf_model, mixed, "image + audio + text")


def test_video_with_and_without_its_sound(model, processor, hf_model, tmp_path):
    path = mf.write_video(tmp_path / "clip.mp4")
    for with_audio in (False, True):
        inputs = processor.chat_inputs([user({"type": "video", "video": str(path)})],
                                       options=MediaOptions(video_audio=with_audio))
        assert bool(inputs.audio) == with_audio
        compare(model, hf_model, inputs, "video with its audio" if with_audio else "video")


def test_media_in_a_later_turn(model, processor, hf_model):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                user({"type": "image", "image": image()}, text="and this?")]
    inputs = processor.chat_inputs(messages, options=MediaOptions(image_budget=140))
    compare(model, hf_model, inputs, "multi-turn, image in the second turn")


@pytest.mark.parametrize("variant", ["generate", "forward"])
@pytest.mark.parametrize("chunk", [7, 40, 10_000], ids=["chunk-7", "chunk-40", "one-shot"])
def test_generation_path_equals_model_forward(model, processor, variant, chunk):
    """Chunked prefill (chunks smaller than the window and than the image block) and cached
    decode give the model forward's logits: blocks are never split."""
    inputs = processor.chat_inputs([user({"type": "image", "image": image()}, {"type": "image", "image": image(seed=2)},
                                         text="a b")], options=MediaOptions(image_budget=70))
    model.vision_mask = variant
    try:
        soft = model.embed_media(**inputs.arrays())
        steps = list(generate_step(model, inputs.ids, model.make_cache(), max_tokens=4, prefill_step_size=chunk,
                                   soft_tokens=soft))
        tokens = [t for t, _ in steps]
        full = np.array(model(mx.array([inputs.ids + tokens[:-1]]), **inputs.arrays())[0])
    finally:
        model.vision_mask = "generate"
    n = len(inputs.ids)
    for i, (_, logprobs) in enumerate(steps):
        expect = full[n - 1 + i] - np.log(np.exp(full[n - 1 + i] - full[n - 1 + i].max()).sum()) - full[n - 1 + i].max()
        err = float(np.abs(np.array(logprobs) - expect).max() / np.abs(expect).max())
        record_parity("generation path vs model forward, image prompt (chunked, cached)", err)
        assert err <= 1e-4, f"step {i}"


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_greedy_32_tokens_match_transformers_generate(model, processor, hf_model, tmp_path, kind):
    """transformers' generate (default cache) uses its forward() masks: ours with the same.
    The random fixture settles into repeating a token after a media prompt, so every step's
    whole distribution is compared too, not only the chosen token."""
    if kind == "image":
        item = {"type": "image", "image": image()}
    else:
        item = {"type": "audio", "audio": str(mf.write_wav(tmp_path / "a.wav", 16000, 0.6))}
    inputs = processor.chat_inputs([user(item)], options=MediaOptions(image_budget=70))
    arrays = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.arrays().items()}
    types = torch.from_numpy(token_types(inputs.ids, processor.config)[None]).long()
    out = hf_model.generate(input_ids=torch.tensor([inputs.ids]), mm_token_type_ids=types, max_new_tokens=32,
                            do_sample=False, output_scores=True,
                            return_dict_in_generate=True, **arrays)
    ref = out.sequences[0, len(inputs.ids):].tolist()
    model.vision_mask = "forward"
    try:
        ours = list(stream_generate(model, processor, inputs, max_tokens=32, temp=0.0, logits_processors=[]))
    finally:
        model.vision_mask = "generate"
    assert [r.token for r in ours][:len(ref)] == ref
    for r, scores in zip(ours, out.scores):
        expect = torch.log_softmax(scores[0].double(), -1).numpy()
        err = rel_err(np.array(r.logprobs), expect)
        record_parity(f"greedy generation log-probs vs transformers generate ({kind} prompt)", err)
        assert err <= 1e-4
