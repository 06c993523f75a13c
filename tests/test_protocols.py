"""The three wire protocols on one server: OpenAI Chat Completions, OpenAI Responses and Anthropic
Messages, driven by the real `openai` and `anthropic` SDKs (and the agent frameworks built on
them) against a live server on 127.0.0.1. Every expected text is computed by our own `generate`."""

import base64
import json
import re

import anthropic
import mlx.core as mx
import pytest

from mlx_gemma.constrain import Constraint
from mlx_gemma.generation import generate, stream_generate
from test_server import (KEY, TOOLS, Server, data_url, forced_ids, forced_server, png_bytes,  # noqa: F401
                         tool_checkpoint, user)

SYSTEM = "you are a terse assistant."
APP = "http://app.example:3000"  # the web page the server lets in


@pytest.fixture(scope="module")
def server(hf_checkpoint, tmp_path_factory):
    """Greedy by default (`--temp 0`): the Anthropic SDK no longer sends a temperature, and agent
    frameworks send what their settings say."""
    s = Server(hf_checkpoint, tmp_path_factory.mktemp("protocols") / "server.log", "--temp", "0",
               "--responses-store-count", "50", "--cors-allow-origin", APP)
    yield s
    s.stop()


def anthropic_client(server, **kwargs):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "p.png"
    path.write_bytes(png_bytes())
    return path


def conversation(picture):
    """One conversation (system, an image, an earlier answer, a second question) in the library's
    form and in each protocol's."""
    png = picture.read_bytes()
    first, answer, second = "what is in the picture", "a small square", "and its colour?"
    library = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": [{"type": "image", "image": str(picture)}, {"type": "text", "text": first}]},
               {"role": "assistant", "content": answer}, user(second)]
    chat = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                         {"type": "text", "text": first}]},
            {"role": "assistant", "content": answer}, user(second)]
    responses = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(png, "image/png")},
                                              {"type": "input_text", "text": first}]},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]},
                 {"role": "user", "content": second}]
    messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png).decode()}},
        {"type": "text", "text": first}]},
        {"role": "assistant", "content": answer}, {"role": "user", "content": [{"type": "text", "text": second}]}]
    return library, chat, responses, messages


def final_response(events):
    """The Response of a finished stream (`response.incomplete` when it hit max_output_tokens: the
    SDK's `get_final_response()` only takes `response.completed`, as OpenAI's own API sends)."""
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete"), last.type
    return last.response


