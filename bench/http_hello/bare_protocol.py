"""The Python ceiling: a bare asyncio Protocol on uvloop answering every request `hello`.

It does no HTTP parsing beyond finding the end of each request head (GET only, no
bodies), so it is an upper bound, not a usable server. `python bare_protocol.py PORT`.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)
END_OF_HEAD = b"\r\n\r\n"


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        count = buffer.count(END_OF_HEAD)
        if count:
            self.transport.write(RESPONSE * count)  # type: ignore[attr-defined]
            buffer = buffer[buffer.rfind(END_OF_HEAD) + len(END_OF_HEAD) :]
        self.buffer = buffer


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Hello, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
