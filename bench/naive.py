"""The naive design the first PicoAPI used, kept here as the baseline: one thread per
worker, ``requests.get``, ``time.sleep(interval)``.

    python bench/naive.py --workers 1000 --first-port 20000 --seconds 20

Prints one JSON line with the same figures as capacity.py. Lateness is measured
against the schedule the design intends (one check per interval per worker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import requests  # noqa: E402
from common import cpu_seconds, raise_nofile, rss_bytes, summary_ms, threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--first-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    raise_nofile()
    threading.stack_size(256 * 1024)  # as small as is safe, or 10,000 threads would not start
    lock = threading.Lock()
    samples: list[float] = []
    completed: list[float] = []
    stop, go = threading.Event(), threading.Event()
    rss0 = rss_bytes()

    def check_forever(port: int) -> None:
        url = f"http://127.0.0.1:{port}/health"
        go.wait()  # all threads start first (waiting, they let the others start), then run together
        due = time.monotonic() + args.interval
        while not stop.is_set():
            time.sleep(max(0.0, args.interval))  # the original: sleep a whole interval after each check
            fired = time.monotonic()
            try:
                requests.get(url, timeout=args.interval)
            except requests.RequestException:
                pass
            with lock:
                samples.append(fired - due)
                completed.append(time.monotonic())
            due += args.interval

    started = []
    for i in range(args.workers):
        thread = threading.Thread(target=check_forever, args=(args.first_port + i,), daemon=True)
        thread.start()
        started.append(thread)
    go.set()
    time.sleep(args.interval + 0.5)
    with lock:
        samples.clear()
        completed.clear()
    cpu0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(args.seconds)
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - t0
    with lock:
        done = [t for t in completed if t >= t0]
        late = list(samples)
    per_second = [sum(1 for t in done if t0 + s <= t < t0 + s + 1) for s in range(int(wall))]
    result = {
        "workers": args.workers,
        "seconds": round(wall, 1),
        "due_per_s": round(args.workers / args.interval),
        "fired_per_s": round(len(late) / wall),
        "completed_per_s": round(len(done) / wall),
        "completed_per_s_min": min(per_second) if per_second else 0,
        "completed_per_s_max": max(per_second) if per_second else 0,
        "lateness": summary_ms(late),
        "cpu_us_per_check": round(cpu / max(1, len(done)) * 1e6, 1),
        "cpu_share": round(cpu / wall, 3),
        "rss_mb": round(rss_bytes() / 2**20, 1),
        "rss_per_worker_bytes": round((rss_bytes() - rss0) / args.workers),
        "threads": threads(),
    }
    stop.set()
    print(json.dumps(result), flush=True)
    os._exit(0)  # 10,000 sleeping threads need not be joined


if __name__ == "__main__":
    main()
