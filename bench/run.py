"""PicoAPI's benchmarks, in one command (on 2 cores):

    python bench/run.py            # everything (about 9 minutes); writes bench/results.json and bench/RESULTS.md
    python bench/run.py --quick    # shorter runs, to try the benchmark itself (about 4.5 minutes)

Measures, and compares side by side in the same run (interleaved), never against
a target: health-check capacity (workers registered spread over the interval, and
in one burst) against Prometheus and the naive design, with each worker's check
spacing measured from outside by the fake workers; silent workers; registration
throughput against a bare FastAPI app (registering workers that answer, and
addresses where nothing does); queries, detection of killed workers, memory,
start-up. Needs Debian's wrk (apt-get install wrk) for the registration load;
uses Debian's prometheus (/usr/bin/prometheus, our own instance, config and data
under a temporary directory) and py-spy (pip install py-spy) for the checker's
profile if they are there (skipped, and said so, if not). All traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import requests  # noqa: E402
from common import env_without_api, free_port, percentile, raise_nofile, summary_ms, wait_port  # noqa: E402

PY = sys.executable
HEALTHY_FIRST, SILENT_FIRST = 20_000, 10_000  # below the ephemeral port range
REGISTER_FIRST = 10_000  # the ports bench/register.lua registers


def services(base: str) -> dict[str, dict[str, Any]]:
    """The supervisor's registry by id, every page; patient, as 2 cores may be busy starting processes."""
    import picoapi

    for _ in range(5):
        try:
            return {e["id"]: e for e in picoapi._services(base, (), 10)[0]}
        except picoapi.PicoAPIError:
            time.sleep(0.5)
    raise RuntimeError(f"{base} did not answer GET /services five times in a row")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_json(args: list[str], timeout: float = 180) -> dict[str, Any]:
    out = subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env_without_api())
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@contextmanager
def process(
    args: list[str], ready_port: int | None = None, ready_line: str | None = None, capture: bool = False, **env: str
) -> Iterator[Any]:
    # Output nobody reads goes nowhere: an unread pipe fills up and blocks the process
    # writing to it (uvicorn's access log did exactly that to a supervisor here).
    out = subprocess.PIPE if ready_line is not None or capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**env_without_api(), **env}, stdout=out, stderr=subprocess.DEVNULL, text=True
    )
    try:
        if ready_line is not None:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == ready_line
        if ready_port is not None:
            wait_port(ready_port)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- 1, 2, 3: health-check capacity, silent workers, the naive design --------------------


#: Ports one fake-worker process serves at most: a listening socket and a kept connection each (more while a
#: client replaces connections) stay well within the 20,000 descriptors a process may hold here.
PORTS_PER_FAKE = 2500
FAKES: dict[int, list[int]] = {}  # the pids of the fake-worker processes running, by first port
#: "off": the fake workers never collect garbage (see fake_workers.py): a pause in one of them would stamp the
#: arrivals of its 2,500 ports late at once, where 2,500 real workers would each pause on their own.
FAKE_GC = "off"


@contextmanager
def fake_workers(first: int, n: int, silent: int = 0) -> Iterator[None]:
    """The fake workers for ports first .. first+n-1 (the last ``silent`` never answer), one process per
    PORTS_PER_FAKE ports; process k's control ports are first-1-2k (count) and first-2-2k (spacing)."""
    with contextlib.ExitStack() as stack:
        pids = []
        for k, start in enumerate(range(first, first + n, PORTS_PER_FAKE)):
            count = min(PORTS_PER_FAKE, first + n - start)
            quiet = max(0, min(count, silent - (first + n - start - count)))
            command = [PY, "bench/fake_workers.py", str(start), str(count), "--control", str(first - 1 - 2 * k)]
            command += ["--gc", FAKE_GC]
            pids.append(stack.enter_context(process([*command, "--silent", str(quiet)], ready_line="ready")).pid)
        FAKES[first] = pids
        try:
            yield
        finally:
            del FAKES[first]


def answered(first_port: int) -> int | None:
    """How many checks the fake workers have answered so far (None if they are too busy to say)."""
    try:
        total = 0
        for k in range(len(FAKES.get(first_port, [0]))):
            with socket.create_connection(("127.0.0.1", first_port - 1 - 2 * k), timeout=10) as sock:
                total += int(sock.recv(64) or b"0")
        return total
    except OSError:
        return None


def control(first_port: int, command: str) -> dict[str, Any]:
    """Ask every fake-worker process: ``reset`` the arrival times, or the ``spacing INTERVAL`` of all their ports."""
    answers = []
    for k in range(len(FAKES.get(first_port, [0]))):
        with socket.create_connection(("127.0.0.1", first_port - 2 - 2 * k), timeout=60) as sock:
            sock.sendall(command.encode() + b"\n")
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
        answers.append(json.loads(data))
    if command == "reset":
        return {"ok": True}
    deviations = sorted(d / 1000 for a in answers for d in a["deviations_ms"])
    return {
        "ports": sum(a["ports"] for a in answers),
        "checks": sum(a["checks"] for a in answers),
        "missed": sum(a["missed"] for a in answers),
        "gaps": len(deviations),
        "deviation": summary_ms(deviations),
        "fake_gc_pauses_ms": sorted((p for a in answers for p in a.get("gc_pauses_ms", [])), reverse=True)[:20],
        "fake_gc_collections": sum(a.get("gc_collections", 0) for a in answers),
    }


def procs_running() -> int:
    """Threads running or waiting for a core right now, on the whole machine (/proc/stat), ours included."""
    with open("/proc/stat") as stat:
        return next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))


