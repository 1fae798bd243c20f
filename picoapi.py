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

    @app.get("/healthy-resizers")
    def healthy_resizers() -> list:
        return [w.id for w in app.registry.workers("resize", status="healthy")]

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
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import types
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

DEFAULT_MODE, DEFAULT_PORT = "worker", 8888
DEFAULT_DESCRIPTION, DEFAULT_VERSION = "a brief description", "0.0.1"
DEFAULT_HEALTH_PATH, DEFAULT_HEALTH_INTERVAL = "/health", 300.0
DEFAULT_HEALTH_TIMEOUT = 10.0  #: a check's deadline when the worker names none: min(interval, this)
DEFAULT_HEALTH_FAILURES, DEFAULT_HEALTH_SUCCESSES = 2, 1
DEFAULT_CORS, DEFAULT_REGISTER_TIMEOUT, DEFAULT_MAX_WORKERS = ("*",), 30.0, 10_000
DEFAULT_WATCHDOG_INTERVALS = 3  #: intervals without a check before a worker asks the supervisor if it still checks
SELF_CHECK_AFTER = 2.0  #: a worker GETs its own registered health URL this long after startup (at most an interval)

MIN_INTERVAL, MAX_INTERVAL = 0.05, 86_400.0
MAX_NAME, MAX_VERSION, MAX_TAG, MAX_TAGS, MAX_DESCRIPTION, MAX_HOST, MAX_URL = 128, 64, 64, 32, 1024, 253, 2048
MAX_ERROR, MAX_BODY = 200, 64 * 1024
_INSTANCE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_INSTANCES = 16  #: processes remembered per entry (siblings on one port, restarts); the oldest are forgotten
STARTUP_GRACE = 10.0  #: a new worker's checks may fail this long (at most an interval): its server is starting

REGISTER_ROUTE, SERVICES_ROUTE, DASHBOARD_ROUTE = "/register", "/services", "/dashboard"
SERVICES_PAGE = 1000  #: GET /services' default and largest ``limit``: a registry of 1,000 in one answer, ~6 MB at most
#: Seconds between two updates of the dashboard (it never reloads), and the rows a page shows at most (~45 KB).
DASHBOARD_REFRESH, DASHBOARD_PAGE = 2, 200
#: INSTANCE_HEADER names the worker process that answered a health check (only those that registered count).
SUPERVISOR_HEADER, INSTANCE_HEADER = "X-PicoAPI-Supervisor", "X-PicoAPI-Instance"
_SUPERVISOR_HEADER_KEY, _INSTANCE_HEADER_KEY = SUPERVISOR_HEADER.lower().encode(), INSTANCE_HEADER.lower().encode()
HEALTHY, UNHEALTHY, UNKNOWN = "healthy", "unhealthy", "unknown"
STATUSES = (HEALTHY, UNHEALTHY, UNKNOWN)

BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  #: registration attempts wait base * 2**attempt, capped, jittered
_ATTEMPTS_AT_CAP = math.ceil(math.log2(BACKOFF_CAP / BACKOFF_BASE))
DEREGISTER_TIMEOUT = 2.0  #: the longest deregistration holds shutdown
#: Host names resolved at once for registrations, and checks of a live process before a PUT or DELETE at once (503).
MAX_RESOLVING = 4
STORE_TIMEOUT = 1.0  #: seconds a registration waits for a busy registry file before answering 503
DEFAULT_CALL_TIMEOUT = 10.0  #: seconds app.call() and app.broadcast() wait for a worker unless told otherwise
#: GET /services/{id}/openapi: seconds it waits in all, bytes the worker may send, documents fetched at once (503).
OPENAPI_TIMEOUT, OPENAPI_MAX_BYTES, OPENAPI_MAX_FETCHES = 5.0, 1024 * 1024, 4
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
    hidden = [] if text.isprintable() else [i for i, c in enumerate(text) if unicodedata.category(c) in _HIDDEN]
    if hidden:
        raise error(
            f"{what} must not contain control, format or line-separator characters; remove the "
            f"U+{ord(text[hidden[0]]):04X} at index {hidden[0]}, got '{_printable(text)}'"
        )
    return text


def _check_health_url(what: str, url: str, error: type[ValueError] = ValueError) -> str:
    """``url`` (or a path alone), if ASCII without query or fragment: a health check is a path, sent byte for byte."""
    origin = "" if url.startswith("/") else "{0.scheme}://{0.netloc}".format(urlsplit(url))
    path = url[len(origin) :]
    fixed = quote(re.split("[?#]", path)[0], safe="/%:@!$&'()*+,;=")  # RFC 3986's path characters and %XX stay
    if fixed != path:
        raise error(
            f"{what} must be an ASCII path without ?query or #fragment; percent-encode it: "
            f"'{origin}{fixed}', got '{_printable(url)}'"
        )
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
    while len(chain) < 10:
        last = chain[-1]
        inner = getattr(last, "reason", None) or last.__cause__ or last.__context__ or (last.args or [None])[0]
        if not isinstance(inner, BaseException) or inner in chain:
            break
        chain.append(inner)
    return chain


def _root_cause(exc: BaseException) -> str:
    """The innermost error, e.g. 'ConnectionRefusedError: [Errno 111] Connection refused'; a cut says why it was.
    A protocol error's words (BadStatusLine: 'SSH-2.0-...') are what the far end sent: its kind is all it says."""
    if isinstance(exc, _Cut):
        return str(exc)
    root = _causes(exc)[-1]
    quotes = isinstance(root, http.client.HTTPException) and not isinstance(root, OSError)  # not RemoteDisconnected
    return f"{type(root).__name__}: a malformed HTTP answer" if quotes else f"{type(root).__name__}: {root}"


def _json(content: bytes) -> Any:
    """The JSON in ``content``, or None: a far end may send anything (60,000 deep, 5,000-digit numbers, NaN)."""
    try:
        return json.loads(content, parse_constant=int)  # int('NaN'), int('Infinity'): ValueError
    except (ValueError, RecursionError):
        return None


class _Cut(requests.Timeout):
    """A request cut at its deadline or by stop(); the message says which."""


