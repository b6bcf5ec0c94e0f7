"""Restart pacing for one worker slot: a pure policy object, no processes, no sleeping.

The worker tells the policy when a process started (`started`) and asks it what to do
after the process ended (`after_exit`). The answer is a `RestartDecision`: wait
`delay` seconds in BACKOFF, or give up for now and wait `delay` (= `fatal_retry`) in
FATAL.

Invariants:
- A run that lasted at least `stable_after` seconds wipes the failure count, so the
  first restart after a stable run uses `initial` (0 by default: a single crash costs
  only the spawn time).
- Each further quick failure waits `first_delay * factor**(n-2)`, capped at `max`, with
  +-`jitter` (a fraction) so that many workers do not restart in lock step.
- The `start_limit`-th quick failure in a row is fatal; from FATAL the slot is retried
  every `fatal_retry` seconds, and a retry that fails quickly again is fatal at once
  (it does not get a fresh run of `start_limit` attempts).
- `give_up()` (exit code 78, EX_CONFIG) is fatal at once with the same slow retry.
- `reset()` forgets everything (an operator's explicit start).

The clock and the random source are injected so that tests drive them by hand.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.spec import BackoffSpec


@dataclass(frozen=True)
class RestartDecision:
    """What to do after a process ended: wait `delay` s in BACKOFF, or in FATAL."""

    delay: float
    fatal: bool
    failures: int  # quick failures in a row, including this one
    reason: str = ""


class Backoff:
    """Counts quick failures of one slot and turns them into restart delays."""

    def __init__(
        self,
        spec: BackoffSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.spec = spec
        self._clock = clock
        self._rand = rand
        self._failures = 0
        self._started_at: float | None = None

    @property
    def failures(self) -> int:
        """Quick failures in a row so far."""
        return self._failures

    def started(self) -> None:
        """A process of the slot was just spawned."""
        self._started_at = self._clock()

    def running_for(self) -> float:
        """Seconds since the last `started()` (0 when nothing started yet)."""
        return 0.0 if self._started_at is None else self._clock() - self._started_at

    def stable(self) -> bool:
        """True once the current process has run for `stable_after` seconds."""
        return self._started_at is not None and self.running_for() >= self.spec.stable_after

    def reset(self) -> None:
        """Forget every failure (an explicit start by the operator)."""
        self._failures = 0

    def after_exit(self, *, may_give_up: bool = True) -> RestartDecision:
        """The process ended: how long to wait, and whether that is fatal.

        `may_give_up=False` is for a process that had started fine (it was ready) and
        was replaced by the agent (failing checks, memory, watchdog): its delays grow
        the same, but it never turns fatal. A dependency that fails every worker's check
        must not leave the service down for `fatal_retry` after it recovered.
        """
        if self.stable():
            self._failures = 0
        self._started_at = None
        self._failures += 1
        n = self._failures
        if n >= self.spec.start_limit and may_give_up:
            # stay at the limit so that a quick failure after the slow retry is fatal again
            self._failures = self.spec.start_limit
            return RestartDecision(
                self.spec.fatal_retry, True, n, f"{n} quick failures in a row (start limit)"
            )
        return RestartDecision(self._delay(n), False, n)

    def give_up(self, reason: str) -> RestartDecision:
        """Fatal at once (EX_CONFIG): no quick retries, only the slow one."""
        self._started_at = None
        self._failures = self.spec.start_limit
        return RestartDecision(self.spec.fatal_retry, True, self._failures, reason)

    def _delay(self, n: int) -> float:
        if n <= 1:
            return self.spec.initial
        base = min(self.spec.first_delay * self.spec.factor ** (n - 2), self.spec.max)
        spread = base * self.spec.jitter * (2.0 * self._rand() - 1.0)
        return max(0.0, min(base + spread, self.spec.max))
