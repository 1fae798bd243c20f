"""Supervisor memory: RSS with 0 and with N registered workers, before and after one round
of checks against the fake workers (which fills the checker's per-worker request cache).

    python bench/memory.py --workers 10000 --first-port 20000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import raise_nofile, rss_bytes  # noqa: E402

import picoapi  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--first-port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    app = picoapi.PicoAPI(mode="supervisor", env_file=None)
    registry = app.registry
    assert registry is not None
    checker = picoapi.HealthChecker(registry)
    checker.start()
    gc.collect()
    empty = rss_bytes()
    for i in range(args.workers):
        port = args.first_port + i
        health = {"url": f"http://127.0.0.1:{port}/health", "interval": 1.0}
        body = {
            "name": "worker",
            "host": "127.0.0.1",
            "port": port,
            "version": "1.0.0",
            "tags": ["resize", "png"],
            "health": health,
        }
        registry.register(picoapi.Registration.model_validate(body))
    gc.collect()
    registered = rss_bytes()
    time.sleep(2.5)  # every worker checked at least once
    gc.collect()
    checked = rss_bytes()
    checker.stop()
    print(
        json.dumps(
            {
                "workers": args.workers,
                "rss_empty_mb": round(empty / 2**20, 1),
                "rss_registered_mb": round(registered / 2**20, 1),
                "rss_checked_mb": round(checked / 2**20, 1),
                "bytes_per_worker_registered": round((registered - empty) / args.workers),
                "bytes_per_worker_checked": round((checked - empty) / args.workers),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
