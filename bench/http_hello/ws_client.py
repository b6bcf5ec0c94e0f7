"""A lean WebSocket echo load generator: `python ws_client.py PORT SECONDS` prints msgs/s.

Pre-masked 16-byte text frames go out in windows of WINDOW per connection over
CONNECTIONS connections; echoes are counted by bytes (every echo frame has the same
size), so the client spends little CPU per message and the server is what saturates.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time

import uvloop

CONNECTIONS = 32
WINDOW = 16
PAYLOAD = b"hello websocket!"
MASK = b"\x01\x02\x03\x04"
FRAME = bytes([0x81, 0x80 | len(PAYLOAD)]) + MASK + bytes(
    b ^ MASK[i % 4] for i, b in enumerate(PAYLOAD)
)
ECHO_SIZE = 2 + len(PAYLOAD)  # server frames are not masked


class Client(asyncio.Protocol):
    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.ready = ready
        self.handshaken = False
        self.buffer = b""
        self.received = 0
        self.pending = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            f"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.handshaken:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.handshaken = True
            data = self.buffer[end + 4 :]
            self.buffer = b""
            self.ready.set_result(None)
        self.pending += len(data)
        done = self.pending // ECHO_SIZE
        if done:
            self.pending -= done * ECHO_SIZE
            self.received += done
            assert self.transport is not None
            self.transport.write(FRAME * done)

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(FRAME * WINDOW)


async def main(port: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for _ in range(CONNECTIONS):
        ready: asyncio.Future[None] = loop.create_future()
        client = Client(ready)
        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
        await asyncio.wait_for(ready, 10)
        clients.append(client)
    for client in clients:
        client.start()
    await asyncio.sleep(1)  # warm-up
    start_count, start = sum(c.received for c in clients), time.monotonic()
    await asyncio.sleep(seconds)
    count = sum(c.received for c in clients) - start_count
    print(f"{count / (time.monotonic() - start):.0f}")


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
