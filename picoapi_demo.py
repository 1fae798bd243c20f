"""The live demo of PicoAPI: a supervisor and three workers on 127.0.0.1, started as a user would start them.

``picoapi demo`` hands out a task per tag, kills a worker and shows the supervisor detecting it, restarts it and
stops everything by itself, leaving no process and no file behind. ``picoapi worker picoapi_demo:worker`` runs one
of its workers (``API_TITLE`` upper, reverse or count). It ships beside picoapi.py: ``pip install picoapi``, or copy
both files into a project.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import requests

import picoapi
from picoapi import (
    DASHBOARD_ROUTE,
    MAX_INTERVAL,
    MIN_INTERVAL,
    REGISTER_ROUTE,
    UNHEALTHY,
    ConfigError,
    PicoAPI,
    PicoAPIError,
    _print_status,
    _printable,
    _root_cause,
    _services,
    _wait_for,
)

#: The demo's workers, by title (tagged 'text' and their title): what their /work does to a text, and its task.
_DEMO_WORKERS: dict[str, tuple[Callable[[str], str], str]] = {
    "upper": (str.upper, "hello picoapi"),
    "reverse": (lambda text: text[::-1], "stressed"),
    "count": (lambda text: str(len(text.split())), "a b c d"),
}


def worker() -> PicoAPI:
    """The demo's worker app (a factory: ``picoapi worker picoapi_demo:worker``)."""
    app = PicoAPI()
    if (title := app.config.title or "upper") not in _DEMO_WORKERS:
        raise ConfigError(f"API_TITLE must name one of the demo's workers ({', '.join(_DEMO_WORKERS)}), got {title!r}")
    transform = _DEMO_WORKERS[title][0]

    @app.get("/work")
    def work(text: str) -> dict[str, str]:
        return {"worker": app.title, "result": transform(text)}

    return app


def _die_with_parent() -> None:
    """Runs in each demo child: on Linux, the kernel kills it when the demo dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def run(args: argparse.Namespace) -> int:
    """``picoapi demo --interval S --pace S``; returns the exit code (130 when interrupted)."""
    started, interval, pace = time.monotonic(), args.interval, args.pace
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL or not 0 <= pace <= 3600:  # NaN fails both
        raise ConfigError(
            f"--interval must be {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds and --pace 0 to 3600, "
            f"got --interval {interval!r} --pace {pace!r}"
        )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    for name in ("supervisor", *_DEMO_WORKERS):  # free ports
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{ports['supervisor']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}  # each side reads its own file

    def say(text: str) -> float:
        print(f"[{time.monotonic() - started:5.1f}s] {text}", flush=True)
        return time.monotonic()

    def start(name: str) -> None:
        """``picoapi supervisor|worker --env-file NAME.env``: each side with its own settings, as a user starts it."""
        path, command = os.path.join(workdir, name), ["supervisor"]
        settings = f"API_BIND=127.0.0.1\nAPI_PORT={ports[name]}\n"
        if name in _DEMO_WORKERS:
            command = ["worker", "picoapi_demo:worker"]
            settings += f"API_HOST=127.0.0.1\nAPI_TITLE={name}\nAPI_TAGS=text:{name}\nAPI_HEALTH_INTERVAL={interval}\n"
            settings += f"API_REGISTER_PATH={url}{REGISTER_ROUTE}\n"
        with open(path + ".env", "w") as env_file:
            env_file.write(settings)
        # picoapi.py by its path: its folder comes first on the child's sys.path, so a copy vendored into a project
        # (with this file beside it) is the picoapi the child imports, installed or not.
        argv = [sys.executable, os.path.abspath(picoapi.__file__), *command, "--env-file", path + ".env"]
        preexec = _die_with_parent if sys.platform == "linux" else None
        with open(path + ".log", "ab") as log:
            procs[name] = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=log, preexec_fn=preexec)

    def alive() -> None:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise PicoAPIError(f"the demo's {name} process exited (the end of its log is above)")

    # SIGTERM and SIGHUP (its terminal closed) stop it as Ctrl-C does: its directory goes too.
    stops = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {stop: signal.signal(stop, signal.default_int_handler) for stop in stops}
    try:
        with tempfile.TemporaryDirectory(prefix="picoapi-demo-") as workdir:
            try:
                say(f"supervisor starting: dashboard {url}{DASHBOARD_ROUTE} (open it now), API docs {url}/docs")
                for name in ports:
                    start(name)
                for e in _wait_for(url, ["text"], len(_DEMO_WORKERS), 30, alive=alive):
                    name, wid, tags = _printable(e["name"]), _printable(e["id"]), _printable(",".join(e["tags"]))
                    say(f"registered: {name:<8} {wid:<16} tags={tags:<14} {e['status']}")
                time.sleep(pace)  # time to look at the dashboard between steps
                for tag, (_, text) in _DEMO_WORKERS.items():
                    # A check may just have failed on a busy machine: one good check brings a worker back.
                    found = _wait_for(url, ["text", tag], 1, 2 + 10 * interval, alive=alive)[0]
                    try:  # within 2 s in all, 64 KiB at most: whatever answers there
                        work = f"http://{found['id']}/work"
                        _, body = picoapi._bounded_request(
                            picoapi._Cuttable(), "GET", work, 2, 2**16, params={"text": text}
                        )
                        result = picoapi._json(body or b"")["result"]
                    except (requests.RequestException, LookupError, TypeError) as exc:
                        raise PicoAPIError(f"the demo's {tag!r} worker did not answer: {_root_cause(exc)}") from None
                    who, said = _printable(found["name"]), _printable(repr(result))
                    say(f"task tag={tag:<8} {text!r:<16} -> {who:<8} answered {said}")
                time.sleep(pace)
                since = say("killing worker 'reverse' (SIGKILL)")
                (killed := procs.pop("reverse")).kill()
                killed.wait()
                _wait_for(url, ["reverse"], 1, 15, UNHEALTHY, alive)
                took = time.monotonic() - since
                say(f"supervisor marked 'reverse' unhealthy after {took:.2f}s (interval {interval:g}s)")
                time.sleep(pace * 1.5)
                since = say("restarting worker 'reverse'")
                start("reverse")
                _wait_for(url, ["reverse"], 1, 20, alive=alive)
                say(f"'reverse' is healthy again after {time.monotonic() - since:.2f}s")
                time.sleep(pace)
                say(f"the registry now (same as 'picoapi status {url}'):")
                _print_status(_services(url, (), 5.0)[0])
                say("stopping everything")
            except PicoAPIError:  # the logs go with the directory: show how each process ended
                for name in sorted(procs):
                    with open(os.path.join(workdir, name + ".log"), errors="replace") as log:
                        tail = log.readlines()[-5:]
                    sys.stdout.writelines(f"[{name}] {_printable(line.rstrip())}\n" for line in tail)
                raise
            finally:  # SIGTERM, and the workers deregister; SIGKILL to any still there 5 s later
                for proc in procs.values():
                    proc.terminate()
                killed_at = time.monotonic() + 5
                for proc in procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(max(0.0, killed_at - time.monotonic()))
                    proc.kill()  # no signal once it has ended
                    proc.wait()
    except KeyboardInterrupt:
        say("interrupted: stopped everything")
        return 130
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    say("done: no process left behind")
    return 0
