"""Fake workers for the benchmarks: one asyncio process answering health checks on many ports.

    python bench/fake_workers.py FIRST_PORT COUNT [--silent N]

Ports FIRST_PORT .. FIRST_PORT+COUNT-1 answer ``200`` at once; the last N of them
(``--silent``) accept connections and never answer. Port FIRST_PORT-1 answers any
connection with the number of checks answered so far (for an outside count of the
checks a supervisor completes). Prints "ready" when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


ANSWERED = [0]


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            ANSWERED[0] += 1
            self.transport.write(ANSWER)  # type: ignore[attr-defined]
            self.transport.close()


class Count(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(str(ANSWERED[0]).encode())  # type: ignore[attr-defined]
        transport.close()


class Silent(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(first: int, count: int, silent: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Count, "127.0.0.1", first - 1, reuse_address=True)
    for port in range(first, first + count):
        protocol = Silent if port >= first + count - silent else Answer
        await loop.create_server(protocol, "127.0.0.1", port, backlog=1024, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--silent", type=int, default=0)
    args = parser.parse_args()
    raise_nofile()
    try:
        asyncio.run(serve(args.first, args.count, args.silent))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
