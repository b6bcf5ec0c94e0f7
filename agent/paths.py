"""Default locations of the agent's control socket, state and logs.

Imported by `svctl` on its hot path, so it stays stdlib-only and does no I/O beyond
reading the environment: it never creates a directory or touches the file system.
The agent and svctl compute the same defaults from the same environment, so an
unconfigured svctl finds an unconfigured agent.
"""

from __future__ import annotations

import os

SOCKET_ENV = "SVCD_SOCKET"
SOCKET_NAME = "svcd.sock"
APP_DIR = "svcd"

ROOT_SOCKET_DIR = "/run/svcd"
ROOT_STATE_DIR = "/var/lib/svcd"
ROOT_LOG_DIR = "/var/log/svcd"


def _is_root() -> bool:
    return os.geteuid() == 0


def default_control_socket() -> str:
    """`$SVCD_SOCKET`, else /run/svcd/svcd.sock for root, else
    `$XDG_RUNTIME_DIR/svcd/svcd.sock`, else `/tmp/svcd-$UID/svcd.sock`."""
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    if _is_root():
        return os.path.join(ROOT_SOCKET_DIR, SOCKET_NAME)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, APP_DIR, SOCKET_NAME)
    # a per-uid directory: /tmp is shared, and the agent makes this one 0700
    return os.path.join("/tmp", f"{APP_DIR}-{os.getuid()}", SOCKET_NAME)


def default_state_dir() -> str:
    """/var/lib/svcd for root, else `$XDG_STATE_HOME/svcd`, else ~/.local/state/svcd."""
    if _is_root():
        return ROOT_STATE_DIR
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home:
        return os.path.join(state_home, APP_DIR)
    return os.path.join(os.path.expanduser("~"), ".local", "state", APP_DIR)


def default_log_dir() -> str:
    """/var/log/svcd for root, else the `logs` folder of the state dir."""
    if _is_root():
        return ROOT_LOG_DIR
    return os.path.join(default_state_dir(), "logs")
