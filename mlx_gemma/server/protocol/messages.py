"""Anthropic Messages (`/v1/messages`, version 2023-06-01, and `/v1/messages/count_tokens`): the
wire format, translated to and from the internal `Request` / `Reply`."""

import json
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import Field

from ..errors import ApiError, not_supported
from ..media import MediaPolicy, decode_base64, image_bytes_item, image_item, remove_files
from ..request import Reply, Request, plain, sampling, stops, tool_constraint
from ..tools import call_for_template, function
from .base import Body, Open, tagged, texts
from .common import sse


class Cached(Body):
    cache_control: Optional[dict[str, Any]] = None  # a hint for Anthropic's cache; ours is automatic


class TextBlock(Cached):
    type: Literal["text"]
    text: str
    citations: Optional[list] = None


class Base64Source(Body):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(Body):
    type: Literal["url"]
    url: str


class ImageBlock(Cached):
    type: Literal["image"]
    source: tagged(Base64Source, URLSource)


class ToolUseBlock(Cached):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Cached):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Optional[Union[str, list[tagged(TextBlock, ImageBlock)]]] = None
    is_error: Optional[bool] = None
    toolset_name: Optional[str] = None


class ThinkingBlock(Body):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlock(Body):
    type: Literal["redacted_thinking"]
    data: str


Block = tagged(TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock)


class Message(Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class Tool(Cached):
    name: str
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None  # Anthropic's server tools (bash, web_search, ...) are not run here
    # Accepted; `strict` schema enforcement comes with constrained decoding (calls are parsed as JSON).
    strict: Optional[bool] = None
    input_examples: Optional[list] = None
    allowed_callers: Optional[list] = None
    defer_loading: Optional[bool] = None
    eager_input_streaming: Optional[bool] = None


class ChoiceAuto(Body):
    type: Literal["auto"]
    disable_parallel_tool_use: Optional[bool] = None


class ChoiceAny(Body):
    type: Literal["any"]
    disable_parallel_tool_use: Optional[bool] = None


class ChoiceTool(Body):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: Optional[bool] = None


class ChoiceNone(Body):
    type: Literal["none"]


Display = Optional[Literal["summarized", "omitted"]]  # "omitted": thought, but not shown


class ThinkingOn(Body):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1)
    display: Display = None


class ThinkingOff(Body):
    type: Literal["disabled"]


class ThinkingAdaptive(Body):
    type: Literal["adaptive"]
    display: Display = None


class JsonOutputFormat(Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Body):
    effort: Optional[str] = None  # a hint with no Gemma equivalent: accepted
    format: Optional[JsonOutputFormat] = None


class Conversation(Body):
    """What count_tokens reads: everything that makes the prompt."""

    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlock]]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[tagged(ChoiceAuto, ChoiceAny, ChoiceTool, ChoiceNone)] = None
    thinking: Optional[tagged(ThinkingOn, ThinkingOff, ThinkingAdaptive)] = None


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[Open] = None
    output_config: Optional[OutputConfig] = None
    # Bookkeeping: accepted, nothing generated changes.
    cache_control: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    speed: Optional[str] = None
    inference_geo: Optional[str] = None
    diagnostics: Optional[dict[str, Any]] = None
    user_profile_id: Optional[str] = None
    workspace_id: Optional[str] = None


def _image(block: ImageBlock, policy: MediaPolicy, where: str) -> dict:
    source = block.source
    if source.type == "url":
        return image_item(source.url, policy, where, "messages")
    return image_bytes_item(decode_base64(source.data, f"{where}.source.data", "messages"), policy, where, "messages")


