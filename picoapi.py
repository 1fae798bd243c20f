"""PicoAPI: FastAPI with service registration and health checking built in.

One class, two modes: workers register themselves with a supervisor, and the supervisor health-checks them and
knows which healthy worker can do what. A worker (``API_HOST``, ``API_TITLE`` and ``API_REGISTER_PATH`` set)::

    from picoapi import PicoAPI
    app = PicoAPI(tags=["resize", "png"])  # registers with the supervisor on start

    @app.get("/resize")
    def resize(width: int) -> dict:
        return {"width": width}

A supervisor (``PUT /register``, ``GET /services``, health checks)::

    app = PicoAPI(mode="supervisor")
    resizers = app.registry.workers("resize", status="healthy")  # in a route: who can resize now

Run either with ``uvicorn module:app`` or ``picoapi worker module:app`` / ``picoapi supervisor``.
Dependencies: fastapi, uvicorn, requests, python-dotenv. Licence: MIT.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import email.utils
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import http.client
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import selectors
import socket
import sqlite3
import ssl
import sys
import threading
import time
import typing
import unicodedata
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, NamedTuple, TypeGuard
from urllib.parse import quote, unquote, urlsplit

import requests
import requests.adapters
import urllib3
from dotenv import dotenv_values
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import AfterValidator, BaseModel, Field, TypeAdapter, ValidationError, create_model, model_validator
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PicoAPI", "Config", "Registration", "HealthSpec", "Worker", "Registry", "HealthChecker", "CheckResult"]
__all__ += ["Registrar", "PicoAPIError", "ConfigError", "RegistrationError", "RegistryFull", "NoWorkerAvailable"]
__all__ += ["check_once", "worker_id", "main"]

__version__ = "2.0.0"

# -- Defaults ----------------------------------------------------------------

DEFAULT_MODE, DEFAULT_PORT, DEFAULT_DESCRIPTION, DEFAULT_VERSION = "worker", 8888, "a brief description", "0.0.1"
DEFAULT_HEALTH_PATH, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_FAILURES, DEFAULT_HEALTH_SUCCESSES = "/health", 300.0, 2, 1
DEFAULT_HEALTH_TIMEOUT = 10.0  #: a check's deadline when the worker names none: min(interval, this)
DEFAULT_CORS, DEFAULT_REGISTER_TIMEOUT, DEFAULT_MAX_WORKERS = ("*",), 30.0, 10_000
DEFAULT_WATCHDOG_INTERVALS = 3  #: intervals without a check before a worker asks the supervisor if it still checks
SELF_CHECK_AFTER = 2.0  #: a worker GETs its own registered health URL this long after startup (at most an interval)

MIN_INTERVAL, MAX_INTERVAL, MAX_ERROR, MAX_BODY = 0.05, 86_400.0, 200, 64 * 1024
MAX_NAME, MAX_VERSION, MAX_TAG, MAX_TAGS, MAX_DESCRIPTION, MAX_HOST, MAX_URL = 128, 64, 64, 32, 1024, 253, 2048
_INSTANCE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_INSTANCES = 16  #: processes remembered per entry (siblings on one port, restarts); the oldest are forgotten
STARTUP_GRACE = 10.0  #: a new worker's checks may fail this long (at most an interval): its server is starting

REGISTER_ROUTE, SERVICES_ROUTE, DASHBOARD_ROUTE = "/register", "/services", "/dashboard"
SERVICES_PAGE = 1000  #: GET /services' default and largest ``limit``: a registry of 1,000 in one answer, ~6 MB at most
DASHBOARD_REFRESH, DASHBOARD_PAGE = 2, 200  #: seconds between dashboard updates (no reload); rows a page shows
SUPERVISOR_HEADER, INSTANCE_HEADER = "X-PicoAPI-Supervisor", "X-PicoAPI-Instance"  #: the latter: who answered a check
STATUSES = (HEALTHY, UNHEALTHY, UNKNOWN) = ("healthy", "unhealthy", "unknown")

BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  #: registration attempts wait base * 2**attempt, capped, jittered
_ATTEMPTS_AT_CAP = math.ceil(math.log2(BACKOFF_CAP / BACKOFF_BASE))
DEREGISTER_TIMEOUT = 2.0  #: the longest deregistration holds shutdown
MAX_RESOLVING = 4  #: registrations' host names resolved, live-process checks before a PUT or DELETE, at once (503)
STORE_TIMEOUT = 1.0  #: seconds a registration waits for a busy registry file before answering 503
DEFAULT_CALL_TIMEOUT = 10.0  #: seconds app.call() and app.broadcast() wait for a worker unless told otherwise
OPENAPI_TIMEOUT, OPENAPI_MAX_BYTES, OPENAPI_MAX_FETCHES = 5.0, 1024 * 1024, 4  #: bounds of GET /services/{id}/openapi
STATUS_MAX_PAGES = 100  #: GET /services pages ``picoapi status`` reads at most, whatever it is told (100,000 workers)

logger = logging.getLogger("picoapi")

# -- Exceptions --------------------------------------------------------------


class PicoAPIError(Exception):
    """The root of every error PicoAPI raises."""


class ConfigError(PicoAPIError, ValueError):
    """A configuration value is missing or malformed; the message names it."""


class RegistrationError(PicoAPIError, ConnectionError):
    """A worker could not register with a supervisor."""


class RegistryFull(PicoAPIError, OverflowError):
    """The supervisor already holds ``API_MAX_WORKERS`` workers."""


class NoWorkerAvailable(PicoAPIError, LookupError):
    """No healthy worker has the tags, or none of those tried answered; raised in a route, a 503 naming the tags."""

    def __init__(self, tags: Sequence[str], version: str | None = None, tried: Sequence[tuple[str, str]] = ()) -> None:
        #: The tags and version asked for, and each worker tried with why it failed.
        self.tags, self.version, self.tried = list(tags), version, list(tried)
        wanted = f"tags {self.tags}" + (f" and version {version!r}" if version else "")
        why = "; ".join(f"{wid}: {reason}" for wid, reason in self.tried)
        super().__init__(f"no healthy worker with {wanted}" + (f" could be reached (tried {why})" if why else ""))


# -- Helpers -----------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Never in text: controls, formats (bidi, zero-width), surrogates, line breaks: they rewrite terminals, spoof names.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _printable(text: object, limit: int = MAX_ERROR) -> str:
    """``text`` cut to ``limit`` characters, anything unprintable escaped: safe for a terminal or a log."""
    text = str(text)[:limit]
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _bracketed(host: str) -> str:
    """``host`` as a URL or a Host header writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _normal_host(host: str) -> str:
    """``host`` as the registry keeps it: lower case, an IPv6 address without brackets."""
    return host.strip("[]").lower()


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 address as IPv4), or None."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(text or "")
        return getattr(ip, "ipv4_mapped", None) or ip
    return None


def _resolve(host: str) -> str:
    """The IP address ``host`` names (blocking); raises ValueError naming the host."""
    try:
        return host if _ip(host) else str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({_printable(exc)}); use an IP address or fix DNS") from exc


def _check_text(what: str, text: str, error: type[ValueError] = ValueError) -> str:
    """``text``, if it holds no :data:`_HIDDEN` character (most text passes isprintable(), in C); else ``error``."""
    at = -1 if text.isprintable() else next((i for i, c in enumerate(text) if unicodedata.category(c) in _HIDDEN), -1)
    if at >= 0:
        hint = "must not contain control, format or line-separator characters; remove the"
        raise error(f"{what} {hint} U+{ord(text[at]):04X} at index {at}, got '{_printable(text)}'")
    return text


def _check_health_url(what: str, url: str, error: type[ValueError] = ValueError) -> str:
    """``url`` (or a path alone), if ASCII without query or fragment: a health check is a path, sent byte for byte."""
    origin = "" if url.startswith("/") else "{0.scheme}://{0.netloc}".format(urlsplit(url))
    path = url[len(origin) :]
    fixed = quote(re.split("[?#]", path)[0], safe="/%:@!$&'()*+,;=")  # RFC 3986's path characters and %XX stay
    if fixed != path:
        hint = f"must be an ASCII path without ?query or #fragment; percent-encode it: '{origin}{fixed}'"
        raise error(f"{what} {hint}, got '{_printable(url)}'")
    if not url.isascii():  # the host as well: 'K' (U+212A, Kelvin sign) lower-cases to an ASCII 'k'
        raise error(f"{what} must be ASCII, got '{_printable(url)}'")
    return url


def _check_tag(what: str, tag: str, error: type[ValueError] = ValueError) -> str:
    """``tag``, if it is a valid tag; else ``error`` naming ``what``: 'API_TAGS items', 'each tag'."""
    if not 1 <= len(tag) <= MAX_TAG or not re.match(r"^[^\s:,]+$", tag):  # ',' joins tags in Prometheus' labels
        raise error(f"{what} must be 1 to {MAX_TAG} characters without spaces, ':' or ',', got '{_printable(tag)}'")
    return _check_text(what, tag, error)


