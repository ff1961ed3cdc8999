"""towerws.messages: the rules every path checks -- group names, strict JSON bodies, AMQP names. Pure, no I/O."""

from __future__ import annotations

import json
import math

import pytest

from towerws.messages import (
    MAX_GROUP_BYTES,
    InvalidBody,
    check_body,
    check_group,
    check_message,
    check_name,
    dumps,
    group_name,
    loads,
    split_group,
)

# -- strict JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"x": NaN}', "[1, Infinity]", '{"a": [-Infinity]}'])
def test_loads_refuses_what_json_parse_throws_on(text: str) -> None:
    json.loads(text)  # Python's own json takes it: the reason for the strict decoder
    with pytest.raises(ValueError, match="is not valid JSON"):
        loads(text)


@pytest.mark.parametrize("text, value", [
    ('{"a": [1, 2.5, -3e2, true, false, null, "caf\u00e9"]}', {"a": [1, 2.5, -300.0, True, False, None, "caf\u00e9"]}),
    ('"NaN"', "NaN"),  # a string that says NaN is fine
    ("1e308", 1e308),
    ("  7 ", 7),
])
def test_loads_accepts_rfc_8259(text: str, value: object) -> None:
    assert loads(text) == value


def test_loads_wants_text_not_bytes() -> None:
    with pytest.raises(TypeError, match="must be a str, not bytes"):
        loads(b"{}")  # type: ignore[arg-type]


def test_loads_reports_junk_as_a_decode_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads("{")


@pytest.mark.parametrize("body", [b"{}", b"[]", b'"x"', b"0", b"null", '{"name": "caf\u00e9"}'.encode(),
                                  b' {"a": {"b": [1, 2]}} '])
def test_check_body_accepts_one_utf8_json_document(body: bytes) -> None:
    assert check_body(body) is None


@pytest.mark.parametrize("body, reason", [
    (b"NaN", "body is not valid JSON: NaN is not valid JSON"),
    (b'{"x": Infinity}', "body is not valid JSON: Infinity is not valid JSON"),
    (b"[-Infinity]", "body is not valid JSON: -Infinity is not valid JSON"),
    (b"\xff\xfe{}", "body is not valid UTF-8"),
    (b'"caf\xe9"', "body is not valid UTF-8"),  # Latin-1, not UTF-8
    (b"", "body is not valid JSON"),
    (b"{} {}", "body is not valid JSON"),  # one document, not two
    (b"{'a': 1}", "body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "body is nested too deeply"),
])
def test_check_body_refuses_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBody) as info:
        check_body(body)
    assert str(info.value) == reason


def test_invalid_body_is_a_value_error() -> None:
    # Callers catch (TypeError, ValueError) for the publish contract.
    assert issubclass(InvalidBody, ValueError)


def test_dumps_is_compact_utf8_that_check_body_accepts() -> None:
    body = dumps({"name": "caf\u00e9", "n": [1, 2]})
    assert body == '{"name":"caf\u00e9","n":[1,2]}'.encode("utf-8")
    check_body(body)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"x": [math.nan]}])
def test_dumps_refuses_nan_and_infinity(value: object) -> None:
    with pytest.raises(ValueError):
        dumps(value)


# -- names and groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["jobs-status_changed", "job_events-42", "x", "caf\u00e9-1",
                                   "g" * MAX_GROUP_BYTES, "\u00e9" * (MAX_GROUP_BYTES // 2)])
def test_valid_groups(group: str) -> None:
    assert check_group(group) is None
    assert check_message(group, b"{}") is None


@pytest.mark.parametrize("group, error, text", [
    ("", ValueError, "group must not be empty"),
    ("g" * (MAX_GROUP_BYTES + 1), ValueError, "group is 256 bytes long; at most 255 are allowed"),
    # 128 two-byte characters: 128 characters but 256 bytes: the limit is in bytes
    ("\u00e9" * 128, ValueError, "group is 256 bytes long"),
    ("job events", ValueError, "must not contain whitespace"),
    ("jobs-x\t", ValueError, "must not contain whitespace"),
    ("jobs-x\n", ValueError, "must not contain whitespace"),
    ("jobs-\u00a0", ValueError, "must not contain whitespace"),  # non-breaking space is whitespace too
    ("jobs-\ud800", ValueError, "is not valid Unicode"),  # a lone surrogate cannot be UTF-8
    (42, TypeError, "group must be a str, not int"),
    (b"jobs-summary", TypeError, "group must be a str, not bytes"),
])
def test_invalid_groups(group: object, error: type, text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(")):
        check_group(group)  # type: ignore[arg-type]


def test_check_name_names_what_it_checks_and_returns_the_name() -> None:
    assert check_name("towerws") == "towerws"
    with pytest.raises(ValueError, match="^exchange must not be empty$"):
        check_name("", "exchange")
    with pytest.raises(ValueError, match="^node id is 11 bytes long; at most 10 are allowed$"):
        check_name("x" * 11, "node id", max_bytes=10)


def test_check_message_checks_the_group_then_the_body() -> None:
    with pytest.raises(ValueError, match="group must not be empty"):
        check_message("", b"not json")  # the group first
    with pytest.raises(TypeError, match="body must be bytes, not str"):
        check_message("jobs-summary", "{}")  # type: ignore[arg-type]
    with pytest.raises(InvalidBody, match="NaN"):
        check_message("jobs-summary", b"NaN")


def test_group_name_and_split_group() -> None:
    assert group_name("job_events", 42) == "job_events-42"
    assert group_name("jobs", "status_changed") == "jobs-status_changed"
    assert split_group("job_events-42") == ("job_events", "42")
    # KEYs are words: the first "-" splits, the ITEM keeps the rest.
    assert split_group("schedules-changed-now") == ("schedules", "changed-now")
    assert split_group("jobs-") == ("jobs", "")
    assert split_group("control") is None
    for key, item in (("job_events", "7"), ("ad_hoc_command_events", "x-y")):
        assert split_group(group_name(key, item)) == (key, item)
