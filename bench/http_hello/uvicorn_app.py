"""uvicorn's side of the comparison: a raw ASGI app (no framework) answering `hello`.

Run: `uvicorn --loop uvloop --http httptools --no-access-log --port PORT uvicorn_app:app`.
"""

from __future__ import annotations

from typing import Any

HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"5")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"hello"})
