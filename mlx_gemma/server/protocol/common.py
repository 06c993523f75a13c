"""Fields and pieces more than one protocol has: sampling, bookkeeping, SSE framing."""

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from ...constrain import Constraint

from ..request import Request, constrained, penalty, sampling, stops
from .base import Body

Count = Optional[Annotated[int, Field(ge=1)]]  # a token count: at least 1
Effort = Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]]


class OpenAISampling(Body):
    """What Chat Completions, Completions and Responses share. The bookkeeping fields (`user`,
    `store`, `metadata`, `service_tier`, `prompt_cache_key`, `safety_identifier`) are accepted and
    change nothing that is generated; every other field is honoured or refused."""

    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stream: bool = False
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    def sampled(self, **fields) -> Request:
        return Request(sampling=sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed),
                       seed=self.seed, **fields)


class Penalties(Body):
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None

    def penalties(self) -> dict:
        return {"presence_penalty": penalty(self.presence_penalty, "presence_penalty"),
                "frequency_penalty": penalty(self.frequency_penalty, "frequency_penalty"),
                "stop": stops(self.stop)}


def sse(data: dict, event: Optional[str] = None) -> str:
    """One server-sent event (Responses and Messages name theirs; Chat Completions does not)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


class SchemaSpec(Body):
    """A JSON Schema as OpenAI wraps it (`json_schema` in Chat, the format itself in Responses)."""

    name: Optional[str] = None
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None  # enforced either way: a constraint is never a suggestion


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class StructuredOutputs(Body):
    """vLLM's extension for what OpenAI's formats cannot say: one of a regex or a Lark grammar."""

    regex: Optional[str] = None
    grammar: Optional[str] = None

    def constraint(self) -> Constraint:
        given = [k for k in ("regex", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            from ..errors import ApiError

            raise ApiError(400, "structured_outputs: give exactly one of regex and grammar", param="structured_outputs")
        if given[0] == "regex":
            return constrained("structured_outputs.regex", lambda: Constraint.regex(self.regex))
        return constrained("structured_outputs.grammar", lambda: Constraint.lark(self.grammar))


def answer_schema(fmt) -> Optional[dict]:
    """The JSON Schema a format asks the answer to follow (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    spec = fmt.json_schema if hasattr(fmt, "json_schema") else fmt
    return spec.schema_


def choice_name(choice) -> str:
    """OpenAI's tool_choice as "auto", "none", "required" or the name of the forced tool."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return choice.function.name if hasattr(choice, "function") else choice.name
