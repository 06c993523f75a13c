"""Constrained decoding on the random-weight tiny checkpoint (which is the point: random weights
must still produce valid output when constrained). Every schema here is finite (bounded strings,
numbers and arrays), so every completion must also end before max_tokens."""

import json
import random
import re

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.tool_parsers import gemma4

from mlx_gemma.constrain import STRING_BODY, Constraint, ConstraintError
from mlx_gemma.generation import make_sampling, stream_generate

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -5, "maximum": 300}


def obj(properties: dict, required=None, **extra) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


SCHEMAS = {
    "string": S,
    "string-min-max": {"type": "string", "minLength": 2, "maxLength": 4},
    "integer-bounds": I,
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
    "number-bounds": {"type": "number", "minimum": 0, "maximum": 1},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "enum-strings": {"enum": ["red", "green", "blue"]},
    "enum-mixed": {"enum": ["a", 1, True, None]},
    "const": {"const": "fixed"},
    "pattern": {"type": "string", "pattern": "^[a-c]{2}-[0-9]{3}$"},
    "format-date": {"type": "string", "format": "date"},
    "format-uuid": {"type": "string", "format": "uuid"},
    "object": obj({"name": S, "age": I}),
    "object-optional": obj({"name": S, "age": I, "ok": {"type": "boolean"}}, required=["name"]),
    "object-empty": obj({}),
    "nested-object": obj({"who": obj({"name": S}), "n": I}),
    "array": {"type": "array", "items": I, "maxItems": 4},
    "array-min-items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "array-of-objects": {"type": "array", "items": obj({"k": S}), "maxItems": 2},
    "tuple-like-enum-array": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    "any-of": {"anyOf": [S, I, {"type": "null"}]},
    "one-of-objects": {"oneOf": [obj({"a": I}), obj({"b": {"type": "boolean"}})]},
    "nullable-type-list": {"type": ["string", "null"], "maxLength": 3},
    "ref-defs": {"$defs": {"point": obj({"x": I, "y": I})}, **obj({"p": {"$ref": "#/$defs/point"}})},
    "ref-in-array": {"$defs": {"tag": {"enum": ["a", "b"]}}, "type": "array",
                     "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
    "all-of": {"allOf": [obj({"a": I}, required=["a"])]},
    "multiple-of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
    "openai-strict": obj({"city": S, "unit": {"enum": ["C", "F"]}, "days": {"type": ["integer", "null"],
                                                                           "minimum": 1, "maximum": 7}}),
    "deep": obj({"a": obj({"b": obj({"c": {"type": "array", "items": {"const": 1}, "maxItems": 2}})})}),
    "descriptions": obj({"x": {"type": "boolean", "description": "a flag", "title": "X"}}, description="doc"),
    "json-object": {"type": "object", "additionalProperties": False},
}


def reply(model, processor, constraint, temp=0.0, seed=0, max_tokens=120, **kwargs):
    """(answer text, finish reason)."""
    mx.random.seed(seed)
    pieces = list(stream_generate(model, processor, [{"role": "user", "content": "answer"}], temp=temp,
                                  max_tokens=max_tokens, constraint=constraint, **kwargs))
    return "".join(p.text for p in pieces if not p.thinking), pieces[-1].finish_reason


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_completion_parses_validates_and_ends(model, processor, name):
    schema = SCHEMAS[name]
    constraint = Constraint.json_schema(schema)
    for temp, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        text, finish = reply(model, processor, constraint, temp, seed)
        assert finish == "stop", (name, temp, text)  # a finite schema ends before max_tokens
        jsonschema.validate(json.loads(text), schema)
        assert " " not in re.sub(r'"[^"]*"', "", text), text  # compact: no free whitespace


def test_a_pydantic_model_and_json_object_are_constraints_too(model, processor):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=5)
        age: int = Field(ge=0, le=150)

    text, finish = reply(model, processor, Person, temp=1.0)
    assert finish == "stop" and Person.model_validate_json(text)
    text, _ = reply(model, processor, {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                                       "additionalProperties": False})
    assert isinstance(json.loads(text)["x"], bool)


def test_regex_and_lark_grammars(model, processor):
    for seed in range(3):
        text, finish = reply(model, processor, Constraint.regex(r"[0-9]{3}-(yes|no)"), temp=1.0, seed=seed)
        assert finish == "stop" and re.fullmatch(r"[0-9]{3}-(yes|no)", text), text
    lark = 'start: "(" item ("," item){0,2} ")"\nitem: "x" | "y" | NUM\nNUM: /[0-9]{1,2}/\n'
    text, finish = reply(model, processor, Constraint.lark(lark), temp=1.0)
    assert finish == "stop" and re.fullmatch(r"\((x|y|[0-9]{1,2})(,(x|y|[0-9]{1,2})){0,2}\)", text), text


@pytest.mark.parametrize("make, message", [
    (lambda: Constraint.json_schema({"not": {"type": "string"}}), r'^JSON Schema: Unimplemented keys: \["not"\]$'),
    (lambda: Constraint.json_schema({"type": "string", "format": "bogus"}), r"^JSON Schema: Unknown format: bogus$"),
    (lambda: Constraint.json_schema({"$ref": "#/$defs/missing"}), r"^JSON Schema: Pointer '/\$defs/missing' does not"),
    (lambda: Constraint.json_schema("{nope"), r"^JSON Schema: not valid JSON"),
    (lambda: Constraint.regex("[a-"), r"^regex: .*unclosed character class"),
    (lambda: Constraint.lark("start: foo"), r'^grammar: at 1\(8\): unknown name: "foo"'),
    (lambda: Constraint.tool_calls(TOOLS, "nope"), r"^tool_choice: 'nope' is not a declared tool"),
    (lambda: Constraint.tool_calls([tool("f", {"type": "object", "properties": {"a": {"not": {}}}})]),
     r"^tools\[f\]\.parameters\.properties\.a: unsupported keyword 'not'"),
    (lambda: Constraint.tool_calls([tool("f", obj({"a-b": S}))]), r"property name 'a-b' cannot be written"),
])
def test_constraints_that_cannot_compile_say_why_in_one_line(make, message):
    with pytest.raises(ConstraintError) as e:
        make()
    assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)


