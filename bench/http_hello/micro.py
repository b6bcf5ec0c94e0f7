"""The Python cost of one keep-alive GET, without sockets: server_core vs the bare Protocol.

    .venv/bin/python bench/http_hello/micro.py [--requests N] [--repeat 5] [--profile]
                                               [--pipelined K] [--only NAME]

Feeds wrk's request (`GET / HTTP/1.1` + Host) to `data_received` of each protocol
object in a loop, with a transport whose `write` is a C method, and prints the best of
`--repeat` interleaved runs in nanoseconds per request. This isolates what the
benchmark's servers do in Python per request (the event loop and kernel cost the same
for all), so it shows the effect of a change on the hot path without sockets.
`server_core_unique` sends a different target each time (httptools parses every one:
the cost when the head cache never hits). `--profile` runs server_core under cProfile.

Wall-clock figures on a shared VM are noisy; for a deterministic count use valgrind:
`valgrind --tool=callgrind .venv/bin/python bench/http_hello/micro.py --only NAME
--requests N` for two values of N; the difference of the totals over the difference
of N is instructions per request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bare_protocol import Hello

from server_core import Worker
from server_core.protocols import connection_class
from server_core.server import Server

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends


class NullTransport(collections.deque):  # type: ignore[type-arg]
    """Enough of a transport for the hot path; keeps only the last payload written.

    `write` is a C method of the class, as uvloop's is (an instance attribute would
    make every `transport.write` a slow generic lookup that the real server never pays).
    """

    write = collections.deque.append

    def __init__(self) -> None:
        super().__init__(maxlen=1)

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


def server_core_protocol(loop: asyncio.AbstractEventLoop, sync: bool) -> Any:
    worker = Worker("http://127.0.0.1:0")
    if sync:

        @worker.on_message
        def hello_sync(conn: object, request: object) -> str:
            return "hello"

    else:

        @worker.on_message
        async def hello(conn: object, request: object) -> str:
            return "hello"

    server = Server(worker, loop)
    conn = connection_class("http")(server)
    transport = NullTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def bare() -> Any:
    transport = NullTransport()
    proto = Hello()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


def chunks(count: int, distinct: int, pipelined: int) -> list[bytes]:
    """`count` chunks as separate bytes objects (as reads are: their hash is not cached),
    cycling through `distinct` different request targets."""
    if distinct == 1:
        heads = [REQUEST]
    else:
        heads = [REQUEST.replace(b"GET / ", b"GET /%d " % i) for i in range(distinct)]
    return [bytes(bytearray(heads[i % distinct] * pipelined)) for i in range(count)]


def measure(proto: Any, data: list[bytes]) -> float:
    feed = proto.data_received
    start = time.perf_counter_ns()
    for chunk in data:
        feed(chunk)
    return (time.perf_counter_ns() - start) / len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--pipelined", type=int, default=1, help="requests per chunk")
    parser.add_argument(
        "--only", default="", help="run just this one once (for valgrind/perf)"
    )
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sc, sc_transport = server_core_protocol(loop, sync=False)
    sc_sync, _ = server_core_protocol(loop, sync=True)
    sc_unique, _ = server_core_protocol(loop, sync=False)
    proto, _ = bare()
    same = chunks(args.requests, 1, args.pipelined)
    # more targets than the head cache holds: every request is parsed by httptools
    unique = chunks(args.requests, 4096, args.pipelined)
    sc.data_received(same[0])
    assert sc_transport[0].endswith(b"hello"), sc_transport
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(measure, sc, same)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    targets = {
        "bare": (proto, same),
        "server_core": (sc, same),
        "server_core_sync": (sc_sync, same),
        "server_core_unique": (sc_unique, unique),
    }
    if args.only:  # "none": the set-up alone, to subtract
        if args.only != "none":
            measure(*targets[args.only])
        return 0
    results = dict.fromkeys(targets, float("inf"))
    for _ in range(args.repeat):  # interleaved, so that noise from elsewhere hits all
        for name, (target, data) in targets.items():
            results[name] = min(results[name], measure(target, data) / args.pipelined)
    for name, ns in results.items():
        print(f"{name:18s} {ns:7.0f} ns per request")
    print(f"server_core - bare: {results['server_core'] - results['bare']:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