def _messages(body: Conversation, policy: MediaPolicy) -> list:
    out = []
    if body.system:
        out.append({"role": "system", "content": texts(body.system, "system")})
    names = {}  # tool_use id -> tool name (Gemma's response block names the tool)
    for i, m in enumerate(body.messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        items, calls, results = [], [], False
        for j, block in enumerate(blocks):
            where = f"messages[{i}].content[{j}]"
            if block.type == "text":
                items.append({"type": "text", "text": block.text})
            elif block.type == "image":
                items.append(_image(block, policy, where))
            elif block.type == "tool_use":
                if m.role != "assistant":
                    raise ApiError(400, f"{where}: tool_use blocks belong in assistant messages", param="messages")
                names[block.id] = block.name
                calls.append(call_for_template(block.id, block.name, block.input))
            elif block.type == "tool_result":
                if m.role != "user":
                    raise ApiError(400, f"{where}: tool_result blocks belong in user messages", param="messages")
                if block.tool_use_id not in names:
                    raise ApiError(400, f"{where}.tool_use_id: no earlier tool_use has the id "
                                        f"{block.tool_use_id[:100]!r}", param="messages")
                if items:  # what came before the result keeps its place
                    out.append({"role": "user", "content": plain(items)})
                    items = []
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "name": names[block.tool_use_id],
                            "content": texts(block.content or "", f"{where}.content")})
                results = True
            # thinking / redacted_thinking: past thoughts are left out of the prompt, as Gemma's template does
        if m.role == "assistant":
            message = {"role": "assistant", "content": plain(items)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        elif items or not results:
            out.append({"role": "user", "content": plain(items)})
    if out[-1]["role"] == "assistant":
        raise not_supported("messages", "the last message must be the user's (continuing an assistant "
                                        "message is not supported)")
    return out


CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's tool_choice, as OpenAI names it


def conversation_request(body: Conversation, policy: MediaPolicy, answer: Optional[dict] = None) -> Request:
    """The prompt part (count_tokens reads only this); `answer`: the JSON Schema the text follows."""
    choice = body.tool_choice
    parallel = not (choice is not None and getattr(choice, "disable_parallel_tool_use", False))
    tools = [function(t.name, t.description, t.input_schema) for t in body.tools or []]
    name = "auto" if choice is None else choice.name if choice.type == "tool" else CHOICES[choice.type]
    tools, constraint, forbid = tool_constraint(tools, name, parallel, answer)
    thinking = body.thinking is not None and body.thinking.type != "disabled"
    budget = body.thinking.budget_tokens if thinking and body.thinking.type == "enabled" else None
    request = Request(tools=tools, parallel_tool_calls=parallel, thinking=thinking, thinking_budget=budget,
                      constraint=constraint, forbid_tool_calls=forbid)
    try:
        request.messages = _messages(body, policy)
    except BaseException:
        remove_files(request.temp_files)
        raise
    return request


def messages_request(body: MessagesRequest, policy: MediaPolicy) -> Request:
    fmt = body.output_config.format if body.output_config else None
    request = conversation_request(body, policy, fmt.schema_ if fmt else None)
    request.max_tokens = body.max_tokens
    request.sampling = sampling(body.temperature, body.top_p, body.top_k)
    request.stop = stops(body.stop_sequences, "stop_sequences")
    return request


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence",
                "tool_calls": "tool_use"}


def usage(reply: Reply, output: bool = True) -> dict:
    """Anthropic counts cache reads apart: input + cache reads = the prompt's tokens."""
    return {"input_tokens": reply.prompt_tokens - reply.cached_tokens, "cache_read_input_tokens": reply.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": reply.generated if output else 0}


def tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"][5:], "name": call["name"],
            "input": json.loads(call["arguments"])}


class Messages:
    """Renders one reply as an Anthropic message, whole or as its event stream."""

    def __init__(self, served: str, body: Conversation):
        self.served, self.id = served, f"msg_{uuid.uuid4().hex[:24]}"
        self.show_thinking = body.thinking is None or getattr(body.thinking, "display", None) != "omitted"

    def _message(self, reply: Reply, content: list, done: bool) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.served, "content": content,
                "stop_reason": STOP_REASONS[reply.finish] if done else None,
                "stop_sequence": reply.stop_sequence if done else None, "usage": usage(reply, done)}

    def response(self, reply: Reply) -> dict:
        content = []
        if reply.reasoning:
            content.append({"type": "thinking", "thinking": reply.reasoning if self.show_thinking else "",
                            "signature": ""})
        if reply.text or not reply.calls:
            content.append({"type": "text", "text": reply.text})
        content += [tool_use(c) for c in reply.calls]
        return self._message(reply, content, done=True)

    async def stream(self, generation):
        reply = generation.reply
        yield sse({"type": "message_start", "message": self._message(reply, [], done=False)}, "message_start")
        yield sse({"type": "ping"}, "ping")
        index, open_kind = -1, None

        def start(block: dict):
            nonlocal index, open_kind
            index, open_kind = index + 1, block["type"]
            return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

        def delta(fields: dict) -> str:
            return sse({"type": "content_block_delta", "index": index, "delta": fields}, "content_block_delta")

        def stop() -> str:
            nonlocal open_kind
            open_kind = None
            return sse({"type": "content_block_stop", "index": index}, "content_block_stop")

        async for kind, value in generation.events():
            wanted = {"reasoning": "thinking", "text": "text", "call": "tool_use"}.get(kind)
            if wanted is None:
                continue
            if open_kind is not None and (open_kind != wanted or wanted == "tool_use"):
                yield stop()
            if kind == "call":
                block = tool_use(value)
                yield start(dict(block, input={}))
                yield delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                continue
            if open_kind is None:
                yield start({"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning"
                            else {"type": "text", "text": ""})
            if kind == "text":
                yield delta({"type": "text_delta", "text": value})
            elif self.show_thinking:
                yield delta({"type": "thinking_delta", "thinking": value})
        if open_kind is not None:
            yield stop()
        yield sse({"type": "message_delta", "delta": {"stop_reason": STOP_REASONS[reply.finish],
                                                      "stop_sequence": reply.stop_sequence},
                   "usage": usage(reply)}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")

    @staticmethod
    def error(e: ApiError) -> str:
        return sse(e.body("anthropic"), "error")
