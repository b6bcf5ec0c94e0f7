"""sd_notify endpoints: one private unix datagram socket per worker.

A worker learns its socket from NOTIFY_SOCKET and sends newline-separated KEY=VALUE
datagrams (READY=1, STOPPING=1, RELOADING=1, STATUS=..., WATCHDOG=1, MAINPID=...,
X_SVCD_STATS=<json object>). Because every worker has its own socket, whatever arrives
on it is about that worker: a worker cannot speak for another one, whatever it writes.

Invariants:
- The socket file is mode 0600, owned by the worker's uid when one is given, so only the
  agent (root) and that user can send to it; it is created with that mode (no window).
- The reader never raises and never holds the loop: at most `MAX_DATAGRAMS_PER_TICK`
  datagrams per wakeup; datagrams over `MAX_DATAGRAM` bytes, undecodable ones and
  malformed lines are counted in `rejected` and ignored; fds passed with SCM_RIGHTS are
  closed at once.
- A token bucket (`rate` per second, `burst`) bounds how often `on_message` runs. Over
  the limit, datagrams are merged (last value per key wins, flags stay set) and handed
  over as one message when tokens return, so a stats flood never loses a READY=1,
  STOPPING=1 or WATCHDOG=1.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Largest datagram accepted (systemd accepts up to 128 KiB; stats objects are small).
MAX_DATAGRAM = 64 * 1024
#: Datagrams read per loop wakeup before yielding to other callbacks.
MAX_DATAGRAMS_PER_TICK = 64
#: Default rate limit: messages per second handed to `on_message`, and the burst.
DEFAULT_RATE = 200.0
DEFAULT_BURST = 200
#: Socket file mode: only the owner (the worker's user, or the agent's) may send.
SOCKET_MODE = 0o600
#: Mode of a directory this module creates: others may traverse to their socket only.
DIRECTORY_MODE = 0o711
#: Longest unix socket path (sun_path is 108 bytes with the NUL).
UNIX_PATH_MAX = 107
#: Receive buffer: a burst of stats datagrams should queue, not bounce.
RCVBUF = 1024 * 1024

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(_CRED.size) + socket.CMSG_SPACE(16 * 4)
_FLAG_KEYS = ("READY", "STOPPING", "RELOADING", "WATCHDOG")


@dataclass
class NotifyMessage:
    """One (possibly merged) sd_notify message from a worker."""

    ready: bool = False
    stopping: bool = False
    watchdog: bool = False
    status: str | None = None
    stats: dict[str, Any] | None = None
    raw: dict[str, str] = field(default_factory=dict)
    reloading: bool = False
    mainpid: int | None = None
    sender_pid: int | None = None  # from SCM_CREDENTIALS: the process that sent it
    merged: int = 1  # how many datagrams this message stands for


def parse_datagram(data: bytes) -> tuple[dict[str, str], bool]:
    """KEY=VALUE lines -> dict, and whether anything in it was malformed.

    Malformed lines (no `=`, empty or non-identifier key) are skipped; an undecodable
    datagram yields ({}, True).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {}, True
    raw: dict[str, str] = {}
    bad = False
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "A").isalnum() or not key.isascii():
            bad = True
            continue
        raw[key] = value
    return raw, bad


def build_message(raw: dict[str, str], sender_pid: int | None = None) -> tuple[NotifyMessage, bool]:
    """Interpret parsed fields; also returns whether a field had a bad value."""
    bad = False
    stats: dict[str, Any] | None = None
    if "X_SVCD_STATS" in raw:
        try:
            value = json.loads(raw["X_SVCD_STATS"])
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            stats = value
        else:
            bad = True
    mainpid: int | None = None
    if "MAINPID" in raw:
        try:
            mainpid = int(raw["MAINPID"])
        except ValueError:
            bad = True
    msg = NotifyMessage(
        ready=raw.get("READY") == "1",
        stopping=raw.get("STOPPING") == "1",
        watchdog=raw.get("WATCHDOG") == "1",
        reloading=raw.get("RELOADING") == "1",
        status=raw.get("STATUS"),
        stats=stats,
        raw=raw,
        mainpid=mainpid,
        sender_pid=sender_pid,
    )
    return msg, bad


