"""The restart policy alone: a hand-driven clock and random source, no processes."""

from __future__ import annotations

import pytest

from supervisor.backoff import Backoff, RestartDecision
from supervisor.spec import BackoffSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SPEC = BackoffSpec(
    initial=0.0, first_delay=0.1, factor=2.0, max=1.0, jitter=0.0, stable_after=10.0,
    start_limit=6, fatal_retry=60.0,
)


def quick_failures(policy: Backoff, clock: Clock, n: int) -> list[float]:
    delays = []
    for _ in range(n):
        policy.started()
        clock.now += 0.5
        decision = policy.after_exit()
        assert not decision.fatal
        delays.append(decision.delay)
    return delays


def test_first_restart_immediate_then_exponential_capped() -> None:
    clock = Clock()
    policy = Backoff(SPEC, clock=clock)
    assert quick_failures(policy, clock, 5) == [0.0, 0.1, 0.2, 0.4, 0.8]


def test_cap_at_max() -> None:
    clock = Clock()
    policy = Backoff(
        BackoffSpec(first_delay=0.5, max=1.0, jitter=0.0, start_limit=10), clock=clock
    )
    assert quick_failures(policy, clock, 5) == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_stable_run_resets() -> None:
    clock = Clock()
    policy = Backoff(SPEC, clock=clock)
    quick_failures(policy, clock, 4)
    policy.started()
    clock.now += SPEC.stable_after
    assert policy.stable()
    decision = policy.after_exit()
    assert (decision.delay, decision.failures, decision.fatal) == (0.0, 1, False)
    assert quick_failures(policy, clock, 2) == [0.1, 0.2]


def test_start_limit_is_fatal_and_slow_retry_fails_fast() -> None:
    clock = Clock()
    policy = Backoff(SPEC, clock=clock)
    quick_failures(policy, clock, SPEC.start_limit - 1)
    policy.started()
    decision = policy.after_exit()
    assert decision.fatal and decision.delay == SPEC.fatal_retry
    assert "start limit" in decision.reason
    # the slow retry fails quickly again: fatal at once, not another run of attempts
    policy.started()
    clock.now += 0.1
    again = policy.after_exit()
    assert again.fatal and again.delay == SPEC.fatal_retry
    # ...but a retry that runs stably starts over
    policy.started()
    clock.now += SPEC.stable_after + 1
    assert policy.after_exit() == RestartDecision(0.0, False, 1)


def test_replacements_of_a_ready_worker_pace_but_never_give_up() -> None:
    clock = Clock()
    policy = Backoff(SPEC, clock=clock)
    delays = []
    for _ in range(SPEC.start_limit + 3):
        policy.started()
        clock.now += 0.5
        decision = policy.after_exit(may_give_up=False)
        assert not decision.fatal
        delays.append(decision.delay)
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]  # paced, capped at max
    policy.started()
    assert policy.after_exit().fatal  # a failed start after them still counts


def test_give_up_and_reset() -> None:
    clock = Clock()
    policy = Backoff(SPEC, clock=clock)
    decision = policy.give_up("exit code 78 (EX_CONFIG)")
    assert decision.fatal and decision.delay == SPEC.fatal_retry
    assert decision.reason == "exit code 78 (EX_CONFIG)"
    policy.reset()
    assert quick_failures(policy, clock, 2) == [0.0, 0.1]


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
def test_jitter_bounds(rand: float) -> None:
    clock = Clock()
    spec = BackoffSpec(first_delay=1.0, factor=2.0, max=100.0, jitter=0.1, start_limit=10)
    policy = Backoff(spec, clock=clock, rand=lambda: rand)
    delays = quick_failures(policy, clock, 3)
    base = [0.0, 1.0, 2.0]
    for got, want in zip(delays, base, strict=True):
        assert want * 0.9 - 1e-9 <= got <= want * 1.1 + 1e-9
    if rand == 0.0:
        assert delays[2] == pytest.approx(1.8)
    if rand == 1.0:
        assert delays[2] == pytest.approx(2.2)


def test_jitter_never_exceeds_max() -> None:
    clock = Clock()
    spec = BackoffSpec(first_delay=1.0, factor=2.0, max=2.0, jitter=0.5, start_limit=10)
    policy = Backoff(spec, clock=clock, rand=lambda: 1.0)
    assert max(quick_failures(policy, clock, 6)) == 2.0
