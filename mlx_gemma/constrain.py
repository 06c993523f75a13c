"""Constrained decoding: what the model may write, enforced token by token with llguidance.

A `Constraint` is a grammar, checked when it is made: a JSON Schema (compact JSON, so a reply
cannot loop on whitespace), any JSON object, a regular expression, a Lark grammar, or calls to
declared tools in Gemma 4's own syntax (spec 6.1: `<|tool_call>call:NAME{key:<|"|>value<|"|>}`
with the markers as the special tokens they are). A `Guide` follows one sequence: a logits
processor holding an llguidance matcher that it keeps in step with the tokens generated so far
(so the MTP drafter's verify rows, which see drafts that may be thrown away, get the mask of
their own history), and that masks each step's logits to what the grammar allows. The mask is
computed on the CPU while the step's forward pass runs. With thinking on, the grammar starts once
Gemma's thought channel closes: the first token may open the channel instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .errors import InputError

TOOL_CALL, TOOL_CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
# Text between two `<|"|>` quotes that never spells the quote out (a state machine on `<|"|>`'s
# prefixes): mlx-lm's parser reads the decoded text, where a spelled-out quote would end the string.
_RESTART = r'(<|\|<|\|"<|\|"\|<)*'
STRING_BODY = (r'([^<]|<' + _RESTART + r'([^<|]|\|[^<"]|\|"[^<|]|\|"\|[^<>]))*'
               r'(<' + _RESTART + r'(\||\|"|\|"\|)?)?')
NUMBER_TYPES = ("integer", "number")
# Keywords that only describe (they constrain nothing a grammar could enforce).
ANNOTATIONS = {"description", "title", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict", "additionalProperties", "format"}


class ConstraintError(InputError):
    """A constraint that cannot be compiled (an unsupported keyword, a malformed grammar);
    `detail` is what is wrong, without naming where the constraint came from."""

    def __init__(self, message: str, detail: Optional[str] = None):
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class Constraint:
    """`grammar`: llguidance's form; `what`: how messages name it."""

    grammar: str
    what: str

    @classmethod
    def json_schema(cls, schema: Union[dict, str, type]) -> "Constraint":
        """From a JSON Schema (a dict, its JSON text, or a pydantic model class)."""
        import llguidance

        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = _closed(schema.model_json_schema())
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"JSON Schema: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"JSON Schema: must be a JSON object, got {type(schema).__name__}")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return cls(_checked(grammar, "JSON Schema"), "JSON Schema")

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        import llguidance

        return cls(_checked(llguidance.LLMatcher.grammar_from_regex(pattern), "regex"), "regex")

    @classmethod
    def lark(cls, text: str) -> "Constraint":
        import llguidance

        return cls(_checked(llguidance.LLMatcher.grammar_from_lark(text), "grammar"), "grammar")

    @classmethod
    def tool_calls(cls, tools: list, choice: str = "required", parallel: bool = True,
                   answer: Optional[dict] = None) -> "Constraint":
        """Calls to `tools` (OpenAI function declarations) in Gemma 4's syntax. `choice`:
        "required" (at least one call to a declared tool), "auto" (text, or text then calls:
        a call once begun is well-formed and names a declared tool; with `answer`, a JSON
        Schema, the text is JSON valid against it), or a tool's name (that tool). Each call's
        arguments follow its parameters schema."""
        import llguidance

        functions = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
        if choice not in ("required", "auto") and choice not in functions:
            detail = f"{choice!r} is not a declared tool ({', '.join(functions)})"
            raise ConstraintError(f"tool_choice: {detail}", detail)
        lark = _ToolGrammar(functions).lark(choice, parallel, answer)
        return cls(_checked(llguidance.LLMatcher.grammar_from_lark(lark), "tool calls"), "tool calls")


