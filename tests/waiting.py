"""Wait for a condition with a deadline: the only way tests synchronise with processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.01


class GiveUp(Exception):
    """Raised by a predicate to stop waiting at once (the condition can never hold)."""


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - the deadline is this helper's whole point
    what: str = "",
) -> T:
    """Poll `predicate` until it returns a truthy value; return that value.

    Raises AssertionError naming `what` when `timeout` seconds pass first. The
    predicate may be a plain function or a coroutine function; exceptions it raises
    count as "not yet" until the deadline, then are re-raised.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
                value = await value
            if value:
                return value  # type: ignore[return-value,unused-ignore]
        except GiveUp:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from last_error
        await asyncio.sleep(POLL)


def wait_for_sync(predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Blocking twin of `wait_for` for tests that are not async."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from last_error
        time.sleep(POLL)