class NotifyEndpoint:
    """The NOTIFY_SOCKET of one worker. Create it in the loop thread, before the spawn.

    `on_message` runs on the loop for each (rate-limited, possibly merged) message; an
    exception it raises is logged, never propagated. `path` is the value for the
    worker's NOTIFY_SOCKET. Counters: `received`, `delivered`, `rejected`, `merged`.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        on_message: Callable[[NotifyMessage], None],
        uid: int | None = None,
        *,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._pending: dict[str, str] | None = None
        self._pending_count = 0
        self._pending_sender: int | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.received = 0
        self.delivered = 0
        self.rejected = 0
        self.merged = 0
        self.closed = False

        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad notify socket name {name!r}")
        directory = Path(directory)
        if not directory.exists():
            directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        self.path = str(directory / f"{name}.notify")
        if len(os.fsencode(self.path)) > UNIX_PATH_MAX:
            raise ValueError(f"notify socket path longer than {UNIX_PATH_MAX} bytes: {self.path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a leftover of an earlier agent: this name is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Linux creates a unix socket file with the socket inode's mode minus the
            # umask: no window during which anybody else could send. chmod then sets
            # the exact mode whatever the umask took away.
            os.fchmod(sock.fileno(), SOCKET_MODE)
            sock.bind(self.path)
            os.chmod(self.path, SOCKET_MODE)
            if uid is not None and uid != os.geteuid():
                os.chown(self.path, uid, -1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # -- reading -------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(MAX_DATAGRAMS_PER_TICK):
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(MAX_DATAGRAM + 1, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # never raise out of a reader
                log.warning("notify socket %s: %s", self.path, exc)
                return
            try:
                self._handle(data, ancdata, flags)
            except Exception:  # a bug must not kill the reader
                log.exception("notify socket %s: cannot handle a datagram", self.path)

    def _handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        sender = None
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _CRED.size:
                sender = _CRED.unpack_from(payload)[0]
            elif kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.received += 1
        if len(data) > MAX_DATAGRAM or flags & socket.MSG_TRUNC:
            self.rejected += 1
            return
        raw, bad = parse_datagram(data)
        if bad:
            self.rejected += 1
        if not raw:
            return
        if self._take_token():
            self._deliver(raw, sender, 1)
            return
        # over the rate: merge into one pending message, delivered when a token returns
        if self._pending is None:
            self._pending = {}
            self._pending_count = 0
            wait = (1.0 - self._tokens) / self._rate if self._rate > 0 else 1.0
            self._flush_handle = self._loop.call_later(max(wait, 0.0), self._flush)
        for key, value in raw.items():
            if key in _FLAG_KEYS and self._pending.get(key) == "1":
                continue  # a flag, once set in the batch, stays set
            self._pending[key] = value
        self._pending_count += 1
        self._pending_sender = sender
        self.merged += 1

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now

    def _take_token(self) -> bool:
        """Spend a token if one is there and nothing is waiting (keeps the order)."""
        self._refill()
        if self._tokens >= 1.0 and self._pending is None:
            self._tokens -= 1.0
            return True
        return False

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, None
        if pending is None or self.closed:
            return
        self._refill()
        self._tokens = max(self._tokens - 1.0, 0.0)  # spent even if timers ran early
        self._deliver(pending, self._pending_sender, self._pending_count)

    def _deliver(self, raw: dict[str, str], sender: int | None, count: int) -> None:
        msg, bad = build_message(raw, sender)
        msg.merged = count
        if bad:
            self.rejected += 1
        self.delivered += 1
        try:
            self._on_message(msg)
        except Exception:
            log.exception("notify socket %s: on_message failed", self.path)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, close the socket and remove its file. Idempotent.

        A merged message still pending is dropped: the worker is gone.
        """
        if self.closed:
            return
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending = None
        if not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