def _is_whole(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 12  # not '²', not 5,000 digits


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors behind it (requests wraps urllib3, which wraps OSError)."""
    chain = [exc]
    for last in chain:  # it grows while read, by one at most
        inner = getattr(last, "reason", None) or last.__cause__ or last.__context__ or (last.args or [None])[0]
        if isinstance(inner, BaseException) and inner not in chain and len(chain) < 10:
            chain.append(inner)
    return chain


def _root_cause(exc: BaseException) -> str:
    """The innermost error, e.g. 'ConnectionRefusedError: [Errno 111] Connection refused'; a cut says why it was."""
    causes = _causes(exc)  # a protocol error anywhere in it (a bad chunk size ends in ValueError) quotes the far end
    bad = next((e for e in causes if isinstance(e, http.client.HTTPException) and not isinstance(e, OSError)), None)
    said = "a malformed HTTP answer" if bad else causes[-1]  # its words (BadStatusLine: 'SSH-2.0-...'): not ours
    return str(exc) if isinstance(exc, _Cut) else f"{type(bad or causes[-1]).__name__}: {said}"


def _json(content: bytes) -> Any:
    """The JSON in ``content``, or None: a far end may send anything (60,000 deep, 5,000-digit numbers, NaN)."""
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(content, parse_constant=int)  # int('NaN'), int('Infinity'): ValueError
    return None


class _Cut(requests.Timeout):
    """A request cut at its deadline or by stop(); the message says which."""


class _CutConnection(urllib3.connection.HTTPConnection):
    """Hands :attr:`cuttable` a duplicate of its socket, which another thread can shut down even once TLS wraps it."""

    cuttable: _Cuttable

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.cuttable.socks.append(sock.dup())
        if self.cuttable.is_cut:  # opened after the cut: it must carry no request
            self.cuttable.cut()
        return sock


class _Cuttable(requests.adapters.HTTPAdapter):
    """An adapter whose connections another thread can :meth:`cut`: requests' timeout bounds a read, not an answer."""

    def __init__(self) -> None:
        super().__init__()  # no retries
        self._lock = threading.Lock()  # cut() never shuts a descriptor close() freed (and another socket reused)
        self.socks: list[socket.socket] = []  # a connection appends, then reads is_cut; cut() sets it, then reads
        self.is_cut = False

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> urllib3.connectionpool.ConnectionPool:
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        if isinstance(pool, urllib3.HTTPConnectionPool) and not issubclass(pool.ConnectionCls, _CutConnection):
            pool.ConnectionCls = type("_CutConnection", (_CutConnection, pool.ConnectionCls), {"cuttable": self})
        return pool

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        super().close()
        with self._lock:
            for sock in self.socks:
                sock.close()


def _bounded_request(
    adapter: _Cuttable, method: str, url: str, timeout: float, limit: int, **kwargs: Any
) -> tuple[requests.Response, bytes | None]:
    """One request, no redirects, cut (:class:`_Cut`) after ``timeout`` s: answer and body (None over ``limit``)."""
    timer = threading.Timer(timeout, adapter.cut)
    timer.name, timer.daemon = "picoapi-deadline", True
    timer.start()
    try:
        with requests.Session() as session:
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with session.request(method, url, timeout=timeout, allow_redirects=False, stream=True, **kwargs) as resp:
                content = b""
                for chunk in resp.iter_content(64 * 1024):
                    if len(content := content + chunk) > limit:
                        return resp, None
                return resp, content
    except requests.RequestException as exc:
        if adapter.is_cut:
            raise _Cut(f"timed out: no complete answer within {timeout:g}s") from exc
        raise
    finally:
        timer.cancel()
        timer.join()


# -- Configuration -----------------------------------------------------------

_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.%a-zA-Z0-9]+\]|[A-Za-z0-9._:%-]+)$")
_ALLOWED_HOST_RE = re.compile(r"\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
_env_file_instead: str | None = None  #: ``picoapi supervisor|worker --env-file``'s file, read instead of ./.env
_log_once = functools.cache(logger.warning)  #: Python hides DeprecationWarning outside __main__, under uvicorn too


def _parse_number(var: str, raw: object, low: float, high: float, off: bool = False) -> Any:
    """A whole number from ``low`` to ``high`` if they are ints, else seconds; with ``off``, 'off', 0 or blank: None."""
    text, whole = str(raw).strip().lower(), isinstance(low, int)
    if off and text in ("", "off", "none", "0"):
        return None
    with contextlib.suppress(ValueError):  # float() refuses '²'; 'nan' and 'inf' are in no range
        value = (int(text) if _is_whole(text) else math.nan) if whole else float(text)
        if not isinstance(raw, bool) and low <= value <= high:
            return value
    kind = "a whole number" if whole else "a number of seconds"
    raise ConfigError(f"{var} must be {kind} from {low:.10g} to {high:.10g}, got {raw!r}")


def _parse_choice(var: str, raw: object, choices: Mapping[str, Any] = _BOOLS) -> Any:
    """What ``choices`` maps ``raw`` to, case aside; by default a boolean."""
    if (value := choices.get(str(raw).strip().lower())) is None:
        hint = "true or false (1/0, yes/no, on/off)" if choices is _BOOLS else " or ".join(map(repr, choices))
        raise ConfigError(f"{var} must be {hint}, got {raw!r}")
    return value


def _parse_text(var: str, raw: object, kind: str = "text", limit: int = 4096) -> Any:
    """``raw`` (a setting or a list's item) stripped, checked as ``kind``; else a ConfigError: variable, value, fix."""
    text = str(raw).strip()
    match kind:
        case "text" if 0 < len(text) <= limit:
            return _check_text(var, text, ConfigError)
        case "line":  # FastAPI descriptions are often Markdown over several lines, the registration's copy is one line
            return _check_text(var, re.sub(r"[\t\r\n]+", " ", text)[:limit], ConfigError)
        case "host" if len(text) <= MAX_HOST and _HOST_RE.match(text):
            return _normal_host(text)
        case "path" if text.startswith("/") and len(text) <= 512:
            return _check_health_url(var, text, ConfigError)
        case "tag":
            return _check_tag(f"{var} items", text, ConfigError)
        case "url":
            with contextlib.suppress(ValueError):  # urlsplit() and .port raise on a malformed IPv6 address or port
                parts = urlsplit(text)
                if parts.scheme in ("http", "https") and parts.hostname and text.isprintable() and parts.port != 0:
                    return text
        case "network":
            with contextlib.suppress(ValueError):
                return ipaddress.ip_network(text, strict=False)
        case "allowed host":  # as Starlette's TrustedHostMiddleware compares a Host header: lower case, IPv6 in []
            host = f"[{text.lower()}]" if ":" in text and _ip(text) is not None else text.lower()
            if _ALLOWED_HOST_RE.fullmatch(host) and (host[0] != "[" or _ip(host[1:-1]) is not None):
                return host
    fix = {
        "text": f"be 1 to {limit} printable characters",
        "host": "be a host name or IP address such as 'localhost' or '10.0.0.5'",
        "path": "be a path starting with '/', such as '/health'",
        "url": "be an http:// or https:// URL such as 'http://keeper:8100/register'",
        "network": "list networks such as '10.0.0.0/8!fd00::/8'",
        "allowed host": "list hosts without scheme or port ('keeper!10.0.0.5!*.internal')",
    }
    raise ConfigError(f"{var} must {fix[kind]}, got {raw!r}")


def _parse_token(var: str, raw: object) -> str | None:
    # Never echo the value: it is a secret. Empty is unset; a blank one would silently turn authentication off.
    text = raw if isinstance(raw, str) else " "
    if text and (len(text) > 4096 or not (text.isascii() and text.isprintable()) or text != text.strip()):
        kubectl = "a file from `kubectl create secret --from-file` keeps its final newline: strip it"
        rule = f"{var} must be 1 to 4096 printable ASCII characters with no whitespace around them ({kubectl})"
        raise ConfigError(f"{rule}; the value is not shown")
    return text or None


def _parse_list(var: str, raw: object, sep: str, kind: str = "", most: int = 0) -> tuple:
    """A ``sep``-delimited string or a list; each item checked as ``kind`` by :func:`_parse_text`, at most ``most``."""
    if not isinstance(raw, (str, list, tuple, set, frozenset)):
        raise ConfigError(f"{var} must be a {sep!r}-delimited string or a list of strings, got {raw!r}")
    items = tuple(i.strip() for i in (raw.split(sep) if isinstance(raw, str) else map(str, raw)) if i.strip())
    if most and len(items) > most:
        raise ConfigError(f"{var} may list at most {most} items, got {len(items)}")
    return tuple(_parse_text(var, item, kind) for item in items) if kind else items


class _Setting(NamedTuple):
    """A row of the settings table (see :class:`Config`); ``old``, an older name of ``var``, is still read. ``parse(var,
    raw, *bounds)`` takes a string or any keyword; bad input is a ConfigError naming the variable, value and fix."""

    var: str
    parse: Callable[..., Any]
    bounds: tuple[Any, ...]
    help: str
    old: str | None = None


def _setting(default: Any, help: str, parse: Callable[..., Any], *bounds: Any, var: str = "", old: str = "") -> Any:
    """A :class:`Config` field that is a setting (a row of its table); ``var`` defaults to API_ and its name."""
    row = _Setting(var, parse, bounds, help, old or None)
    return dataclasses.field(default=default, repr=parse is not _parse_token, metadata={"setting": row})  # a secret


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a PicoAPI app, parsed and validated. A field's name is its keyword (``port=8080``) and, as
    ``API_PORT``, its variable. :meth:`load` reads, by precedence: keywords, the environment, ``.env``, the defaults."""

    mode: str = _setting(DEFAULT_MODE, "its role", _parse_choice, {"worker": "worker", "supervisor": "supervisor"})
    host: str | None = _setting(None, "the host the supervisor reaches this API at", _parse_text, "host")
    port: int = _setting(DEFAULT_PORT, "the port of the API", _parse_number, 1, 65535)
    bind: str | None = _setting(None, "the interface the command line binds to", _parse_text, "host")
    title: str | None = _setting(None, "the service's name (FastAPI's title)", _parse_text, "text", MAX_NAME)
    description: str = _setting(DEFAULT_DESCRIPTION, "FastAPI's description", _parse_text, "line", MAX_DESCRIPTION)
    version: str = _setting(DEFAULT_VERSION, "its version", _parse_text, "text", MAX_VERSION)
    register_urls: tuple[str, ...] = _setting(
        (), "where to register", _parse_list, "!", "url", var="API_REGISTER_PATH", old="API_KEEPER_URL"
    )
    health_path: str = _setting(DEFAULT_HEALTH_PATH, "the path the supervisor checks", _parse_text, "path")
    health_interval: float = _setting(DEFAULT_HEALTH_INTERVAL, "gap", _parse_number, MIN_INTERVAL, MAX_INTERVAL)
    health_timeout: float | None = _setting(None, "a check's deadline", _parse_number, 0.01, MAX_INTERVAL)
    tags: tuple[str, ...] = _setting((), "what it does, for discovery", _parse_list, ":", "tag", MAX_TAGS)
    cors_allow_origins: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed origins", _parse_list, "!")
    cors_allow_methods: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed methods", _parse_list, "!")
    cors_allow_headers: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed headers", _parse_list, "!")
    cors_allow_credentials: bool = _setting(False, "CORS credentials: needs listed origins", _parse_choice)
    allowed_hosts: tuple[str, ...] = _setting((), "the Host headers served", _parse_list, "!", "allowed host")
    register_token: str | None = _setting(None, "the token registrations carry", _parse_token)
    register_networks: tuple[IPNetwork, ...] = _setting((), "claimable networks (NAT)", _parse_list, "!", "network")
    register_timeout: float = _setting(DEFAULT_REGISTER_TIMEOUT, "startup's wait", _parse_number, 0.0, 3600.0)
    register_required: bool = _setting(False, "fail startup unless registered", _parse_choice)
    max_workers: int = _setting(DEFAULT_MAX_WORKERS, "the registry's cap", _parse_number, 1, 10_000_000)
    registry_file: str | None = _setting(None, "a sqlite file keeping the registrations", _parse_text)
    deregister_after: float | None = _setting(None, "gone after", _parse_number, MIN_INTERVAL, 10 * MAX_INTERVAL, True)
    health_failures: int = _setting(DEFAULT_HEALTH_FAILURES, "failures to be unhealthy", _parse_number, 1, 100)
    health_successes: int = _setting(DEFAULT_HEALTH_SUCCESSES, "successes to recover", _parse_number, 1, 100)
    #: The fields set by a keyword, the environment or the .env file (not by FastAPI's title= and the like).
    configured: frozenset[str] = frozenset()

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> Config:
        """Read and validate the configuration; raises :class:`ConfigError`. ``env_file`` is read without touching
        ``os.environ``; ``.env`` (the default) may be absent, any other path given must exist."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        sources = [dict(os.environ if environ is None else environ), _read_env_file(env_file)]
        _from_1x(overrides, sources)
        if unknown := sorted(overrides.keys() - _SETTINGS.keys()):
            raise ConfigError(_unknown_settings(unknown))
        values: dict[str, Any] = {}
        for name, setting in _SETTINGS.items():
            raw = overrides.get(name)
            if raw is None:  # each source under the name, then the old name; blank is unset (a blank token, an error)
                found = (s.get(v) for s, v in itertools.product(sources, (setting.var, setting.old)) if v)
                raw = next((r for r in found if r and (r.strip() or setting.parse is _parse_token)), None)
            if raw is not None:
                values[name] = setting.parse(setting.var, raw, *setting.bounds)
        return cls(**values, configured=frozenset(values))

    def __post_init__(self) -> None:
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ConfigError("API_CORS_ALLOW_CREDENTIALS=true needs explicit origins, got API_CORS_ALLOW_ORIGINS='*'")
        host, allowed = _bracketed(self.host or ""), self.allowed_hosts
        if host and allowed and not any(host == h or (h[0] == "*" and host.endswith(h[1:])) for h in allowed):
            raise ConfigError(f"API_ALLOWED_HOSTS must list API_HOST ('{self.host}'), the Host health checks send")
        if (timeout := self.health_timeout or 0) > (interval := self.health_interval):
            raise ConfigError(f"API_HEALTH_TIMEOUT ({timeout:g}) must not exceed API_HEALTH_INTERVAL ({interval:g})")

    @property
    def health_url(self) -> str:
        """The address the supervisor calls: host, port and health path."""
        return f"http://{_bracketed(self.host or '')}:{self.port}{self.health_path}"

    @property
    def health_route(self) -> str:
        """The health path as the app's router sees it: percent-decoded, as servers decode request paths."""
        return unquote(self.health_path)

    def registration(self) -> dict[str, Any]:
        """The JSON body a worker sends to ``PUT /register``; raises :class:`ConfigError` naming what is unset."""
        if missing := [_SETTINGS[f].var for f in ("host", "title") if not getattr(self, f)]:
            raise ConfigError(f"{', '.join(missing)} must be set for a worker to register")
        body = dict(name=self.title, host=self.host, port=self.port, version=self.version, tags=list(self.tags))
        health = dict(url=self.health_url, interval=self.health_interval, timeout=self.health_timeout)
        return body | {"description": self.description, "health": {k: v for k, v in health.items() if v is not None}}


_SETTINGS: dict[str, _Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(Config) if f.metadata}
_SETTINGS |= {name: row._replace(var=f"API_{name.upper()}") for name, row in _SETTINGS.items() if not row.var}


def _close_setting(name: str) -> str | None:
    """The setting ``name`` misspells (``prot``, ``API_PORT``, ``healthInterval``, ``register_path``), or None."""
    names = {k: k for k in _SETTINGS} | {v.lower()[4:]: k for k, s in _SETTINGS.items() for v in (s.var, s.old) if v}
    found = difflib.get_close_matches(name.lower().removeprefix("api_"), names, 1, 0.75)
    return names[found[0]] if found else None


def _unknown_settings(names: Iterable[str]) -> str:
    hints = [f"{n!r}" + (f" (did you mean {close!r}?)" if (close := _close_setting(n)) else "") for n in names]
    return f"unknown setting {', '.join(hints)}; the settings are: {', '.join(_SETTINGS)}"


def _from_1x(keywords: dict[str, Any], sources: Sequence[dict[str, str]]) -> None:
    """Read 1.x's ``is_master`` and ``API_MASTER`` as the mode they mean, warning; beside another mode: ConfigError."""
    spellings = [(keywords, "is_master", "mode", "{}={!r}")] + [(s, "API_MASTER", "API_MODE", "{}={}") for s in sources]
    for given, old, new, spelt in spellings:
        if (raw := given.pop(old, None)) not in (None, ""):
            mode = "supervisor" if _parse_choice(old, raw) else "worker"
            was, now = spelt.format(old, raw), spelt.format(new, mode)
            if str(given.get(new) or mode).strip().lower() != mode:
                raise ConfigError(f"{was} (picoapi 1.x) and {spelt.format(new, given[new])} disagree: keep only {new}")
            given[new] = mode
            message = f"{was} is picoapi 1.x's spelling: write {now} instead"
            level = next((i for i, frame in enumerate(inspect.stack(0), 1) if frame.filename != __file__), 1)
            warnings.warn(message, DeprecationWarning, stacklevel=level)
            _log_like_uvicorn()  # logged while the app is built: under uvicorn, in its format already
            _log_once("%s", message)


def _read_env_file(path: str | os.PathLike[str] | None) -> dict[str, str]:
    if path is not None and os.fspath(path) == ".env":  # the default, which may be absent
        path = _env_file_instead or (".env" if os.path.exists(".env") else None)
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            if "\0" in (text := file.read()):
                raise ValueError("a NUL byte")
    except FileNotFoundError:
        raise ConfigError(f"env_file {str(path)!r} does not exist; pass an existing path or None") from None
    except (OSError, ValueError) as exc:
        why = "not UTF-8" if isinstance(exc, UnicodeError) else getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read the settings file {str(path)!r} ({why}); save it as UTF-8 text") from None
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


# -- Models ------------------------------------------------------------------


def worker_id(host: str, port: int) -> str:
    """The id of the worker at ``host:port``: re-registering keeps it."""
    return f"{_bracketed(_normal_host(host))}:{port}"


#: Text a worker sends: no hidden character (:func:`_check_text`); the error names the field.
_VISIBLE = AfterValidator(lambda text, info: _check_text(str(info.field_name), text))
_Text = Annotated[str, _VISIBLE]
#: A worker's tags: each checked, each kept once.
_TagList = Annotated[list[str], AfterValidator(lambda ts: list(dict.fromkeys(_check_tag("each tag", t) for t in ts)))]
_Path = Annotated[str, Field(max_length=512, pattern=r"^/[^\s\x00-\x1f\x7f]*$"), _VISIBLE]
_HealthURL = Annotated[str, AfterValidator(functools.partial(_check_health_url, "health.url"))]
_Finite = Annotated[float, Field(allow_inf_nan=False)]
Status = Literal["healthy", "unhealthy", "unknown"]


class HealthSpec(BaseModel):
    """How the supervisor checks a worker."""

    url: _HealthURL = Field(max_length=MAX_URL, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
    interval: _Finite = Field(ge=MIN_INTERVAL, le=MAX_INTERVAL, description="seconds between checks")
    timeout: _Finite | None = Field(None, gt=0, le=MAX_INTERVAL, description="seconds; default min(interval, 10)")

    @property
    def deadline(self) -> float:
        """The check's total deadline: ``timeout``, by default min(interval, 10)."""
        return self.timeout or min(self.interval, DEFAULT_HEALTH_TIMEOUT)


class Registration(BaseModel):
    """The body of ``PUT /register``: what a worker says about itself."""

    name: _Text = Field(min_length=1, max_length=MAX_NAME)
    host: Annotated[str, AfterValidator(_normal_host)] = Field(max_length=MAX_HOST, pattern=_HOST_RE.pattern)
    port: int = Field(ge=1, le=65535)
    version: _Text = Field(default=DEFAULT_VERSION, min_length=1, max_length=MAX_VERSION)
    tags: _TagList = Field(default_factory=list, max_length=MAX_TAGS)
    description: _Text = Field(default="", max_length=MAX_DESCRIPTION)
    health: HealthSpec
    openapi: _Path | None = Field(default=None, description="the worker's OpenAPI path")
    instance: str | None = Field(default=None, pattern=_INSTANCE_PATTERN, description="the registering process")

    @model_validator(mode="after")
    def _health_is_own(self) -> Registration:
        spec, parts = self.health, urlsplit(self.health.url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"health.url has a bad port: {spec.url!r}") from None
        if (parts.hostname or "").lower() != self.host or port != self.port:
            raise ValueError(f"health.url must point at the registrant's own {self.host}:{self.port}, got {spec.url!r}")
        if parts.username or parts.password:
            raise ValueError("health.url must not carry credentials")
        if spec.timeout is not None and spec.timeout > spec.interval:
            raise ValueError(f"health.timeout ({spec.timeout:g}) must not exceed health.interval ({spec.interval:g})")
        return self


def _field(doc: str = "", default: Any = dataclasses.MISSING, health: str = "", given: str = "") -> Any:
    """A field WorkerOut shows (at the top, or under ``health`` at that key); if ``given``, read from a Registration."""
    return dataclasses.field(default=default, metadata={"doc": doc, "health": health, "given": given})


@dataclasses.dataclass(slots=True)
class Worker:
    """One registered worker: the one home of its fields (WorkerOut, _out, _CONTENT and the copies derive from it)."""

    id: str = _field("host:port, or [IPv6]:port")
    name: str = _field(given="name")
    host: str = _field(given="host")
    port: int = _field(given="port")
    version: str = _field(given="version")
    tags: tuple[str, ...] = _field(given="tags")
    description: str = _field(given="description")
    health_url: str = _field(health="url", given="health.url")
    interval: float = _field(health="interval", given="health.interval")
    timeout: float = _field("the check's total deadline in seconds", health="timeout", given="health.deadline")
    openapi: str | None = _field("its OpenAPI path, if it sent one", default=None, given="openapi")
    address: str = _field("what the host resolved to when it registered: checks connect here", default="")
    status: str = _field("healthy, unhealthy or unknown", default=HEALTHY)
    suspect: bool = _field("a call to it failed to connect: pick() skips it until its next check", default=False)
    registered_at: float = _field("Unix seconds, as every time below", default=0.0)
    last_check: float | None = _field(default=None)
    last_success: float | None = _field(default=None)
    failures: int = _field("consecutive failed checks", default=0)
    successes: int = _field("consecutive good checks", default=0)
    last_status_code: int | None = _field(default=None)
    last_latency: float | None = _field("seconds", default=None)
    last_error: str = _field(default="")
    # Not shown: the processes that registered it (uvicorn --workers), and the scheduler's bookkeeping (monotonic).
    instances: tuple[str, ...] = ()
    _heap_seq: int | None = dataclasses.field(default=None, repr=False)  # its live heap entry's
    _due: float = dataclasses.field(default=0.0, repr=False)
    _busy_until: float = dataclasses.field(default=0.0, repr=False)  # a check of it is in flight until then
    _registered: float = dataclasses.field(default=0.0, repr=False)
    _unhealthy_since: float | None = dataclasses.field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The worker's base address, e.g. ``http://10.0.0.5:8888``."""
        return f"{urlsplit(self.health_url).scheme}://{self.id}"

    def _request(self, path: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(URL, requests keywords) for ``path``: at the verified address (no DNS rebinding), https at its name."""
        if not self.address or self.url.startswith("https:"):
            return self.url + path, kwargs
        headers = {"Host": self.id, **(kwargs.get("headers") or {})}
        return f"http://{_bracketed(self.address)}:{self.port}{path}", {**kwargs, "headers": headers}

    @property
    def is_ready(self) -> bool:
        """Healthy, its last check succeeded and no call found it unreachable since: it may get work."""
        return self.status == HEALTHY and not self.failures and not self.suspect

    def copy(self) -> Worker:
        return Worker(*_fields_of(self))


_FIELDS = dataclasses.fields(Worker)
_fields_of = operator.attrgetter(*(f.name for f in _FIELDS))  # every field, in order: a fast snapshot for copies
#: What WorkerOut shows: every _field(), at its name or, if it names one, at that key under ``health``.
_TOP = tuple(f.name for f in _FIELDS if "doc" in f.metadata and not f.metadata["health"])
_HEALTH = {f.metadata["health"]: f.name for f in _FIELDS if f.metadata.get("health")}
_top_of, _health_of = operator.attrgetter(*_TOP), operator.attrgetter(*_HEALTH.values())
#: WorkerOut's types: the status as :data:`Status`, the tags as a list (``picoapi status`` reads them strictly).
_HINTS = {**typing.get_type_hints(Worker), "status": Status, "tags": list[str]}
_SHOWN = {f.name: (_HINTS[f.name], Field(description=f.metadata["doc"] or None)) for f in _FIELDS if f.name in _TOP}
#: What a registration says: each field it sets, where a Registration holds it; the same again is a refresh.
_GIVEN = {f.name: f.metadata["given"] for f in _FIELDS if f.metadata.get("given")}
_CONTENT = (*_GIVEN, "address")  # and the address the supervisor verified
_content_of, _given_in = operator.attrgetter(*_CONTENT), operator.attrgetter(*_GIVEN.values())


def _content(reg: Registration, address: str) -> tuple[Any, ...]:
    """The :data:`_CONTENT` of the entry that ``reg``, from ``address``, makes."""
    return (*(tuple(v) if isinstance(v, list) else v for v in _given_in(reg)), address)


def _out(w: Worker) -> dict[str, Any]:
    """``w`` as the HTTP API shows it (a :class:`WorkerOut`), without validating again what the registry made."""
    return {**dict(zip(_TOP, _top_of(w), strict=True)), "health": dict(zip(_HEALTH, _health_of(w), strict=True))}


class WorkerOut(create_model("_WorkerFields", **_SHOWN, health=(HealthSpec, ...))):  # type: ignore[misc]
    """A registry entry as the HTTP API shows it, derived from :class:`Worker`. Times are Unix seconds."""


# -- Registry ----------------------------------------------------------------


class Verdict(NamedTuple):  # next_status's answer: ``since`` (unhealthy) is monotonic, ``recheck`` seconds or None
    status: str
    since: float | None
    removed: bool
    recheck: float | None


class CheckResult(NamedTuple):
    """The outcome of one health check."""

    ok: bool
    status_code: int | None = None
    latency: float | None = None  #: seconds from the check's start to its answer's headers
    error: str = ""
    postponed: bool = False  #: the supervisor itself could not check (out of descriptors, say): not the worker's fault
    instance: str | None = None  #: the worker process that answered (its ``X-PicoAPI-Instance`` header), if it said
    late: float = 0.0  #: seconds the check started after it was due (``latency`` follows it)


class StatusChange(NamedTuple):
    """What a check's result did to its worker (see :meth:`Registry.record`)."""

    old: str
    new: str
    removed: bool
    error: str = ""  #: the check's error as recorded (an answer from another process fails with its own words)


class _Check(NamedTuple):  # a due check, popped from the heap: everything the probe needs
    worker_id: str
    url: str
    address: str
    timeout: float
    due: float
    trusted: bool = False  # its last check succeeded: it may use every slot, others only half (see HealthChecker)
    interval: float = 0.0  # the time to its next check (is its connection worth keeping?)


class Registry:
    """The supervisor's workers, their tag index and their check schedule. Thread-safe; readers get copies."""

    def __init__(
        self,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        failures: int = DEFAULT_HEALTH_FAILURES,
        successes: int = DEFAULT_HEALTH_SUCCESSES,
        deregister_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_workers, self.failures, self.successes = max_workers, failures, successes
        self.deregister_after, self.clock, self._wall = deregister_after, clock, wall  # clock: monotonic, for due times
        self.wake: Callable[[], None] = lambda: None  #: called outside the lock when the next check moved earlier
        # One lock guards every attribute below; never do I/O under it. The heap's invariant: from registration to
        # removal every worker has exactly one live entry, its next check (pop_due schedules it before handing out).
        self._lock = threading.Lock()
        self._workers: dict[str, Worker] = {}
        self._by_tag: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self._heap: list[tuple[float, int, str]] = []  # (due, tie-breaker, worker id); live: the worker's _heap_seq
        self._seq = itertools.count()
        self._turns: dict[tuple[frozenset[str], str | None], int] = {}  # pick()'s round-robin, per query
        self.metrics = _Metrics()  # GET /metrics' counters

    def register(self, reg: Registration, *, address: str | None = None) -> tuple[Worker, bool]:
        """Create, refresh or replace ``reg``'s entry from ``address`` (resolved if None): (a copy, created). A new or
        changed entry is ``unknown``, checked at once. Raises :class:`RegistryFull`, or ValueError (unresolved host)."""
        wid = worker_id(reg.host, reg.port)
        content = _content(reg, _resolve(reg.host) if address is None else address)
        with self._lock:
            now, entry = self.clock(), self._workers.get(wid)
            if entry is None and len(self._workers) >= self.max_workers:
                full = f"the registry is full ({self.max_workers} workers, API_MAX_WORKERS)"
                raise RegistryFull(f"{full}; deregister workers or raise API_MAX_WORKERS")
            created = entry is None
            if entry is not None and _content_of(entry) == content:
                if reg.instance and reg.instance not in entry.instances:  # the oldest are dropped
                    entry.instances = (*entry.instances, reg.instance)[-MAX_INSTANCES:]
                # Back while not healthy: checked now, unless under way or due (refreshes make no flood of checks)
                moved = entry.status != HEALTHY and entry._busy_until <= now < entry._due and self._schedule(entry, now)
            else:
                if entry is None:
                    entry = self._workers[wid] = Worker(wid, **dict(zip(_CONTENT, content, strict=True)))
                self._index(entry, remove=True)
                for field, value in zip(_CONTENT, content, strict=True):
                    setattr(entry, field, value)
                entry.instances = (reg.instance,) if reg.instance else ()
                entry.status, entry.failures, entry.successes, entry.suspect = UNKNOWN, 0, 0, False
                entry.registered_at, entry._registered, entry._unhealthy_since = self._wall(), now, None
                self._index(entry)
                moved = self._schedule(entry, now)
                self.metrics.registrations += 1
            copy = entry.copy()
        if moved:
            self.wake()
        return copy, created

    def forget_instance(self, wid: str, instance: str) -> tuple[str, ...]:
        """Drop a process from ``wid``'s instances (it is stopping); returns those left."""
        with self._lock:
            if entry := self._workers.get(wid):
                entry.instances = tuple(i for i in entry.instances if i != instance)
            return entry.instances if entry else ()

    def deregister(self, wid: str) -> bool:
        """Remove a worker; its pending check is dropped lazily. False if unknown."""
        with self._lock:
            if (entry := self._workers.get(wid)) is not None:
                self._remove(entry)
            return entry is not None

    def _remove(self, entry: Worker) -> None:
        del self._workers[entry.id]  # its heap entry goes stale: lazy cancellation
        self._index(entry, remove=True)
        self.metrics.deregistrations += 1  # by a DELETE or after API_DEREGISTER_AFTER

    def _index(self, entry: Worker, *, remove: bool = False) -> None:
        for tag in entry.tags:
            ids = self._by_tag[tag]
            (ids.discard if remove else ids.add)(entry.id)
            if not ids:
                del self._by_tag[tag]

    def get(self, wid: str) -> Worker | None:
        """A copy of the worker ``wid``, or None."""
        with self._lock:
            return None if (entry := self._workers.get(wid)) is None else entry.copy()

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def __contains__(self, wid: object) -> bool:
        with self._lock:
            return wid in self._workers

    def workers(
        self, *tags: str, status: str | None = None, name: str | None = None, version: str | None = None
    ) -> list[Worker]:
        """Copies of the workers that have every tag in ``tags`` and match the filters, by id."""
        with self._lock:  # only a C-level tuple per worker under it: big queries barely hold it
            rows = sorted(map(_fields_of, self._matching(tags, status, name, version)))
        return [Worker(*row) for row in rows]

    def pick(self, tags: Sequence[str], version: str | None = None, exclude: Iterable[str] = ()) -> Worker:
        """A copy of a ready worker with every tag, not in ``exclude``, taking turns per query; or NoWorkerAvailable."""
        skip, key = set(exclude), (frozenset(tags), version)
        with self._lock:
            ready = sorted(w.id for w in self._matching(tags, None, None, version) if w.is_ready and w.id not in skip)
            if not ready:
                raise NoWorkerAvailable(list(tags), version)
            if len(self._turns) >= 10_000:  # bounded: an odd query shape cannot grow it forever
                self._turns.clear()
            turn = self._turns[key] = self._turns.get(key, -1) + 1
            return self._workers[ready[turn % len(ready)]].copy()

    def _matching(self, tags: Sequence[str], status: str | None, name: str | None, version: str | None) -> list[Worker]:
        """The workers with every tag and the given status, name and version (None: any); lock held."""
        found: Iterable[Worker] = self._workers.values()
        if tags:  # the smallest set first: the intersection walks it
            ids = set.intersection(*sorted((self._by_tag.get(tag, set()) for tag in set(tags)), key=len))
            found = map(self._workers.__getitem__, ids)
        return [
            w for w in found if status in (None, w.status) and name in (None, w.name) and version in (None, w.version)
        ]

    def mark_suspect(self, wid: str) -> None:
        """Passive health checking: skip ``wid`` in pick() and check it at once."""
        with self._lock:
            if entry := self._workers.get(wid):
                entry.suspect = True
            moved = entry is not None and self._schedule(entry, self.clock())
        if moved:
            self.wake()

    def _live(self, item: tuple[float, int, str]) -> Worker | None:
        """The worker whose next check heap ``item`` is, or None: a stale item (lock held)."""
        entry = self._workers.get(item[2])
        return entry if entry is not None and entry._heap_seq == item[1] else None

    def _schedule(self, entry: Worker, due: float) -> bool:
        """Push the entry's next check, the older going stale (lock held): True if now the earliest."""
        entry._heap_seq, entry._due = next(self._seq), due
        earliest = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, entry._heap_seq, entry.id))
        stale = len(self._heap) - len(self._workers)  # by the invariant
        if stale > 64 and stale * 2 > len(self._heap):  # churn cannot grow it: once mostly stale it is rebuilt
            self._heap[:] = filter(self._live, self._heap)  # in place: pop_due holds the list while it schedules
            heapq.heapify(self._heap)
        return earliest

    def next_due(self) -> float | None:
        """The due time of the earliest live check, or None."""
        with self._lock:
            while self._heap and not self._live(self._heap[0]):
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[_Check]:
        """Take every check due at ``now``, each worker's next scheduled an interval later; none twice at once."""
        due: list[_Check] = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                when, _, _ = item = heapq.heappop(heap)
                if (w := self._live(item)) is None:
                    continue  # cancelled or moved: lazy cancellation
                following = when + w.interval  # the phase kept: record() only brings it forward
                self._schedule(w, following if following > now else now + w.interval)
                if w._busy_until <= now:
                    w._busy_until = now + w.timeout + 1.0  # a lost result frees it after this
                    trusted = w.failures == 0 and w.last_success is not None
                    due.append(_Check(w.id, w.health_url, w.address, w.timeout, when, trusted, w.interval))
        return due

    def record(self, wid: str, result: CheckResult) -> StatusChange | None:
        """Apply a check's result (only here): a :class:`StatusChange` if the status changed or the worker went."""
        with self._lock:
            if (entry := self._workers.get(wid)) is None:
                return None  # deregistered while the check ran
            now, old, entry._busy_until = self.clock(), entry.status, 0.0
            if result.postponed:
                self._schedule(entry, min(entry._due, now + confirm_delay(entry.interval)))
                return None
            if result.ok and entry.instances and result.instance not in entry.instances:
                result = result._replace(ok=False, error=f"answered by a process that did not register {wid}")
            self.metrics.checked(result)
            entry.last_check, entry.last_error, entry.suspect = self._wall(), result.error[:MAX_ERROR], False
            entry.last_status_code, entry.last_latency = result.status_code, result.latency
            entry.successes, entry.failures = (entry.successes + 1, 0) if result.ok else (0, entry.failures + 1)
            entry.last_success = entry.last_check if result.ok else entry.last_success
            new, entry._unhealthy_since, removed, recheck = next_status(entry, result.ok, now, self)
            entry.status = new
            if removed:
                self._remove(entry)
            elif recheck is not None and now + recheck < entry._due:
                self._schedule(entry, now + recheck)
            return StatusChange(old, new, removed, entry.last_error) if new != old or removed else None


def next_status(entry: Worker, ok: bool, now: float, rules: Registry) -> Verdict:
    """The status rules, from the counts in a row that include this check: ``unknown`` turns ``healthy`` on a good
    check; ``healthy`` or ``unknown`` (past its start-up grace) ``unhealthy`` after ``rules.failures``; ``unhealthy``
    ``healthy`` after ``rules.successes``, since (monotonic) ``removed`` after ``rules.deregister_after``. A change to
    confirm is ``recheck``-ed in seconds at the confirm delay; a new worker not up yet too, doubling it each time."""
    status, target = entry.status, HEALTHY if ok else UNHEALTHY  # where this check pushes
    starting = status == UNKNOWN and now - entry._registered < min(entry.interval, STARTUP_GRACE)
    enough = entry.successes >= rules.successes if ok else entry.failures >= rules.failures and not starting
    new = target if enough or (ok and status != UNHEALTHY) else status  # only recovery waits for good checks in a row
    since = entry._unhealthy_since if new == status else now if new == UNHEALTHY else None
    removed = rules.deregister_after is not None and since is not None and now - since >= rules.deregister_after
    backoff = 2 ** min(entry.failures - 1, 16) if starting and not ok else 1
    return Verdict(new, since, removed, confirm_delay(entry.interval) * backoff if new != target else None)


def confirm_delay(interval: float) -> float:
    """How soon a first failure (or first success when unhealthy) is re-checked."""
    return min(1.0, interval / 4)


# -- Persistence ---------------------------------------------------------------


class _Store:
    """The registrations on disk (sqlite3, WAL, held exclusively); :attr:`lock` is taken before the registry's."""

    def __init__(self, path: str, is_registered: Callable[[str], bool] = lambda wid: False) -> None:
        self._is_registered = is_registered
        self._gone: collections.deque[str] = collections.deque()  # appended by the check thread, no lock needed
        self.forget = self._gone.append  #: queue the row of a worker the checker removed (any thread, no I/O)
        self.lock = threading.Lock()  #: serialises a registry change with its row: the disk never goes back in time
        db = None
        try:
            db = self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=STORE_TIMEOUT)
            for pragma in ("locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=NORMAL"):  # locked until close()
                db.execute(f"PRAGMA {pragma}")
            db.execute("BEGIN IMMEDIATE")  # never committed if the file is not ours: close() leaves it as it was
            schema = "id TEXT PRIMARY KEY, body TEXT NOT NULL, address TEXT NOT NULL, instances TEXT NOT NULL"
            db.execute(f"CREATE TABLE IF NOT EXISTS workers ({schema})")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {row[1] for row in db.execute("PRAGMA table_info(workers)")}
            if tables != {"workers", "meta"} or columns != {"id", "body", "address", "instances"}:
                raise ConfigError(f"API_REGISTRY_FILE {path!r} is not a PicoAPI registry file; name a new file")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex[:12],))  # see identity()
            db.execute("COMMIT")
        except BaseException as exc:
            if db is not None:
                db.close()
            if not isinstance(exc, sqlite3.Error):
                raise
            locked = "is in use by another supervisor; give each supervisor its own file"
            why = locked if "locked" in str(exc) else f"cannot be used as a registry file: {exc}"
            raise ConfigError(f"API_REGISTRY_FILE {path!r} {why}") from exc

    def load(self) -> list[tuple[Registration, str, list[str]]]:
        """Every stored registration with the address it was verified at (or "") and its processes."""
        regs = []
        for wid, body, address, instances in self._db.execute("SELECT id, body, address, instances FROM workers"):
            try:
                regs.append((Registration.model_validate_json(body), str(address), str(instances).split()))
            except ValueError as exc:
                logger.warning("skipping unreadable registry row %s: %s", _printable(wid), _printable(exc))
        return regs

    def save(self, wid: str, reg: Registration, address: str, instances: Sequence[str] = ()) -> None:
        self._flush()
        row = (wid, reg.model_dump_json(), address, " ".join(instances))
        self._db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)", row)

    def delete(self, wid: str) -> None:
        self._flush()
        self._db.execute("DELETE FROM workers WHERE id = ?", (wid,))

    def _flush(self) -> None:
        while self._gone:
            wid = self._gone.popleft()
            if not self._is_registered(wid):  # registered again since it was removed: keep the new row
                self._db.execute("DELETE FROM workers WHERE id = ?", (wid,))

    def identity(self) -> str:
        """The supervisor's id, kept across restarts so workers recognise its checks."""
        return str(self._db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])

    def close(self) -> None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            self._flush()
        self._db.close()


