"""svctl: the command-line client of the svcd control API.

Speaks only gRPC (svcd.v1.Agent on the agent's control socket, or on a TCP address
with mTLS); never imports supervisor/. `discover` reads etcd directly (agent.discovery),
asking the agent only for the etcd endpoints when none are given.

Exit codes (SPEC.md): 0 done; 1 the action failed (rolled back where that applies; a
reload of a broken config file changes nothing and is 1 too); 2 usage error or unknown
service; 3 agent unreachable; 4 permission denied.

Hot path: `svctl status` is timed against `supervisorctl status` (issue 2, bench/
supervisor/bench_status.py), and a short-lived process pays for every import. It loads
argparse, grpc and the generated messages; the table adds agent.cli_render and
agent.cli_table (stdlib only, no rich), `--json` adds json; etcd only for discover.
tests/test_cli.py checks it.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from agent import __version__

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4

#: Deadline of queries (status, probe, registry info): an agent that does not answer
#: in this time counts as unreachable (exit 3). Actions wait as long as they take.
QUERY_TIMEOUT = 10.0
#: Default refresh of `status --watch` and `discover --watch` (seconds).
WATCH_INTERVAL = 1.0
#: Default number of log lines / events shown before following.
DEFAULT_LOG_LINES = 100
ETCD_ENV = "SVCD_ETCD"
DEFAULT_PREFIX = "/svcd"
METHOD_PREFIX = "/svcd.v1.Agent/"

M = TypeVar("M", bound="Message")


class CliError(Exception):
    """Print `svctl: <message>` and exit with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- the connection


