"""Fake workers for the benchmarks: one asyncio process answering health checks on many ports.

    python bench/fake_workers.py FIRST_PORT COUNT [--silent N] [--control PORT] [--gc off]

Ports FIRST_PORT .. FIRST_PORT+COUNT-1 answer ``200`` at once, keeping the connection
open unless the request says ``Connection: close`` (as a uvicorn worker does); the last N
of them (``--silent``) accept connections and never answer. The answer is an empty body,
which is also a valid Prometheus scrape. Port ``--control`` (FIRST_PORT-1 by default)
answers any connection with the number of checks answered so far (for an outside count of
the checks a supervisor completes). The port below it takes one line: ``reset`` forgets the
arrival times recorded so far; ``spacing INTERVAL`` answers, as JSON, how far each port's
consecutive checks lay from INTERVAL (measured here, outside the checker). A listening
socket and a kept connection make 2 descriptors a port: bench/run.py runs one process per
5,000 ports. Prints "ready" when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 0\r\n\r\n"
CLOSING = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)

ANSWERED = [0]
ARRIVALS: dict[int, list[float]] = {}
#: This process's own garbage-collection pauses (ms) since the last reset: while one runs, no arrival is stamped.
GC_PAUSES: list[float] = []
_gc_started = [0.0]


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append((time.perf_counter() - _gc_started[0]) * 1000)


class Answer(asyncio.Protocol):
    def __init__(self, port: int) -> None:
        self.arrivals = ARRIVALS.setdefault(port, [])
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            request, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.arrivals.append(time.monotonic())
            ANSWERED[0] += 1
            closing = b"connection: close" in request.lower()
            self.transport.write(CLOSING if closing else ANSWER)  # type: ignore[attr-defined]
            if closing:
                self.transport.close()
                return


class Count(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(str(ANSWERED[0]).encode())  # type: ignore[attr-defined]
        transport.close()


class Control(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer:
            return
        command = self.buffer.split(b"\n", 1)[0].decode().split()
        if command[0] == "reset":
            for arrivals in ARRIVALS.values():
                arrivals.clear()
            GC_PAUSES.clear()
            answer = {"ok": True}
        else:
            answer = spacing(float(command[1]))
        self.transport.write(json.dumps(answer).encode())  # type: ignore[attr-defined]
        self.transport.close()


def spacing(interval: float) -> dict[str, object]:
    """Each port's gaps between consecutive checks against ``interval``: every deviation (ms) and missed checks."""
    deviations: list[float] = []
    missed = checks = 0
    for arrivals in ARRIVALS.values():
        checks += len(arrivals)
        for before, after in zip(arrivals, arrivals[1:]):
            gap = after - before
            deviations.append(abs(gap - interval))
            missed += max(0, round(gap / interval) - 1)
    return {
        "ports": sum(1 for a in ARRIVALS.values() if a),
        "checks": checks,
        "missed": missed,
        "deviations_ms": [round(d * 1000, 2) for d in deviations],
        "gc_pauses_ms": [round(p, 2) for p in GC_PAUSES if p >= 1],
        "gc_collections": len(GC_PAUSES),
    }


class Silent(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


def raise_nofile() -> None:
    """A listening socket and a kept connection per port need 2 descriptors a port: past the hard limit if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):  # not allowed to raise the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(first: int, count: int, silent: int, control: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Count, "127.0.0.1", control, reuse_address=True)
    await loop.create_server(Control, "127.0.0.1", control - 1, reuse_address=True)
    for port in range(first, first + count):
        if port >= first + count - silent:
            await loop.create_server(Silent, "127.0.0.1", port, backlog=1024, reuse_address=True)
        else:
            factory = lambda port=port: Answer(port)  # noqa: E731
            await loop.create_server(factory, "127.0.0.1", port, backlog=1024, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--silent", type=int, default=0)
    parser.add_argument("--control", type=int, help="the count port, the spacing port below it (FIRST_PORT-1)")
    parser.add_argument("--gc", choices=("on", "off"), default="on", help="off: no garbage-collection pauses")
    args = parser.parse_args()
    raise_nofile()
    gc.callbacks.append(_gc_timer)
    if args.gc == "off":
        gc.disable()
    try:
        asyncio.run(serve(args.first, args.count, args.silent, args.control or args.first - 1))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