# -- Health checker ------------------------------------------------------------

#: The most of a check's answer that is read: its status line and headers (and, to keep its connection, its body).
MAX_HEAD = 4096
#: A kept connection serves checks starting within this many seconds of its opening: a fresh one at least this often
#: (README, "Connections"). Only intervals under it keep one, so idle gaps stay under uvicorn's idle timeout (5 s).
KEEP_ALIVE = 5.0
_OWN_TROUBLE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}  #: we ran out: postponed
_INSTANCE_RE = re.compile(rb"\r\nx-picoapi-instance:[ \t]*([A-Za-z0-9_-]{1,64})[ \t]*\r\n", re.IGNORECASE)
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,4})[ \t]*\r\n", re.IGNORECASE)
_CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_STATUS_RE = re.compile(rb"[ \t]*(HTTP/\S*)[ \t]+([0-9]{3})(?:[ \t][^\r\n]*)?\r\n")  # version, code; the rest unread
#: A probe's states, each the name of the handler its next readiness event runs (IDLE: kept; any event closes it).
CONNECTING, HANDSHAKING, SENDING, READING, IDLE = "_connected", "_handshaking", "_write_ready", "_read_ready", "_close"
_TLS_WANTS = {ssl.SSLWantReadError: selectors.EVENT_READ, ssl.SSLWantWriteError: selectors.EVENT_WRITE}
_NO_CHECK = _Check("", "", "", 0.0, 0.0)  # a probe's check between checks: a deadline left for it is moot
_Done = Callable[[_Check, CheckResult], None]  # where a check's result goes
_ssl_context = functools.cache(ssl.create_default_context)  #: made on first use, shared; verifies with system CAs


