"""A supervisor holding 10,000 workers for the query benchmark.

    python bench/queries.py --port 8103

Tags: every worker has "all", the first 5,000 have "x5000", the first 100 "x100".
Measures app.registry.workers(tag) in process, prints one JSON line, then serves
GET /services until killed, for run.py to query over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvicorn  # noqa: E402
from common import summary_ms  # noqa: E402

import picoapi  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = picoapi.PicoAPI(mode="supervisor", env_file=None)
    registry = app.registry
    assert registry is not None
    for i in range(10_000):
        port = 10_000 + i
        tags = ["all"] + (["x5000"] if i < 5000 else []) + (["x100"] if i < 100 else [])
        health = {"url": f"http://127.0.0.1:{port}/health", "interval": 3600}
        body = {"name": f"w{i}", "host": "127.0.0.1", "port": port, "tags": tags, "health": health}
        registry.register(picoapi.Registration.model_validate(body))
    result = {}
    for tag, repeat in (("x100", 1000), ("x5000", 50)):
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            found = registry.workers(tag)
            times.append(time.perf_counter() - started)
        assert len(found) == int(tag[1:])
        result[f"in_process_{tag}"] = summary_ms(times)
    print(json.dumps(result), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
