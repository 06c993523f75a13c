"""OpenAI Responses (`/v1/responses`): the wire format, translated to and from the internal
`Request` / `Reply`, and the items a stored response keeps for `previous_response_id`.

A chained request's prompt is built from the stored items exactly as if the client had resent
them: the stored history is the earlier requests' input items and their outputs, as items."""

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import TypeAdapter

from ..errors import ApiError, not_supported
from ..media import MediaPolicy, audio_item, detail_budget, image_item, one_budget, remove_files
from ..request import Reply, Request, plain, thinking_for_effort
from ..tools import call_for_template, function
from .base import Body, Open, tagged
from .chat import AudioData, constraint_and_tools
from .common import (Count, Effort, JsonObjectFormat, OpenAISampling, SchemaSpec, StructuredOutputs, TextFormat,
                     answer_schema, sse)


class InputText(Body):
    type: Literal["input_text"]
    text: str


class InputImage(Body):
    type: Literal["input_image"]
    image_url: Optional[str] = None
    file_id: Optional[str] = None
    detail: Optional[Literal["auto", "low", "high"]] = None


class InputAudio(Body):
    type: Literal["input_audio"]
    input_audio: AudioData


class OutputText(Body):
    type: Literal["output_text"]
    text: str
    annotations: Optional[list] = None
    logprobs: Optional[list] = None


class Refusal(Body):
    type: Literal["refusal"]
    refusal: str


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[tagged(InputText, InputImage, InputAudio, OutputText, Refusal)]]
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[tagged(InputText, OutputText)]]
    id: Optional[str] = None
    status: Optional[str] = None


class ReasoningItem(Body):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]]
    id: Optional[str] = None
    content: Optional[list] = None
    encrypted_content: Optional[str] = None
    status: Optional[str] = None


Item = tagged(MessageItem, FunctionCallItem, FunctionOutputItem, ReasoningItem, default="message")
ITEMS = TypeAdapter(list[Item])


class FunctionTool(Body):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Reasoning(Body):
    effort: Effort = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None  # the summary is the thought itself
    generate_summary: Optional[Literal["auto", "concise", "detailed"]] = None


class ResponsesJsonSchema(SchemaSpec):
    type: Literal["json_schema"]


class NamedFunction(Body):
    type: Literal["function"]
    name: str


class TextConfig(Body):
    format: Optional[tagged(TextFormat, JsonObjectFormat, ResponsesJsonSchema)] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # a hint with no Gemma equivalent


class ResponsesRequest(OpenAISampling):
    input: Union[str, list[Item]]
    instructions: Optional[str] = None
    max_output_tokens: Count = None
    tools: Optional[list[tagged(FunctionTool)]] = None
    tool_choice: Optional[Union[Literal["auto", "none", "required"], NamedFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    structured_outputs: Optional[StructuredOutputs] = None
    reasoning: Optional[Reasoning] = None
    text: Optional[TextConfig] = None
    previous_response_id: Optional[str] = None
    include: Optional[list[str]] = None
    truncation: Optional[Literal["disabled"]] = None
    background: Optional[Literal[False]] = None
    stream_options: Optional[Open] = None


def as_items(value) -> list:
    """The request's `input` as item dicts (what a stored response keeps)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [item.model_dump(exclude_none=True) for item in value]


def _content(content, policy: MediaPolicy, budgets: set, where: str):
    if isinstance(content, str):
        return content
    items = []
    for j, part in enumerate(content):
        what = f"{where}.content[{j}]"
        if part.type in ("input_text", "output_text"):
            items.append({"type": "text", "text": part.text})
        elif part.type == "refusal":
            items.append({"type": "text", "text": part.refusal})
        elif part.type == "input_image":
            if part.image_url is None:
                raise not_supported(f"{what}.file_id", "files are not stored here: give image_url (a data URL)",
                                    param="input")
            detail_budget(part.detail, budgets)
            items.append(image_item(part.image_url, policy, f"{what}.image_url", "input"))
        else:
            items.append(audio_item(part.input_audio.data, part.input_audio.format, policy, f"{what}.input_audio",
                                    "input"))
    return plain(items)


def messages(instructions: Optional[str], items: list, policy: MediaPolicy, budgets: set) -> list:
    """Items -> the library's chat messages. Calls that follow each other (or an assistant
    message) form one assistant turn, as Chat Completions sends them; reasoning items are left
    out, as Gemma's template leaves out past thoughts."""
    out = [{"role": "system", "content": instructions}] if instructions is not None else []
    names = {}
    for i, item in enumerate(ITEMS.validate_python(items)):
        where = f"input[{i}]"
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _content(item.content, policy, budgets, where)})
        elif item.type == "function_call":
            try:
                arguments = json.loads(item.arguments or "{}")
            except json.JSONDecodeError:
                raise ApiError(400, f"{where}.arguments: not valid JSON", param="input") from None
            if not isinstance(arguments, dict):
                raise ApiError(400, f"{where}.arguments: must be a JSON object", param="input")
            names[item.call_id] = item.name
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call_for_template(item.call_id, item.name, arguments))
        elif item.type == "function_call_output":
            if item.call_id not in names:
                raise ApiError(400, f"{where}.call_id: no earlier function_call has the call_id "
                                    f"{item.call_id[:100]!r}", param="input")
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "name": names[item.call_id], "content": output})
    return out


