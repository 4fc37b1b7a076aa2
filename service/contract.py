"""Request parameters declared once: each one's JSON Schema, description and message drive both the
validation of a request and the OpenAPI document.

A parameter's schema is the JSON Schema subset the service uses (type, enum, minimum, maximum,
items, minItems, anyOf); a value that breaks it is refused with the parameter's message. Null or
absent means the default. Rules across parameters stay with the route's reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import ApiError

_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "array": list, "object": dict}


@dataclass(frozen=True)
class Param:
    """One request parameter: its name, the schema of a value other than null, what it means, and the 400
    message when a value breaks the schema."""

    name: str
    schema: dict[str, Any]
    description: str
    message: str
    fold_case: bool = False  # a string is read in lower case (the schema names the lower-case values)


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Return whether value meets schema (the subset above; an integral float counts as an integer)."""
    if "anyOf" in schema:
        return any(conforms(value, option) for option in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            return False
    elif kind is not None and (isinstance(value, bool) != (kind == "boolean") or not isinstance(value, _TYPES[kind])):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return False
    if isinstance(value, list):
        return len(value) >= schema.get("minItems", 0) and all(conforms(item, schema.get("items", {}))
                                                               for item in value)
    return True


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
        if not conforms(value, param.schema):
            raise ApiError(status, param.message, error_type)
        values[param.name] = int(value) if param.schema.get("type") == "integer" else value
    return values


def schema(declared: Sequence[Param], required: Sequence[str] = ()) -> dict[str, Any]:
    """Return the JSON Schema of a parameters object holding the declared parameters (each also null)."""
    properties = {param.name: {"anyOf": [param.schema, {"type": "null"}],
                               "description": param.description + (" Any case." if param.fold_case else "")}
                  for param in declared}
    return {"type": "object", "properties": properties, **({"required": list(required)} if required else {})}
