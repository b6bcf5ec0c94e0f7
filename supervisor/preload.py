"""A service generation's preload template: the program imported once, forking workers.

With `preload = true`, the first worker of a generation to start spawns the service's
command once more as a *template* (through `spawn`, so user, group, cwd, umask and
rlimits apply as usual) whose only inherited fd is a SOCK_SEQPACKET channel named
`svcd-forkserver`. A program that speaks the protocol (server_core does, see
`server_core/forkserver.py` for the wire format) imports its code, says hello and then
forks one worker per request: fork + exec + imports (~100-300 ms of a fresh Python)
become one fork (a few ms), for restarts after a crash as for the slots of a reload.

Each request carries the worker's environment and its fds (listeners, the private
`svcd-health` listener, stdout, stderr); the answer is the worker's pid. The worker is
re-parented to the agent (a child subreaper), so the Reaper, process-group signals, the
notify sender check, stats and logs treat it exactly like a spawned worker.

Invariants:
- One request at a time per template (a lock): answers cannot be mixed up.
- A template that died is started again at the next request; one that cannot start
  (exits, or no hello within `ready_timeout`) raises PreloadFailed, which the worker
  treats like a process that failed at start (backoff, start limit, reload rollback).
- `close()` ends the template (channel closed -> it exits; SIGKILL after a bound) and
  always reaps it; workers it forked are not its children and live on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import Any

import psutil

from supervisor.environment import service_env
from supervisor.logs import LogStore
from supervisor.reaper import ExitStatus, Reaper, signal_group, signal_process
from supervisor.spawn import SpawnError, SpawnRequest, passed_env, spawn
from supervisor.spec import ServiceSpec
from supervisor.status import TemplateStatus

log = logging.getLogger(__name__)

CHANNEL_NAME = "svcd-forkserver"
#: The log slot of template output (shown as the service's own lines).
PRELOAD_LOG_SLOT = -1
#: How long one fork may take to be answered before the template counts as hung.
FORK_REPLY_TIMEOUT = 10.0
#: After the channel closes, how long the template gets to exit before SIGKILL.
EXIT_TIMEOUT = 5.0
MAX_REPLY = 64 * 1024


class PreloadFailed(SpawnError):
    """The template could not be started, died, or did not answer a fork request."""


class Preloader:
    """The template of one service generation; `spawn` forks a worker from it."""

    def __init__(
        self,
        spec: ServiceSpec,
        generation: int,
        *,
        reaper: Reaper,
        logs: LogStore,
        base_env: Mapping[str, str],
    ) -> None:
        self.spec = spec
        self.generation = generation
        self._reaper = reaper
        self._logs = logs
        self._base_env = base_env
        self._lock = asyncio.Lock()
        self._channel: socket.socket | None = None
        self._exited: asyncio.Future[ExitStatus] | None = None
        self.pid = 0
        self.forks = 0
        self._closed = False
        self._started = 0.0  # monotonic time the current template was spawned
        self._process: psutil.Process | None = None  # for its memory, read on status

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    async def spawn(self, req: SpawnRequest) -> int:
        """Fork one worker as described by `req` (its env and fds; who it runs as and
        where were fixed when the template started); its pid. Raises PreloadFailed."""
        if req.stdout is None or req.stderr is None:
            raise SpawnError("a preloaded worker needs its own stdout and stderr")
        if not self._reaper.subreaper:
            raise SpawnError("preload needs the agent to be a child subreaper")
        async with self._lock:
            if self._closed:
                raise PreloadFailed(f"generation {self.generation} is retired")
            if not self.running:
                try:
                    await self._start()
                except BaseException:
                    self._abandon()  # half started (or cancelled): the next one starts fresh
                    raise
            # Once the request is sent a worker will exist: a caller cancelled meanwhile
            # must not leave it running unwatched, so the fork finishes regardless.
            fork = asyncio.ensure_future(self._fork(req))
            try:
                return await asyncio.shield(fork)
            except asyncio.CancelledError:
                fork.add_done_callback(_kill_orphan)
                raise

    def status(self) -> TemplateStatus | None:
        """The template while its process runs (still importing, or forking), else None."""
        if not self.running:
            return None
        rss = 0.0
        with contextlib.suppress(psutil.Error):
            if self._process is None or self._process.pid != self.pid:
                self._process = psutil.Process(self.pid)
            rss = float(self._process.memory_info().rss)
        return TemplateStatus(pid=self.pid, generation=self.generation, rss_bytes=rss,
                              uptime_s=time.monotonic() - self._started, forks=self.forks)

    async def close(self) -> None:
        """End the template and reap it (idempotent; the forked workers live on)."""
        self._closed = True
        async with self._lock:
            await self._end()

    # ----------------------------------------------------------------- internals

    async def _start(self) -> None:
        await self._end()  # the remains of a template that died
        spec = self.spec
        env = service_env(spec, self.generation, self._base_env)  # env_file: read now
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        before = time.monotonic()
        try:
            pid = spawn(SpawnRequest(
                argv=spec.command, env=env, cwd=spec.cwd,
                fds=[theirs.fileno()], fd_names=[CHANNEL_NAME],
                stdout=out_w, stderr=err_w,
                user=spec.user, group=spec.group, umask=spec.umask, rlimits=spec.rlimits,
            ))
        except BaseException:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        self._exited = self._reaper.watch(pid, since=before)
        self._channel, self.pid, self._started = ours, pid, before
        ours.setblocking(False)
        self._logs.attach(PRELOAD_LOG_SLOT, pid, "stdout", out_r, label="preload")
        self._logs.attach(PRELOAD_LOG_SLOT, pid, "stderr", err_r, label="preload")
        hello = await self._receive(spec.ready_timeout, "to load")
        if hello.get("forkserver") != 1:
            await self._end()
            raise PreloadFailed(f"unexpected hello from the preload process: {hello!r}")
        log.info("%s: generation %d preloaded (pid %d) in %.3fs", spec.name,
                 self.generation, pid, time.monotonic() - before)

    async def _fork(self, req: SpawnRequest) -> int:
        channel = self._channel
        assert channel is not None and req.stdout is not None and req.stderr is not None
        message = json.dumps(
            {"env": passed_env(req.env), "fd_names": list(req.fd_names), "agent_pid": os.getpid()}
        ).encode()
        fds = array.array("i", [*req.fds, req.stdout, req.stderr])
        try:
            channel.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            raise PreloadFailed(f"cannot reach the preload process: {exc.strerror}") from exc
        reply = await self._receive(FORK_REPLY_TIMEOUT, "to fork")
        pid = reply.get("pid")
        if not isinstance(pid, int) or pid <= 1:
            raise PreloadFailed(f"preload process: {reply.get('error') or reply!r}")
        self.forks += 1
        return pid

    async def _receive(self, timeout: float, doing: str) -> dict[str, Any]:  # noqa: ASYNC109
        """The next message from the template; PreloadFailed when it dies or is silent
        (then it is killed, so the next request starts a fresh one)."""
        channel, exited = self._channel, self._exited
        assert channel is not None and exited is not None
        loop = asyncio.get_running_loop()
        reading = loop.create_task(loop.sock_recv(channel, MAX_REPLY))
        try:
            waiting: list[asyncio.Future[Any]] = [reading, exited]
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        data = b""
        if reading.done() and not reading.cancelled() and reading.exception() is None:
            data = reading.result()
        if data:
            try:
                message = json.loads(data)
            except ValueError:
                message = None
            if isinstance(message, dict):
                return message
        why = f"preload process (pid {self.pid}) "
        if exited.done():
            why += f"{exited.result().describe()} before it was ready {doing}"
        elif data:
            why += f"sent {data[:80]!r} instead of the fork-server protocol"
        else:
            why += (f"did not answer within {timeout:g}s (does the program support "
                    "preload? server_core does)")
        await self._end()
        raise PreloadFailed(why)

    def _abandon(self) -> None:
        """Drop a template at once (no waiting): SIGKILL; the reaper collects it."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        exited, self._exited = self._exited, None
        if exited is not None and not exited.done():
            signal_group(self.pid, signal.SIGKILL)
        self._logs.detach(PRELOAD_LOG_SLOT, self.pid)

    async def _end(self) -> None:
        """Close the channel, wait (bounded) for the template to exit, reap it."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()  # the template's recvmsg returns EOF: it exits
        exited, self._exited = self._exited, None
        if exited is not None:
            if not exited.done():
                await asyncio.wait([exited], timeout=EXIT_TIMEOUT)
            if not exited.done():
                log.warning("%s: preload process (pid %d) still running %gs after its "
                            "channel closed: SIGKILL", self.spec.name, self.pid, EXIT_TIMEOUT)
                signal_group(self.pid, signal.SIGKILL)
                await asyncio.wait([exited], timeout=EXIT_TIMEOUT)
            await self._logs.wait_eof(PRELOAD_LOG_SLOT, self.pid, grace=0.5)
            self._logs.detach(PRELOAD_LOG_SLOT, self.pid)


def _kill_orphan(fork: asyncio.Future[int]) -> None:
    """A worker forked for a caller that was cancelled meanwhile: nobody supervises it."""
    if fork.cancelled() or fork.exception() is not None:
        return
    pid = fork.result()
    log.warning("killing worker pid %d: forked for a start that was cancelled", pid)
    signal_process(pid, signal.SIGKILL)  # it may not lead its own group yet
    signal_group(pid, signal.SIGKILL)