class _CutConnection(urllib3.connection.HTTPConnection):
    """Hands its adapter a duplicate of its socket, which another thread can shut down even once TLS wrapped it."""

    def __init__(self, *args: Any, cuttable: _Cuttable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cuttable = cuttable

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._cuttable.socks.append(sock.dup())
        if self._cuttable.is_cut:  # opened after the cut: it must carry no request
            self._cuttable.cut()
        return sock


class _CutTLSConnection(_CutConnection, urllib3.connection.HTTPSConnection):
    pass


class _Cuttable(requests.adapters.HTTPAdapter):
    """An adapter whose connections another thread can :meth:`cut`: requests' timeout bounds a read, not an answer."""

    def __init__(self) -> None:
        super().__init__()  # no retries
        self._lock = threading.Lock()  # cut() never shuts a descriptor close() freed (and another socket reused)
        self.socks: list[socket.socket] = []  # a connection appends, then reads is_cut; cut() sets it, then reads
        self.is_cut = False

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> urllib3.connectionpool.ConnectionPool:
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        if isinstance(pool, urllib3.HTTPConnectionPool):  # always; narrows the type
            pool.ConnectionCls = _CutTLSConnection if isinstance(pool, urllib3.HTTPSConnectionPool) else _CutConnection
            pool.conn_kw["cuttable"] = self
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
    """One request, no redirects, cut after ``timeout`` seconds in all; returns the answer and its body, None when
    over ``limit`` bytes (the rest is never read). Raises requests' errors, :class:`_Cut` when cut."""
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


def _parse_seconds(var: str, raw: object, low: float, high: float, off: bool = False) -> float | None:
    text = str(raw).strip().lower()
    if off and text in ("", "off", "none", "0"):
        return None
    with contextlib.suppress(ValueError):
        if not isinstance(raw, bool) and low <= (value := float(text)) <= high:  # also refuses nan and inf
            return value
    raise ConfigError(f"{var} must be a number of seconds from {low:g} to {high:g}, got {raw!r}")


def _parse_count(var: str, raw: object, low: int, high: int) -> int:
    text = str(raw).strip()
    if isinstance(raw, bool) or not _is_whole(text) or not low <= int(text) <= high:
        raise ConfigError(f"{var} must be a whole number from {low} to {high}, got {raw!r}")
    return int(text)


def _parse_bool(var: str, raw: object) -> bool:
    value = raw if isinstance(raw, bool) else _BOOLS.get(str(raw).strip().lower())
    if value is None:
        raise ConfigError(f"{var} must be true or false (1/0, yes/no, on/off), got {raw!r}")
    return value


def _parse_choice(var: str, raw: object, *choices: str) -> str:
    if (text := str(raw).strip().lower()) not in choices:
        raise ConfigError(f"{var} must be {' or '.join(map(repr, choices))}, got {raw!r}")
    return text


def _parse_text(var: str, raw: object, limit: int, one_line: bool = False) -> str:
    # One line: FastAPI descriptions are often Markdown over several lines, the registration's copy is one line.
    text = re.sub(r"[\t\r\n]+", " ", str(raw).strip())[:limit] if one_line else str(raw).strip()
    if not (text or one_line) or len(text) > limit:
        raise ConfigError(f"{var} must be 1 to {limit} printable characters, got {raw!r}")
    return _check_text(var, text, ConfigError)


def _parse_host(var: str, raw: object) -> str:
    if len(text := str(raw).strip()) > MAX_HOST or not _HOST_RE.match(text):
        raise ConfigError(f"{var} must be a host name or IP address such as 'localhost' or '10.0.0.5', got {raw!r}")
    return _normal_host(text)


def _parse_path(var: str, raw: object) -> str:
    if not (text := str(raw).strip()).startswith("/") or len(text) > 512:
        raise ConfigError(f"{var} must be a path starting with '/', such as '/health', got {raw!r}")
    return _check_health_url(var, text, ConfigError)


def _parse_token(var: str, raw: object) -> str | None:
    # Never echo the value: it is a secret. Empty is unset; a blank one would silently turn authentication off.
    text = raw if isinstance(raw, str) else " "
    if text and (len(text) > 4096 or not (text.isascii() and text.isprintable()) or text != text.strip()):
        raise ConfigError(
            f"{var} must be 1 to 4096 printable ASCII characters with no whitespace around them (a file from "
            "`kubectl create secret --from-file` keeps its final newline: strip it); the value is not shown"
        )
    return text or None


def _parse_list(var: str, raw: object, sep: str, item: Callable[..., Any] | None = None, most: int = 0) -> tuple:
    """A ``sep``-delimited string or a list; each item checked by ``item(var, text)``, at most ``most`` of them."""
    if not isinstance(raw, (str, list, tuple, set, frozenset)):
        raise ConfigError(f"{var} must be a {sep!r}-delimited string or a list of strings, got {raw!r}")
    items = tuple(i.strip() for i in (raw.split(sep) if isinstance(raw, str) else map(str, raw)) if i.strip())
    if most and len(items) > most:
        raise ConfigError(f"{var} may list at most {most} items, got {len(items)}")
    return tuple(map(functools.partial(item, var), items)) if item else items


def _url_item(var: str, url: str) -> str:
    with contextlib.suppress(ValueError):  # urlsplit() and .port raise on a malformed IPv6 address or port
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.hostname and url.isprintable() and parts.port != 0:
            return url
    raise ConfigError(f"{var} must be an http:// or https:// URL such as 'http://keeper:8100/register', got {url!r}")


def _network_item(var: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{var} must list networks such as '10.0.0.0/8!fd00::/8', got {text!r}") from None


def _allowed_host_item(var: str, item: str) -> str:
    # As Starlette's TrustedHostMiddleware compares the Host header's host: lower case, IPv6 in brackets.
    host = f"[{item.lower()}]" if ":" in item and _ip(item) is not None else item.lower()
    if not _ALLOWED_HOST_RE.fullmatch(host) or (host[0] == "[" and _ip(host[1:-1]) is None):
        raise ConfigError(f"{var} must list hosts without scheme or port ('keeper!10.0.0.5!*.internal'), got {item!r}")
    return host


def _tag_item(var: str, tag: str) -> str:
    return _check_tag(f"{var} items", tag, ConfigError)


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

    # keyword: type = _setting(default, meaning, parser, *bounds)
    mode: str = _setting(DEFAULT_MODE, "its role", _parse_choice, "worker", "supervisor")
    host: str | None = _setting(None, "the host the supervisor reaches this API at", _parse_host)
    port: int = _setting(DEFAULT_PORT, "the port of the API", _parse_count, 1, 65535)
    bind: str | None = _setting(None, "the interface the command line binds to", _parse_host)
    title: str | None = _setting(None, "the service's name (FastAPI's title)", _parse_text, MAX_NAME)
    description: str = _setting(DEFAULT_DESCRIPTION, "FastAPI's description", _parse_text, MAX_DESCRIPTION, True)
    version: str = _setting(DEFAULT_VERSION, "its version", _parse_text, MAX_VERSION)
    register_urls: tuple[str, ...] = _setting(
        (), "where to register", _parse_list, "!", _url_item, var="API_REGISTER_PATH", old="API_KEEPER_URL"
    )
    health_path: str = _setting(DEFAULT_HEALTH_PATH, "the path the supervisor checks", _parse_path)
    health_interval: float = _setting(DEFAULT_HEALTH_INTERVAL, "gap", _parse_seconds, MIN_INTERVAL, MAX_INTERVAL)
    health_timeout: float | None = _setting(None, "a check's deadline", _parse_seconds, 0.01, MAX_INTERVAL)
    tags: tuple[str, ...] = _setting((), "what it does, for discovery", _parse_list, ":", _tag_item, MAX_TAGS)
    cors_allow_origins: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed origins", _parse_list, "!")
    cors_allow_methods: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed methods", _parse_list, "!")
    cors_allow_headers: tuple[str, ...] = _setting(DEFAULT_CORS, "CORS allowed headers", _parse_list, "!")
    cors_allow_credentials: bool = _setting(False, "CORS credentials: needs listed origins", _parse_bool)
    allowed_hosts: tuple[str, ...] = _setting((), "the Host headers served", _parse_list, "!", _allowed_host_item)
    register_token: str | None = _setting(None, "the token registrations carry", _parse_token)
    register_networks: tuple[IPNetwork, ...] = _setting((), "claimable networks (NAT)", _parse_list, "!", _network_item)
    register_timeout: float = _setting(DEFAULT_REGISTER_TIMEOUT, "startup's wait", _parse_seconds, 0.0, 3600.0)
    register_required: bool = _setting(False, "fail startup unless registered", _parse_bool)
    max_workers: int = _setting(DEFAULT_MAX_WORKERS, "the registry's cap", _parse_count, 1, 10_000_000)
    registry_file: str | None = _setting(None, "a sqlite file keeping the registrations", _parse_text, 4096)
    deregister_after: float | None = _setting(None, "gone after", _parse_seconds, MIN_INTERVAL, 10 * MAX_INTERVAL, True)
    health_failures: int = _setting(DEFAULT_HEALTH_FAILURES, "failures to be unhealthy", _parse_count, 1, 100)
    health_successes: int = _setting(DEFAULT_HEALTH_SUCCESSES, "successes to recover", _parse_count, 1, 100)
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
        ``os.environ``; the default ``.env`` may be absent, a path given explicitly must exist."""
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
        host = _bracketed(self.host or "")
        listed = any(host == h or (h[0] == "*" and host.endswith(h[1:])) for h in self.allowed_hosts)
        if host and self.allowed_hosts and not listed:
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
        health = {"url": self.health_url, "interval": self.health_interval, "timeout": self.health_timeout}
        body: dict[str, Any] = {"name": self.title, "host": self.host, "port": self.port, "version": self.version}
        body |= {"tags": list(self.tags), "description": self.description}
        return {**body, "health": {k: v for k, v in health.items() if v is not None}}


#: keyword -> its row of the table, in declaration order.
_SETTINGS: dict[str, _Setting] = {
    f.name: f.metadata["setting"]._replace(var=f.metadata["setting"].var or f"API_{f.name.upper()}")
    for f in dataclasses.fields(Config)
    if f.metadata
}


def _close_setting(name: str) -> str | None:
    """The setting ``name`` misspells (``prot``, ``API_PORT``, ``healthInterval``, ``register_path``), or None."""
    names = {k: k for k in _SETTINGS} | {v.lower()[4:]: k for k, s in _SETTINGS.items() for v in (s.var, s.old) if v}
    found = difflib.get_close_matches(name.lower().removeprefix("api_"), names, 1, 0.75)
    return names[found[0]] if found else None


def _unknown_settings(names: Iterable[str]) -> str:
    hints = [f"{n!r}" + (f" (did you mean {close!r}?)" if (close := _close_setting(n)) else "") for n in names]
    return f"unknown setting {', '.join(hints)}; the settings are: {', '.join(_SETTINGS)}"


def _from_1x(keywords: dict[str, Any], sources: Sequence[dict[str, str]]) -> None:
    """Read picoapi 1.x's ``is_master`` keyword and ``API_MASTER`` variable as the mode they mean (true is
    supervisor), warning at the user's line; given beside a mode that disagrees, a ConfigError names both."""
    spellings = [(keywords, "is_master", "mode", "{}={!r}")] + [(s, "API_MASTER", "API_MODE", "{}={}") for s in sources]
    for given, old, new, spelt in spellings:
        if (raw := given.pop(old, None)) in (None, ""):
            continue
        mode = "supervisor" if _parse_bool(old, raw) else "worker"
        was, now = spelt.format(old, raw), spelt.format(new, mode)
        if str(given.get(new) or mode).strip().lower() != mode:
            raise ConfigError(
                f"{was} (picoapi 1.x) and {spelt.format(new, given[new])} disagree: "
                f"{old} is the old spelling of {now}; keep only {new}"
            )
        given[new] = mode
        message = f"{was} is picoapi 1.x's spelling: write {now} instead"
        level = next((i for i, frame in enumerate(inspect.stack(0), 1) if frame.filename != __file__), 1)
        warnings.warn(message, DeprecationWarning, stacklevel=level)
        _log_once(message)


@functools.cache
def _log_once(message: str) -> None:
    """Python's filters hide DeprecationWarning outside __main__: under uvicorn an operator would see nothing."""
    _log_like_uvicorn()  # logged while the app is built: under uvicorn, in its format already
    logger.warning("%s", message)


#: The file ``picoapi supervisor|worker --env-file`` gives, read instead of ./.env while the app is built.
_env_file_instead: str | None = None


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
_TagList = Annotated[
    list[str], AfterValidator(lambda tags: list(dict.fromkeys(_check_tag("each tag", t) for t in tags)))
]


class HealthSpec(BaseModel):
    """How the supervisor checks a worker."""

    url: Annotated[str, AfterValidator(functools.partial(_check_health_url, "health.url"))] = Field(
        max_length=MAX_URL, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$"
    )
    interval: float = Field(ge=MIN_INTERVAL, le=MAX_INTERVAL, allow_inf_nan=False, description="seconds between checks")
    timeout: float | None = Field(
        default=None, gt=0, le=MAX_INTERVAL, allow_inf_nan=False, description="seconds; default min(interval, 10)"
    )

    @property
    def deadline(self) -> float:
        """The check's total deadline: ``timeout``, by default min(interval, 10)."""
        return self.timeout or min(self.interval, DEFAULT_HEALTH_TIMEOUT)


class Registration(BaseModel):
    """The body of ``PUT /register``: what a worker says about itself."""

    name: _Text = Field(min_length=1, max_length=MAX_NAME)
    host: Annotated[str, AfterValidator(_normal_host)] = Field(
        min_length=1, max_length=MAX_HOST, pattern=_HOST_RE.pattern
    )
    port: int = Field(ge=1, le=65535)
    version: _Text = Field(default=DEFAULT_VERSION, min_length=1, max_length=MAX_VERSION)
    tags: _TagList = Field(default_factory=list, max_length=MAX_TAGS)
    description: _Text = Field(default="", max_length=MAX_DESCRIPTION)
    health: HealthSpec
    openapi: Annotated[str, Field(max_length=512, pattern=r"^/[^\s\x00-\x1f\x7f]*$"), _VISIBLE] | None = Field(
        default=None, description="the worker's OpenAPI path"
    )
    instance: str | None = Field(
        default=None, pattern=_INSTANCE_PATTERN, description="the registering process; its checks must answer as it"
    )

    @model_validator(mode="after")
    def _health_is_own(self) -> Registration:
        parts = urlsplit(self.health.url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"health.url has a bad port: {self.health.url!r}") from None
        if (parts.hostname or "").lower() != self.host or port != self.port:
            raise ValueError(
                f"health.url must point at the registrant's own host and port "
                f"({self.host}:{self.port}), got {self.health.url!r}"
            )
        if parts.username or parts.password:
            raise ValueError("health.url must not carry credentials")
        if self.health.timeout is not None and self.health.timeout > self.health.interval:
            raise ValueError(
                f"health.timeout ({self.health.timeout:g}) must not exceed health.interval ({self.health.interval:g})"
            )
        return self


#: A worker's status, as the HTTP API declares it.
Status = Literal["healthy", "unhealthy", "unknown"]


def _field(
    doc: str = "", *, default: Any = dataclasses.MISSING, shown: str | None = "", given: bool | str = False
) -> Any:
    """A public :class:`Worker` field: :class:`WorkerOut` shows it at ``shown`` (its own name by default, None:
    not at all); if ``given``, a :class:`Registration` sets it, read at that same path (or the one given)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "shown": shown, "given": given})


@dataclasses.dataclass(slots=True)
class Worker:
    """One registered worker. The registry hands out copies; mutate freely.

    The one declaration of a worker's fields: :class:`WorkerOut` (the HTTP API's view), :func:`_out` (its
    bodies), what a registration sets (:data:`_CONTENT`) and the copies all derive from it.
    """

    id: str = _field("host:port, or [IPv6]:port")
    name: str = _field(given=True)
    host: str = _field(given=True)
    port: int = _field(given=True)
    version: str = _field(given=True)
    tags: tuple[str, ...] = _field(given=True)
    description: str = _field(given=True)
    health_url: str = _field(shown="health.url", given=True)
    interval: float = _field(shown="health.interval", given=True)
    timeout: float = _field("the check's total deadline in seconds", shown="health.timeout", given="health.deadline")
    openapi: str | None = _field("its OpenAPI path, if it sent one", default=None, given=True)
    address: str = _field(
        "what the host resolved to at registration: checks connect here, never resolving again", default=""
    )
    instances: tuple[str, ...] = _field(
        "the processes that registered it (several serve one port under uvicorn --workers)", default=(), shown=None
    )
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
    # The scheduler's bookkeeping (monotonic times); not part of the public view.
    _heap_seq: int | None = dataclasses.field(default=None, repr=False)
    _due: float = dataclasses.field(default=0.0, repr=False)
    _busy_until: float = dataclasses.field(default=0.0, repr=False)  # a check of it is in flight until then
    _registered: float = dataclasses.field(default=0.0, repr=False)
    _unhealthy_since: float | None = dataclasses.field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The worker's base address, e.g. ``http://10.0.0.5:8888``."""
        return f"{urlsplit(self.health_url).scheme}://{self.id}"

    def _request(self, path: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(URL, requests keywords) for ``path`` on this worker: at the address verified when it registered,
        so its name is not resolved again (no DNS rebinding), under its own name in ``Host``. Over https the
        name is kept: the certificate is checked against it."""
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


#: Worker attribute -> the path WorkerOut shows it at ("health.url": "url" under "health"), for each shown.
_PUBLIC = [f for f in dataclasses.fields(Worker) if f.metadata]
_SHOWN = {f.name: f.metadata["shown"] or f.name for f in _PUBLIC if f.metadata["shown"] is not None}
#: All of a Worker's fields as a tuple, in order (a fast snapshot for copies).
_fields_of = operator.attrgetter(*(f.name for f in dataclasses.fields(Worker)))
#: What a registration says about a worker: each field and where a Registration holds it (the address aside: the
#: supervisor finds it). The same again is a refresh, not a change.
_GIVEN = {f.name: _SHOWN[f.name] if given is True else given for f in _PUBLIC if (given := f.metadata["given"])}
_CONTENT = (*_GIVEN, "address")
_content_of, _given_in = operator.attrgetter(*_CONTENT), operator.attrgetter(*_GIVEN.values())


def _content(reg: Registration, address: str) -> tuple[Any, ...]:
    """The :data:`_CONTENT` of the entry that ``reg``, from ``address``, makes."""
    return (*(tuple(v) if isinstance(v, list) else v for v in _given_in(reg)), address)


_TOP = {path: name for name, path in _SHOWN.items() if "." not in path}
_HEALTH = {path.removeprefix("health."): name for name, path in _SHOWN.items() if path.startswith("health.")}
_top_of, _health_of = operator.attrgetter(*_TOP.values()), operator.attrgetter(*_HEALTH.values())


def _out(w: Worker) -> dict[str, Any]:
    """``w`` as the HTTP API shows it (a :class:`WorkerOut`), without validating again what the registry made."""
    return {**dict(zip(_TOP, _top_of(w), strict=True)), "health": dict(zip(_HEALTH, _health_of(w), strict=True))}


def _shown_fields() -> dict[str, Any]:
    """WorkerOut's fields, from Worker's: a tuple is shown as a list, the health check as a :class:`HealthSpec`."""
    fields: dict[str, Any] = {}
    hints = typing.get_type_hints(Worker)
    for key, name in _TOP.items():
        hint = Status if key == "status" else hints[name]
        hint = types.GenericAlias(list, typing.get_args(hint)[:1]) if typing.get_origin(hint) is tuple else hint
        fields[key] = (hint, Field(description=Worker.__dataclass_fields__[name].metadata["doc"] or None))
    return {**fields, "health": (HealthSpec, ...)}


class WorkerOut(create_model("_WorkerFields", **_shown_fields())):  # type: ignore[misc]
    """A registry entry as the HTTP API shows it, derived from :class:`Worker`. Times are Unix seconds."""


# -- Registry ----------------------------------------------------------------


class CheckResult(NamedTuple):
    """The outcome of one health check."""

    ok: bool
    status_code: int | None = None
    #: Seconds from the check's start to its answer's headers.
    latency: float | None = None
    error: str = ""
    #: The supervisor itself could not check (out of descriptors, say): not the worker's failure.
    postponed: bool = False
    #: The worker process that answered (its ``X-PicoAPI-Instance`` header), if it said.
    instance: str | None = None
    #: Seconds the check started after it was due (beside ``latency``, which follows it).
    late: float = 0.0


class StatusChange(NamedTuple):
    """What a check's result did to its worker (see :meth:`Registry.record`)."""

    old: str
    new: str
    removed: bool
    #: The check's error as recorded (an answer from another process fails with its own words).
    error: str = ""


class Verdict(NamedTuple):
    """The status rules' answer for one check (see :func:`next_status`)."""

    status: str
    #: Unhealthy for longer than ``deregister_after``: the worker goes.
    removed: bool
    #: Check again this soon (a change waiting for confirmation), or None: at the interval.
    recheck: float | None


class _Check(NamedTuple):
    """A due check, popped from the heap: everything the probe needs."""

    worker_id: str
    url: str
    address: str
    timeout: float
    due: float
    #: Its last check succeeded: it may use every slot, others only half (see HealthChecker).
    trusted: bool = False
    #: Its next check is due this long after this one (whether its connection is worth keeping).
    interval: float = 0.0


class Registry:
    """The supervisor's workers, their tag index and their check schedule.

    Thread-safe: every method takes the one lock. Readers get copies.
    """

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
        self.max_workers = max_workers
        self.failures = failures
        self.successes = successes
        self.deregister_after = deregister_after
        #: The monotonic clock every due time is measured on.
        self.clock = clock
        self._wall = wall
        #: Called, outside the lock, when the next check moved earlier (the checker sets it to wake its thread).
        self.wake: Callable[[], None] = lambda: None
        # One lock guards _workers, _by_tag and _heap. Never do I/O under it.
        # The heap's invariant: every registered worker has exactly one live entry, its
        # next check, from registration to removal, whatever a check or its result does
        # (pop_due schedules the next check before handing out the due one).
        self._lock = threading.Lock()
        self._workers: dict[str, Worker] = {}
        self._by_tag: dict[str, set[str]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._turns: dict[tuple[frozenset[str], str | None], int] = {}
        self._stale = 0  # heap entries left behind by lazy cancellation
        self.metrics = _Metrics()  # GET /metrics' counters, updated under _lock

    # Registration ------------------------------------------------------------

    def register(self, reg: Registration, *, address: str | None = None) -> tuple[Worker, bool]:
        """Create, refresh or replace the entry for ``reg``; returns (a copy, created).

        A new or changed entry is ``unknown`` and checked at once: nothing is handed
        out before a good check. The same registration again (a worker's refresh, or
        a sibling process serving the same port) changes nothing but adds its
        instance. ``address`` is what the host resolved to (resolved here, blocking,
        if not given). Raises :class:`RegistryFull` when a new worker would pass the
        cap, ``ValueError`` naming the host when it does not resolve.
        """
        wid = worker_id(reg.host, reg.port)
        if address is None:
            address = _resolve(reg.host)
        content = _content(reg, address)
        with self._lock:
            entry = self._workers.get(wid)
            created = entry is None
            if entry is not None and _content_of(entry) == content:
                if reg.instance and reg.instance not in entry.instances:  # the oldest are dropped
                    entry.instances = (*entry.instances, reg.instance)[-MAX_INSTANCES:]
                # Restarted while not healthy, say: checked now, not an interval later (unless a check is under way
                # or due already: a flood of refreshes makes no flood of checks).
                now = self.clock()
                idle = entry._busy_until <= now < entry._due
                moved = entry.status != HEALTHY and idle and self._schedule(entry, now)
            else:
                if entry is None:
                    if len(self._workers) >= self.max_workers:
                        raise RegistryFull(
                            f"the registry is full ({self.max_workers} workers, API_MAX_WORKERS); "
                            "deregister workers or raise API_MAX_WORKERS"
                        )
                    entry = self._workers[wid] = Worker(wid, **dict(zip(_CONTENT, content, strict=True)))
                self._index(entry, remove=True)
                for field, value in zip(_CONTENT, content, strict=True):
                    setattr(entry, field, value)
                entry.instances = (reg.instance,) if reg.instance else ()
                entry.status, entry.failures, entry.successes, entry.suspect = UNKNOWN, 0, 0, False
                entry.registered_at, entry._registered, entry._unhealthy_since = self._wall(), self.clock(), None
                self._index(entry)
                moved = self._schedule(entry, self.clock())
                self.metrics.registrations += 1
            copy = entry.copy()
        if moved:
            self.wake()
        return copy, created

    def forget_instance(self, wid: str, instance: str) -> tuple[str, ...]:
        """Drop a process from ``wid``'s instances (it is stopping); returns those left."""
        with self._lock:
            entry = self._workers.get(wid)
            if entry is None:
                return ()
            entry.instances = tuple(i for i in entry.instances if i != instance)
            return entry.instances

    def deregister(self, wid: str) -> bool:
        """Remove a worker; its pending check is dropped lazily. False if unknown."""
        with self._lock:
            entry = self._workers.get(wid)
            if entry is not None:
                self._remove(entry)
            return entry is not None

    def _remove(self, entry: Worker) -> None:
        del self._workers[entry.id]
        self.metrics.deregistrations += 1  # by a DELETE or after API_DEREGISTER_AFTER
        self._index(entry, remove=True)
        if entry._heap_seq is not None:
            self._stale += 1
        self._compact()

    def _index(self, entry: Worker, *, remove: bool = False) -> None:
        for tag in entry.tags:
            if remove:
                ids = self._by_tag.get(tag)
                if ids is not None:
                    ids.discard(entry.id)
                    if not ids:
                        del self._by_tag[tag]
            else:
                self._by_tag.setdefault(tag, set()).add(entry.id)

    # Queries -------------------------------------------------------------------

    def get(self, wid: str) -> Worker | None:
        """A copy of the worker ``wid``, or None."""
        with self._lock:
            entry = self._workers.get(wid)
            return entry.copy() if entry is not None else None

    def workers(
        self,
        *tags: str,
        status: str | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> list[Worker]:
        """Copies of the workers that have every tag in ``tags`` and match the filters, by id."""
        with self._lock:
            found = [self._workers[i] for i in self._tagged(tags)] if tags else list(self._workers.values())
            # Only a C-level tuple per worker under the lock: big queries barely hold it.
            rows = [
                _fields_of(w)
                for w in found
                if (status is None or w.status == status)
                and (name is None or w.name == name)
                and (version is None or w.version == version)
            ]
        rows.sort(key=lambda row: row[0])
        return [Worker(*row) for row in rows]

    def _tagged(self, tags: Iterable[str]) -> Iterable[str]:
        """The ids of the workers that have every tag (lock held)."""
        sets = sorted((self._by_tag.get(tag, set()) for tag in set(tags)), key=len)
        return sets[0].intersection(*sets[1:]) if sets[0] else ()

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def __contains__(self, wid: object) -> bool:
        with self._lock:
            return wid in self._workers

    def pick(self, tags: Sequence[str], version: str | None = None, exclude: Iterable[str] = ()) -> Worker:
        """A copy of a healthy worker with every tag, taking turns (round-robin) per query.

        Skips suspects and ``exclude``. Raises :class:`NoWorkerAvailable`.
        """
        key = (frozenset(tags), version)
        skip = set(exclude)
        with self._lock:
            candidates = sorted(
                wid
                for wid in (self._tagged(tags) if tags else self._workers)
                if wid not in skip and (w := self._workers[wid]).is_ready and (version is None or w.version == version)
            )
            if not candidates:
                raise NoWorkerAvailable(list(tags), version)
            turn = self._turns.get(key, 0)
            self._turns[key] = turn + 1
            if len(self._turns) > 10_000:  # bounded: an odd query shape cannot grow it forever
                self._turns.clear()
            return self._workers[candidates[turn % len(candidates)]].copy()

    def mark_suspect(self, wid: str) -> None:
        """Passive health checking: skip ``wid`` in pick() and check it at once."""
        with self._lock:
            entry = self._workers.get(wid)
            if entry is None:
                return
            entry.suspect = True
            moved = self._schedule(entry, self.clock())
        if moved:
            self.wake()

    # The check schedule ---------------------------------------------------------

    def _compact(self) -> None:
        """Rebuild the heap from live entries once most of it is stale (lock held).

        Lazy cancellation keeps deregistration O(1); this keeps churn (workers coming
        and going far faster than their interval) from growing the heap.
        """
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            workers = self._workers
            # In place: pop_due holds a reference to the list while it schedules.
            self._heap[:] = [e for e in self._heap if (w := workers.get(e[2])) is not None and w._heap_seq == e[1]]
            heapq.heapify(self._heap)
            self._stale = 0

    def _schedule(self, entry: Worker, due: float) -> bool:
        """Push the entry's next check (lock held); the older heap entry goes stale.

        Returns whether it is now the earliest check (the checker's wait must shorten).
        """
        if entry._heap_seq is not None:
            self._stale += 1
        seq = next(self._seq)
        entry._heap_seq, entry._due = seq, due
        earliest = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, seq, entry.id))
        self._compact()
        return earliest

    def next_due(self) -> float | None:
        """The due time of the earliest live check, or None."""
        with self._lock:
            heap, workers = self._heap, self._workers
            while heap:
                _, seq, wid = heap[0]
                entry = workers.get(wid)
                if entry is not None and entry._heap_seq == seq:
                    return heap[0][0]
                heapq.heappop(heap)
                self._stale -= 1
            return None

    def pop_due(self, now: float) -> list[_Check]:
        """Take every check due at ``now``, scheduling each worker's next one at once.

        The next check is one interval after this one's due time (the phase is kept),
        whatever becomes of this one; :meth:`record` only ever brings it forward. A
        worker whose previous check is still in flight is not checked twice at once.
        """
        due: list[_Check] = []
        with self._lock:
            heap, workers = self._heap, self._workers
            while heap and heap[0][0] <= now:
                when, seq, wid = heapq.heappop(heap)
                entry = workers.get(wid)
                if entry is None or entry._heap_seq != seq:
                    self._stale -= 1
                    continue  # cancelled or moved: lazy cancellation
                entry._heap_seq = None
                following = when + entry.interval
                self._schedule(entry, following if following > now else now + entry.interval)
                if now < entry._busy_until:
                    continue
                entry._busy_until = now + entry.timeout + 1.0  # a lost result frees it after this
                trusted = entry.failures == 0 and entry.last_success is not None
                check = _Check(wid, entry.health_url, entry.address, entry.timeout, when, trusted, entry.interval)
                due.append(check)
        return due

    def record(self, wid: str, result: CheckResult) -> StatusChange | None:
        """Apply a check's result: every result of every check lands here, and only here.

        Returns a :class:`StatusChange` when the status changed or the worker was
        removed (the rules are :func:`next_status`), else None. A postponed check (the
        supervisor's own trouble) changes nothing but its time.
        """
        with self._lock:
            entry = self._workers.get(wid)
            if entry is None:
                return None  # deregistered while the check ran
            now, old = self.clock(), entry.status
            entry._busy_until = 0.0
            if result.postponed:
                self._schedule(entry, min(entry._due, now + confirm_delay(entry.interval)))
                return None
            if result.ok and entry.instances and result.instance not in entry.instances:
                result = result._replace(ok=False, error=f"answered by a process that did not register {wid}")
            self.metrics.checked(result)
            entry.last_check, entry.last_status_code, entry.last_latency = (
                self._wall(),
                result.status_code,
                result.latency,
            )
            entry.last_error, entry.suspect = result.error[:MAX_ERROR], False
            if result.ok:
                entry.successes, entry.failures, entry.last_success = entry.successes + 1, 0, entry.last_check
            else:
                entry.failures, entry.successes = entry.failures + 1, 0
            verdict = next_status(entry, result.ok, now, self)
            if verdict.status != old:
                entry.status, entry._unhealthy_since = verdict.status, now if verdict.status == UNHEALTHY else None
            if verdict.removed:
                self._remove(entry)
            elif verdict.recheck is not None and now + verdict.recheck < entry._due:
                self._schedule(entry, now + verdict.recheck)
            return (
                StatusChange(old, verdict.status, verdict.removed, entry.last_error)
                if verdict.status != old or verdict.removed
                else None
            )


def next_status(entry: Worker, ok: bool, now: float, rules: Registry) -> Verdict:
    """The status rules: a worker's status after a check, from the consecutive counts that include it.

    ``unknown`` turns ``healthy`` on its first good check; ``healthy`` or ``unknown``
    turn ``unhealthy`` after ``rules.failures`` failures in a row (``unknown`` only
    once past its start-up grace); ``unhealthy`` turns ``healthy`` after
    ``rules.successes`` good checks in a row, and is removed once it has been
    unhealthy for ``rules.deregister_after``. A change waiting for confirmation is
    re-checked at the confirm delay rather than a whole interval later; a new worker
    whose server is not up yet is re-checked at the confirm delay, doubling each time, so a crowd of
    registrations that never answer costs a few checks each.
    """
    status = entry.status
    starting = status == UNKNOWN and now - entry._registered < min(entry.interval, STARTUP_GRACE)
    if ok:
        new = UNHEALTHY if status == UNHEALTHY and entry.successes < rules.successes else HEALTHY
    else:
        new = UNHEALTHY if entry.failures >= rules.failures and not starting else status
    since = entry._unhealthy_since if new == status else now if new == UNHEALTHY else None
    removed = rules.deregister_after is not None and since is not None and now - since >= rules.deregister_after
    pending = new != (HEALTHY if ok else UNHEALTHY)
    backoff = 2 ** min(entry.failures - 1, 16) if starting and not ok else 1
    return Verdict(new, removed, confirm_delay(entry.interval) * backoff if pending else None)


def confirm_delay(interval: float) -> float:
    """How soon a first failure (or first success when unhealthy) is re-checked."""
    return min(1.0, interval / 4)


# -- Persistence ---------------------------------------------------------------


class _Store:
    """The registrations on disk (sqlite3, WAL): one row written per PUT or DELETE.

    Only registrations are stored, never check results, and nothing is written
    from the check thread: a worker the checker removes is queued by :meth:`forget`
    and deleted by the next write, or at :meth:`close`. The supervisor holds the
    file exclusively while it runs, so a second one on the same file refuses to
    start. Thread-safe through :attr:`lock`, taken before the registry's.
    """

    FORMAT = "picoapi-registry-1"

    def __init__(self, path: str, is_registered: Callable[[str], bool] = lambda wid: False) -> None:
        self.path, self._is_registered = path, is_registered
        self._gone: collections.deque[str] = collections.deque()  # appended by the check thread, no lock needed
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=STORE_TIMEOUT)
        except sqlite3.Error as exc:
            raise ConfigError(f"API_REGISTRY_FILE {path!r} cannot be used as a registry file: {exc}") from exc
        try:
            self._open()
        except (sqlite3.Error, ConfigError) as exc:
            self._db.close()
            if isinstance(exc, ConfigError):
                raise
            if "locked" in str(exc):
                raise ConfigError(
                    f"API_REGISTRY_FILE {path!r} is in use by another supervisor; give each supervisor its own file"
                ) from exc
            raise ConfigError(f"API_REGISTRY_FILE {path!r} cannot be used as a registry file: {exc}") from exc
        #: Serialises a registry change with its row, so the disk never goes back in time.
        self.lock = threading.Lock()

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA locking_mode=EXCLUSIVE")  # held from the first write until close()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(workers)")}
        if tables - {"workers", "meta"} or columns - {"id", "body", "address", "instances"}:
            raise ConfigError(
                f"API_REGISTRY_FILE {self.path!r} is not a PicoAPI registry file (it has other tables or "
                "columns); name a new file"
            )
        db.execute(
            "CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, body TEXT NOT NULL, "
            "address TEXT NOT NULL DEFAULT '', instances TEXT NOT NULL DEFAULT '')"
        )
        for column in sorted({"address", "instances"} - columns) if columns else ():  # from an older version
            db.execute(f"ALTER TABLE workers ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (self.FORMAT,))
        db.execute("COMMIT")

    def load(self) -> list[tuple[Registration, str, list[str]]]:
        """Every stored registration with the address it was verified at (or "") and its processes."""
        regs = []
        for wid, body, address, instances in self._db.execute(
            "SELECT id, body, address, instances FROM workers"
        ).fetchall():
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

    def forget(self, wid: str) -> None:
        """Queue the row of a worker the checker removed (any thread, no I/O)."""
        self._gone.append(wid)

    def _flush(self) -> None:
        while self._gone:
            wid = self._gone.popleft()
            if not self._is_registered(wid):  # registered again since it was removed: keep the new row
                self._db.execute("DELETE FROM workers WHERE id = ?", (wid,))

    def identity(self) -> str:
        """The supervisor's id, kept across restarts so workers recognise its checks."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()
        if row:
            return str(row[0])
        new = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO meta VALUES ('id', ?)", (new,))
        return new

    def close(self) -> None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            self._flush()
        self._db.close()


# -- Health checker ------------------------------------------------------------

#: The most of a check's answer that is read: its status line and headers (and, to keep its connection, its body).
MAX_HEAD = 4096
#: A check's connection is used again only for checks that start within this many seconds of its opening: every
#: worker is connected afresh at least this often, so one that stops accepting connections is still found (README,
#: "Connections"). Only intervals under it keep one: under uvicorn's idle timeout (5 s), so rarely found closed.
KEEP_ALIVE = 5.0
#: errno values that mean the supervisor ran out of something: the check is postponed.
_OWN_TROUBLE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
_INSTANCE_RE = re.compile(rb"\r\nx-picoapi-instance:[ \t]*([A-Za-z0-9_-]{1,64})[ \t]*\r\n", re.IGNORECASE)
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,4})[ \t]*\r\n", re.IGNORECASE)
_CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
#: A probe's states, each naming the handler its next readiness event runs (HealthChecker._on_ready); IDLE is a
#: kept connection between checks (an event there means it was closed, or speaks unasked: it is closed).
CONNECTING, HANDSHAKING, SENDING, READING, IDLE = "connecting handshaking sending reading idle".split()
_Done = Callable[[_Check, CheckResult], None]  # where a check's result goes


class HealthChecker:
    """One daemon thread that schedules every worker's check and makes it.

    The registry's heap says what is due: the thread pops it (:meth:`run_pending`), starts each check on a
    non-blocking socket, and waits in one ``select`` until the earlier of the next due check and the next
    check's deadline. A registration that moves the next check earlier, and :meth:`stop`, wake it through a
    socket pair. Every result lands in :meth:`Registry.record`. Tests pass ``submit`` to script the results
    and drive :meth:`run_pending` with a fake clock. At most ``limit`` checks are in flight; workers whose last
    check failed (or who were never checked) get at most half of them, so silent workers cannot starve the
    others. A plain-HTTP worker checked more often than :data:`KEEP_ALIVE` keeps its connection between checks.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        supervisor_id: str = "",
        on_change: Callable[[str, StatusChange], None] | None = None,
        limit: int | None = None,
        submit: Callable[[list[_Check], Mapping[str, str], _Done], None] | None = None,
    ) -> None:
        self.registry = registry
        #: Sent with every check so a worker knows whose check it received.
        self.headers = {SUPERVISOR_HEADER: supervisor_id} if supervisor_id else {}
        self._on_change = on_change
        self._submit = submit or self._queue
        half = _descriptors() // 2
        self._limit = limit or max(16, min(8192, half))  # checks in flight at most
        self._max_kept = max(16, half)
        self._clock = registry.clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._woken = False  # a byte is in the pipe, unread: the thread is up, or about to be (no second send)
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._on_ready: dict[str, Callable[[_Probe], None]] = {
            CONNECTING: self._connected,
            HANDSHAKING: self._handshaking,
            SENDING: self._write_ready,
            READING: self._read_ready,
            IDLE: self._close,
        }
        # Only the checker's thread touches these (and run_pending's caller before start()).
        self._deadlines: list[tuple[float, int, _Probe, _Check]] = []
        self._seq = itertools.count()
        self._waiting = (collections.deque[_Check](), collections.deque[_Check]())  # trusted, others
        self._in_flight = self._untrusted_in_flight = 0
        self._kept: dict[str, _Probe] = {}  # idle connections by worker id
        self._report: _Done = self._done
        self._extra = ""  # the header lines every check sends
        self._swept = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Checks fired, and the sum of their lateness (fire time minus due time) in seconds.
        self.fired = 0
        self.lateness = 0.0
        #: Checks postponed because the supervisor itself could not check (out of descriptors, say).
        self.postponed = 0
        #: Why the last check could not be made, until one can be again; else "". /health shows it.
        self.trouble = ""
        registry.wake = self._wake

    @property
    def in_flight(self) -> int:
        """Checks started and not finished yet (read-only)."""
        return self._in_flight

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # The schedule ----------------------------------------------------------------

    def run_pending(self) -> int:
        """Start every check that is due now; returns how many."""
        checks = self.registry.pop_due(self._clock())
        if checks:
            now = self._clock()
            self.fired += len(checks)
            self.lateness += sum(now - c.due for c in checks)
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
            change = self.registry.record(check.worker_id, result)
            if change is not None:
                if change.removed:
                    logger.warning("worker %s removed: unhealthy for longer than API_DEREGISTER_AFTER", check.worker_id)
                elif change.new == UNHEALTHY:
                    logger.warning("worker %s is unhealthy: %s", check.worker_id, change.error)
                else:
                    logger.info("worker %s is %s (was %s)", check.worker_id, change.new, change.old)
                if self._on_change is not None:
                    self._on_change(check.worker_id, change)
        except Exception:  # recording must never kill the checker's thread
            logger.exception("recording the check of %s failed", check.worker_id)

    def start(self) -> None:
        """Start the thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="picoapi-health", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self.run_pending()
                self._poll(self._wait())
            except Exception:  # never let one bad step kill the checker, nor a repeating one spin it
                logger.exception("health checker step failed")
                time.sleep(0.1)
        self._close_all()

    def _wait(self) -> float | None:
        """Seconds until the next due check or check deadline, whichever is first (None: neither)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].check is not deadlines[0][3]:
            heapq.heappop(deadlines)  # that check finished: its deadline is moot
        times = [t for t in (self.registry.next_due(), deadlines[0][0] if deadlines else None) if t is not None]
        return max(0.0, min(times) - self._clock()) if times else None

    def _wake(self) -> None:
        if self._woken:  # a burst of registrations wakes the thread once, not once each
            return
        self._woken = True
        with contextlib.suppress(OSError):  # closed, or the pipe is full: awake already
            self._wake_w.send(b"\0")

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread within ``timeout``, abandoning the checks in flight; every socket is closed."""
        self._stopping, self.registry.wake = True, lambda: None
        self._wake()
        if self._thread is None:
            self._close_all()
        else:  # the thread closes its sockets as it ends
            self._thread.join(timeout)
            self._thread = self._thread if self._thread.is_alive() else None

    def _close_all(self) -> None:
        if self._selector.get_map() is None:
            return  # closed already
        for probe in [*(e[2] for e in self._deadlines), *self._kept.values()]:
            self._close(probe)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # The sockets ------------------------------------------------------------------

    def _queue(self, checks: list[_Check], headers: Mapping[str, str], done: _Done) -> None:
        """Queue ``checks`` for a slot, starting as many as the slots allow; ``done`` gets each result."""
        self._extra, self._report = "".join(f"{k}: {v}\r\n" for k, v in headers.items()), done
        trusted, others = self._waiting
        for check in checks:
            (trusted if check.trusted else others).append(check)
        self._fill()

    def _fill(self) -> None:
        trusted, others = self._waiting
        while self._in_flight < self._limit:
            if trusted:
                self._begin(trusted.popleft())
            elif others and self._untrusted_in_flight < max(1, self._limit // 2):
                self._begin(others.popleft())
            else:
                break

    def _begin(self, check: _Check) -> None:
        """Start ``check``: on the worker's kept connection if it is fresh, else a new one. A check that cannot
        even be built (a URL it cannot send, say) fails at once, alone."""
        probe = self._kept.pop(check.worker_id, None) or _Probe()
        probe.keep = 0 < check.interval < KEEP_ALIVE
        try:
            probe.host, probe.port, probe.https, probe.request = _target(check.url, self._extra, probe.keep)
        except Exception as exc:
            self._close(probe)
            self._report(check, CheckResult(False, None, None, f"cannot check {check.url!r}: {type(exc).__name__}"))
            return
        probe.keep = probe.keep and not probe.https
        probe.check, probe.idle_for, probe.sent, probe.buffer, probe.reused = check, check.worker_id, 0, b"", False
        self._in_flight += 1
        self._untrusted_in_flight += not check.trusted
        probe.started = now = self._clock()  # the deadline counts from here, not from the queue
        probe.state = SENDING
        heapq.heappush(self._deadlines, (now + check.timeout, next(self._seq), probe, check))
        try:
            if probe.sock is not None and now - probe.opened < KEEP_ALIVE and probe.key == (check.url, check.address):
                probe.reused = True
                self._write_ready(probe)  # an idle connection can take the request at once
                return
            self._connect(probe)
        except Exception as exc:
            self._fail(probe, exc)

    def _connect(self, probe: _Probe) -> None:
        """A new connection for ``probe``'s check, to the address verified at registration."""
        check = probe.check
        assert check is not None
        self._drop_connection(probe)
        if not check.address:
            raise ValueError("no address: its host did not resolve when the registry file was loaded")
        probe.reused, probe.sent, probe.opened, probe.key = False, 0, self._clock(), (check.url, check.address)
        sock = probe.sock = socket.socket(socket.AF_INET6 if ":" in check.address else socket.AF_INET)
        sock.setblocking(False)
        err = sock.connect_ex((check.address, probe.port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, os.strerror(err))
        probe.state = CONNECTING
        self._selector.register(sock, selectors.EVENT_WRITE, probe)

    def _poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for readiness, run each ready probe's handler, then expire deadlines."""
        on_ready = self._on_ready
        for key, _ in self._selector.select(timeout):
            probe = key.data
            if probe is None:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                # After reading, or a wake sent meanwhile would be read here and the next one never sent; a wake
                # skipped meanwhile is not lost: the loop reads the heap before it waits again.
                self._woken = False
                continue
            try:
                on_ready[probe.state](probe)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                pass  # not ready after all: wait for the next event
            except Exception as exc:
                self._fail(probe, exc)
        now, deadlines = self._clock(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, probe, check = heapq.heappop(deadlines)
            if probe.check is check:
                self._finish(probe, None, f"no answer within {check.timeout:g}s")
        if now - self._swept > KEEP_ALIVE:  # kept connections too old to use again (deregistered workers')
            self._swept = now
            for probe in [p for p in self._kept.values() if now - p.opened > KEEP_ALIVE]:
                self._close(probe)
        self._fill()

    def _connected(self, probe: _Probe) -> None:
        sock = probe.sock
        assert sock is not None and probe.check is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionRefusedError(err, os.strerror(err))
        if not probe.https:
            self._write_ready(probe)
            return
        self._selector.unregister(sock)
        probe.sock = _ssl_context().wrap_socket(sock, server_hostname=probe.host, do_handshake_on_connect=False)
        probe.state = HANDSHAKING
        self._selector.register(probe.sock, selectors.EVENT_WRITE, probe)
        self._handshaking(probe)

    def _handshaking(self, probe: _Probe) -> None:
        sock = probe.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
            reading = isinstance(want, ssl.SSLWantReadError)
            self._selector.modify(sock, selectors.EVENT_READ if reading else selectors.EVENT_WRITE, probe)
            return
        self._write_ready(probe)

    def _write_ready(self, probe: _Probe) -> None:
        sock = probe.sock
        assert sock is not None
        probe.state = SENDING
        sent = sock.send(probe.request[probe.sent :])
        probe.sent += sent
        if probe.sent < len(probe.request):
            self._selector.modify(sock, selectors.EVENT_WRITE, probe)
            return
        probe.state = READING
        self._selector.modify(sock, selectors.EVENT_READ, probe)

    def _read_ready(self, probe: _Probe) -> None:
        """Read the status line and the headers (up to 4 KiB; the body only to keep a small answer's connection)."""
        sock, check = probe.sock, probe.check
        assert sock is not None and check is not None
        data = sock.recv(MAX_HEAD)
        if not data:
            raise ConnectionError("connection closed before an answer")
        head = probe.buffer = probe.buffer + data
        line_end = head.find(b"\r\n")
        if line_end < 0:
            if len(head) > 512:
                raise ValueError("no HTTP status line in the first 512 bytes")
            return
        parts = head[:line_end].split(None, 2)
        if not (len(parts) >= 2 and parts[0].startswith(b"HTTP/") and len(parts[1]) == 3 and parts[1].isdigit()):
            raise ValueError("not an HTTP response")  # what it said is not echoed: no banner grabbing
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= MAX_HEAD:
            return  # more to come
        # The connection is kept only after an HTTP/1.1 answer that does not close, with a small body read whole.
        keep = end >= 0 and probe.keep and parts[0] == b"HTTP/1.1" and not _CLOSE_RE.search(head, 0, end + 2)
        length = _LENGTH_RE.search(head, 0, end + 2) if keep else None
        size = end + 4 + int(length.group(1)) if length is not None else MAX_HEAD + 1
        if size <= MAX_HEAD and len(head) < size:
            return  # the rest of the body: a kept connection must not hold stale bytes
        found = _INSTANCE_RE.search(head, 0, end + 2 if end >= 0 else MAX_HEAD)  # the last header's CRLF too
        code = int(parts[1])
        instance = found.group(1).decode() if found else None
        self._finish(probe, code, "" if 200 <= code < 300 else f"HTTP {code}", instance, keep=size <= MAX_HEAD)

    def _fail(self, probe: _Probe, exc: BaseException) -> None:
        if probe.reused and not probe.buffer and isinstance(exc, OSError) and probe.check is not None:
            try:  # a kept connection closed or reset before answering: a new one at once, not a failure
                self._connect(probe)
                return
            except Exception as again:
                exc = again
        # Out of descriptors, buffers or local ports is the supervisor's trouble, not the worker's.
        if isinstance(exc, OSError) and exc.errno in _OWN_TROUBLE:
            self._finish(probe, None, f"supervisor could not check: {exc.strerror}", own=True)
        else:
            self._finish(probe, None, _printable(f"{type(exc).__name__}: {exc}"))

    def _finish(
        self,
        probe: _Probe,
        code: int | None,
        error: str,
        instance: str | None = None,
        *,
        own: bool = False,
        keep: bool = False,
    ) -> None:
        """Report the probe's check (``error`` "" if good; ``own``: the supervisor's trouble) and close its
        connection, or keep it (``keep``: it may be) while its next check falls within KEEP_ALIVE of its opening.
        Kept connections, like checks in flight, have at most half the descriptors."""
        check = probe.check
        assert check is not None
        self._in_flight -= 1
        self._untrusted_in_flight -= not check.trusted
        if keep and probe.opened + KEEP_ALIVE > check.due + check.interval and len(self._kept) < self._max_kept:
            probe.state, probe.check = IDLE, None
            self._kept[check.worker_id] = probe
        else:
            self._close(probe)
        latency, late = self._clock() - probe.started, probe.started - check.due
        self._report(check, CheckResult(not error, code, latency, error, own, instance, late))

    def _drop_connection(self, probe: _Probe) -> None:
        if probe.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(probe.sock)
            probe.sock.close()
            probe.sock = None

    def _close(self, probe: _Probe) -> None:
        """Close the probe's connection and forget its check (a kept connection: forget it too)."""
        self._drop_connection(probe)
        if probe.state == IDLE:
            self._kept.pop(probe.idle_for, None)
        probe.check = None


class _Probe:
    """One check's connection; its :attr:`state` names the handler its next readiness event runs."""

    __slots__ = (
        *("check", "host", "port", "https", "request", "keep", "sock", "key", "opened", "reused", "started"),
        *("sent", "buffer", "state", "idle_for"),
    )
    host: str
    port: int
    https: bool
    request: bytes
    #: The answer may leave the connection open for the worker's next check.
    keep: bool
    #: This check runs on a kept connection: one found closed before answering is replaced, not failed.
    reused: bool
    started: float
    sent: int
    buffer: bytes
    idle_for: str

    def __init__(self) -> None:
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.check: _Check | None = None
        self.state, self.opened = SENDING, 0.0
        self.key: tuple[str, str] = ("", "")


@functools.lru_cache(maxsize=65_536)
def _target(url: str, extra_headers: str, keep: bool) -> tuple[str, int, bool, bytes]:
    """(host, port, https, request bytes) for a health URL; cached, as URLs rarely change."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: picoapi/{__version__}\r\n"
        f"{extra_headers}Connection: {'keep-alive' if keep and not https else 'close'}\r\n\r\n"
    )
    return parts.hostname or "", parts.port or (443 if https else 80), https, request.encode("ascii")


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every https check, made on first use: certificates verified with the system store."""
    return ssl.create_default_context()


@functools.cache
def _descriptors() -> int:
    """The soft limit of open files, after raising it to the hard one (a supervisor needs many); once a process."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20
    except (ImportError, ValueError, OSError):
        return 1024


def check_once(
    url: str, timeout: float = DEFAULT_HEALTH_TIMEOUT, headers: Mapping[str, str] | None = None, address: str = ""
) -> CheckResult:
    """Run one health check of ``url`` (at ``address``, else its host resolved) as the supervisor would.

    Blocks at most ``timeout`` (plus a little), on the caller's thread.
    """
    try:
        address = address or _resolve(urlsplit(url).hostname or "")
    except ValueError as exc:
        return CheckResult(False, None, None, str(exc))
    results: list[CheckResult] = []
    checker, deadline = HealthChecker(Registry(), limit=1), time.monotonic() + timeout + 1.0
    try:
        checker._queue(
            [_Check("", url, address, timeout, time.monotonic())], headers or {}, lambda _, r: results.append(r)
        )
        while not results and time.monotonic() < deadline:
            checker._poll(min(checker._wait() or 0.0, deadline - time.monotonic()))
    finally:
        checker.stop()
    return results[0] if results else CheckResult(False, None, None, "the check did not finish")


# -- Worker side ---------------------------------------------------------------

_NOT_A_SUPERVISOR = "is API_REGISTER_PATH a PicoAPI supervisor's /register URL?"


@dataclasses.dataclass
class _Supervisor:
    """What a worker knows about one supervisor it registers with."""

    url: str
    worker_id: str | None = None
    #: The supervisor's own id, from its answer; its checks carry the same.
    identity: str | None = None
    #: Monotonic time of the last registration or check from it.
    last_seen: float = 0.0
    attempts: int = 0
    next_attempt: float = 0.0
    error: str = ""

    @property
    def is_registered(self) -> bool:
        return self.worker_id is not None


class _Refused(Exception):
    """A supervisor answered what retrying will not fix (4xx, a redirect, not our entry)."""


class _Served(_Refused):
    """409: another live process serves this host:port. Startup fails: a second copy never serves beside it."""


class Registrar:
    """Registers a worker with its supervisors and keeps it registered.

    :meth:`register_all` blocks (``timeout`` in all) with retry and backoff; :meth:`start` runs a daemon thread
    that retries the supervisors still missing and registers again with any that stopped checking and no longer
    knows us, and checks once that this worker answers where it registered; :meth:`deregister_all` leaves them
    within ``DEREGISTER_TIMEOUT``. Each round asks them all at once (:meth:`_each`): one that hangs holds up none.
    """

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
        self.body = dict(body)
        self.timeout = timeout
        self.required = required
        interval = float(body["health"]["interval"])
        #: No check from a supervisor for this long means it forgot us: register again.
        self.watchdog_after = watchdog_after or DEFAULT_WATCHDOG_INTERVALS * interval
        self._id = worker_id(body["host"], body["port"])
        self._token = _parse_token("token", token or "")
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._clock, self._sleep, self._rand, self._wall = clock, sleep, rand, wall
        self._lock = threading.Lock()  # guards the _Supervisor fields and _in_flight across threads
        self._idle = threading.Condition(self._lock)  # notified when _in_flight empties
        self._in_flight: set[_Cuttable] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._self_check: threading.Timer | None = None
        self._stranger = False  # a check came from a supervisor whose identity is none of ours

    # One request -------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, half jittered."""
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        return delay * (0.5 + 0.5 * self._rand())

    def _send(
        self, url: str, timeout: float, method: str = "GET", **sent: Any
    ) -> tuple[requests.Response, bytes | None]:
        """:func:`_bounded_request` with MAX_BODY (the token only where passed in ``sent``), cut by :meth:`stop`
        too, after which only a DELETE is sent."""
        adapter, stoppable = _Cuttable(), method != "DELETE"
        with self._lock:
            if self._stop.is_set() and stoppable:
                raise _Cut("not sent: the registrar is stopping")
            self._in_flight.add(adapter)
        try:
            return _bounded_request(adapter, method, url, timeout, MAX_BODY, **sent)
        except _Cut as exc:
            if self._stop.is_set() and stoppable:
                raise _Cut("cut by stop()") from exc
            raise
        finally:
            with self._idle:
                self._in_flight.discard(adapter)
                self._idle.notify_all()

    def _attempt(self, sup: _Supervisor, timeout: float) -> float | None:
        """PUT once; None on success, else the delay the supervisor asked for (or 0).

        Raises :class:`_Refused` on an answer that retrying will not fix.
        """
        try:
            resp, content = self._send(sup.url, max(0.05, timeout), "PUT", json=self.body, headers=self._headers)
        except requests.RequestException as exc:
            sup.error = self._safe(_root_cause(exc))
            return 0.0
        status = resp.status_code
        if content is None:
            sup.error = f"answered {status} with over {MAX_BODY} bytes: too large for a supervisor's answer"
            return 0.0
        if 200 <= status < 300 and _is_own_entry(_json(content), self.body):
            with self._lock:
                sup.worker_id, sup.identity = self._id, resp.headers.get(SUPERVISOR_HEADER)
                sup.last_seen, sup.attempts, sup.error = self._clock(), 0, ""
            logger.info("registered with %s as %s (instance %s)", sup.url, self._id, self.body.get("instance"))
            return None
        why = f"HTTP {status}: {_detail(content)}"
        if 200 <= status < 300:
            why = f"answered {status} but not with this worker's entry: {_NOT_A_SUPERVISOR}"
        elif 300 <= status < 400:  # following one would turn the PUT into a GET somewhere else
            why = (
                f"HTTP {status} redirect to {resp.headers.get('Location')}, not followed: "
                "set API_REGISTER_PATH to the supervisor's own /register URL"
            )
        sup.error = self._safe(why)
        if status >= 500 or status in (408, 429):
            return _retry_after(resp.headers.get("Retry-After")) or 0.0
        if status == 409:
            raise _Served(f"{self._id} is served by another live instance; {sup.url} refused this one: {sup.error}")
        raise _Refused(f"refused the registration: {sup.error}")

    def _safe(self, text: str) -> str:
        """``text`` from the far end or an error, fit for a log: no token, nothing unprintable."""
        return _printable(text.replace(self._token, "***") if self._token else text)

    def _retry_later(self, sup: _Supervisor, asked: float, *, refused: bool = False) -> float:
        """Set ``sup``'s next attempt after a failed one, at the larger of what it asked (Retry-After) and the
        backoff, which a refusal puts at its cap; returns the delay."""
        if refused:
            sup.attempts = max(sup.attempts, _ATTEMPTS_AT_CAP)
        delay = max(asked, self.backoff(sup.attempts))
        sup.attempts += 1
        sup.next_attempt = self._clock() + delay
        return delay

    def _each(
        self, job: Callable[[_Supervisor], Any], deadline: float, name: str, only: Sequence[_Supervisor] = ()
    ) -> list[_Supervisor]:
        """Run ``job`` for every supervisor (or ``only`` these) at once, each in a daemon thread; returns, by
        ``deadline``, those whose job is still running (a hung DNS lookup, say: no cut reaches it)."""
        sups = list(only or self.supervisors)
        threads = [threading.Thread(target=job, args=(s,), name=name, daemon=True) for s in sups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - self._clock()))
        return [sup for sup, thread in zip(sups, threads, strict=True) if thread.is_alive()]

    # The whole lifecycle ----------------------------------------------------------

    def register_all(self) -> None:
        """Register with every supervisor at once, blocking at most ``timeout`` seconds.

        Raises :class:`RegistrationError` when a supervisor answers that another live process serves this
        host:port (409), or when ``required`` and any supervisor is still missing; otherwise logs a warning and
        leaves it to :meth:`start`.
        """
        deadline = self._clock() + self.timeout
        errors: dict[str, str] = {}
        served: list[str] = []

        def one(sup: _Supervisor) -> None:
            try:
                while (asked := self._attempt(sup, min(10.0, deadline - self._clock()))) is not None:
                    delay = self._retry_later(sup, asked)
                    if sup.next_attempt >= deadline:
                        errors[sup.url] = f"not reachable within {self.timeout:g}s (last error: {sup.error})"
                        return
                    self._sleep(delay)
            except _Refused as exc:
                errors[sup.url] = str(exc)
                if isinstance(exc, _Served):
                    served.append(str(exc))
                self._retry_later(sup, BACKOFF_CAP, refused=True)

        for sup in self._each(one, deadline + 0.25, "picoapi-register"):  # the deadline's cut takes a moment
            errors.setdefault(sup.url, f"no answer within {self.timeout:g}s")
        if served:  # whatever API_REGISTER_REQUIRED says
            raise RegistrationError("; ".join(served))
        if errors:
            text = "; ".join(f"{url}: {err}" for url, err in list(errors.items()))  # late threads may still add
            if self.required:
                raise RegistrationError(f"registration failed (API_REGISTER_REQUIRED is on): {text}")
            logger.warning("registration incomplete, retrying in the background: %s", text)

    def note_check(self, identity: str | None) -> None:
        """A request reached the health path, ``identity`` in its supervisor header (or None). It counts as a
        check only for the supervisor that gave that identity in its registration answer: a probe never does."""
        now = self._clock()
        with self._lock:
            heard = [sup for sup in self.supervisors if identity and sup.identity == identity]
            for sup in heard:
                sup.last_seen = now
            # A supervisor it did not register with checks it: one restarted, to which a sibling process registered
            # the entry again; the next silent one is then not asked but registered with again, knowing this process.
            self._stranger = self._stranger or bool(identity and not heard)

    def _still_checks(self, sup: _Supervisor) -> bool:
        """Whether ``sup`` still holds this worker's entry and checked it lately (a GET, bounded as a PUT is)."""
        url = f"{_base_url(sup.url)}{SERVICES_ROUTE}/{quote(self._id, safe='')}"
        try:
            resp, content = self._send(url, min(10.0, self.watchdog_after))
        except requests.RequestException:
            return False
        entry = _json(content or b"") if resp.status_code == 200 else None
        if not _is_own_entry(entry, self.body) or any(entry.get(k) != self.body.get(k) for k in ("name", "version")):
            return False
        # By its own clock (no skew between hosts); a Date is whole seconds, so a check may look up to 1 s fresher.
        said = _http_date(resp.headers.get("Date"))
        last = entry.get("last_check")
        return isinstance(last, (int, float)) and (self._wall() if said is None else said) - last <= self.watchdog_after

    def step(self) -> float:
        """One round of the background thread, the supervisors due asked at once; returns the seconds until the next."""
        now = self._clock()
        waits = [max(0.05, min(self.watchdog_after / DEFAULT_WATCHDOG_INTERVALS, 5.0))]
        with self._lock:
            silent = [s for s in self.supervisors if s.is_registered and now - s.last_seen > self.watchdog_after]
            missing = [s for s in self.supervisors if not s.is_registered]
        waits += [sup.next_attempt - now for sup in missing if now < sup.next_attempt]

        def one(sup: _Supervisor) -> None:
            if sup.is_registered:  # silent; its checks may reach a sibling process (uvicorn --workers): ask
                if not self._stranger and self._still_checks(sup):
                    with self._lock:
                        sup.last_seen = self._clock()
                    return
                if self._stop.is_set():  # the question was cut by stop(): nothing was learnt
                    return
                logger.warning("%s no longer knows this worker process; registering again", sup.url)
                with self._lock:
                    sup.worker_id, self._stranger = None, False
            try:
                asked = self._attempt(sup, 10.0)
                waits.append(math.inf if asked is None else self._retry_later(sup, asked))
            except _Refused as exc:
                logger.error("%s %s", sup.url, exc)
                waits.append(self._retry_later(sup, BACKOFF_CAP, refused=True))

        due = silent + [sup for sup in missing if now >= sup.next_attempt]
        if due:  # a question and a PUT, each bounded to 10 s
            self._each(one, now + 20.5, "picoapi-registrar-round", due)
        return max(0.01, min(waits))

    def start(self) -> None:
        """Start the background thread (retries and watchdog), and the self-check's timer."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="picoapi-registrar", daemon=True)
        self._thread.start()
        self._self_check = threading.Timer(min(SELF_CHECK_AFTER, self.body["health"]["interval"]), self.check_self)
        self._self_check.name, self._self_check.daemon = "picoapi-self-check", True
        self._self_check.start()

    def check_self(self) -> None:
        """GET the health URL this worker registered; log an ERROR with the fix unless it, or a sibling
        process, answers there (the server binds another port than the one registered, say)."""
        url = self.body["health"]["url"]
        try:
            resp, content = self._send(url, min(self.body["health"]["interval"], DEFAULT_HEALTH_TIMEOUT))
            found = _who_else(resp, content, self.body)
        except Exception as exc:  # requests' errors, or any other: the timer's thread never dies of it
            found = f"nothing answers there ({self._safe(_root_cause(exc))})"
        if found and not self._stop.is_set():  # shutting down cuts the check: nothing to report
            logger.error(
                "registered %s but %s: the server binds another port or address; pass --port %s to uvicorn "
                "(picoapi worker binds API_PORT itself), or set API_PORT and API_HOST to where it listens",
                self._id,
                found,
                self.body["port"],
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:  # never let the thread die: log and try later
                logger.exception("registration thread step failed")
                wait = BACKOFF_CAP
            self._stop.wait(wait)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and cut any request in flight; waits (``timeout`` at most) until
        none is, so that no PUT of ours can land after the DELETE that follows."""
        with self._idle:
            self._stop.set()
            for adapter in self._in_flight:
                adapter.cut()
            self._idle.wait_for(lambda: not self._in_flight, timeout)
        if self._self_check is not None:
            self._self_check.cancel()  # never joined: a check under way was cut above
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def deregister_all(self, timeout: float = DEREGISTER_TIMEOUT) -> None:
        """DELETE this worker at every supervisor at once (even where not registered: a PUT cut while
        awaiting its answer may have landed); returns within ``timeout``."""
        deadline = self._clock() + timeout * 0.75
        self.stop(timeout / 4)
        # Naming this process: an entry that a sibling process still serves stays.
        params = {"instance": self.body["instance"]} if self.body.get("instance") else None

        def one(sup: _Supervisor) -> None:
            url = f"{sup.url.rstrip('/')}/{quote(self._id, safe='')}"
            try:  # bounded in total, as a PUT is: a trickling supervisor cannot keep a thread
                resp, _ = self._send(url, timeout / 2, "DELETE", params=params, headers=self._headers)
                if resp.status_code >= 300 and resp.status_code not in (404, 409):  # 409: another process's now
                    logger.warning("deregistering from %s: HTTP %s", sup.url, resp.status_code)
            except requests.RequestException as exc:
                logger.warning("deregistering from %s failed: %s", sup.url, self._safe(_root_cause(exc)))
            sup.worker_id = None

        self._each(one, deadline, "picoapi-deregister")


def _why_not_registering(config: Config) -> str:
    """Why a worker with ``config`` (no API_REGISTER_PATH) will not register, and the fix."""
    given = f" (its tags {list(config.tags)} go nowhere)" if config.tags else ""
    return (
        f"not registering with a supervisor: API_REGISTER_PATH is not set{given}, so this worker serves as a plain "
        "app; set API_REGISTER_PATH to the supervisor's /register URL, e.g. http://127.0.0.1:8100/register"
    )


def _log_like_uvicorn() -> None:
    """Show PicoAPI's log lines as uvicorn shows its own (its handler and format, its level), when uvicorn
    serves and nobody configured logging for PicoAPI or the root logger: those are the user's, never touched."""
    server = logging.getLogger("uvicorn")
    if logger.handlers or logger.level or logging.getLogger().handlers or not server.handlers:
        return
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


def _who_else(answer: requests.Response, content: bytes | None, body: Mapping[str, Any]) -> str | None:
    """Who answered a worker's GET of its own health URL, if neither it nor a sibling (same name and version,
    any process) did; None if they did, or if a PicoAPI app whose health route is its own did (no name said)."""
    said = _json(content or b"")
    said = said if isinstance(said, dict) else {}
    if body.get("instance") and answer.headers.get(INSTANCE_HEADER) == body["instance"]:
        return None  # itself
    if "name" in said:
        if (said["name"], said.get("version")) == (body["name"], body.get("version")):
            return None  # a sibling
        return f"another service ('{_printable(said['name'])} {_printable(said.get('version'))}') answers there"
    if INSTANCE_HEADER in answer.headers:
        return None  # a PicoAPI app whose health route is its own: it may be a sibling, nothing tells
    return f"something else answers there (HTTP {answer.status_code}, not a PicoAPI health endpoint)"


def _is_own_entry(answer: Any, body: Mapping[str, Any]) -> TypeGuard[dict[str, Any]]:
    """Whether a supervisor's answer is the registry entry of the worker that sent ``body``."""
    own = {"id": worker_id(body["host"], body["port"]), "host": body["host"], "port": body["port"]}
    return isinstance(answer, dict) and all(answer.get(key) == value for key, value in own.items())


def _detail(content: bytes) -> str:
    """The supervisor's own message, raw (uncut, so the token can be scrubbed): FastAPI's ``detail`` if any."""
    answer, text = _json(content), content.decode("utf-8", "replace")
    detail = answer.get("detail", text) if isinstance(answer, dict) else text
    if isinstance(detail, list):  # FastAPI's 422: name each field that failed
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}"
            for e in detail
            if isinstance(e, dict) and isinstance(e.get("loc", []), list)
        )
    return str(detail)