def test_one_conversation_gives_the_same_greedy_text_in_every_protocol(server, model, processor, picture):
    library, chat, items, blocks = conversation(picture)
    expected = generate(model, processor, library, temp=0.0, max_tokens=10)
    prompt_tokens = len(processor.chat_inputs(library).ids)
    client = server.client()

    r = client.chat.completions.create(model="any-name", messages=chat, max_tokens=10)
    assert (r.choices[0].message.content, r.usage.prompt_tokens, r.model) == (expected, prompt_tokens, server.name)
    chunks = list(client.chat.completions.create(model="any-name", messages=chat, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected

    response = client.responses.create(model="gpt-5", instructions=SYSTEM, input=items, max_output_tokens=10)
    assert (response.output_text, response.usage.input_tokens) == (expected, prompt_tokens)
    with client.responses.stream(model="gpt-5", instructions=SYSTEM, input=items, max_output_tokens=10) as stream:
        events = list(stream)
    streamed = final_response(events)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert streamed.output_text == expected
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == \
        (response.usage.input_tokens, response.usage.output_tokens)
    assert [e.sequence_number for e in events] == list(range(len(events)))

    claude = anthropic_client(server)
    message = claude.messages.create(model="claude-sonnet-4-5", system=SYSTEM, messages=blocks, max_tokens=10)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == expected
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt_tokens
    assert message.stop_reason == ("max_tokens" if message.usage.output_tokens == 10 else "end_turn")
    with claude.messages.stream(model="claude-sonnet-4-5", system=SYSTEM, messages=blocks, max_tokens=10) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == expected
    assert (final.usage.output_tokens, final.stop_reason) == (message.usage.output_tokens, message.stop_reason)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == prompt_tokens
    assert final.usage.cache_read_input_tokens > 0  # the same prompt again: the prefix cache answers

    counted = claude.messages.count_tokens(model="claude-sonnet-4-5", system=SYSTEM, messages=blocks)
    assert counted.input_tokens == prompt_tokens


def test_stop_sequences_and_penalties_are_honoured(server, model, processor):
    from mlx_gemma.generation import completion_penalties, make_sampling

    messages = [user("count with me")]
    full = generate(model, processor, messages, temp=0.0, max_tokens=16)
    stop = full[3:5]
    claude = anthropic_client(server)
    cut = claude.messages.create(model="m", messages=messages, max_tokens=16, stop_sequences=[stop])
    assert (cut.content[0].text, cut.stop_reason, cut.stop_sequence) == (full[:full.find(stop)], "stop_sequence", stop)

    _, processors = make_sampling(processor, temp=0.0)
    penalised = generate(model, processor, messages, temp=0.0, max_tokens=16,
                         logits_processors=processors + [completion_penalties(1.5, 0.7)])
    assert penalised != full  # the penalties change this reply: the test below can tell them apart
    r = server.client().chat.completions.create(model="m", messages=messages, max_tokens=16, presence_penalty=1.5,
                                                frequency_penalty=0.7)
    assert r.choices[0].message.content == penalised


def test_previous_response_id_equals_resending_the_history(server):
    client = server.client()
    first = client.responses.create(model="m", instructions=SYSTEM, input="name a colour", max_output_tokens=8)
    chained = client.responses.create(model="m", instructions=SYSTEM, previous_response_id=first.id,
                                      input="and a number", max_output_tokens=8)
    history = [{"role": "user", "content": "name a colour"}, *[o.model_dump(exclude_none=True) for o in first.output],
               {"role": "user", "content": "and a number"}]
    resent = client.responses.create(model="m", instructions=SYSTEM, input=history, max_output_tokens=8, store=False)
    assert chained.output_text == resent.output_text
    assert chained.usage.input_tokens == resent.usage.input_tokens
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # the prefix cache
    assert client.responses.retrieve(chained.id).output_text == chained.output_text
    items = client.responses.input_items.list(chained.id, order="asc").data
    assert [i.type for i in items] == ["message", "message", "message"]
    assert items[0].content[0].text == "name a colour" if not isinstance(items[0].content, str) else True
    status, body, _ = server.request("GET", f"/v1/responses/{resent.id}")  # store=False: never kept
    assert status == 404 and body["error"]["code"] == "not_found"
    client.responses.delete(first.id)
    status, body, _ = server.request("POST", "/v1/responses", {"previous_response_id": first.id, "input": "x"})
    assert status == 400 and "no stored response has the id" in body["error"]["message"]


# --- tools and thinking, on the forced server (test_server.py) ------------------------------------

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
FORCED = [("get_weather", {"city": "Paris"}), ("get_time", {"hours": 2, "zone": "CET"})]


def after_calls(model, tools_processor, ask, results=("sunny", "14:00")) -> tuple[str, int]:
    """The greedy reply once the forced calls' results are in, and its prompt's length."""
    library = ask + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in FORCED]}] + [
        {"role": "tool", "name": n, "content": r} for (n, _), r in zip(FORCED, results)]
    inputs = tools_processor.chat_inputs(library, tools=TOOLS)
    assert tools_processor.decode(inputs.ids).count("<|tool_response>") == 2
    # Tools on "auto": the reply is held to text or well-formed calls (constrain.Constraint.tool_calls).
    auto = Constraint.tool_calls(TOOLS, "auto")
    return generate(model, tools_processor, inputs, temp=0.0, max_tokens=8, constraint=auto), len(inputs.ids)


@pytest.fixture(scope="module")
def tool_model(tool_checkpoint):
    from mlx_gemma import load

    return load(tool_checkpoint)