def responses_request(body: ResponsesRequest, history: list, policy: MediaPolicy) -> tuple[Request, list]:
    """(the request, the conversation's items: `history` (a stored response's) and this input)."""
    items = history + as_items(body.input)
    tools = [function(t.name, t.description, t.parameters) for t in body.tools or []]
    parallel = body.parallel_tool_calls is not False
    tools, constraint, forbid = constraint_and_tools(body, tools, parallel,
                                                     answer_schema(body.text.format if body.text else None))
    request = body.sampled(max_tokens=body.max_output_tokens, tools=tools, parallel_tool_calls=parallel,
                           constraint=constraint, forbid_tool_calls=forbid,
                           thinking=thinking_for_effort(body.reasoning.effort if body.reasoning else None))
    budgets: set = set()
    try:
        request.messages = messages(body.instructions, items, policy, budgets)
        request.image_budget = one_budget(budgets, None, "input")
    except BaseException:
        remove_files(request.temp_files)
        raise
    return request, items


def output_items(reply: Reply) -> list:
    out = []
    if reply.reasoning:
        out.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}",
                    "summary": [{"type": "summary_text", "text": reply.reasoning}]})
    if reply.text or not reply.calls:
        out.append(message_item(reply.text, "completed"))
    out += [call_item(c, "completed") for c in reply.calls]
    return out


def message_item(text: Optional[str], status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": status, "role": "assistant",
            "content": content}


def call_item(call: dict, status: str) -> dict:
    return {"type": "function_call", "id": "fc_" + call["id"][5:], "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"] if status == "completed" else "", "status": status}


def usage(reply: Reply) -> dict:
    return {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": reply.cached_tokens},
            "output_tokens": reply.generated, "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
            "total_tokens": reply.prompt_tokens + reply.generated}