# -- Responses: the workers' OpenAPI documents, error answers, tables ------------


def _fetch_openapi(url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """GET a worker's OpenAPI document, blocking at most OPENAPI_TIMEOUT in all, no redirects.

    502 unless it is a JSON object with an ``openapi`` field, in OPENAPI_MAX_BYTES. A 502 says what
    went wrong in its own words, never in the far end's bytes: a registered address may be anything's.
    """
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
    document = _json(body)
    if not isinstance(document, dict) or not isinstance(document.get("openapi"), str):
        raise HTTPException(
            502, "the worker's answer is not an OpenAPI document: a JSON object with an 'openapi' field"
        )
    return document


async def _no_worker_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NoWorkerAvailable)
    detail = {"detail": str(exc), "tags": exc.tags, "version": exc.version, "tried": [list(t) for t in exc.tried]}
    return JSONResponse(detail, status_code=503)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own 422, always sendable: json.loads reads NaN, Infinity, 1e400 and lone surrogates, which
    the answer quotes back and JSON or UTF-8 cannot carry (FastAPI's handler answers 500). They go back as text."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    try:
        body = to_json({"detail": errors}, inf_nan_mode="strings")
    except ValueError:  # a lone surrogate ("\ud800") in the input: quote it escaped
        errors = [{**error, "input": _printable(error.get("input"))} for error in errors]
        body = to_json({"detail": errors}, inf_nan_mode="strings")
    return Response(body, status_code=422, media_type="application/json")


def _is_connect_error(exc: BaseException) -> bool:
    """True when the connection was never made, so nothing was sent."""
    connect_errors = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
    return any(isinstance(e, connect_errors) for e in _causes(exc))


def _ago(when: float | None, now: float) -> str:
    return "-" if when is None else f"{max(0.0, now - when):.1f}s ago"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """Rows as aligned text columns under ``headers``."""
    table = [headers, *rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


# -- Operator views: dashboard, metrics, service discovery ----------------------

METRICS_ROUTE = "/metrics"
#: Prometheus' HTTP service discovery (``http_sd_configs``): the healthy workers as scrape targets.
TARGETS_ROUTE = "/prometheus/targets"
#: GET /metrics shows workers by tag for the tags with the most workers, at most this many (3 series each),
#: so that hostile or numerous tags cannot grow the label set without bound.
METRICS_MAX_TAGS = 50
#: Upper bounds in seconds of the check latency and lateness histograms' buckets (Prometheus' defaults).
METRICS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum: an observation is two adds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(METRICS_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(METRICS_BUCKETS, value)] += 1
        self.sum += value


class _Metrics:
    """The registry's counters for GET /metrics, updated under its lock; the rest is read when scraped."""

    def __init__(self) -> None:
        self.checks = [0, 0]  # failed, succeeded
        self.registrations = self.deregistrations = 0
        self.latency, self.lateness = _Histogram(), _Histogram()

    def checked(self, result: CheckResult) -> None:
        self.checks[result.ok] += 1
        if result.latency is not None:
            self.latency.observe(result.latency)
        self.lateness.observe(result.late)


#: Label values escaped as the exposition format asks.
_LABEL_ESCAPES = str.maketrans({"\\": r"\\", '"': r"\"", "\n": r"\n"})
_Samples = list[tuple[str, dict[str, str], float]]


def _exposition(registry: Registry, checker: HealthChecker | None) -> str:
    """The supervisor's metrics in the Prometheus text exposition format (version 0.0.4)."""
    metrics, workers, lines = registry.metrics, registry.workers(), list[str]()
    statuses = collections.Counter(w.status for w in workers)
    by_tag = collections.Counter((tag, w.status) for w in workers for tag in w.tags)
    sizes = collections.Counter(tag for w in workers for tag in w.tags)
    top = sorted(sizes, key=lambda tag: (-sizes[tag], tag))[:METRICS_MAX_TAGS]
    tagged: _Samples = [("", {"tag": tag, "status": s}, by_tag[tag, s]) for tag in top for s in STATUSES]
    postponed, in_flight = (checker.postponed, checker.in_flight) if checker else (0, 0)
    results = {"ok": metrics.checks[True], "failed": metrics.checks[False], "postponed": postponed}
    checks: _Samples = [("", {"result": result}, n) for result, n in results.items()]
    trouble = int(bool(checker and checker.trouble))

    def histogram(hist: _Histogram) -> _Samples:
        counts = list(hist.counts)  # one snapshot: the +Inf bucket and the count agree
        bounds = [f"{bound:g}" for bound in METRICS_BUCKETS] + ["+Inf"]
        buckets = [("_bucket", {"le": le}, n) for le, n in zip(bounds, itertools.accumulate(counts), strict=True)]
        return [*buckets, ("_sum", {}, hist.sum), ("_count", {}, sum(counts))]

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
        (
            "deregistrations_total",
            "counter",
            "Workers removed (DELETE, API_DEREGISTER_AFTER).",
            metrics.deregistrations,
        ),
        ("checker_trouble", "gauge", "1 while the supervisor cannot make checks.", trouble),
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


def _dashboard_row(w: Worker, now: float, wall: float) -> dict[str, Any]:
    shown = "id name version tags status suspect failures last_error last_check last_latency".split()
    since = None if w._unhealthy_since is None else wall - (now - w._unhealthy_since)  # monotonic to Unix time
    return {**{k: getattr(w, k) for k in shown}, "unhealthy_since": since}


_DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>PicoAPI</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #eee; white-space: nowrap; }
th { position: sticky; top: 0; background: #f6f6f6; }
td.tags, td.error { white-space: normal; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.status::before { content: ""; display: inline-block; width: .7em; height: .7em; border-radius: 50%;
  margin-right: .4em; background: currentColor; }
.healthy { color: #137333; } .unhealthy { color: #c5221f; } .unknown { color: #80868b; }
#counts a { margin-right: 1rem; font-weight: 600; text-decoration: none; }
form { margin: .8rem 0; }
footer { color: #666; margin-top: 1rem; } footer a { margin-left: .5rem; }
</style></head><body>
<h1 id="title">PicoAPI</h1>
<p class="unhealthy" id="trouble" role="alert" hidden></p><p class="unhealthy" id="error" role="alert" hidden></p>
<p id="counts"></p>
<form id="filter"><label>tags <input id="tag" name="tag" autocomplete="off" placeholder="e.g. resize png"></label>
<button type="submit">filter</button> <button type="button" id="all">show all</button></form>
<table id="workers"><thead><tr><th>name</th><th>id</th><th>version</th><th>tags</th><th>status</th><th>last error</th>
<th>unhealthy since</th><th>last check</th><th class="num">latency</th><th class="num">failures</th></tr></thead>
<tbody id="rows"></tbody></table>
<footer><span id="shown">loading</span>; updated every REFRESH s.<span id="pages"></span></footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id), query = new URLSearchParams(location.search);
const view = {tag: query.getAll("tag").join(" "), status: query.get("status") || "", page: +query.get("page") || 1};
let timer = 0, asked = 0;
const el = (tag, props) => Object.assign(document.createElement(tag), props);  // text goes in as text, never markup
const cell = (textContent, className = "") => el("td", {textContent, className});
const ago = (t, now) => t == null ? "-" : Math.max(0, now - t).toFixed(1) + "s ago";
function params(change) {
  const v = {...view, ...change}, p = new URLSearchParams();
  for (const t of v.tag.split(/[\\s,]+/)) if (t) p.append("tag", t);
  if (v.status) p.set("status", v.status);
  if (v.page > 1) p.set("page", v.page);
  return p;
}
function go(change) { Object.assign(view, change); update(); }
function link(textContent, change, count) {  // a count (data-count) or a page link; either keeps the view live
  const a = el("a", {textContent, href: "?" + params(change), className: count || ""});
  if (count) a.dataset.count = count;
  a.onclick = (e) => { e.preventDefault(); go(change); };
  return a;
}
function row(w, now) {
  const tr = el("tr", {className: "worker"}), since = w.unhealthy_since;
  Object.assign(tr.dataset, {id: w.id, status: w.status});
  tr.append(cell(w.name), cell(w.id), cell(w.version), cell(w.tags.join(" "), "tags"),
    cell(w.status + (w.suspect ? " (suspect)" : ""), "status " + w.status), cell(w.last_error, "error"),
    cell(since == null ? "-" : new Date(since * 1000).toLocaleTimeString() + " (" + ago(since, now) + ")", "since"),
    cell(ago(w.last_check, now)), cell(w.last_latency == null ? "-" : (w.last_latency * 1e3).toFixed(1) + " ms", "num"),
    cell(String(w.failures), "num"));
  return tr;
}
function render(d) {
  document.title = d.title + " - PicoAPI"; $("title").textContent = d.title;
  $("trouble").textContent = "Checks postponed: " + d.trouble; $("trouble").hidden = !d.trouble;
  $("counts").replaceChildren(...Object.entries(d.counts).map(([s, n]) => link(n + " " + s, {status: s, page: 1}, s)));
  $("rows").replaceChildren(...d.workers.map((w) => row(w, d.now)));
  if (!d.workers.length) $("rows").insertRow().append(cell("no worker"));
  const first = (d.page - 1) * d.page_size, last = first + d.workers.length;
  $("shown").textContent = (last > first ? first + 1 + "-" + last : "none") + " of " + d.matched + " workers shown, "
    + d.total + " in all" + (view.status ? " (" + view.status + ")" : "");
  $("pages").replaceChildren(...(d.page > 1 ? [link("previous page", {page: d.page - 1})] : []),
    ...(last < d.matched ? [link("next page", {page: d.page + 1})] : []));
}
async function update() {
  clearTimeout(timer);
  const mine = ++asked, p = params({});
  history.replaceState(null, "", location.pathname + (String(p) ? "?" + p : ""));  // a reload keeps the view
  try {
    const answer = await fetch(location.pathname + "/summary?" + p, {cache: "no-store"}), d = await answer.json();
    if (mine !== asked) return;
    if (!answer.ok) throw new Error([].concat(d.detail).map((e) => e.msg || e).join("; "));
    render(d);
    $("error").hidden = true;
  } catch (e) {
    if (mine !== asked) return;
    $("error").textContent = "Not updated: " + e.message; $("error").hidden = false;
  }
  timer = setTimeout(update, REFRESH000);
}
$("filter").onsubmit = (e) => { e.preventDefault(); go({tag: $("tag").value, page: 1}); };
$("all").onclick = () => { $("tag").value = ""; go({tag: "", status: "", page: 1}); };
$("tag").value = view.tag;
update();
</script></body></html>
"""


@functools.cache
def _dashboard_page() -> tuple[str, str]:
    """The dashboard (static: its script fetches the data) and a Content-Security-Policy that runs only it."""
    page = _DASHBOARD.replace("REFRESH", str(DASHBOARD_REFRESH))
    script = page.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = f"default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return page, policy + "; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


def _operator_router(app: PicoAPI) -> APIRouter:
    """The supervisor's routes for operators: the dashboard, GET /metrics and Prometheus' service discovery."""
    router, registry = APIRouter(tags=["picoapi"], dependency_overrides_provider=app), app.registry
    assert registry is not None

    @router.get(DASHBOARD_ROUTE, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        page, policy = _dashboard_page()
        return HTMLResponse(page, headers={"Content-Security-Policy": policy, "Cache-Control": "no-store"})

    @router.get(DASHBOARD_ROUTE + "/summary", include_in_schema=False)
    def dashboard_summary(  # like every sync route, on a thread: never holding up the event loop
        tags: _Tags, status: Status | None = None, page: Annotated[int, Query(ge=1, le=1_000_000)] = 1
    ) -> Response:
        """What the dashboard shows: counts over the workers with ``tags``, and a page of them, trouble first."""
        tagged = registry.workers(*tags)
        counts = collections.Counter(w.status for w in tagged)
        matched = [w for w in tagged if status is None or w.status == status]
        order = {UNHEALTHY: 0, UNKNOWN: 1, HEALTHY: 2}  # trouble first: it stays visible with many workers
        matched.sort(key=lambda w: (order[w.status], not (w.failures or w.suspect), w.name, w.id))
        first, now, wall = (page - 1) * DASHBOARD_PAGE, registry.clock(), registry._wall()
        summary = {
            "title": app.title,
            "trouble": app.checker.trouble if app.checker is not None else "",
            **{"now": wall, "page": page, "page_size": DASHBOARD_PAGE, "total": len(registry), "matched": len(matched)},
            "counts": {s: counts[s] for s in STATUSES},
            "workers": [_dashboard_row(w, now, wall) for w in matched[first : first + DASHBOARD_PAGE]],
        }
        return _json_response(summary, headers={"Cache-Control": "no-store"})

    @router.get(METRICS_ROUTE, response_class=PlainTextResponse, operation_id="picoapi_metrics")
    def metrics() -> PlainTextResponse:
        """The supervisor's metrics in the Prometheus text exposition format."""
        exposition = _exposition(registry, app.checker)
        return PlainTextResponse(exposition, media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get(TARGETS_ROUTE, response_model=list[TargetGroup], operation_id="picoapi_prometheus_targets")
    def prometheus_targets(tags: _Tags) -> Response:
        """The healthy workers with every tag, as Prometheus' HTTP service discovery reads them."""
        groups = []
        for w in registry.workers(*tags, status=HEALTHY):
            labels = {"id": w.id, "name": w.name, "version": w.version, "tags": f",{','.join(w.tags)},"}
            labels["scheme"] = urlsplit(w.health_url).scheme
            groups.append({"targets": [w.id], "labels": {f"__meta_picoapi_{k}": v for k, v in labels.items()}})
        return _json_response(groups)

    return router


# -- The PicoAPI class ---------------------------------------------------------


HealthCheckFunc = Callable[[], Any]


class PicoAPI(FastAPI):
    """A FastAPI app that is a worker (registers itself) or a supervisor (keeps the registry).

    Keywords that name a setting of :class:`Config` (``mode``, ``host``, ``port``, ``tags``...) win over
    the environment and the ``.env`` file; ``config=`` gives them all at once instead. Every other
    keyword goes to FastAPI untouched; one that looks like a misspelt setting is a :class:`ConfigError`.
    ``is_master`` is picoapi 1.x's spelling of ``mode`` (deprecated).
    """

    def __init__(
        self,
        *,
        config: Config | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        is_master: bool | None = None,
        **options: Any,
    ) -> None:
        config, options = _split_keywords(options, config, env_file, is_master)
        #: The validated settings of this app.
        self.config = config
        super().__init__(**options)
        self._health_checks: dict[str, HealthCheckFunc] = {}
        #: The worker's registrar (a worker with API_REGISTER_PATH set), else None.
        self.registrar: Registrar | None = None
        #: The supervisor's registry and checker (supervisor mode), else None.
        self.registry: Registry | None = None
        self.checker: HealthChecker | None = None
        self.supervisor_id = uuid.uuid4().hex[:12]
        #: This process's id, renewed at every startup; it registers with it, and its health answers say it.
        self.instance = uuid.uuid4().hex[:12]
        self._store: _Store | None = None
        # Connection reuse for call() and broadcast(): one requests.Session per thread.
        self._local = threading.local()
        # Each thread's session, to close at stop; weakly held: a thread that ends (anyio retires idle ones) frees
        # its session and its pooled sockets.
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()  # guards _sessions
        self._broadcaster: concurrent.futures.ThreadPoolExecutor | None = None
        if config.mode == "worker" and config.register_urls:
            config.registration()  # raises ConfigError now if host or title is missing
        first_own = len(self.router.routes)
        if config.mode == "supervisor":
            self._become_supervisor()
        self.add_api_route(
            config.health_route,
            self._health_endpoint,
            include_in_schema=False,
            tags=["picoapi"],
            operation_id="picoapi_health",
        )
        cors = {f"allow_{k}": list(getattr(config, f"cors_allow_{k}")) for k in ("origins", "methods", "headers")}
        guarded = REGISTER_ROUTE if config.mode == "supervisor" else None
        self.add_middleware(_CORS, **cors, allow_credentials=config.cors_allow_credentials, guarded=guarded)
        if config.allowed_hosts:  # unset: no middleware, every host served at no cost
            self.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts), www_redirect=False)
        self.router.lifespan_context = self._wrap_lifespan(self.router.lifespan_context)
        self._own_routes = self.router.routes[first_own:]

    def _become_supervisor(self) -> None:
        config = self.config
        self.registry = Registry(
            max_workers=config.max_workers,
            failures=config.health_failures,
            successes=config.health_successes,
            deregister_after=config.deregister_after,
        )
        self._supervisor = _SupervisorRoutes(self, self.registry)
        for router in (self._supervisor.router(), _operator_router(self)):
            # Its routes themselves, not one included entry (FastAPI 0.165 adds one without a path): a user's
            # route on the same path is then moved ahead of PicoAPI's by build_middleware_stack, and wins.
            self.router.routes.extend(router.routes)
        self.add_middleware(_BodyLimit, path=REGISTER_ROUTE, limit=MAX_BODY)
        self.add_exception_handler(NoWorkerAvailable, _no_worker_handler)
        if self.exception_handlers.get(RequestValidationError) is request_validation_exception_handler:
            self.add_exception_handler(RequestValidationError, _validation_handler)  # unless it is the user's

    @property
    def mode(self) -> str:
        """``"worker"`` or ``"supervisor"``, from :attr:`config`."""
        return self.config.mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Here, not in the route, so a health route of the user's own is noted and says who answered too.
        if scope["type"] != "http" or scope["path"] != self.config.health_route:
            return await super().__call__(scope, receive, send)
        if self.registrar is not None:
            key = _SUPERVISOR_HEADER_KEY
            self.registrar.note_check(next((v.decode("latin-1") for k, v in scope["headers"] if k == key), None))
        await super().__call__(scope, receive, _adding_header(send, (_INSTANCE_HEADER_KEY, self.instance.encode())))

    def build_middleware_stack(self) -> ASGIApp:
        # Routes match in order and PicoAPI's come first, so a user's catch-all cannot
        # swallow the health endpoint; but a user's route on the very same path (their
        # own /health, say) is moved ahead of PicoAPI's and wins.
        routes = self.router.routes
        theirs: set[str | None] = set()
        for r in [r for r in routes if not any(r is o for o in self._own_routes)]:
            included: list[Any] = getattr(r, "effective_route_contexts", list)()  # include_router's (FastAPI 0.165)
            theirs |= {
                getattr(r, "path", None),
                *(c.path or getattr(c.starlette_route, "path", None) for c in included),
            }
        for route in [r for r in self._own_routes if getattr(r, "path", None) in theirs and r in routes]:
            routes.remove(route)
            routes.append(route)
        return super().build_middleware_stack()

    # Lifespan ------------------------------------------------------------------

    def _wrap_lifespan(self, inner: Any) -> Callable[[Any], Any]:
        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            async with inner(app) as state:
                await self._start()
                try:
                    yield state
                finally:
                    await self._stop()

        return lifespan

    async def _start(self) -> None:
        config = self.config
        self.instance = uuid.uuid4().hex[:12]  # anew: the processes of a server that forks after import differ
        _log_like_uvicorn()
        if config.mode == "supervisor":
            await run_in_threadpool(self._start_supervisor)
        elif config.register_urls:
            body = {**config.registration(), "instance": self.instance}
            if self.openapi_url:
                body["openapi"] = self.openapi_url
            self.registrar = Registrar(
                config.register_urls,
                body,
                token=config.register_token,
                timeout=config.register_timeout,
                required=config.register_required,
            )
            try:
                await run_in_threadpool(self.registrar.register_all)
            except RegistrationError:  # the supervisors that did take it must not keep it
                await run_in_threadpool(self.registrar.deregister_all)
                raise
            self.registrar.start()
        else:  # a warning only if something shows it was meant to register: a plain app starts quietly
            level = logging.WARNING if config.configured & _MEANT_TO_REGISTER else logging.INFO
            logger.log(level, "%s", _why_not_registering(config))

    async def _stop(self) -> None:
        if self.registrar is not None:
            await run_in_threadpool(self.registrar.deregister_all)
            self.registrar = None
        if self.checker is not None:
            await run_in_threadpool(self.checker.stop)
            self.checker = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._broadcaster is not None:
            self._broadcaster.shutdown(wait=False, cancel_futures=True)
            self._broadcaster = None
        with self._sessions_lock:
            sessions, self._sessions = list(self._sessions), weakref.WeakSet()
        for session in sessions:
            session.close()
        self._local = threading.local()

    def _start_supervisor(self) -> None:
        assert self.registry is not None
        if self.config.registry_file:
            self._store = _Store(self.config.registry_file, self.registry.__contains__)
            self.supervisor_id = self._store.identity()
            before = len(self.registry)
            for reg, address, instances in self._store.load():
                if worker_id(reg.host, reg.port) not in self.registry:
                    try:
                        address = address or _resolve(reg.host)  # a file from before addresses were kept
                        for instance in instances or [reg.instance or ""]:  # the same registration from each process
                            self.registry.register(
                                reg.model_copy(update={"instance": instance or None}), address=address
                            )
                    except ValueError as exc:  # its checks fail, saying why, until it registers again
                        logger.warning("loaded worker %s: %s", worker_id(reg.host, reg.port), exc)
                        self.registry.register(reg, address="")
                    except RegistryFull:
                        logger.warning("registry file holds more than API_MAX_WORKERS workers; rest skipped")
                        break
            logger.info("loaded %d workers from %s", len(self.registry) - before, self.config.registry_file)
        self.checker = HealthChecker(self.registry, supervisor_id=self.supervisor_id, on_change=self._changed)
        # Full garbage collections walk every object the imports made and paused the
        # checker 20-45 ms at 5,000-10,000 workers (bench/); frozen, they are skipped.
        gc.freeze()
        self.checker.start()

    def _changed(self, wid: str, change: StatusChange) -> None:
        if change.removed and self._store is not None:
            self._store.forget(wid)  # deleted by the next write: never disk I/O on the check thread

    # Handing out work ------------------------------------------------------------

    def _need_registry(self) -> Registry:
        if self.registry is None:
            raise PicoAPIError("pick(), call() and broadcast() need a supervisor: PicoAPI(mode='supervisor')")
        return self.registry

    def pick(self, *tags: str, version: str | None = None) -> Worker:
        """A healthy worker with every tag, taking turns among them (round-robin, thread-safe); raises
        :class:`NoWorkerAvailable` (a 503 when raised in a route)."""
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
        """Send a request to a healthy worker with ``tags``; returns its response, whatever its status.

        A worker that cannot be connected to (nothing was sent) is marked suspect,
        checked at once, and the next worker is tried, until all were. A request that
        may have reached a worker is not sent again unless ``retry_sent=True`` (for
        idempotent requests). Raises :class:`NoWorkerAvailable` listing every worker
        tried and why. ``kwargs`` go to ``requests``; connections are reused. A redirect
        is returned, not followed (it would take the request, body and all, to another
        host), unless ``allow_redirects=True``.
        """
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
                unsent = isinstance(exc, requests.ConnectionError) and _is_connect_error(exc)
                if not (unsent or retry_sent):
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
        """Send the same request to every healthy worker with ``tags``, concurrently.

        Returns ``{worker id: response or exception}``; returns within about ``timeout``
        seconds, a worker still busy then gets a ``TimeoutError``. Redirects are returned,
        not followed, unless ``allow_redirects=True``.
        """
        registry, wanted = self._need_registry(), [tags] if isinstance(tags, str) else list(tags)
        workers = [w for w in registry.workers(*wanted, status=HEALTHY, version=version) if w.is_ready]
        if self._broadcaster is None:
            self._broadcaster = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="picoapi-broadcast")
        futures = {self._broadcaster.submit(self._send, w, method, path, timeout, kwargs): w.id for w in workers}
        finished, _ = concurrent.futures.wait(futures, timeout=timeout + 0.5)
        results: dict[str, requests.Response | Exception] = {}
        for future, wid in futures.items():
            if future not in finished:
                future.cancel()
                results[wid] = TimeoutError(f"{wid} did not answer within {timeout:g}s")
            elif (error := future.exception()) is not None:
                results[wid] = error if isinstance(error, Exception) else RuntimeError(str(error))
            else:
                results[wid] = future.result()
        return results

    def _send(self, worker: Worker, method: str, path: str, timeout: Any, kwargs: dict[str, Any]) -> requests.Response:
        """``method path`` to ``worker`` on this thread's own session (connections are reused; _stop closes them
        all), not following a redirect unless ``allow_redirects=True``."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with self._sessions_lock:
                self._sessions.add(session)
        url, options = worker._request(path, {"allow_redirects": False, **kwargs})
        return session.request(method, url, timeout=timeout, **options)

    # Health --------------------------------------------------------------------

    def health_check(self, func: HealthCheckFunc | None = None, *, name: str | None = None) -> Any:
        """Decorator: add a check (sync or async) to the health endpoint.

        The check passes when it returns a truthy value; falsy or an exception
        makes the endpoint answer 503 naming it. Sync checks run in a thread.
        """

        def add(f: HealthCheckFunc) -> HealthCheckFunc:
            self._health_checks[name or str(getattr(f, "__name__", repr(f)))] = f
            return f

        return add(func) if func is not None else add

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
        name, version = self.config.title or self.title, self.config.version
        body = {"status": UNHEALTHY if failing else HEALTHY, "name": name, "version": version}
        return JSONResponse(body | ({"failing": failing} if failing else {}), status_code=503 if failing else 200)


#: The settings that are FastAPI options too: PicoAPI(title=...) sets both.
_FASTAPI_SETTINGS = frozenset({"title", "description", "version"})
#: The settings that show a worker was meant to register (FastAPI's title= keyword alone does not).
_MEANT_TO_REGISTER = frozenset(
    {"tags", "host", "title", "register_required", "health_path", "health_interval", "health_timeout"}
)
_FASTAPI_OPTIONS = frozenset(inspect.signature(FastAPI.__init__).parameters) - {"self", "extra"}


def _split_keywords(
    options: dict[str, Any], config: Config | None, env_file: str | os.PathLike[str] | None, is_master: bool | None
) -> tuple[Config, dict[str, Any]]:
    """PicoAPI's keywords split: the settings into its :class:`Config`, the rest to FastAPI (with the title,
    description and version the configuration sets, unless given). A misspelt setting is a ConfigError.

    FastAPI's title, description and version keywords are FastAPI's first: they go into the configuration too,
    checked as registration fields only by an app that registers (they are what it sends)."""
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


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes on ``path`` with 413, by their length or as they arrive."""

    def __init__(self, app: ASGIApp, path: str, limit: int) -> None:
        self.app, self.path, self.limit = app, path, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        too_long = f"request body over {self.limit} bytes"
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await JSONResponse({"detail": too_long}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_long)
            return message

        await self.app(scope, counted, send)


class _CORS(CORSMiddleware):
    """Starlette's CORS middleware, with a fast path and a guard.

    Requests without an Origin header (every call between services) only need ``Vary: Origin`` on the answer,
    appended to the raw headers; browsers' take Starlette's own path. Browsers send Origin with every write:
    under ``guarded`` (the supervisor's /register) a write or its preflight from an origin not listed by name
    gets 403, so '*' lets any page read the registry but none change it.
    """

    def __init__(self, app: ASGIApp, /, *, guarded: str | None = None, **options: Any) -> None:
        super().__init__(app, **options)
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not any(k == b"origin" for k, _ in scope["headers"]):
            return await self.app(scope, receive, _adding_header(send, (b"vary", b"Origin")))
        if self.guarded and (refusal := self._foreign_write(scope, self.guarded)):
            return await refusal(scope, receive, send)
        await super().__call__(scope, receive, send)

    def _foreign_write(self, scope: Scope, guarded: str) -> Response | None:
        """The 403 for a write (or its preflight) under ``guarded`` from an origin not listed by name, else None."""
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # as the router sees it, behind a proxy too
        if path != guarded and not path.startswith(guarded + "/"):
            return None
        headers, method = Headers(scope=scope), scope["method"]
        if method == "OPTIONS":
            method = headers.get("access-control-request-method", method)
        origin = headers["origin"]
        if method in ("GET", "HEAD") or (origin != "*" and origin in self.allow_origins):
            return None
        detail = (
            f"{_printable(method, 16)} {guarded} from origin '{_printable(origin)}' refused: browser pages may change "
            "the registry only from origins listed by name in API_CORS_ALLOW_ORIGINS ('*' does not count); list it "
            "there, '!'-delimited, to allow it"
        )
        return JSONResponse({"detail": detail}, status_code=403)


# -- The supervisor's routes -----------------------------------------------------


class _SupervisorRoutes:
    """The supervisor's HTTP API as an APIRouter: workers register and deregister, anyone reads the registry.

    Bodies are built by :func:`_out`, from the same declaration as the :class:`WorkerOut` each route declares,
    and sent as they are: serialised once, never validated again (a test checks them against the schema).
    """

    def __init__(self, app: PicoAPI, registry: Registry) -> None:
        self.app, self.registry, self.config = app, registry, app.config
        #: What is under way on threads, by kind (see :meth:`on_thread`).
        self.busy = collections.Counter[str]()

    def router(self) -> APIRouter:
        """The routes and the answers each may give; with API_REGISTER_TOKEN set, those that write need it."""
        token, routes = self.config.register_token, APIRouter(tags=["picoapi"], dependency_overrides_provider=self.app)

        def add(method: str, path: str, endpoint: Callable[..., Any], answers: dict[int, str], **options: Any) -> None:
            if method != "GET" and token:  # no token: no dependency to resolve per request
                options["dependencies"] = [Depends(self.require_token)]
                answers = {401: "no bearer token", 403: "wrong token", **answers}
            responses = options.setdefault("responses", {})
            for code, text in answers.items():
                responses.setdefault(code, {})["description"] = text
            options["operation_id"] = f"picoapi_{endpoint.__name__}"
            routes.add_api_route(path, endpoint, methods=[method], **options)

        registering = {
            201: "registered",
            400: "the body is not JSON",
            413: f"the body is over {MAX_BODY} bytes",
            422: "a field is invalid, or the host does not resolve",
            503: "the registry is full (API_MAX_WORKERS), or busy: see Retry-After",
        }
        created = {201: {"model": WorkerOut}}
        add("PUT", REGISTER_ROUTE, self.register, registering, response_model=WorkerOut, responses=created)
        not_found, busy = {404: "no worker with that id"}, {503: "the registry file is busy: see Retry-After"}
        add("DELETE", REGISTER_ROUTE + "/{worker_id}", self.deregister, not_found | busy, status_code=204)
        next_link = {"description": '`<URL>; rel="next"` while more entries remain', "schema": {"type": "string"}}
        paged = {200: {"headers": {"Link": next_link}}}
        add("GET", SERVICES_ROUTE, self.services, {}, response_model=list[WorkerOut], responses=paged)
        add("GET", SERVICES_ROUTE + "/{worker_id}", self.service, not_found, response_model=WorkerOut)
        fetching = {
            409: "the worker is not healthy: nothing is asked of it",
            502: f"the worker sent no OpenAPI document within {OPENAPI_TIMEOUT:g} s",
            503: "too many documents are being fetched: see Retry-After",
        }
        add("GET", SERVICES_ROUTE + "/{worker_id}/openapi", self.service_openapi, not_found | fetching)
        return routes

    # The routes ----------------------------------------------------------------------

    async def register(self, reg: Registration, request: Request) -> Response:
        """Register a worker (only an address it registers from), or refresh or replace its entry."""
        try:
            address = await self.claimed_address(reg.host, request.client.host if request.client else None)
            await self.refuse_if_served(reg, address)
            worker, created = await self.write(self.add, reg, address)
        except ValueError as exc:  # the host does not resolve, or is not spelled canonically
            raise HTTPException(422, [{"loc": ["body", "host"], "msg": str(exc), "type": "value_error"}]) from None
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        except RegistryFull as exc:
            raise HTTPException(503, str(exc)) from None
        if created:
            logger.info("registered %s (%s)", worker.id, worker.name)
        return _json_response(_out(worker), 201 if created else 200, {SUPERVISOR_HEADER: self.app.supervisor_id})

    async def deregister(
        self,
        worker_id: str,
        request: Request,
        instance: Annotated[str | None, Query(pattern=_INSTANCE_PATTERN, description="the stopping process")] = None,
    ) -> Response:
        """Remove a worker: from its own address (or with the token); naming its process, only its own entry.

        An entry that another process of the worker still serves (uvicorn --workers) stays.
        """
        entry = self.known(worker_id)
        peer = _ip(request.client.host if request.client else None)
        # The token's holder, or the worker (no peer: a unix socket, 'uvicorn --uds', is neither).
        trusted = self.config.register_token or (peer is not None and peer == _ip(entry.address))
        if not trusted and (peer is None or not any(peer in net for net in self.config.register_networks)):
            raise HTTPException(
                403,
                f"{worker_id} may only be deregistered from its own address {entry.address}, not from "
                f"{peer or 'an unknown address'}; with API_REGISTER_TOKEN set, its holder may remove it from anywhere",
            )
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
        tag: Annotated[list[str], Query(description="repeat for several; all must match")] = [],  # noqa: B006
        name: str | None = None,
        version: str | None = None,
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=SERVICES_PAGE, description="entries per page")] = SERVICES_PAGE,
        after: Annotated[str | None, Query(description="only ids after this one: the previous page's last")] = None,
    ) -> Response:
        """The registered workers, filtered, by id, a page at a time: the Link header leads to the next."""
        workers = self.registry.workers(*tag, status=status, name=name, version=version)
        start = 0 if after is None else bisect.bisect_right(workers, after, key=operator.attrgetter("id"))
        page = workers[start : start + limit]
        headers = {}
        if start + limit < len(workers):
            # A path, not a URL: the Host header the caller sent is not echoed back.
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
            raise HTTPException(
                409, f"worker {worker_id!r} is not healthy ({why}); nothing is fetched until a check passes"
            )
        url, options = worker._request(worker.openapi or "/openapi.json", {})
        headers = options.get("headers")
        return await self.on_thread(
            "OpenAPI documents are being fetched", OPENAPI_MAX_FETCHES, _fetch_openapi, url, headers
        )

    # What they share -------------------------------------------------------------------

    async def require_token(self, request: Request) -> None:
        token, header = self.config.register_token or "", request.headers.get("authorization", "")
        if not header:
            raise HTTPException(
                401, "missing 'Authorization: Bearer <token>' header", headers={"WWW-Authenticate": "Bearer"}
            )
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    def known(self, wid: str) -> Worker:
        """A copy of the worker ``wid``; 404 if there is none."""
        if (worker := self.registry.get(wid)) is None:
            raise _unknown(wid)
        return worker

    async def claimed_address(self, host: str, peer: str | None) -> str:
        """The address a registration from ``peer`` may claim for ``host`` (see :func:`_claimed_address`);
        names are resolved on a thread, at most MAX_RESOLVING at once."""
        networks = self.config.register_networks
        if _ip(host) is not None:
            return _claimed_address(host, peer, networks)
        return await self.on_thread(
            "host names are being resolved", MAX_RESOLVING, _claimed_address, host, peer, networks
        )

    async def on_thread(self, kind: str, limit: int, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on a thread of the pool that sync routes share, at most ``limit`` of a ``kind`` at once,
        so slow DNS or slow workers hold only a few of them; past that 503 at once. Only the event loop counts
        them: no lock."""
        if self.busy[kind] >= limit:
            raise HTTPException(503, f"too many {kind}; try again", {"Retry-After": "1"})
        self.busy[kind] += 1
        try:
            return await run_in_threadpool(func, *args)
        finally:
            self.busy[kind] -= 1

    async def refuse_if_served(self, reg: Registration, address: str) -> None:
        """409 when ``reg`` would change an entry that another live process still serves: a second copy started
        by mistake on a taken port must not evict the live one; the same registration (a sibling) is welcome."""
        entry = self.registry.get(worker_id(reg.host, reg.port))
        if entry is None or not entry.instances or reg.instance in entry.instances:
            return
        if _content_of(entry) != _content(reg, address) and await self.answered_by_own(entry):
            raise HTTPException(
                409,
                f"{entry.id} is served by another live instance ({entry.name} {entry.version}); "
                "stop it first, or serve this one on another port",
            )

    async def answered_by_own(self, entry: Worker, instances: Sequence[str] = ()) -> bool:
        """Check ``entry`` now (at most 2 s): did one of ``instances`` (its own, by default) answer?"""
        headers = self.app.checker.headers if self.app.checker is not None else {}
        timeout = min(entry.timeout, 0.75)  # within the worker's own wait for its DELETE
        args = (check_once, entry.health_url, timeout, headers, entry.address)
        result = await self.on_thread("registrations are being checked against a live process", MAX_RESOLVING, *args)
        return result.ok and result.instance in (instances or entry.instances)

    async def write(self, change: Callable[..., Any], *args: Any) -> Any:
        """``change(*args)``: at once without a registry file; with one, on a thread under the file's lock
        (a busy file is 503, and leaves the registry as it was: the disk is written first)."""
        store = self.app._store
        if store is None:
            return change(*args)

        def locked() -> Any:
            with store.lock:
                return change(*args)

        try:
            return await run_in_threadpool(locked)
        except sqlite3.Error as exc:
            logger.warning("the registry file could not be written: %s", exc)
            raise HTTPException(
                503, f"the registry file is busy or cannot be written ({exc}); try again", {"Retry-After": "1"}
            ) from None

    def add(self, reg: Registration, address: str) -> tuple[Worker, bool]:
        """Register ``reg`` from ``address`` (see :meth:`write`); returns (a copy, created)."""
        store = self.app._store
        if store is None:
            return self.registry.register(reg, address=address)
        wid = worker_id(reg.host, reg.port)
        known = wid in self.registry
        store.save(wid, reg, address)
        try:
            worker, created = self.registry.register(reg, address=address)
        except RegistryFull:
            if not known:
                store.delete(wid)
            raise
        if worker.instances[1:]:  # a sibling process joined: keep every one across a restart
            store.save(wid, reg, address, worker.instances)
        return worker, created

    def remove(self, wid: str) -> bool:
        """Deregister ``wid`` (see :meth:`write`); False if it is not registered."""
        if self.app._store is not None:
            if wid not in self.registry:
                return False
            self.app._store.delete(wid)
        return self.registry.deregister(wid)


def _claimed_address(host: str, peer: str | None, networks: Sequence[IPNetwork] = ()) -> str:
    """The address a registration from ``peer`` may claim for ``host``: its checks go there (blocking: DNS).

    The host must be ``peer``'s own address or a name resolving to it, or resolve into
    ``networks``; an unspecified, link-local, multicast or broadcast address only if a
    listed network holds it. Raises ValueError for a host that does not resolve or is
    not spelled canonically (one address, one id), PermissionError for a claim refused.
    """
    ip = _ip(host)
    if ip is None:
        with contextlib.suppress(OSError, UnicodeError):  # numeric only: 127.1, 0x7f.1, 2130706433 (no DNS)
            ip = _ip(str(socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)[0][4][0]))
    if ip is not None:
        if str(ip) != host:
            raise ValueError(f"host {host!r} is another spelling of {ip}; register '{ip}'")
        addresses = [ip]
    else:
        try:
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ValueError(
                f"host {host!r} does not resolve ({_printable(exc)}); fix DNS or register an address"
            ) from exc
        addresses = list(dict.fromkeys(a for info in found if (a := _ip(str(info[4][0]))) is not None))
    listed = [a for a in addresses if any(a in net for net in networks)]
    for a in addresses:
        special = a.is_unspecified or a.is_link_local or a.is_multicast or str(a) == "255.255.255.255"
        if special and a not in listed:
            raise PermissionError(
                f"host {host!r} resolves to {a}, an unspecified, link-local, multicast or broadcast address; "
                "declare the worker's own address (a network listed in API_REGISTER_NETWORKS opens it)"
            )
    if (peer_ip := _ip(peer)) in addresses:
        return str(peer_ip)
    if listed:
        return str(listed[0])
    shown = ", ".join(map(str, addresses))
    raise PermissionError(
        f"host {host!r} resolves to {shown}, but the registration came from {_printable(peer)}: a worker may "
        "only register an address it is reachable at; register from that host, or list its network in "
        "API_REGISTER_NETWORKS (NAT, proxies, containers)"
    )


def _unknown(wid: str) -> HTTPException:
    return HTTPException(404, f"no worker with id {wid!r}; GET {SERVICES_ROUTE} lists them")


def _json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``content`` serialised once, as it is: for bodies built from the registry's own data."""
    return Response(to_json(content), status_code, headers, media_type="application/json")


# -- Command line --------------------------------------------------------------


def _load_app(args: argparse.Namespace) -> PicoAPI:
    """The app ``picoapi supervisor|worker`` serves: ``args.app`` (``module:attribute``, an app or an app factory,
    from the working directory), else a bare supervisor. --port and --bind go into this process's environment
    first, so the app reads them as it is built (the port it registers is the port served); --env-file is read
    instead of ./.env, as ``PicoAPI(env_file=...)`` does, the environment winning over it."""
    import importlib

    global _env_file_instead
    if args.env_file and not os.path.exists(args.env_file):
        raise ConfigError(f"--env-file {args.env_file!r} does not exist; pass the path of an existing file")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535, got {args.port}")
    for var, value in (("API_PORT", args.port), ("API_BIND", args.bind)):
        if value is not None:
            os.environ[var] = str(value)
    _env_file_instead = args.env_file
    try:
        if not args.app:
            app = PicoAPI(mode="supervisor")
            if "title" not in app.config.configured:
                app.title = "PicoAPI supervisor"
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


#: The most ``picoapi status`` reads of one page: a page of SERVICES_PAGE entries is at most ~6 MB.
STATUS_MAX_BYTES = 8 * 2**20


def _services(url: str, tags: Sequence[str], timeout: float) -> tuple[list[dict[str, Any]], bool]:
    """The supervisor's entries page after page, at most STATUS_MAX_PAGES: (entries, whether that is all), each
    page read by the model the route declares, each request within ``timeout`` s in all, redirects not followed.
    Raises :class:`PicoAPIError`, one line, if it cannot be reached or is not a PicoAPI supervisor."""
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
            ids = [entry.id for entry in pages.validate_python(page, strict=True)]
        except ValidationError as exc:
            error = exc.errors()[0]
            where_in = "entry " + ".".join(map(str, error["loc"])) if error["loc"] else "the answer"
            raise not_one(_printable(f"sent a malformed page ({where_in}: {error['msg']})")) from None
        ids = [entry["id"] for entry in entries[-1:]] + ids
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
    rows = [
        (
            *map(cell, (e["id"], e["name"], e["version"], ",".join(e["tags"]))),
            cell(e["status"] + ("*" if e.get("suspect") else "")),
            _ago(e.get("last_check"), now),
            _ms(None if e.get("failures") else e.get("last_latency")),  # a failed check's time says nothing
        )
        for e in entries
    ]
    print(_table(rows, ("ID", "NAME", "VERSION", "TAGS", "STATUS", "LAST CHECK", "LATENCY")))
    counts = collections.Counter(cell(e["status"]) for e in entries)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"\n{_workers(len(entries))}" + (f": {summary}" if summary else ""), flush=True)


