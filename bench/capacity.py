"""PicoAPI's health checker, measured inside a real supervisor process (uvicorn + lifespan).

    python bench/capacity.py --workers 5000 --first-port 20000 --seconds 20 [--silent 500]

Registers the fake workers straight into ``app.registry`` (the checker is what is
measured here, not registration), spread evenly over one interval as workers that start
at different moments are (``--burst``: all at once, so their checks fall due together), runs for ``--seconds`` after a warm-up interval,
and prints one JSON line. Lateness is fire time minus due time, taken where the
checker pops due checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvicorn  # noqa: E402
from common import cpu_seconds, free_port, raise_nofile, rss_bytes, summary_ms, threads  # noqa: E402

import picoapi  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--first-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--silent", type=int, default=0, help="the last N workers never answer")
    parser.add_argument("--burst", action="store_true", help="register every worker at once, not spread")
    parser.add_argument("--keep-alive", type=float, help="picoapi.KEEP_ALIVE for this run (0: a connection a check)")
    parser.add_argument("--pid-file", help="write this process's pid here once checks run (for a profiler)")
    parser.add_argument("--registry-file", help="persist the registry here (API_REGISTRY_FILE)")
    args = parser.parse_args()
    raise_nofile()
    if args.keep_alive is not None:
        picoapi.KEEP_ALIVE = args.keep_alive
    logging.getLogger("picoapi").setLevel(logging.ERROR)  # a line per status change would be noise here
    app = picoapi.PicoAPI(mode="supervisor", env_file=None, max_workers=args.workers, registry_file=args.registry_file)
    registry = app.registry
    assert registry is not None
    silent_ids = {
        picoapi.worker_id("127.0.0.1", p)
        for p in range(args.first_port + args.workers - args.silent, args.first_port + args.workers)
    }
    samples: list[tuple[float, str]] = []  # (lateness, worker id) of each fired check
    completed: list[float] = []
    marked: dict[str, float] = {}
    pop_due, record = registry.pop_due, registry.record

    def timed_pop(now: float) -> list:
        due = pop_due(now)
        fired = registry.clock()
        samples.extend((fired - c.due, c.worker_id) for c in due)
        return due

    def timed_record(wid: str, result: picoapi.CheckResult) -> object:
        completed.append(time.monotonic())
        change = record(wid, result)
        if change and change[1] == picoapi.UNHEALTHY and wid not in marked:
            marked[wid] = time.monotonic()
        return change

    registry.pop_due, registry.record = timed_pop, timed_record  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    result: dict = {}

    def drive() -> None:
        while not server.started:
            time.sleep(0.01)
        rss0, threads0 = rss_bytes(), threads()
        started = time.monotonic()
        for i in range(args.workers):
            if not args.burst and i % 20 == 0:  # the i-th worker registers i/n of an interval in
                time.sleep(max(0.0, started + i / args.workers * args.interval - time.monotonic()))
            p = args.first_port + i
            health = {"url": f"http://127.0.0.1:{p}/health", "interval": args.interval}
            reg = picoapi.Registration.model_validate({"name": "w", "host": "127.0.0.1", "port": p, "health": health})
            if args.registry_file:
                with app._store.lock:  # as PUT /register does: the row is written too
                    app._supervisor.add(reg, "127.0.0.1")
            else:
                registry.register(reg)
        registered = time.monotonic()
        time.sleep(args.interval + 0.5)  # warm-up: the first round of checks
        samples.clear()
        completed.clear()
        if args.pid_file:
            with open(args.pid_file, "w") as pid_file:
                pid_file.write(str(os.getpid()))
        cpu0, t0 = cpu_seconds(), time.monotonic()
        peak_threads = threads()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(0.25)
            peak_threads = max(peak_threads, threads())
        cpu, wall = cpu_seconds() - cpu0, time.monotonic() - t0
        done = [t for t in completed if t0 <= t <= t0 + wall]
        per_second = [sum(1 for t in done if t0 + s <= t < t0 + s + 1) for s in range(int(wall))]
        healthy_late = [late for late, wid in samples if wid not in silent_ids]
        result.update(
            workers=args.workers,
            silent=args.silent,
            seconds=round(wall, 1),
            due_per_s=round(args.workers / args.interval),
            fired_per_s=round(len(samples) / wall),
            completed_per_s=round(len(done) / wall),
            completed_per_s_min=min(per_second) if per_second else 0,
            completed_per_s_max=max(per_second) if per_second else 0,
            lateness=summary_ms([late for late, _ in samples]),
            lateness_healthy=summary_ms(healthy_late),
            cpu_us_per_check=round(cpu / max(1, len(done)) * 1e6, 1),
            cpu_share=round(cpu / wall, 3),
            rss_mb=round(rss_bytes() / 2**20, 1),
            rss_per_worker_bytes=round((rss_bytes() - rss0) / args.workers),
            threads=peak_threads,
            picoapi_threads=sorted(t.name for t in threading.enumerate() if t.name.startswith("picoapi")),
            threads_before=threads0,
            silent_marked=len([w for w in silent_ids if w in marked]),
            silent_marked_after_s=round(
                max((marked[w] for w in silent_ids if w in marked), default=registered) - registered, 2
            ),  # noqa: E501
        )
        server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    server.run()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