def test_anthropic_tool_round_trip(forced_server, tool_model):
    model, tools_processor = tool_model
    claude = anthropic_client(forced_server)
    ask = [{"role": "user", "content": "weather and time in Paris?"}]
    message = claude.messages.create(model="m", system="use tools", messages=ask, tools=ANTHROPIC_TOOLS,
                                     max_tokens=200)
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == FORCED and all(b.id.startswith("toolu_") for b in uses)
    with claude.messages.stream(model="m", system="use tools", messages=ask, tools=ANTHROPIC_TOOLS,
                                max_tokens=200) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == FORCED
    assert final.stop_reason == "tool_use"

    back = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                      {"type": "tool_result", "tool_use_id": uses[1].id,
                       "content": [{"type": "text", "text": "14:00"}]}]}]
    reply = claude.messages.create(model="m", system="use tools", messages=back, tools=ANTHROPIC_TOOLS,
                                   max_tokens=8, extra_body={"temperature": 0})
    expected, prompt_tokens = after_calls(model, tools_processor, [{"role": "system", "content": "use tools"},
                                                                   user("weather and time in Paris?")])
    assert reply.content[0].text == expected
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == prompt_tokens

    one = claude.messages.create(model="m", system="use tools", messages=ask, tools=ANTHROPIC_TOOLS, max_tokens=200,
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [(b.name, b.input) for b in one.content if b.type == "tool_use"] == FORCED[:1]


def test_responses_tool_round_trip(forced_server, tool_model):
    model, tools_processor = tool_model
    client = forced_server.client()
    ask = [{"role": "user", "content": "weather and time in Paris?"}]
    first = client.responses.create(model="m", instructions="use tools", input=ask, tools=RESPONSES_TOOLS,
                                    max_output_tokens=200)
    calls = [o for o in first.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == FORCED
    with client.responses.stream(model="m", instructions="use tools", input=ask, tools=RESPONSES_TOOLS,
                                 max_output_tokens=200) as stream:
        events = list(stream)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, json.loads(e.arguments)) for e in done] == FORCED
    assert [(c.name, json.loads(c.arguments)) for c in final_response(events).output if c.type == "function_call"] \
        == FORCED

    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": r} for c, r in zip(calls, ("sunny",
                                                                                                        "14:00"))]
    expected, prompt_tokens = after_calls(model, tools_processor, [{"role": "system", "content": "use tools"},
                                                                   user("weather and time in Paris?")])
    resent = client.responses.create(model="m", instructions="use tools", tools=RESPONSES_TOOLS, temperature=0,
                                     input=ask + [c.model_dump(exclude_none=True) for c in calls] + outputs,
                                     max_output_tokens=8)
    chained = client.responses.create(model="m", instructions="use tools", tools=RESPONSES_TOOLS, temperature=0,
                                      previous_response_id=first.id, input=outputs, max_output_tokens=8)
    assert resent.output_text == chained.output_text == expected
    assert resent.usage.input_tokens == chained.usage.input_tokens == prompt_tokens


def test_chat_parallel_tool_calls_false_keeps_the_first_call(forced_server):
    r = forced_server.client().chat.completions.create(
        model="m", messages=[user("weather and time in Paris?")], tools=TOOLS, max_tokens=200,
        parallel_tool_calls=False)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == FORCED[:1]
    assert r.choices[0].finish_reason == "tool_calls"


def test_thinking_comes_back_as_thinking_blocks_and_reasoning_summaries(forced_server, model, processor):
    forced = forced_ids(processor)["thinking"]
    ids = iter(forced)
    pieces = list(stream_generate(model, processor, [user("plan it")], enable_thinking=True, max_tokens=32,
                                  sampler=lambda logprobs: mx.array([next(ids, forced[-1])]), logits_processors=[]))
    thought = "".join(p.text for p in pieces if p.thinking)
    answer = "".join(p.text for p in pieces if not p.thinking)
    assert thought and answer

    claude = anthropic_client(forced_server)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "plan it"}], max_tokens=32,
                  thinking={"type": "enabled", "budget_tokens": 16})
    def blocks(message):
        return [(b.type, b.thinking if b.type == "thinking" else b.text) for b in message.content]

    message = claude.messages.create(**kwargs)
    assert blocks(message) == [("thinking", thought), ("text", answer)]
    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == thought
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == answer
    hidden = claude.messages.create(**dict(kwargs, thinking={"type": "enabled", "budget_tokens": 16,
                                                             "display": "omitted"}))
    assert blocks(hidden) == [("thinking", ""), ("text", answer)]
    # A past thought passed back in is left out of the prompt, as Gemma's template does.
    back = [{"role": "user", "content": "plan it"}, {"role": "assistant", "content": [
        b.model_dump(exclude_none=True) for b in message.content]}, {"role": "user", "content": "go on"}]
    plain = [{"role": "user", "content": "plan it"}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "go on"}]
    assert claude.messages.count_tokens(model="m", messages=back).input_tokens == \
        claude.messages.count_tokens(model="m", messages=plain).input_tokens

    client = forced_server.client()
    response = client.responses.create(model="m", input="plan it", reasoning={"effort": "high"},
                                       max_output_tokens=32)
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert (response.output[0].summary[0].text, response.output_text) == (thought, answer)
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    with client.responses.stream(model="m", input="plan it", reasoning={"effort": "high"},
                                 max_output_tokens=32) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == thought
    assert final_response(events).output_text == answer