def _wait_for(
    url: str, tags: Sequence[str], count: int, timeout: float, status: str = HEALTHY, alive: Callable[[], Any] = list
) -> list[dict[str, Any]]:
    """Wait until ``count`` workers with ``tags`` have ``status`` at ``url`` (up yet or not), asking every 0.05 s;
    returns them. ``alive`` raises when they can no longer come; raises :class:`PicoAPIError` after ``timeout`` s."""
    deadline, found, why = time.monotonic() + timeout, list[dict[str, Any]](), ""
    while len(found) < count:
        alive()
        if time.monotonic() > deadline:
            tagged = f" tagged {' and '.join(tags)}" if tags else ""
            raise PicoAPIError(f"timed out waiting for {_workers(count, status)}{tagged}{why}")
        time.sleep(0.05)
        try:
            left = min(5.0, max(0.05, deadline - time.monotonic()))
            found, why = [e for e in _services(url, tags, left)[0] if e["status"] == status], ""
        except PicoAPIError as exc:  # not up yet, say: it may come
            why = f" (last: {exc})"
    return found


def _cmd_status(args: argparse.Namespace) -> int:
    urls = [args.url] if args.url else Config.load().register_urls
    if not urls:
        raise ConfigError(
            "no supervisor to ask: pass its URL (e.g. picoapi status http://127.0.0.1:8100) or set API_REGISTER_PATH"
        )
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 86400):
        raise ConfigError(f"--timeout must be a number of seconds above 0 and at most 86400, got {args.timeout}")
    if urlsplit(urls[0]).scheme not in ("http", "https"):
        fix = "http://" + (urls[0].partition("://")[2] or urls[0])
        raise ConfigError(f"the supervisor's URL must begin with http:// or https://: pass {fix!r}, got {urls[0]!r}")
    url, tags = _base_url(urls[0]), args.tag or []
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


