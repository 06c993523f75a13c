"""OpenAI Chat Completions (`/v1/chat/completions`) and Completions (`/v1/completions`): the
wire format, translated to and from the internal `Request` / `Reply`."""

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from ..errors import ApiError, not_supported
from ..media import MediaPolicy, audio_item, detail_budget, image_item, one_budget, video_item
from ..request import MAX_CHOICES, MAX_TOP_LOGPROBS, Reply, Request, thinking_for_effort, tool_constraint
from ..tools import call_for_template, function
from .base import Body, tagged
from .common import (Count, Effort, JsonObjectFormat, OpenAISampling, Penalties, SchemaSpec, StructuredOutputs,
                     TextFormat, answer_schema, choice_name, sse)


class ImageURL(Body):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: Union[str, ImageURL]


class AudioData(Body):
    data: str
    format: str


class AudioPart(Body):
    type: Literal["input_audio"]
    input_audio: AudioData


class VideoURL(Body):
    url: str


class VideoPart(Body):
    type: Literal["video_url"]
    video_url: Union[str, VideoURL]


Part = tagged(TextPart, ImagePart, AudioPart, VideoPart)


class CalledFunction(Body):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCall(Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[Part]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    # What an SDK echoes back of an earlier reply: past thoughts are left out of the prompt,
    # as Gemma's template does; the rest is empty or informational.
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None
    refusal: Optional[str] = None
    annotations: Optional[list] = None
    audio: None = None
    function_call: None = None


class FunctionDecl(Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDecl


class ChatJsonSchema(Body):
    type: Literal["json_schema"]
    json_schema: SchemaSpec


class NamedFunction(Body):
    name: str


class NamedChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Body):
    include_usage: bool = False


class TemplateKwargs(Body):
    enable_thinking: bool = False


Choices = Optional[Annotated[int, Field(ge=1, le=MAX_CHOICES)]]  # `n`: replies to one prompt


class ChatRequest(OpenAISampling, Penalties):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Count = None
    max_completion_tokens: Count = None
    n: Choices = None
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["auto", "none", "required"], NamedChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[tagged(TextFormat, JsonObjectFormat, ChatJsonSchema)] = None
    structured_outputs: Optional[StructuredOutputs] = None
    reasoning_effort: Effort = None
    chat_template_kwargs: Optional[TemplateKwargs] = None
    image_budget: Optional[int] = None


class CompletionRequest(OpenAISampling, Penalties):
    prompt: str = Field(min_length=1)
    max_tokens: Count = None
    n: Choices = None
    stream_options: Optional[StreamOptions] = None
    echo: Optional[Literal[False]] = None
    logprobs: Optional[Literal[0]] = None
    raw_prompt: bool = False  # an extension: control-token strings in `prompt` act as control tokens


def image_budget(given: Optional[int], budgets: set) -> Optional[int]:
    from ... import media

    if given is not None and given not in media.BUDGETS:
        raise ApiError(400, f"image_budget: must be one of {', '.join(map(str, media.BUDGETS))}", param="image_budget")
    return one_budget(budgets, given, "image_budget")


def _content(content, policy: MediaPolicy, temp_files: list, budgets: set):
    if content is None or isinstance(content, str):
        return content or ""
    items = []
    for part in content:
        if part.type == "text":
            items.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            spec = part.image_url
            if isinstance(spec, ImageURL):
                detail_budget(spec.detail, budgets)
            items.append(image_item(spec if isinstance(spec, str) else spec.url, policy, "image_url", "messages"))
        elif part.type == "input_audio":
            items.append(audio_item(part.input_audio.data, part.input_audio.format, policy, "input_audio",
                                    "messages"))
        else:
            url = part.video_url if isinstance(part.video_url, str) else part.video_url.url
            items.append(video_item(url, policy, temp_files, "video_url", "messages"))
    return items


def _arguments(arguments, at: str) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise ApiError(400, f"{at}: arguments are not valid JSON", param="messages") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{at}: arguments must be a JSON object", param="messages")
    return value


def messages(body: list, policy: MediaPolicy, temp_files: list, budgets: set) -> list:
    """Chat messages -> the library's (media decoded; paths only as the policy allows)."""
    out, call_names = [], {}
    for i, m in enumerate(body):
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role,
                                   "content": _content(m.content, policy, temp_files, budgets)}
        if role == "assistant" and m.tool_calls:
            message["tool_calls"] = [call_for_template(c.id, c.function.name,
                                                       _arguments(c.function.arguments, f"messages[{i}].tool_calls[{j}]"))
                                     for j, c in enumerate(m.tool_calls)]
            call_names.update((c.id, c.function.name) for c in m.tool_calls)
        if role == "tool":
            # Gemma 4 names the function in its response block; OpenAI gives only the call's id.
            name = m.name or call_names.get(m.tool_call_id)
            message.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", name)) if v is not None})
        out.append(message)
    return out