# --- agent frameworks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_server(tool_checkpoint, processor, tmp_path_factory):
    """The forced server that, once the tools' results are in, answers "all done" and ends its turn."""
    from test_server import FORCING_BOOT

    forced = forced_ids(processor)
    forced["after_tools"] = processor.encode("all done", add_special_tokens=False) + forced["tools"][-1:]
    s = Server(tool_checkpoint, tmp_path_factory.mktemp("agent-server") / "log", "--max-tokens", "200",
               boot=["-c", FORCING_BOOT, json.dumps(forced)])
    yield s
    s.stop()


def test_openai_agents_run_a_function_tool_through_both_models(agent_server):
    from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """the weather in a city"""
        seen.append(("get_weather", {"city": city}))
        return "sunny"

    @function_tool
    def get_time(zone: str, hours: int) -> str:
        """the time somewhere"""
        seen.append(("get_time", {"hours": hours, "zone": zone}))
        return "14:00"

    client = AsyncOpenAI(base_url=agent_server.url + "/v1", api_key=KEY, max_retries=0)
    for model in (OpenAIChatCompletionsModel("gemma", client), OpenAIResponsesModel("gemma", client)):
        seen.clear()
        agent = Agent(name="a", instructions="use tools", tools=[get_weather, get_time], model=model)
        result = Runner.run_sync(agent, "weather and time in Paris?", max_turns=3)
        assert (seen, result.final_output) == (FORCED, "all done"), type(model).__name__


def test_pydantic_ai_text_agents_through_anthropic_and_openai(server, model, processor):
    from pydantic_ai import Agent
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.anthropic import AnthropicProvider
    from pydantic_ai.providers.openai import OpenAIProvider

    expected = generate(model, processor, [{"role": "system", "content": SYSTEM}, user("hello")], temp=0.0,
                        max_tokens=8)
    for llm in (AnthropicModel("claude-x", provider=AnthropicProvider(base_url=server.url, api_key=KEY)),
                OpenAIChatModel("gpt-x", provider=OpenAIProvider(base_url=server.url + "/v1", api_key=KEY))):
        agent = Agent(llm, system_prompt=SYSTEM)
        assert agent.run_sync("hello", model_settings={"max_tokens": 8}).output == expected, type(llm).__name__


# --- hostile requests -----------------------------------------------------------------------------

MSG, RESP = "/v1/messages", "/v1/responses"
HI = [{"role": "user", "content": "hi"}]