# The demo: a supervisor and three workers on 127.0.0.1, started as a user would start them.

#: The demo's workers: title, tags and what their /work endpoint does to a text.
_DEMO_WORKERS = {
    "upper": ("text:upper", str.upper),
    "reverse": ("text:reverse", lambda text: text[::-1]),
    "count": ("text:count", lambda text: str(len(text.split()))),
}


def demo_worker() -> PicoAPI:
    """The demo's worker app (a factory: ``picoapi worker picoapi:demo_worker``)."""
    app = PicoAPI()
    if (title := app.config.title or "upper") not in _DEMO_WORKERS:
        raise ConfigError(f"API_TITLE must name one of the demo's workers ({', '.join(_DEMO_WORKERS)}), got {title!r}")
    _, transform = _DEMO_WORKERS[title]

    @app.get("/work")
    def work(text: str) -> dict[str, str]:
        return {"worker": app.title, "result": transform(text)}

    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in each demo child: on Linux, the kernel kills it when the demo dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _cmd_demo(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    started, interval = time.monotonic(), args.interval
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL or not 0 <= args.pace <= 3600:  # NaN fails both
        raise ConfigError(
            f"--interval must be {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds and --pace 0 to 3600, "
            f"got --interval {interval!r} --pace {args.pace!r}"
        )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports = {name: _free_port() for name in ("supervisor", *_DEMO_WORKERS)}
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
            command = ["worker", "picoapi:demo_worker"]
            settings += f"API_HOST=127.0.0.1\nAPI_TITLE={name}\nAPI_TAGS={_DEMO_WORKERS[name][0]}\n"
            settings += f"API_REGISTER_PATH={url}{REGISTER_ROUTE}\nAPI_HEALTH_INTERVAL={interval}\n"
        with open(path + ".env", "w") as env_file:
            env_file.write(settings)
        with open(path + ".log", "ab") as log:
            procs[name] = subprocess.Popen(
                # This very file, by its path: its folder comes first on the child's sys.path, so a copy
                # vendored into a project is the picoapi the child imports, installed or not.
                [sys.executable, os.path.abspath(__file__), *command, "--env-file", path + ".env"],
                env=env,
                cwd=workdir,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

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
                for entry in _wait_for(url, ["text"], len(_DEMO_WORKERS), 30, alive=alive):
                    tags = ",".join(entry["tags"])
                    say(f"registered: {entry['name']:<8} {entry['id']:<16} tags={tags:<14} {entry['status']}")
                time.sleep(args.pace)  # time to look at the dashboard between steps
                for tag, text in (("upper", "hello picoapi"), ("reverse", "stressed"), ("count", "a b c d")):
                    # A check may just have failed on a busy machine: one good check brings a worker back.
                    worker = _wait_for(url, ["text", tag], 1, 2 + 10 * interval, alive=alive)[0]
                    try:
                        answer = requests.get(f"http://{worker['id']}/work", params={"text": text}, timeout=2)
                        result = answer.json()["result"]
                    except (requests.RequestException, ValueError, LookupError, TypeError) as exc:
                        raise PicoAPIError(f"the demo's {tag!r} worker did not answer: {_root_cause(exc)}") from None
                    say(f"task tag={tag:<8} {text!r:<16} -> {worker['name']:<8} answered {result!r}")
                time.sleep(args.pace)
                since = say("killing worker 'reverse' (SIGKILL)")
                (killed := procs.pop("reverse")).kill()
                killed.wait()
                _wait_for(url, ["reverse"], 1, 15, UNHEALTHY, alive)
                took = time.monotonic() - since
                say(f"supervisor marked 'reverse' unhealthy after {took:.2f}s (interval {interval:g}s)")
                time.sleep(args.pace * 1.5)
                since = say("restarting worker 'reverse'")
                start("reverse")
                _wait_for(url, ["reverse"], 1, 20, alive=alive)
                say(f"'reverse' is healthy again after {time.monotonic() - since:.2f}s")
                time.sleep(args.pace)
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
                for proc in procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
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


def main(argv: Sequence[str] | None = None) -> int:
    """The ``picoapi`` command; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="picoapi",
        description="FastAPI with service registration and health checking.",
        epilog="example: picoapi demo",
    )
    parser.add_argument("--version", action="version", version=f"picoapi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description, epilog=f"example: {example}")

    sup = command(
        "supervisor",
        "run a supervisor",
        "Run a supervisor with uvicorn on API_BIND:API_PORT: a bare one, or your own app.",
        "picoapi supervisor --bind 127.0.0.1 --port 8100",
    )
    sup.add_argument("app", nargs="?", help="a supervisor app of your own, as module:attribute (default: a bare one)")
    wrk = command(
        "worker",
        "run a worker app",
        "Run a worker app (module:attribute) on API_BIND:API_PORT, registering that port.",
        "API_HOST=127.0.0.1 API_TITLE=upper API_TAGS=text:upper API_REGISTER_PATH=http://127.0.0.1:8100/register "
        "picoapi worker picoapi:demo_worker --bind 127.0.0.1 --port 8001",
    )
    wrk.add_argument("app", help="the app to run, as module:attribute (an app or an app factory)")
    for server in (sup, wrk):
        server.add_argument("--bind", help="interface to bind (API_BIND)")
        server.add_argument("--port", type=int, help="port (API_PORT)")
        server.add_argument(
            "--env-file", help="this server's own settings file, read instead of ./.env; the environment wins over it"
        )
    stat = command(
        "status",
        "print a supervisor's registry",
        "Print the registry of a running supervisor as a table (or JSON). URL defaults to API_REGISTER_PATH's "
        "supervisor. Exits 1 if it cannot be reached or is not a PicoAPI supervisor.",
        "picoapi status http://127.0.0.1:8100/register --tag text",
    )
    stat.add_argument("url", nargs="?", help="the supervisor's base or /register URL, e.g. http://127.0.0.1:8100")
    stat.add_argument("--tag", action="append", help="only workers with this tag (repeat: all must match)")
    stat.add_argument("--json", action="store_true", help="print the entries as JSON")
    stat.add_argument("--wait", type=int, metavar="N", help="first wait until N workers are healthy (for scripts)")
    stat.add_argument("--timeout", type=float, default=5.0, help="seconds for each answer and for --wait (default 5)")
    demo = command(
        "demo",
        "run a live demo on 127.0.0.1",
        "Start a supervisor and three workers on 127.0.0.1, dispatch tasks by tag, kill a worker and watch the "
        "supervisor detect it, restart it and watch it come back. Stops by itself.",
        "picoapi demo --interval 0.5 --pace 0",
    )
    demo.add_argument("--interval", type=float, default=0.5, help="health-check interval in seconds (default 0.5)")
    demo.add_argument("--pace", type=float, default=2.0, help="seconds to pause between steps (default 2)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"supervisor": _cmd_serve, "worker": _cmd_serve, "status": _cmd_status, "demo": _cmd_demo}
    try:
        return int(handlers[args.command](args))
    except PicoAPIError as exc:  # one line: 2 for bad configuration, 1 for anything else
        print(f"picoapi: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    # `python -m picoapi` runs this file as __main__; use the importable module
    # instead, so the user's app and the command line share one PicoAPI class.
    from picoapi import main as _main

    sys.exit(_main())