def constraint_and_tools(body, tools: list, parallel: bool, answer: Optional[dict]):
    """What Chat Completions and Responses share: (tools for the template, the constraint,
    whether calls are forbidden) from `tool_choice`, the answer's format and `structured_outputs`."""
    if body.structured_outputs is not None:
        if tools:
            raise not_supported("structured_outputs", "cannot be combined with tools (use response_format)")
        return None, body.structured_outputs.constraint(), False
    return tool_constraint(tools, choice_name(body.tool_choice), parallel, answer)


def chat_request(body: ChatRequest, policy: MediaPolicy) -> Request:
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs: must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
    if top and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    thinking = (body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else False) \
        or thinking_for_effort(body.reasoning_effort)
    tools = [function(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    parallel = body.parallel_tool_calls is not False
    tools, constraint, forbid = constraint_and_tools(body, tools, parallel, answer_schema(body.response_format))
    request = body.sampled(
        max_tokens=body.max_completion_tokens or body.max_tokens, thinking=thinking, tools=tools,
        parallel_tool_calls=parallel, constraint=constraint, forbid_tool_calls=forbid,
        top_logprobs=(top or 0) if body.logprobs else None, n=body.n or 1, **body.penalties())
    budgets: set = set()
    try:
        request.messages = messages(body.messages, policy, request.temp_files, budgets)
        request.image_budget = image_budget(body.image_budget, budgets)
    except BaseException:
        from ..media import remove_files

        remove_files(request.temp_files)
        raise
    return request


def completion_request(body: CompletionRequest) -> Request:
    return body.sampled(prompt=body.prompt, raw_prompt=body.raw_prompt, max_tokens=body.max_tokens,
                        n=body.n or 1, **body.penalties())


FINISH = {"stop_sequence": "stop"}  # OpenAI says "stop" for an end of turn and a stop string alike


def usage(replies: list) -> dict:
    """The prompt once (it was prefilled once), the completion tokens of every choice, as OpenAI counts them."""
    prompt, cached = replies[0].prompt_tokens, replies[0].cached_tokens
    generated = sum(r.generated for r in replies)
    drafted, accepted = sum(r.drafted for r in replies), sum(r.accepted for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": sum(r.reasoning_tokens for r in replies),
                                          # OpenAI's names for predicted tokens kept and thrown away
                                          "accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": drafted - accepted}}


def openai_calls(calls: list) -> list:
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


class Chat:
    """Renders a request's replies (`n` of them, the choices) as Chat Completions (`chat`) or Completions."""

    def __init__(self, served: str, chat: bool, logprobs: bool = False, include_usage: bool = False):
        self.served, self.chat, self.logprobs, self.include_usage = served, chat, logprobs, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def _body(self, choices: list, **extra) -> dict:
        kind = self.kind + ".chunk" if self.chat and extra.pop("chunk", False) else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served, "choices": choices,
                **extra}

    def _choice(self, index: int, reply: Reply) -> dict:
        finish = FINISH.get(reply.finish, reply.finish)
        if not self.chat:
            return {"index": index, "text": reply.text, "finish_reason": finish, "logprobs": None}
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or (None if reply.calls else "")}
        if reply.reasoning:
            message["reasoning"] = reply.reasoning
        if reply.calls:
            message["tool_calls"] = openai_calls(reply.calls)
        logprobs = {"content": reply.logprobs} if self.logprobs else None
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}

    def response(self, replies: list) -> dict:
        return self._body([self._choice(i, reply) for i, reply in enumerate(replies)], usage=usage(replies))

    async def stream(self, generation):
        """Each choice's chunks carry its index; a choice's finish chunk comes when it ends."""
        replies = generation.replies
        pending: list = [[] for _ in replies]  # a choice's logprobs ride with its next chunk
        calls = [0] * len(replies)

        def chunk(index: int, fields: dict, finish=None) -> str:
            if not self.chat:
                choice = {"index": index, "text": fields.get("content", ""), "finish_reason": finish,
                          "logprobs": None}
                return sse(self._body([choice]))
            logprobs = {"content": pending[index][:]} if pending[index] else None
            pending[index].clear()
            return sse(self._body([{"index": index, "delta": fields, "finish_reason": finish,
                                    "logprobs": logprobs}], chunk=True))

        if self.chat:
            for index in range(len(replies)):
                yield chunk(index, {"role": "assistant", "content": ""})
        async for index, kind, value in generation.choices():
            if kind == "logprob":
                pending[index].append(value)
            elif kind == "reasoning":
                yield chunk(index, {"reasoning": value})
            elif kind == "text":
                yield chunk(index, {"content": value})
            elif kind == "call":
                yield chunk(index, {"tool_calls": [dict(openai_calls([value])[0], index=calls[index])]})
                calls[index] += 1
            else:  # "end": the choice's reply is over
                yield chunk(index, {}, FINISH.get(value.finish, value.finish))
        if self.include_usage:
            yield sse(self._body([], usage=usage(replies), chunk=True))
        yield "data: [DONE]\n\n"

    @staticmethod
    def error(e: ApiError) -> str:
        return sse(e.body())