class Responses:
    """Renders one reply as a Response object, whole or as its event stream."""

    def __init__(self, served: str, body: ResponsesRequest):
        self.served, self.body = served, body
        self.id, self.created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        self.sequence = 0

    def response(self, reply: Optional[Reply], output: list) -> dict:
        b = self.body
        incomplete = reply is not None and reply.finish == "length"
        status = "in_progress" if reply is None else "incomplete" if incomplete else "completed"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.served,
                "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
                "previous_response_id": b.previous_response_id,
                "reasoning": {"effort": b.reasoning.effort if b.reasoning else None, "summary": None},
                "store": b.store is not False, "temperature": b.temperature, "top_p": b.top_p,
                "text": {"format": b.text.format.model_dump(by_alias=True, exclude_none=True)
                         if b.text and b.text.format else {"type": "text"}},
                "tool_choice": b.tool_choice.model_dump() if isinstance(b.tool_choice, Body) else b.tool_choice or "auto",
                "tools": [t.model_dump(exclude_none=True) for t in b.tools or []], "truncation": "disabled",
                "usage": usage(reply) if reply is not None else None, "user": b.user, "metadata": b.metadata or {}}

    def _event(self, kind: str, **fields) -> str:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, kind)

    async def stream(self, generation, done):
        """The events `responses.stream()` consumes; `done(response, output)` is called with the
        finished response before its last event (to store it)."""
        yield self._event("response.created", response=self.response(None, []))
        yield self._event("response.in_progress", response=self.response(None, []))
        output: list = []
        item: Optional[dict] = None

        def close():
            nonlocal item
            events, i, done_item = [], len(output) - 1, output[-1]
            if done_item["type"] == "reasoning":
                part = done_item["summary"][0]
                events += [self._event("response.reasoning_summary_text.done", item_id=done_item["id"],
                                       output_index=i, summary_index=0, text=part["text"]),
                           self._event("response.reasoning_summary_part.done", item_id=done_item["id"],
                                       output_index=i, summary_index=0, part=part)]
            elif done_item["type"] == "message":
                part = done_item["content"][0]
                events += [self._event("response.output_text.done", item_id=done_item["id"], output_index=i,
                                       content_index=0, text=part["text"], logprobs=[]),
                           self._event("response.content_part.done", item_id=done_item["id"], output_index=i,
                                       content_index=0, part=part)]
            done_item["status"] = "completed"
            events.append(self._event("response.output_item.done", output_index=i, item=done_item))
            item = None
            return events

        def open_item(new: dict):
            nonlocal item
            item = new
            output.append(new)
            i = len(output) - 1
            events = [self._event("response.output_item.added", output_index=i, item=dict(new, **(
                {"summary": []} if new["type"] == "reasoning" else {"content": []} if new["type"] == "message"
                else {})))]
            if new["type"] == "reasoning":
                events.append(self._event("response.reasoning_summary_part.added", item_id=new["id"],
                                          output_index=i, summary_index=0, part={"type": "summary_text", "text": ""}))
            elif new["type"] == "message":
                events.append(self._event("response.content_part.added", item_id=new["id"], output_index=i,
                                          content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                                 "logprobs": []}))
            return events

        async for kind, value in generation.events():
            if kind == "logprob":
                continue
            wanted = {"reasoning": "reasoning", "text": "message", "call": "function_call"}[kind]
            if item is not None and item["type"] != wanted:
                for event in close():
                    yield event
            i = len(output) - (item is not None)
            if kind == "call":
                call = call_item(value, "in_progress")
                for event in open_item(call):
                    yield event
                yield self._event("response.function_call_arguments.delta", item_id=call["id"], output_index=i,
                                  delta=value["arguments"])
                call["arguments"] = value["arguments"]
                yield self._event("response.function_call_arguments.done", item_id=call["id"], output_index=i,
                                  name=call["name"], arguments=value["arguments"])
                for event in close():
                    yield event
                continue
            if item is None:
                new = ({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}",
                        "summary": [{"type": "summary_text", "text": ""}]} if kind == "reasoning"
                       else dict(message_item("", "in_progress")))
                for event in open_item(new):
                    yield event
                i = len(output) - 1
            if kind == "reasoning":
                item["summary"][0]["text"] += value
                yield self._event("response.reasoning_summary_text.delta", item_id=item["id"], output_index=i,
                                  summary_index=0, delta=value)
            else:
                item["content"][0]["text"] += value
                yield self._event("response.output_text.delta", item_id=item["id"], output_index=i,
                                  content_index=0, delta=value, logprobs=[])
        if item is not None:
            for event in close():
                yield event
        if all(o["type"] == "reasoning" for o in output):  # a reply has a message, if empty
            for event in open_item(message_item("", "in_progress")) + close():
                yield event
        reply = generation.reply
        response = self.response(reply, output)
        done(response, output)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield self._event(kind, response=response)

    def error(self, e: ApiError) -> str:
        return self._event("error", code=e.code, message=e.message, param=e.param)
