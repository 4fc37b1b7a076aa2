"""Hypothesis on arbitrary text: each answer is a valid prediction or the JSON 4xx it should be, never a 500."""

from __future__ import annotations

import http.client
import json
import operator
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.kit import LABELS, Reply, Server, exchange, port_of, send

LIMIT = 2 * 1024 * 1024  # SERVICE_MAX_CONTENT_LENGTH's default
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇺🇦", "❤️", "🤖", "🫠", "🏳️‍🌈"]
PROPERTY = settings(deadline=None, database=None,  # shared noisy cores: no per-example deadline
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pieces = st.one_of(
    st.text(max_size=40),  # any code point but surrogates
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), min_size=1, max_size=8),  # NUL, BOM, RLO
    st.text(st.characters(min_codepoint=0x0590, max_codepoint=0x08FF), min_size=1, max_size=40),  # Hebrew, Arabic
    st.lists(st.sampled_from(EMOJI), min_size=1, max_size=8).map("".join),
    st.characters(categories=["Cs"]),  # a lone surrogate, sent as "\ud800" in JSON
    st.builds(operator.mul, st.sampled_from(["a", "é", "字", "😀", "ab", "\u0301"]), st.integers(101, 30_000)),
)
texts = st.lists(pieces, min_size=1, max_size=5).map("".join)
# (route, field, batch): every way a text reaches the model
FORMS = [("/sentiment", "text", False), ("/sentiment", "texts", True), ("/", "inputs", False), ("/", "inputs", True)]


def body_of(form: tuple[str, str, bool], items: list[str]) -> dict[str, Any]:
    """Return the request body for one form: one text, or a list of them."""
    _, field, batch = form
    return {field: items if batch else items[0]}


def expected_error(items: list[str], batch: bool) -> str | None:
    """Return the 400 message the service must give for these (parsed) texts, or None for a 200."""
    for index, text in enumerate(items if batch else items[:1]):
        name = f"text at index {index}" if batch else "text"
        if not text.strip():
            return f"{name} cannot be empty"
        surrogates = [i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"]
        if surrogates:
            return f"{name} is not valid Unicode: lone surrogate at character {surrogates[0]}"
    return None


def check_predictions(form: tuple[str, str, bool], count: int, answer: Any) -> None:
    """Assert the 200 body has the documented shape, known labels and scores in [0, 1]."""
    route, _, batch = form
    if route == "/sentiment":
        predictions = answer if batch else [answer]
        assert isinstance(predictions, list) and len(predictions) == count
        ranked_lists = [[prediction] for prediction in predictions]
    else:
        assert isinstance(answer, list) and len(answer) == count
        ranked_lists = answer
        for ranked in ranked_lists:  # all labels, sorted, softmax sums to 1
            assert sorted(p["label"] for p in ranked) == sorted(LABELS)
            assert [p["score"] for p in ranked] == sorted((p["score"] for p in ranked), reverse=True)
            assert sum(p["score"] for p in ranked) == pytest.approx(1.0, abs=1e-6)
    for ranked in ranked_lists:
        for prediction in ranked:
            assert set(prediction) == {"label", "score"} and prediction["label"] in LABELS
            assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0


def check(form: tuple[str, str, bool], body: bytes, status: int, answer: Any) -> None:
    """Assert one reply: the exact 400 for blank or non-Unicode text, else valid predictions."""
    parsed = json.loads(body)  # what the service parses: escaped surrogate pairs join into one character
    items = parsed[form[1]] if form[2] else [parsed[form[1]]]
    error = expected_error(items, form[2])
    if error is None:
        assert status == 200, (status, answer)
        check_predictions(form, len(items), answer)
    else:
        assert (status, answer) == (400, {"error": error})


@settings(PROPERTY, max_examples=400)
@given(form=st.sampled_from(FORMS), items=st.lists(texts, min_size=1, max_size=4))
def test_any_text_through_the_app(client: FlaskClient, form: tuple[str, str, bool], items: list[str]) -> None:
    body = json.dumps(body_of(form, items)).encode()  # ASCII: a lone surrogate travels as "\ud800"
    response = client.post(form[0], data=body, content_type="application/json")
    check(form, body, response.status_code, response.get_json())


@pytest.fixture(scope="module")
def connection(live: Server) -> Iterator[http.client.HTTPConnection]:
    """Return one kept-alive connection to the live server."""
    kept = http.client.HTTPConnection("127.0.0.1", port_of(live), timeout=60)
    yield kept
    kept.close()


@settings(PROPERTY, max_examples=120)
@given(form=st.sampled_from(FORMS), items=st.lists(texts, min_size=1, max_size=4), ascii_only=st.booleans())
def test_any_text_over_http(connection: http.client.HTTPConnection, form: tuple[str, str, bool],
                            items: list[str], ascii_only: bool) -> None:
    # Raw UTF-8 too; a surrogate then goes as its 3-byte form (ED A0 80), which is invalid UTF-8.
    body = json.dumps(body_of(form, items), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    reply = exchange(connection, "POST", form[0], body, {"Content-Type": "application/json"})
    assert reply.headers["content-type"] == "application/json"
    check(form, body, reply.status, reply.json())


def body_of_size(unit: str, size: int) -> bytes:
    """Return {"text": "<unit repeated>"} of exactly size bytes of UTF-8."""
    head, tail = b'{"text": "', b'"}'
    room = size - len(head) - len(tail)
    filler = (unit * (room // len(unit.encode()) + 1)).encode()[:room].decode("utf-8", "ignore")
    filler += "a" * (room - len(filler.encode()))  # pad what a cut multi-byte character left
    body = head + filler.encode() + tail
    assert len(body) == size
    return body


@pytest.mark.parametrize("unit", ["a", "😀👍🏽 مرحبا שלום "], ids=["one-2MiB-token", "emoji-and-rtl"])
def test_bodies_at_and_just_over_the_2mib_limit(live: Server, unit: str) -> None:
    at_limit = send(live, "POST", "/sentiment", body_of_size(unit, LIMIT), {"Content-Type": "application/json"})
    assert at_limit.status == 200, at_limit.body[:200]
    check_predictions(("/sentiment", "text", False), 1, at_limit.json())
    over: Reply = send(live, "POST", "/sentiment", body_of_size(unit, LIMIT + 1),
                       {"Content-Type": "application/json"})
    assert (over.status, over.json()) == (413, {"error": f"request body too large: the limit is {LIMIT} bytes"})
