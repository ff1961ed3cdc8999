"""Collect towerws's log lines during a test, and wait for one to appear (bounded)."""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher


class LogCapture:
    """Formatted events whose namespace starts with ``prefix``; use as a context manager."""

    def __init__(self, prefix: str = "towerws"):
        self.prefix = prefix
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[str, int, asyncio.Future]] = []

    def __enter__(self) -> "LogCapture":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        if not str(event.get("log_namespace", "")).startswith(self.prefix):
            return
        self.events.append(event)
        self.lines.append(formatEvent(event))
        for waiter in list(self._waiters):
            text, count, fut = waiter
            if self.count(text) >= count and not fut.done():
                fut.set_result(None)
                self._waiters.remove(waiter)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def wait_for(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until ``count`` lines contain ``text``."""
        if self.count(text) >= count:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((text, count, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {count} log lines with {text!r} within {timeout} s; got:\n" + "\n".join(self.lines)) from None
