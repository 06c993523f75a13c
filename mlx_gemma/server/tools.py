"""Tool declarations in, Gemma 4 tool-call text out: `<|tool_call>call:NAME{...}<tool_call|>`
blocks parsed by mlx-lm's Gemma 4 parser, whole or as they stream."""

import json
import uuid


def function(name: str, description, parameters) -> dict:
    """One tool as the chat template reads it (OpenAI's function declaration)."""
    decl = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description:
        decl["description"] = description
    return {"type": "function", "function": decl}


def call_for_template(call_id, name: str, arguments: dict) -> dict:
    """A past call in an assistant message: templates read the arguments as a mapping."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str) -> tuple[str, list]:
    """Gemma 4's call blocks -> (the text around them, [{"id", "name", "arguments": JSON text}]).
    A block that does not parse stays in the text."""
    from mlx_lm.tool_parsers import gemma4

    start, end = gemma4.tool_call_start, gemma4.tool_call_end
    if start not in text:
        return text, []
    calls, kept, rest = [], [], text
    while start in rest:
        before, _, after = rest.partition(start)
        body, _, rest = after.partition(end)
        kept.append(before)
        try:
            parsed = gemma4.parse_tool_call(body)
        except (ValueError, json.JSONDecodeError):
            kept.append(start + body + end)
            continue
        for call in parsed if isinstance(parsed, list) else [parsed]:
            calls.append({"id": new_call_id(), "name": call["name"], "arguments": json.dumps(call["arguments"])})
    kept.append(rest)
    return "".join(kept), calls


def take_calls(held: str) -> tuple[str, list, str]:
    """Streamed text so far -> (text to send now, whole tool calls, what must wait: a call
    without its end marker yet, or a tail that may begin one)."""
    from mlx_lm.tool_parsers import gemma4

    start, end = gemma4.tool_call_start, gemma4.tool_call_end
    content, calls = [], []
    while True:
        at = held.find(start)
        if at < 0:
            keep = max((k for k in range(1, len(start)) if held.endswith(start[:k])), default=0)
            content.append(held[:len(held) - keep])
            held = held[len(held) - keep:]
            break
        content.append(held[:at])
        held = held[at:]
        close = held.find(end)
        if close < 0:
            break
        block, held = held[:close + len(end)], held[close + len(end):]
        text, found = parse_calls(block)
        content.append(text)
        calls += found
    return "".join(content), calls, held