class HealthChecker:
    """One daemon thread that makes every worker's check on non-blocking sockets, waiting in one ``select``; results
    go to :meth:`Registry.record` (tests script them with ``submit``); workers not known good get half the slots."""

    def __init__(
        self,
        registry: Registry,
        *,
        supervisor_id: str = "",
        on_change: Callable[[str, StatusChange], None] | None = None,
        limit: int | None = None,
        submit: Callable[[list[_Check], Mapping[str, str], _Done], None] | None = None,
    ) -> None:
        self.registry, self._clock = registry, registry.clock
        self.headers = {SUPERVISOR_HEADER: supervisor_id} if supervisor_id else {}  #: sent with every check
        self._on_change, self._submit = on_change or (lambda wid, change: None), submit or self._queue
        self._max_kept = max(16, _descriptors() // 2)  # idle connections kept at most: half the descriptors
        self._limit = limit or min(8192, self._max_kept)  # checks in flight at most
        self._half = max(1, self._limit // 2)  # of them for workers not known to be good
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._woken = False  # a byte is in the pipe, unread: the thread is up, or about to be (no second send)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._on_ready = {state: getattr(self, state) for state in (CONNECTING, HANDSHAKING, SENDING, READING, IDLE)}
        # Only the checker's thread touches these (and run_pending's caller before start()).
        self._deadlines: list[tuple[float, int, _Probe, _Check]] = []
        self._waiting = (collections.deque[_Check](), collections.deque[_Check]())  # trusted, others
        self._kept: dict[str, _Probe] = {}  # idle connections by worker id (closed ones until its next check)
        self._report: _Done = self._done  # _queue sets it and _extra: where results go, the headers every check sends
        self._extra, self._swept, self._stopping = "", 0.0, False
        self._thread = threading.Thread(target=self._loop, name="picoapi-health", daemon=True)
        self.in_flight = self._untrusted_in_flight = 0  #: checks started, not finished yet (and of them untrusted)
        self.postponed = 0  #: checks postponed: the supervisor itself could not check (out of descriptors, say)
        self.trouble = ""  #: why the last check could not be made, until one can be again, else ""; /health shows it
        registry.wake = self._wake

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def run_pending(self) -> int:
        """Queue every check that is due now (starting what the slots allow); returns how many."""
        if checks := self.registry.pop_due(self._clock()):
            self._submit(checks, self.headers, self._done)
        return len(checks)

    def _done(self, check: _Check, result: CheckResult) -> None:
        try:
            if result.postponed:
                self.postponed += 1
                if not self.trouble:  # logged once per episode, not once per check
                    logger.error("%s; checks are postponed, not counted against workers", result.error)
            elif self.trouble:
                logger.warning("checks can be made again")
            self.trouble = result.error if result.postponed else ""
            if (change := self.registry.record(check.worker_id, result)) is None:
                return
            if change.removed:
                logger.warning("worker %s removed: unhealthy for longer than API_DEREGISTER_AFTER", check.worker_id)
            elif change.new == UNHEALTHY:
                logger.warning("worker %s is unhealthy: %s", check.worker_id, change.error)
            else:
                logger.info("worker %s is %s (was %s)", check.worker_id, change.new, change.old)
            self._on_change(check.worker_id, change)
        except Exception:  # recording must never kill the checker's thread
            logger.exception("recording the check of %s failed", check.worker_id)

    def start(self) -> None:
        if self._thread.ident is None:  # not started yet
            self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.run_pending()
                self._poll()
            except Exception:  # never let one bad step kill the checker, nor a repeating one spin it
                logger.exception("health checker step failed")
                time.sleep(0.1)
        self._close_all()

    def _wake(self) -> None:
        if not self._woken:  # a burst of registrations wakes the thread once, not once each
            self._woken = True
            with contextlib.suppress(OSError):  # closed, or the pipe is full: awake already
                self._wake_w.send(b"\0")

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread within ``timeout``, abandoning the checks in flight; every socket is closed."""
        self._stopping, self.registry.wake = True, lambda: None
        self._wake()
        if self._thread.ident is None:
            return self._close_all()  # never started
        self._thread.join(timeout)  # the thread closes its sockets as it ends

    def _close_all(self) -> None:
        for probe in [*(entry[2] for entry in self._deadlines), *self._kept.values()]:
            self._close(probe)
        for closable in (self._selector, self._wake_r, self._wake_w):
            closable.close()

    def _queue(self, checks: list[_Check], headers: Mapping[str, str], done: _Done) -> None:
        """Queue ``checks`` for a slot, starting as many as the slots allow; ``done`` gets each result."""
        self._extra, self._report = "".join(f"{k}: {v}\r\n" for k, v in headers.items()), done
        for check in checks:
            self._waiting[not check.trusted].append(check)
        self._fill()

    def _fill(self) -> None:
        trusted, others = self._waiting
        while self.in_flight < self._limit and (trusted or (others and self._untrusted_in_flight < self._half)):
            self._begin(trusted.popleft() if trusted else others.popleft())

    def _begin(self, check: _Check) -> None:
        """Start ``check`` on the worker's kept connection if it is fresh, else on a new one."""
        try:
            target = _target(check.url, self._extra, 0 < check.interval < KEEP_ALIVE)
        except Exception as exc:  # a URL it cannot send, say: this check fails at once, alone
            self._report(check, CheckResult(False, None, None, f"cannot check {check.url!r}: {type(exc).__name__}"))
            return
        probe = self._kept.pop(check.worker_id, None) or _Probe()
        probe.host, probe.port, probe.https, probe.request, probe.keep = target
        probe.check, probe.sent, probe.buffer = check, 0, b""
        self.in_flight += 1
        self._untrusted_in_flight += not check.trusted
        probe.started = now = self._clock()  # the deadline counts from here, not from the queue
        heapq.heappush(self._deadlines, (now + check.timeout, id(check), probe, check))
        try:
            if probe.sock is not None and now - probe.opened < KEEP_ALIVE and probe.key == (check.url, check.address):
                self._write_ready(probe)  # reused: opened before this check started
            else:
                self._connect(probe)
        except Exception as exc:
            self._fail(probe, exc)

    def _connect(self, probe: _Probe) -> None:
        """A new connection for ``probe``'s check, to the address verified at registration."""
        check = probe.check
        self._close(probe)
        probe.sent, probe.opened, probe.key = 0, probe.started, (check.url, check.address)  # not reused
        if not check.address:
            raise ValueError("no address: its host did not resolve when the registry file was loaded")
        sock = probe.sock = socket.socket(socket.AF_INET6 if ":" in check.address else socket.AF_INET)
        sock.setblocking(False)
        if (err := sock.connect_ex((check.address, probe.port))) not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, os.strerror(err))
        probe.state = CONNECTING if probe.https else SENDING  # plain: the first send tells a failed connect
        self._selector.register(sock, selectors.EVENT_WRITE, probe)

    def _poll(self) -> None:
        """Wait for the next due check or deadline, running each ready probe's handler; then expire deadlines."""
        deadline = self._deadlines[0][0] if self._deadlines else None
        due = [t for t in (self.registry.next_due(), deadline) if t is not None]
        on_ready = self._on_ready
        for key, _ in self._selector.select(max(0.0, min(due) - self._clock()) if due else None):
            if (probe := key.data) is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)  # anything left wakes the next select
                # After the read, else a wake sent meanwhile is eaten; a skipped one is seen: the heap is read next.
                self._woken = False
                continue
            try:
                on_ready[probe.state](probe)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:  # TLS must read or write first, in any state
                self._selector.modify(key.fd, _TLS_WANTS[type(want)], probe)
            except (BlockingIOError, InterruptedError):
                pass  # not ready after all: wait for the next event
            except Exception as exc:
                self._fail(probe, exc)
        now, deadlines = self._clock(), self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].check is not deadlines[0][3]):
            _, _, probe, check = heapq.heappop(deadlines)  # expired, or moot: that check finished
            if probe.check is check:
                self._finish(probe, None, f"no answer within {check.timeout:g}s")
        if now - self._swept > KEEP_ALIVE:  # kept connections too old to use again (deregistered workers')
            self._swept = now
            for wid in [wid for wid, p in self._kept.items() if now - p.opened > KEEP_ALIVE]:
                self._close(self._kept.pop(wid))
        self._fill()

    def _connected(self, probe: _Probe) -> None:
        """An https check's connection is up: TLS takes it over (same descriptor, same registration)."""
        assert probe.sock is not None
        if err := probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise OSError(err, os.strerror(err))
        probe.sock = _ssl_context().wrap_socket(probe.sock, server_hostname=probe.host, do_handshake_on_connect=False)
        probe.state = HANDSHAKING
        self._handshaking(probe)

    def _handshaking(self, probe: _Probe) -> None:
        assert isinstance(probe.sock, ssl.SSLSocket)
        probe.sock.do_handshake()  # what it wants meanwhile, to read or to write, _poll waits for
        self._write_ready(probe)

    def _write_ready(self, probe: _Probe) -> None:
        sock = probe.sock
        assert sock is not None
        probe.sent += sock.send(probe.request[probe.sent :])
        sent = probe.sent == len(probe.request)
        probe.state = READING if sent else SENDING
        self._selector.modify(sock, selectors.EVENT_READ if sent else selectors.EVENT_WRITE, probe)

    def _read_ready(self, probe: _Probe) -> None:
        """Read the status line and the headers (up to 4 KiB; the body only to keep a small answer's connection)."""
        assert probe.sock is not None
        if not (data := probe.sock.recv(MAX_HEAD)):
            raise ConnectionError("connection closed before an answer")
        head = probe.buffer = probe.buffer + data
        if (status := _STATUS_RE.match(head)) is None:
            if b"\r\n" in head:
                raise ValueError("not an HTTP response")  # what it said is not echoed: no banner grabbing
            if len(head) > 512:
                raise ValueError("no HTTP status line in the first 512 bytes")
            return
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) < MAX_HEAD:
            return  # more to come
        # The connection is kept only after an HTTP/1.1 answer that does not close, with a small body read whole.
        keep = end >= 0 and probe.keep and status[1] == b"HTTP/1.1" and not _CLOSE_RE.search(head, 0, end + 2)
        size = end + 4 + int(length[1]) if keep and (length := _LENGTH_RE.search(head, 0, end + 2)) else MAX_HEAD + 1
        if size <= MAX_HEAD and len(head) < size:
            return  # the rest of the body: a kept connection must not hold stale bytes
        found = _INSTANCE_RE.search(head, 0, end + 2 if end >= 0 else MAX_HEAD)  # the last header's CRLF too
        code, probe.keep = int(status[2]), size <= MAX_HEAD
        self._finish(probe, code, "" if 200 <= code < 300 else f"HTTP {code}", found and found[1].decode())

    def _fail(self, probe: _Probe, exc: BaseException) -> None:
        if probe.opened < probe.started and not probe.buffer and isinstance(exc, OSError):
            try:  # a kept connection closed or reset before answering: a new one at once, not a failure
                return self._connect(probe)
            except Exception as again:
                exc = again
        if isinstance(exc, OSError) and exc.errno in _OWN_TROUBLE:  # out of descriptors, say: not the worker's fault
            return self._finish(probe, None, f"supervisor could not check: {exc.strerror}", own=True)
        self._finish(probe, None, _printable(f"{type(exc).__name__}: {exc}"))

    def _finish(self, probe: _Probe, code: int | None, error: str, found: str | None = None, own: bool = False) -> None:
        """Report the check (``found``: the answering instance; ``own``: our trouble); keep the connection if it may."""
        check, probe.check = probe.check, _NO_CHECK
        self.in_flight -= 1
        self._untrusted_in_flight -= not check.trusted
        fresh = probe.opened + KEEP_ALIVE > check.due + check.interval
        if code is not None and probe.keep and fresh and len(self._kept) < self._max_kept:
            probe.state = IDLE
            self._kept[check.worker_id] = probe
        else:
            self._close(probe)
        latency, late = self._clock() - probe.started, probe.started - check.due
        self._report(check, CheckResult(not error, code, latency, error, own, found, late))

    def _close(self, probe: _Probe) -> None:
        """Close the probe's connection (a kept one stays in ``_kept``, closed, until its worker's next check)."""
        if probe.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(probe.sock)
            probe.sock.close()
            probe.sock = None


@dataclasses.dataclass(slots=True, eq=False)  # eq=False: compared by identity, as the selector does on modify()
class _Probe:
    """One check's connection; its :attr:`state` names the handler its next readiness event runs."""

    check: _Check = _NO_CHECK
    sock: socket.socket | ssl.SSLSocket | None = None
    state: str = SENDING
    host: str = ""
    port: int = 0
    https: bool = False
    request: bytes = b""
    keep: bool = False  # the answer may leave the connection open for the worker's next check
    key: tuple[str, str] = ("", "")  # the (url, address) the connection was opened for
    opened: float = 0.0  # before ``started``: a kept connection, replaced (not failed) if found closed
    started: float = 0.0
    sent: int = 0
    buffer: bytes = b""


@functools.lru_cache(maxsize=65_536)
def _target(url: str, extra_headers: str, keep: bool) -> tuple[str, int, bool, bytes, bool]:
    """(host, port, https, request bytes, keep-alive) for a health URL; cached, as URLs rarely change."""
    parts = urlsplit(url)
    https, keep = parts.scheme == "https", keep and parts.scheme != "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: picoapi/{__version__}\r\n{extra_headers}"
    request = f"{head}Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode("ascii")
    return parts.hostname or "", parts.port or (443 if https else 80), https, request, keep


@functools.cache
def _descriptors() -> int:
    """The limit of open files, set to the hard one (a supervisor needs many; 2**20 at most); once a process."""
    with contextlib.suppress(ImportError, ValueError, OSError):  # no such limit (Windows), or not allowed
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return 1024


def check_once(
    url: str, timeout: float = DEFAULT_HEALTH_TIMEOUT, headers: Mapping[str, str] | None = None, address: str = ""
) -> CheckResult:
    """Check ``url`` once (at ``address``, else its host resolved) as the supervisor would; blocks about ``timeout``."""
    try:
        address = address or _resolve(urlsplit(url).hostname or "")
    except ValueError as exc:
        return CheckResult(False, None, None, str(exc))
    done: list[CheckResult] = []
    checker = HealthChecker(Registry(), limit=1)
    checker._queue([_Check("", url, address, timeout, checker._clock())], headers or {}, lambda _, r: done.append(r))
    try:
        while not done:  # the check's own deadline ends it
            checker._poll()
    finally:
        checker.stop()
    return done[0]