def _closed(schema):
    """A pydantic model's schema with no room for fields it does not declare (as OpenAI's strict
    mode makes it): they would be dropped or refused when the reply is parsed back."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


def _checked(grammar: str, what: str) -> str:
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if error:
        detail = " ".join(error.split())[:300]
        raise ConstraintError(f"{what}: {detail}", detail)
    return grammar


def as_constraint(value) -> Optional[Constraint]:
    """What `generate(..., constraint=)` takes: a Constraint, a JSON Schema dict, or a pydantic model class."""
    if value is None or isinstance(value, Constraint):
        return value
    if isinstance(value, (dict, type)):
        return Constraint.json_schema(value)
    raise ConstraintError(f"constraint: give a Constraint, a JSON Schema dict or a pydantic model class, got "
                          f"{type(value).__name__}")


# --- Gemma 4's call syntax, from JSON Schema ---------------------------------------------------

class _ToolGrammar:
    """A Lark grammar for calls: values as Gemma writes them (strings between `<|"|>` tokens,
    bare keys in sorted order, as the chat template renders past calls); numbers, booleans and
    null are JSON's, and come from llguidance's own JSON Schema compiler (`%json`), bounds and all."""

    def __init__(self, functions: dict):
        self.functions, self.rules, self.defs, self.names = functions, {}, {}, {}

    def lark(self, choice: str, parallel: bool, answer: Optional[dict]) -> str:
        calls = {}
        for name, parameters in self.functions.items():
            if not re.fullmatch(r"[\w-]+", name):
                raise ConstraintError(f"tools: the name {name!r} cannot be written in Gemma's call syntax "
                                      "(letters, digits, _ and - only)")
            self.defs = parameters.get("$defs", parameters.get("definitions", {}))
            self.names = {}
            body = self.value(parameters, f"tools[{name}].parameters", top=True)
            calls[name] = self.rule(f"call_{name}", f'{TOOL_CALL} "call:{name}" {body} {TOOL_CALL_END}')
        one = calls[choice] if choice in calls else self.rule("call", " | ".join(calls.values()))
        several = f"{one}+" if parallel else one
        if choice != "auto":
            start = several
        elif answer is not None:
            start = f"{self.rule('answer', '%json ' + json.dumps(answer))} | {several}"
        else:
            start = f"TEXT? ({several})?"
        rules = "\n".join(f"{name}: {body}" for name, body in self.rules.items())
        return f"start: {start}\n{rules}\nTEXT: /(?s:.+)/\nSTRING: /{STRING_BODY}/\nKEY: /\\w+/\n"

    def rule(self, name: str, body: str) -> str:
        name = re.sub(r"\W", "_", name).lower()
        while name in self.rules and self.rules[name] != body:
            name += "_"
        self.rules[name] = body
        return name

    def value(self, schema, where: str, top: bool = False) -> str:
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, dict):
            raise ConstraintError(f"{where}: a schema must be an object")
        if "$ref" in schema:
            ref = schema["$ref"]
            target = ref.rsplit("/", 1)[-1]
            if not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", ref) or target not in self.defs:
                raise ConstraintError(f"{where}: $ref {ref!r} does not name an entry of $defs")
            if target not in self.names:  # a rule per definition: recursive schemas stay finite
                self.names[target] = f"def_{re.sub(r'[^0-9a-zA-Z_]', '_', target).lower()}"
                self.rules[self.names[target]] = "<pending>"
                self.rules[self.names[target]] = self.value(self.defs[target], f"{where}.$ref")
            return self.names[target]
        unknown = set(schema) - ANNOTATIONS - {"type", "enum", "const", "properties", "required", "items", "minItems",
                                               "maxItems", "anyOf", "oneOf", "minLength", "maxLength", "pattern",
                                               "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                                               "multipleOf", "$defs", "definitions", "nullable"}
        if unknown:
            raise ConstraintError(f"{where}: unsupported keyword {sorted(unknown)[0]!r} in a tool's parameters")
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(self.literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return "(" + " | ".join(self.value(s, f"{where}.{key}[{i}]") for i, s in enumerate(schema[key])) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value(dict(schema, type=k), where) for k in kind) + ")"
        if kind == "object" or (kind is None and ("properties" in schema or top)):
            return self.object(schema, where)
        if kind == "array" or (kind is None and "items" in schema):
            return self.array(schema, where)
        if kind == "string":
            return self.string(schema)
        if kind in NUMBER_TYPES or kind in ("boolean", "null"):
            keep = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
            return f"%json {json.dumps(keep)}"
        if kind is None:
            return self.any_value()
        raise ConstraintError(f"{where}: unknown type {kind!r}")

    def literal(self, value) -> str:
        if isinstance(value, str):
            return f"{QUOTE} {json.dumps(value)} {QUOTE}" if value else f"{QUOTE} {QUOTE}"
        if isinstance(value, (dict, list)):
            raise ConstraintError("tools: enum / const values must be strings, numbers, booleans or null")
        return json.dumps(json.dumps(value))

    def string(self, schema: dict) -> str:
        if "pattern" in schema:
            pattern = schema["pattern"].removeprefix("^").removesuffix("$")
            return f"{QUOTE} /{pattern}/ {QUOTE}" if pattern else f"{QUOTE} {QUOTE}"
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if low or high is not None:  # bounded strings: no `<` at all keeps the count exact
            count = f"{{{low},{'' if high is None else high}}}"
            return f"{QUOTE} /[^<]{count}/ {QUOTE}" if high != 0 else f"{QUOTE} {QUOTE}"
        return f"{QUOTE} STRING? {QUOTE}"

    def object(self, schema: dict, where: str) -> str:
        properties = schema.get("properties", {})
        if not properties:  # a tool without parameters takes none, unless more are explicitly allowed
            if schema.get("additionalProperties", False) is False:
                return '"{" "}"'
            value = self.any_value()
            return self.rule("any_object", f'"{{" (KEY ":" {value} ("," KEY ":" {value})*)? "}}"')
        required = set(schema.get("required", []))
        keys = sorted(properties)
        for key in keys:
            if not re.fullmatch(r"\w+", key):
                raise ConstraintError(f"{where}: the property name {key!r} cannot be written in Gemma's call "
                                      "syntax (letters, digits and _ only)")
        if required - set(keys):
            raise ConstraintError(f"{where}: required names {sorted(required - set(keys))[0]!r}, which is not "
                                  "among its properties")
        # first[i]: members from keys[i:] with none written yet; rest[i]: with some already written.
        members = [f'"{k}:" {self.value(properties[k], f"{where}.properties.{k}")}' for k in keys]
        first, rest = "", ""
        for i in reversed(range(len(keys))):
            tail_rest = f" {rest}" if rest else ""
            with_it = f"{members[i]}{tail_rest}"
            if keys[i] in required:
                first, rest = with_it, f'"," {with_it}'
            else:
                first = f"({with_it}{' | ' + first if first else ''})" if first else f"({with_it})?"
                rest = f'("," {with_it}{" | " + rest if rest else ""})' if rest else f'("," {with_it})?'
            first = self.rule(f"{where}_f{i}", first)
            rest = self.rule(f"{where}_r{i}", rest)
        return f'"{{" {first} "}}"'

    def array(self, schema: dict, where: str) -> str:
        item = self.value(schema.get("items", {}), f"{where}.items")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high == 0:
            return '"[" "]"'
        more = f'("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        body = f"{item} {more}"
        return f'"[" {body} "]"' if low else f'"[" ({body})? "]"'

    def any_value(self) -> str:
        if "any_value" not in self.rules:
            self.rules["any_value"] = "<pending>"
            self.rules["any_value"] = (f'{QUOTE} STRING? {QUOTE} | %json {{"type": ["number", "boolean", "null"]}} | '
                                       '"[" (any_value ("," any_value)*)? "]" | '
                                       '"{" (KEY ":" any_value ("," KEY ":" any_value)*)? "}"')
        return "any_value"


# --- following one sequence --------------------------------------------------------------------

_TOKENIZERS: dict = {}  # one llguidance tokenizer per process and tokenizer (building it walks the vocabulary)


def llg_tokenizer(processor):
    """The llguidance tokenizer of a checkpoint's fast tokenizer (262K entries with byte fallback
    for Gemma 4), built once per process."""
    import llguidance

    key = id(processor.tokenizer)
    if key not in _TOKENIZERS:
        backend = processor.tokenizer._tokenizer.backend_tokenizer
        _TOKENIZERS[key] = llguidance.LLTokenizer(backend.to_str(), n_vocab=processor.config.text_config.vocab_size,
                                                  eos_token=sorted(processor.eos_token_ids))
    return _TOKENIZERS[key]


def apply_bitmask(logits, bitmask: np.ndarray):
    """Logits outside the mask's set bits become -inf (llguidance's Metal kernel on a Mac, the same
    with plain MLX ops elsewhere)."""
    import mlx.core as mx

    if mx.metal.is_available():
        from llguidance.mlx import apply_token_bitmask

        return apply_token_bitmask(logits.reshape(-1, logits.shape[-1]), bitmask).reshape(logits.shape)
    words = mx.array(bitmask.reshape(-1).view(np.uint32))
    bits = (words[:, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    allowed = bits.reshape(-1)[:logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, -mx.inf)


class Guide:
    """A logits processor that holds a sequence to `constraint`. It reads the generated tokens off
    the history it is given (its first call sees the prompt, each later call one token more, or,
    from the MTP drafter's drafts and verify rows, a history that may go back), so it can roll its
    matcher back. The drafter's drafts are masked too (`guides_drafts`)."""

    guides_drafts = True

    def __init__(self, processor, constraint: Constraint, thinking: bool = False):
        import llguidance

        self.matcher = llguidance.LLMatcher(llg_tokenizer(processor), constraint.grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"{constraint.what}: {' '.join(self.matcher.get_error().split())[:300]}")
        self.vocab = processor.config.text_config.vocab_size
        self.eos = processor.eos_token_ids
        self.bitmask = np.zeros(((self.vocab + 31) // 32,), dtype=np.int32)
        self.start, self.end = (processor.thought_start_id, processor.thought_end_id) if thinking else (None, None)
        self.prompt: Optional[int] = None
        self.fed: list = []  # the tokens the matcher has consumed

    def constrained(self, generated: list) -> Optional[list]:
        """The part of `generated` the grammar applies to (None: inside the thought channel)."""
        if self.start is None or not generated or generated[0] != self.start:
            return generated
        if self.end in generated:
            return generated[generated.index(self.end) + 1:]
        return None

    def follow(self, tokens: list) -> None:
        same = 0
        while same < min(len(tokens), len(self.fed)) and tokens[same] == self.fed[same]:
            same += 1
        if same < len(self.fed):
            self.matcher.rollback(len(self.fed) - same)
            del self.fed[same:]
        new = tokens[same:]
        if new:
            if not self.matcher.consume_tokens(new):
                raise ConstraintError(f"the constraint rejected a generated token: {self.matcher.get_error()}")
            self.fed += new

    def __call__(self, tokens, logits):
        import mlx.core as mx

        if self.prompt is None:
            self.prompt = tokens.size
            generated = []
        else:
            mx.async_eval(logits)  # the forward pass runs while the mask is computed here
            generated = tokens[self.prompt:].tolist()
        done = self.constrained(generated)
        if done is None or not self.eos.isdisjoint(done):  # thinking, or the reply is over (a step queued
            return logits  # before the end of turn was read, or a draft past it)
        self.follow(done)
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask[None])
        if self.matcher.is_error():
            raise ConstraintError(f"the constraint failed: {self.matcher.get_error()}")
        if not done and self.start is not None:  # the first token may open the thought channel instead
            self.bitmask.view(np.uint32)[self.start // 32] |= np.uint32(1 << (self.start % 32))
        return apply_bitmask(logits, self.bitmask)
