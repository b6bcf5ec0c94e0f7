"""A WSGI app for running gunicorn as a svcd worker (tests and bench/reload).

`GET /healthz` answers `ok`; anything else answers the pid of the gunicorn *arbiter*
(the parent of the sync worker that runs this code), because the arbiter is the process
svcd supervises: a load client can then tell which svcd worker served it.

    gunicorn --workers 1 --graceful-timeout 5 --chdir tests/programs wsgi_app:app
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    body = b"ok\n" if environ.get("PATH_INFO") == "/healthz" else f"{os.getppid()}\n".encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
