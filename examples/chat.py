"""WebSocket chat, Workerman's classic: every message goes to every connected client.

`python examples/chat.py [--listen ws://0.0.0.0:8090] [--count N]`, then open
http://localhost:8090/ in two browser tabs (or `python -m websockets ws://localhost:8090/`).
Plain HTTP requests get the chat page, and `/healthz` answers `ok` for svcd's checks.
With --count above 1 each process has its own room: share state (redis, ...) for more.
"""

from __future__ import annotations

import argparse

from server_core import Request, Response, WebSocketConnection, Worker

PAGE = """<!doctype html><meta charset="utf-8"><title>chat</title>
<ul id="log"></ul><input id="msg" autofocus placeholder="say something, press enter">
<script>
const ws = new WebSocket(`ws://${location.host}/`);
ws.onmessage = (e) => { const li = document.createElement("li");
  li.textContent = e.data; document.getElementById("log").append(li); };
document.getElementById("msg").onkeydown = (e) => {
  if (e.key === "Enter" && e.target.value) { ws.send(e.target.value); e.target.value = ""; } };
</script>
"""


def build(listen: str, count: int = 1) -> Worker:
    worker = Worker(listen, count=count)
    messages = worker.counter("chat_messages_total")
    online = worker.gauge("chat_online")

    def broadcast(text: str) -> None:
        for conn in worker.connections:
            conn.send(text)

    @worker.on_connect
    def joined(conn: WebSocketConnection) -> None:
        online.set(len(worker.connections))
        broadcast(f"#{conn.id} joined ({len(worker.connections)} online)")

    @worker.on_message
    def said(conn: WebSocketConnection, message: str | bytes) -> None:
        messages.inc()
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        broadcast(f"#{conn.id}: {text}")

    @worker.on_close
    def left(conn: WebSocketConnection) -> None:
        online.set(len(worker.connections))
        broadcast(f"#{conn.id} left")

    @worker.on_http
    def page(conn: object, request: Request) -> Response:
        if request.path == "/healthz":
            return Response("ok\n")
        return Response(PAGE, content_type="text/html; charset=utf-8")

    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="ws://0.0.0.0:8090")
    parser.add_argument("--count", type=int, default=1, help="processes when run alone")
    args = parser.parse_args()
    build(args.listen, args.count).run()


if __name__ == "__main__":
    main()