# --- Gemma 4 tool calls -------------------------------------------------------------------------

def tool(name, parameters, description="") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [tool("get_weather", obj({"city": S, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                 required=["city"])),
         tool("set_alarm", obj({"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                "label": {"anyOf": [S, {"type": "null"}]},
                                "days": {"type": "array", "items": {"enum": ["mon", "tue"]}, "maxItems": 2},
                                "loud": {"type": "boolean"}, "where": obj({"room": {"enum": ["a", "b"]}})},
                               required=["hour", "loud"])),
         tool("ping", {"type": "object", "properties": {}})]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def calls_in(text: str) -> list:
    """mlx-lm's Gemma 4 parser, as the server uses it: every block must parse."""
    blocks = re.findall(r"<\|tool_call>(.*?)<tool_call\|>", text, re.S)
    assert text.count("<|tool_call>") == len(blocks), text
    calls = [gemma4.parse_tool_call(b) for b in blocks]
    return [c for call in calls for c in (call if isinstance(call, list) else [call])]


@pytest.mark.parametrize("choice", ["required", "get_weather", "set_alarm", "ping"])
def test_forced_tool_calls_are_well_formed_and_valid(model, processor, choice):
    for temp, seed in ((0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)):
        text, finish = reply(model, processor, Constraint.tool_calls(TOOLS, choice), temp, seed, max_tokens=200)
        assert finish == "stop", text
        calls = calls_in(text)
        assert calls and text.startswith("<|tool_call>") and text.endswith("<tool_call|>"), text
        for call in calls:
            assert choice == "required" or call["name"] == choice
            jsonschema.validate(call["arguments"], PARAMETERS[call["name"]])


def test_one_call_unless_parallel_and_auto_is_text_or_well_formed_calls(model, processor):
    for seed in range(4):
        text, _ = reply(model, processor, Constraint.tool_calls(TOOLS, "required", parallel=False), 1.0, seed,
                        max_tokens=200)
        assert len(calls_in(text)) == 1
    for seed in range(4):
        text, finish = reply(model, processor, Constraint.tool_calls(TOOLS, "auto"), 1.0, seed, max_tokens=200)
        for call in calls_in(text):  # any call that begins is whole, to a declared tool, with valid arguments
            jsonschema.validate(call["arguments"], PARAMETERS[call["name"]])


def test_the_string_body_never_spells_out_the_quote():
    """Strings sit between `<|"|>` tokens; mlx-lm's parser reads decoded text, so a string's
    text must never contain the quote's spelling (checked against every short string)."""
    pattern = re.compile(STRING_BODY)
    rng = random.Random(0)
    for _ in range(20000):
        s = "".join(rng.choice('<|">a') for _ in range(rng.randint(0, 9)))
        assert bool(pattern.fullmatch(s)) == ('<|"|>' not in s), s


# --- with the rest of the loop ------------------------------------------------------------------

def test_thoughts_are_free_and_the_constraint_starts_after_the_channel(model, processor):
    start, end = processor.thought_start_id, processor.thought_end_id
    calls = [0]

    def think_three_tokens(tokens, logits):  # the model opens its channel, thinks, and closes it
        calls[0] += 1
        force = start if calls[0] == 1 else end if calls[0] == 5 else None
        return logits if force is None else mx.where(mx.arange(logits.shape[-1]) == force, 0.0, -mx.inf + logits)

    _, processors = make_sampling(processor, temp=0.0)
    schema = SCHEMAS["object"]
    pieces = list(stream_generate(model, processor, [{"role": "user", "content": "q"}], enable_thinking=True,
                                  temp=0.0, max_tokens=80, constraint=schema,
                                  logits_processors=[think_three_tokens, *processors]))
    assert [p.token for p in pieces][0] == start and pieces[4].token == end
    thought = "".join(p.text for p in pieces if p.thinking)
    answer = "".join(p.text for p in pieces if not p.thinking)
    assert thought and not thought.startswith("{")
    jsonschema.validate(json.loads(answer), schema)


def test_the_same_tokens_compiled_or_not_and_drafted_or_not(model, processor, drafter):
    for constraint in (Constraint.json_schema(SCHEMAS["openai-strict"]), Constraint.tool_calls(TOOLS, "required")):
        plain = [p.token for p in stream_generate(model, processor, "q", temp=0.0, max_tokens=100,
                                                  constraint=constraint, compile=False)]
        compiled = [p.token for p in stream_generate(model, processor, "q", temp=0.0, max_tokens=100,
                                                     constraint=constraint, compile=True)]
        pieces = list(stream_generate(model, processor, "q", temp=0.0, max_tokens=100, constraint=constraint,
                                      draft_model=drafter, num_draft_tokens=3))
        assert plain == compiled == [p.token for p in pieces]
        # The drafter's drafts are masked too: where the grammar leaves one choice, it is accepted.
        assert pieces[-1].accepted_tokens > 0
