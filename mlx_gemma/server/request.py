"""The one request every protocol translates into, and the one reply it translates out of.

Chat Completions, Responses and Messages differ in their wire formats only: each builds a
`Request` (chat messages with decoded media, tools, sampling, stops, thinking) and reads a
`Reply` back, so every protocol runs the same generation path."""

import math
from dataclasses import dataclass, field
from typing import Optional

from ..constrain import Constraint, ConstraintError
from .errors import ApiError

MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1000
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # Chat Completions' `n`: sequences that share one prompt's prefill


@dataclass
class Request:
    messages: Optional[list] = None  # the library's chat messages (media decoded), or
    prompt: Optional[str] = None  # a prompt without the chat template: its text, or
    raw_prompt: bool = False  # with control tokens where it spells them (`<|turn>`)
    tools: Optional[list] = None  # OpenAI-style function declarations, for the chat template
    parallel_tool_calls: bool = True  # False: the reply ends after its first call
    max_tokens: Optional[int] = None  # None: the server's --max-tokens
    sampling: dict = field(default_factory=dict)  # temp, top_p, top_k, min_p (unset: the server's)
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list = field(default_factory=list)
    thinking: bool = False
    thinking_budget: Optional[int] = None  # most tokens inside the thought channel
    image_budget: Optional[int] = None
    top_logprobs: Optional[int] = None  # None: no logprobs; else alternatives per token
    constraint: Optional[Constraint] = None  # the grammar the reply follows (after any thoughts)
    forbid_tool_calls: bool = False  # tool_choice "none": the call's start token never comes
    n: int = 1  # replies sampled from the one prompt (Chat Completions' choices)
    temp_files: list = field(default_factory=list)  # uploads to remove once read


# Why a reply ended: "stop" (end of turn), "length" (max_tokens or the context), "stop_sequence"
# (a stop string), "tool_calls" (the model called tools and waits for their results).
@dataclass
class Reply:
    text: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)  # {"id", "name", "arguments": JSON text}
    logprobs: list = field(default_factory=list)
    finish: str = "stop"
    stop_sequence: Optional[str] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated: int = 0
    reasoning_tokens: int = 0
    drafted: int = 0  # MTP drafts verified, and accepted
    accepted: int = 0


def plain(items: list):
    """Content of text items only as one string, as Chat Completions clients send it (so every
    protocol renders the same prompt for the same conversation)."""
    if all(item["type"] == "text" for item in items):
        return "".join(item["text"] for item in items)
    return items


def sampling(temperature=None, top_p=None, top_k=None, min_p=None, seed=None) -> dict:
    """The sampling fields a client gave, checked; messages name the client's fields."""
    from ..errors import InputError
    from ..generation import check_sampling

    try:
        check_sampling(temperature, top_p, top_k, min_p, seed)
    except InputError as e:  # the message names the CLI flag; a client knows the field
        names = {"--temp": "temperature", "--top-p": "top_p", "--top-k": "top_k", "--min-p": "min_p",
                 "--seed": "seed"}
        text = str(e)
        flag = text.split(" ", 1)[0]
        raise ApiError(400, names.get(flag, flag) + text[len(flag):], param=names.get(flag)) from None
    given = {"temp": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    return {k: v for k, v in given.items() if v is not None}


def stops(value, name: str = "stop") -> list:
    stop = [] if value is None else [value] if isinstance(value, str) else value
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"{name}: must be a non-empty string or a list of them", param=name)
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"{name}: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       param=name)
    return stop


def penalty(value, name: str) -> float:
    """OpenAI's presence / frequency penalty: from -2 to 2."""
    if value is None:
        return 0.0
    if not math.isfinite(value) or not -2 <= value <= 2:
        raise ApiError(400, f"{name}: must be from -2 to 2, got {value}", param=name)
    return float(value)


def thinking_for_effort(effort: Optional[str]) -> bool:
    """OpenAI's reasoning effort on Gemma's one switch: thinking unless the effort is none."""
    return effort not in (None, "none")


def constrained(field: str, make) -> Constraint:
    """A constraint from a request's field; one that cannot compile is a 400 naming the field,
    before any prefill."""
    try:
        return make()
    except ConstraintError as e:
        raise ApiError(400, f"{field}: {e.detail}", param=field.split(".")[0]) from None


def tool_constraint(tools: list, choice, parallel: bool, answer: Optional[dict], field: str = "tool_choice"):
    """(tools for the template, the reply's constraint, whether calls are forbidden) for `choice`:
    "auto", "none", "required" or a tool's name. `answer`: a JSON Schema the text answer follows."""
    if not tools:
        if choice not in ("auto", "none"):
            raise ApiError(400, f"{field}: {choice!r} needs tools, and the request declares none", param=field)
        answer_only = constrained("response_format", lambda: Constraint.json_schema(answer)) if answer else None
        return None, answer_only, False
    if choice == "none":
        answer_only = constrained("response_format", lambda: Constraint.json_schema(answer)) if answer else None
        return None, answer_only, True
    names = [t["function"]["name"] for t in tools]
    if choice not in ("auto", "required") and choice not in names:
        raise ApiError(400, f"{field}: {choice!r} is not a declared tool ({', '.join(names)[:200]})", param=field)
    return tools, constrained("tools", lambda: Constraint.tool_calls(tools, choice, parallel, answer)), False
