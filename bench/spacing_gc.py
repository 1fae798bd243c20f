"""PicoAPI's checker at N workers, spacing measured from outside, with the fake workers' garbage collection on
and then off: how much of the spacing the instrument itself adds (a collection pauses a fake-worker process and
stamps all its ports' arrivals late at once).

    python bench/spacing_gc.py [--workers 10000] [--seconds 20]

Prints one JSON line per setting: the spacing (p50/p99/max deviation from the 1 s interval, checks missed), the
fake workers' longest collection pauses, PicoAPI's CPU per check and its own lateness.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    os.chdir(run.ROOT)
    run.raise_nofile()
    command = ["bench/capacity.py", "--workers", str(args.workers), "--first-port", str(run.HEALTHY_FIRST)]
    for setting in ("on", "off"):
        run.FAKE_GC = setting
        with run.fake_workers(run.HEALTHY_FIRST, args.workers):
            result = run.observe([*command, "--seconds", str(args.seconds + 1.5)], run.HEALTHY_FIRST, args.seconds, 3)
        outside, spacing = result["outside"], result["outside"]["spacing"]
        print(
            json.dumps(
                {
                    "workers": args.workers,
                    "fake_gc": setting,
                    "spacing_ms": spacing["deviation"],
                    "missed": spacing["missed"],
                    "fake_gc_pauses_ms": spacing["fake_gc_pauses_ms"][:5],
                    "cpu_us_per_check": outside["cpu_us_per_check"],
                    "lateness_ms": result["inside"].get("lateness"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
