"""Fine-tuning data: `DIR/{train,valid,test}.jsonl` → token ids, the targets the loss counts,
and the media arrays behind the placeholders, all checked before anything trains.

One JSON object per line, in mlx-lm's formats (`mlx_lm/tuner/datasets.py`), told apart per line
in mlx-lm's order:
- `{"prompt": str, "completion": str}`: a user turn and an assistant turn;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat. A content may be a list of parts
  `{"type": "text", "text": ...}`, `{"type": "image" | "audio" | "video", KIND: "path"}`, paths
  relative to DIR (or absolute);
- `{"text": str}`: raw text, bos first and eos last, as mlx-lm's TextDataset has it (Gemma's
  tokenizer.encode adds the bos; the eos is appended unless the text ends with it).
Chats and prompt/completion pairs (either may carry `"tools"`) are rendered by the checkpoint's
chat template through `Processor.chat_inputs`, the same code generation uses, media included.

Which tokens train (`Example.trained[i]`: the loss counts predicting ids[i] from ids[:i]):
- without mask_prompt, every token after the first (as mlx-lm);
- with mask_prompt, the content of *every* assistant turn and its end-of-turn marker. mlx-lm
  trains only what follows the last message's prompt, which drops the earlier replies of a
  multi-turn chat from the loss; each reply in the data is meant to be learnt. The header the
  template writes before a reply (`<|turn>model\\n`, and what the generation prompt adds) is
  the prompt, and what it writes after the end-of-turn marker is never generated, so neither
  trains. A turn's bounds come from rendering prefixes of the conversation, so the template must
  render every prefix as a prefix of the whole; a line where it does not is reported.
  A `text` line has no prompt to mask: with mask_prompt it is reported (as mlx-lm refuses).

Unlike mlx-lm, which truncates long examples with a warning, an example longer than
max_seq_length tokens is reported: a truncated reply teaches the model to stop mid-sentence.
The media arrays stay in memory with their examples (float32 pixels: 7.7 MB per image at
budget 280, 1.9 MB per 30 s of audio).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..prompt import MediaOptions, PromptInputs, check_messages

SPLITS = {"train": "training", "valid": "validation", "test": "test"}
MEDIA_PARTS = ("image", "audio", "video")


@dataclass
class Example:
    ids: np.ndarray  # [L] int32, placeholders expanded
    trained: np.ndarray  # [L] bool: the loss counts ids[i] (never i = 0)
    media: dict  # Model.embed_media(**media) arrays (PromptInputs.arrays()); {} for text
    source: str  # "train.jsonl:12"

    def __len__(self):
        return len(self.ids)


def load_datasets(directory, processor, *, mask_prompt: bool, max_seq_length: int,
                  options: Optional[MediaOptions] = None, test: bool = False,
                  train: bool = True) -> tuple[list, list, list]:
    """(train, valid, test) as mlx-lm reads them: train is required when training, valid is
    optional, test is read (and required) only when asked for; `train=False` (evaluation only)
    skips train and valid. A file that is there but empty is an error in every split. Prints one
    line per split read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such data directory (it holds train.jsonl, valid.jsonl, test.jsonl)")
    wanted = {"train": train, "valid": train, "test": test}
    splits = {}
    for split, needed in wanted.items():
        examples = load_split(directory, split, processor, mask_prompt=mask_prompt, max_seq_length=max_seq_length,
                              options=options, required=split != "valid") if needed else []
        if examples:
            print(f"Loaded {describe(examples, SPLITS[split], processor.config)} from {directory / split}.jsonl",
                  flush=True)
        splits[split] = examples
    return splits["train"], splits["valid"], splits["test"]


def load_split(directory: Path, split: str, processor, *, mask_prompt: bool = False, max_seq_length: int = 2048,
               options: Optional[MediaOptions] = None, required: bool = True) -> list[Example]:
    """Every example of DIR/SPLIT.jsonl, or one InputError listing each bad line (file:line and
    what is wrong, one line each). A missing file is an error only when `required`."""
    path = Path(directory) / f"{split}.jsonl"
    if not path.is_file():
        if required:
            raise InputError(f"{path}: no such file (the {SPLITS.get(split, split)} data)")
        return []
    examples, problems = [], []
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                example = _example(_record(line), source, path.parent, processor, mask_prompt, options)
                if len(example) > max_seq_length:
                    raise InputError(f"{len(example)} tokens, over the maximum sequence length {max_seq_length} "
                                     "(shorten or split the example, or raise --max-seq-length)")
            except InputError as e:
                problems.append(f"{source}: {' '.join(str(e).removeprefix('prompt: ').split())}")
            else:
                examples.append(example)
    if problems:
        raise InputError(f"{path}: {len(problems)} bad line{'s' * (len(problems) > 1)}\n" + "\n".join(problems))
    if not examples:
        raise InputError(f"{path}: the file holds no examples")
    return examples


def describe(examples: list, what: str, config) -> str:
    """'1,000 training examples (123,456 tokens, 12 images, 3 audio)': the media that are there."""
    counts = {"token": sum(len(e) for e in examples),
              "image": sum(_runs(e.ids, config.image_token_id) for e in examples),
              "video": sum(len(e.media.get("num_frames_per_video", ())) for e in examples),
              "audio": sum(_runs(e.ids, config.audio_token_id) for e in examples)}
    parts = [_count(n, kind) for kind, n in counts.items() if n or kind == "token"]
    return f"{_count(len(examples), what + ' example')} ({', '.join(parts)})"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1 and noun != 'audio')}"