def waited(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a core, in all (/proc schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[1])
    return total / 1e9


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds, RSS and threads of a process, read from /proc (works while it is starved)."""
    if not os.path.exists(f"/proc/{pid}/status"):
        raise RuntimeError(f"process {pid} ended before its measuring window did")
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as lines:
        status = {k: v.split()[0] for k, _, v in (line.partition(":") for line in lines) if v.split()}
    rss = int(status.get("VmRSS", 0)) * 1024
    return {"cpu": (int(fields[11]) + int(fields[12])) / ticks, "rss": rss, "threads": int(status["Threads"])}


def observe(
    args: list[str], first_port: int, seconds: float, warmup: float, grace: float = 4, spy: bool = False
) -> dict[str, Any]:
    """Run a checker process; measure it from outside over ``seconds`` after ``warmup``.

    The same for every design: checks answered and the spacing of each worker's
    checks (both recorded by the fake workers), CPU, RSS and threads (from /proc).
    The process's own report (lateness) is added if it gives one within ``grace``
    seconds of the window's end. ``args`` are a Python script's, or a program's
    whole command line if the first is not a .py file (Prometheus).
    """
    command = [PY, *args] if args[0].endswith(".py") else args
    quiet = None if command[0] == PY else subprocess.DEVNULL  # Prometheus logs to stderr
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=quiet, text=True, env=env_without_api())
    try:
        return _observe(proc, args, first_port, seconds, warmup, grace, spy)
    finally:
        if proc.poll() is None:  # whatever went wrong: never leave a checker (or a Prometheus) running
            proc.kill()
            proc.communicate()


def _observe(
    proc: subprocess.Popen[str],
    args: list[str],
    first_port: int,
    seconds: float,
    warmup: float,
    grace: float,
    spy: bool,
) -> dict[str, Any]:
    time.sleep(warmup)
    control(first_port, "reset")
    fakes = FAKES.get(first_port, [])
    fake0 = sum(proc_stats(pid)["cpu"] for pid in fakes)
    before, stats0, t0 = answered(first_port) or 0, proc_stats(proc.pid), time.monotonic()
    wait0 = waited(proc.pid)
    raw = os.path.join(HERE, ".profile.raw")
    profiler = None
    if spy and shutil.which("py-spy"):  # the checker's profile, taken during this same window
        command = [
            "py-spy",
            "record",
            "--nonblocking",
            "-p",
            str(proc.pid),
            "-d",
            str(int(min(10, seconds))),
            "-r",
            "200",
        ]
        profiler = subprocess.Popen(
            [*command, "-f", "raw", "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    per_second, last, last_t, peak_threads, peak_rss = [], before, t0, stats0["threads"], stats0["rss"]
    runnable = []
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        runnable.append(procs_running())
        count, now = answered(first_port), proc_stats(proc.pid)
        if count is not None:  # a missed reading: the next one covers the time since the last
            per_second.append(round((count - last) / (time.monotonic() - last_t)))
            last, last_t = count, time.monotonic()
        peak_threads, peak_rss = max(peak_threads, now["threads"]), max(peak_rss, now["rss"])
    wall, stats1, wait1 = time.monotonic() - t0, proc_stats(proc.pid), waited(proc.pid)
    fake1 = sum(proc_stats(pid)["cpu"] for pid in fakes)
    try:
        spacing = control(first_port, "spacing 1.0")  # every design checks at a 1 s interval here
    except OSError as exc:
        spacing = {"error": f"the fake workers did not say: {exc!r}"}
    profile = None
    if profiler is not None:
        profiler.wait(30)
        profile = summarize_profile(raw)
    outside = {
        "answered_per_s": round((last - before) / wall),
        "answered_per_s_median": statistics.median(per_second),
        "answered_per_s_min": min(per_second),
        "answered_per_s_max": max(per_second),
        "cpu_share": round((stats1["cpu"] - stats0["cpu"]) / wall, 3),
        "cpu_us_per_check": round((stats1["cpu"] - stats0["cpu"]) / max(1, last - before) * 1e6, 1),
        "rss_mb": round(peak_rss / 2**20, 1),
        "threads": peak_threads,
        "spacing": spacing,
        "fake_workers_cpu_share": round((fake1 - fake0) / wall, 3),
        "load": round(os.getloadavg()[0], 2),
        "runnable": round(statistics.mean(runnable), 1),
        # runnable but not running: a share of the window over all its threads (a starved checker shows here)
        "waited_for_a_core": round((wait1 - wait0) / wall, 3),
    }
    if not args[0].endswith(".py"):  # a program that reports nothing: stop it
        proc.terminate()
        proc.communicate(timeout=30)
        return {"outside": outside, "inside": {}}
    try:
        stdout, _ = proc.communicate(timeout=seconds + grace)
        inside = json.loads(stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        proc.kill()
        proc.communicate()
        inside = {"unavailable": f"the process did not report within {seconds + grace:g}s of its window (starved)"}
    return {"outside": outside, "inside": inside, **({"profile": profile} if profile else {})}


def prometheus_command(n: int, tmp: str) -> list[str]:
    """Our own Prometheus (never the system's service): its config and data under ``tmp``, its own port,
    scraping the ``n`` fake workers every second at their health path, as PicoAPI checks them."""
    config = os.path.join(tmp, "prometheus.yml")
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in range(HEALTHY_FIRST, HEALTHY_FIRST + n))
    with open(config, "w") as out:
        out.write(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            f"scrape_configs: [{{job_name: fake, metrics_path: /health, static_configs: [{{targets: [{targets}]}}]}}]\n"
        )
    return [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
        f"--web.listen-address=127.0.0.1:{free_port()}",
        "--log.level=error",
    ]


PROMETHEUS = "/usr/bin/prometheus"


def capacity(seconds: float, counts: list[int], profile: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"pico": {}, "prometheus": {}, "naive": {}, "profile": None}
    if not os.path.exists(PROMETHEUS):
        results["prometheus"] = {"skipped": f"{PROMETHEUS} not found (Debian: apt-get install prometheus)"}
    for n in counts:  # interleaved: PicoAPI then Prometheus at each size; the naive design after them all
        # Fresh fake workers for every run: no contender inherits another's backlog. The processes run a
        # little longer than the outside window, which starts after their warm-up.
        args = ["bench/capacity.py", "--workers", str(n), "--first-port", str(HEALTHY_FIRST)]
        args += ["--seconds", str(seconds + 1.5)]
        with fake_workers(HEALTHY_FIRST, n):
            log(
                f"capacity: PicoAPI, {n} workers, {seconds:g}s"
                + (" (and its profile)" if profile and n == 5000 else "")
            )
            results["pico"][n] = observe(args, HEALTHY_FIRST, seconds, warmup=3, spy=profile and n == 5000)
            results["profile"] = results["pico"][n].pop("profile", None) or results["profile"]
        if "skipped" not in results["prometheus"]:
            with fake_workers(HEALTHY_FIRST, n), tempfile.TemporaryDirectory() as tmp:
                log(f"capacity: Prometheus, {n} workers, {seconds:g}s")
                results["prometheus"][n] = observe(prometheus_command(n, tmp), HEALTHY_FIRST, seconds, warmup=15)
        if n == max(counts):  # the best case beside it: every worker registered at once
            with fake_workers(HEALTHY_FIRST, n):
                log(f"capacity: PicoAPI, {n} workers registered in one burst, {seconds:g}s")
                results["burst"] = {n: observe([*args, "--burst"], HEALTHY_FIRST, seconds, warmup=3)}
    for n in counts:  # last: its thousands of threads leave the machine busy for a while after it
        with fake_workers(HEALTHY_FIRST, n):
            log(f"capacity: naive design, {n} workers, {seconds:g}s")
            naive = ["bench/naive.py", "--workers", str(n), "--first-port", str(HEALTHY_FIRST)]
            results["naive"][n] = observe([*naive, "--seconds", str(seconds + 1.5)], HEALTHY_FIRST, seconds, warmup=2)
    time.sleep(10)  # the naive design's thousands of threads leave the machine busy: the next section waits
    return results


def summarize_profile(raw: str) -> dict[str, Any]:
    """The checker threads' self time from a py-spy raw file."""
    self_time: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = 0
    with open(raw) as samples:
        for line in samples:
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            if not any("HealthChecker._loop" in f for f in frames):
                continue  # uvicorn's idle loop and the benchmark's own thread
            total += int(count)
            by_thread["checker thread"] += int(count)
            self_time[frames[-1].split(" (")[0]] += int(count)
    os.remove(raw)
    top = [{"function": f, "share": round(n / total, 3)} for f, n in self_time.most_common(12)] if total else []
    return {"samples": total, "threads": dict(by_thread), "top_self": top}


def silent(seconds: float) -> dict[str, Any]:
    log(f"silent workers: 5000 workers, 500 never answer, {seconds:g}s")
    with fake_workers(SILENT_FIRST, 5000, silent=500):
        args = ["bench/capacity.py", "--workers", "5000", "--silent", "500", "--first-port", str(SILENT_FIRST)]
        return run_json([*args, "--seconds", str(seconds)])


# -- 4: registration throughput against a bare FastAPI app ---------------------------------


def registration(seconds: int, repeats: int, answering: bool = True) -> dict[str, Any]:
    """PUT /register against a bare FastAPI app doing the same work. The 10,000 workers registered answer
    their checks (fake workers), as honest workers do when they register; ``answering=False`` points them
    where nothing listens, so the supervisor re-checks each new one at 1, 2 and 4 s."""
    if not shutil.which("wrk"):
        return {"skipped": "wrk not found: apt-get install wrk"}
    with fake_workers(REGISTER_FIRST, 10_000) if answering else contextlib.nullcontext():
        return {"answering": answering, **_registration(seconds, repeats)}


def _registration(seconds: int, repeats: int) -> dict[str, Any]:
    ports = {"pico": free_port(), "bare": free_port()}
    uvicorn = [PY, "-m", "uvicorn", "--app-dir", HERE, "--log-level", "warning", "--host", "127.0.0.1"]
    runs: dict[str, list[dict[str, Any]]] = {"pico": [], "bare": []}
    with (
        process([*uvicorn, "pico_app:app", "--port", str(ports["pico"])], ready_port=ports["pico"]),
        process([*uvicorn, "bare_app:app", "--port", str(ports["bare"])], ready_port=ports["bare"]),
    ):
        for side in ("pico", "bare"):  # warm-up: first 10,000 registrations create, the rest replace
            wrk(ports[side], 2)
        for i in range(repeats):
            for side in ("pico", "bare") if i % 2 == 0 else ("bare", "pico"):
                log(f"registration: {side} run {i + 1}/{repeats}, 64 connections, {seconds}s")
                runs[side].append(wrk(ports[side], seconds))
    rate = {side: [r["requests"] / r["seconds"] for r in runs[side]] for side in runs}
    ratios = [p / b for p, b in zip(rate["pico"], rate["bare"], strict=True)]
    return {
        "connections": 64,
        "seconds": seconds,
        "repeats": repeats,
        "runs": runs,
        "pico_req_s": {
            "median": round(statistics.median(rate["pico"])),
            "min": round(min(rate["pico"])),
            "max": round(max(rate["pico"])),
        },
        "bare_req_s": {
            "median": round(statistics.median(rate["bare"])),
            "min": round(min(rate["bare"])),
            "max": round(max(rate["bare"])),
        },
        "ratio": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "pico_p50_ms": round(statistics.median(r["p50_ms"] for r in runs["pico"]), 2),
        "pico_p99_ms": round(statistics.median(r["p99_ms"] for r in runs["pico"]), 2),
        "bare_p50_ms": round(statistics.median(r["p50_ms"] for r in runs["bare"]), 2),
        "bare_p99_ms": round(statistics.median(r["p99_ms"] for r in runs["bare"]), 2),
    }


def wrk(port: int, seconds: int) -> dict[str, Any]:
    command = [
        "wrk",
        "-t2",
        "-c64",
        f"-d{seconds}s",
        "-s",
        os.path.join(HERE, "register.lua"),
        f"http://127.0.0.1:{port}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    line = next(line for line in out.splitlines() if line.startswith("JSON "))
    return dict(json.loads(line[5:]))


# -- 5: queries --------------------------------------------------------------------------------


def queries() -> dict[str, Any]:
    log("queries: 10,000 workers registered")
    port = free_port()
    with process([PY, "bench/queries.py", "--port", str(port)], capture=True) as proc:
        in_process = json.loads(proc.stdout.readline())
        wait_port(port)
        session = requests.Session()
        result: dict[str, Any] = {"in_process": in_process}
        for tag, repeat in (("x100", 200), ("x5000", 30)):
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                response = session.get(f"http://127.0.0.1:{port}/services", params={"tag": tag}, timeout=30)
                times.append(time.perf_counter() - started)
                assert len(response.json()) == min(1000, int(tag[1:]))  # one page: 1,000 at most
            result[f"http_{tag}"] = summary_ms(times)
    return result


# -- 6: detection -----------------------------------------------------------------------------


def detection(kills: int, interval: float = 1.0) -> dict[str, Any]:
    log(f"detection: {kills} SIGKILLs of real workers at a {interval:g}s interval")
    sup_port = free_port()
    times: list[float] = []
    picoapi_cmd = [PY, "-m", "picoapi"]
    with process([*picoapi_cmd, "supervisor", "--bind", "127.0.0.1", "--port", str(sup_port)], ready_port=sup_port):
        base = f"http://127.0.0.1:{sup_port}"
        batch = 5
        while len(times) < kills:
            ports = [free_port() for _ in range(min(batch, kills - len(times)))]
            workers = []
            for port in ports:
                env = {
                    **env_without_api(),
                    "API_HOST": "127.0.0.1",
                    "API_BIND": "127.0.0.1",
                    "API_PORT": str(port),
                    "API_TITLE": "upper",
                    "API_REGISTER_PATH": base + "/register",
                    "API_HEALTH_INTERVAL": str(interval),
                    "PYTHONPATH": ROOT,
                }
                workers.append(
                    subprocess.Popen(
                        [*picoapi_cmd, "worker", "picoapi_demo:worker"],
                        env=env,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            ids = [f"127.0.0.1:{port}" for port in ports]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                entries = services(base)
                if all(i in entries and entries[i]["last_check"] for i in ids):
                    break  # registered and checked at least once
                time.sleep(0.05)
            killed: dict[str, float] = {}
            for wid, worker in zip(ids, workers, strict=True):
                time.sleep(random.uniform(0, interval))  # kill at a random phase of the interval
                worker.kill()
                killed[wid] = time.monotonic()
            pending = set(ids)
            while pending and time.monotonic() < deadline + 30:
                entries = services(base)
                for wid in list(pending):
                    if entries.get(wid, {}).get("status") == "unhealthy":
                        times.append(time.monotonic() - killed[wid])
                        pending.discard(wid)
                time.sleep(0.01)
            for worker in workers:
                worker.wait(5)
    timeout = min(interval, 10.0)
    bound = interval + timeout + min(1.0, interval / 4) + timeout
    return {
        "kills": len(times),
        "interval_s": interval,
        "p50_s": round(percentile(times, 50), 3),
        "p99_s": round(percentile(times, 99), 3),
        "max_s": round(max(times), 3),
        "documented_bound_s": bound,
        "within_bound": sum(t <= bound for t in times),
    }


# -- Persistence (the supervisor issue): sqlite's cost, and the checker with and without it --


def persistence(seconds: float = 10) -> dict[str, Any]:
    log("persistence: one registration saved, and the checker with and without API_REGISTRY_FILE")
    result: dict[str, Any] = {"save_one_registration": run_json(["bench/persistence.py"])}
    runs: dict[str, list[dict[str, Any]]] = {"file": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(["file", "memory", "file", "memory"]):  # interleaved
            args = ["bench/capacity.py", "--workers", "5000", "--first-port", str(HEALTHY_FIRST)]
            args += ["--seconds", str(seconds + 3)]
            if mode == "file":
                args += ["--registry-file", os.path.join(tmp, f"registry{i}.db")]
            with fake_workers(HEALTHY_FIRST, 5000):
                inside = observe(args, HEALTHY_FIRST, seconds, warmup=3.5)["inside"]
            runs[mode].append({"completed_per_s": inside["completed_per_s"], "p99_ms": inside["lateness"]["p99_ms"]})
    result["checker_5000_workers"] = runs
    rate = {mode: statistics.median(r["completed_per_s"] for r in runs[mode]) for mode in runs}
    result["throughput_ratio_file_to_memory"] = round(rate["file"] / rate["memory"], 4)
    return result


# -- Keep-alive (the scheduling issue): the checker at 10,000 workers with kept connections and without -------


def keepalive(seconds: float = 10, n: int = 10_000) -> dict[str, Any]:
    log(f"keep-alive: {n} workers with KEEP_ALIVE 5 s and 0 (a connection a check), interleaved")
    runs: dict[str, list[dict[str, Any]]] = {"kept": [], "fresh": []}
    for mode in ["kept", "fresh", "fresh", "kept"]:  # interleaved
        args = ["bench/capacity.py", "--workers", str(n), "--first-port", str(HEALTHY_FIRST)]
        args += ["--seconds", str(seconds + 1.5), "--keep-alive", "5" if mode == "kept" else "0"]
        with fake_workers(HEALTHY_FIRST, n):
            out = observe(args, HEALTHY_FIRST, seconds, warmup=3)["outside"]
        runs[mode].append({k: out.get(k) for k in ("answered_per_s", "cpu_us_per_check", "fake_workers_cpu_share")})
        runs[mode][-1]["spacing_p99_ms"] = out["spacing"].get("deviation", {}).get("p99_ms")
        runs[mode][-1]["runnable"] = out.get("runnable")
    return runs


# -- 7: memory, 8: start-up ---------------------------------------------------------------------


def memory() -> dict[str, Any]:
    log("memory: 0 and 10,000 registered workers")
    with fake_workers(HEALTHY_FIRST, 10000):
        return run_json(["bench/memory.py", "--workers", "10000", "--first-port", str(HEALTHY_FIRST)])


def startup(repeats: int = 5) -> dict[str, Any]:
    log("start-up: imports, and a worker from process start to registered")
    timings: dict[str, list[float]] = {"picoapi": [], "fastapi_requests": []}
    code = {"picoapi": "import picoapi", "fastapi_requests": "import fastapi, requests"}
    for _ in range(repeats):  # interleaved
        for name in ("picoapi", "fastapi_requests"):
            started = time.perf_counter()
            subprocess.run([PY, "-c", code[name]], check=True, cwd=ROOT, env=env_without_api())
            timings[name].append(time.perf_counter() - started)
    uvicorn_loaded = subprocess.run(
        [PY, "-c", "import picoapi, sys; print('uvicorn' in sys.modules)"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    sup_port = free_port()
    to_registered = []
    with process(
        [PY, "-m", "picoapi", "supervisor", "--bind", "127.0.0.1", "--port", str(sup_port)], ready_port=sup_port
    ):
        for _ in range(5):
            port = free_port()
            env = {
                **env_without_api(),
                "API_HOST": "127.0.0.1",
                "API_BIND": "127.0.0.1",
                "API_PORT": str(port),
                "API_TITLE": "upper",
                "API_REGISTER_PATH": f"http://127.0.0.1:{sup_port}/register",
                "PYTHONPATH": ROOT,
            }
            started = time.perf_counter()
            worker = subprocess.Popen(
                [PY, "-m", "picoapi", "worker", "picoapi_demo:worker"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while f"127.0.0.1:{port}" not in services(f"http://127.0.0.1:{sup_port}"):
                time.sleep(0.005)
            to_registered.append(time.perf_counter() - started)
            worker.terminate()
            worker.wait(10)
    med = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "import_picoapi_s": round(med["picoapi"], 3),
        "import_fastapi_requests_s": round(med["fastapi_requests"], 3),
        "ratio": round(med["picoapi"] / med["fastapi_requests"], 3),
        "spread_picoapi_s": [round(min(timings["picoapi"]), 3), round(max(timings["picoapi"]), 3)],
        "uvicorn_imported_by_import_picoapi": uvicorn_loaded == "True",
        "worker_start_to_registered_s": {
            "median": round(statistics.median(to_registered), 3),
            "min": round(min(to_registered), 3),
            "max": round(max(to_registered), 3),
        },
    }


# -- Report ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cores": os.cpu_count(),
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        ),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: version(name) for name in ("fastapi", "starlette", "uvicorn", "requests", "pydantic")},
    }


def markdown(r: dict[str, Any]) -> str:
    """The report's tables; a section that failed is said so in place of its table."""
    parts = []
    for name, part in (
        ("capacity", _md_capacity),
        ("silent", _md_silent),
        ("registration", _md_registration),
        ("queries", _md_queries),
        ("detection", _md_detection),
        ("memory", _md_memory),
        ("startup", _md_startup),
        ("persistence", _md_persistence),
        ("keepalive", _md_keepalive),
        ("profile", _md_profile),
    ):
        if name not in r and name in ("persistence", "keepalive"):  # measured only when asked for
            parts.append(f"{name}: measured only with `python bench/run.py --only {name}`; not in this run.")
            continue
        try:
            parts.append(part(r))
        except (KeyError, TypeError, ValueError) as exc:
            error = r.get(name, {}).get("error") if isinstance(r.get(name), dict) else None
            parts.append(f"{name}: not measured ({error or repr(exc)}).")
    return "\n\n".join(p for p in parts if p)


def _md_capacity(r: dict[str, Any]) -> str:
    lines = [
        "| workers | design | checks completed/s (due) | answered/s, counted by the fake workers "
        "| spacing from outside: deviation p50 / p99 / max ms, checks missed | lateness p50 / p99 / max ms "
        "| CPU µs per check | CPU cores | waited for a core | fake workers' cores | RSS MB | threads | runnable (load) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cap = r["capacity"]
    names = {"pico": "PicoAPI", "prometheus": "Prometheus", "naive": "naive", "burst": "PicoAPI, burst"}
    for n in sorted(cap["pico"], key=int):
        sides = [s for s in ("pico", "burst", "prometheus", "naive") if n in cap.get(s, {})]
        for side in sides:
            out, inside = cap[side][n]["outside"], cap[side][n]["inside"]
            late = inside.get("lateness")
            late_text = _ms3(late) if late else "not reported (starved)" if side == "naive" else "-"
            done = inside.get("completed_per_s")
            done_text = f"{done:,}" if done is not None else "not reported" if side == "naive" else "-"
            if "completed_per_s_min" in inside:
                done_text += f" (each second {inside['completed_per_s_min']:,}-{inside['completed_per_s_max']:,})"
            gap = out.get("spacing", {})
            gap_text = f"{_ms3(gap['deviation'])}, {gap['missed']:,}" if gap.get("gaps") else "no repeated checks"
            lines.append(
                f"| {int(n):,} | {names[side]} | {done_text} of {int(n):,} | {out['answered_per_s']:,} | {gap_text} "
                f"| {late_text} | {out['cpu_us_per_check']:,} | {out['cpu_share']} | {out.get('waited_for_a_core', '?')} "
                f"| {out.get('fake_workers_cpu_share', '?')} | {out['rss_mb']} | {out['threads']:,} "
                f"| {out.get('runnable')} ({out.get('load')}) |"
            )
        p = cap["pico"][n]["outside"]
        for other in ("prometheus", "naive"):
            if n in cap.get(other, {}):
                q = cap[other][n]["outside"]
                lines.append(
                    f"| {int(n):,} | **PicoAPI / {names[other]}** | | **{p['answered_per_s'] / max(1, q['answered_per_s']):,.2f}x** "
                    f"| | | **{p['cpu_us_per_check'] / max(0.1, q['cpu_us_per_check']):.3f}x** | | | "
                    f"| {p['rss_mb'] / max(0.1, q['rss_mb']):.2f}x | {p['threads'] / max(1, q['threads']):.4f}x | |"
                )
    if "skipped" in cap.get("prometheus", {}):
        lines.append(f"\nPrometheus: skipped ({cap['prometheus']['skipped']}).")
    return "\n".join(lines)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _ms3(x: dict[str, float]) -> str:
    return f"{x['p50_ms']} / {x['p99_ms']} / {x['max_ms']}"


def _range(x: dict[str, Any]) -> str:
    return f"{x['median']:,} ({x['min']:,}-{x['max']:,})"


def _md_silent(r: dict[str, Any]) -> str:
    s = r["silent"]
    return _md_table(
        ["silent workers (5,000, 500 silent)", "figure"],
        [
            ["healthy workers' lateness p50 / p99 / max ms", _ms3(s["lateness_healthy"])],
            ["completed checks/s (due)", f"{s['completed_per_s']:,} ({s['due_per_s']:,})"],
            [
                "silent workers marked unhealthy",
                f"{s['silent_marked']} of {s['silent']}, all within {s['silent_marked_after_s']} s of registering",
            ],
        ],
    )


def _md_registration(r: dict[str, Any]) -> str:
    rows = []
    for key, what in (("registration", "workers that answer"), ("registration_dead", "nothing answering")):
        g = r.get(key)
        if not g or "skipped" in g or "error" in g:
            continue
        rows += [
            [f"PicoAPI supervisor, {what}", _range(g["pico_req_s"]), g["pico_p50_ms"], g["pico_p99_ms"]],
            [f"bare FastAPI, same work ({what})", _range(g["bare_req_s"]), g["bare_p50_ms"], g["bare_p99_ms"]],
            [f"**ratio, {what}**", _range(g["ratio"]), "", ""],
        ]
    if not rows:
        return f"Registration throughput: not measured ({r['registration']})."
    return _md_table(
        ["PUT /register, 64 connections, 10,000 workers", "req/s median (min-max)", "p50 ms", "p99 ms"], rows
    )


def _md_queries(r: dict[str, Any]) -> str:
    q = r["queries"]
    rows = [
        ["GET /services?tag=x (100 match)", q["http_x100"]],
        ["GET /services?tag=x (5,000 match, first page of 1,000)", q["http_x5000"]],
        ['registry.workers("x") (100 match)', q["in_process"]["in_process_x100"]],
        ['registry.workers("x") (5,000 match)', q["in_process"]["in_process_x5000"]],
    ]
    return _md_table(["query, 10,000 registered", "p50 ms", "p99 ms"], [[k, v["p50_ms"], v["p99_ms"]] for k, v in rows])


def _md_detection(r: dict[str, Any]) -> str:
    d = r["detection"]
    return (
        f"Detection ({d['kills']} SIGKILLs, interval {d['interval_s']} s): time to `unhealthy` p50 {d['p50_s']} s, "
        f"p99 {d['p99_s']} s, max {d['max_s']} s; documented bound {d['documented_bound_s']} s; "
        f"{d['within_bound']} of {d['kills']} within it."
    )


def _md_memory(r: dict[str, Any]) -> str:
    m, naive = r["memory"], r["capacity"]["naive"]
    biggest = max(naive, key=int)
    naive_bytes = round(naive[biggest]["outside"]["rss_mb"] * 2**20 / int(biggest))
    return (
        f"Memory (10,000 workers): {m['bytes_per_worker_registered']:,} bytes per registered worker, "
        f"{m['bytes_per_worker_checked']:,} once each was checked (RSS {m['rss_empty_mb']} MB empty, "
        f"{m['rss_checked_mb']} MB with 10,000); the naive design: {naive_bytes:,} bytes per worker "
        f"(its whole RSS over {int(biggest):,} workers, threads and all)."
    )


def _md_startup(r: dict[str, Any]) -> str:
    u = r["startup"]
    return (
        f"Start-up: `import picoapi` {u['import_picoapi_s']} s against `import fastapi, requests` "
        f"{u['import_fastapi_requests_s']} s (ratio {u['ratio']}; uvicorn imported: {u['uvicorn_imported_by_import_picoapi']}); "
        f"a worker from process start to registered: {u['worker_start_to_registered_s']['median']} s median."
    )


def _md_persistence(r: dict[str, Any]) -> str:
    p = r["persistence"]
    save = p["save_one_registration"]
    runs = p["checker_5000_workers"]
    costs = ", ".join(
        f"{int(n):,} workers: {v['sqlite_row_us']} µs with sqlite, {v['json_file_rewrite_us']:,} µs rewriting a JSON file"
        for n, v in save.items()
    )
    rates = "; ".join(
        f"{mode}: " + ", ".join(f"{x['completed_per_s']:,}/s (p99 {x['p99_ms']} ms)" for x in runs[mode])
        for mode in runs
    )
    return (
        f"Persistence. Saving one registration ({costs}): hence sqlite, one row per PUT or DELETE. The checker at "
        f"5,000 workers with `API_REGISTRY_FILE` and without, interleaved ({rates}): throughput ratio "
        f"{p['throughput_ratio_file_to_memory']} (the limit asked: no more than 10% lower)."
    )


def _md_keepalive(r: dict[str, Any]) -> str:
    runs = r["keepalive"]
    rows = [
        [
            mode,
            x["answered_per_s"],
            x["cpu_us_per_check"],
            x["fake_workers_cpu_share"],
            x["spacing_p99_ms"],
            x["runnable"],
        ]
        for mode in ("kept", "fresh")
        for x in runs[mode]
    ]
    headers = ["10,000 workers at 1 s: connections", "answered/s", "CPU µs per check", "fake workers' cores"]
    return _md_table([*headers, "spacing p99 ms", "runnable"], rows)


def _md_profile(r: dict[str, Any]) -> str:
    lines: list[str] = []
    prof = r["capacity"].get("profile")
    if prof:
        lines += [
            "",
            f"Profile of the checker at 5,000 workers (py-spy, {prof['samples']} samples of the checker's "
            f"thread); self time:",
            "",
            "| function | share |",
            "|---|---|",
        ]
        lines += [f"| `{t['function']}` | {t['share'] * 100:.1f}% |" for t in prof["top_self"]]
    return "\n".join(lines)


def targets(r: dict[str, Any]) -> list[str]:
    """The issues' targets beside the measured figures: met, or the gap."""
    pico = r["capacity"]["pico"]
    cap5, cap10 = pico["5000"], pico["10000"]
    late5 = cap5["inside"]["lateness"]
    gap10 = cap10["outside"]["spacing"]
    silent_late = r["silent"]["lateness_healthy"]
    reg, mem = r["registration"], r["memory"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [
        f"- 10,000 workers at 1 s, every due check lands and each worker's spacing within 20 ms of the interval at "
        f"p99, measured by the fake workers: {verdict(gap10['missed'] == 0 and gap10['deviation']['p99_ms'] <= 20)} "
        f"({gap10['missed']:,} checks missed of {gap10['checks']:,}; deviation p50 {gap10['deviation']['p50_ms']} ms, "
        f"p99 {gap10['deviation']['p99_ms']} ms; {cap10['outside'].get('runnable')} threads runnable on average, "
        f"load {cap10['outside'].get('load')}).",
    ]
    prom = r["capacity"].get("prometheus", {}).get("10000")
    if prom:
        mine, theirs = cap10["outside"]["cpu_us_per_check"], prom["outside"]["cpu_us_per_check"]
        lines.append(
            f"- CPU per check no higher than Prometheus's at 10,000 in the same run: {verdict(mine <= theirs)} "
            f"({mine} µs against {theirs} µs; Prometheus's spacing p99 {prom['outside']['spacing']['deviation']['p99_ms']} ms, "
            f"{prom['outside']['spacing']['missed']:,} missed)."
        )
    lines += [
        f"- 5,000 checks/s sustained with p99 lateness under 20 ms: "
        f"{verdict(cap5['inside']['completed_per_s'] >= 4900 and late5['p99_ms'] < 20)} "
        f"({cap5['inside']['completed_per_s']:,} completed/s of 5,000 due, p99 {late5['p99_ms']} ms).",
        f"- With 10% silent workers, healthy checks' p99 lateness under 20 ms: {verdict(silent_late['p99_ms'] < 20)} "
        f"(p99 {silent_late['p99_ms']} ms).",
        f"- Bytes per worker under 3 KB: {verdict(mem['bytes_per_worker_checked'] < 3072)} "
        f"({mem['bytes_per_worker_registered']:,} registered, {mem['bytes_per_worker_checked']:,} after checks).",
    ]
    for key, what in (
        ("registration", "registering workers that answer"),
        ("registration_dead", "registering addresses where nothing answers"),
    ):
        g = r.get(key, {})
        if "ratio" in g:
            lines.append(
                f"- Registration at 0.9 or better of a bare FastAPI app, {what}: {verdict(g['ratio']['median'] >= 0.9)} "
                f"(median ratio {g['ratio']['median']}, runs from {g['ratio']['min']} to {g['ratio']['max']})."
            )
    return lines


RESULTS_HEAD = """# Benchmark results

Produced by `{command}` on {date}, {elapsed} s in all. Raw figures: `bench/results.json`.
Machine: {cores} cores ({cpu}), Python {python}, {platform}; {packages}.

Every comparison ran both sides in this same run, one after the other at each size
(interleaved), and the machine is shared (other test runs: the threads runnable over
each window, and the 1-minute load, are in the table), so single figures carry noise:
the registration runs are repeated (median and range), capacity is read once per second
(range over the window); a section measured again separately is named at the end of
"What limits it".
All traffic stayed on 127.0.0.1.

How capacity is measured: simulated workers are asyncio processes
(`bench/fake_workers.py`, 2,500 ports each) that answer `200` with an empty body, keep
connections open as uvicorn does, count the checks they answer and record each port's
arrival times. They run without garbage collection: a collection paused one of them up to 73 ms
(`python bench/spacing_gc.py`, PicoAPI at 10,000 workers), stamping the arrivals of all its 2,500 ports
late at once, where real workers would each pause alone; with collections PicoAPI's spacing p99 read
41.8 ms, without them 14.2 ms (and 49.7 against 20.8 ms in an earlier pair of runs). Every contender is measured from outside the same way: checks answered
per second, the spacing of each worker's consecutive checks against the 1 s interval
(its deviation, and checks missed: gaps of two intervals or more), CPU, RSS and threads
of the checker process and CPU of the fake workers (from /proc). The workers register
spread evenly over one interval, as workers starting at different moments do ("burst":
all at once). Lateness (fire time minus due time) is reported by PicoAPI itself.
Prometheus is Debian's, our own instance (own config, data dir and port) scraping the
same fake workers every second.

## Targets

{targets}

## What limits it

- At 10,000 workers the checker completed {p10_done} checks per second using {p10_cores}
  of a core ({p10_cpu} µs per check; Prometheus: {prom_cpu} µs), and the fake workers used
  {p10_fake} of a core answering them. The checker's thread and the fake workers share the
  2 cores with the other test runs ({p10_load}): the checker's process spent {p10_wait} of the
  window runnable but waiting for a core (the kernel's schedstat). While it waits, due checks
  wait, and the next step fires them in a bigger batch, which shows as spacing deviation and,
  for a check whose predecessor has not been answered yet, as a missed check. CPU per check is
  what the design controls; the spacing follows from the CPU the machine leaves it.
- Registration: every new registration is verified and checked at once by the checker in the supervisor's
  own process, so `PUT /register` shares the process with those checks. The benchmark now registers 10,000
  workers that answer their checks (fake workers on the registered ports), as honest workers are alive when
  they register; until this run they pointed where nothing answers, so each new one was re-checked at 1, 2
  and 4 s. Both figures are in the table, each against bare FastAPI measured beside it.
- The naive design (a thread per worker) fell behind already at 1,000 workers ({n1_done}
  checks/s of 1,000, p50 lateness {n1_p50} s) and at 5,000 and 10,000 its threads starved
  each other and its own main thread: {n5_ans} and {n10_ans} checks/s answered, {n10_cores}
  cores burnt.
- The run took {elapsed} s. {reruns}

## Figures

{tables}
"""


def limits(r: dict[str, Any]) -> dict[str, Any]:
    """The figures the 'What limits it' paragraph quotes, from this run."""
    pico, naive = r["capacity"]["pico"], r["capacity"]["naive"]
    prom = r["capacity"].get("prometheus", {}).get("10000", {}).get("outside", {})
    return {
        "p10_done": f"{pico['10000']['inside']['completed_per_s']:,}",
        "p10_cores": pico["10000"]["outside"]["cpu_share"],
        "p10_cpu": pico["10000"]["outside"]["cpu_us_per_check"],
        "p10_fake": pico["10000"]["outside"].get("fake_workers_cpu_share", "?"),
        "p10_wait": pico["10000"]["outside"].get("waited_for_a_core", "?"),
        "p10_load": f"{pico['10000']['outside'].get('runnable')} threads runnable on average",
        "prom_cpu": prom.get("cpu_us_per_check", "not measured"),
        "n1_done": naive["1000"]["inside"].get("completed_per_s", "?"),
        "n1_p50": round(naive["1000"]["inside"].get("lateness", {}).get("p50_ms", float("nan")) / 1000, 1),
        "n5_ans": naive["5000"]["outside"]["answered_per_s"],
        "n10_ans": naive["10000"]["outside"]["answered_per_s"],
        "n10_cores": naive["10000"]["outside"]["cpu_share"],
    }


def write_report(results: dict[str, Any], path: str) -> str:
    """Write RESULTS.md from the figures; returns the tables."""
    report = markdown(results)
    m = results["machine"]
    try:
        target_lines = targets(results)
    except (KeyError, TypeError) as exc:
        target_lines = [f"- not all figures were measured ({exc!r}); see the tables"]
    try:
        figures = limits(results)
    except (KeyError, TypeError):  # a section that failed: its figures read "?"
        figures = {}

    class Unknown(dict[str, Any]):
        def __missing__(self, key: str) -> str:
            return "?"

    with open(path, "w") as out:
        out.write(
            RESULTS_HEAD.format_map(
                Unknown(
                    command=results["command"],
                    date=time.strftime("%Y-%m-%d"),
                    elapsed=results.get("elapsed_s", "?"),
                    cores=m["cores"],
                    cpu=m["cpu"],
                    python=m["python"],
                    platform=m["platform"],
                    packages=", ".join(f"{k} {v}" for k, v in m["packages"].items()),
                    targets="\n".join(target_lines),
                    reruns=" ".join(f"Measured separately: {x}." for x in results.get("reruns", [])),
                    **figures,
                    tables=report,
                )
            )
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about 1.5 minutes), to try the benchmark")
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--report", metavar="RESULTS_JSON", help="only write RESULTS.md again from saved figures")
    parser.add_argument("--only", metavar="SECTION", help="measure one section again into the saved results")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as saved:
            write_report(json.load(saved), os.path.join(HERE, "RESULTS.md"))
        return
    raise_nofile()
    started = time.monotonic()
    seconds = 4 if args.quick else 20
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python bench/run.py" + (" --quick" if args.quick else ""),
    }
    sections = {
        "capacity": lambda: capacity(seconds, [1000, 5000, 10000], profile=True),
        "silent": lambda: silent(seconds),
        "registration": lambda: registration(3 if args.quick else 10, 4),
        "registration_dead": lambda: registration(3 if args.quick else 10, 4, answering=False),
        "queries": queries,
        "detection": lambda: detection(8 if args.quick else 20),
        "memory": memory,
        "startup": startup,
        "persistence": persistence,  # the supervisor issue's figure: only with --only persistence
        "keepalive": keepalive,  # the scheduling issue's figure: only with --only keepalive
    }
    if not args.only:
        del sections["persistence"], sections["keepalive"]
    if args.only:  # one section again, into the figures of the last full run
        with open(args.out) as saved:
            results = json.load(saved)
        results.setdefault("reruns", []).append(
            f"{args.only}, with `python bench/run.py --only {args.only}`, on {time.strftime('%Y-%m-%d %H:%M')}"
        )
        sections = {args.only: sections[args.only]}
    for name, measure in sections.items():
        try:
            results[name] = measure()
        except Exception as exc:  # one broken section must not lose the others' figures
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)
    if not args.only:
        results["elapsed_s"] = round(time.monotonic() - started)
    with open(args.out, "w") as out:
        json.dump(results, out, indent=2)
    results = json.loads(json.dumps(results))  # the report reads the saved figures' form: keys are strings
    print(write_report(results, os.path.join(HERE, "RESULTS-quick.md" if args.quick else "RESULTS.md")))
    log(f"done in {results['elapsed_s']} s; raw figures in {args.out}")


if __name__ == "__main__":
    main()
