"""Fields and pieces more than one protocol has: sampling, bookkeeping, SSE framing."""

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from ..request import Request, penalty, sampling, stops
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
