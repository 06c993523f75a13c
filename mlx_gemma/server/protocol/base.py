"""What every protocol's models share: strict JSON types, unknown fields refused, and pydantic's
validation errors turned into one line that names the field (`messages[0].content: ...`)."""

from typing import Annotated, Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from ..errors import ApiError

class Body(BaseModel):
    """A JSON object as a client sends it: no coercion ("1" is no number, 1 no boolean), no
    field this server does not know (it would be silently ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Open(Body):
    """An object whose other fields are bookkeeping that cannot change what is generated."""

    model_config = ConfigDict(extra="allow", strict=True)


def tagged(*models, default: Optional[str] = None) -> Any:
    """A union of models told apart by their `type` field (`default` where a client may leave it out).
    Tags are written `<type>`: pydantic puts them in an error's location, where they are dropped."""
    names = [model.model_fields["type"].annotation.__args__[0] for model in models]

    def tag_of(value):
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        return f"<{kind}>" if isinstance(kind, str) else None

    members = [Annotated[m, Tag(f"<{n}>")] for m, n in zip(models, names)]
    return Annotated[Union[tuple(members)], Discriminator(tag_of)]


MESSAGES = {
    "missing": "is required", "extra_forbidden": "not a supported parameter", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number", "bool_type": "must be a boolean", "string_type": "must be a string",
    "float_type": "must be a number", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "model_attributes_type": "must be an object",
    "finite_number": "must be a finite number",
}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict") or part.startswith(
                ("function-", "<")):
            continue  # which member of a union was tried, or a tagged block's tag
        else:
            out += ("." if out else "") + part
    return out


def _message(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in MESSAGES:
        return MESSAGES[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
                 "less_than": "less than"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {words} {bound}, got {error['input']!r}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {repr(error['input'])[:50]}"
    if kind == "union_tag_invalid":
        return f"type {str(ctx['tag'])[1:-1][:50]!r} is not one of {ctx['expected_tags'].replace('<', '').replace('>', '')}"
    if kind == "union_tag_not_found":
        return "must be an object with a 'type'"
    if kind == "too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx.get('min_length')} items"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    return error["msg"]


def validation_error(e: ValidationError) -> ApiError:
    """The deepest of pydantic's errors (a union reports one per member: the one that got
    furthest is the one the client meant)."""
    error = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
    where = _where(error["loc"])
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"{where}: not a supported parameter", param=where.split(".")[0].split("[")[0])
    return ApiError(400, f"{where or 'the body'}: {_message(error)}", param=where.split(".")[0].split("[")[0] or None)


def parse(model: type, body: dict):
    """`body` as `model`, or the ApiError naming what is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def texts(blocks, what: str, kinds: tuple = ("text",), key: Callable = lambda b: b.text) -> str:
    """The text of text blocks (a string stays itself)."""
    if isinstance(blocks, str):
        return blocks
    for i, block in enumerate(blocks):
        if block.type not in kinds:
            raise ApiError(400, f"{what}[{i}]: only text is allowed here, got a {block.type!r} block",
                           param=what.split(".")[0].split("[")[0])
    return "".join(key(b) for b in blocks)
