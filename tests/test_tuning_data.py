"""The fine-tuning dataset reader: ids as the processor (and transformers) render them, the
targets mask_prompt leaves, media arrays, and one error line per bad line of a file."""

import json

import numpy as np
import pytest
from PIL import Image

import media_files as mf
import reference
from mlx_gemma import media
from mlx_gemma.errors import InputError
from mlx_gemma.prompt import MediaOptions
from mlx_gemma.tuning.data import describe, load_datasets, load_split

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and a cat?"},
        {"role": "assistant", "content": "a cat is a cat."}]


def write(directory, split, *records):
    """Records as JSONL lines; a str is written as the line itself."""
    directory.mkdir(exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (directory / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return directory


def decoded_runs(processor, example):
    """The trained tokens, decoded one unbroken run at a time."""
    at = np.flatnonzero(example.trained)
    runs = np.split(at, np.flatnonzero(np.diff(at) != 1) + 1) if len(at) else []
    return [processor.decode(example.ids[r].tolist()) for r in runs]


def test_control_tokens_written_in_the_data_are_tokens(processor, tmp_path):
    """A thought channel written out in an assistant turn trains the channel's tokens, as mlx-lm
    tokenizes it (a request's text is kept plain: test_media)."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|channel>thought\nhm<channel|>hello"}]
    (example,) = load_split(write(tmp_path, "train", {"messages": chat}), "train", processor)
    assert example.ids.tolist() == processor.chat_inputs(chat, add_generation_prompt=False, raw_prompt=True).ids
    assert processor.thought_start_id in example.ids and processor.thought_end_id in example.ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Media beside the data, named relative to it."""
    directory = tmp_path_factory.mktemp("data")
    Image.fromarray(mf.noise_image(120, 160)).save(directory / "cat.png")
    mf.write_wav(directory / "meow.wav", 16000, 0.5)
    mf.write_video(directory / "clip.mp4", seconds=1.0, audio=False)
    (directory / "notes.png").write_text("not an image\n")
    return directory


def test_formats_render_as_the_processor_and_mlx_lm_do(processor, tmp_path):
    data = write(tmp_path, "train", {"messages": CHAT}, {"prompt": "hi there", "completion": "hello"},
                 {"text": "the cat is a cat."})
    chat, pair, text = load_split(data, "train", processor)
    assert chat.ids.tolist() == processor.chat_inputs(CHAT, add_generation_prompt=False).ids
    assert pair.ids.tolist() == processor.chat_inputs(CHAT[1:3], add_generation_prompt=False).ids
    # mlx-lm's TextDataset: tokenizer.encode (bos first), then eos appended.
    tok = processor.tokenizer
    assert text.ids.tolist() == [tok.bos_token_id] + processor.encode("the cat is a cat.", False) + [tok.eos_token_id]
    for example in (chat, pair, text):
        assert example.ids.dtype == np.int32 and example.trained.dtype == bool
        assert example.trained.tolist() == [False] + [True] * (len(example) - 1)
        assert example.media == {}
    assert [e.source for e in (chat, pair, text)] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]


def test_mask_prompt_trains_every_assistant_reply_and_its_end_of_turn(processor, tmp_path):
    data = write(tmp_path, "train", {"messages": CHAT}, {"prompt": "hi there", "completion": "hello"})
    chat, pair = load_split(data, "train", processor, mask_prompt=True)
    assert decoded_runs(processor, chat) == ["hello<turn|>", "a cat is a cat.<turn|>"]
    assert decoded_runs(processor, pair) == ["hello<turn|>"]
    # The same ids as without masking: only the targets change.
    assert chat.ids.tolist() == processor.chat_inputs(CHAT, add_generation_prompt=False).ids


def test_a_generation_prompt_prefill_is_not_trained(processor, tmp_path, monkeypatch):
    # Gemma 4's own template prefills an empty thought after the generation prompt when thinking
    # is off; that prefill is prompt, and the reply is found where it departs from it.
    prefill = reference.CHAT_TEMPLATE.replace("<|turn>model\n{% endif %}",
                                              "<|turn>model\n<|channel><channel|>{% endif %}")
    assert prefill != reference.CHAT_TEMPLATE
    monkeypatch.setattr(processor.tokenizer._tokenizer, "chat_template", prefill)
    data = write(tmp_path, "train", {"messages": CHAT})
    example, = load_split(data, "train", processor, mask_prompt=True)
    assert decoded_runs(processor, example) == ["hello<turn|>", "a cat is a cat.<turn|>"]


def test_tools_reach_the_template(processor, tmp_path, monkeypatch):
    naming = reference.CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{% for t in tools or [] %}"
                                             "{{ t['function']['name'] }}{% endfor %}")
    assert naming != reference.CHAT_TEMPLATE
    monkeypatch.setattr(processor.tokenizer._tokenizer, "chat_template", naming)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    data = write(tmp_path, "train", {"messages": CHAT, "tools": tools},
                 {"prompt": "hi there", "completion": "hello", "tools": tools}, {"messages": CHAT, "tools": "weather"})
    with pytest.raises(InputError, match=r"\ntrain.jsonl:3: 'tools' must be a list of function schemas"):
        load_split(data, "train", processor)
    write(tmp_path, "train", {"messages": CHAT, "tools": tools}, {"prompt": "hi there", "completion": "hello",
                                                                  "tools": tools})
    chat, pair = load_split(data, "train", processor, mask_prompt=True)
    assert chat.ids.tolist() == processor.chat_inputs(CHAT, add_generation_prompt=False, tools=tools).ids
    assert "weather" in processor.decode(pair.ids.tolist()[:12])
    assert decoded_runs(processor, chat) == ["hello<turn|>", "a cat is a cat.<turn|>"]