def _runs(ids: np.ndarray, token: int) -> int:
    """Media of one kind: each image or clip is one unbroken run of its placeholder."""
    at = ids == token
    return int(np.sum(at[1:] & ~at[:-1]) + at[:1].sum())


def _record(line: bytes) -> dict:
    try:
        record = json.loads(line.strip())  # without its newline, a column names the place
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"a JSON {type(record).__name__}, not an object")
    return record


def _format(record: dict) -> str:
    """mlx-lm's order: a prompt/completion pair, else messages, else text."""
    if {"prompt", "completion"} <= record.keys():
        return "completion"
    for key in ("messages", "text"):
        if key in record:
            return key
    given = ", ".join(map(repr, record)) or "none"
    raise InputError(f"none of the known keys (it has {given}); give 'messages', 'prompt' and 'completion', "
                     "or 'text'")


def _example(record: dict, source: str, directory: Path, processor, mask_prompt: bool,
             options: Optional[MediaOptions]) -> Example:
    kind = _format(record)
    if kind == "text":
        ids = _text_ids(record["text"], processor, mask_prompt)
        return Example(ids, _after_first(len(ids)), {}, source)
    messages, tools = _conversation(record, kind, directory)
    # The data is the trainer's own text: a thought channel or a tool call written out in it means
    # those tokens, as mlx-lm tokenizes it (a request's text never does: Processor.chat_inputs).
    inputs = processor.chat_inputs(messages, add_generation_prompt=False, options=options, tools=tools,
                                   raw_prompt=True)
    ids = np.array(inputs.ids, np.int32)
    trained = _assistant_turns(inputs, tools, processor, options) if mask_prompt else _after_first(len(ids))
    return Example(ids, trained, inputs.arrays(), source)


def _after_first(length: int) -> np.ndarray:
    trained = np.ones(length, bool)
    trained[0] = False  # nothing predicts the first token
    return trained


def _text_ids(text, processor, mask_prompt: bool) -> np.ndarray:
    if not isinstance(text, str):
        raise InputError(f"'text' is a {type(text).__name__}, not a string")
    if mask_prompt:
        raise InputError("a 'text' example has no prompt to mask; train it without --mask-prompt, "
                         "or give it as prompt/completion or messages")
    # mlx-lm relies on Gemma's tokenizer adding the bos; written here, a tokenizer without
    # that post-processor gives the same ids.
    tokenizer = processor.tokenizer
    ids = [tokenizer.bos_token_id] + processor.encode(text, add_special_tokens=False)
    return np.array(ids if ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id], np.int32)


def _conversation(record: dict, kind: str, directory: Path) -> tuple[list, Optional[list]]:
    """The record as chat messages, media paths resolved against DIR, and its tools."""
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InputError("'tools' must be a list of function schemas (JSON objects)")
    if kind == "completion":
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise InputError("'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tools
    messages = record["messages"]
    check_messages(messages)
    return [_with_paths(m, i, directory) for i, m in enumerate(messages, start=1)], tools


def _with_paths(message: dict, number: int, directory: Path) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for j, part in enumerate(content, start=1):
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InputError(f"message {number} part {j}: a text part needs a 'text' string")
            parts.append(part)
        elif kind in MEDIA_PARTS:
            file = part.get(kind)
            if not isinstance(file, str):
                raise InputError(f"message {number} part {j}: the {kind} part needs its {kind!r} file path")
            parts.append({"type": kind, kind: str(directory / Path(file).expanduser())})  # an absolute path stays
        else:
            raise InputError(f"message {number} part {j} has type {kind!r}; use text, image, audio or video")
    return {**message, "content": parts}


def _assistant_turns(inputs: PromptInputs, tools: Optional[list], processor,
                     options: Optional[MediaOptions]) -> np.ndarray:
    """True on every assistant turn's content and end-of-turn marker, found by rendering the
    conversation up to each turn (the loaded media re-render without reading files again)."""
    ids, messages = inputs.ids, inputs.messages
    trained = np.zeros(len(ids), bool)

    def render(upto: int, add_generation_prompt: bool) -> list:
        return processor.chat_inputs(messages[:upto], add_generation_prompt=add_generation_prompt,
                                     options=options, tools=tools, raw_prompt=True).ids

    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise InputError("message 1 is an assistant turn with no prompt before it (--mask-prompt)")
        before, through = render(k, False), render(k + 1, False)
        for n, prefix in ((k, before), (k + 1, through)):
            if ids[:len(prefix)] != prefix:
                raise InputError(f"the chat template renders messages 1-{n} differently from the start of the "
                                 "whole conversation, so --mask-prompt cannot find the assistant turns")
        # The reply starts where it departs from the generation prompt: the turn header (and
        # anything the generation prompt prefills, such as an empty thought) is the prompt.
        start = max(len(before), _common_prefix(render(k, True), ids))
        trained[start:_turn_end(through, start, processor.eos_token_ids)] = True
    if not trained.any():
        raise InputError("no assistant turn to train on (--mask-prompt trains only the assistant turns)")
    return trained


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _turn_end(through: list, start: int, eos_ids: set) -> int:
    """Just past the turn's end-of-turn marker: the model stops there, so what the template
    writes after it (a newline) is never generated and does not train."""
    ends = [i for i in range(start, len(through)) if through[i] in eos_ids]
    return ends[-1] + 1 if ends else len(through)