HOSTILE = [  # id, path, body, status, message regex
    ("messages-no-max-tokens", MSG, {"model": "m", "messages": HI}, 400, r"^max_tokens: is required"),
    ("messages-zero-max-tokens", MSG, {"messages": HI, "max_tokens": 0}, 400, r"^max_tokens: must be at least 1"),
    ("messages-unknown-block", MSG, {"messages": [{"role": "user", "content": [{"type": "document"}]}],
                                     "max_tokens": 4}, 400, r"^messages\[0\]\.content\[0\]: type 'document' is not one"),
    ("messages-text-block-without-text", MSG, {"messages": [{"role": "user", "content": [{"type": "text"}]}],
                                               "max_tokens": 4}, 400, r"^messages\[0\]\.content\[0\]\.text: is required"),
    ("messages-bad-role", MSG, {"messages": [{"role": "system", "content": "x"}], "max_tokens": 4}, 400,
     r"^messages\[0\]\.role: must be 'user' or 'assistant'"),
    ("messages-tool-result-unknown-id", MSG, {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}], "max_tokens": 4}, 400,
     r"tool_use_id: no earlier tool_use has the id 'toolu_nope'"),
    ("messages-bad-base64-image", MSG, {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "@@"}}]}], "max_tokens": 4}, 400, r"not valid base64"),
    ("messages-not-an-image", MSG, {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": base64.b64encode(b"hello").decode()}}]}],
        "max_tokens": 4}, 400, r"not an image"),
    ("messages-url-image-off", MSG, {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "http://127.0.0.1:9/a.png"}}]}], "max_tokens": 4}, 400, r"--allow-remote-media"),
    ("messages-image-over-body-cap", MSG, {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "A" * 4_000_000}}]}], "max_tokens": 4}, 413,
     r"over the limit"),
    ("messages-server-tool", MSG, {"messages": HI, "max_tokens": 4, "tools": [
        {"type": "bash_20250124", "name": "bash"}]}, 400, r"^tools\[0\]\.(type|input_schema)"),
    ("messages-output-format", MSG, {"messages": HI, "max_tokens": 4, "output_config": {"format": {
        "type": "json_schema", "schema": {"not": {}}}}}, 400, r'^response_format: Unimplemented keys: \["not"\]'),
    ("messages-tool-choice-unknown", MSG, {"messages": HI, "max_tokens": 4, "tools": [
        {"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}}, 400,
     r"^tool_choice: 'g' is not a declared tool \(f\)"),
    ("messages-prefill", MSG, {"messages": HI + [{"role": "assistant", "content": "The"}], "max_tokens": 4}, 400,
     r"^messages: the last message must be the user's"),
    ("messages-unknown-field", MSG, {"messages": HI, "max_tokens": 4, "container": "x"}, 400,
     r"^container: not a supported parameter"),
    ("count-tokens-no-messages", MSG + "/count_tokens", {"model": "m"}, 400, r"^messages: is required"),
    ("responses-no-input", RESP, {"model": "m"}, 400, r"^input: is required"),
    ("responses-web-search", RESP, {"input": "hi", "tools": [{"type": "web_search"}]}, 400,
     r"^tools\[0\]: type 'web_search' is not one of 'function'"),
    ("responses-local-shell", RESP, {"input": "hi", "tools": [{"type": "local_shell"}]}, 400,
     r"type 'local_shell' is not one of 'function'"),
    ("responses-json-schema-unsupported", RESP, {"input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object", "dependentSchemas": {}}}}}, 400,
     r'^response_format: Unimplemented keys: \["dependentSchemas"\]'),
    ("responses-unknown-item", RESP, {"input": [{"type": "item_reference", "id": "x"}]}, 400,
     r"^input\[0\]: type 'item_reference' is not one of"),
    ("responses-output-for-unknown-call", RESP, {"input": [{"type": "function_call_output", "call_id": "c1",
                                                            "output": "x"}]}, 400,
     r"^input\[0\]\.call_id: no earlier function_call has the call_id 'c1'"),
    ("responses-bad-arguments", RESP, {"input": [{"type": "function_call", "call_id": "c1", "name": "f",
                                                  "arguments": "{nope"}]}, 400, r"^input\[0\]\.arguments: not valid JSON"),
    ("responses-file-id", RESP, {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     400, r"file_id: files are not stored here"),
    ("responses-missing-previous", RESP, {"input": "hi", "previous_response_id": "resp_nope"}, 400,
     r"^previous_response_id: no stored response has the id 'resp_nope'"),
    ("responses-bad-effort", RESP, {"input": "hi", "reasoning": {"effort": "extreme"}}, 400,
     r"^reasoning\.effort: must be"),
    ("responses-truncation-auto", RESP, {"input": "hi", "truncation": "auto"}, 400, r"^truncation: must be 'disabled'"),
    ("responses-get-missing", RESP + "/resp_nope", None, 404, r"no stored response has the id 'resp_nope'"),
]


