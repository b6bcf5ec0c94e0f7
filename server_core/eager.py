"""Run a coroutine handler eagerly: no task, no loop round-trip when it does not wait.

Most handlers return at once (`return "hello"`). Wrapping each call in a task costs a
task object, two loop callbacks and a delayed write. Instead the caller drives the
coroutine with `send(None)` right away, like Python 3.12's eager task factory: if it
finishes, the result is used immediately; if it suspends on a future, `continue_in_task`
hands the half-run coroutine to a task that resumes it exactly where it stopped.

Invariant: the value the coroutine yielded at its first suspension is re-yielded to the
task unchanged, so the task waits on the same future the coroutine waits on.
Caveat (documented for users): until the first real suspension the handler runs outside
any task, so `asyncio.current_task()` is None there.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Continue `coro` after it yielded `yielded`, delegating like `yield from` does."""
    value = yielded
    while True:
        try:
            sent = yield value
        except BaseException as exc:  # cancellation and GeneratorExit go into the coroutine
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    return await _resume(coro, yielded)


def continue_in_task(coro: Coroutine[Any, Any, Any], yielded: Any) -> asyncio.Task[Any]:
    """A task that finishes `coro`, which already ran up to yielding `yielded`."""
    return asyncio.get_running_loop().create_task(_finish(coro, yielded))
