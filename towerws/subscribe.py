"""The subscribe message: ``{"groups": {KEY: [ITEM, ...]}}`` -> the groups it asks for.

Pure functions and values, no I/O.  The :class:`Allowlist` says which
``KEY-ITEM`` groups exist; nothing outside it can ever be joined, whatever the
client sends (group names double as AMQP routing keys, so the allowlist also
keeps topic wildcards such as ``#`` out of bindings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from towerws.messages import group_name, split_group

ID = "<id>"
USER = "<user>"
MAX_ID_DIGITS = 18
MAX_ITEM_ERRORS = 100
_WORD = re.compile(r"[A-Za-z0-9_]+\Z")


class InvalidMessage(ValueError):
    """Not a usable message at all: ``{"error": "invalid message: ..."}``."""


class AccessDenied(ValueError):
    """The whole message is refused: ``{"error": "access denied to channel"}`` (AWX's reply)."""


@dataclass(frozen=True)
class Allowlist:
    """KEY -> allowed item patterns: literal words, ``<id>`` or ``prefix_<user>``."""

    keys: Mapping[str, tuple[str, ...]]

    @classmethod
    def parse(cls, text: str) -> "Allowlist":
        """``"jobs:status_changed,summary job_events:<id> control:limit_reached_<user>"``."""
        keys: dict[str, tuple[str, ...]] = {}
        for entry in text.split():
            key, sep, items = entry.partition(":")
            patterns = tuple(i for i in items.split(",") if i)
            if not sep or not _WORD.match(key) or not patterns:
                raise ValueError(f"entry {entry!r} must look like KEY:ITEM[,ITEM...]")
            for pattern in patterns:
                if not _WORD.match(pattern.replace(ID, "").replace(USER, "") or "x") or (
                    ID in pattern and pattern != ID
                ):
                    raise ValueError(f"entry {entry!r}: item {pattern!r} must be a word, <id> or word<user>")
            if key in keys:
                raise ValueError(f"key {key!r} is listed twice")
            keys[key] = patterns
        if not keys:
            raise ValueError("must list at least one KEY:ITEM entry")
        return cls(keys)

    def __str__(self) -> str:
        return " ".join(f"{k}:{','.join(v)}" for k, v in self.keys.items())

    @property
    def id_keys(self) -> frozenset[str]:
        """Keys whose items are object ids (the ones a Tower API check applies to)."""
        return frozenset(k for k, v in self.keys.items() if ID in v)

    def group(self, key: str, item: Any, user_id: int) -> str | None:
        """The normalised group name for (key, item), or ``None`` if not allowed."""
        patterns = self.keys.get(key)
        if patterns is None:
            return None
        for pattern in patterns:
            if pattern == ID:
                ident = _object_id(item)
                if ident is not None:
                    return group_name(key, ident)
            elif isinstance(item, str) and item == pattern.replace(USER, str(user_id)):
                return group_name(key, item)
        return None

    def publishable(self, group: str) -> bool:
        """True if ``group`` is exactly a group name clients can join (canonical: ``job_events-42``).

        Per-user items (``control-limit_reached_<user>``) are allowed for any positive
        user id: a publisher speaks to every user.
        """
        parts = split_group(group)
        if parts is None:
            return False
        key, item = parts
        # Candidate user ids are the digit runs of the item; the allowlist decides, and
        # comparing with its canonical name refuses "007", "+7" and ids out of range.
        user_ids = [int(run) for run in re.findall(r"[0-9]+", item) if len(run) <= MAX_ID_DIGITS and int(run) > 0]
        return any(self.group(key, item, uid) == group for uid in user_ids or [1])


def _object_id(item: Any) -> int | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        value = item
    elif isinstance(item, str) and 0 < len(item) <= MAX_ID_DIGITS and item.isascii() and item.isdigit():
        value = int(item)
    else:
        return None
    return value if 0 < value < 10**MAX_ID_DIGITS else None


@dataclass(frozen=True)
class GroupsRequest:
    """What one groups message asks for, once checked against the allowlist."""

    groups: frozenset[str]
    #: (key, item) pairs refused, as text for the error reply.
    denied: tuple[tuple[str, str], ...]
    #: the anti-CSRF token a cookie-authenticated browser sends along.
    xrftoken: str | None = None


def _show(value: Any, limit: int = 64) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_groups_message(text: str, allowlist: Allowlist, user_id: int) -> GroupsRequest:
    """Parse and check one client text message.

    Raises :class:`InvalidMessage` or :class:`AccessDenied` for a message that
    changes nothing; otherwise per-item refusals are in ``denied``.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays are valid JSON that json cannot parse.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise InvalidMessage(f"invalid message: {reason}") from None
    if not isinstance(data, dict):
        raise InvalidMessage("invalid message: expected a JSON object")
    if "groups" not in data:
        raise InvalidMessage('invalid message: expected a "groups" object')
    requested = data["groups"]
    if not isinstance(requested, dict):
        raise InvalidMessage('invalid message: "groups" must be an object')
    xrftoken = data.get("xrftoken")
    if xrftoken is not None and not isinstance(xrftoken, str):
        raise InvalidMessage('invalid message: "xrftoken" must be a string')

    if any(not isinstance(items, list) for items in requested.values()):
        raise AccessDenied("access denied to channel")

    groups: set[str] = set()
    denied: list[tuple[str, str]] = []
    for key, items in requested.items():
        for item in items:
            group = allowlist.group(key, item, user_id)
            if group is None:
                denied.append((_show(key), _show(item)))
            else:
                groups.add(group)
    return GroupsRequest(frozenset(groups), tuple(denied), xrftoken)


def denied_errors(denied: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """Error replies for refused items, capped so one message cannot amplify into thousands."""
    return _item_errors(denied, "access denied to channel {key} for resource id {item}", "access denied to {n} more items")


def unavailable_errors(items: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """Error replies for items the authorizer could not check (its service failed), capped likewise."""
    return _item_errors(
        items, "authorization service unavailable for {key} {item}", "authorization service unavailable for {n} more items"
    )


def _item_errors(items: tuple[tuple[str, str], ...], one: str, more: str) -> list[dict[str, str]]:
    errors = [{"error": one.format(key=key, item=item)} for key, item in items[:MAX_ITEM_ERRORS]]
    if len(items) > MAX_ITEM_ERRORS:
        errors.append({"error": more.format(n=len(items) - MAX_ITEM_ERRORS)})
    return errors
