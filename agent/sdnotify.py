"""The agent's own sd_notify client: how svcd talks to the systemd that runs it.

Responsibility: tell the service manager above the agent (systemd, or anything speaking
the same protocol) when the agent is ready, reloading, stopping, what its status is, and
that its loop is still alive (the watchdog). This is the *upward* direction only; the
notify sockets the agent opens for its own workers live in `supervisor/notify.py`.

Invariants:
- Stdlib only, and nothing here ever raises to the caller: a notification that cannot be
  delivered is logged once (the first failure) and reported as `False`. The agent must
  never fall over because systemd went away or the socket is full.
- Sends are non-blocking (`sendto` on a non-blocking datagram socket): a full receive
  queue drops the message rather than stalling the event loop.
- The environment is only *read*. `NOTIFY_SOCKET` and `WATCHDOG_*` stay in
  `os.environ`; keeping them out of the workers' environment is the spawn code's job
  (`supervisor/spawn.py` builds a clean environment), so this module never unsets them.
- The watchdog is honoured only when `WATCHDOG_PID` is absent or names this process, as
  `sd_watchdog_enabled(3)` does: a watchdog meant for a parent must not be fed by us.
- The socket is created close-on-exec (Python's default), so no worker inherits it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

USEC_PER_SECOND = 1_000_000
NSEC_PER_USEC = 1_000

# systemd expects a ping at least once per WATCHDOG_USEC; sd_watchdog_enabled(3)
# recommends half of it, leaving room for one late tick.
WATCHDOG_SAFETY_FACTOR = 2

# An abstract-namespace socket is written "@name" in NOTIFY_SOCKET; the kernel name
# starts with a NUL byte instead.
ABSTRACT_PREFIX = "@"


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // NSEC_PER_USEC


def _one_line(text: str) -> str:
    """A field value may not contain a newline: it would start a new assignment."""
    return " ".join(text.splitlines())


def _parse_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as a `sendto` address, or None for a value we cannot use.

    Absolute paths and "@abstract" names are what systemd 252 hands out; newer systemd
    may also pass `vsock:` addresses, which this client does not speak (logged).
    """
    if value.startswith("/"):
        return value
    if value.startswith(ABSTRACT_PREFIX) and len(value) > len(ABSTRACT_PREFIX):
        return b"\0" + value[len(ABSTRACT_PREFIX):].encode()
    return None


def _parse_watchdog_usec(
    environ: Mapping[str, str], pid: int
) -> int | None:
    """WATCHDOG_USEC when it is meant for process `pid`, else None."""
    raw_usec = environ.get(WATCHDOG_USEC_ENV)
    if not raw_usec:
        return None
    raw_pid = environ.get(WATCHDOG_PID_ENV)
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                # A watchdog for another process (e.g. our parent): not ours to feed.
                return None
        except ValueError:
            log.warning("ignoring %s=%r: not a pid", WATCHDOG_PID_ENV, raw_pid)
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", WATCHDOG_USEC_ENV, raw_usec)
        return None
    return usec if usec > 0 else None


class SystemdNotifier:
    """One sd_notify channel to the service manager; a no-op when there is none.

    Every method returns True when the datagram left, False when there is no socket or
    the send failed. None raises.
    """

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        """`address`: a socket path, or bytes starting with NUL for an abstract name;
        None disables notifications. `watchdog_usec`: the watchdog period systemd set."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdNotifier:
        """Build from NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID (os.environ by default).

        Only reads the mapping; never changes it.
        """
        env = os.environ if environ is None else environ
        own_pid = os.getpid() if pid is None else pid
        raw = env.get(NOTIFY_SOCKET_ENV, "")
        address = _parse_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring %s=%r: unsupported address", NOTIFY_SOCKET_ENV, raw)
        return cls(address, _parse_watchdog_usec(env, own_pid))

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None: no watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / USEC_PER_SECOND / WATCHDOG_SAFETY_FACTOR

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload announced by `reloading`) has finished."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.send("\n".join(fields))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC; send `ready()` when the reload is done.

        systemd ≥ 253 uses MONOTONIC_USEC to tell this reload apart from an older one;
        252 ignores it, so it is always sent.
        """
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self) -> bool:
        """STOPPING=1: the agent has begun its shutdown."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=<text>: the one-line status `systemctl status` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the agent is alive. Sent even when no watchdog is configured
        (systemd ignores it then), so callers need not check."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more before the start/stop times out."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * USEC_PER_SECOND)}")

    def send(self, message: str) -> bool:
        """Send one raw notification (newline-separated assignments)."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:  # includes BlockingIOError: a full queue drops the message
            self._warn_once(exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run_watchdog(
        self, is_healthy: Callable[[], bool], interval: float | None = None
    ) -> None:
        """Send WATCHDOG=1 every `interval` seconds (default `watchdog_interval`) while
        `is_healthy()` is true; skip the ping while it is false, so systemd restarts an
        agent whose loop is stuck or lagging.

        Returns at once when there is no watchdog. Otherwise runs until cancelled
        (cancellation is the only way out, and simply propagates). `is_healthy` raising
        counts as unhealthy. Never raises anything else.
        """
        period = self.watchdog_interval if interval is None else interval
        if period is None or period <= 0:
            return
        unhealthy_logged = False
        next_tick = time.monotonic()
        while True:
            try:
                healthy = bool(is_healthy())
            except Exception:
                if not unhealthy_logged:
                    log.exception("watchdog health callback failed; treating as unhealthy")
                    unhealthy_logged = True
                healthy = False
            if healthy:
                if unhealthy_logged:
                    log.info("agent healthy again: watchdog pings resumed")
                    unhealthy_logged = False
                self.watchdog()
            elif not unhealthy_logged:
                log.warning("agent unhealthy: withholding watchdog pings from systemd")
                unhealthy_logged = True
            # Schedule on a fixed grid so a slow callback does not stretch the period;
            # after a long stall, restart the grid instead of firing a burst.
            next_tick += period
            now = time.monotonic()
            if next_tick < now:
                next_tick = now + period
            await asyncio.sleep(next_tick - now)

    def _warn_once(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "cannot notify the service manager at %r: %s (further failures not logged)",
                self._address,
                exc,
            )