def test_multimodal_chat_matches_transformers(processor, files):
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "and"},
                                             {"type": "audio", "audio": str(files / "meow.wav")}]},  # absolute
                {"role": "assistant", "content": "a cat."}]
    write(files, "train", {"messages": messages})
    example, = load_split(files, "train", processor, mask_prompt=True)
    img = Image.open(files / "cat.png")
    hf = reference.make_processor()
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ref = hf(text=[text], images=[[img]], audio=[media.load_audio(files / "meow.wav")], add_special_tokens=False,
             return_tensors="np")
    assert example.ids.tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_allclose(example.media["pixel_values"], ref["pixel_values"], atol=1e-6)
    np.testing.assert_array_equal(example.media["image_position_ids"], ref["image_position_ids"])
    np.testing.assert_array_equal(example.media["input_features"], ref["input_features"])
    assert decoded_runs(processor, example) == ["a cat.<turn|>"]
    assert describe([example], "training", processor.config) == \
        f"1 training example ({len(example)} tokens, 1 image, 1 audio)"


def test_media_arrays_are_the_generation_paths(processor, files):
    content = [{"type": "video", "video": "clip.mp4"}, {"type": "image", "image": "cat.png"},
               {"type": "text", "text": "what moves?"}]
    write(files, "train", {"messages": [{"role": "user", "content": content},
                                        {"role": "assistant", "content": "the cat"}]})
    options = MediaOptions(image_budget=70, video_frames=2)
    example, = load_split(files, "train", processor, options=options)
    absolute = [{**p, p["type"]: str(files / p[p["type"]])} if p["type"] != "text" else p for p in content]
    inputs = processor.chat_inputs([{"role": "user", "content": absolute}, {"role": "assistant", "content": "the cat"}],
                                   add_generation_prompt=False, options=options)
    assert example.ids.tolist() == inputs.ids
    expected = inputs.arrays()
    assert example.media.keys() == expected.keys() >= {"pixel_values", "pixel_values_videos"}
    for name, array in expected.items():
        np.testing.assert_array_equal(example.media[name], array)


