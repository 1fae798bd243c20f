"""Why the registry file is sqlite: the cost of saving one registration, by registry size.

    python bench/persistence.py

sqlite (WAL, synchronous=NORMAL, as picoapi's _Store) writes one row per PUT; an
atomically replaced JSON file must rewrite every worker on each PUT. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import picoapi  # noqa: E402


def registration(i: int) -> picoapi.Registration:
    port = 10_000 + i
    health = {"url": f"http://127.0.0.1:{port}/health", "interval": 10}
    return picoapi.Registration.model_validate(
        {"name": "w", "host": "127.0.0.1", "port": port, "tags": ["a"], "health": health}
    )


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (100, 1_000, 10_000):
            regs = [registration(i) for i in range(size)]
            store = picoapi._Store(os.path.join(tmp, f"r{size}.db"))
            for reg in regs:
                store.save(picoapi.worker_id(reg.host, reg.port), reg, reg.host)
            sqlite_times = []
            for reg in regs[:200]:
                started = time.perf_counter()
                store.save(picoapi.worker_id(reg.host, reg.port), reg, reg.host)
                sqlite_times.append(time.perf_counter() - started)
            store.close()
            path = os.path.join(tmp, f"r{size}.json")
            bodies = {picoapi.worker_id(r.host, r.port): r.model_dump(mode="json") for r in regs}
            file_times = []
            for _ in range(20 if size == 10_000 else 100):
                started = time.perf_counter()
                with open(path + ".tmp", "w") as out:  # the other choice: rewrite all, then replace
                    json.dump(bodies, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(path + ".tmp", path)
                file_times.append(time.perf_counter() - started)
            results[size] = {
                "sqlite_row_us": round(statistics.median(sqlite_times) * 1e6, 1),
                "json_file_rewrite_us": round(statistics.median(file_times) * 1e6, 1),
            }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
