"""Run coroutine handlers eagerly: no task, no loop round-trip when they do not wait.

Most handlers return at once (`return "hello"`). Wrapping each call in a task costs a
task object, two loop callbacks and a delayed write; even driving the coroutine by hand
with `send(None)` costs a StopIteration per call. `EagerRunner` instead keeps a driver
generator that runs each coroutine with `yield from`, which hands back the return value
without an exception. If the coroutine suspends on a future, the driver, with the
half-run coroutine inside, moves into a task that resumes it exactly where it stopped,
and the runner starts a fresh driver for the next call.

Invariants: the value the coroutine yielded at its first suspension is re-yielded to the
task unchanged, so the task waits on the same future the coroutine waits on; a driver
serves one coroutine at a time (one started while it runs another goes to a task); an
exception raised before the first suspension propagates to the caller of `run`, later
ones become the task's exception.
Caveat (documented for users): until the first real suspension the handler runs outside
any task, so `asyncio.current_task()` is None there, as with Python 3.12's eager tasks.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, cast

DONE: Any = object()  # the driver's "finished, result in the box" signal


@types.coroutine
def _drive(box: list[Any]) -> Generator[Any, Any, None]:
    while True:
        coro = yield DONE
        box[0] = yield from coro


@types.coroutine
def _resume(
    driver: Generator[Any, Any, None], box: list[Any], yielded: Any
) -> Generator[Any, Any, Any]:
    """Continue a suspended driver, delegating like `yield from`, until it is DONE."""
    value = yielded
    while True:
        try:
            sent = yield value
        except BaseException as exc:  # cancellation goes into the handler's coroutine
            value = driver.throw(exc)
        else:
            value = driver.send(sent)
        if value is DONE:
            return box[0]


def _new_driver(box: list[Any]) -> types.GeneratorType[Any, Any, None]:
    driver = cast("types.GeneratorType[Any, Any, None]", _drive(box))
    driver.send(None)  # run to the first `yield DONE`
    return driver


async def _finish(driver: Generator[Any, Any, None], box: list[Any], yielded: Any) -> Any:
    return await _resume(driver, box, yielded)


class EagerRunner:
    """Runs coroutines to completion inline; suspended ones continue in a task.

    `run(coro)` is the whole protocol. The HTTP hot path spells it out instead, to save
    a Python call per request: `value = runner.send(coro)` (on an exception: `failed()`,
    then handle it); `value is DONE` means finished with the result in `box[0]`, else
    `suspended(value)` gives the task that finishes it. Spelled out, it must first make
    sure `driver.gi_running` is false (see `run`).
    """

    __slots__ = ("box", "driver", "send")

    def __init__(self) -> None:
        self.box: list[Any] = [None]  # box[0]: what the last inline run returned
        self.driver = _new_driver(self.box)
        self.send = self.driver.send

    def failed(self) -> None:
        """The coroutine just sent raised: that driver is finished too; start another."""
        self.box = [None]
        self.driver = _new_driver(self.box)
        self.send = self.driver.send

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run `coro`: DONE when it finished (its result is then `box[0]`), else the
        task that finishes it.

        Called from inside a coroutine this runner is running (a handler whose
        `conn.send()` starts the next pipelined request's handler), `coro` goes to a
        task at once: the driver cannot run two coroutines, and the outer caller still
        expects its result in `box`.
        """
        if self.driver.gi_running:
            return asyncio.get_running_loop().create_task(coro)
        try:
            value = self.send(coro)
        except BaseException:
            self.failed()
            raise
        if value is DONE:
            return DONE
        return self.suspended(value)

    def suspended(self, yielded: Any) -> asyncio.Task[Any]:
        """The coroutine just sent suspended on `yielded`: a task continues it."""
        driver, box = self.driver, self.box
        self.failed()  # a fresh driver for the next coroutine (this one is busy)
        return asyncio.get_running_loop().create_task(_finish(driver, box, yielded))
