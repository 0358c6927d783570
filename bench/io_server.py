"""The downstream of ``python -m bench io``: an HTTP/1.1 server (keep-alive) that
answers every request after ``--delay-ms``, on one asyncio loop, so thousands of
waiting requests cost it nothing but memory.

    python -m bench.io_server --port 8123 [--delay-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
LISTEN_BACKLOG = 4096  # pending connections: every worker thread may connect at once


async def serve(port: int, delay_s: float) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # one request after the other on a kept-alive connection
                await reader.readuntil(b"\r\n\r\n")  # GET: headers only, no body
                await asyncio.sleep(delay_s)
                writer.write(RESPONSE)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=LISTEN_BACKLOG)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.io_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
