"""Structured output through the server: JSON Schema formats and enforced tool_choice in every
protocol, and the structured modes of the real client libraries (openai `parse`, instructor,
pydantic-ai, openai-agents), on the random-weight tiny checkpoint. The models here bound their
strings and numbers, so a constrained random model must finish them."""

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from test_protocols import anthropic_client
from test_server import KEY, Server, user


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    population: int = Field(ge=0, le=10_000)
    coastal: bool


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                                "parameters": WEATHER}},
              {"type": "function", "function": {"name": "get_time", "parameters": {
                  "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"]}}}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in CHAT_TOOLS}


@pytest.fixture(scope="module")
def server(hf_checkpoint, tmp_path_factory):
    s = Server(hf_checkpoint, tmp_path_factory.mktemp("structured") / "server.log", "--temp", "0",
               "--max-tokens", "200")
    yield s
    s.stop()


def test_json_schema_formats_in_every_protocol(server):
    client = server.client()
    schema = City.model_json_schema()
    r = client.chat.completions.create(model="m", messages=[user("a city")], response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    City.model_validate_json(r.choices[0].message.content)
    r = client.chat.completions.create(model="m", messages=[user("a city")], temperature=1, seed=3,
                                       response_format={"type": "json_object"}, max_tokens=200)
    if r.choices[0].finish_reason == "stop":  # any object: its strings may run to the cap
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")

    parsed = client.chat.completions.parse(model="m", messages=[user("a city")], response_format=City)
    assert isinstance(parsed.choices[0].message.parsed, City)
    response = client.responses.parse(model="m", input="a city", text_format=City)
    assert isinstance(response.output_parsed, City)

    message = anthropic_client(server).messages.create(
        model="m", max_tokens=200, messages=[{"role": "user", "content": "a city"}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn"
    City.model_validate_json(message.content[0].text)

    status, body, _ = server.request("POST", "/v1/chat/completions", {
        "messages": [user("a code")], "structured_outputs": {"regex": "[0-9]{4}"}})
    assert status == 200 and len(body["choices"][0]["message"]["content"]) == 4
    assert body["choices"][0]["message"]["content"].isdigit()


def test_forced_tool_calls_in_every_protocol_validate_against_their_parameters(server):
    client = server.client()
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        r = client.chat.completions.create(model="m", messages=[user("go")], tools=CHAT_TOOLS, tool_choice=choice)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls
        for call in calls:
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])

    responses_tools = [{"type": "function", **t["function"]} for t in CHAT_TOOLS]
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "name": "get_weather"}, {"get_weather"})):
        r = client.responses.create(model="m", input="go", tools=responses_tools, tool_choice=choice)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and all(c.name in names for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])

    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
                       for t in CHAT_TOOLS]
    claude = anthropic_client(server)
    for choice, names in (({"type": "any"}, {"get_weather", "get_time"}),
                          ({"type": "tool", "name": "get_weather"}, {"get_weather"})):
        m = claude.messages.create(model="m", max_tokens=200, messages=[{"role": "user", "content": "go"}],
                                   tools=anthropic_tools, tool_choice=choice)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses and all(u.name in names for u in uses)
        for use in uses:
            jsonschema.validate(use.input, PARAMETERS[use.name])


def test_tool_choice_none_forbids_the_call_token(processor):
    """The engine's processors for `none` mask the call's start token (it is what a model that
    still wants to call would emit)."""
    import types

    import mlx.core as mx

    from mlx_gemma.constrain import TOOL_CALL
    from mlx_gemma.server.engine import Engine
    from mlx_gemma.server.request import Request

    vocab = processor.tokenizer.get_vocab()
    engine = types.SimpleNamespace(processor=processor, vocab=vocab, args=types.SimpleNamespace(
        temp=0.0, top_p=None, top_k=None, min_p=None))
    _, processors = Engine._processors(engine, Request(forbid_tool_calls=True))
    logits = mx.zeros((1, processor.config.text_config.vocab_size))
    for process in processors:
        logits = process(mx.array([2, 3]), logits)
    assert logits[0, vocab[TOOL_CALL]].item() == -float("inf") and logits[0, 7].item() == 0


def test_unsupported_schemas_and_grammars_are_400s_before_any_prefill(server):
    cases = [
        ("/v1/chat/completions", {"messages": [user("x")], "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"not": {"type": "string"}}}}}, r'^response_format: Unimplemented keys: \["not"\]'),
        ("/v1/chat/completions", {"messages": [user("x")], "structured_outputs": {"grammar": "start: foo"}},
         r'^structured_outputs\.grammar: at 1\(8\): unknown name: "foo"'),
        ("/v1/chat/completions", {"messages": [user("x")], "structured_outputs": {"regex": "[a-"}},
         r"^structured_outputs\.regex: .*unclosed character class"),
        ("/v1/chat/completions", {"messages": [user("x")], "tool_choice": "required"},
         r"^tool_choice: 'required' needs tools, and the request declares none"),
        ("/v1/chat/completions", {"messages": [user("x")], "tools": CHAT_TOOLS, "tool_choice": {
            "type": "function", "function": {"name": "nope"}}}, r"^tool_choice: 'nope' is not a declared tool"),
        ("/v1/chat/completions", {"messages": [user("x")], "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}],
            "tool_choice": "required"}, r"^tools: tools\[f\]\.parameters\.properties\.a: unsupported keyword 'not'"),
        ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
            "type": "string", "format": "bogus"}}}}, r"^response_format: Unknown format: bogus"),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "output_config": {
            "format": {"type": "json_schema", "schema": {"$ref": "#/$defs/none"}}}},
         r"^response_format: Pointer '/\$defs/none' does not exist"),
    ]
    import re

    for path, body, pattern in cases:
        status, reply, _ = server.request("POST", path, body)
        message = reply["error"]["message"]
        assert status == 400 and re.search(pattern, message) and "\n" not in message, (path, message)
    assert server.request("GET", "/health")[0] == 200


# --- client libraries' structured modes ---------------------------------------------------------

def test_instructor_tools_and_json_schema_modes(server):
    import instructor

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0),
                                        mode=mode)
        city = client.chat.completions.create(model="m", response_model=City, max_retries=0,
                                              messages=[user("a city")])
        assert isinstance(city, City), mode


def test_pydantic_ai_tool_and_native_output(server):
    from pydantic_ai import Agent, NativeOutput, ToolOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    llm = OpenAIChatModel("m", provider=OpenAIProvider(base_url=server.url + "/v1", api_key=KEY))
    for output in (ToolOutput(City), NativeOutput(City)):
        result = Agent(llm, output_type=output, retries=0).run_sync("a city")
        assert isinstance(result.output, City), type(output).__name__


def test_openai_agents_output_type_through_both_models(server):
    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    for model in (OpenAIChatCompletionsModel("m", client), OpenAIResponsesModel("m", client)):
        result = Runner.run_sync(Agent(name="a", instructions="answer", output_type=City, model=model), "a city")
        assert isinstance(result.final_output, City), type(model).__name__