def test_hostile_requests_to_the_new_endpoints_get_their_protocols_4xx(server):
    for case_id, path, body, status, pattern in HOSTILE:
        got, reply, _ = server.request("GET" if body is None else "POST", path, body)
        assert got == status, (case_id, got, reply)
        if path.startswith(MSG):
            assert reply["type"] == "error" and set(reply["error"]) == {"type", "message"}, (case_id, reply)
            assert reply["error"]["type"] == {400: "invalid_request_error", 413: "request_too_large"}[status]
        else:
            assert set(reply["error"]) == {"message", "type", "param", "code"}, (case_id, reply)
        message = reply["error"]["message"]
        assert "\n" not in message and len(message) < 400 and re.search(pattern, message), (case_id, message)
    # Authentication in Anthropic's way, and its errors in Anthropic's shape.
    assert server.request("POST", MSG, {"messages": HI, "max_tokens": 1}, {
        "Authorization": "", "x-api-key": KEY, "anthropic-version": "2099-01-01", "anthropic-beta": "no-such-beta"})[0] \
        == 200  # unknown versions and betas are tolerated
    assert server.request("POST", MSG, {"messages": HI, "max_tokens": 1}, {"Authorization": f"bearer {KEY}"})[0] \
        == 200
    status, reply, _ = server.request("POST", MSG, {"messages": HI, "max_tokens": 1},
                                      {"Authorization": "", "x-api-key": "wrong"})
    assert status == 401 and reply["error"]["type"] == "authentication_error"
    # The web page --cors-allow-origin names gets in (its preflight answered), others do not.
    status, _, headers = server.request("POST", MSG, {"messages": HI, "max_tokens": 1}, {"Origin": APP})
    assert status == 200 and headers["access-control-allow-origin"] == APP
    status, _, headers = server.request("OPTIONS", MSG, None, {
        "Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"})
    assert status == 200 and headers["access-control-allow-origin"] == APP
    status, reply, _ = server.request("POST", MSG, {"messages": HI, "max_tokens": 1}, {"Origin": "http://other"})
    assert status == 403 and reply["error"]["type"] == "permission_error"
    assert server.request("GET", "/health")[0] == 200 and server.proc.poll() is None


def test_the_response_store_stays_within_its_bounds_over_1000_chained_turns():
    """A chain longer than any context (so driven at the store, with the protocol's own items)."""
    from mlx_gemma.server.protocol.base import parse
    from mlx_gemma.server.protocol.responses import ResponsesRequest, as_items, output_items
    from mlx_gemma.server.request import Reply
    from mlx_gemma.server.store import ResponseStore

    store = ResponseStore(max_count=20, max_bytes=300_000)
    previous = None
    for turn in range(1000):
        body = parse(ResponsesRequest, {"input": f"turn {turn}", "previous_response_id": previous})
        items = (store.get(previous).items if previous else []) + as_items(body.input)
        output = output_items(Reply(text="y" * 50))
        previous = f"resp_{turn}"
        assert store.put(previous, {"id": previous, "output": output}, items + output, len(items))
        assert len(store.entries) <= 20 and store.bytes <= 300_000
    assert list(store.entries) == [f"resp_{t}" for t in range(980, 1000)]
    assert len(store.get(previous).items) == 2000  # the newest holds the whole conversation...
    copies = sum(len(json.dumps(i)) for e in store.entries.values() for i in e.items)
    assert store.bytes < copies / 10  # ...shared with the others, not copied into each
    assert store.bytes == sum(held[1] for held in store.items.values()) + sum(e.size for e in store.entries.values())
    for rid in list(store.entries):
        store.delete(rid)
    assert store.bytes == 0 and not store.items

    small = ResponseStore(max_count=10, max_bytes=5_000)
    assert small.put("resp_a", {"id": "resp_a"}, as_items("a" * 100), 1)
    before = small.bytes
    assert not small.put("resp_big", {"id": "resp_big"}, as_items("b" * 10_000), 1)  # over the bound alone
    assert small.bytes == before and list(small.entries) == ["resp_a"]