class Client:
    """A channel to one agent and typed calls of svcd.v1.Agent over it."""

    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        self._grpc = grpc
        if args.address:
            missing = [f for f in ("tls_cert", "tls_key", "tls_ca") if not getattr(args, f)]
            if missing:
                flags = ", ".join("--" + f.replace("_", "-") for f in missing)
                raise CliError(EXIT_USAGE, f"--address needs mTLS: missing {flags}")
            self.target = args.address
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(args.tls_ca),
                private_key=_read(args.tls_key),
                certificate_chain=_read(args.tls_cert),
            )
            self.channel = grpc.secure_channel(self.target, credentials)
        else:
            path = args.socket or _default_socket()
            check_socket(path)
            self.target = f"unix:{os.path.abspath(path)}"
            self.channel = grpc.insecure_channel(self.target)
        self.timeout: float | None = args.timeout

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Message, response: type[M], *, query: bool = False) -> M:
        """Unary call; queries get a deadline (QUERY_TIMEOUT unless --timeout)."""
        stub = self.channel.unary_unary(
            METHOD_PREFIX + method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        timeout = self.timeout if self.timeout is not None else (QUERY_TIMEOUT if query else None)
        result: M = stub(request, timeout=timeout)
        return result

    def stream(self, method: str, request: Message, response: type[M]) -> Iterator[M]:
        stub = self.channel.unary_stream(
            METHOD_PREFIX + method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        yield from stub(request, timeout=self.timeout)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from None


def _default_socket() -> str:
    from agent.paths import default_control_socket

    return default_control_socket()


def check_socket(path: str) -> None:
    """Fail early and clearly when the socket is missing (3) or not ours to use (4)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CliError(
            EXIT_UNREACHABLE,
            f"no svcd control socket at {path} (is svcd running? see --socket, $SVCD_SOCKET)",
        ) from None
    except PermissionError:
        raise CliError(EXIT_DENIED, f"permission denied: cannot reach {path}") from None
    except OSError as exc:
        raise CliError(EXIT_UNREACHABLE, f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CliError(EXIT_UNREACHABLE, f"{path} is not a socket")
    if not os.access(path, os.R_OK | os.W_OK):
        raise CliError(EXIT_DENIED, f"permission denied: cannot use {path}")


def rpc_error(exc: grpc.RpcError, target: str) -> CliError:
    """The exit code and one-line message for a failed call."""
    import grpc

    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    denied_text = "Permission denied" in details or "EACCES" in details
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return CliError(EXIT_DENIED, details or "permission denied")
    if code == grpc.StatusCode.UNAVAILABLE:
        if denied_text:
            return CliError(EXIT_DENIED, f"permission denied: cannot reach {target}")
        return CliError(EXIT_UNREACHABLE, f"cannot reach svcd at {target}: {_first_line(details)}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(EXIT_UNREACHABLE, f"svcd at {target} did not answer in time")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return CliError(EXIT_USAGE, details or code.name.lower())
    return CliError(EXIT_FAILED, details or code.name.lower())


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no answer"


# ---------------------------------------------------------------- messages -> JSON


def to_dict(message: Message) -> dict[str, Any]:
    """A message as plain JSON types, every field present (defaults included), with
    numbers as numbers (json_format would quote 64-bit integers)."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Struct":
        return {k: _value(v) for k, v in message.fields.items()}  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            value_field = kind.fields_by_name["value"]
            if value_field.message_type is not None:
                out[field.name] = {k: to_dict(v) for k, v in value.items()}
            else:
                out[field.name] = dict(value)
        elif kind is not None and field.is_repeated:
            out[field.name] = [to_dict(item) for item in value]
        elif kind is not None:
            out[field.name] = to_dict(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _value(value: Any) -> Any:
    """google.protobuf.Value -> JSON; Struct numbers are doubles, integral ones print as ints."""
    which = value.WhichOneof("kind")
    if which == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "struct_value":
        return to_dict(value.struct_value)
    if which == "list_value":
        return [_value(v) for v in value.list_value.values]
    return None


def _print_json(obj: Any) -> None:
    sys.stdout.write(_json_line(obj))


def _json_line(obj: Any) -> str:
    import json  # not on the table's path

    return json.dumps(obj) + "\n"


# ---------------------------------------------------------------- commands


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    def fetch() -> dict[str, Any]:
        response = client.call("Status", pb.StatusRequest(service=args.service or ""),
                               pb.StatusResponse, query=True)
        return to_dict(response)

    if args.json and not args.watch:
        _print_json(fetch())
        return EXIT_OK
    if args.json:  # --watch --json: one object per line, every interval
        for _ in _ticks(args.interval, args.count):
            _print_json(fetch())
            sys.stdout.flush()
        return EXIT_OK
    from agent import cli_render

    if not args.watch:
        cli_render.print_status(fetch())
        return EXIT_OK
    cli_render.watch_status(fetch, args.interval, args.count)
    return EXIT_OK


def _ticks(interval: float, count: int) -> Iterator[int]:
    """0, 1, 2, ... every `interval` seconds; `count` of them (0: until interrupted)."""
    n = 0
    while count == 0 or n < count:
        started = time.monotonic()
        yield n
        n += 1
        if count and n >= count:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _action(method: str) -> Callable[[Client, argparse.Namespace], int]:
    def run(client: Client, args: argparse.Namespace) -> int:
        from agent._pb import agent_pb2 as pb

        request = pb.ServiceRequest(service=args.service, no_wait=getattr(args, "no_wait", False))
        response = client.call(method, request, pb.ActionResponse)
        _say(args, {"ok": True, "message": response.message}, response.message)
        return EXIT_OK

    return run


def cmd_scale(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    request = pb.ScaleRequest(service=args.service, count=args.count)
    response = client.call("Scale", request, pb.ActionResponse)
    _say(args, {"ok": True, "message": response.message}, response.message)
    return EXIT_OK


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    if args.previous and args.service:
        raise CliError(EXIT_USAGE, "--previous re-applies a whole config: give no SERVICE")

    request = pb.ReloadRequest(
        service=args.service or "",
        dry_run=args.dry_run,
        previous=args.previous,
        no_wait=args.no_wait,
    )
    progress: list[str] = []
    result = None
    for update in client.stream("Reload", request, pb.ReloadUpdate):
        if update.WhichOneof("update") == "progress":
            progress.append(update.progress)
            if not args.json:
                print(update.progress, flush=True)
        elif update.WhichOneof("update") == "result":
            result = update.result
    if result is None:
        raise CliError(EXIT_FAILED, "the agent ended the reload without a result")
    if args.json:
        _print_json(
            {"ok": result.ok, "message": result.message, "plan": list(result.plan),
             "progress": progress}
        )
    else:
        if args.dry_run and not result.plan:
            print("nothing to change")
        for line in result.plan:
            print(line)
        print(result.message)
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    request = pb.LogsRequest(service=args.service, n=args.lines, follow=args.follow)
    if args.worker is not None:
        request.worker = args.worker
    out = sys.stdout
    for line in client.stream("Logs", request, pb.LogLine):
        # worker -1: a line of svcd itself about the stream (e.g. lines dropped)
        who = line.service if line.worker < 0 else f"{line.service}:{line.worker}"
        if args.json:
            # `worker` named as in events and status ("api:0"), the number in `index`
            out.write(_json_line({**to_dict(line), "worker": who, "index": line.worker}))
        else:
            out.write(f"{who} | {line.line}\n")
        if args.follow:
            out.flush()
    return EXIT_OK


def format_event(event: dict[str, Any]) -> str:
    """One line: `2026-11-27 10:00:00.123 exited api:0 pid=1234 gen=3: code 1`."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    stamp += f".{int(event['time'] * 1000) % 1000:03d}"
    who = event["worker"] or event["service"] or "agent"
    text = f"{stamp} {event['type']:<16} {who}"
    if event["pid"]:
        text += f" pid={event['pid']}"
    if event["generation"]:
        text += f" gen={event['generation']}"
    if event["message"]:
        text += f": {event['message']}"
    return text


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    request = pb.EventsRequest(follow=args.follow, n=args.lines)
    out = sys.stdout
    for message in client.stream("Events", request, pb.Event):
        event = to_dict(message)
        fields = event.pop("fields")
        if args.json:
            # like supervisor.events.Event.as_dict: type-specific fields at the top level
            out.write(_json_line({**fields, **event}))
        else:
            out.write(format_event(event) + "\n")
        if args.follow:
            out.flush()
    return EXIT_OK


def cmd_probe(client: Client, args: argparse.Namespace) -> int:
    from agent._pb import agent_pb2 as pb

    request = pb.ProbeRequest(kind=args.kind, service=args.service or "")
    response = client.call("Probe", request, pb.ProbeResponse, query=True)
    what = args.kind + (f" {args.service}" if args.service else "")
    state = "ok" if response.ok else "not ok"
    _say(args, {"ok": response.ok, "message": response.message},
         f"{what}: {state} ({response.message})")
    return EXIT_OK if response.ok else EXIT_FAILED


def cmd_discover(connect: Callable[[], Client], args: argparse.Namespace) -> int:
    """Endpoints from etcd: --etcd, else $SVCD_ETCD, else the agent's registry settings."""
    import asyncio

    from agent._pb import agent_pb2 as pb

    urls = args.etcd or os.environ.get(ETCD_ENV, "")
    settings: dict[str, Any] = {}
    prefix = args.prefix
    if urls:
        endpoints = tuple(u.strip() for u in urls.split(",") if u.strip())
    else:
        info = connect().call("RegistryInfo", pb.RegistryInfoRequest(), pb.RegistryInfoResponse,
                              query=True)
        if not info.enabled:
            raise CliError(
                EXIT_USAGE,
                f"the agent has no registry: pass --etcd URL[,URL...] or set ${ETCD_ENV}",
            )
        endpoints = tuple(info.endpoints)
        prefix = prefix or info.prefix
        settings = {
            name: getattr(info, name) or None
            for name in ("username", "password", "ca_cert", "cert", "key")
        }
    if not endpoints:
        raise CliError(EXIT_USAGE, "no etcd endpoints given")
    from agent.discovery import EtcdAccess, discover_main

    access = EtcdAccess(endpoints, prefix=prefix or DEFAULT_PREFIX, **settings)

    def write(text: str) -> None:
        print(text, flush=True)

    def error(text: str) -> None:
        print(text, file=sys.stderr)

    return asyncio.run(
        discover_main(access, args.service, watch=args.watch, as_json=args.json,
                      write=write, error=error)
    )


def _say(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        _print_json(obj)
    else:
        print(text)


# ---------------------------------------------------------------- arguments


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    """The connection flags and --json, on svctl itself and on every command."""
    where = parser.add_argument_group("connection")
    where.add_argument("--socket", metavar="PATH", default=default,
                       help="control socket (default: $SVCD_SOCKET, else the agent's default)")
    where.add_argument("--address", metavar="HOST:PORT", default=default,
                       help="TCP control address (mTLS only)")
    where.add_argument("--tls-cert", metavar="FILE", default=default,
                       help="client certificate (PEM)")
    where.add_argument("--tls-key", metavar="FILE", default=default, help="client key (PEM)")
    where.add_argument("--tls-ca", metavar="FILE", default=default,
                       help="CA of the agent's certificate (PEM)")
    where.add_argument("--timeout", type=_positive_float, metavar="SECONDS", default=default,
                       help=f"deadline of each call (default: {QUERY_TIMEOUT:g}s for "
                       "queries, none for actions)")
    parser.add_argument("--json", action="store_true",
                        default=False if default is None else default,
                        help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svctl",
        description="Control a running svcd agent.",
        epilog="exit codes: 0 done, 1 action failed, 2 usage or unknown service, "
        "3 agent unreachable, 4 permission denied",
    )
    parser.add_argument("--version", action="version", version=f"svctl {__version__}")
    _add_common(parser, default=None)
    # every command also takes them after its name (a value given there wins)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, parents=[common])

    p = command("status", "show the agent, its services and every worker")
    p.add_argument("service", nargs="?", help="only this service")
    p.add_argument("--watch", "-w", action="store_true", help="refresh live")
    p.add_argument("--interval", type=_positive_float, default=WATCH_INTERVAL,
                   help="seconds between refreshes with --watch")
    p.add_argument("--count", type=_non_negative_int, default=0,
                   help="with --watch: stop after N refreshes (0: until interrupted)")
    for name, helptext in (
        ("start", "start every worker of a service and wait until it is ready"),
        ("stop", "stop every worker of a service (graceful)"),
        ("restart", "stop every worker of a service, then start and wait until it is "
         "ready (a capacity gap)"),
    ):
        p = command(name, helptext)
        p.add_argument("service")
        if name != "stop":
            p.add_argument("--no-wait", action="store_true",
                           help="return once the workers are spawned, not once ready")
    p = command("reload", "rolling reload of a service, or (no service) apply the config file")
    p.add_argument("service", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--previous", action="store_true",
                   help="re-apply the config applied before the current one")
    p.add_argument("--no-wait", action="store_true", help="return once the reload has started")
    p = command("scale", "set the number of workers of a service")
    p.add_argument("service")
    p.add_argument("count", type=_non_negative_int)
    p = command("logs", "show (and follow) the output of a service's workers")
    p.add_argument("service")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what follows")
    p.add_argument("-n", "--lines", type=_non_negative_int, default=DEFAULT_LOG_LINES,
                   help=f"last N lines first (default {DEFAULT_LOG_LINES})")
    p.add_argument("--worker", type=_non_negative_int, help="only this worker index")
    p = command("events", "show (and follow) lifecycle events")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what follows")
    p.add_argument("-n", "--lines", type=_non_negative_int, default=0,
                   help="at most the last N events of the history (default: all kept)")
    p = command("probe", "exit 0 when the agent (or a service) is live/ready, else 1")
    p.add_argument("kind", choices=("live", "ready"))
    p.add_argument("service", nargs="?")
    p = command("discover", "usable endpoints of a service across all hosts (from etcd)")
    p.add_argument("service")
    p.add_argument("--watch", "-w", action="store_true", help="print again on every change")
    p.add_argument("--etcd", metavar="URL[,URL...]",
                   help=f"etcd endpoints (default: ${ETCD_ENV}, else the agent's registry)")
    p.add_argument("--prefix", help=f"key prefix (default: the agent's, else {DEFAULT_PREFIX})")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cmd_status,
    "start": _action("Start"),
    "stop": _action("Stop"),
    "restart": _action("Restart"),
    "reload": cmd_reload,
    "scale": cmd_scale,
    "logs": cmd_logs,
    "events": cmd_events,
    "probe": cmd_probe,
}


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, return the exit code (argparse exits 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    clients: list[Client] = []
    target = "svcd"

    def connect() -> Client:
        nonlocal target
        client = Client(args)
        target = client.target
        clients.append(client)
        return client

    try:
        import grpc

        try:
            if args.command == "discover":
                return cmd_discover(connect, args)
            return COMMANDS[args.command](connect(), args)
        except grpc.RpcError as exc:
            raise rpc_error(exc, target) from None
    except CliError as exc:
        print(f"svctl: {exc.message}", file=sys.stderr)
        streaming = getattr(args, "follow", False) or getattr(args, "watch", False)
        if args.json and not streaming:  # the reader of stdout gets an object too; a
            # stream's reader expects only its own objects (events, lines) on stdout
            _print_json({"ok": False, "exit_code": exc.code, "error": exc.message})
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C ends -f / --watch: what the user asked for
    except BrokenPipeError:
        # `svctl logs api | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    finally:
        for client in clients:
            client.close()


def main() -> NoReturn:
    sys.exit(run())


if __name__ == "__main__":
    main()
