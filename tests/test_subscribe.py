"""The groups message parser and the allowlist, without I/O."""

from __future__ import annotations

import json

import pytest

from towerws.config import DEFAULT_GROUPS
from towerws.subscribe import (
    MAX_ITEM_ERRORS,
    AccessDenied,
    Allowlist,
    InvalidMessage,
    denied_errors,
    parse_groups_message,
)

ALLOW = Allowlist.parse(DEFAULT_GROUPS)


def parse(obj, user_id: int = 7):
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return parse_groups_message(text, ALLOW, user_id)


def test_known_groups_and_id_normalisation() -> None:
    req = parse({"groups": {"jobs": ["status_changed", "summary"], "job_events": [42, "0017"], "schedules": ["changed"]}})
    assert req.groups == {"jobs-status_changed", "jobs-summary", "job_events-42", "job_events-17", "schedules-changed"}
    assert req.denied == ()


def test_every_id_keyed_group() -> None:
    keys = ["job_events", "ad_hoc_command_events", "workflow_events", "project_update_events",
            "inventory_update_events", "system_job_events"]
    req = parse({"groups": {k: [5] for k in keys}})
    assert req.groups == {f"{k}-5" for k in keys}
    assert ALLOW.id_keys == frozenset(keys)


def test_control_only_own_user() -> None:
    req = parse({"groups": {"control": ["limit_reached_7", "limit_reached_8"]}}, user_id=7)
    assert req.groups == {"control-limit_reached_7"}
    assert req.denied == (("control", "limit_reached_8"),)


@pytest.mark.parametrize("item", [0, -1, True, 1.5, "1.5", "abc", "", None, [], {}, "1e3", "٣", "9" * 30, 10**20])
def test_bad_ids_are_denied_individually(item) -> None:
    req = parse({"groups": {"job_events": [item, 3]}})
    assert req.groups == {"job_events-3"}
    assert len(req.denied) == 1 and req.denied[0][0] == "job_events"


@pytest.mark.parametrize("key,item", [("jobs", "other"), ("unknown", "x"), ("jobs", "#"), ("broadcast", "all"),
                                      ("jobs-status_changed", "x"), ("jobs", "status_changed.#")])
def test_unknown_keys_and_items_are_denied(key, item) -> None:
    req = parse({"groups": {key: [item], "jobs": ["summary"]} if key != "jobs" else {key: [item, "summary"]}})
    assert req.groups == {"jobs-summary"}
    assert (key, item) in req.denied


def test_error_texts() -> None:
    req = parse({"groups": {"job_events": ["x"]}})
    assert denied_errors(req.denied) == [{"error": "access denied to channel job_events for resource id x"}]


def test_error_replies_are_capped() -> None:
    req = parse({"groups": {"nope": list(range(MAX_ITEM_ERRORS + 50))}})
    errors = denied_errors(req.denied)
    assert len(errors) == MAX_ITEM_ERRORS + 1
    assert errors[-1] == {"error": "access denied to 50 more items"}


def test_non_list_value_refuses_whole_message() -> None:
    with pytest.raises(AccessDenied, match="^access denied to channel$"):
        parse({"groups": {"jobs": ["summary"], "job_events": 42}})


@pytest.mark.parametrize("text", ["", "not json", "[]", "42", '"groups"', "null", '{"groups": []}',
                                  '{"groups": null}', "{}", '{"groups": {}, "xrftoken": 5}', "[" * 50000])
def test_invalid_messages(text: str) -> None:
    with pytest.raises(InvalidMessage, match="^invalid message: "):
        parse(text)


def test_empty_groups_leaves_everything() -> None:
    assert parse({"groups": {}}).groups == frozenset()


def test_long_hostile_values_are_shortened_in_errors() -> None:
    req = parse({"groups": {"k" * 1000: ["v" * 1000]}})
    (key, item), = req.denied
    assert len(key) <= 64 and len(item) <= 64


@pytest.mark.parametrize("text", ["jobs", "jobs:", ":a", "jo bs:a", "a:b#", "a:<id>x", "a:b a:c", ""])
def test_allowlist_rejects_bad_config(text: str) -> None:
    with pytest.raises(ValueError):
        Allowlist.parse(text)


def test_allowlist_round_trips() -> None:
    assert Allowlist.parse(str(ALLOW)) == ALLOW
