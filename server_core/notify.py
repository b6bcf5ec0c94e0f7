"""The sd_notify client: datagrams to `$NOTIFY_SOCKET` (READY, STOPPING, WATCHDOG, stats).

One non-blocking unix datagram socket per process. Sending never blocks and never
raises: a full or missing receiver only costs that one message (the supervisor reads
the next stats a second later). A path starting with `@` is an abstract socket name.
Without NOTIFY_SOCKET every call is a no-op, so a worker runs the same code alone.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends sd_notify messages to one target address."""

    def __init__(self, target: str | None) -> None:
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if target:
            self._address = "\0" + target[1:] if target.startswith("@") else target
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, unset: bool = True) -> Notifier:
        """Read NOTIFY_SOCKET; unset it so that programs we spawn do not talk as us."""
        target = os.environ.pop(NOTIFY_SOCKET_ENV, None) if unset else os.environ.get(
            NOTIFY_SOCKET_ENV
        )
        return cls(target)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> bool:
        """Send one message; False when there is no target or the datagram was dropped."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
