"""The environment a worker (or a preload template) of a service starts with.

`service_env` is what every process of one service generation shares: the agent's
environment minus its own service-manager variables, env_file, spec.env, SVCD_SERVICE,
SVCD_GENERATION and SVCD_DRAIN_TIMEOUT. A worker adds its own slot, NOTIFY_SOCKET and
WATCHDOG_USEC (worker.py). env_file is read at every start, so an edited file applies
to the next process without a reload.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from supervisor.spawn import clean_environ
from supervisor.spec import ServiceSpec

#: SVCD_DRAIN_TIMEOUT: the worker's own drain bound ends this long before the SIGKILL...
DRAIN_MARGIN = 1.0
#: ...but never below this share of graceful_timeout (short timeouts).
DRAIN_SHARE = 0.8

#: Largest env_file read, the same bound as one config file (agent.config): the agent
#: reads it on its event loop, at every spawn.
MAX_ENV_FILE_BYTES = 1024 * 1024


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile style): `#` comments, optional `export`,
    optional matching quotes around the value. Raises OSError/ValueError naming the
    file (and the line), which fails the spawn.

    The file must be a regular file of at most MAX_ENV_FILE_BYTES (see
    `_read_env_bytes`). Symlinks are followed: a link to an env file is normal.
    """
    try:
        text = _read_env_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: env_file is not UTF-8 (byte {exc.start})") from None
    out: dict[str, str] = {}
    # universal newlines, as open() in text mode reads them
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum():
            raise ValueError(f"{path}:{number}: not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def _read_env_bytes(path: str) -> bytes:
    """The bytes of an env_file, which must be a regular file of bounded size.

    It is read on the agent's loop and may be owned by the application's user, who can
    swap it: it is opened non-blocking (a FIFO there cannot hang the open) and checked
    with fstat before a byte is read (a FIFO or a device such as /dev/zero is refused
    with ValueError, not read forever).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: env_file is not a regular file")
        too_big = f"{path}: env_file is larger than {MAX_ENV_FILE_BYTES} bytes"
        if info.st_size > MAX_ENV_FILE_BYTES:
            raise ValueError(too_big)
        chunks: list[bytes] = []
        size = 0
        # bounded: every pass reads at least one byte, MAX_ENV_FILE_BYTES + 1 in all
        # (the file may grow after fstat)
        while size <= MAX_ENV_FILE_BYTES:
            chunk = os.read(fd, MAX_ENV_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_ENV_FILE_BYTES:
            raise ValueError(too_big)
        return b"".join(chunks)
    finally:
        os.close(fd)


def service_env(spec: ServiceSpec, generation: int, base: Mapping[str, str]) -> dict[str, str]:
    """The shared environment of the service's processes (reads env_file: may raise
    OSError/ValueError naming the file, which fails the start)."""
    env = clean_environ(base)
    if spec.env_file:
        env.update(read_env_file(spec.env_file))
    env.update(spec.env)
    env["SVCD_SERVICE"] = spec.name
    env["SVCD_GENERATION"] = str(generation)
    env["SVCD_DRAIN_TIMEOUT"] = f"{drain_timeout(spec.graceful_timeout):g}"
    return env


def drain_timeout(graceful_timeout: float) -> float:
    """The drain bound a worker is told: a little under the SIGKILL deadline.

    A worker that gives up draining on its own can still close its connections
    cleanly and exit; one that is SIGKILLed mid-drain resets them.
    """
    return max(graceful_timeout * DRAIN_SHARE, graceful_timeout - DRAIN_MARGIN)
