"""Hostile bodies, methods and framing against the live server: the right JSON status, and it keeps serving."""

from __future__ import annotations

import gzip

import pytest

from tests.reliability.kit import POSITIVE, Reply, Server, assert_no_leak, health_ok, raw_exchange, send

LIMIT = 2 * 1024 * 1024
INVALID = {"error": "invalid JSON"}
JSON = {"Content-Type": "application/json"}
TOO_LARGE = {"error": f"request body too large: the limit is {LIMIT} bytes"}


# (case id, body, headers, status, JSON answer; None: any valid prediction)
BODIES = [
    ("invalid-utf8", b'{"text": "\xff\xfe\xfd"}', JSON, 400, INVALID),
    ("overlong-utf8", b'{"text": "\xc0\xaf"}', JSON, 400, INVALID),
    ("utf8-encoded-surrogate", b'{"text": "a\xed\xa0\x80"}', JSON, 400,
     {"error": "text is not valid Unicode: lone surrogate at character 1"}),
    ("100k-nested-arrays", b"[" * 100_000, JSON, 400, INVALID),
    ("100k-nested-objects", b'{"a":' * 100_000, JSON, 400, INVALID),
    ("nested-beside-a-valid-text", b'{"text": "fine", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON,
     400, INVALID),
    ("NaN", b'{"text": "fine", "top_k": NaN}', JSON, 400, INVALID),
    ("Infinity", b'{"text": "fine", "x": Infinity}', JSON, 400, INVALID),
    ("-Infinity", b'{"inputs": "fine", "parameters": {"top_k": -Infinity}}', JSON, 400, INVALID),
    ("1e400-overflows-to-inf", b'{"text": "fine", "top_k": 1e400}', JSON, 400,
     {"error": "'top_k' must be an integer >= 1 or null"}),
    ("4301-digit-integer", b'{"text": "fine", "top_k": ' + b"9" * 4301 + b"}", JSON, 400, INVALID),
    ("empty-body", b"", JSON, 400, INVALID),
    ("no-content-type-no-body", None, {}, 400, INVALID),
    ("whitespace-body", b" \r\n\t ", JSON, 400, INVALID),
    ("json-null", b"null", JSON, 400, {"error": "the JSON body must be an object"}),
    ("text/plain-json", b'{"text": "a lovely film"}', {"Content-Type": "text/plain"}, 200, None),
    ("xml", b"<text>a lovely film</text>", {"Content-Type": "application/xml"}, 400, INVALID),
    ("form-urlencoded", b"text=a+lovely+film", {"Content-Type": "application/x-www-form-urlencoded"}, 400, INVALID),
    ("latin-1-charset", '{"text": "très bien"}'.encode("latin-1"),
     {"Content-Type": "application/json; charset=latin-1"}, 400, INVALID),
    ("multipart", b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',
     {"Content-Type": "multipart/form-data; boundary=b"}, 415,
     {"error": "unsupported media type: send a JSON body (Content-Type: application/json)"}),
]


@pytest.mark.parametrize(("body", "headers", "status", "answer"), [case[1:] for case in BODIES],
                         ids=[case[0] for case in BODIES])
def test_hostile_bodies_get_the_right_json_status(live: Server, versions: list[str], body: bytes | None,
                                                  headers: dict[str, str], status: int, answer: object) -> None:
    reply = send(live, "POST", "/sentiment", body, headers)
    assert reply.status == status and reply.headers["content-type"] == "application/json", reply
    if answer is None:
        assert reply.json()["label"] in ("NEGATIVE", "POSITIVE")
    else:
        assert reply.json() == answer
    assert_no_leak(reply, versions)
    assert health_ok(live)


