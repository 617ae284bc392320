"""Parsing request bodies into plain values, with the envelope's error codes."""

from __future__ import annotations

from typing import Any

from flask import request

from api.domain.errors import InvalidInput, MalformedJson


def json_body() -> dict[str, Any]:
    """The request's JSON object; malformed_json (400) or invalid_input (422) otherwise."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    data = request.get_json(force=True, silent=True)
    if data is None:
        raise MalformedJson()
    if not isinstance(data, dict):
        raise InvalidInput("The JSON body must be an object.")
    return data


def required_str(data: dict[str, Any], field: str, *, max_length: int = 1000) -> str:
    """A required string field of a JSON body."""
    value = data.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"'{field}' is required.", details={"field": field})
    if len(value) > max_length:
        raise InvalidInput(f"'{field}' is too long.", details={"field": field})
    if "\x00" in value:  # PostgreSQL text cannot hold NUL: refuse it here, not as a 500 later
        raise InvalidInput(f"'{field}' must not contain NUL characters.", details={"field": field})
    return value
