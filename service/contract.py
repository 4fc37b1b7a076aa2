"""Requests declared once: each body field's and parameter's JSON Schema, description and messages drive
both the validation of a request and the OpenAPI document (service/openapi.py builds its request schemas
from these declarations, never from a copy).

A declaration's schema is the JSON Schema subset the service uses: type, enum, minimum,
exclusiveMinimum, maximum, minLength, pattern, items, minItems, maxItems, required, properties,
additionalProperties: false and anyOf. A value is checked in a fixed order, and the first rule it
breaks picks the message:
- its type, then enum, minimum, exclusiveMinimum and maximum; a string's minLength, pattern and
  "unicode" (no lone surrogate, which JSON's \ud800 escape can carry and no tokenizer can encode);
- an object's required and additionalProperties, then each declared property's rules, named
  "properties.NAME.RULE";
- an array's minItems and maxItems, then each item's other rules, named "items.RULE" (with the index);
- anyOf: the rules of the option whose type the value has.
A rule may have a message (and a status) of its own, formatted with `index`, `path`, `count`, `limit`,
`value` (a number's, "more" past 12 digits) and `at`; every other rule takes the declaration's message,
except "unicode", which says where the surrogate is. A JSON Schema integer is also an integral float
(2.0), as JSON Schema counts it.

Parameters (the Inference API's "parameters", TEI's and v2's options) are read with `read`: null or
absent means the default. Body fields are checked with `check` by their route's reader, which also
applies the rules across fields (which are required, which exclude each other).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from service.errors import ApiError

_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "array": list, "object": dict}
_UNICODE = "{name}{path} is not valid Unicode: lone surrogate at character {at}"  # path: "" for the value itself


@dataclass(frozen=True)
class Param:
    """One body field or request parameter: its name, the schema of a value other than null, what it means,
    and the message (400 unless the reader says otherwise) when a value breaks the schema."""

    name: str
    schema: dict[str, Any]
    description: str
    message: str
    fold_case: bool = False  # a string is read in lower case (the schema names the lower-case values)
    messages: Mapping[str, str] = field(default_factory=dict)  # a rule's own message, e.g. "items.pattern"
    # a rule's own status, e.g. 413 for maxItems, or status and error type, e.g. (400, "Empty") for minItems
    statuses: Mapping[str, int | tuple[int, str]] = field(default_factory=dict)


def problem(value: Any, schema: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Return the first rule of schema that value breaks, with what its message may quote; None if it conforms."""
    if "anyOf" in schema:
        options = schema["anyOf"]
        if any(problem(value, option) is None for option in options):
            return None
        typed = [option for option in options if _typed(value, option)]
        return problem(value, typed[0]) if typed else ("type", {})
    if not _typed(value, schema):
        return "type", {}
    if "enum" in schema and value not in schema["enum"]:
        return "enum", {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for rule, broken in (("minimum", value < schema.get("minimum", value)),
                             ("exclusiveMinimum", "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]),
                             ("maximum", value > schema.get("maximum", value))):
            if broken:
                return rule, {"value": _shown(value), "limit": schema.get(rule)}
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return "minLength", {}
        if "pattern" in schema and _compiled(schema["pattern"]).search(value) is None:
            return "pattern", {}
        try:  # JSON's "\ud800" escape: no tokenizer can encode a lone surrogate
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return "unicode", {"at": exc.start}
    if isinstance(value, dict):
        return _object_problem(value, schema)
    if isinstance(value, list):
        return _array_problem(value, schema)
    return None


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    """Return a schema's pattern compiled once."""
    return re.compile(pattern)


def _typed(value: Any, schema: dict[str, Any]) -> bool:
    """Return whether value has schema's type (any option's, for anyOf)."""
    if "anyOf" in schema:
        return any(_typed(value, option) for option in schema["anyOf"])
    kind = schema.get("type")
    if kind == "null":
        return value is None
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if kind == "integer" and isinstance(value, float) and not value.is_integer():
            return False
    elif kind is not None and (isinstance(value, bool) != (kind == "boolean") or not isinstance(value, _TYPES[kind])):
        return False
    return True


def _object_problem(value: dict[str, Any], schema: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Return the first rule an object breaks: a required property missing, one not declared, then its properties'."""
    properties = schema.get("properties", {})
    if any(name not in value for name in schema.get("required", ())):
        return "required", {}
    if schema.get("additionalProperties") is False and any(name not in properties for name in value):
        return "additionalProperties", {}
    for name, declared in properties.items():
        if name in value and (found := problem(value[name], declared)) is not None:
            return f"properties.{name}.{found[0]}", found[1]
    return None


def _array_problem(value: list[Any], schema: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Return the first rule an array breaks: its length, then its items' rules, with the item's index and its
    path ("[2]", or "[2][1]" for an item of an item)."""
    if len(value) < schema.get("minItems", 0):
        return "minItems", {"count": len(value), "limit": schema["minItems"]}
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        return "maxItems", {"count": len(value), "limit": schema["maxItems"]}
    items = schema.get("items", {})
    for index, item in enumerate(value):
        if (found := problem(item, items)) is not None:
            return f"items.{found[0]}", {**found[1], "index": index, "path": f"[{index}]{found[1].get('path', '')}"}
    return None


def _shown(number: int | float) -> str:
    """Return a number as a message may quote it: a whole one without ".0", one of over 12 digits as "more"."""
    text = str(int(number)) if isinstance(number, int) or number.is_integer() else str(number)
    return text if len(text) <= 12 else "more"


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Return whether value meets schema."""
    return problem(value, schema) is None


def check(value: Any, declared: Param, status: int = 400, error_type: str | None = None) -> Any:
    """Return value if it meets the declaration's schema; else raise ApiError with the broken rule's message
    and status (the declaration's own, or `status`)."""
    found = problem(value, declared.schema)
    if found is None:
        return value
    rule, quoted = found
    own = declared.statuses.get(rule, status)
    status, error_type = own if isinstance(own, tuple) else (own, error_type)
    default = _UNICODE.replace("{name}", declared.name) if rule.endswith("unicode") else declared.message
    raise ApiError(status, declared.messages.get(rule, default).format(**{"path": "", **quoted}), error_type)


def read(parameters: dict[str, Any], declared: Sequence[Param], status: int = 400,
         error_type: str | None = None) -> dict[str, Any]:
    """Return the declared parameters that are set (not null), each checked against its schema; a value that
    breaks it raises ApiError(status, its message, error_type)."""
    values = {}
    for param in declared:
        value = parameters.get(param.name)
        if value is None:
            continue
        if param.fold_case and isinstance(value, str):
            value = value.lower()
        check(value, param, status, error_type)
        values[param.name] = int(value) if param.schema.get("type") == "integer" else value
    return values


def field_schema(declared: Param) -> dict[str, Any]:
    """Return the JSON Schema of a body field: its schema and description (null is not a value of it)."""
    return {**declared.schema, "description": declared.description}


def schema(declared: Sequence[Param], required: Sequence[str] = ()) -> dict[str, Any]:
    """Return the JSON Schema of a parameters object holding the declared parameters (each also null)."""
    properties = {param.name: {"anyOf": [param.schema, {"type": "null"}],
                               "description": param.description + (" Any case." if param.fold_case else "")}
                  for param in declared}
    return {"type": "object", "properties": properties, **({"required": list(required)} if required else {})}
