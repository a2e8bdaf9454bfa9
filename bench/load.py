"""
A small HTTP/1.1 load generator: C{connections} keep-alive connections post
messages as fast as the server answers.  Shared by the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time


async def _connection(host: str, port: int, requests: list[bytes], codes: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            writer.write(request)
            status = await reader.readline()
            codes.append(int(status.split()[1]))
            length = 0
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readline()).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
    finally:
        writer.close()


def postRequest(session: str, content: str, key: str) -> bytes:
    body = json.dumps({"session": session, "content": content}).encode()
    return (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )


def run(port: int, total: int, connections: int, sessions: int, key: str = "bench") -> tuple[float, list[int]]:
    """
    Post C{total} messages over C{connections} connections to C{sessions}
    sessions; return the seconds taken and the status codes.
    """
    perConnection = total // connections
    plans = [
        [postRequest(f"s{(c + n) % sessions}", f"c{c}-{n}", key) for n in range(perConnection)]
        for c in range(connections)
    ]
    codes: list[int] = []

    async def main() -> None:
        await asyncio.gather(*(_connection("127.0.0.1", port, plan, codes) for plan in plans))

    started = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - started, codes