# -- Worker side ---------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Supervisor:  # what a worker knows about one supervisor it registers with
    url: str
    is_registered: bool = False
    identity: str | None = None  # the supervisor's own id, from its answer: its checks carry the same
    last_seen: float = 0.0  # monotonic time of the last registration or check from it
    attempts: int = 0
    next_attempt: float = 0.0
    error: str = ""
    refusal: int = 0  # the status of its last answer if retrying will not fix it (409: another process serves us)


class Registrar:
    """Registers a worker with its supervisors; :meth:`start`'s thread retries, and re-registers where forgotten."""

    def __init__(
        self,
        urls: Sequence[str],
        body: Mapping[str, Any],
        *,
        token: str | None = None,
        timeout: float = DEFAULT_REGISTER_TIMEOUT,
        required: bool = False,
        watchdog_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
        rand: Callable[[], float] = random.random,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.supervisors = [_Supervisor(url) for url in urls]
        self.body, self.timeout, self.required = dict(body), timeout, required
        #: No check from a supervisor for this long: ask it whether it still checks us.
        self.watchdog_after = watchdog_after or DEFAULT_WATCHDOG_INTERVALS * float(body["health"]["interval"])
        self._id, self._token = worker_id(body["host"], body["port"]), _parse_token("token", token or "")
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._clock, self._sleep, self._rand, self._wall = clock, sleep, rand, wall
        self._lock = threading.Condition()  # guards the _Supervisor fields and _in_flight; notified as it empties
        self._in_flight: set[_Cuttable] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="picoapi-registrar", daemon=True)
        self._stranger = False  # a check came from a supervisor whose identity is none of ours

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, half jittered."""
        return min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * (0.5 + 0.5 * self._rand())

    def _send(self, method: str, url: str, timeout: float, **sent: Any) -> tuple[requests.Response, bytes | None]:
        """:func:`_bounded_request` (MAX_BODY, 50 ms to 10 s), cut by :meth:`stop` too; after it, only DELETEs go."""
        adapter = _Cuttable()
        with self._lock:
            if self._stop.is_set() and method != "DELETE":
                raise _Cut("not sent: the registrar is stopping")
            self._in_flight.add(adapter)
        try:
            return _bounded_request(adapter, method, url, min(10.0, max(0.05, timeout)), MAX_BODY, **sent)
        finally:
            with self._lock:
                self._in_flight.discard(adapter)
                self._lock.notify_all()

    def _attempt(self, sup: _Supervisor, timeout: float) -> float:
        """PUT once under the one retry policy; returns when the next attempt is due (inf once registered)."""
        try:
            resp, content = self._send("PUT", sup.url, timeout, json=self.body, headers=self._headers)
        except requests.RequestException as exc:
            return self._retry_later(sup, _root_cause(exc))
        status = resp.status_code
        if content is None:
            return self._retry_later(sup, f"HTTP {status}, over {MAX_BODY} bytes: too large for a supervisor's answer")
        if 200 <= status < 300 and _is_own_entry(_json(content), self.body):
            with self._lock:
                sup.is_registered, sup.identity = True, resp.headers.get(SUPERVISOR_HEADER)
                sup.last_seen, sup.attempts, sup.error, sup.refusal = self._clock(), 0, "", 0
            logger.info("registered with %s as %s (instance %s)", sup.url, self._id, self.body.get("instance"))
            return math.inf
        why = {  # a redirect followed would turn the PUT into a GET somewhere else
            2: f"answered {status} but not with this worker's entry: is API_REGISTER_PATH "
            "a PicoAPI supervisor's /register URL?",
            3: f"HTTP {status} redirect to {resp.headers.get('Location')}, not followed: "
            "set API_REGISTER_PATH to the supervisor's own /register URL",
        }.get(status // 100) or f"HTTP {status}: {_detail(content)}"
        if status >= 500 or status in (408, 429):
            return self._retry_later(sup, why, _retry_after(resp.headers.get("Retry-After")) or 0.0)
        return self._retry_later(sup, why, BACKOFF_CAP, refusal=status)

    def _retry_later(self, sup: _Supervisor, why: str, asked: float = 0.0, refusal: int = 0) -> float:
        """Record why an attempt failed; the next waits ``asked`` (a Retry-After) or the backoff, capped on refusal."""
        attempts = max(sup.attempts, _ATTEMPTS_AT_CAP) if refusal else sup.attempts
        served = f"{self._id} is served by another live instance; {sup.url} refused this one"
        refused = f"{served if refusal == 409 else 'refused the registration'}: " if refusal else ""
        sup.error, sup.refusal = refused + self._safe(why), refusal
        sup.attempts, sup.next_attempt = attempts + 1, self._clock() + max(asked, self.backoff(attempts))
        return sup.next_attempt

    def _safe(self, text: str) -> str:
        """``text`` from the far end or an error, fit for a log: no token, nothing unprintable."""
        return _printable(text.replace(self._token, "***") if self._token else text)

    def _each(self, name: str, job: Callable[..., Any], end: float, sups: list[_Supervisor]) -> list[_Supervisor]:
        """Run ``job`` for each of ``sups`` in daemon threads; returns, at ``end``, those still running (a hung DNS)."""
        threads = {sup: threading.Thread(target=job, args=(sup,), name=name, daemon=True) for sup in sups}
        for thread in threads.values():
            thread.start()
        for thread in threads.values():
            thread.join(max(0.0, end - self._clock()))
        return [sup for sup, thread in threads.items() if thread.is_alive()]

    def register_all(self) -> None:
        """Register with all at once within ``timeout``; raise on a 409, or if ``required`` and any is missing."""
        deadline = self._clock() + self.timeout

        def one(sup: _Supervisor) -> None:
            while (due := self._attempt(sup, deadline - self._clock())) < deadline and not sup.refusal:
                self._sleep(max(0.0, due - self._clock()))
            if not sup.is_registered and not sup.refusal:
                sup.error = f"not reachable within {self.timeout:g}s (last error: {sup.error})"

        hung = self._each("picoapi-register", one, deadline + 0.25, self.supervisors)  # a cut takes a moment
        missing = [sup for sup in self.supervisors if not sup.is_registered]
        served = [s.error for s in missing if s.refusal == 409]  # fails startup, whatever required says
        text = "; ".join(f"{s.url}: {f'no answer within {self.timeout:g}s' if s in hung else s.error}" for s in missing)
        if served or (missing and self.required):
            raise RegistrationError("; ".join(served) or f"registration failed (API_REGISTER_REQUIRED is on): {text}")
        if missing:
            logger.warning("registration incomplete, retrying in the background: %s", text)

    def note_check(self, identity: str | None) -> None:
        """A health request came, ``identity`` in its supervisor header: a check of ours, a stranger's, or a probe's."""
        with self._lock:
            heard = [sup for sup in self.supervisors if identity and sup.identity == identity]
            for sup in heard:
                sup.last_seen = self._clock()
            self._stranger = self._stranger or bool(identity and not heard)

    def _still_checks(self, sup: _Supervisor) -> bool:
        """Whether ``sup`` still holds our entry and checked it lately (then it counts as heard from)."""
        url = f"{_base_url(sup.url)}{SERVICES_ROUTE}/{quote(self._id, safe='')}"
        try:
            resp, content = self._send("GET", url, self.watchdog_after)
        except requests.RequestException:
            return False
        entry = _json(content or b"") if resp.status_code == 200 else None
        last = entry.get("last_check") if _is_own_entry(entry, self.body, "name", "version") else None
        # By its own clock (no skew between hosts); a Date is whole seconds, so a check may look up to 1 s fresher.
        said = _http_date(resp.headers.get("Date"))
        if not isinstance(last, (int, float)) or (self._wall() if said is None else said) - last > self.watchdog_after:
            return False
        with self._lock:
            sup.last_seen = self._clock()
        return True

    def step(self) -> float:
        """One round of the background thread, the supervisors due asked at once; returns the seconds until the next."""
        now = self._clock()
        with self._lock:
            silent = [s for s in self.supervisors if s.is_registered and now - s.last_seen > self.watchdog_after]
            due = silent + [s for s in self.supervisors if not s.is_registered and now >= s.next_attempt]

        def one(sup: _Supervisor) -> None:
            # A silent one's checks may reach a sibling (uvicorn --workers): ask it; if a stranger checks us, register.
            if sup.is_registered:
                if (not self._stranger and self._still_checks(sup)) or self._stop.is_set():
                    return  # it checks us; or stop() cut the question: nothing was learnt
                logger.warning("%s no longer knows this worker process; registering again", sup.url)
                with self._lock:
                    sup.is_registered, self._stranger = False, False
            self._attempt(sup, 10.0)
            if sup.refusal:
                logger.error("%s %s", sup.url, sup.error)

        self._each("picoapi-registrar-round", one, now + 20.5, due)  # a question and a PUT, 10 s each
        waits = [sup.next_attempt - self._clock() for sup in self.supervisors if not sup.is_registered]
        return max(0.01, min([self.watchdog_after / DEFAULT_WATCHDOG_INTERVALS, 5.0, *waits]))

    def start(self) -> None:
        """Start the background thread (retries and watchdog), and the self-check's."""
        self._thread.start()
        delay = min(SELF_CHECK_AFTER, self.body["health"]["interval"])
        threading.Thread(target=self.check_self, args=(delay,), name="picoapi-self-check", daemon=True).start()

    def check_self(self, delay: float = 0.0) -> None:
        """After ``delay`` s, unless stopped, GET the health URL registered: an ERROR with the fix unless we answer."""
        if self._stop.wait(delay):
            return
        body, health = self.body, self.body["health"]
        try:
            answer, content = self._send("GET", health["url"], HealthSpec.model_validate(health).deadline)
        except Exception as exc:  # requests' errors, or any other: the thread never dies of it
            found = f"nothing answers there ({self._safe(_root_cause(exc))})"
        else:
            said = _json(content or b"")
            named = (said["name"], said.get("version")) if isinstance(said, dict) and "name" in said else None
            itself = bool(body.get("instance")) and answer.headers.get(INSTANCE_HEADER) == body["instance"]
            if named and not itself and named != (body["name"], body.get("version")):
                found = f"another service ('{_printable(' '.join(map(str, named)))}') answers there"
            elif named or INSTANCE_HEADER in answer.headers:
                return  # itself, a sibling, or a PicoAPI app's own route
            else:
                found = f"something else answers there (HTTP {answer.status_code}, not a PicoAPI health endpoint)"
        if not self._stop.is_set():  # shutting down cuts the check: nothing to report
            port = f"--port {body['port']} to uvicorn (picoapi worker binds API_PORT itself)"
            fix = f"pass {port}, or set API_PORT and API_HOST to where it listens"
            logger.error("registered %s but %s: the server binds another port or address; %s", self._id, found, fix)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:  # never let the thread die: log and try later
                logger.exception("registration thread step failed")
                wait = BACKOFF_CAP
            self._stop.wait(wait)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; cut the requests in flight, awaited ``timeout`` at most: no PUT lands after our DELETE."""
        with self._lock:
            self._stop.set()
            for adapter in self._in_flight:
                adapter.cut()
            self._lock.wait_for(lambda: not self._in_flight, timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def deregister_all(self, timeout: float = DEREGISTER_TIMEOUT) -> None:
        """DELETE this process's entry at every supervisor at once within ``timeout``, even where a cut PUT may be."""
        deadline = self._clock() + timeout * 0.75
        self.stop(timeout / 4)
        params = {"instance": self.body.get("instance")}  # requests leaves a None out

        def one(sup: _Supervisor) -> None:
            url = f"{sup.url.rstrip('/')}/{quote(self._id, safe='')}"
            try:  # bounded in total, as a PUT is: a trickling supervisor cannot keep a thread
                status = self._send("DELETE", url, timeout / 2, params=params, headers=self._headers)[0].status_code
                if status >= 300 and status not in (404, 409):  # 409: another process's now
                    logger.warning("deregistering from %s: HTTP %s", sup.url, status)
            except requests.RequestException as exc:
                logger.warning("deregistering from %s failed: %s", sup.url, self._safe(_root_cause(exc)))

        self._each("picoapi-deregister", one, deadline, self.supervisors)


def _log_like_uvicorn() -> None:
    """Show PicoAPI's log lines as uvicorn shows its own, unless logging for PicoAPI or the root is the user's."""
    server = logging.getLogger("uvicorn")
    if not (logger.handlers or logger.level or logging.getLogger().handlers) and server.handlers:
        logger.addHandler(server.handlers[0])
        logger.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), at most BACKOFF_CAP; else None."""
    value = (value or "").strip()
    if _is_whole(value):  # not '²', which isdigit() takes and float() refuses
        return min(BACKOFF_CAP, float(value))
    when = _http_date(value)
    return None if when is None else min(BACKOFF_CAP, max(0.0, when - time.time()))


def _http_date(value: str | None) -> float | None:
    """Unix seconds of an HTTP date (a Date or Retry-After header), or None."""
    try:
        return email.utils.parsedate_to_datetime((value or "").strip()).timestamp()
    except (TypeError, ValueError, OverflowError, OSError):  # not a date, or one no clock can hold
        return None


def _base_url(register_url: str) -> str:
    """A supervisor's base URL from its registration URL: ``http://keeper:8100/register`` -> ``http://keeper:8100``."""
    return register_url.rstrip("/").removesuffix(REGISTER_ROUTE)


def _is_own_entry(answer: Any, body: Mapping[str, Any], *also: str) -> TypeGuard[dict[str, Any]]:
    """Whether a supervisor's answer is the registry entry of the worker that sent ``body``, ``also`` fields too."""
    own = {"id": worker_id(body["host"], body["port"])} | {key: body.get(key) for key in ("host", "port", *also)}
    return isinstance(answer, dict) and all(answer.get(key) == value for key, value in own.items())


def _detail(content: bytes) -> str:
    """The supervisor's own message, raw (uncut, so the token can be scrubbed): FastAPI's ``detail`` if any."""
    answer, text = _json(content), content.decode("utf-8", "replace")
    detail = answer.get("detail", text) if isinstance(answer, dict) else text
    if isinstance(detail, list):  # FastAPI's 422: name each field that failed
        fields = [e for e in detail if isinstance(e, dict) and isinstance(e.get("loc", []), list)]
        detail = "; ".join(f"{'.'.join(map(str, e.get('loc', [])[1:]))}: {e.get('msg')}" for e in fields)
    return str(detail)


# -- Answers and operator views: OpenAPI documents, errors, tables, dashboard, metrics, discovery ------