def test_each_bad_line_is_reported_with_its_file_and_line(processor, files):
    image = {"role": "user", "content": [{"type": "image", "image": "missing.png"}]}
    unreadable = {"role": "user", "content": [{"type": "image", "image": "notes.png"}]}
    lines = [
        {"messages": CHAT},                                                         # 1 good
        '{"messages": [',                                                           # 2
        "[1, 2]",                                                                   # 3
        {"question": "hi"},                                                         # 4
        {"messages": [{"role": "user", "content": [{"type": "smell", "smell": "x"}]}]},  # 5
        {"messages": [image, CHAT[2]]},                                             # 6
        {"messages": [unreadable, CHAT[2]]},                                        # 7
        {"text": "a " * 60},                                                        # 8 too long
        {"messages": [{"role": "bot", "content": "hi"}]},                           # 9
        {"prompt": "hi", "completion": 3},                                          # 10
    ]
    write(files, "train", *lines)
    with pytest.raises(InputError) as e:
        load_split(files, "train", processor, max_seq_length=100)
    summary, *problems = str(e.value).split("\n")
    assert summary == f"{files / 'train.jsonl'}: 9 bad lines"
    expected = {2: "invalid JSON (Expecting value at column 15)", 3: "a JSON list, not an object",
                4: "none of the known keys (it has 'question')",
                5: "part 1 has type 'smell'", 6: f"{files / 'missing.png'}: no such file",
                7: "notes.png: not an image file", 8: "tokens, over the maximum sequence length 100",
                9: "message 1 has role 'bot'", 10: "'prompt' and 'completion' must both be strings"}
    assert len(problems) == len(expected)
    for problem, (number, message) in zip(problems, expected.items()):
        assert problem.startswith(f"train.jsonl:{number}: ") and message in problem, problem


def test_mask_prompt_problems(processor, tmp_path, monkeypatch):
    write(tmp_path, "train", {"text": "the cat"}, {"messages": CHAT[1:2]}, {"messages": CHAT})
    with pytest.raises(InputError) as e:
        load_split(tmp_path, "train", processor, mask_prompt=True)
    assert str(e.value).split("\n")[1:] == [
        "train.jsonl:1: a 'text' example has no prompt to mask; train it without --mask-prompt, "
        "or give it as prompt/completion or messages",
        "train.jsonl:2: no assistant turn to train on (--mask-prompt trains only the assistant turns)"]
    # A template that writes the number of messages first renders no prefix as a prefix.
    counting = reference.CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{{ messages | length }}")
    assert counting != reference.CHAT_TEMPLATE
    monkeypatch.setattr(processor.tokenizer._tokenizer, "chat_template", counting)
    write(tmp_path, "train", {"messages": CHAT})
    with pytest.raises(InputError, match=r"\ntrain.jsonl:1: the chat template renders messages 1-2 differently"):
        load_split(tmp_path, "train", processor, mask_prompt=True)


def test_splits_missing_empty_and_optional(processor, tmp_path, capsys):
    with pytest.raises(InputError, match="no such data directory"):
        load_datasets(tmp_path / "nowhere", processor, mask_prompt=False, max_seq_length=64)
    with pytest.raises(InputError, match=r"train.jsonl: no such file \(the training data\)$"):
        load_datasets(tmp_path, processor, mask_prompt=False, max_seq_length=64)
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"train.jsonl: the file holds no examples$"):
        load_datasets(tmp_path, processor, mask_prompt=False, max_seq_length=64)
    write(tmp_path, "train", {"text": "the cat"}, {"text": "a cat"})
    write(tmp_path, "test", "not json")
    train, valid, test = load_datasets(tmp_path, processor, mask_prompt=False, max_seq_length=64)
    assert len(train) == 2 and valid == [] and test == []  # no valid: like mlx-lm; test unread
    tokens = sum(len(e) for e in train)
    assert capsys.readouterr().out == f"Loaded 2 training examples ({tokens} tokens) from {tmp_path}/train.jsonl\n"
    with pytest.raises(InputError, match=r"test.jsonl: 1 bad line\ntest.jsonl:1: invalid JSON"):
        load_datasets(tmp_path, processor, mask_prompt=False, max_seq_length=64, test=True)