def chunked(body: bytes, size: int = 65536) -> bytes:
    """Return body in HTTP/1.1 chunked transfer coding."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def post_chunked(body: bytes) -> bytes:
    """Return a raw POST /sentiment with a chunked body and no Content-Length."""
    return (b"POST /sentiment HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(body))


def test_chunked_bodies_without_length(live: Server, versions: list[str]) -> None:
    reply, _ = raw_exchange(live, post_chunked(b'{"text": "' + POSITIVE.encode() + b'"}'))
    assert reply is not None and reply.status == 200 and reply.json()["label"] == "POSITIVE"
    reply, _ = raw_exchange(live, post_chunked(b'{"text": "' + b"a" * (3 * 1024 * 1024) + b'"}'), timeout=60)
    assert reply is not None and (reply.status, reply.json()) == (413, TOO_LARGE)
    assert_no_leak(reply, versions)
    assert health_ok(live)


def test_a_1gb_content_length_is_refused_at_once(live: Server) -> None:
    head = (b"POST /sentiment HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    reply, seconds = raw_exchange(live, head + b'{"text": "' + b"a" * 4096, timeout=5)
    assert reply is not None and reply.status == 413, f"no answer within {seconds:.1f} s"
    assert reply.json() == TOO_LARGE
    assert health_ok(live)


@pytest.mark.parametrize("head", [
    b"POST /sentiment HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
    b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
], ids=["bad-chunk-size", "negative-content-length"])
def test_framing_errors_are_json(live: Server, head: bytes) -> None:
    reply, _ = raw_exchange(live, head)
    assert reply is not None and reply.status == 400
    assert reply.headers["content-type"] == "application/json", reply.body


def test_framing_errors_leak_nothing_and_the_server_keeps_serving(live: Server, versions: list[str]) -> None:
    for head in (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n",
                 b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n"):  # a TLS hello
        reply, _ = raw_exchange(live, head)
        assert reply is not None and 400 <= reply.status < 500, head[:40]
        assert_no_leak(reply, versions)
        assert health_ok(live)


COMPRESSED = "unsupported Content-Encoding: send the body uncompressed"
JSON_ROUTES = ("/sentiment", "/", "/predict", "/rerank", "/tokenize", "/v2/models/minilm-l6-sentiment/infer")


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_415_on_every_route_whatever_it_holds(live: Server, route: str, coding: str) -> None:
    body = gzip.compress(b'{"text": "a lovely film"}') if "gzip" in coding else b'{"text": "a lovely film"}'
    reply = send(live, "POST", route, body, {**JSON, "Content-Encoding": coding})
    assert (reply.status, reply.json()["error"]) == (415, COMPRESSED), reply  # TEI's routes add error_type
    assert reply.headers["accept-encoding"] == "identity"
    identity = send(live, "POST", "/sentiment", b'{"text": "a lovely film"}', {**JSON, "Content-Encoding": "identity"})
    assert identity.status == 200


def test_a_transfer_coding_the_server_lacks_is_501_json_that_names_it(live: Server, versions: list[str]) -> None:
    head = (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(gzip.compress(b'{"text": "fine"}')))
    reply, _ = raw_exchange(live, head)
    assert reply is not None and reply.status == 501, reply
    assert reply.headers["content-type"] == "application/json" and "Transfer-Encoding" in reply.json()["error"]
    assert_no_leak(reply, versions)
    assert health_ok(live)


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "BREW")


def test_every_route_with_every_wrong_method_is_405_json_with_allow(live: Server, versions: list[str]) -> None:
    document = send(live, "GET", "/openapi.json").json()
    tried = 0
    for path, item in document["paths"].items():
        allowed = {method.upper() for method in item} | {"OPTIONS"}
        if "GET" in allowed:
            allowed.add("HEAD")  # Werkzeug answers HEAD wherever GET is allowed
        for method in sorted(set(METHODS) - allowed):
            reply: Reply = send(live, method, path)
            assert reply.status == 405, (method, path, reply)
            assert set(reply.headers["allow"].split(", ")) == allowed, (method, path)
            if method != "HEAD":  # a HEAD answer has no body
                assert reply.json() == {"error": "method not allowed"}, (method, path)
            assert_no_leak(reply, versions)
            tried += 1
        assert health_ok(live)
    assert tried >= 40  # 7 routes x 5-8 wrong methods each


def test_an_integral_float_top_k_counts_as_the_integer(live: Server) -> None:
    # JSON Schema, and so the OpenAPI document, reads 2.0 as the integer 2 (schemathesis sent 18077.0)
    reply = send(live, "POST", "/sentiment", b'{"text": "a lovely film", "top_k": 2.0}', JSON)
    assert reply.status == 200 and [p["label"] for p in reply.json()] == ["POSITIVE", "NEGATIVE"]
    reply = send(live, "POST", "/", b'{"inputs": "a lovely film", "parameters": {"top_k": 1.5}}', JSON)
    assert (reply.status, reply.json()) == (400, {"error": "'top_k' must be an integer >= 1 or null"})