def _fetch_openapi(url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """GET a worker's OpenAPI document within OPENAPI_TIMEOUT and OPENAPI_MAX_BYTES, no redirects; else a 502."""
    try:
        resp, body = _bounded_request(_Cuttable(), "GET", url, OPENAPI_TIMEOUT, OPENAPI_MAX_BYTES, headers=headers)
    except _Cut:
        raise HTTPException(502, f"the worker sent no complete OpenAPI document within {OPENAPI_TIMEOUT:g}s") from None
    except requests.RequestException as exc:
        raise HTTPException(502, f"the worker could not be reached ({type(_causes(exc)[-1]).__name__})") from None
    if resp.status_code != 200:
        raise HTTPException(502, f"the worker answered HTTP {resp.status_code} for {url}")
    if body is None:
        raise HTTPException(502, f"the worker's OpenAPI document is over {OPENAPI_MAX_BYTES} bytes")
    if not isinstance(document := _json(body), dict) or not isinstance(document.get("openapi"), str):
        raise HTTPException(502, "the worker's answer is no OpenAPI document: a JSON object with an 'openapi' field")
    return document


async def _no_worker_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NoWorkerAvailable)
    detail = {"detail": str(exc), "tags": exc.tags, "version": exc.version, "tried": [list(t) for t in exc.tried]}
    return JSONResponse(detail, status_code=503)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own 422, with the NaN, Infinity and lone surrogates it quotes back as text (FastAPI's answers 500)."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    try:
        body = to_json({"detail": errors}, inf_nan_mode="strings")
    except ValueError:  # a lone surrogate ("\ud800") in the input: quote it escaped
        body = to_json({"detail": [{**e, "input": _printable(e.get("input"))} for e in errors]}, inf_nan_mode="strings")
    return Response(body, status_code=422, media_type="application/json")


def _ago(when: float | None, now: float) -> str:
    return "-" if when is None else f"{max(0.0, now - when):.1f}s ago"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


#: The latter: Prometheus' HTTP service discovery (``http_sd_configs``), the healthy workers as scrape targets.
METRICS_ROUTE, TARGETS_ROUTE = "/metrics", "/prometheus/targets"
METRICS_MAX_TAGS = 50  #: GET /metrics counts workers by tag for the largest tags only: hostile tags add no labels
#: Upper bounds in seconds of the check latency and lateness histograms' buckets (Prometheus' defaults).
METRICS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Metrics:
    """The registry's counters for GET /metrics. A histogram: its counts per bucket (the last +Inf), then its sum."""

    def __init__(self) -> None:
        self.checks = [0, 0]  # failed, succeeded
        self.registrations = self.deregistrations = 0
        self.latency: list[float] = [0] * (len(METRICS_BUCKETS) + 1) + [0.0]
        self.lateness = list(self.latency)

    def checked(self, result: CheckResult) -> None:
        self.checks[result.ok] += 1
        for histogram, value in (self.latency, result.latency), (self.lateness, result.late):
            if value is not None:
                histogram[bisect.bisect_left(METRICS_BUCKETS, value)] += 1
                histogram[-1] += value


_LABEL_ESCAPES = str.maketrans({"\\": r"\\", '"': r"\"", "\n": r"\n"})  #: as the exposition format escapes labels
_Samples = list[tuple[str, dict[str, str], float]]  # a family's samples: (suffix of its name, labels, value)


def _exposition(registry: Registry, checker: HealthChecker | None) -> str:
    """The supervisor's metrics in the Prometheus text exposition format (version 0.0.4)."""
    metrics, workers, lines = registry.metrics, registry.workers(), list[str]()
    statuses = collections.Counter(w.status for w in workers)
    by_tag = collections.Counter((tag, w.status) for w in workers for tag in w.tags)
    sizes = collections.Counter(tag for w in workers for tag in w.tags)
    top = sorted(sizes, key=lambda tag: (-sizes[tag], tag))[:METRICS_MAX_TAGS]
    tagged: _Samples = [("", {"tag": tag, "status": s}, by_tag[tag, s]) for tag in top for s in STATUSES]
    postponed, in_flight, trouble = (checker.postponed, checker.in_flight, checker.trouble) if checker else (0, 0, "")
    results = {"ok": metrics.checks[True], "failed": metrics.checks[False], "postponed": postponed}
    checks: _Samples = [("", {"result": result}, n) for result, n in results.items()]

    def histogram(data: list[float]) -> _Samples:
        *counts, total = data  # one snapshot: the +Inf bucket and the count agree
        bounds = [f"{bound:g}" for bound in METRICS_BUCKETS] + ["+Inf"]
        buckets = [("_bucket", {"le": le}, n) for le, n in zip(bounds, itertools.accumulate(counts), strict=True)]
        return [*buckets, ("_sum", {}, total), ("_count", {}, sum(counts))]

    families: list[tuple[str, str, str, _Samples | float]] = [
        ("workers", "gauge", "Registered workers by status.", [("", {"status": s}, statuses[s]) for s in STATUSES]),
        ("workers_max", "gauge", "The most workers the registry takes (API_MAX_WORKERS).", registry.max_workers),
        ("tag_workers", "gauge", f"Workers by tag and status, for the {METRICS_MAX_TAGS} largest tags.", tagged),
        ("tags", "gauge", "Distinct tags of registered workers.", len(sizes)),
        ("checks_total", "counter", "Health checks by result (postponed: the supervisor could not check).", checks),
        ("check_latency_seconds", "histogram", "Seconds a check took, connect to answer.", histogram(metrics.latency)),
        ("check_lateness_seconds", "histogram", "Seconds a check began after it was due.", histogram(metrics.lateness)),
        ("checks_in_flight", "gauge", "Health checks under way.", in_flight),
        ("registrations_total", "counter", "Registrations that created or changed an entry.", metrics.registrations),
        ("deregistrations_total", "counter", "Workers removed: DELETE, API_DEREGISTER_AFTER.", metrics.deregistrations),
        ("checker_trouble", "gauge", "1 while the supervisor cannot make checks.", int(bool(trouble))),
    ]
    for name, kind, text, samples in families:
        lines += (f"# HELP picoapi_{name} {text}", f"# TYPE picoapi_{name} {kind}")
        for suffix, labels, value in samples if isinstance(samples, list) else [("", {}, samples)]:
            pairs = ",".join(f'{k}="{v.translate(_LABEL_ESCAPES)}"' for k, v in labels.items())
            lines.append(f"picoapi_{name}{suffix}{f'{{{pairs}}}' if pairs else ''} {value}")
    return "\n".join(lines) + "\n"


class TargetGroup(BaseModel):
    """One entry of Prometheus' HTTP service discovery: a worker and its labels."""

    targets: list[str]
    labels: dict[str, str]


def _tag_filter(
    tag: Annotated[list[str], Query(description="repeat for several, or separate with spaces; all must match")] = [],  # noqa: B006
) -> list[str]:
    """The tags asked for, validated like API_TAGS: 422 naming a bad one."""
    tags = [t for item in tag for t in re.split(r"[\s,]+", item) if t]
    try:
        if len(tags) > MAX_TAGS:
            raise ValueError(f"tag may be given at most {MAX_TAGS} times, got {len(tags)}")
        return [_check_tag("tag", t) for t in tags]
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["query", "tag"], "msg": str(exc), "type": "value_error"}]) from None


_Tags = Annotated[list[str], Depends(_tag_filter)]
_Instance = Annotated[str | None, Query(pattern=_INSTANCE_PATTERN, description="the stopping process")]

#: The dashboard's one script: it fetches the page anew and swaps in its #live part, keeping the form as typed.
_DASHBOARD_SCRIPT = """
const $ = (id) => document.getElementById(id);
let timer = setTimeout(update, REFRESH000), asked = 0;
async function update() {
  clearTimeout(timer);
  const mine = ++asked;  // the latest update wins, whichever answer comes first
  let page, error = null;
  try {
    const answer = await fetch(location.href, {cache: "no-store"});
    page = await answer.text();
    if (!answer.ok) error = [].concat(JSON.parse(page).detail).map((e) => e.msg || e).join("; ");
  } catch (e) { error = e.message; }
  if (mine !== asked) return;
  if (error === null) $("live").replaceWith(new DOMParser().parseFromString(page, "text/html").getElementById("live"));
  Object.assign($("error"), {textContent: "Not updated: " + error, hidden: error === null});
  timer = setTimeout(update, REFRESH000);
}
function go(url) { history.replaceState(null, "", url); update(); }
$("filter").onsubmit = (e) => { e.preventDefault(); go("?" + new URLSearchParams(new FormData(e.target))); };
document.onclick = (e) => { if (e.target.closest("#live a")) { e.preventDefault(); go(e.target.closest("a").href); } };
""".replace("REFRESH", str(DASHBOARD_REFRESH))
_DASHBOARD_DIGEST = base64.b64encode(hashlib.sha256(_DASHBOARD_SCRIPT.encode()).digest()).decode()
#: The dashboard runs its own script and nothing else, and fetches from the supervisor only.
_DASHBOARD_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
    f"form-action 'self'; frame-ancestors 'none'; script-src 'sha256-{_DASHBOARD_DIGEST}'",
}
_DASHBOARD_STYLE = """body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; } a { margin-right: 1rem; }
table { border-collapse: collapse; } th, td { text-align: left; padding: .2rem .6rem; border-bottom: 1px solid #eee; }
th { position: sticky; top: 0; background: #eee; } [data-count=healthy] { color: #137333; }
[data-status=unhealthy], [data-count=unhealthy], .trouble { color: #c5221f; }"""
_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})


def _dashboard(  # like every sync route, on a thread: never holding up the event loop
    request: Request, tags: _Tags, status: Status | None = None, page: Annotated[int, Query(ge=1, le=1_000_000)] = 1
) -> HTMLResponse:
    """The dashboard: counts over the workers with ``tags``, then a page of them, trouble first; all escaped."""
    app: PicoAPI = request.app
    registry, trouble = app._need_registry(), app.checker and app.checker.trouble
    tagged, now, wall, first = registry.workers(*tags), registry.clock(), registry._wall(), (page - 1) * DASHBOARD_PAGE
    counts, order = collections.Counter(w.status for w in tagged), {UNHEALTHY: 0, UNKNOWN: 1, HEALTHY: 2}
    matched = [w for w in tagged if status in (None, w.status)]
    matched.sort(key=lambda w: (order[w.status], not (w.failures or w.suspect), w.name, w.id))  # trouble in sight
    shown = matched[first : first + DASHBOARD_PAGE]

    def text(value: object) -> str:
        return str(value).translate(_HTML_ESCAPES)

    def link(label: str, attributes: str = "", **view: Any) -> str:  # to another view of the same tags
        query = {"tag": " ".join(tags), "status": status, "page": page} | view
        href = "&".join(f"{k}={quote(str(v))}" for k, v in query.items() if v)
        return f'<a href="?{text(href)}"{attributes}>{text(label)}</a>'

    def row(w: Worker) -> str:
        since = None if w._unhealthy_since is None else wall - (now - w._unhealthy_since)  # monotonic to Unix time
        when = "-" if since is None else f"{time.strftime('%X', time.localtime(since))} ({_ago(since, wall)})"
        cells = [w.name, w.id, w.version, " ".join(w.tags), w.status + " (suspect)" * w.suspect, w.last_error, when]
        tds = "".join(f"<td>{text(cell)}" for cell in [*cells, _ago(w.last_check, wall), _ms(w.last_latency)])
        return f'<tr class="worker" data-id="{text(w.id)}" data-status="{w.status}">{tds}<td>{w.failures}</tr>\n'

    title, rows = text(app.title), "".join(map(row, shown)) or "<tr><td>no worker</tr>"
    alert = f'<p class="trouble" role="alert">Checks postponed: {text(trouble)}</p>' if trouble else ""
    shown_text = f"{first + 1}-{first + len(shown)}" if shown else "none"
    shown_text += f" of {len(matched)} workers shown, {len(registry)} in all" + (f" ({status})" if status else "")
    pages = link("previous page", page=page - 1) if page > 1 else ""
    pages += link("next page", page=page + 1) if first + len(shown) < len(matched) else ""
    page_text = f"""<!doctype html><html lang="en"><meta charset="utf-8"><title>{title} - PicoAPI</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_DASHBOARD_STYLE}</style><h1>{title}</h1>
<form id="filter"><label>tags <input id="tag" name="tag" value="{text(" ".join(tags))}"></label> <button>filter</button>
</form><p class="trouble" id="error" role="alert" hidden></p><div id="live">{alert}
<p>{"".join(link(f"{counts[s]} {s}", f' data-count="{s}"', status=s, page=None) for s in STATUSES)}</p><table>
<tr><th>name<th>id<th>version<th>tags<th>status<th>last error<th>unhealthy since<th>last check<th>latency<th>failures
{rows}</table><p>{shown_text}; updated every {DASHBOARD_REFRESH} s. {pages}</div><script>{_DASHBOARD_SCRIPT}</script>"""
    return HTMLResponse(page_text, headers=_DASHBOARD_HEADERS)


# -- The PicoAPI class ---------------------------------------------------------


class PicoAPI(FastAPI):
    """A FastAPI app that is a worker (registers itself) or a supervisor (keeps the registry).

    Keywords naming a :class:`Config` setting (``mode``, ``tags``...) win over the environment and ``.env``, or
    give ``config=``; others go to FastAPI, a misspelt setting is a ConfigError. ``is_master`` is 1.x's ``mode``."""

    def __init__(
        self,
        *,
        config: Config | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        is_master: bool | None = None,
        **options: Any,
    ) -> None:
        config, options = _split_keywords(options, config, env_file, is_master)
        if config.mode == "worker" and config.register_urls:
            config.registration()  # raises ConfigError now if host or title is missing
        super().__init__(**options)
        self.config = config  #: the validated settings of this app
        self.registrar: Registrar | None = None  #: a worker's registrar (with API_REGISTER_PATH set), else None
        self.registry: Registry | None = None  #: a supervisor's registry and checker, else None
        self.checker: HealthChecker | None = None
        self.supervisor_id = uuid.uuid4().hex[:12]
        self.instance = uuid.uuid4().hex[:12]  #: this process's id, anew at every startup: it registers, checks say it
        self._store: _Store | None = None
        self._health_checks: dict[str, Callable[[], Any]] = {}
        # call() and broadcast() reuse connections: a session per thread, closed at stop or when its thread ends.
        self._sessions: weakref.WeakKeyDictionary[threading.Thread, requests.Session] = weakref.WeakKeyDictionary()
        self._sessions_lock = threading.Lock()  # guards _sessions
        self._broadcaster: concurrent.futures.ThreadPoolExecutor | None = None
        first_own = len(self.router.routes)
        if config.mode == "supervisor":
            limits: dict[str, Any] = {"failures": config.health_failures, "successes": config.health_successes}
            self.registry = Registry(max_workers=config.max_workers, deregister_after=config.deregister_after, **limits)
            self._supervisor = _SupervisorRoutes(self, self.registry)
            # The routes themselves, not an include_router entry: build_middleware_stack moves a user's ahead of them.
            self.router.routes += self._supervisor.router().routes
            self.add_exception_handler(NoWorkerAvailable, _no_worker_handler)
            if self.exception_handlers.get(RequestValidationError) is request_validation_exception_handler:
                self.add_exception_handler(RequestValidationError, _validation_handler)  # unless it is the user's
        health: dict[str, Any] = {"include_in_schema": False, "tags": ["picoapi"], "operation_id": "picoapi_health"}
        self.add_api_route(config.health_route, self._health_endpoint, **health)
        cors = {f"allow_{k}": getattr(config, f"cors_allow_{k}") for k in "origins methods headers credentials".split()}
        self.add_middleware(_CORS, **cors, guarded=REGISTER_ROUTE if config.mode == "supervisor" else None)
        if config.allowed_hosts:  # unset: no middleware, every host served at no cost
            self.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts), www_redirect=False)
        self.router.lifespan_context = functools.partial(self._lifespan, self.router.lifespan_context)
        self._own_routes = self.router.routes[first_own:]

    @property
    def mode(self) -> str:
        """``"worker"`` or ``"supervisor"``, from :attr:`config`."""
        return self.config.mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Here, not in the route, so a health route of the user's own is noted and says who answered too.
        if scope["type"] != "http" or scope["path"] != self.config.health_route:
            return await super().__call__(scope, receive, send)
        if self.registrar is not None:
            self.registrar.note_check(Headers(scope=scope).get(SUPERVISOR_HEADER))
        await super().__call__(scope, receive, _adding_header(send, (b"x-picoapi-instance", self.instance.encode())))

    def build_middleware_stack(self) -> ASGIApp:
        # PicoAPI's routes first (a catch-all cannot swallow /health); a user's on the very same path moves ahead.
        own, theirs = {id(r) for r in self._own_routes}, set[str | None]()
        for r in [r for r in self.router.routes if id(r) not in own]:
            inner: list[Any] = getattr(r, "effective_route_contexts", list)()  # include_router's entry (FastAPI 0.165)
            theirs |= {getattr(r, "path", None), *(c.path or getattr(c.starlette_route, "path", None) for c in inner)}
        self.router.routes.sort(key=lambda r: id(r) in own and getattr(r, "path", None) in theirs)  # stable: to the end
        return super().build_middleware_stack()

    @asynccontextmanager
    async def _lifespan(self, inner: Callable[[Any], Any], app: Any) -> AsyncIterator[Any]:
        """The app's own lifespan ``inner``, PicoAPI started in it and stopped before it ends (half-started too)."""
        config = self.config
        async with inner(app) as state:
            try:
                self.instance = uuid.uuid4().hex[:12]  # anew: the processes of a server that forks after import differ
                _log_like_uvicorn()
                if config.mode == "supervisor":
                    await run_in_threadpool(self._start_supervisor)
                elif config.register_urls:
                    body = {**config.registration(), "instance": self.instance}
                    body |= {"openapi": self.openapi_url} if self.openapi_url else {}
                    options: dict[str, Any] = {"timeout": config.register_timeout, "required": config.register_required}
                    self.registrar = Registrar(config.register_urls, body, token=config.register_token, **options)
                    await run_in_threadpool(self.registrar.register_all)
                    self.registrar.start()
                else:  # a warning only if something shows it was meant to register: a plain app starts quietly
                    level = logging.WARNING if config.configured & _MEANT_TO_REGISTER else logging.INFO
                    given = f" (its tags {list(config.tags)} go nowhere)" if config.tags else ""
                    fix = "set API_REGISTER_PATH to the supervisor's /register URL, e.g. http://127.0.0.1:8100/register"
                    why = f"API_REGISTER_PATH is not set{given}, so this worker serves as a plain app; {fix}"
                    logger.log(level, "not registering with a supervisor: %s", why)
                yield state
            finally:
                if self.registrar is not None:
                    await run_in_threadpool(self.registrar.deregister_all)
                if self.checker is not None:
                    await run_in_threadpool(self.checker.stop)
                if self._store is not None:
                    self._store.close()
                if self._broadcaster is not None:
                    self._broadcaster.shutdown(wait=False, cancel_futures=True)
                self.registrar = self.checker = self._store = self._broadcaster = None
                with self._sessions_lock:
                    for session in self._sessions.values():
                        session.close()
                    self._sessions.clear()

    def _start_supervisor(self) -> None:
        registry, file = self.registry, self.config.registry_file
        assert registry is not None
        if file:
            self._store = _Store(file, registry.__contains__)
            self.supervisor_id, before = self._store.identity(), len(registry)
            try:
                for reg, address, instances in self._store.load():
                    if worker_id(reg.host, reg.port) not in registry:
                        for instance in instances or [reg.instance or ""]:  # the same registration from each process
                            registry.register(reg.model_copy(update={"instance": instance or None}), address=address)
            except RegistryFull:
                logger.warning("registry file holds more than API_MAX_WORKERS workers; rest skipped")
            logger.info("loaded %d workers from %s", len(registry) - before, file)
        self.checker = HealthChecker(registry, supervisor_id=self.supervisor_id, on_change=self._changed)
        gc.freeze()  # else full collections walk every import's objects: 20-45 ms pauses at 5,000-10,000 workers
        self.checker.start()

    def _changed(self, wid: str, change: StatusChange) -> None:
        if change.removed and self._store is not None:
            self._store.forget(wid)  # deleted by the next write: never disk I/O on the check thread

    def _need_registry(self) -> Registry:
        if self.registry is None:
            raise PicoAPIError("pick(), call() and broadcast() need a supervisor: PicoAPI(mode='supervisor')")
        return self.registry

    def pick(self, *tags: str, version: str | None = None) -> Worker:
        """A healthy worker with every tag, in turns (round-robin, thread-safe); else :class:`NoWorkerAvailable`."""
        return self._need_registry().pick(tags, version)

    def call(
        self,
        tags: str | Sequence[str],
        method: str,
        path: str,
        *,
        version: str | None = None,
        retry_sent: bool = False,
        timeout: Any = DEFAULT_CALL_TIMEOUT,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request to a healthy worker with ``tags``; returns its response, whatever its status. A worker not
        connected to is marked suspect and the next one tried (one that may have got it, only with ``retry_sent``);
        else :class:`NoWorkerAvailable`. ``kwargs`` go to ``requests``; redirects are returned unless allowed."""
        registry, wanted = self._need_registry(), [tags] if isinstance(tags, str) else list(tags)
        tried: list[tuple[str, str]] = []
        while True:
            try:
                worker = registry.pick(wanted, version, exclude=[wid for wid, _ in tried])
            except NoWorkerAvailable:
                raise NoWorkerAvailable(wanted, version, tried) from None
            try:
                return self._send(worker, method, path, timeout, kwargs)
            except requests.RequestException as exc:
                unmade = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
                never_sent = any(isinstance(e, unmade) for e in _causes(exc))  # the connection was never made
                if not (retry_sent or isinstance(exc, requests.ConnectionError) and never_sent):
                    raise
                registry.mark_suspect(worker.id)
                tried.append((worker.id, _root_cause(exc)[:MAX_ERROR]))
                logger.warning("call to %s failed (%s); marked suspect", worker.id, tried[-1][1])

    def broadcast(
        self,
        tags: str | Sequence[str],
        method: str,
        path: str,
        *,
        version: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        **kwargs: Any,
    ) -> dict[str, requests.Response | Exception]:
        """Send the same request to every healthy worker with ``tags``, concurrently; returns ``{worker id: response
        or exception}`` within about ``timeout`` seconds (a worker still busy then gets a ``TimeoutError``)."""
        registry, wanted = self._need_registry(), [tags] if isinstance(tags, str) else list(tags)
        workers = [w for w in registry.workers(*wanted, status=HEALTHY, version=version) if w.is_ready]
        if self._broadcaster is None:
            self._broadcaster = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="picoapi-broadcast")
        futures = {self._broadcaster.submit(self._send, w, method, path, timeout, kwargs): w.id for w in workers}
        finished, _ = concurrent.futures.wait(futures, timeout=timeout + 0.5)
        results: dict[str, requests.Response | Exception] = {}
        for future, wid in futures.items():
            future.cancel()  # one not started never starts; a finished one stays as it is
            try:
                results[wid] = future.result(timeout=0)
            except Exception as exc:  # not finished in time: a TimeoutError, or CancelledError if never started
                results[wid] = exc if future in finished else TimeoutError(f"{wid} did not answer within {timeout:g}s")
        return results

    def _send(self, worker: Worker, method: str, path: str, timeout: Any, kwargs: dict[str, Any]) -> requests.Response:
        """``method path`` to ``worker`` on this thread's session, not following a redirect unless asked to."""
        thread = threading.current_thread()
        if (session := self._sessions.get(thread)) is None:
            session, adapter = requests.Session(), requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with self._sessions_lock:
                self._sessions[thread] = session
        url, options = worker._request(path, {"allow_redirects": False, **kwargs})
        return session.request(method, url, timeout=timeout, **options)

    def health_check(self, func: Callable[[], Any] | None = None, *, name: str | None = None) -> Any:
        """Decorator: add a check (async, or sync run on a thread); the health endpoint is 503 while it fails."""
        if func is None:  # as @app.health_check(name=...)
            return functools.partial(self.health_check, name=name)
        self._health_checks[name or str(getattr(func, "__name__", repr(func)))] = func
        return func

    async def _health_endpoint(self) -> JSONResponse:
        failing: dict[str, str] = {}
        for check_name, check in self._health_checks.items():
            try:
                ok = await check() if inspect.iscoroutinefunction(check) else await run_in_threadpool(check)
                if not ok:
                    failing[check_name] = f"returned {ok!r}"
            except Exception as exc:
                failing[check_name] = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
        if self.checker is not None and self.checker.trouble:  # a supervisor that cannot check says so
            failing["picoapi-checker"] = self.checker.trouble
        # As registered (FastAPI's default version is not API_VERSION's): a sibling's check_self knows them.
        body: dict[str, Any] = {"status": UNHEALTHY if failing else HEALTHY, "name": self.config.title or self.title}
        body |= {"version": self.config.version, **({"failing": failing} if failing else {})}
        return JSONResponse(body, status_code=503 if failing else 200)


_FASTAPI_SETTINGS = frozenset({"title", "description", "version"})  #: FastAPI options too: PicoAPI(title=...) sets both
#: The settings that show a worker was meant to register (FastAPI's title= keyword alone does not).
_MEANT_TO_REGISTER = frozenset("tags host title register_required health_path health_interval health_timeout".split())
_FASTAPI_OPTIONS = frozenset(inspect.signature(FastAPI.__init__).parameters) - {"self", "extra"}


def _split_keywords(
    options: dict[str, Any], config: Config | None, env_file: str | os.PathLike[str] | None, is_master: bool | None
) -> tuple[Config, dict[str, Any]]:
    """PicoAPI's keywords split into its :class:`Config` and FastAPI's; title, description and version go to both."""
    settings = {k: options.pop(k) for k in _SETTINGS.keys() - _FASTAPI_SETTINGS & options.keys()}
    if misspelt := [k for k in options if k not in _FASTAPI_OPTIONS and _close_setting(k)]:
        raise ConfigError(_unknown_settings(misspelt))
    if config is None:
        config = Config.load({**settings, "is_master": is_master}, env_file=env_file)
        shared = {k: options[k] for k in _FASTAPI_SETTINGS if options.get(k)}  # PicoAPI(title=...) sets both
        for name, raw in shared.items():
            try:
                shared[name] = _SETTINGS[name].parse(_SETTINGS[name].var, raw, *_SETTINGS[name].bounds)
            except ConfigError:
                if config.mode == "worker" and config.register_urls:
                    raise
        config = dataclasses.replace(config, **shared)
    elif settings or is_master is not None:
        given = sorted(settings) + ["is_master"] * (is_master is not None)
        raise ConfigError(f"give settings in config= or as keywords, not both: got config= and {given}")
    return config, {**{k: getattr(config, k) for k in _FASTAPI_SETTINGS & config.configured}, **options}


def _adding_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    """``send``, adding ``header`` to the response's headers."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return sending


class _CORS(CORSMiddleware):
    """Starlette's CORS middleware, with a fast path (no Origin: only ``Vary: Origin``) and a guard on ``guarded``
    (/register): a body over MAX_BODY is 413, a write or its preflight from an origin not listed by name 403."""

    def __init__(self, app: ASGIApp, /, *, guarded: str | None = None, **options: Any) -> None:
        super().__init__(app, **options)
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # as the router sees it, behind a proxy too
        if self.guarded and f"{path}/".startswith(f"{self.guarded}/"):
            headers, method = Headers(scope=scope), scope["method"]
            if method == "OPTIONS":  # a preflight: for the write it asks about
                method = headers.get("access-control-request-method", method)
            origin, write = headers.get("origin"), method not in ("GET", "HEAD")
            if write and origin is not None and (origin == "*" or origin not in self.allow_origins):
                fix = "list it by name in API_CORS_ALLOW_ORIGINS ('!'-delimited; '*' does not count) to let it write"
                detail = f"{_printable(method, 16)} {self.guarded} from origin '{_printable(origin)}' refused: {fix}"
                return await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
            receive = _limited(receive)
        if not any(k == b"origin" for k, _ in scope["headers"]):
            return await self.app(scope, receive, _adding_header(send, (b"vary", b"Origin")))
        await super().__call__(scope, receive, send)


def _limited(receive: Receive) -> Receive:
    """``receive``, raising a 413 once the body passes MAX_BODY bytes."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        return message

    return counted


# -- The supervisor's routes -----------------------------------------------------


class _SupervisorRoutes:
    """The supervisor's HTTP API: workers register and deregister, anyone reads; bodies are :func:`_out`'s, as built."""

    def __init__(self, app: PicoAPI, registry: Registry) -> None:
        self.app, self.registry, self.config = app, registry, app.config
        self.busy = collections.Counter[str]()  #: what is under way on threads, by kind (see :meth:`on_thread`)

    def router(self) -> APIRouter:
        """The routes and the answers each may give; with API_REGISTER_TOKEN set, those that write need it."""
        token, routes = self.config.register_token, APIRouter(tags=["picoapi"], dependency_overrides_provider=self.app)

        def add(method: str, path: str, endpoint: Callable[..., Any], answers: dict[int, Any], **options: Any) -> None:
            if method != "GET" and token:  # no token: no dependency to resolve per request
                options["dependencies"] = [Depends(self.require_token)]
                answers = {401: "no bearer token", 403: "wrong token", **answers}
            options["responses"] = {c: {"description": a} if isinstance(a, str) else a for c, a in answers.items()}
            options["operation_id"] = f"picoapi_{endpoint.__name__}"
            routes.add_api_route(path, endpoint, methods=[method], **options)

        registering = {
            201: {"model": WorkerOut, "description": "registered"},
            400: "the body is not JSON",
            413: f"the body is over {MAX_BODY} bytes",
            422: "a field is invalid, or the host does not resolve",
            503: "the registry is full (API_MAX_WORKERS), or busy: see Retry-After",
        }
        add("PUT", REGISTER_ROUTE, self.register, registering, response_model=WorkerOut)
        not_found, busy = {404: "no worker with that id"}, {503: "the registry file is busy: see Retry-After"}
        add("DELETE", REGISTER_ROUTE + "/{worker_id}", self.deregister, not_found | busy, status_code=204)
        link = {"description": '`<URL>; rel="next"` while more entries remain', "schema": {"type": "string"}}
        add("GET", SERVICES_ROUTE, self.services, {200: {"headers": {"Link": link}}}, response_model=list[WorkerOut])
        add("GET", SERVICES_ROUTE + "/{worker_id}", self.service, not_found, response_model=WorkerOut)
        fetching = {
            409: "the worker is not healthy: nothing is asked of it",
            502: f"the worker sent no OpenAPI document within {OPENAPI_TIMEOUT:g} s",
            503: "too many documents are being fetched: see Retry-After",
        }
        add("GET", SERVICES_ROUTE + "/{worker_id}/openapi", self.service_openapi, not_found | fetching)
        add("GET", METRICS_ROUTE, self.metrics, {}, response_class=PlainTextResponse)
        add("GET", TARGETS_ROUTE, self.prometheus_targets, {}, response_model=list[TargetGroup])
        add("GET", DASHBOARD_ROUTE, _dashboard, {}, include_in_schema=False)
        return routes

    async def register(self, reg: Registration, request: Request) -> Response:
        """Register a worker (only an address it registers from), or refresh or replace its entry."""
        claim = (reg.host, request.client.host if request.client else None, self.config.register_networks)
        try:
            if _ip(reg.host) is not None:
                address = _claimed_address(*claim)
            else:  # a name: resolved on a thread, at most MAX_RESOLVING at once
                address = await self.on_thread("host names are being resolved", MAX_RESOLVING, _claimed_address, *claim)
            await self.refuse_if_served(reg, address)
            worker, created = await self.write(self.add, reg, address)
        except ValueError as exc:  # the host does not resolve, or is not spelled canonically
            raise HTTPException(422, [{"loc": ["body", "host"], "msg": str(exc), "type": "value_error"}]) from None
        except (PermissionError, RegistryFull) as exc:  # a claim refused, or no room
            raise HTTPException(403 if isinstance(exc, PermissionError) else 503, str(exc)) from None
        if created:
            logger.info("registered %s (%s)", worker.id, worker.name)
        return _json_response(_out(worker), 201 if created else 200, {SUPERVISOR_HEADER: self.app.supervisor_id})

    async def deregister(self, worker_id: str, request: Request, instance: _Instance = None) -> Response:
        """Remove a worker, from its own address (or with the token); not while a sibling process still serves it."""
        entry = self.known(worker_id)
        peer = _ip(request.client.host if request.client else None)
        # The token's holder, or the worker (no peer: a unix socket, 'uvicorn --uds', is neither).
        trusted = self.config.register_token or (peer is not None and peer == _ip(entry.address))
        if not trusted and (peer is None or not any(peer in net for net in self.config.register_networks)):
            where = f"its own address {entry.address}, not from {peer or 'an unknown address'}"
            fix = "with API_REGISTER_TOKEN set, its holder may remove it from anywhere"
            raise HTTPException(403, f"{worker_id} may only be deregistered from {where}; {fix}")
        if instance is not None and entry.instances:
            if instance not in entry.instances:
                raise HTTPException(409, f"{worker_id} was registered by another process; it stays")
            left = self.registry.forget_instance(worker_id, instance)
            if left and await self.answered_by_own(entry, left):
                logger.info("%s: one of its processes stopped, another still serves it", worker_id)
                return Response(status_code=204)
        if not await self.write(self.remove, worker_id):
            raise _unknown(worker_id)
        logger.info("deregistered %s", worker_id)
        return Response(status_code=204)

    async def services(
        self,
        request: Request,
        tags: _Tags,
        name: str | None = None,
        version: str | None = None,
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=SERVICES_PAGE, description="entries per page")] = SERVICES_PAGE,
        after: Annotated[str | None, Query(description="only ids after this one: the previous page's last")] = None,
    ) -> Response:
        """The registered workers, filtered, by id, a page at a time: the Link header leads to the next."""
        workers = self.registry.workers(*tags, status=status, name=name, version=version)
        start = 0 if after is None else bisect.bisect_right(workers, after, key=operator.attrgetter("id"))
        page, headers = workers[start : start + limit], {}
        if start + limit < len(workers):  # a path, not a URL: the Host header the caller sent is not echoed back
            following = request.url.include_query_params(after=page[-1].id, limit=limit)
            headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
        return _json_response([_out(w) for w in page], headers=headers)

    async def service(self, worker_id: str) -> Response:
        """One registered worker."""
        return _json_response(_out(self.known(worker_id)))

    async def service_openapi(self, worker_id: str) -> dict[str, Any]:
        """The worker's own OpenAPI document (the forms of work it supports), only from a healthy worker."""
        worker = self.known(worker_id)
        if not worker.is_ready:
            why = f"status {worker.status}, {worker.failures} failed checks in a row"
            why += ", a call could not connect" if worker.suspect else ""
            raise HTTPException(409, f"{worker_id} is not healthy ({why}); nothing is fetched until a check passes")
        url, options = worker._request(worker.openapi or "/openapi.json", {})
        fetching = "OpenAPI documents are being fetched"
        return await self.on_thread(fetching, OPENAPI_MAX_FETCHES, _fetch_openapi, url, options.get("headers"))

    def metrics(self) -> PlainTextResponse:
        """The supervisor's metrics in the Prometheus text exposition format."""
        text = _exposition(self.registry, self.app.checker)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def prometheus_targets(self, tags: _Tags) -> Response:
        """The healthy workers with every tag, as Prometheus' HTTP service discovery reads them."""
        groups = []
        for w in self.registry.workers(*tags, status=HEALTHY):
            labels = {"id": w.id, "name": w.name, "version": w.version, "tags": f",{','.join(w.tags)},"}
            labels["scheme"] = urlsplit(w.health_url).scheme
            groups.append({"targets": [w.id], "labels": {f"__meta_picoapi_{k}": v for k, v in labels.items()}})
        return _json_response(groups)

    async def require_token(self, request: Request) -> None:
        token, header = self.config.register_token or "", request.headers.get("authorization", "")
        if not header:
            raise HTTPException(401, "missing 'Authorization: Bearer <token>' header", {"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    def known(self, wid: str) -> Worker:
        """A copy of the worker ``wid``; 404 if there is none."""
        if (worker := self.registry.get(wid)) is None:
            raise _unknown(wid)
        return worker

    async def on_thread(self, kind: str, limit: int, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on a thread, at most ``limit`` of a ``kind`` at once, else 503 (counted on the loop)."""
        if self.busy[kind] >= limit:
            raise HTTPException(503, f"too many {kind}; try again", {"Retry-After": "1"})
        self.busy[kind] += 1
        try:
            return await run_in_threadpool(func, *args)
        finally:
            self.busy[kind] -= 1

    async def refuse_if_served(self, reg: Registration, address: str) -> None:
        """409 when ``reg`` would change an entry another live process serves (a copy on a taken port)."""
        entry = self.registry.get(worker_id(reg.host, reg.port))
        if entry is None or not entry.instances or reg.instance in entry.instances:
            return
        if _content_of(entry) != _content(reg, address) and await self.answered_by_own(entry):
            served = f"{entry.id} is served by another live instance ({entry.name} {entry.version})"
            raise HTTPException(409, f"{served}; stop it first, or serve this one on another port")

    async def answered_by_own(self, entry: Worker, instances: Sequence[str] = ()) -> bool:
        """Check ``entry`` now (at most 0.75 s): did one of ``instances`` (its own, by default) answer?"""
        headers = self.app.checker.headers if self.app.checker is not None else {}
        timeout = min(entry.timeout, 0.75)  # within the worker's own wait for its DELETE
        args = (check_once, entry.health_url, timeout, headers, entry.address)
        result = await self.on_thread("registrations are being checked against a live process", MAX_RESOLVING, *args)
        return result.ok and result.instance in (instances or entry.instances)

    async def write(self, change: Callable[..., Any], *args: Any) -> Any:
        """``change(*args)``, with a registry file on a thread under its lock; a busy file is 503, nothing changed."""
        if (store := self.app._store) is None:
            return change(*args)

        def locked() -> Any:
            with store.lock:
                return change(*args)

        try:
            return await run_in_threadpool(locked)
        except sqlite3.Error as exc:
            logger.warning("the registry file could not be written: %s", exc)
            busy = f"the registry file is busy or cannot be written ({exc}); try again"
            raise HTTPException(503, busy, {"Retry-After": "1"}) from None

    def add(self, reg: Registration, address: str) -> tuple[Worker, bool]:
        """Register ``reg`` from ``address``, its row first (see :meth:`write`); returns (a copy, created)."""
        if (store := self.app._store) is None:
            return self.registry.register(reg, address=address)
        wid = worker_id(reg.host, reg.port)
        store.save(wid, reg, address)
        try:
            worker, created = self.registry.register(reg, address=address)
        except RegistryFull:  # raised for a new worker only: its row goes
            store.delete(wid)
            raise
        if worker.instances[1:]:  # a sibling process joined: keep every one across a restart
            store.save(wid, reg, address, worker.instances)
        return worker, created

    def remove(self, wid: str) -> bool:
        """Deregister ``wid``, its row first (see :meth:`write`); False if it is not registered."""
        if self.app._store is not None and wid in self.registry:
            self.app._store.delete(wid)
        return self.registry.deregister(wid)


def _claimed_address(host: str, peer: str | None, networks: Sequence[IPNetwork] = ()) -> str:
    """The address (where checks go) a registration from ``peer`` may claim for ``host`` (blocking: DNS): the peer's,
    or one in ``networks`` (a special one only there); else ValueError (unresolved, an IP misspelt), PermissionError."""
    ip = _ip(host)
    with contextlib.suppress(OSError, UnicodeError):  # numeric only: 127.1, 0x7f.1, 2130706433 (no DNS)
        ip = ip or _ip(str(socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)[0][4][0]))
    if ip is not None and str(ip) != host:
        raise ValueError(f"host {host!r} is another spelling of {ip}; register '{ip}'")
    try:
        found = [] if ip else socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({_printable(exc)}); fix DNS or register an IP") from exc
    addresses = [ip] if ip else list(dict.fromkeys(a for info in found if (a := _ip(str(info[4][0]))) is not None))
    listed = [a for a in addresses if any(a in net for net in networks)]
    for a in addresses:
        if a not in listed and (a.is_unspecified or a.is_link_local or a.is_multicast or str(a) == "255.255.255.255"):
            special = "an unspecified, link-local, multicast or broadcast address"
            fix = "declare the worker's own address (a network listed in API_REGISTER_NETWORKS opens it)"
            raise PermissionError(f"host {host!r} resolves to {a}, {special}; {fix}")
    if (peer_ip := _ip(peer)) in addresses:
        return str(peer_ip)
    if listed:
        return str(listed[0])
    came = f"but the registration came from {_printable(peer)}: a worker registers only an address it is reachable at"
    fix = "register from that host, or list its network in API_REGISTER_NETWORKS (NAT, proxies, containers)"
    raise PermissionError(f"host {host!r} resolves to {', '.join(map(str, addresses))}, {came}; {fix}")


def _unknown(wid: str) -> HTTPException:
    return HTTPException(404, f"no worker with id {wid!r}; GET {SERVICES_ROUTE} lists them")


def _json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``content`` serialised once, as it is: for bodies built from the registry's own data."""
    return Response(to_json(content), status_code, headers, media_type="application/json")


# -- Command line --------------------------------------------------------------

STATUS_MAX_BYTES = 8 * 2**20  #: the most ``picoapi status`` reads of one page (SERVICES_PAGE entries: ~6 MB)


def _load_app(args: argparse.Namespace) -> PicoAPI:
    """The app ``picoapi supervisor|worker`` serves: ``args.app`` (an app or an app factory) or a bare supervisor."""
    import importlib

    global _env_file_instead
    if args.env_file and not os.path.exists(args.env_file):
        raise ConfigError(f"--env-file {args.env_file!r} does not exist; pass the path of an existing file")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535, got {args.port}")
    os.environ.update({k: str(v) for k, v in {"API_PORT": args.port, "API_BIND": args.bind}.items() if v is not None})
    _env_file_instead = args.env_file
    try:
        if not args.app:
            app = PicoAPI(mode="supervisor")
            app.title = app.config.title or "PicoAPI supervisor"  # not FastAPI's default, "FastAPI"
            return app
        module_name, _, attr = args.app.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            app = getattr(importlib.import_module(module_name), attr or "app")
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load the app {args.app!r} (expected module:attribute): {exc}") from exc
        if callable(app) and not isinstance(app, FastAPI):
            app = app()  # an app factory
    finally:
        _env_file_instead = None
    if not isinstance(app, PicoAPI):
        raise ConfigError(f"{args.app!r} is a {type(app).__name__}, not a PicoAPI app")
    if app.mode != args.command:
        raise ConfigError(f"{args.app!r} is a {app.mode}; run it with 'picoapi {app.mode}'")
    return app


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # only the command line needs it

    app = _load_app(args)
    if not app.config.bind:
        raise ConfigError("API_BIND must be set to serve (e.g. 127.0.0.1 or 0.0.0.0), or pass --bind")
    uvicorn.run(app, host=app.config.bind, port=app.config.port, log_level="info")
    return 0


def _services(url: str, tags: Sequence[str], timeout: float) -> tuple[list[dict[str, Any]], bool]:
    """The supervisor's entries and whether that is all (each page read within ``timeout`` s), or PicoAPIError."""
    where, entries, pages = url + SERVICES_ROUTE, list[dict[str, Any]](), TypeAdapter(list[WorkerOut])

    def not_one(why: str) -> PicoAPIError:
        return PicoAPIError(f"{where} {why}: not a PicoAPI supervisor (pass its base URL or its /register URL)")

    for _ in range(STATUS_MAX_PAGES):
        query = {"tag": list(tags), "limit": SERVICES_PAGE, "after": entries[-1]["id"] if entries else None}
        try:
            resp, content = _bounded_request(_Cuttable(), "GET", where, timeout, STATUS_MAX_BYTES, params=query)
        except requests.RequestException as exc:
            raise PicoAPIError(f"cannot reach the supervisor at {url}: {_printable(_root_cause(exc))}") from None
        if resp.status_code != 200:
            said = f"answered HTTP {resp.status_code}"
            raise not_one(said) if resp.status_code in (404, 405) else PicoAPIError(f"{where} {said}")
        if content is None:
            raise not_one(f"sent a page over {STATUS_MAX_BYTES // 2**20} MB")
        if (page := _json(content)) is None:
            raise not_one("did not answer JSON")
        try:
            ids = [e["id"] for e in entries[-1:]] + [e.id for e in pages.validate_python(page, strict=True)]
        except ValidationError as exc:
            error = exc.errors()[0]
            where_in = "entry " + ".".join(map(str, error["loc"])) if error["loc"] else "the answer"
            raise not_one(_printable(f"sent a malformed page ({where_in}: {error['msg']})")) from None
        if ids != sorted(set(ids)):  # strictly rising ids: the pages cannot repeat or loop
            raise not_one("sent entries out of id order")
        entries += page
        if not page or "next" not in resp.links:
            return entries, True
    return entries, False


def _workers(n: int, status: str = "") -> str:
    """'1 worker', '2 healthy workers'."""
    return " ".join(filter(None, (str(n), status, "worker" if n == 1 else "workers")))


def _print_status(entries: Sequence[Mapping[str, Any]]) -> None:
    """The entries as a table and a summary; every cell escaped, for it came from the far end."""
    now, cell = time.time(), functools.partial(_printable, limit=MAX_DESCRIPTION)
    rows = []
    for e in entries:
        shown = (e["id"], e["name"], e["version"], ",".join(e["tags"]), e["status"] + ("*" if e.get("suspect") else ""))
        latency = None if e.get("failures") else e.get("last_latency")  # a failed check's time says nothing
        rows.append((*map(cell, shown), _ago(e.get("last_check"), now), _ms(latency)))
    table = [("ID", "NAME", "VERSION", "TAGS", "STATUS", "LAST CHECK", "LATENCY"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]  # aligned columns
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table))
    counts = collections.Counter(cell(e["status"]) for e in entries)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"\n{_workers(len(entries))}" + (f": {summary}" if summary else ""), flush=True)


def _wait_for(
    url: str, tags: Sequence[str], count: int, timeout: float, status: str = HEALTHY, alive: Callable[[], Any] = list
) -> list[dict[str, Any]]:
    """Wait up to ``timeout`` s for ``count`` workers with ``tags`` in ``status``; returns them, else PicoAPIError."""
    deadline, found, why = time.monotonic() + timeout, list[dict[str, Any]](), ""
    while len(found) < count:
        alive()  # raises when they can no longer come
        if time.monotonic() > deadline:
            tagged = f" tagged {' and '.join(tags)}" if tags else ""
            raise PicoAPIError(f"timed out waiting for {_workers(count, status)}{tagged}{why}")
        time.sleep(0.05)
        try:  # the supervisor may not be up yet
            left = min(5.0, max(0.05, deadline - time.monotonic()))
            found, why = [e for e in _services(url, tags, left)[0] if e["status"] == status], ""
        except PicoAPIError as exc:
            why = f" (last: {exc})"
    return found


def _cmd_status(args: argparse.Namespace) -> int:
    if not (url := args.url or next(iter(Config.load().register_urls), "")):
        example = "picoapi status http://127.0.0.1:8100"
        raise ConfigError(f"no supervisor to ask: pass its URL (e.g. {example}) or set API_REGISTER_PATH")
    if not 0 < args.timeout <= 86400:  # NaN fails too
        raise ConfigError(f"--timeout must be a number of seconds above 0 and at most 86400, got {args.timeout}")
    if urlsplit(url).scheme not in ("http", "https"):
        fix = "http://" + (url.partition("://")[2] or url)
        raise ConfigError(f"the supervisor's URL must begin with http:// or https://: pass {fix!r}, got {url!r}")
    url, tags = _base_url(url), args.tag or []
    if args.wait:
        _wait_for(url, tags, args.wait, args.timeout)
    entries, complete = _services(url, tags, args.timeout)
    if args.json:
        print(json.dumps(entries, indent=2))  # ensure_ascii: every control character escaped
    else:
        _print_status(entries)
    if not complete:
        raise PicoAPIError(f"stopped after {STATUS_MAX_PAGES} pages ({_workers(len(entries))}); narrow it with --tag")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import picoapi_demo  # the package's second file: the demo and its worker app
    except ModuleNotFoundError:  # picoapi.py vendored alone
        raise ConfigError("the demo is in picoapi_demo.py: pip install picoapi, or copy it beside picoapi.py") from None
    return picoapi_demo.run(args)


#: The commands: handler, description (its first sentence is the summary) and an example that runs as written.
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {
    "supervisor": (
        _cmd_serve,
        "Run a supervisor: a bare one, or your own app. It serves on API_BIND:API_PORT with uvicorn.",
        "picoapi supervisor --bind 127.0.0.1 --port 8100",
    ),
    "worker": (
        _cmd_serve,
        "Run a worker app. It serves on API_BIND:API_PORT with uvicorn and registers that port.",
        "API_HOST=127.0.0.1 API_TITLE=upper API_TAGS=text:upper API_REGISTER_PATH=http://127.0.0.1:8100/register "
        "picoapi worker picoapi_demo:worker --bind 127.0.0.1 --port 8001",
    ),
    "status": (
        _cmd_status,
        "Print a supervisor's registry. Exits 1 if it cannot be reached or is not a PicoAPI supervisor.",
        "picoapi status http://127.0.0.1:8100/register --tag text",
    ),
    "demo": (
        _cmd_demo,
        "Run a live demo on 127.0.0.1. A supervisor and three workers start; one is killed, detected and revived.",
        "picoapi demo --interval 0.5 --pace 0",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``picoapi`` command; returns the exit code."""
    about = "FastAPI with service registration and health checking."
    parser = argparse.ArgumentParser(prog="picoapi", description=about, epilog="example: picoapi demo")
    parser.add_argument("--version", action="version", version=f"picoapi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text, example) in _COMMANDS.items():  # the first sentence of the description is the summary
        commands.add_parser(name, help=text.split(". ")[0].rstrip("."), description=text, epilog=f"example: {example}")
    sup, wrk, stat, demo = commands.choices.values()
    sup.add_argument("app", nargs="?", help="a supervisor app of your own, as module:attribute (default: a bare one)")
    wrk.add_argument("app", help="the app to run, as module:attribute (an app or an app factory)")
    for server in (sup, wrk):
        server.add_argument("--bind", help="interface to bind (API_BIND)")
        server.add_argument("--port", type=int, help="port (API_PORT)")
        server.add_argument("--env-file", help="its own settings file, read instead of ./.env; the environment wins")
    stat.add_argument("url", nargs="?", help="the supervisor's base or /register URL (default: API_REGISTER_PATH's)")
    stat.add_argument("--tag", action="append", help="only workers with this tag (repeat: all must match)")
    stat.add_argument("--json", action="store_true", help="print the entries as JSON, not as a table")
    stat.add_argument("--wait", type=int, metavar="N", help="first wait until N workers are healthy (for scripts)")
    stat.add_argument("--timeout", type=float, default=5.0, help="seconds for each answer and for --wait (default 5)")
    demo.add_argument("--interval", type=float, default=0.5, help="health-check interval in seconds (default 0.5)")
    demo.add_argument("--pace", type=float, default=2.0, help="seconds to pause between steps (default 2)")
    if (args := parser.parse_args(argv)).command is None:
        parser.print_help()
        return 0
    try:
        return _COMMANDS[args.command][0](args)
    except PicoAPIError as exc:  # one line: 2 for bad configuration, 1 for anything else
        print(f"picoapi: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(__import__("picoapi").main())  # as the importable module, not __main__: one PicoAPI class for all
