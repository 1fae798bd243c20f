"""Tests for picoapi: configuration, registry, scheduler, worker, supervisor routes, end to end.

Scheduler and retry logic run on a fake clock; end-to-end tests run real uvicorn
processes on 127.0.0.1 and stop them in a ``finally``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import http.client
import http.server
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import threading
import time
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from typing import Any
from unittest import mock

import pytest
import requests
import responses
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient as FastAPITestClient
from starlette.middleware.base import BaseHTTPMiddleware

import picoapi
from picoapi import (
    CheckResult,
    Config,
    ConfigError,
    HealthChecker,
    HealthSpec,
    NoWorkerAvailable,
    PicoAPI,
    PicoAPIError,
    Registrar,
    Registration,
    RegistrationError,
    Registry,
    RegistryFull,
)

HERE = os.path.dirname(os.path.abspath(__file__))


class TestClient(FastAPITestClient):
    """FastAPI's TestClient calling from 127.0.0.1, as a worker on this machine would (by default its
    peer address is 'testclient', which may register nothing: a worker may only claim its own address)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **{"client": ("127.0.0.1", 50000), **kwargs})


# -- Helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Every test starts with no API_* variable and no .env in its directory."""
    for name in list(os.environ):
        if name.startswith("API_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class InlinePool:
    """Runs checks at once on the caller's thread with scripted results."""

    def __init__(self) -> None:
        self.fired: list[str] = []
        self.headers: dict[str, str] = {}
        self.outcome: dict[str, Any] = {}

    def submit(self, checks: list[Any], headers: dict[str, str], done: Callable[..., None]) -> None:
        self.headers = dict(headers)
        for check in checks:
            self.fired.append(check.worker_id)
            result = self.outcome.get(check.worker_id, CheckResult(True, 200, 0.001))
            if isinstance(result, list):
                result = result.pop(0) if result else CheckResult(True, 200, 0.001)
            done(check, result)


def reg(host: str = "10.0.0.5", port: int = 8888, interval: float = 10, **fields: Any) -> Registration:
    health = {"url": f"http://{host}:{port}/health", "interval": interval}
    health.update(fields.pop("health", {}))
    body = {"name": "orders", "host": host, "port": port, "version": "1.2.0", "tags": ["resize"], "health": health}
    body.update(fields)
    return Registration.model_validate(body)


def body(host: str = "127.0.0.1", port: int = 9001, interval: float = 10, **fields: Any) -> dict[str, Any]:
    return reg(host, port, interval, **fields).model_dump(exclude_none=True)


#: Characters that rewrite terminals, reorder text or hide: C0 and C1 controls (ESC, BEL, CSI, OSC), bidi override,
#: zero-width space and no-break, line and paragraph separators, a lone surrogate (a non-UTF-8 byte in os.environ).
HIDDEN_CHARACTERS = ["\x00", "\x1b", "\x07", "\x7f", "\x9b", "\x9d", "\u202e", "\u200b", "\ufeff", "\u2028"]
HIDDEN_CHARACTERS += ["\u2029", "\udcff"]

FAIL = CheckResult(False, None, 0.001, "refused")
OK = CheckResult(True, 200, 0.001)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settled_thread_count() -> int:
    """Threads alive, but for AnyIO's pool threads: TestClient's, idle-timed by AnyIO, not ours."""
    return sum(1 for t in threading.enumerate() if t.name != "AnyIO worker thread")


def picoapi_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("picoapi")]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until truthy or ``timeout``; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (requests.RequestException, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- Configuration ---------------------------------------------------------------


class TestConfig:
    def test_defaults(self) -> None:
        config = Config.load()
        assert config.mode == "worker"
        assert config.port == 8888
        assert config.host is None and config.bind is None and config.title is None
        assert config.description == "a brief description"
        assert config.version == "0.0.1"
        assert config.register_urls == ()
        assert config.health_path == "/health"
        assert config.health_interval == 300.0
        assert config.tags == ()
        assert config.cors_allow_origins == ("*",)
        assert config.cors_allow_methods == ("*",)
        assert config.cors_allow_headers == ("*",)
        assert config.cors_allow_credentials is False
        assert config.register_timeout == 30.0
        assert config.register_required is False
        assert config.max_workers == 10_000
        assert config.health_failures == 2 and config.health_successes == 1
        assert config.deregister_after is None and config.registry_file is None
        assert config.configured == frozenset()

    @pytest.mark.parametrize(
        ("var", "raw", "field", "expected"),
        [
            ("API_MODE", "Supervisor", "mode", "supervisor"),
            ("API_HOST", "myhost", "host", "myhost"),
            ("API_HOST", "123.123.123.123", "host", "123.123.123.123"),
            ("API_HOST", "[::1]", "host", "::1"),
            ("API_PORT", "8080", "port", 8080),
            ("API_BIND", "0.0.0.0", "bind", "0.0.0.0"),
            ("API_TITLE", "Example API Name", "title", "Example API Name"),
            (
                "API_DESCRIPTION",
                "An example of a short description",
                "description",
                "An example of a short description",
            ),
            ("API_REGISTER_PATH", "http://keeper:8100/register", "register_urls", ("http://keeper:8100/register",)),
            (
                "API_REGISTER_PATH",
                "http://a:1/register!!https://b/register",
                "register_urls",
                ("http://a:1/register", "https://b/register"),
            ),
            ("API_KEEPER_URL", "http://localhost:8100/register", "register_urls", ("http://localhost:8100/register",)),
            ("API_HEALTH_PATH", "/healthz", "health_path", "/healthz"),
            ("API_HEALTH_INTERVAL", "0.25", "health_interval", 0.25),
            ("API_HEALTH_TIMEOUT", "2", "health_timeout", 2.0),
            ("API_VERSION", "0.0.1-alpha", "version", "0.0.1-alpha"),
            ("API_TAGS", "servicetag1:servicetag2", "tags", ("servicetag1", "servicetag2")),
            ("API_TAGS", ":a::b:", "tags", ("a", "b")),
            (
                "API_CORS_ALLOW_ORIGINS",
                "http://a.example!!http://b.example!",
                "cors_allow_origins",
                ("http://a.example", "http://b.example"),
            ),
            ("API_CORS_ALLOW_METHODS", "GET!POST", "cors_allow_methods", ("GET", "POST")),
            ("API_CORS_ALLOW_HEADERS", "X-One!X-Two", "cors_allow_headers", ("X-One", "X-Two")),
            ("API_REGISTER_TOKEN", "s3cret", "register_token", "s3cret"),
            ("API_REGISTER_TIMEOUT", "5", "register_timeout", 5.0),
            ("API_REGISTER_REQUIRED", "yes", "register_required", True),
            ("API_MAX_WORKERS", "50", "max_workers", 50),
            ("API_REGISTRY_FILE", "reg.db", "registry_file", "reg.db"),
            ("API_DEREGISTER_AFTER", "600", "deregister_after", 600.0),
            ("API_DEREGISTER_AFTER", "off", "deregister_after", None),
            ("API_HEALTH_FAILURES", "3", "health_failures", 3),
            ("API_HEALTH_SUCCESSES", "2", "health_successes", 2),
        ],
    )
    def test_variable_is_read(self, var: str, raw: str, field: str, expected: Any) -> None:
        config = Config.load(environ={var: raw})
        assert getattr(config, field) == expected

    def test_credentials_with_explicit_origins(self) -> None:
        env = {"API_CORS_ALLOW_CREDENTIALS": "true", "API_CORS_ALLOW_ORIGINS": "http://a.example"}
        assert Config.load(environ=env).cors_allow_credentials is True

    @pytest.mark.parametrize(
        ("var", "raw", "message"),
        [
            ("API_PORT", "eighty", "API_PORT must be a whole number from 1 to 65535, got 'eighty'"),
            ("API_PORT", "0", "API_PORT must be a whole number from 1 to 65535, got '0'"),
            ("API_PORT", "65536", "API_PORT must be a whole number from 1 to 65535, got '65536'"),
            (
                "API_HEALTH_INTERVAL",
                "-1",
                "API_HEALTH_INTERVAL must be a number of seconds from 0.05 to 86400, got '-1'",
            ),
            (
                "API_HEALTH_INTERVAL",
                "often",
                "API_HEALTH_INTERVAL must be a number of seconds from 0.05 to 86400, got 'often'",
            ),
            (
                "API_HEALTH_INTERVAL",
                "nan",
                "API_HEALTH_INTERVAL must be a number of seconds from 0.05 to 86400, got 'nan'",
            ),
            ("API_REGISTER_PATH", "keeper:8100/register", "API_REGISTER_PATH must be an http:// or https:// URL"),
            ("API_KEEPER_URL", "ftp://keeper/register", "API_REGISTER_PATH must be an http:// or https:// URL"),
            (
                "API_REGISTER_PATH",
                "http://keeper:99999/register",
                "API_REGISTER_PATH must be an http:// or https:// URL such as 'http://keeper:8100/register', "
                "got 'http://keeper:99999/register'",
            ),
            (
                "API_REGISTER_PATH",
                "http://[::1/register",
                "API_REGISTER_PATH must be an http:// or https:// URL such as 'http://keeper:8100/register', "
                "got 'http://[::1/register'",
            ),
            ("API_MODE", "boss", "API_MODE must be 'worker' or 'supervisor', got 'boss'"),
            ("API_HOST", "my host", "API_HOST must be a host name or IP address"),
            ("API_BIND", "a/b", "API_BIND must be a host name or IP address"),
            (
                "API_HEALTH_PATH",
                "health",
                "API_HEALTH_PATH must be a path starting with '/', such as '/health', got 'health'",
            ),
            (
                "API_TAGS",
                "ok:has space",
                "API_TAGS items must be 1 to 64 characters without spaces, ':' or ',', got 'has space'",
            ),
            ("API_REGISTER_REQUIRED", "maybe", "API_REGISTER_REQUIRED must be true or false"),
            ("API_CORS_ALLOW_CREDENTIALS", "2", "API_CORS_ALLOW_CREDENTIALS must be true or false"),
            ("API_MAX_WORKERS", "0", "API_MAX_WORKERS must be a whole number from 1 to 10000000, got '0'"),
            ("API_HEALTH_FAILURES", "x", "API_HEALTH_FAILURES must be a whole number from 1 to 100, got 'x'"),
            ("API_HEALTH_SUCCESSES", "0", "API_HEALTH_SUCCESSES must be a whole number from 1 to 100, got '0'"),
            ("API_REGISTER_TIMEOUT", "-5", "API_REGISTER_TIMEOUT must be a number of seconds from 0 to 3600, got '-5'"),
            ("API_DEREGISTER_AFTER", "soon", "API_DEREGISTER_AFTER must be a number of seconds"),
            ("API_HEALTH_TIMEOUT", "0", "API_HEALTH_TIMEOUT must be a number of seconds from 0.01 to 86400, got '0'"),
            ("API_TITLE", "x" * 129, "API_TITLE must be 1 to 128 printable characters"),
            (
                "API_VERSION",
                "1\x00",
                "API_VERSION must not contain control, format or line-separator characters; remove the U+0000 at "
                "index 1, got '1\\x00'",
            ),
            (
                "API_HEALTH_PATH",
                "/santé",
                "API_HEALTH_PATH must be an ASCII path without ?query or #fragment; percent-encode it: "
                "'/sant%C3%A9', got '/santé'",
            ),
        ],
    )
    def test_bad_value_names_variable_value_and_fix(self, var: str, raw: str, message: str) -> None:
        with pytest.raises(ConfigError) as info:
            Config.load(environ={var: raw})
        assert str(info.value).startswith(message)
        assert isinstance(info.value, ValueError) and isinstance(info.value, PicoAPIError)

    @pytest.mark.parametrize("var", ["API_TITLE", "API_VERSION", "API_DESCRIPTION", "API_TAGS"])
    def test_text_variables_refuse_hidden_characters(self, var: str) -> None:
        for char in HIDDEN_CHARACTERS:
            with pytest.raises(ConfigError) as info:
                Config.load(environ={var: f"re{char}sizer"})
            message = str(info.value)
            assert message.startswith(var) and f"got 're{ascii(char)[1:-1]}sizer'" in message, message
            assert message.isprintable()  # safe to print on the operator's terminal

    def test_multiline_description_is_one_line_in_the_registration(self) -> None:
        markdown = "# Orders\n\nResizes *images*.\r\n\tFast."
        app = PicoAPI(title="orders", description=markdown, env_file=None)
        assert app.description == markdown  # FastAPI's /docs keep the Markdown
        assert app.config.description == "# Orders Resizes *images*. Fast."

    @pytest.mark.parametrize(
        ("raw", "fix"),
        [
            ("/€", "/%E2%82%AC"),
            ("/health?full=1", "/health"),
            ("/health#top", "/health"),
            ("/he alth", "/he%20alth"),
            ("/he\x1balth", "/he%1Balth"),
            ("/h\u200bealth", "/h%E2%80%8Bealth"),
        ],
    )
    def test_health_path_is_ascii_without_query(self, raw: str, fix: str) -> None:
        with pytest.raises(ConfigError) as info:
            Config.load(environ={"API_HEALTH_PATH": raw})
        assert str(info.value) == (
            "API_HEALTH_PATH must be an ASCII path without ?query or #fragment; percent-encode it: "
            f"'{fix}', got '{picoapi._printable(raw)}'"
        )

    def test_percent_encoded_health_path_is_served_and_registered(self) -> None:
        config = Config.load(environ={"API_HOST": "127.0.0.1", "API_TITLE": "t", "API_HEALTH_PATH": "/sant%C3%A9"})
        assert config.health_url == "http://127.0.0.1:8888/sant%C3%A9"
        Registration.model_validate(config.registration())  # the supervisor takes it
        with TestClient(PicoAPI(config=config)) as client:  # servers decode the path before routing it
            assert client.get("/sant%C3%A9").json()["status"] == "healthy"

    def test_credentials_refused_with_wildcard_origin(self) -> None:
        with pytest.raises(ConfigError, match="API_CORS_ALLOW_CREDENTIALS=true needs explicit origins"):
            Config.load(environ={"API_CORS_ALLOW_CREDENTIALS": "1"})

    def test_timeout_longer_than_interval_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"API_HEALTH_TIMEOUT \(5\) must not exceed API_HEALTH_INTERVAL \(1\)"):
            Config.load(environ={"API_HEALTH_INTERVAL": "1", "API_HEALTH_TIMEOUT": "5"})

    def test_empty_variable_counts_as_unset(self) -> None:
        assert Config.load(environ={"API_PORT": "", "API_TAGS": ""}).port == 8888

    def test_table_name_wins_over_old_name(self) -> None:
        env = {"API_KEEPER_URL": "http://old:1/register", "API_REGISTER_PATH": "http://new:2/register"}
        assert Config.load(environ=env).register_urls == ("http://new:2/register",)

    def test_env_file_is_read_without_touching_environ(self, tmp_path: Any) -> None:
        (tmp_path / ".env").write_text(
            textwrap.dedent("""\
                API_BIND="0.0.0.0"
                API_HOST="localhost"
                API_PORT="8888"
                API_TITLE="test"
                API_DESCRIPTION="test description"
                API_VERSION="0.0.1-alpha"
                API_KEEPER_URL="http://localhost:8100/register"
                API_HEALTH_PATH="/health"
                API_HEALTH_INTERVAL="300"
            """)
        )
        config = Config.load()
        assert (config.bind, config.host, config.title, config.version) == (
            "0.0.0.0",
            "localhost",
            "test",
            "0.0.1-alpha",
        )
        assert config.register_urls == ("http://localhost:8100/register",)
        assert config.description == "test description"
        assert "API_HOST" not in os.environ

    def test_precedence_keyword_environment_file_default(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "custom.env").write_text("API_PORT=1001\nAPI_TITLE=from-file\nAPI_VERSION=9\n")
        monkeypatch.setenv("API_PORT", "1002")
        monkeypatch.setenv("API_TITLE", "from-env")
        config = Config.load({"port": 1003}, env_file=tmp_path / "custom.env")
        assert config.port == 1003  # keyword
        assert config.title == "from-env"  # environment over file
        assert config.version == "9"  # file over default
        assert config.health_interval == 300.0  # default

    def test_missing_explicit_env_file_is_an_error(self) -> None:
        with pytest.raises(ConfigError, match="env_file 'nope.env' does not exist"):
            Config.load(env_file="nope.env")

    def test_keyword_values_are_validated(self) -> None:
        with pytest.raises(ConfigError, match="API_PORT must be a whole number from 1 to 65535, got 0"):
            Config.load({"port": 0})
        assert Config.load({"tags": ["a", "b"]}).tags == ("a", "b")

    def test_unknown_keyword_is_an_error(self) -> None:
        with pytest.raises(ConfigError, match="unknown setting"):
            Config.load({"prot": 1})

    def test_registering_worker_needs_host_and_title(self) -> None:
        with pytest.raises(ConfigError, match="API_HOST, API_TITLE must be set for a worker to register"):
            PicoAPI(register_urls="http://127.0.0.1:1/register")

    def test_keyword_that_is_not_a_setting_fails_loudly(self) -> None:
        with pytest.raises(ConfigError, match=r"unknown setting 'helth_interval' \(did you mean 'health_interval'\?\)"):
            PicoAPI(helth_interval=5)
        with pytest.raises(ConfigError, match=r"unknown setting 'API_PORT' \(did you mean 'port'\?\)"):
            PicoAPI(API_PORT=8080)
        with pytest.raises(ConfigError, match=r"unknown setting 'prot' \(did you mean 'port'\?\); the settings are"):
            Config.load({"prot": 1})
        assert PicoAPI(docs_url=None, title="t").docs_url is None  # FastAPI's own options go to FastAPI

    def test_config_and_setting_keywords_are_not_mixed(self) -> None:
        with pytest.raises(ConfigError, match=r"not both: got config= and \['port'\]"):
            PicoAPI(config=Config.load(env_file=None), port=1)
        with pytest.raises(ConfigError, match=r"not both: got config= and \['is_master'\]"):
            PicoAPI(config=Config.load(env_file=None), is_master=True)

    def test_each_keyword_follows_the_readmes_rule(self) -> None:
        """README: a keyword is 'the lower-case name without API_', with one exception it names."""
        with open(os.path.join(HERE, "README.md")) as readme:
            assert "one\nexception: `API_REGISTER_PATH`'s keyword is `register_urls`" in readme.read()
        odd = {k: s.var for k, s in picoapi._SETTINGS.items() if s.var != f"API_{k.upper()}"}
        assert odd == {"register_urls": "API_REGISTER_PATH"}
        url = "http://127.0.0.1:8100/register"
        assert PicoAPI(env_file=None, register_urls=url, host="127.0.0.1", title="t").config.register_urls == (url,)
        for wrong in ("register_path", "keeper_url"):  # its variable's name, or the old one, leads to it
            with pytest.raises(ConfigError, match=rf"unknown setting '{wrong}' \(did you mean 'register_urls'\?\)"):
                PicoAPI(env_file=None, **{wrong: url})

    @pytest.mark.parametrize("name", list(picoapi._SETTINGS))
    def test_every_setting_is_a_field_a_keyword_and_a_variable(self, name: str) -> None:
        setting, field = picoapi._SETTINGS[name], Config.__dataclass_fields__[name]
        assert setting.var.startswith("API_") and setting.help and field.default is not dataclasses.MISSING
        if name not in ("mode", "host", "bind", "register_urls", "allowed_hosts", "registry_file"):
            keyword = {"title": "t", "register_token": "s3cret"}.get(name, field.default)
            assert getattr(PicoAPI(**{name: keyword}, env_file=None).config, name) == (keyword or field.default)

    def test_readme_and_env_example_list_every_setting(self) -> None:
        variables = {setting.var for setting in picoapi._SETTINGS.values()}
        readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
        table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
        assert set(re.findall(r"^\| (API_\w+) \|", table, re.MULTILINE)) == variables | {"API_MASTER"}
        example = open(os.path.join(HERE, ".env.example"), encoding="utf-8").read()
        assert set(re.findall(r"^(API_\w+)=", example, re.MULTILINE)) == variables

    def test_token_is_not_in_repr(self) -> None:
        assert "s3cret" not in repr(Config.load({"register_token": "s3cret"}))

    def test_health_url_from_host_port_and_path(self) -> None:
        assert Config.load({"host": "10.0.0.5", "port": 81, "health_path": "/hz"}).health_url == "http://10.0.0.5:81/hz"
        assert Config.load({"host": "::1"}).health_url == "http://[::1]:8888/health"

    def test_import_starts_nothing(self) -> None:
        code = (
            "import picoapi, threading, sys; assert threading.active_count() == 1; assert 'uvicorn' not in sys.modules"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE, env={**os.environ, "API_PORT": "bad"})


class TestOneXSpellings:
    """picoapi 1.x's ``is_master`` and ``API_MASTER`` still choose the mode, with a warning naming the new spelling."""

    @pytest.mark.parametrize(("old", "mode"), [(True, "supervisor"), (False, "worker")])
    def test_is_master_keyword(self, old: bool, mode: str) -> None:
        with pytest.warns(
            DeprecationWarning, match=rf"is_master={old} is picoapi 1.x's spelling: write mode='{mode}'"
        ) as seen:
            app = PicoAPI(is_master=old, env_file=None)
        assert app.mode == mode and (app.registry is not None) == (mode == "supervisor")
        assert seen[0].filename == __file__  # it points at the line that used it

    @pytest.mark.parametrize(("raw", "mode"), [("true", "supervisor"), ("1", "supervisor"), ("false", "worker")])
    def test_api_master_variable(self, raw: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("API_MASTER", raw)
        with pytest.warns(
            DeprecationWarning, match=f"API_MASTER={raw} is picoapi 1.x's spelling: write API_MODE={mode}"
        ):
            assert PicoAPI().mode == mode
        (monkeypatch.delenv("API_MASTER"), open(".env", "w").write(f"API_MASTER={raw}\n"))  # from a .env file too
        with pytest.warns(DeprecationWarning, match="API_MASTER"):
            assert PicoAPI().mode == mode

    def test_a_conflict_names_both(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with pytest.raises(ConfigError, match=r"is_master=True \(picoapi 1.x\) and mode='worker' disagree"):
            PicoAPI(is_master=True, mode="worker", env_file=None)
        monkeypatch.setenv("API_MASTER", "true")
        monkeypatch.setenv("API_MODE", "worker")
        with pytest.raises(ConfigError, match=r"API_MASTER=true \(picoapi 1.x\) and API_MODE=worker disagree"):
            PicoAPI()
        with pytest.raises(ConfigError, match="API_MASTER must be true or false"):
            Config.load(environ={"API_MASTER": "boss"}, env_file=None)

    def test_api_master_is_told_where_apps_run(self, tmp_path: Any) -> None:
        """API_MASTER is an operator's setting: under uvicorn (which imports app.py) Python's default filters hide
        its DeprecationWarning, so the same words are logged as a WARNING too."""
        (tmp_path / "app.py").write_text("from picoapi import PicoAPI\napp = PicoAPI()\n")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "PYTHONWARN"))}
        out = subprocess.run(
            [sys.executable, "-c", "import app; assert app.app.mode == 'supervisor'"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**clean, "PYTHONPATH": HERE, "API_MASTER": "true"},
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr == "API_MASTER=true is picoapi 1.x's spelling: write API_MODE=supervisor instead\n"

    @pytest.mark.parametrize("mode", ["worker", "supervisor"])
    def test_nothing_warns_without_them(self, mode: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            app = PicoAPI(mode=mode)
            with TestClient(app) as client:
                assert client.get("/health").status_code == 200
                assert mode == "worker" or client.get("/services").json() == []


# -- The app as a drop-in FastAPI ----------------------------------------------


class TestDropIn:
    def test_schema_and_routes_same_as_fastapi(self) -> None:
        def build(cls: type[FastAPI]) -> FastAPI:
            app = cls()
            router = APIRouter(prefix="/items", tags=["items"])

            @router.get("/{item_id}")
            def item(item_id: int, q: str | None = None) -> dict[str, Any]:
                return {"id": item_id, "q": q}

            app.include_router(router)
            return app

        plain, pico = build(FastAPI), build(PicoAPI)
        assert pico.openapi() == plain.openapi()
        user_routes = [r for r in pico.routes if "picoapi" not in (getattr(r, "tags", None) or [])]
        shape = lambda routes: [(type(r).__name__, getattr(r, "path", None)) for r in routes]  # noqa: E731
        assert shape(user_routes) == shape(plain.routes)
        with TestClient(pico) as client:
            assert client.get("/items/3?q=x").json() == {"id": 3, "q": "x"}

    def test_user_lifespan_runs_before_inside_after(self) -> None:
        events: list[str] = []

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> Any:
            events.append("start")
            yield {"db": "conn"}
            events.append("stop")

        app = PicoAPI(lifespan=lifespan)
        assert events == []
        with TestClient(app) as client:
            assert events == ["start"]
            assert client.get("/health").status_code == 200
        assert events == ["start", "stop"]

    def test_on_startup_and_on_shutdown_run(self) -> None:
        events: list[str] = []
        app = PicoAPI(on_startup=[lambda: events.append("up")], on_shutdown=[lambda: events.append("down")])
        with TestClient(app):
            assert events == ["up"]
        assert events == ["up", "down"]

    def test_dependencies_middleware_and_exception_handlers(self) -> None:
        app = PicoAPI()

        class Teapot(Exception):
            pass

        @app.exception_handler(Teapot)
        async def teapot(request: Any, exc: Teapot) -> Any:
            from fastapi.responses import JSONResponse

            return JSONResponse({"teapot": True}, status_code=418)

        async def add_header(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers["X-User"] = "yes"
            return response

        app.add_middleware(BaseHTTPMiddleware, dispatch=add_header)

        def user() -> str:
            return "ann"

        @app.get("/me")
        def me(name: str = Depends(user)) -> dict[str, str]:
            return {"name": name}

        @app.get("/tea")
        def tea() -> None:
            raise Teapot()

        @app.get("/missing")
        def missing() -> None:
            raise HTTPException(404, "gone")

        with TestClient(app) as client:
            response = client.get("/me")
            assert response.json() == {"name": "ann"} and response.headers["x-user"] == "yes"
            assert client.get("/tea").status_code == 418
            assert client.get("/missing").json() == {"detail": "gone"}

    def test_configured_metadata_goes_to_fastapi_unless_given(self) -> None:
        app = PicoAPI(env_file=None)
        assert (app.title, app.version) == ("FastAPI", "0.1.0")
        os.environ["API_TITLE"] = "orders"
        os.environ["API_VERSION"] = "1.2.0"
        try:
            app = PicoAPI()
            assert (app.title, app.version) == ("orders", "1.2.0")
            app = PicoAPI(title="mine")
            assert (app.title, app.config.title, app.version) == ("mine", "mine", "1.2.0")
        finally:
            del os.environ["API_TITLE"], os.environ["API_VERSION"]

    @pytest.mark.parametrize(
        "options",
        [
            {"description": "Made by the \U0001f469\u200d\U0001f4bb team"},  # an emoji ZWJ sequence (U+200D)
            {"title": "An API whose title is long " * 5},  # 135 characters
            {"version": "1.0.0+build." + "0123456789abcdef" * 4},  # a 76-character build version
            {"title": "Caf\u00e9\u00ad API"},  # a soft hyphen (U+00AD)
        ],
    )
    def test_what_fastapi_accepts_a_plain_picoapi_accepts(self, options: dict[str, str]) -> None:
        """title, description and version are FastAPI's keywords first: checked as registration fields only by an
        app that registers, as the settings are."""
        FastAPI(**options)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            app = PicoAPI(env_file=None, **options)
        assert {k: getattr(app, k) for k in options} == options
        var = f"API_{next(iter(options)).upper()}"
        registering = {"register_urls": "http://127.0.0.1:8100/register", "host": "127.0.0.1", "title": "t"}
        with pytest.raises(ConfigError, match=rf"^{var} must be 1 to \d+ printable characters|^{var} must not"):
            PicoAPI(env_file=None, **{**registering, **options})

    def test_a_plain_app_with_nothing_configured_starts_quietly(self, caplog: pytest.LogCaptureFixture) -> None:
        """SPEC: a library object built with nothing configured still works as a plain FastAPI app: FastAPI's own
        suite run against PicoAPI prints nothing. A worker that looks meant to register warns."""
        caplog.set_level(logging.INFO, logger="picoapi")
        with TestClient(PicoAPI(env_file=None, title="mine")) as client:
            assert client.get("/health").status_code == 200
        said = [(r.levelno, r.getMessage()[:35]) for r in caplog.records]
        assert said == [(logging.INFO, "not registering with a supervisor: ")]
        for meant in ({"tags": ["resize"]}, {"host": "127.0.0.1"}, {"health_interval": 5}):
            caplog.clear()
            with TestClient(PicoAPI(env_file=None, **meant)):
                pass
            assert [(r.levelno, r.getMessage()[:35]) for r in caplog.records] == [(logging.WARNING, said[0][1])]

    def test_both_modes_construct(self) -> None:
        assert PicoAPI().mode == "worker" and PicoAPI().registry is None
        assert PicoAPI(mode="supervisor").registry is not None
        os.environ["API_MODE"] = "supervisor"
        try:
            assert PicoAPI().mode == "supervisor"
            assert PicoAPI(mode="worker").mode == "worker"
        finally:
            del os.environ["API_MODE"]

    def test_cors_for_configured_origin(self) -> None:
        app = PicoAPI(cors_allow_origins="http://good.example", cors_allow_methods="GET")
        with TestClient(app) as client:
            good = client.get("/health", headers={"Origin": "http://good.example"})
            bad = client.get("/health", headers={"Origin": "http://bad.example"})
            pre = client.options(
                "/health", headers={"Origin": "http://good.example", "Access-Control-Request-Method": "GET"}
            )
        assert good.headers["access-control-allow-origin"] == "http://good.example"
        assert "access-control-allow-origin" not in bad.headers
        assert pre.status_code == 200 and "access-control-allow-credentials" not in pre.headers

    def test_answers_without_origin_still_vary_on_origin(self) -> None:
        """The fast path for server-to-server calls keeps caches from mixing up CORS answers."""
        with TestClient(PicoAPI()) as client:
            response = client.get("/health")
        assert response.headers["vary"] == "Origin" and "access-control-allow-origin" not in response.headers

    def test_cors_default_is_wildcard_without_credentials(self) -> None:
        with TestClient(PicoAPI()) as client:
            response = client.get("/health", headers={"Origin": "http://any.example"})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


class TestHealthEndpoint:
    def test_answers_status_name_version(self) -> None:
        app = PicoAPI(title="orders", version="1.2.0", health_path="/hz")
        with TestClient(app) as client:
            assert client.get("/hz").json() == {"status": "healthy", "name": "orders", "version": "1.2.0"}
        assert "/hz" not in app.openapi()["paths"]
        route = next(r for r in app.routes if getattr(r, "path", "") == "/hz")
        assert route.tags == ["picoapi"] and route.operation_id == "picoapi_health"  # type: ignore[attr-defined]

    def test_users_own_route_on_the_health_path_wins(self) -> None:
        app = PicoAPI()

        @app.get("/health")
        def mine() -> dict[str, str]:
            return {"mine": "yes"}

        @app.get("/{anything:path}")
        def catch_all(anything: str) -> str:
            return anything

        with TestClient(app) as client:
            assert client.get("/health").json() == {"mine": "yes"}

    def test_catch_all_does_not_swallow_health(self) -> None:
        app = PicoAPI()

        @app.get("/{anything:path}")
        def catch_all(anything: str) -> str:
            return anything

        with TestClient(app) as client:
            assert client.get("/health").json()["status"] == "healthy"

    def test_user_checks_sync_and_async(self) -> None:
        app = PicoAPI()
        state = {"db": True}

        @app.health_check
        def db() -> bool:
            return state["db"]

        @app.health_check(name="cache")
        async def cache_check() -> bool:
            return True

        @app.health_check
        async def disk() -> bool:
            raise OSError("disk full")

        with TestClient(app) as client:
            response = client.get("/health")
            assert response.status_code == 503
            assert response.json()["failing"] == {"disk": "OSError: disk full"}
            state["db"] = False
            assert set(client.get("/health").json()["failing"]) == {"db", "disk"}

    def test_sync_check_does_not_block_the_loop(self) -> None:
        app = PicoAPI()
        release = threading.Event()

        @app.health_check
        def slow() -> bool:
            return release.wait(5)

        @app.get("/ping")
        async def ping() -> str:
            return "pong"

        with TestClient(app) as client:
            pending = threading.Thread(target=client.get, args=("/health",))
            pending.start()
            try:
                assert client.get("/ping").json() == "pong"  # answered while the check blocks
            finally:
                release.set()
                pending.join()


# -- Registry --------------------------------------------------------------------


class TestRegistry:
    def test_new_is_unknown_same_again_is_a_refresh_a_change_is_unknown_again(self) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock)
        worker, created = registry.register(reg(tags=["a"], instance="p1"))
        assert created and worker.id == "10.0.0.5:8888" and worker.status == "unknown"  # nothing handed out yet
        registry.record(worker.id, OK._replace(instance="p1"))
        same, created = registry.register(reg(tags=["a"], instance="p2"))  # a sibling process, or a refresh
        assert not created and same.status == "healthy" and same.successes == 1 and same.instances == ("p1", "p2")
        again, created = registry.register(reg(tags=["b"], version="2.0", instance="p3"))
        assert not created and again.version == "2.0" and again.last_check == clock.now  # the history stays
        assert again.status == "unknown" and again.successes == 0 and again.instances == ("p3",)
        registry.pop_due(clock())
        registry.record(worker.id, FAIL)  # not answering yet: re-checked in a second
        clock.advance(0.5)
        assert registry.pop_due(clock()) == []
        registry.register(reg(tags=["b"], version="2.0", instance="p4"))  # restarted while not healthy
        assert [c.worker_id for c in registry.pop_due(clock())] == [worker.id]  # checked now, not an interval later
        assert len(registry) == 1
        assert registry.workers("a") == [] and [w.id for w in registry.workers("b")] == [worker.id]

    def test_a_flood_of_refreshes_while_a_check_is_under_way_schedules_nothing_more(self) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock)
        registry.register(reg())
        assert len(registry.pop_due(clock())) == 1  # under way; its next check is scheduled
        scheduled = len(registry._heap)
        for _ in range(100):
            registry.register(reg())  # not healthy yet, refreshed again and again
        assert len(registry._heap) == scheduled and registry.pop_due(clock()) == []

    def test_the_status_rules_are_a_pure_function_with_a_named_result(self) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock, failures=2)
        worker, _ = registry.register(reg())
        entry = registry._workers[worker.id]
        entry.status, entry.failures = "healthy", 2  # the second failure in a row
        verdict = picoapi.next_status(entry, False, clock(), registry)
        assert isinstance(verdict, picoapi.Verdict) and verdict.status == "unhealthy" and verdict.since == clock()
        assert not verdict.removed and verdict.recheck is None  # confirmed: no early re-check
        assert entry.status == "healthy" and entry._unhealthy_since is None  # nothing applied: record() does that

    def test_the_unhealthy_line_says_another_process_answered(self, caplog: pytest.LogCaptureFixture) -> None:
        clock = FakeClock()
        registry, pool = Registry(clock=clock, wall=clock), InlinePool()
        checker = HealthChecker(registry, submit=pool.submit)
        worker, _ = registry.register(reg(instance="p1"))
        pool.outcome[worker.id] = [OK._replace(instance="p1"), *[OK._replace(instance="intruder")] * 3]
        with caplog.at_level(logging.INFO, logger="picoapi"):
            for _ in range(4):
                checker.run_pending()
                clock.advance(10)
        lines = [r.getMessage() for r in caplog.records if "is unhealthy" in r.getMessage()]
        assert lines == [f"worker {worker.id} is unhealthy: answered by a process that did not register {worker.id}"]

    def test_a_check_answered_by_another_process_fails(self) -> None:
        registry = Registry()
        worker, _ = registry.register(reg(instance="p1"))
        registry.record(worker.id, OK._replace(instance="p1"))
        assert registry.get(worker.id).status == "healthy"  # type: ignore[union-attr]
        for answered_by in ("intruder", None):
            registry.record(worker.id, OK._replace(instance=answered_by))
        entry = registry.get(worker.id)
        assert entry is not None and entry.status == "unhealthy" and entry.last_status_code == 200
        assert entry.last_error == "answered by a process that did not register 10.0.0.5:8888"

    def test_id_from_host_and_port(self) -> None:
        assert picoapi.worker_id("Host.Example", 80) == "host.example:80"
        assert picoapi.worker_id("::1", 80) == "[::1]:80"

    def test_tags_combine_with_and_and_filters(self) -> None:
        registry = Registry()
        registry.register(reg("10.0.0.1", tags=["resize", "png"]))
        registry.register(reg("10.0.0.2", tags=["resize", "jpeg"], version="2.0"))
        registry.register(reg("10.0.0.3", tags=["ocr"], name="reader"))
        ids = lambda ws: [w.host for w in ws]  # noqa: E731
        assert ids(registry.workers("resize")) == ["10.0.0.1", "10.0.0.2"]
        assert ids(registry.workers("resize", "png")) == ["10.0.0.1"]
        assert ids(registry.workers("resize", "ocr")) == []
        assert ids(registry.workers("nope")) == []
        assert ids(registry.workers(version="2.0")) == ["10.0.0.2"]
        assert ids(registry.workers(name="reader")) == ["10.0.0.3"]
        assert ids(registry.workers(status="unhealthy")) == []
        assert len(registry.workers()) == 3

    def test_readers_get_copies(self) -> None:
        registry = Registry()
        worker, _ = registry.register(reg())
        worker.status = "unhealthy"
        registry.workers()[0].name = "changed"
        assert registry.get(worker.id).status == "unknown"  # type: ignore[union-attr]
        assert registry.get(worker.id).name == "orders"  # type: ignore[union-attr]
        assert registry.get("nope") is None

    def test_cap(self) -> None:
        registry = Registry(max_workers=1)
        registry.register(reg(port=1))
        registry.register(reg(port=1))  # a replacement is not a new worker
        with pytest.raises(RegistryFull, match=r"the registry is full \(1 workers, API_MAX_WORKERS\)"):
            registry.register(reg(port=2))

    def test_deregister(self) -> None:
        registry = Registry()
        worker, _ = registry.register(reg(tags=["a"]))
        assert registry.deregister(worker.id) and not registry.deregister(worker.id)
        assert registry.workers("a") == [] and len(registry) == 0

    def test_error_text_is_bounded(self) -> None:
        registry = Registry()
        worker, _ = registry.register(reg())
        registry.record(worker.id, CheckResult(False, None, None, "x" * 10_000))
        assert len(registry.get(worker.id).last_error) == picoapi.MAX_ERROR  # type: ignore[union-attr]


# -- Scheduler ---------------------------------------------------------------------


@pytest.fixture
def sched() -> tuple[FakeClock, Registry, InlinePool, HealthChecker]:
    clock = FakeClock()
    registry = Registry(clock=clock, wall=clock)
    pool = InlinePool()
    return clock, registry, pool, HealthChecker(registry, submit=pool.submit, supervisor_id="sup1")


class TestScheduler:
    def test_order_across_intervals(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        registry.register(reg(port=1, interval=1))
        registry.register(reg(port=2, interval=3))
        assert checker.run_pending() == 2  # a new registration is checked at once
        pool.fired.clear()
        fired = []
        for _ in range(6):
            clock.advance(1)
            checker.run_pending()
            fired.append(sorted(w.split(":")[1] for w in pool.fired))
            pool.fired.clear()
        assert fired == [["1"], ["1"], ["1", "2"], ["1"], ["1"], ["1", "2"]]
        assert pool.headers == {"X-PicoAPI-Supervisor": "sup1"}

    def test_nothing_fires_early(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        registry.register(reg(interval=10))
        assert checker.run_pending() == 1  # the first check, at once
        clock.advance(9.99)
        assert checker.run_pending() == 0
        clock.advance(0.01)
        assert checker.run_pending() == 1

    def test_reregistration_moves_schedule(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        registry.register(reg(interval=10))
        checker.run_pending()
        clock.advance(8)
        registry.register(reg(interval=5))  # a change: checked at once, then every 5 s
        assert checker.run_pending() == 1
        clock.advance(2)
        assert checker.run_pending() == 0  # the old due time (10) is stale
        clock.advance(3)
        assert checker.run_pending() == 1 and len(pool.fired) == 3

    def test_deregistration_cancels(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=1))
        registry.deregister(worker.id)
        clock.advance(5)
        assert checker.run_pending() == 0 and registry.next_due() is None

    def test_first_failure_is_confirmed_quickly(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=10))
        checker.run_pending()
        pool.outcome[worker.id] = [FAIL, FAIL]
        clock.advance(10)
        checker.run_pending()
        assert registry.get(worker.id).status == "healthy"  # one failure is not enough
        assert registry.next_due() == pytest.approx(clock.now + picoapi.confirm_delay(10))
        clock.advance(1)
        checker.run_pending()
        assert registry.get(worker.id).status == "unhealthy"
        assert registry.next_due() == pytest.approx(clock.now + 10)  # back to the interval

    def test_one_lost_check_does_not_mark_unhealthy(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=10))
        checker.run_pending()
        pool.outcome[worker.id] = [FAIL, OK]
        for _ in range(3):
            clock.advance(10)
            checker.run_pending()
        w = registry.get(worker.id)
        assert w.status == "healthy" and w.failures == 0 and w.successes >= 1

    def test_success_threshold_to_recover(self) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock, failures=1, successes=2)
        pool = InlinePool()
        checker = HealthChecker(registry, submit=pool.submit)
        worker, _ = registry.register(reg(interval=4))
        checker.run_pending()
        pool.outcome[worker.id] = [FAIL, OK, OK]
        clock.advance(4)
        checker.run_pending()
        assert registry.get(worker.id).status == "unhealthy"
        clock.advance(4)
        checker.run_pending()
        assert registry.get(worker.id).status == "unhealthy"  # one success is not enough
        clock.advance(1)  # the confirm re-check
        checker.run_pending()
        assert registry.get(worker.id).status == "healthy"

    def test_flapping_does_not_flip_status_every_check(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=1))
        checker.run_pending()
        pool.outcome[worker.id] = [FAIL, OK] * 50
        statuses = set()
        for _ in range(200):
            clock.advance(0.25)
            checker.run_pending()
            statuses.add(registry.get(worker.id).status)
        assert statuses == {"healthy"}

    def test_deregister_after(self) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock, deregister_after=30)
        pool = InlinePool()
        changes: list[Any] = []
        checker = HealthChecker(registry, submit=pool.submit, on_change=lambda wid, c: changes.append(c))
        worker, _ = registry.register(reg(interval=10))
        checker.run_pending()
        pool.outcome[worker.id] = [FAIL] * 10
        for _ in range(30):
            clock.advance(1)
            checker.run_pending()
        assert worker.id in registry  # unhealthy for less than 30 s
        for _ in range(20):
            clock.advance(1)
            checker.run_pending()
        assert worker.id not in registry
        assert changes == [
            ("unknown", "healthy", False, ""),
            ("healthy", "unhealthy", False, "refused"),
            ("unhealthy", "unhealthy", True, "refused"),
        ]

    def test_new_worker_is_unknown_checked_at_once_and_given_a_start_up_grace(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=100))
        assert worker.status == "unknown"
        pool.outcome[worker.id] = [FAIL] * 5 + [OK]  # its server is not listening yet
        assert checker.run_pending() == 1
        for gap in (1, 2, 4):  # re-checked at the confirm delay, doubling, still unknown for min(interval, 10 s)
            clock.advance(gap - 0.01)
            assert checker.run_pending() == 0
            clock.advance(0.01)
            assert checker.run_pending() == 1
            assert registry.get(worker.id).status == "unknown"
        clock.advance(8)
        checker.run_pending()
        assert registry.get(worker.id).status == "unhealthy"  # it never answered: unhealthy after the grace
        clock.advance(100)
        checker.run_pending()
        assert registry.get(worker.id).status == "healthy"

    def test_result_for_deregistered_worker_is_dropped(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        assert registry.record("gone:1", OK) is None

    def test_lateness_is_measured(self, sched: Any) -> None:
        clock, registry, pool, checker = sched
        registry.register(reg(interval=1))
        late: list[float] = []

        def submit(checks: list[Any], *rest: Any) -> None:
            late.extend(clock.now - check.due for check in checks)
            pool.submit(checks, *rest)

        checker._submit = submit
        checker.run_pending()
        clock.advance(1.5)
        checker.run_pending()
        assert len(late) == 2 and sum(late) == pytest.approx(0.5)

    def test_broken_recording_does_not_kill_the_pool(self, sched: Any, caplog: Any) -> None:
        clock, registry, pool, checker = sched
        worker, _ = registry.register(reg(interval=1))
        checker._on_change = lambda *a: 1 / 0
        pool.outcome[worker.id] = [FAIL, FAIL]
        clock.advance(1)
        checker.run_pending()
        clock.advance(1)
        checker.run_pending()  # the change raises inside on_change
        assert "recording the check" in caplog.text


class TestCheckerThread:
    def test_start_stop_leaves_no_thread(self) -> None:
        before = threading.active_count()
        registry = Registry()
        for _ in range(20):
            checker = HealthChecker(registry)
            checker.start()
            assert checker.is_running
            started = time.monotonic()
            checker.stop()
            assert time.monotonic() - started < 2.0
        assert threading.active_count() == before

    def test_app_start_stop_cycles_leave_no_thread_or_file(self, tmp_path: Any) -> None:
        app = PicoAPI(mode="supervisor", registry_file=str(tmp_path / "reg.db"))
        with TestClient(app):
            pass  # the first start loads what it needs once
        threads, files = settled_thread_count(), len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with TestClient(app) as client:
                assert app.checker is not None and app.checker.is_running
                client.put("/register", json=body())
        assert app.checker is None and picoapi_threads() == []
        assert settled_thread_count() <= threads  # no growth (others may end meanwhile)
        assert len(os.listdir("/proc/self/fd")) <= files  # no growth (others' garbage may close meanwhile)

    def test_a_supervisor_of_ten_thousand_workers_runs_one_thread(self) -> None:
        """Its own threads: the checker's, whatever the number of workers (checks are sockets, not threads)."""
        app, port = PicoAPI(mode="supervisor", env_file=None, max_workers=10_000), free_port()
        with TestClient(app):
            assert app.registry is not None
            for i in range(10_000):  # 10,000 ids at one address where nothing listens: checks fail fast
                app.registry.register(reg(f"127.0.{i // 250}.{i % 250 + 1}", port, interval=1), address="127.0.0.1")
            wait_for(lambda: sum(w.failures > 0 for w in app.registry.workers()) > 5000, 30, "checks under way")
            assert picoapi_threads() == ["picoapi-health"]

    def test_registration_wakes_the_thread(self) -> None:
        registry = Registry()
        pool = InlinePool()
        checker = HealthChecker(registry, submit=pool.submit)
        checker.start()
        try:
            registry.register(reg(interval=0.05))
            wait_for(lambda: len(pool.fired) >= 3, 5, "three checks")
        finally:
            checker.stop()

    def test_a_wake_while_the_thread_reads_the_pipe_leaves_the_next_wake_working(self) -> None:
        registry = Registry()
        checker = HealthChecker(registry, submit=InlinePool().submit)
        pipe, woke = checker._wake_r, []

        class Racing:  # a registration wakes the thread between its select and its read of the pipe
            def recv(self, size: int) -> bytes:
                if not woke:
                    woke.append(registry.wake())
                return pipe.recv(size)

        checker._wake_r = Racing()  # type: ignore[assignment]
        try:
            registry.wake()
            checker._poll()  # the wake byte is in the pipe: it returns at once
            assert woke and checker._selector.select(0) == []  # all read
            registry.wake()  # a later registration: the thread must hear of it
            assert checker._selector.select(0) != []
        finally:
            checker._wake_r = pipe
            checker.stop()

    def test_a_burst_of_wakes_is_one_byte_and_the_next_registration_still_wakes(self) -> None:
        registry, pool = Registry(), InlinePool()
        checker = HealthChecker(registry, submit=pool.submit)
        for _ in range(100):
            registry.wake()
        assert checker._wake_r.recv(4096) == b"\0"  # one byte for the whole burst
        checker._woken = False  # as the thread does once it has read
        checker.start()
        try:
            registry.register(reg("127.0.0.1", 1, interval=100))
            wait_for(lambda: len(pool.fired) == 1, 5, "the first worker's check")
            registry.register(reg("127.0.0.1", 2, interval=100))  # the thread sleeps ~100 s: only a wake helps
            wait_for(lambda: len(pool.fired) == 2, 5, "the second worker's check, at once")
        finally:
            checker.stop()


# -- The probe against real sockets ----------------------------------------------------


@contextlib.contextmanager
def raw_server(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection-at-a-time TCP server on 127.0.0.1 that runs ``handler``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)  # how long stopping it may wait
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=_handle, args=(handler, conn), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        server.close()


def _handle(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with contextlib.suppress(OSError), conn:
        conn.recv(4096)
        handler(conn)


def probe(port: int, timeout: float = 0.5, path: str = "/health", host: str = "127.0.0.1") -> CheckResult:
    return picoapi.check_once(f"http://{host}:{port}{path}", timeout, {"X-PicoAPI-Supervisor": "s"})


class TestProbe:
    def test_200(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as port:
            result = probe(port)
        assert result.ok and result.status_code == 200 and result.latency is not None

    def test_500_and_redirect_are_failures(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 500 Oops\r\n\r\n")) as port:
            result = probe(port)
        assert (result.ok, result.status_code, result.error, result.postponed) == (False, 500, "HTTP 500", False)
        moved = b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\n\r\n"
        with raw_server(lambda c: c.sendall(moved)) as port:
            result = probe(port)
        assert not result.ok and result.status_code == 302 and result.error == "HTTP 302"

    def test_silent_server_times_out_within_deadline(self) -> None:
        with raw_server(lambda c: time.sleep(2)) as port:
            started = time.monotonic()
            result = probe(port, timeout=0.3)
            elapsed = time.monotonic() - started
        assert not result.ok and result.error == "no answer within 0.3s"
        assert elapsed < 1.0

    def test_trickle_is_cut_at_the_deadline(self) -> None:
        def trickle(conn: socket.socket) -> None:
            for byte in b"HTTP/1.1 200 OK":
                conn.sendall(bytes([byte]))
                time.sleep(0.1)

        with raw_server(trickle) as port:
            started = time.monotonic()
            result = probe(port, timeout=0.3)
        assert not result.ok and time.monotonic() - started < 1.0

    def test_reset_refused_and_garbage(self) -> None:
        def reset(conn: socket.socket) -> None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

        with raw_server(reset) as port:
            assert not probe(port).ok
        assert "Connect" in probe(free_port()).error or "refused" in probe(free_port()).error.lower()
        with raw_server(lambda c: c.sendall(b"SSH-2.0-OpenSSH_9.6p1 Debian\r\n")) as port:
            assert probe(port).error == "ValueError: not an HTTP response"  # no banner read back

    def test_huge_body_is_not_read(self) -> None:
        def huge(conn: socket.socket) -> None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    conn.sendall(b"x" * 65536)

        with raw_server(huge) as port:
            assert probe(port).ok

    def test_request_names_supervisor(self) -> None:
        seen: list[bytes] = []

        def record(conn: socket.socket) -> None:
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def accept() -> None:
            conn, _ = server.accept()
            seen.append(conn.recv(4096))
            record(conn)
            conn.close()

        thread = threading.Thread(target=accept)
        thread.start()
        assert probe(port, path="/hz?deep=1").ok
        thread.join()
        server.close()
        assert seen[0].startswith(b"GET /hz?deep=1 HTTP/1.1\r\n") and b"X-PicoAPI-Supervisor: s\r\n" in seen[0]

    def test_host_name_is_resolved(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            assert probe(port, host="localhost").ok

        def no_such_host(*args: Any, **kwargs: Any) -> Any:  # no DNS query leaves the machine
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
        result = probe(80, host="no-such-host.invalid", timeout=2)
        assert not result.ok and result.error.startswith("host 'no-such-host.invalid' does not resolve")

    def test_tls_is_verified(self, tmp_path: Any) -> None:
        import ssl

        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(4)

        def serve() -> None:
            conn, _ = server.accept()
            with contextlib.suppress(OSError, ssl.SSLError), context.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.recv(4096)
                tls_conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = picoapi.check_once(f"https://127.0.0.1:{server.getsockname()[1]}/health", 2)
        thread.join(3)
        server.close()
        # a self-signed certificate is not trusted: the check fails, and says why
        assert not result.ok and "CERTIFICATE_VERIFY_FAILED" in result.error

    def test_https_to_a_plain_server_fails_cleanly(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            result = picoapi.check_once(f"https://127.0.0.1:{port}/health", 1)
        assert not result.ok and result.error

    def test_a_url_it_cannot_send_fails_at_once(self) -> None:
        started = time.monotonic()
        result = picoapi.check_once("http://127.0.0.1:1/h\u00e9", 5, address="127.0.0.1")
        assert result.error.startswith("cannot check") and time.monotonic() - started < 1.0


@contextlib.contextmanager
def keep_alive_server(answers_per_connection: int = 1000) -> Iterator[tuple[int, list[int]]]:
    """An HTTP/1.1 server that keeps connections open; after ``answers_per_connection`` answers it closes the
    connection when the next request arrives, unanswered. Yields (port, [connections, answers])."""
    counts = [0, 0]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            for answered in range(answers_per_connection + 1):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                if answered == answers_per_connection:
                    return
                counts[1] += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-PicoAPI-Instance: p1\r\n\r\nok")

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                counts[0] += 1
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], counts
    finally:
        stop.set()
        thread.join()
        server.close()


class TestKeepAlive:
    @staticmethod
    def checked(port: int, good_checks: int) -> picoapi.Worker:
        """A worker at ``port`` checked every 50 ms until it had ``good_checks`` good checks in a row."""
        registry = Registry()
        worker, _ = registry.register(reg("127.0.0.1", port, interval=0.05, instance="p1"))
        checker = HealthChecker(registry)
        checker.start()
        try:
            wait_for(lambda: registry.get(worker.id).successes >= good_checks, 10, f"{good_checks} good checks")
        finally:
            checker.stop()
        entry = registry.get(worker.id)
        assert entry is not None
        return entry

    def test_the_instance_header_is_found_last_in_the_head(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nX-PicoAPI-Instance: p1\r\n\r\n")) as port:
            assert probe(port).instance == "p1"

    def test_a_connection_is_kept_and_renewed_every_keep_alive_seconds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(picoapi, "KEEP_ALIVE", 0.3)
        with keep_alive_server() as (port, counts):
            entry = self.checked(port, 30)
            connections, answers = counts
        assert entry.failures == 0
        # Kept: far fewer connections than checks. Renewed: one at least per 0.3 s (6 checks at 0.05 s).
        assert answers / 7 <= connections <= answers / 2

    def test_a_kept_connection_closed_by_the_worker_is_replaced_not_failed(self) -> None:
        with keep_alive_server(answers_per_connection=1) as (port, counts):
            entry = self.checked(port, 20)
        assert entry.failures == 0 and entry.status == "healthy"
        assert counts[0] >= 20  # each check found its kept connection closed, and made a new one at once


class TestCheckSlots:
    def test_limit_queues_checks_in_order(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            checker = HealthChecker(Registry(), limit=2)
            results: list[Any] = []
            finished = threading.Event()

            def done(check: Any, result: CheckResult) -> None:
                results.append((check.worker_id, result.ok))
                assert checker.in_flight <= 2
                if len(results) == 20:
                    finished.set()

            checks = [picoapi._Check(str(i), f"http://127.0.0.1:{port}/h", "127.0.0.1", 2.0, 0.0) for i in range(20)]
            checker._queue(checks, {}, done)
            checker.start()
            try:
                assert finished.wait(10)
            finally:
                checker.stop()
        assert sorted(results) == sorted((str(i), True) for i in range(20))

    def test_stop_with_checks_in_flight(self) -> None:
        before = threading.active_count()
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        checker = HealthChecker(Registry())
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/h"
        checker._queue([picoapi._Check(str(i), url, "127.0.0.1", 30.0, 0.0) for i in range(50)], {}, lambda c, r: None)
        checker.start()
        wait_for(lambda: checker.in_flight == 50, 5, "fifty checks in flight")
        started = time.monotonic()
        checker.stop()
        assert time.monotonic() - started < 1.0
        silent.close()
        assert threading.active_count() == before


class TestSilentWorkers:
    def test_silent_workers_neither_delay_nor_starve_a_healthy_one(self) -> None:
        """40 workers that accept and never answer, each its own host and port, with interval = timeout,
        registered beside a healthy worker when the pool has only 8 slots."""
        silent = []
        for i in range(40):
            listener = socket.socket()
            listener.bind((f"127.0.0.{10 + i}", 0))
            listener.listen(16)
            silent.append(listener)
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as good_port:
            registry = Registry()
            checker = HealthChecker(registry, limit=8)
            good, _ = registry.register(reg("127.0.0.1", good_port, interval=0.1))
            checker.start()
            try:
                wait_for(lambda: registry.get(good.id).successes >= 1, 5, "a first good check")
                for listener in silent:
                    host, port = listener.getsockname()
                    registry.register(reg(host, port, interval=1, health={"timeout": 1}))
                assert len(registry) == 41
                # once they hold slots (four at a time: half of them), the good worker must not wait for them
                wait_for(lambda: sum(1 for w in registry.workers() if w.failures) >= 4, 10, "silent checks failing")
                before = registry.get(good.id).successes
                started = time.monotonic()
                wait_for(lambda: registry.get(good.id).successes >= before + 10, 5, "ten more good checks")
                took = time.monotonic() - started
            finally:
                checker.stop()
        for listener in silent:
            listener.close()
        assert registry.get(good.id).status == "healthy"
        record_figure("silent_workers_ten_good_checks_s", round(took, 2))


class SpyDB:
    """Stands in for the store's sqlite connection: notes which thread writes, or fails as told."""

    def __init__(self, db: Any) -> None:
        self.db, self.threads, self.fail = db, [], ""

    def execute(self, *args: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise sqlite3.OperationalError(self.fail)
        return self.db.execute(*args)

    def close(self) -> None:
        self.db.close()


class TestPersistence:
    def test_store_round_trip_and_identity(self, tmp_path: Any) -> None:
        store = picoapi._Store(str(tmp_path / "reg.db"))
        store.save("10.0.0.5:8888", reg(), "10.0.0.5")
        store.save("10.0.0.6:8888", reg("10.0.0.6"), "10.0.0.6")
        store.delete("10.0.0.6:8888")
        identity = store.identity()
        store.close()
        store = picoapi._Store(str(tmp_path / "reg.db"))
        assert store.load() == [(reg(), "10.0.0.5", [])]
        assert store.identity() == identity
        store.close()

    def test_bad_file_is_a_config_error(self, tmp_path: Any) -> None:
        with pytest.raises(ConfigError, match="API_REGISTRY_FILE .* cannot be used as a registry file"):
            picoapi._Store(str(tmp_path / "no" / "such" / "dir.db"))

    def test_corrupt_or_foreign_file_is_a_config_error_naming_it(self, tmp_path: Any) -> None:
        corrupt = tmp_path / "corrupt.db"
        corrupt.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
        with pytest.raises(ConfigError, match=f"API_REGISTRY_FILE '{corrupt}' cannot be used as a registry file"):
            picoapi._Store(str(corrupt))
        foreign = tmp_path / "foreign.db"
        with contextlib.closing(sqlite3.connect(foreign)) as db:
            db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            db.commit()
        with pytest.raises(ConfigError, match=f"API_REGISTRY_FILE '{foreign}' is not a PicoAPI registry file"):
            picoapi._Store(str(foreign))
        with contextlib.closing(sqlite3.connect(foreign)) as db:  # left as it was
            assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]

    def test_second_supervisor_on_the_same_file_refuses_to_start(self, tmp_path: Any) -> None:
        path = str(tmp_path / "reg.db")
        with TestClient(PicoAPI(mode="supervisor", registry_file=path)) as client:
            assert client.put("/register", json=body(port=9001)).status_code == 201
            second = subprocess.run(
                [sys.executable, "-c", f"import picoapi; picoapi._Store({path!r})"],
                env={**os.environ, "PYTHONPATH": HERE},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert second.returncode != 0
            assert f"API_REGISTRY_FILE {path!r} is in use by another supervisor" in second.stderr
            assert client.get("/services/127.0.0.1:9001").status_code == 200  # the first one is untouched
        assert picoapi._Store(path).load()[0][0].port == 9001  # and free again once it stopped

    def test_busy_file_is_503_with_retry_after_and_changes_nothing(self, tmp_path: Any) -> None:
        app = PicoAPI(mode="supervisor", registry_file=str(tmp_path / "reg.db"))
        with TestClient(app) as client:
            assert client.put("/register", json=body(port=9001)).status_code == 201
            assert app._store is not None
            spy = app._store._db = SpyDB(app._store._db)
            spy.fail = "database is locked"
            for answer in (client.put("/register", json=body(port=9002)), client.delete("/register/127.0.0.1:9001")):
                assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
                assert "the registry file is busy" in answer.json()["detail"]
            assert sorted(w.id for w in app.registry.workers()) == ["127.0.0.1:9001"]  # as it was
            spy.fail = ""
            assert client.put("/register", json=body(port=9002)).status_code == 201

    def test_removal_is_written_off_the_check_thread_and_never_loses_a_new_row(self, tmp_path: Any) -> None:
        path = str(tmp_path / "reg.db")
        app = PicoAPI(mode="supervisor", registry_file=path, deregister_after=0.2, health_failures=1)
        with TestClient(app) as client:
            assert app._store is not None
            spy = app._store._db = SpyDB(app._store._db)
            dead = body(port=free_port(), interval=0.1)
            assert client.put("/register", json=dead).status_code == 201
            wid = f"127.0.0.1:{dead['port']}"
            wait_for(lambda: wid not in app.registry, 10, "the dead worker's removal")
            # removed, then registered again before any write: the new row must survive the queued delete
            assert client.put("/register", json=dead).status_code == 201
            assert client.put("/register", json=body(port=9003)).status_code == 201  # a write flushes the queue
        assert "picoapi-checks" not in spy.threads and "picoapi-health" not in spy.threads
        assert sorted(r.port for r, _, _ in picoapi._Store(path).load()) == sorted([dead["port"], 9003])

    def test_every_process_of_an_entry_survives_a_restart(self, tmp_path: Any) -> None:
        """uvicorn --workers 2: both processes registered; after a restart checks answered by either still count."""
        path = str(tmp_path / "reg.db")
        with TestClient(PicoAPI(mode="supervisor", registry_file=path)) as client:
            for instance in ("proc1", "proc2"):
                assert client.put("/register", json=body(port=9001, instance=instance)).status_code in (200, 201)
        app = PicoAPI(mode="supervisor", registry_file=path)
        with TestClient(app):
            assert app.registry is not None and app.registry.get("127.0.0.1:9001").instances == ("proc1", "proc2")  # type: ignore[union-attr]

    def test_queued_delete_spares_a_worker_registered_again_meanwhile(self, tmp_path: Any) -> None:
        registered = {"10.0.0.5:8888"}
        store = picoapi._Store(str(tmp_path / "reg.db"), registered.__contains__)
        store.save("10.0.0.5:8888", reg(), "10.0.0.5")
        store.save("10.0.0.6:8888", reg("10.0.0.6"), "10.0.0.6")
        store.forget("10.0.0.5:8888")  # the checker removed it, but a PUT brought it back before the flush
        store.forget("10.0.0.6:8888")
        store.close()
        assert [r.host for r, _, _ in picoapi._Store(str(tmp_path / "reg.db")).load()] == ["10.0.0.5"]

    def test_supervisor_restart_keeps_workers(self, tmp_path: Any) -> None:
        path = str(tmp_path / "reg.db")
        with TestClient(PicoAPI(mode="supervisor", registry_file=path)) as client:
            assert client.put("/register", json=body(port=9001)).status_code == 201
            assert client.put("/register", json=body(port=9002)).status_code == 201
            assert client.delete("/register/127.0.0.1:9002").status_code == 204
        app = PicoAPI(mode="supervisor", registry_file=path)
        with TestClient(app) as client:
            services = client.get("/services").json()
            assert [s["id"] for s in services] == ["127.0.0.1:9001"]
            # checked at once: nothing listens on 9001, so the first check fails quickly
            wait_for(lambda: app.registry.get("127.0.0.1:9001").last_check, 5, "the loaded worker's check")


# -- Supervisor routes -----------------------------------------------------------------


@pytest.fixture
def supervisor() -> Iterator[TestClient]:
    with TestClient(PicoAPI(mode="supervisor", max_workers=3)) as client:
        yield client


def field_error(response: Any) -> str:
    assert response.status_code == 422, response.text
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"])


class TestSupervisorRoutes:
    def test_services_reads_tags_as_the_other_routes_do(self, supervisor: TestClient) -> None:
        assert supervisor.put("/register", json=body(tags=["resize", "png"])).status_code == 201
        for query in ("tag=resize,png", "tag=resize+png", "tag=resize&tag=png"):
            assert [w["id"] for w in supervisor.get(f"/services?{query}").json()] == ["127.0.0.1:9001"], query
        assert supervisor.get("/services?tag=a:b").status_code == 422  # checked as API_TAGS is

    def test_a_protocol_error_anywhere_in_the_chain_is_not_quoted(self) -> None:
        inner = ValueError("invalid literal for int() with base 16: b'\\x1b[31mEVIL'")  # a chunk size, as sent
        protocol = http.client.HTTPException("bad chunk")
        protocol.__cause__ = inner
        said = picoapi._root_cause(requests.ConnectionError(protocol))
        assert said == "HTTPException: a malformed HTTP answer" and "EVIL" not in said

    def test_register_create_replace_get_delete(self, supervisor: TestClient) -> None:
        first = supervisor.put("/register", json=body())
        assert first.status_code == 201 and first.json()["id"] == "127.0.0.1:9001"
        assert first.json()["status"] == "unknown" and first.headers["X-PicoAPI-Supervisor"]  # until checked
        assert supervisor.put("/register", json=body()).status_code == 200  # the same again: a refresh
        second = supervisor.put("/register", json=body(version="2.0"))
        assert second.status_code == 200 and second.json()["version"] == "2.0"
        assert len(supervisor.get("/services").json()) == 1
        got = supervisor.get("/services/127.0.0.1:9001").json()
        assert got["health"] == {"url": "http://127.0.0.1:9001/health", "interval": 10.0, "timeout": 10.0}
        assert supervisor.delete("/register/127.0.0.1:9001").status_code == 204
        assert supervisor.delete("/register/127.0.0.1:9001").status_code == 404
        assert supervisor.get("/services/127.0.0.1:9001").status_code == 404

    def test_filters(self, supervisor: TestClient) -> None:
        supervisor.put("/register", json=body(port=1, tags=["resize", "png"]))
        supervisor.put("/register", json=body(port=2, tags=["resize"], version="2.0"))
        supervisor.put("/register", json=body(port=3, tags=["ocr"], name="reader"))
        ids = lambda q: [s["port"] for s in supervisor.get("/services" + q).json()]  # noqa: E731
        assert ids("?tag=resize") == [1, 2]
        assert ids("?tag=resize&tag=png") == [1]
        assert ids("?version=2.0") == [2]
        assert ids("?name=reader") == [3]
        assert ids("?status=unknown") == [1, 2, 3]  # none checked yet (the fixture runs no checker)
        assert ids("?status=healthy") == ids("?status=unhealthy") == []
        assert supervisor.get("/services?status=sleepy").status_code == 422

    def test_registry_full(self, supervisor: TestClient) -> None:
        for port in (1, 2, 3):
            supervisor.put("/register", json=body(port=port))
        response = supervisor.put("/register", json=body(port=4))
        assert response.status_code == 503 and "API_MAX_WORKERS" in response.json()["detail"]

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"name": ""}, "body.name"),
            ({"name": "x" * 129}, "body.name"),
            ({"version": ""}, "body.version"),
            ({"version": "v" * 65}, "body.version"),
            ({"tags": [""]}, "body.tags"),
            ({"tags": ["has space"]}, "body.tags"),
            ({"tags": ["t" * 65]}, "body.tags"),
            ({"tags": [f"t{i}" for i in range(33)]}, "body.tags"),
            ({"port": 0}, "body.port"),
            ({"port": 65536}, "body.port"),
            ({"host": "bad host"}, "body.host"),
            ({"health": {"url": "http://127.0.0.1:9001/health", "interval": 0.001}}, "body.health.interval"),
            ({"health": {"url": "http://127.0.0.1:9001/health", "interval": 1e9}}, "body.health.interval"),
            ({"health": {"url": "ftp://127.0.0.1:9001/health", "interval": 1}}, "body.health.url"),
            ({"health": {"url": "http://127.0.0.1:9001/h\r\nX: y", "interval": 1}}, "body.health.url"),
            ({"health": {"url": "http://127.0.0.1:9001/health", "interval": 1, "timeout": 5}}, "health.timeout (5)"),
            ({"health": {"url": "http://169.254.169.254:9001/", "interval": 1}}, "health.url must point at"),
            ({"health": {"url": "http://127.0.0.1:22/", "interval": 1}}, "health.url must point at"),
            ({"description": "d" * 1025}, "body.description"),
        ],
    )
    def test_bad_input_names_the_field(self, supervisor: TestClient, change: dict[str, Any], field: str) -> None:
        payload = {**body(), **change}
        assert field in field_error(supervisor.put("/register", json=payload))

    def test_missing_health_named(self, supervisor: TestClient) -> None:
        payload = body()
        del payload["health"]
        assert "body.health" in field_error(supervisor.put("/register", json=payload))

    def test_oversized_body_refused(self, supervisor: TestClient) -> None:
        response = supervisor.put(
            "/register", content=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413

    def test_oversized_chunked_body_refused(self, supervisor: TestClient) -> None:
        def chunks() -> Iterator[bytes]:
            for _ in range(100):
                yield b" " * 1024

        response = supervisor.put("/register", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413

    def test_schema_documents_the_api(self, supervisor: TestClient) -> None:
        schema = supervisor.get("/openapi.json").json()
        assert set(schema["paths"]) == {
            "/register",
            "/register/{worker_id}",
            "/services",
            "/services/{worker_id}",
            "/services/{worker_id}/openapi",
            "/metrics",
            "/prometheus/targets",
        }
        put = schema["paths"]["/register"]["put"]
        assert put["operationId"] == "picoapi_register" and "201" in put["responses"]
        services = schema["paths"]["/services"]["get"]
        assert "WorkerOut" in json.dumps(services["responses"]["200"])
        params = {p["name"]: p["schema"] for p in services["parameters"]}
        assert params["limit"]["default"] == params["limit"]["maximum"] == 1000 and params["limit"]["minimum"] == 1
        assert "after" in params and "Link" in services["responses"]["200"]["headers"]

    @pytest.mark.parametrize("included", [False, True], ids=["app", "router"])
    @pytest.mark.parametrize("path", ["/services", "/metrics", "/dashboard", "/prometheus/targets"])
    def test_a_users_own_route_on_a_supervisor_path_wins(self, path: str, included: bool) -> None:
        """Moved ahead of PicoAPI's by path (a GET /metrics of prometheus-fastapi-instrumentator's, say): PicoAPI's
        routes are entries of the app's own router, not one included entry without a path (FastAPI 0.165)."""
        app = PicoAPI(mode="supervisor", env_file=None)
        router = APIRouter() if included else app.router

        @router.get(path)
        def mine() -> dict[str, bool]:
            return {"mine": True}

        if included:
            app.include_router(router)
        assert TestClient(app).get(path).json() == {"mine": True}
        assert TestClient(app).get("/services/nope:1").status_code == 404  # the rest still PicoAPI's

    def test_checks_of_a_live_process_pass_the_threads_gate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A change to an entry a live process serves is checked on a thread first: at most MAX_RESOLVING at once,
        the rest 503 at once, so a flood of conflicting PUTs cannot hold the threads every sync route shares."""
        release, lock, running, most = threading.Event(), threading.Lock(), [0], [0]

        def slow_check(*args: Any) -> CheckResult:  # the live process does not answer in time
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(10)
            with lock:
                running[0] -= 1
            return CheckResult(False, None, 0.75, "timed out")

        monkeypatch.setattr(picoapi, "check_once", slow_check)
        app = PicoAPI(mode="supervisor", env_file=None)
        kind = "registrations are being checked against a live process"
        with TestClient(app) as client:
            assert client.put("/register", json=body(instance="first")).status_code == 201
            answers: list[int] = []

            def put(i: int) -> None:
                answers.append(client.put("/register", json=body(name=f"other{i}", instance=f"i{i}")).status_code)

            threads = [threading.Thread(target=put, args=(i,)) for i in range(picoapi.MAX_RESOLVING)]
            for thread in threads:
                thread.start()
            try:
                wait_for(lambda: app._supervisor.busy[kind] == picoapi.MAX_RESOLVING, 5, "the gate full")
                refused = client.put("/register", json=body(name="extra", instance="extra"))
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            finally:
                release.set()
                for thread in threads:
                    thread.join(10)
        assert most[0] == picoapi.MAX_RESOLVING and answers == [200] * picoapi.MAX_RESOLVING  # not served: replaced

    @pytest.mark.parametrize("networks", ["", "10.0.0.0/8"])
    def test_a_delete_with_no_client_address_is_refused(self, networks: str) -> None:
        """Under 'uvicorn --uds' a request has no client address: neither the worker nor in a listed network (and
        an entry loaded without an address is not its own either)."""
        app = PicoAPI(mode="supervisor", env_file=None, register_networks=networks)
        assert app.registry is not None
        app.registry.register(reg("127.0.0.1", 9001), address="127.0.0.1")
        app.registry.register(reg("127.0.0.1", 9002), address="")  # as loaded from a file when it did not resolve
        client = TestClient(app, client=None, raise_server_exceptions=False)
        for wid in ("127.0.0.1:9001", "127.0.0.1:9002"):
            refused = client.delete(f"/register/{wid}")
            assert refused.status_code == 403 and "not from an unknown address" in refused.json()["detail"]
        assert len(app.registry) == 2

    def test_every_route_sends_what_its_schema_declares(self) -> None:
        """Bodies are serialised from the registry, not validated on the way out: the OpenAPI schema checks them."""
        import jsonschema_rs

        document = json.dumps({"openapi": "3.1.0", "paths": {}}).encode()
        with http_worker(lambda h: (200, document)) as (port, _, _paths):
            app = supervisor_with(port, openapi="/spec.json")
            with TestClient(app) as client:
                spec = client.get("/openapi.json").json()
                wid = urllib.parse.quote(f"127.0.0.1:{port}")
                sent = {
                    ("/register", "put", 201): client.put("/register", json=body(port=9001, description="d")),
                    ("/register", "put", 200): client.put("/register", json=body(port=9001, description="d")),
                    ("/services", "get", 200): client.get("/services?limit=1"),
                    ("/services/{worker_id}", "get", 200): client.get(f"/services/{wid}"),
                    ("/services/{worker_id}/openapi", "get", 200): client.get(f"/services/{wid}/openapi"),
                    ("/services/{worker_id}", "get", 404): client.get("/services/nope:1"),
                    ("/services", "get", 422): client.get("/services?limit=0"),
                    ("/register/{worker_id}", "delete", 204): client.delete("/register/127.0.0.1:9001"),
                    ("/metrics", "get", 200): client.get("/metrics"),
                    ("/prometheus/targets", "get", 200): client.get("/prometheus/targets"),
                }
        assert sent["/services", "get", 200].links["next"]  # a page of one, of two workers
        declared = {(path, method) for path, methods in spec["paths"].items() for method in methods}
        assert declared == {(path, method) for path, method, status in sent if status < 300}  # every route
        for (path, method, status), response in sent.items():
            assert response.status_code == status, (path, method, response.text)
            content = spec["paths"][path][method]["responses"][str(status)].get("content")
            if status == 204 or (status == 404 and content is None):  # an error declared by its description
                assert content is None and (status != 204 or response.content == b"")
                continue
            if "text/plain" in content:  # the metrics: Prometheus's text format, parsed by TestMetrics
                assert response.headers["content-type"].startswith("text/plain") and "application/json" not in content
                continue
            schema = {**content["application/json"]["schema"], "components": spec["components"]}
            for model in ("WorkerOut", "HealthSpec"):  # and nothing undeclared either
                spec["components"]["schemas"][model]["additionalProperties"] = False
            errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(response.json())]
            assert errors == [], (path, method, status, errors)

    def test_services_come_in_pages_linked_by_id(self) -> None:
        app = PicoAPI(mode="supervisor", env_file=None)
        for port in range(1, 12):
            app.registry.register(reg("127.0.0.1", port, tags=["resize"] if port % 2 else ["ocr"]))  # type: ignore[union-attr]
        with TestClient(app) as client:
            ids, pages, url = [], 0, "/services?tag=resize&limit=2"
            while url:
                response = client.get(url)
                assert response.status_code == 200 and len(response.json()) <= 2
                ids += [entry["id"] for entry in response.json()]
                url, pages = response.links.get("next", {}).get("url"), pages + 1
        assert ids == sorted(f"127.0.0.1:{port}" for port in range(1, 12, 2)) and pages == 3  # each once, in order

    def test_services_default_page_and_limit_bounds(self) -> None:
        app = PicoAPI(mode="supervisor", env_file=None)
        for port in range(1, 1002):
            app.registry.register(reg("127.0.0.1", port))  # type: ignore[union-attr]
        with TestClient(app) as client:
            first = client.get("/services")
            assert len(first.json()) == 1000
            rest = client.get(first.links["next"]["url"])
            assert [e["id"] for e in rest.json()] == ["127.0.0.1:999"] and "link" not in rest.headers
            for bad in ("0", "1001", "all"):
                assert "query.limit" in field_error(client.get(f"/services?limit={bad}"))


class TestHostileInput:
    @pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
    @pytest.mark.parametrize(
        ("template", "loc"),
        [
            ('{"url": "http://127.0.0.1:9001/health", "interval": %s}', ["body", "health", "interval"]),
            ('{"url": "http://127.0.0.1:9001/health", "interval": 10, "timeout": %s}', ["body", "health", "timeout"]),
        ],
    )
    def test_non_finite_seconds_are_422_naming_the_field(
        self, supervisor: TestClient, caplog: Any, literal: str, template: str, loc: list[str]
    ) -> None:
        payload = json.dumps({**body(), "health": "HEALTH"}).replace('"HEALTH"', template % literal)
        response = supervisor.put("/register", content=payload, headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        assert [(e["loc"], e["msg"]) for e in response.json()["detail"]] == [(loc, "Input should be a finite number")]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback per request

    @pytest.mark.parametrize(
        ("field", "raw", "loc", "quoted"),
        [
            ("name", "NaN", ["body", "name"], "NaN"),
            ("port", "Infinity", ["body", "port"], "Infinity"),
            ("tags", "[1e400]", ["body", "tags", 0], "Infinity"),
            (None, "NaN", ["body"], "NaN"),
            ("name", '"\\ud800"', ["body", "name"], "\\ud800"),  # a lone surrogate: UTF-8 has no byte for it
        ],
    )
    def test_what_json_cannot_carry_is_quoted_back_as_text(
        self, supervisor: TestClient, field: str | None, raw: str, loc: list[Any], quoted: str
    ) -> None:
        payload = raw if field is None else json.dumps({**body(), field: "X"}).replace('"X"', raw)
        response = supervisor.put("/register", content=payload, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == loc
        assert response.json()["detail"][0]["input"] == quoted

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("name", "resizer{}"),
            ("version", "1.0{}"),
            ("tags", ["png{}"]),
            ("description", "resizes{} images"),
            ("openapi", "/openapi{}.json"),
            ("host", "127.0.0.1{}"),
            ("health", {"url": "http://127.0.0.1:9001/health{}", "interval": 1}),
        ],
    )
    def test_text_fields_refuse_hidden_characters(self, supervisor: TestClient, field: str, value: Any) -> None:
        for char in HIDDEN_CHARACTERS:
            filled = json.loads(json.dumps(value).replace("{}", json.dumps(char)[1:-1]))
            payload = json.dumps({**body(), field: filled})  # ASCII with \\u escapes, a lone surrogate's too
            response = supervisor.put("/register", content=payload, headers={"Content-Type": "application/json"})
            assert f"body.{field}" in field_error(response), (field, char)
        assert supervisor.get("/services").json() == []

    def test_lookalike_name_does_not_register_beside_the_original(self, supervisor: TestClient) -> None:
        assert supervisor.put("/register", json=body(port=1, name="resizer")).status_code == 201
        refused = field_error(supervisor.put("/register", json={**body(port=2), "name": "resizer\u200b"}))
        assert refused == (
            "body.name: Value error, name must not contain control, format or line-separator characters; "
            "remove the U+200B at index 7, got 'resizer\\u200b'"
        )
        assert [entry["name"] for entry in supervisor.get("/services").json()] == ["resizer"]

    @pytest.mark.parametrize(
        ("path", "fix"),
        [
            ("/santé", "/sant%C3%A9"),
            ("/€", "/%E2%82%AC"),
            ("/health?full=1", "/health"),
            ("/health#top", "/health"),
            ("/h\x9bealth", "/h%C2%9Bealth"),
        ],
    )
    def test_health_url_is_ascii_without_query(self, supervisor: TestClient, path: str, fix: str) -> None:
        payload = {**body(), "health": {"url": f"http://127.0.0.1:9001{path}", "interval": 1}}
        refused = field_error(supervisor.put("/register", json=payload))
        assert refused.startswith("body.health.url: Value error, health.url must be an ASCII path without ?query")
        assert f"percent-encode it: 'http://127.0.0.1:9001{fix}'" in refused

    def test_percent_encoded_health_url_and_ascii_host(self, supervisor: TestClient) -> None:
        encoded = {**body(), "health": {"url": "http://127.0.0.1:9001/sant%C3%A9", "interval": 1}}
        assert supervisor.put("/register", json=encoded).status_code == 201
        kelvin = {**body(host="k"), "health": {"url": "http://\u212a:9001/health", "interval": 1}}  # 'K'.lower() == 'k'
        assert "health.url must be ASCII" in field_error(supervisor.put("/register", json=kelvin))


class TestToken:
    @pytest.fixture
    def client(self) -> Iterator[TestClient]:
        with TestClient(PicoAPI(mode="supervisor", register_token="s3cret")) as client:
            yield client

    def test_put_and_delete_need_the_token(self, client: TestClient) -> None:
        missing = client.put("/register", json=body())
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = client.put("/register", json=body(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "s3cret" not in wrong.text
        ok = client.put("/register", json=body(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201 and "s3cret" not in ok.text
        assert client.delete("/register/127.0.0.1:9001").status_code == 401
        assert client.delete("/register/127.0.0.1:9001", headers={"Authorization": "Basic s3cret"}).status_code == 403
        assert client.delete("/register/127.0.0.1:9001", headers={"Authorization": "Bearer s3cret"}).status_code == 204

    def test_reads_stay_open(self, client: TestClient) -> None:
        assert client.get("/services").status_code == 200


# -- Handing out work -----------------------------------------------------------------


@contextlib.contextmanager
def http_worker(
    answer: Callable[[Any], tuple[int, bytes]] = lambda h: (200, b'{"ok": true}'),
) -> Iterator[tuple[int, set[int], list[str]]]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1; yields (port, client ports seen, paths seen)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    clients: set[int] = set()
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one_request(self) -> None:
            clients.add(self.client_address[1])
            super().handle_one_request()

        def do_any(self) -> None:
            paths.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, payload = answer(self)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_any  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown() waits a poll
    thread.start()
    try:
        yield server.server_address[1], clients, paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


def supervisor_with(*ports: int, tags: tuple[str, ...] = ("resize",), **fields: Any) -> PicoAPI:
    app = PicoAPI(mode="supervisor")
    for port in ports:
        worker, _ = app.registry.register(reg("127.0.0.1", port, tags=list(tags), **fields))  # type: ignore[union-attr]
        app.registry.record(worker.id, OK)  # type: ignore[union-attr]  # as if checked: nothing unchecked is picked
    return app


class TestPick:
    def test_round_robin_is_fair_across_threads(self) -> None:
        app = supervisor_with(1, 2, 3)
        picked: list[int] = []
        lock = threading.Lock()

        def pick_many() -> None:
            for _ in range(100):
                worker = app.pick("resize")
                with lock:
                    picked.append(worker.port)

        threads = [threading.Thread(target=pick_many) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {port: picked.count(port) for port in (1, 2, 3)} == {1: 100, 2: 100, 3: 100}

    def test_only_healthy_with_every_tag_and_version(self) -> None:
        app = PicoAPI(mode="supervisor")
        registry = app.registry
        assert registry is not None
        registry.register(reg("127.0.0.1", 1, tags=["resize", "png"], version="1.0"))
        registry.register(reg("127.0.0.1", 2, tags=["resize"], version="2.0"))
        registry.register(reg("127.0.0.1", 3, tags=["resize", "png"], version="2.0"))
        registry.register(reg("127.0.0.1", 4, tags=["resize", "png"], version="2.0"))  # never checked: unknown
        for port in (1, 2, 3):
            registry.record(f"127.0.0.1:{port}", OK)
        registry.record("127.0.0.1:3", FAIL)
        assert {app.pick("resize", "png").port for _ in range(4)} == {1}  # one failure: out until it passes again
        registry.record("127.0.0.1:3", FAIL)  # unhealthy now
        assert {app.pick("resize", "png").port for _ in range(4)} == {1}
        assert {app.pick("resize", version="2.0").port for _ in range(4)} == {2}
        with pytest.raises(
            NoWorkerAvailable, match=r"no healthy worker with tags \['resize', 'png'\] and version '2.0'"
        ):
            app.pick("resize", "png", version="2.0")

    def test_no_worker_in_a_route_is_503_naming_the_tags(self) -> None:
        app = PicoAPI(mode="supervisor")

        @app.post("/jobs")
        def jobs() -> dict[str, Any]:
            return {"worker": app.pick("ocr").id}

        with TestClient(app) as client:
            response = client.post("/jobs")
        assert response.status_code == 503
        assert response.json()["detail"] == "no healthy worker with tags ['ocr']"
        assert response.json()["tags"] == ["ocr"]

    def test_user_can_handle_it_instead(self) -> None:
        app = PicoAPI(mode="supervisor")

        @app.exception_handler(NoWorkerAvailable)
        async def later(request: Any, exc: NoWorkerAvailable) -> Any:
            from fastapi.responses import JSONResponse

            return JSONResponse({"queued": exc.tags}, status_code=202)

        @app.post("/jobs")
        def jobs() -> None:
            app.pick("ocr")

        with TestClient(app) as client:
            assert client.post("/jobs").status_code == 202

    def test_worker_mode_has_no_pick(self) -> None:
        with pytest.raises(PicoAPIError, match="need a supervisor"):
            PicoAPI().pick("x")


class TestCall:
    def test_failover_marks_suspect_and_brings_the_check_forward(self) -> None:
        dead = free_port()
        with http_worker() as (live, _, paths):
            app = supervisor_with(dead, live)
            registry = app.registry
            assert registry is not None
            for _ in range(2):  # whichever comes first, the call lands on the live one
                response = app.call("resize", "POST", "/resize", json={"width": 10})
                assert response.status_code == 200 and response.json() == {"ok": True}
            dead_worker = registry.get(f"127.0.0.1:{dead}")
            assert dead_worker is not None and dead_worker.suspect
            assert registry.next_due() <= registry.clock()  # its check is due now
            assert {app.pick("resize").port for _ in range(3)} == {live}  # skipped until checked
            registry.record(dead_worker.id, OK)  # a good check clears the suspicion
            assert not registry.get(dead_worker.id).suspect  # type: ignore[union-attr]
        assert paths == ["POST /resize", "POST /resize"]

    def test_every_worker_down_lists_each_and_why(self) -> None:
        app = supervisor_with(free_port(), free_port())
        with pytest.raises(NoWorkerAvailable, match="could be reached") as info:
            app.call("resize", "GET", "/x")
        assert len(info.value.tried) == 2
        assert all("ConnectionRefusedError" in why for _, why in info.value.tried)

    def test_a_sent_request_is_not_sent_again(self) -> None:
        def drop(conn: socket.socket) -> None:
            pass  # read the request (raw_server does), then close without answering

        with raw_server(drop) as rude, http_worker() as (polite, _, paths):
            app = supervisor_with(rude, polite)
            registry = app.registry
            assert registry is not None
            while app.pick("resize").port != polite:
                pass  # make the rude worker next in turn
            with pytest.raises(requests.ConnectionError):
                app.call("resize", "POST", "/charge", json={"amount": 10})
            assert paths == []  # not resent to the other worker
            response = app.call("resize", "PUT", "/idempotent", retry_sent=True)
            assert response.status_code == 200 and paths == ["PUT /idempotent"]

    def test_connections_are_reused(self) -> None:
        with http_worker() as (port, clients, paths):
            app = supervisor_with(port)
            for _ in range(20):
                assert app.call("resize", "GET", "/ping").status_code == 200
        assert len(paths) == 20 and len(clients) == 1


class TestBroadcast:
    def test_one_slow_worker_does_not_hold_up_the_others(self) -> None:
        release = threading.Event()

        def slow(handler: Any) -> tuple[int, bytes]:
            release.wait(5)
            return 200, b"{}"

        with http_worker() as (fast1, _, _p1), http_worker() as (fast2, _, _p2), http_worker(slow) as (lazy, _, _p3):
            app = supervisor_with(fast1, fast2, lazy)
            with TestClient(app):  # its shutdown stops the broadcast threads
                started = time.monotonic()
                results = app.broadcast("resize", "GET", "/stats", timeout=0.5)
                elapsed = time.monotonic() - started
                release.set()
        assert elapsed < 2.0
        assert results[f"127.0.0.1:{fast1}"].status_code == 200  # type: ignore[union-attr]
        assert results[f"127.0.0.1:{fast2}"].status_code == 200  # type: ignore[union-attr]
        assert isinstance(results[f"127.0.0.1:{lazy}"], Exception)


class TestWorkerOpenAPI:
    def test_fetched_from_the_worker(self) -> None:
        document = json.dumps({"openapi": "3.1.0", "paths": {"/resize": {}}}).encode()
        with http_worker(lambda h: (200, document)) as (port, _, paths):
            app = supervisor_with(port, openapi="/spec.json")
            with TestClient(app) as client:
                response = client.get(f"/services/127.0.0.1:{port}/openapi")
        assert response.status_code == 200 and response.json()["paths"] == {"/resize": {}}
        assert [p for p in paths if p != "GET /health"] == ["GET /spec.json"]  # beside the health checks

    def test_unreachable_worker_is_502(self) -> None:
        port = free_port()
        client = TestClient(supervisor_with(port))  # no lifespan: a first check would find it down, and 409 follow
        response = client.get(f"/services/127.0.0.1:{port}/openapi")
        assert client.get("/services/nope:1/openapi").status_code == 404
        assert response.status_code == 502 and "could not be reached" in response.json()["detail"]

    def test_oversized_document_is_502(self) -> None:
        huge = b'{"x": "' + b"a" * (picoapi.OPENAPI_MAX_BYTES + 10) + b'"}'
        with http_worker(lambda h: (200, huge)) as (port, _, _paths):
            with TestClient(supervisor_with(port)) as client:
                response = client.get(f"/services/127.0.0.1:{port}/openapi")
        assert response.status_code == 502 and "over 1048576 bytes" in response.json()["detail"]

    def test_worker_registers_its_openapi_path(self) -> None:
        app = PicoAPI(config=worker_config(), openapi_url="/spec.json")
        with responses.RequestsMock() as mock:
            mock.put(SUP, **answer())
            mock.delete(SUP + "/127.0.0.1%3A9001", status=204)
            with TestClient(app):
                sent = json.loads(mock.calls[0].request.body)
        assert sent["openapi"] == "/spec.json"


# -- Worker registration -----------------------------------------------------------------

SUP = "http://127.0.0.1:8100/register"
SUP2 = "http://127.0.0.1:8200/register"


def worker_config(**extra: Any) -> Config:
    options = {"host": "127.0.0.1", "port": 9001, "title": "orders", "register_urls": SUP, "tags": "resize:png"}
    options.update(extra)
    return Config.load(options, env_file=None)


def registrar(clock: FakeClock, urls: tuple[str, ...] = (SUP,), **kwargs: Any) -> Registrar:
    body = worker_config(health_interval=1).registration()
    return Registrar(urls, body, clock=clock, sleep=clock.sleep, rand=lambda: 1.0, **kwargs)


def answer(status: int = 201, **headers: str) -> dict[str, Any]:
    entry = {"id": "127.0.0.1:9001", "host": "127.0.0.1", "port": 9001}
    return {"status": status, "json": entry, "headers": {"X-PicoAPI-Supervisor": "sup1", **headers}}


class TestRegistrar:
    def test_put_body_is_the_contract(self) -> None:
        config = worker_config(version="1.2.0", description="d", health_interval=300)
        assert config.registration() == {
            "name": "orders",
            "host": "127.0.0.1",
            "port": 9001,
            "version": "1.2.0",
            "tags": ["resize", "png"],
            "description": "d",
            "health": {"url": "http://127.0.0.1:9001/health", "interval": 300.0},
        }
        Registration.model_validate(config.registration())  # the supervisor accepts exactly it

    @responses.activate
    def test_registers_and_knows_its_id(self) -> None:
        responses.put(SUP, **answer())
        r = registrar(FakeClock())
        r.register_all()
        assert json.loads(responses.calls[0].request.body)["name"] == "orders"
        assert r.supervisors[0].is_registered and r._id == "127.0.0.1:9001" and r.supervisors[0].identity == "sup1"

    def test_backoff_growth_and_cap(self) -> None:
        r = registrar(FakeClock())
        assert [r.backoff(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
        r._rand = lambda: 0.0
        assert r.backoff(3) == 2.0  # half jittered: from delay/2 to delay

    @responses.activate
    def test_retries_connection_errors_5xx_408_429(self) -> None:
        responses.put(SUP, body=requests.ConnectionError("refused"))
        responses.put(SUP, status=503)
        responses.put(SUP, status=408)
        responses.put(SUP, status=429)
        responses.put(SUP, **answer())
        clock = FakeClock()
        r = registrar(clock)
        r.register_all()
        assert clock.slept == [0.5, 1, 2, 4]
        assert r.supervisors[0].is_registered

    @responses.activate
    def test_honours_retry_after(self) -> None:
        responses.put(SUP, status=429, headers={"Retry-After": "7"})
        responses.put(SUP, **answer())
        clock = FakeClock()
        registrar(clock).register_all()
        assert clock.slept == [7.0]

    def test_retry_after_as_date(self) -> None:
        future = time.time() + 20  # within BACKOFF_CAP
        value = picoapi.email.utils.formatdate(future, usegmt=True)
        assert 15 < picoapi._retry_after(value) <= 20  # type: ignore[operator]
        assert picoapi._retry_after("soon") is None

    @responses.activate
    def test_gives_up_then_retries_in_background(self, caplog: Any) -> None:
        responses.put(SUP, body=requests.ConnectionError("refused"))
        clock = FakeClock()
        r = registrar(clock, timeout=5)
        r.register_all()
        assert sum(clock.slept) < 5 and not r.supervisors[0].is_registered
        assert "registration incomplete, retrying in the background" in caplog.text
        responses.replace(responses.PUT, SUP, **answer())
        clock.advance(60)
        r.step()
        assert r.supervisors[0].is_registered

    @responses.activate
    def test_required_fails(self) -> None:
        responses.put(SUP, body=requests.ConnectionError("refused"))
        with pytest.raises(
            RegistrationError,
            match=r"API_REGISTER_REQUIRED is on\): http://127.0.0.1:8100/register: not reachable within 5s",
        ):
            registrar(FakeClock(), timeout=5, required=True).register_all()

    @responses.activate
    def test_4xx_not_retried_and_message_surfaced(self) -> None:
        detail = [{"loc": ["body", "health", "url"], "msg": "must point at the registrant's own host and port"}]
        responses.put(SUP, status=422, json={"detail": detail})
        clock = FakeClock()
        with pytest.raises(RegistrationError, match=r"HTTP 422: health.url: must point at the registrant's own"):
            registrar(clock, required=True).register_all()
        assert len(responses.calls) == 1 and clock.slept == []

    @responses.activate
    def test_several_supervisors_independently(self) -> None:
        responses.put(SUP, body=requests.ConnectionError("down"))
        responses.put(SUP2, **answer())
        clock = FakeClock()
        r = registrar(clock, urls=(SUP, SUP2), timeout=3)
        r.register_all()
        assert [s.is_registered for s in r.supervisors] == [False, True]

    @responses.activate
    def test_deregisters_from_every_supervisor_with_token(self) -> None:
        responses.put(SUP, **answer())
        responses.put(SUP2, **answer())
        responses.delete(SUP + "/127.0.0.1%3A9001", status=204)
        responses.delete(SUP2 + "/127.0.0.1%3A9001", body=requests.ConnectionError("gone"))
        r = registrar(FakeClock(), urls=(SUP, SUP2), token="s3cret")
        r.register_all()
        started = time.monotonic()
        r.deregister_all()
        assert time.monotonic() - started < 2.5
        deletes = [c.request for c in responses.calls if c.request.method == "DELETE"]
        assert len(deletes) == 2
        assert all(c.request.headers["Authorization"] == "Bearer s3cret" for c in responses.calls)

    @responses.activate
    def test_token_never_in_errors_or_logs(self, caplog: Any) -> None:
        responses.put(SUP, status=403, json={"detail": "token s3cret is wrong"})
        caplog.set_level(logging.DEBUG)
        with pytest.raises(RegistrationError) as info:
            registrar(FakeClock(), token="s3cret", required=True).register_all()
        assert "s3cret" not in str(info.value) and "s3cret" not in caplog.text

    @responses.activate
    def test_watchdog_registers_again_when_checks_stop(self) -> None:
        responses.put(SUP, **answer())
        clock = FakeClock()
        r = registrar(clock)  # interval 1: re-register after 3 s without a check
        r.register_all()
        for _ in range(10):
            clock.advance(1)
            r.note_check("sup1")
            r.step()
        assert len(responses.calls) == 1
        r.note_check("another-supervisor")  # not ours: does not count
        clock.advance(3.5)
        r.step()
        assert len(responses.calls) == 2 and r.supervisors[0].is_registered


class TestWorkerApp:
    @responses.activate
    def test_lifespan_registers_and_deregisters(self) -> None:
        responses.put(SUP, **answer())
        responses.delete(SUP + "/127.0.0.1%3A9001", status=204)
        events: list[str] = []
        app = PicoAPI(config=worker_config(), on_startup=[lambda: events.append("user")])
        with TestClient(app) as client:
            assert events == ["user"] and len(responses.calls) == 1
            assert app.registrar is not None and app.registrar.supervisors[0].is_registered
            client.get("/health", headers={"X-PicoAPI-Supervisor": "sup1"})
        assert [c.request.method for c in responses.calls] == ["PUT", "DELETE"]
        assert not [name for name in picoapi_threads() if "regist" in name]

    @responses.activate
    def test_required_registration_fails_startup(self) -> None:
        responses.put(SUP, status=401, json={"detail": "missing token"})
        app = PicoAPI(config=worker_config(register_required=True))
        with pytest.raises(RegistrationError, match="HTTP 401: missing token"), TestClient(app):
            pass


ENTRY = b'{"id": "127.0.0.1:9001", "host": "127.0.0.1", "port": 9001}'


def read_request(conn: socket.socket) -> bytes:
    """One whole request, head and Content-Length bytes of body: closing with bytes unread would reset."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
        data += chunk
    length = re.search(rb"(?im)^content-length: *(\d+)", data)
    while length and len(data.partition(b"\r\n\r\n")[2]) < int(length[1]) and (chunk := conn.recv(65536)):
        data += chunk
    return data


@contextlib.contextmanager
def raw_supervisor(answer: Callable[[bytes, socket.socket], None]) -> Iterator[str]:
    """A raw TCP server on 127.0.0.1 that hands each request and its socket to ``answer``; yields its /register URL."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            answer(read_request(conn), conn)

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                threading.Thread(target=handle, args=(server.accept()[0],), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/register"
    finally:
        stop.set()
        thread.join(2)
        server.close()


def trickle(conn: socket.socket, data: bytes) -> None:
    for byte in data[:30]:  # 3 s at most
        conn.sendall(bytes([byte]))
        time.sleep(0.1)


def trickled_head(request: bytes, conn: socket.socket) -> None:
    trickle(conn, b"HTTP/1.1 201 Created\r\nX-Pwned: pwned pwned pwned pwned\r\n\r\n")


def trickled_body(request: bytes, conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % (len(ENTRY) + 40))
    trickle(conn, b'{"pwned": "pwned pwned pwned pwned pwned pwned"}')


def flood(request: bytes, conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 400000000\r\n\r\n")
    for _ in range(100):  # 6.4 MB of the 400 MB it announced
        conn.sendall(b"pwned " * 10_000)


class TestRegistrarHostile:
    """Supervisors that trickle, flood, redirect, lie, inject or hang: the worker stays bounded and its logs clean."""

    @pytest.mark.parametrize(
        "token",
        ["s3cret\n", " s3cret", "s3cret\t", "s3c\nret", "s3cré", "s3c\u20ac", "s3c\x00", "s3c" * 1366, "   ", "\n"],
    )
    def test_bad_token_is_refused_without_showing_it(self, token: str) -> None:
        fix = r"API_REGISTER_TOKEN must be 1 to 4096 printable ASCII characters with no whitespace around them .*strip"
        for load in (
            lambda: Config.load(environ={"API_REGISTER_TOKEN": token}, env_file=None),
            lambda: Config.load({"register_token": token}, env_file=None),
        ):
            with pytest.raises(ConfigError, match=fix) as info:
                load()
            assert "s3c" not in str(info.value)
        with pytest.raises(ConfigError, match="token must be"):
            Registrar((SUP,), worker_config().registration(), token=token)

    def test_good_and_empty_tokens(self) -> None:
        for token in ("s3cret", "a b", "!~", "x" * 4096):
            assert Config.load(environ={"API_REGISTER_TOKEN": token}, env_file=None).register_token == token
            assert Config.load({"register_token": token}, env_file=None).register_token == token
        assert Config.load(environ={"API_REGISTER_TOKEN": ""}, env_file=None).register_token is None
        assert Config.load({"register_token": ""}, env_file=None).register_token is None

    @pytest.mark.parametrize(
        ("value", "slept"),
        [
            ("7", 7.0),
            (" 7 ", 7.0),
            ("\xb2", 0.5),  # a Latin-1 byte that decodes to '²', which isdigit() takes
            ("99999999999", 30.0),
            ("9" * 5000, 0.5),
            ("-5", 0.5),
            ("1e3", 0.5),
            ("Fri, 31 Dec 9999 23:59:59 GMT", 30.0),
            ("Thu, 01 Jan 1970 00:00:00 GMT", 0.5),
            ("Mon, 99 Foo 99999 99:99:99 GMT", 0.5),
        ],
    )
    @responses.activate
    def test_retry_after_is_digits_or_a_date_and_capped(self, value: str, slept: float) -> None:
        responses.put(SUP, status=503, headers={"Retry-After": value})
        responses.put(SUP, **answer())
        clock = FakeClock()
        r = registrar(clock, timeout=60)
        r.register_all()
        assert clock.slept == [slept] and r.supervisors[0].is_registered

    @pytest.mark.parametrize(
        "answer",
        [
            {"status": 400, "json": {"detail": "\x1b]0;pwned\x07\x1b[2J"}},
            {"status": 422, "json": {"detail": [{"loc": ["body", "\x1b[2J"], "msg": "pwned\x1b]0;x\x07"}]}},
            {"status": 503, "body": "pwned\r\n\x1b[31m"},
            {"status": 302, "headers": {"Location": "http://x/\x1b]0;pwned\x07"}},
        ],
        ids=["detail", "422", "503 text", "redirect"],
    )
    @responses.activate
    def test_supervisor_text_is_printable_in_logs_and_errors(self, answer: dict[str, Any], caplog: Any) -> None:
        responses.put(SUP, **answer)
        caplog.set_level(logging.DEBUG, "picoapi")
        registrar(FakeClock(), timeout=3).register_all()
        with pytest.raises(RegistrationError) as info:
            registrar(FakeClock(), timeout=3, required=True).register_all()
        assert all(record.getMessage().isprintable() for record in caplog.records)
        warnings = [record.getMessage() for record in caplog.records if "incomplete" in record.getMessage()]
        assert len(warnings) == 1 and all(
            text.isprintable() and "pwned" in text for text in warnings + [str(info.value)]
        )

    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    @responses.activate
    def test_redirect_is_not_followed(self, status: int) -> None:
        elsewhere = "http://127.0.0.1:8100/elsewhere"
        responses.put(SUP, status=status, headers={"Location": elsewhere})
        responses.get(elsewhere, **answer(200))
        responses.put(elsewhere, **answer(200))
        r = registrar(FakeClock(), required=True)
        with pytest.raises(RegistrationError, match=f"HTTP {status} redirect to {elsewhere}, not followed: set API_"):
            r.register_all()
        assert [c.request.url for c in responses.calls] == [SUP] and not r.supervisors[0].is_registered

    @pytest.mark.parametrize(
        "content",
        [
            b"<html>welcome to nginx</html>",
            b"",
            b'{"ok": true}',
            b'["127.0.0.1:9001"]',
            b'"127.0.0.1:9001"',
            b'{"id": "10.0.0.9:9001", "host": "10.0.0.9", "port": 9001}',
            b'{"id": "127.0.0.1:9001", "host": "127.0.0.1", "port": 9002}',
            b'{"id": "127.0.0.1:9001"}',
            b"[" * 60_000,  # deeper than json can parse, within the 64 KiB read
        ],
    )
    @responses.activate
    def test_only_its_own_entry_counts_as_registered(self, content: bytes) -> None:
        responses.put(SUP, status=200, body=content)
        r = registrar(FakeClock(), required=True)
        with pytest.raises(RegistrationError) as info:
            r.register_all()
        assert str(info.value).endswith(
            "answered 200 but not with this worker's entry: is API_REGISTER_PATH a PicoAPI supervisor's /register URL?"
        )
        assert "nginx" not in str(info.value) and not r.supervisors[0].is_registered

    @pytest.mark.parametrize(
        ("answer", "error"),
        [(trickled_head, "timed out"), (trickled_body, "timed out"), (flood, "too large")],
        ids=["trickled head", "trickled body", "400 MB"],
    )
    def test_startup_is_bounded_from_connect_to_last_byte(self, answer: Any, error: str) -> None:
        with raw_supervisor(answer) as url:
            r = Registrar((url,), worker_config().registration(), timeout=1.0, required=True)
            started = time.monotonic()
            with pytest.raises(RegistrationError, match=error) as info:
                r.register_all()
            elapsed = time.monotonic() - started
        assert elapsed < 1.5 and not r.supervisors[0].is_registered
        assert "pwned" not in str(info.value)

    def test_https_supervisor_registers_and_is_cut_too(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        import ssl

        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
            + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # requests trusts it, as an operator's CA bundle
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = socket.create_server(("127.0.0.1", 0))
        entry = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(ENTRY), ENTRY)

        def serve() -> None:
            for answer in (lambda tls: tls.sendall(entry), lambda tls: trickle(tls, entry)):
                conn, _ = server.accept()
                with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                    read_request(tls)
                    answer(tls)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        url = f"https://127.0.0.1:{server.getsockname()[1]}/register"
        try:
            answered = Registrar((url,), worker_config().registration(), timeout=1.0, required=True)
            answered.register_all()
            trickled = Registrar((url,), worker_config().registration(), timeout=1.0, required=True)
            started = time.monotonic()
            with pytest.raises(RegistrationError, match="timed out"):
                trickled.register_all()
            elapsed = time.monotonic() - started
        finally:
            thread.join(5)
            server.close()
        assert answered.supervisors[0].is_registered and elapsed < 1.5

    @responses.activate
    def test_several_supervisors_are_joined_within_the_deadline(self, caplog: Any) -> None:
        responses.put(SUP2, **answer())
        release = threading.Event()
        r = Registrar((SUP, SUP2), worker_config().registration(), timeout=0.5)
        attempt = r._attempt

        def hang_on_the_first(sup: Any, timeout: float) -> float:  # where no cut reaches: a slow DNS lookup
            return time.monotonic() if sup.url == SUP and release.wait(5) else attempt(sup, timeout)  # due now

        r._attempt = hang_on_the_first  # type: ignore[method-assign]
        started = time.monotonic()
        try:
            r.register_all()
        finally:
            release.set()
        assert time.monotonic() - started < 1.25
        assert [s.is_registered for s in r.supervisors] == [False, True]
        assert f"{SUP}: no answer within 0.5s" in caplog.text

    def test_stop_cuts_the_put_in_flight_before_the_delete(self) -> None:
        puts: list[socket.socket] = []
        held, done = threading.Event(), threading.Event()
        deletes: list[str] = []

        def is_open(conn: socket.socket) -> bool:
            try:
                while conn.recv(65536, socket.MSG_DONTWAIT):
                    pass  # the rest of the PUT, if it came in two parts
            except BlockingIOError:
                return True  # nothing more to read, and no end either
            except OSError:
                pass  # reset: cut too
            return False

        def answer(request: bytes, conn: socket.socket) -> None:
            if request.startswith(b"DELETE"):
                deletes.append("while a PUT was in flight" if is_open(puts[-1]) else "after the PUT was cut")
                conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            elif not puts:
                puts.append(conn)
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(ENTRY), ENTRY))
            else:  # the watchdog's second PUT: held for 5 s, as a supervisor stuck in its store would
                puts.append(conn)
                held.set()
                done.wait(5)

        with raw_supervisor(answer) as url:
            r = Registrar((url,), worker_config(health_interval=1).registration(), watchdog_after=0.2)
            r.register_all()
            r.start()  # no checks arrive: it registers again after 0.2 s
            try:
                assert held.wait(5), "the second PUT never came"
                started = time.monotonic()
                r.deregister_all()
                elapsed = time.monotonic() - started
            finally:
                done.set()
        assert deletes == ["after the PUT was cut"] and elapsed < 2.0, (deletes, elapsed)
        assert not [name for name in picoapi_threads() if "regist" in name]

    @responses.activate
    def test_deregister_all_keeps_time_by_the_injected_clock(self) -> None:
        release = threading.Event()
        responses.put(SUP, **answer())
        responses.add_callback(
            responses.DELETE, SUP + "/127.0.0.1%3A9001", lambda _: (release.wait(5), 204, {}, "")[1:]
        )
        now = [0.0]

        def clock() -> float:  # every reading 10 s on: the deadline has passed at once
            now[0] += 10
            return now[0]

        r = Registrar((SUP,), worker_config().registration(), clock=clock)
        r.register_all()
        started = time.monotonic()
        try:
            r.deregister_all()
        finally:
            elapsed = time.monotonic() - started
            release.set()
            wait_for(lambda: "picoapi-deregister" not in picoapi_threads(), 5, "the DELETE to end")
        assert elapsed < 0.5


SERVICE = "http://127.0.0.1:8100/services/127.0.0.1%3A9001"
HEALTH = "http://127.0.0.1:9001/health"
SELF_CHECK_FIX = (
    ": the server binds another port or address; pass --port 9001 to uvicorn (picoapi worker binds API_PORT itself), "
    "or set API_PORT and API_HOST to where it listens"
)


def process_registrar(clock: FakeClock, wall: float = 5000.0, **kwargs: Any) -> Registrar:
    """A registrar for process 'p1', interval 1 s (a silent supervisor is asked after 3 s), the wall at ``wall``."""
    body = {**worker_config(health_interval=1).registration(), "instance": "p1"}
    return Registrar((SUP,), body, clock=clock, sleep=clock.sleep, rand=lambda: 1.0, wall=lambda: wall, **kwargs)


def service_entry(**fields: Any) -> dict[str, Any]:
    """GET /services/{id} as a supervisor answers it for the worker of ``worker_config()``."""
    return {"id": "127.0.0.1:9001", "host": "127.0.0.1", "port": 9001, "name": "orders", "version": "0.0.1", **fields}


class TestWorkerIdentity:
    """Each worker process has an id: it registers, answers and leaves as itself; only its own supervisors' checks
    keep it from asking again; a 409 ends its startup; it says so when its registered address reaches another."""

    @responses.activate
    def test_a_process_registers_answers_and_leaves_as_itself(self) -> None:
        responses.put(SUP, **answer())
        responses.delete(SUP + "/127.0.0.1%3A9001", status=204)
        app = PicoAPI(config=worker_config())
        built = app.instance
        with TestClient(app) as client:
            instance = app.instance
            sent = json.loads(responses.calls[0].request.body)
            assert sent["instance"] == instance != built  # anew at startup: processes forked after import differ
            Registration.model_validate(sent)  # the supervisor takes it
            # a header that is not UTF-8 (a prober's, an attacker's) is no 500
            health = client.get("/health", headers={"X-PicoAPI-Supervisor": b"\xe9t\xe9"})
            assert health.status_code == 200 and health.headers["X-PicoAPI-Instance"] == instance
            # as registered, so that a sibling process knows it (FastAPI's own default version is 0.1.0)
            said = health.json()
            assert (said["name"], said["version"]) == (sent["name"], sent["version"]) == ("orders", "0.0.1")
        assert responses.calls[-1].request.method == "DELETE"
        assert responses.calls[-1].request.url == f"{SUP}/127.0.0.1%3A9001?instance={instance}"
        assert PicoAPI(config=worker_config()).instance != instance

    def test_a_health_route_of_the_users_own_says_who_answered_too(self) -> None:
        app = PicoAPI(env_file=None)

        @app.get("/health")
        def mine() -> dict[str, bool]:
            return {"ok": True}

        with TestClient(app) as client:
            health = client.get("/health")
            assert health.json() == {"ok": True} and health.headers["X-PicoAPI-Instance"] == app.instance
            assert "X-PicoAPI-Instance" not in client.get("/docs").headers

    @pytest.mark.parametrize("required", [False, True])
    @responses.activate
    def test_409_fails_startup_whatever_register_required_says(self, required: bool) -> None:
        detail = "127.0.0.1:9001 is served by another live instance (billing\x1b]0;pwned\x07 2.0); stop it first"
        responses.put(SUP, status=409, json={"detail": detail})
        responses.delete(SUP + "/127.0.0.1%3A9001", status=409)  # another process registered it: it stays
        app = PicoAPI(config=worker_config(register_required=required))
        with pytest.raises(RegistrationError) as info, TestClient(app):
            pass
        assert str(info.value) == (
            f"127.0.0.1:9001 is served by another live instance; {SUP} refused this one: HTTP 409: 127.0.0.1:9001 is "
            "served by another live instance (billing\\x1b]0;pwned\\x07 2.0); stop it first"
        )
        assert [c.request.method for c in responses.calls] == ["PUT", "DELETE"]  # never retried

    @responses.activate
    def test_409_from_one_supervisor_leaves_the_others_too(self) -> None:
        responses.put(SUP, **answer())
        responses.put(SUP2, status=409, json={"detail": "served"})
        deletes = [responses.delete(url + "/127.0.0.1%3A9001", status=204) for url in (SUP, SUP2)]
        app = PicoAPI(config=worker_config(register_urls=f"{SUP}!{SUP2}"))
        served = f"^127.0.0.1:9001 is served by another live instance; {SUP2} refused this one: HTTP 409: served$"
        with pytest.raises(RegistrationError, match=served), TestClient(app):
            pass
        assert [d.call_count for d in deletes] == [1, 1]  # the supervisor that took it keeps nothing

    @responses.activate
    def test_only_its_own_supervisors_checks_count(self, caplog: Any) -> None:
        responses.put(SUP, **answer())
        responses.get(SERVICE, status=404, json={"detail": "no worker with id '127.0.0.1:9001'"})
        clock = FakeClock()
        r = process_registrar(clock)
        r.register_all()
        for _ in range(10):  # a load balancer's liveness probe: no supervisor header
            clock.advance(1)
            r.note_check(None)
            r.step()
        assert [c.request.method for c in responses.calls] == ["PUT", "GET", "PUT", "GET", "PUT"]
        assert caplog.text.count(f"{SUP} no longer knows this worker process; registering again") == 2

    @responses.activate
    def test_a_process_its_supervisors_checks_miss_asks_and_stays_quiet(self, caplog: Any) -> None:
        responses.put(SUP, **answer())
        asked = responses.get(SERVICE, json=service_entry(last_check=4999.5))
        clock = FakeClock()
        r = process_registrar(clock, wall=5000.0)
        r.register_all()
        caplog.set_level(logging.DEBUG, "picoapi")
        caplog.clear()
        for _ in range(30):  # ten watchdog periods; a sibling process gets every check
            clock.advance(1)
            r.step()
        assert [c.request.method for c in responses.calls].count("PUT") == 1 and asked.call_count == 7
        assert caplog.records == [] and r.supervisors[0].is_registered

    @responses.activate
    def test_recent_by_the_supervisors_own_clock_and_asked_without_the_token(self) -> None:
        responses.put(SUP, **answer())
        date = picoapi.email.utils.formatdate(1_000_000.4, usegmt=True)  # whole seconds: 1,000,000
        responses.get(SERVICE, json=service_entry(last_check=1_000_000.9), headers={"Date": date})
        clock = FakeClock()
        r = process_registrar(clock, wall=1_000_000.0 + 3600, token="s3cret")  # our clock an hour ahead
        r.register_all()
        clock.advance(3.5)
        r.step()
        assert [c.request.method for c in responses.calls] == ["PUT", "GET"]
        assert "Authorization" not in responses.calls[1].request.headers

    @responses.activate
    def test_checks_from_a_supervisor_it_does_not_know_mean_it_restarted(self, caplog: Any) -> None:
        responses.put(SUP, **answer())
        responses.get(SERVICE, json=service_entry(last_check=4999.5))  # a sibling registered the entry again
        clock = FakeClock()
        r = process_registrar(clock, wall=5000.0)
        r.register_all()
        responses.replace(responses.PUT, SUP, **answer(**{"X-PicoAPI-Supervisor": "sup2"}))
        clock.advance(2)
        r.note_check("sup2")  # the restarted supervisor's check, counted against this process: it must join
        clock.advance(1.5)
        r.step()
        assert [c.request.method for c in responses.calls] == ["PUT", "PUT"]
        assert r.supervisors[0].identity == "sup2" and "no longer knows this worker process" in caplog.text
        for _ in range(10):
            clock.advance(1)
            r.note_check("sup2")
            r.step()
        assert len(responses.calls) == 2  # its checks count again

    @pytest.mark.parametrize(
        "said",
        [
            pytest.param({"status": 404, "json": {"detail": "no worker with id"}}, id="forgot it"),
            pytest.param({"json": service_entry(last_check=4996.5)}, id="checks it no more"),
            pytest.param({"json": service_entry(last_check=None)}, id="never checked it"),
            pytest.param({"json": service_entry(last_check="4999.5")}, id="not a number"),
            pytest.param({"json": service_entry(name="billing", last_check=4999.5)}, id="another service's"),
            pytest.param({"json": service_entry(version="2.0", last_check=4999.5)}, id="another version's"),
            pytest.param({"json": [service_entry(last_check=4999.5)]}, id="a list"),
            pytest.param({"body": "<html>welcome to nginx\x1b[2J</html>"}, id="not a supervisor"),
            pytest.param({"status": 302, "headers": {"Location": SERVICE + "/x"}}, id="a redirect"),
            pytest.param({"body": requests.ConnectionError("down")}, id="down"),
        ],
    )
    @responses.activate
    def test_registers_again_with_a_warning_when_its_supervisor_does_not_check_it(
        self, said: dict[str, Any], caplog: Any
    ) -> None:
        responses.put(SUP, **answer())
        responses.get(SERVICE, **said)
        responses.get(SERVICE + "/x", json=service_entry(last_check=4999.5))
        clock = FakeClock()
        r = process_registrar(clock, wall=5000.0)
        r.register_all()
        clock.advance(3.5)
        r.step()
        assert [c.request.method for c in responses.calls] == ["PUT", "GET", "PUT"]
        assert f"{SUP} no longer knows this worker process; registering again" in caplog.text
        assert all(record.getMessage().isprintable() for record in caplog.records)

    def test_the_question_is_bounded_in_total(self) -> None:
        def answer(request: bytes, conn: socket.socket) -> None:
            if request.startswith(b"GET"):
                trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n" + b"x" * 900)
            else:
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(ENTRY), ENTRY))

        with raw_supervisor(answer) as url:
            body = {**worker_config(health_interval=1).registration(), "instance": "p1"}
            r = Registrar((url,), body, watchdog_after=0.3)
            r.register_all()
            r.supervisors[0].last_seen -= 1  # no check for a second
            started = time.monotonic()
            r.step()
            elapsed = time.monotonic() - started
        assert elapsed < 1.0 and r.supervisors[0].is_registered  # the GET cut after 0.3 s, then registered again

    @pytest.mark.parametrize(
        ("said", "found"),
        [
            (
                {"json": {"status": "healthy", "name": "billing\x1b[2J", "version": "2.0"}},
                "another service ('billing\\x1b[2J 2.0') answers there",
            ),
            ({"json": {"name": "orders", "version": "9.9"}}, "another service ('orders 9.9') answers there"),
            (
                {"status": 404, "body": "<html>welcome to nginx</html>"},
                "something else answers there (HTTP 404, not a PicoAPI health endpoint)",
            ),
            ({"body": requests.ConnectionError("refused")}, "nothing answers there (ConnectionError: refused)"),
            ({"json": {"name": "orders", "version": "0.0.1"}, "headers": {"X-PicoAPI-Instance": "p2"}}, None),
            ({"status": 503, "json": {"status": "unhealthy", "name": "orders", "version": "0.0.1"}}, None),
            ({"json": {"ok": True}, "headers": {"X-PicoAPI-Instance": "p1"}}, None),
            ({"json": {"ok": True}, "headers": {"X-PicoAPI-Instance": "p2"}}, None),
        ],
        ids=[
            "another service",
            "another version",
            "not PicoAPI",
            "nothing",
            "a sibling",
            "itself, failing a check of its own",
            "itself, through a route of its own",
            "a PicoAPI process through a route of its own",
        ],
    )
    @responses.activate
    def test_self_check_says_who_answers_where_it_registered(
        self, said: dict[str, Any], found: str | None, caplog: Any
    ) -> None:
        responses.get(HEALTH, **said)
        process_registrar(FakeClock()).check_self()
        assert "Authorization" not in responses.calls[0].request.headers
        errors = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
        assert errors == (
            [] if found is None else [("ERROR", f"registered 127.0.0.1:9001 but {found}{SELF_CHECK_FIX}")]
        )

    def test_self_check_runs_once_after_startup_and_never_holds_shutdown(self, caplog: Any) -> None:
        port = free_port()  # nothing listens there
        body = {**worker_config(port=port, health_interval=0.2).registration(), "instance": "p1"}
        r = Registrar((f"http://127.0.0.1:{free_port()}/register",), body)
        r.start()
        try:
            wait_for(lambda: "nothing answers there" in caplog.text, 5, "the self-check's ERROR")
        finally:
            r.stop()
        assert f"registered 127.0.0.1:{port} but nothing answers there (ConnectionRefusedError: " in caplog.text
        assert f"pass --port {port} to uvicorn" in caplog.text
        silent = socket.create_server(("127.0.0.1", 0))  # connects, never answers
        with silent:
            body = {**worker_config(port=silent.getsockname()[1], health_interval=60).registration(), "instance": "p1"}
            r = Registrar((SUP,), body)
            checking = threading.Thread(target=r.check_self)
            checking.start()
            wait_for(lambda: r._in_flight, 5, "the self-check's GET")
            started = time.monotonic()
            caplog.clear()
            r.stop()
            checking.join(5)
        assert time.monotonic() - started < 0.5 and caplog.records == []  # cut: nothing to report
        r = Registrar((SUP,), body)
        r.start()
        r.stop()
        wait_for(lambda: "picoapi-self-check" not in picoapi_threads(), 2, "the cancelled timer to end")


# -- End to end: real processes on 127.0.0.1 ---------------------------------------------

WORKER_MODULE = """
from picoapi import PicoAPI

app = PicoAPI()

@app.get("/echo")
def echo(text: str) -> dict:
    return {"echo": text}
"""


def listens(pid: int, port: int) -> bool:
    """True when process ``pid`` itself holds the socket listening on ``port`` (Linux: /proc)."""
    with contextlib.suppress(OSError):
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        inodes = {f"socket:[{r[9]}]" for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port}
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


class Child(subprocess.Popen):  # type: ignore[type-arg]
    """A process a test started: the port it serves on and its log, shown if the test fails."""

    port: int
    log: Any


def serve(
    args: Callable[[int], list[str]],
    env: dict[str, str] | Callable[[int], dict[str, str]],
    log: Any,
    cwd: Any,
    port: int | None = None,
    module: str = "picoapi",
    **popen: Any,
) -> Child:
    """Start ``python -m <module> *args(port)`` (in ``env(port)`` if a function) and return once that very
    process listens on the port.

    A port picked before the child binds it can be taken meanwhile: with no fixed ``port``
    a child that lost the race is started again on another one. Its log is shown if the test fails.
    """
    for _ in range(5):
        chosen = port or free_port()
        out = open(log, "ab")  # noqa: SIM115 - the child keeps it
        environ = env(chosen) if callable(env) else env
        proc = Child(
            [sys.executable, "-m", module, *args(chosen)], cwd=cwd, env=environ, stdout=out, stderr=out, **popen
        )
        out.close()
        proc.port, proc.log = chosen, log
        CHILD_LOGS.append(log)
        deadline = time.monotonic() + 20
        while not listens(proc.pid, chosen):
            if proc.poll() is not None:
                if port is None and "address already in use" in log.read_text(errors="replace"):
                    break  # lost the race for the port: another try on another port
                raise AssertionError(f"{args(chosen)} exited with {proc.returncode}; its log is shown below")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{args(chosen)} did not listen on {chosen} within 20 s")
            time.sleep(0.05)
        else:
            return proc
    raise AssertionError("lost the race for a free port five times")


#: Logs of the processes the running test started; conftest.py shows them when it fails.
CHILD_LOGS: list[Any] = []


class Cluster:
    """Starts supervisor and worker processes; :meth:`close` stops every one."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp = tmp_path
        (tmp_path / "echo_worker.py").write_text(WORKER_MODULE)
        self.procs: list[Child] = []
        self.sup_port: int | None = None
        self.url = ""

    def _start(
        self,
        args: Callable[[int], list[str]],
        env: dict[str, str] | Callable[[int], dict[str, str]],
        port: int | None,
        module: str = "picoapi",
    ) -> Child:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("API_")}

        def environ(port: int) -> dict[str, str]:
            return {**clean, "PYTHONPATH": HERE, **(env(port) if callable(env) else env)}

        proc = serve(args, environ, self.tmp / f"proc{len(self.procs)}.log", self.tmp, port, module)
        self.procs.append(proc)
        return proc

    def supervisor(self, **env: str) -> Child:
        """Start the supervisor: on a free port the first time, on the same port when restarted."""
        proc = self._start(lambda port: ["supervisor", "--bind", "127.0.0.1", "--port", str(port)], env, self.sup_port)
        self.sup_port, self.url = proc.port, f"http://127.0.0.1:{proc.port}"
        wait_for(lambda: requests.get(self.url + "/health", timeout=0.5).ok, 15, "the supervisor's /health")
        return proc

    def worker(self, port: int | None = None, interval: float = 0.2, **env: str) -> Child:
        """Start an echo worker (on a free port unless given); returns once it listens."""
        return self._start(
            lambda p: ["worker", "echo_worker:app", "--port", str(p)], self.settings(interval, env), port
        )

    def settings(self, interval: float, env: dict[str, str]) -> dict[str, str]:
        """An echo worker's environment."""
        if self.sup_port is None:  # the worker may start first: its supervisor's port is chosen now
            self.sup_port = free_port()
            self.url = f"http://127.0.0.1:{self.sup_port}"
        return {
            "API_HOST": "127.0.0.1",
            "API_BIND": "127.0.0.1",
            "API_TITLE": "echo",
            "API_TAGS": "echo",
            "API_REGISTER_PATH": self.url + "/register",
            "API_HEALTH_INTERVAL": str(interval),
            "API_REGISTER_TIMEOUT": "0.5",
            **env,
        }

    def services(self) -> list[dict[str, Any]]:
        return list(requests.get(self.url + "/services", timeout=1).json())

    def status(self, wid: str) -> str | None:
        found = [s["status"] for s in self.services() if s["id"] == wid]
        return found[0] if found else None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("proc*.log")))


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


class TestEndToEnd:
    def test_worker_started_first_registers_when_supervisor_comes_up(self, cluster: Cluster) -> None:
        port = cluster.worker().port
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=0.5).ok, 15, "the worker")
        cluster.supervisor()
        wait_for(lambda: cluster.status(f"127.0.0.1:{port}") == "healthy", 20, "the worker's registration")

    def test_restarted_supervisor_gets_worker_back(self, cluster: Cluster) -> None:
        sup = cluster.supervisor()
        port = cluster.worker().port
        wid = f"127.0.0.1:{port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration")
        sup.kill()
        sup.wait(5)
        cluster.supervisor()  # starts empty (it may already have the worker back by the time it answers)
        # the worker hears no check for 3 intervals (0.6 s), finds itself forgotten, and registers again
        wait_for(lambda: cluster.status(wid) == "healthy", 10, "re-registration")
        wait_for(lambda: "no longer knows this worker process; registering again" in cluster.logs(), 5, "its warning")

    def test_sigterm_deregisters_at_once(self, cluster: Cluster) -> None:
        cluster.supervisor()
        worker = cluster.worker(interval=60)
        port = worker.port
        wid = f"127.0.0.1:{port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration")
        worker.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM for its parent to see
        assert worker.wait(5) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in cluster.logs()
        assert cluster.status(wid) is None

    def test_killed_worker_turns_unhealthy_then_recovers(self, cluster: Cluster) -> None:
        cluster.supervisor()
        worker = cluster.worker()
        port = worker.port
        wid = f"127.0.0.1:{port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration")
        worker.kill()
        worker.wait(5)
        killed = time.monotonic()
        wait_for(lambda: cluster.status(wid) == "unhealthy", 10, "detection")
        # documented bound: interval + timeout + confirm delay + timeout = 0.65 s; generous slack for CI
        assert time.monotonic() - killed < 0.65 + 2.0
        cluster.worker(port)
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "recovery")

    def test_silent_worker_does_not_delay_others(self, cluster: Cluster) -> None:
        cluster.supervisor()
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        silent_port = silent.getsockname()[1]
        try:
            requests.put(
                cluster.url + "/register", json=body(port=silent_port, interval=0.2), timeout=2
            ).raise_for_status()
            port = cluster.worker().port
            wid = f"127.0.0.1:{port}"
            wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration")
            wait_for(lambda: cluster.status(f"127.0.0.1:{silent_port}") == "unhealthy", 10, "the silent one marked")
            first = next(s for s in cluster.services() if s["id"] == wid)["successes"]
            wait_for(
                lambda: next(s for s in cluster.services() if s["id"] == wid)["successes"] >= first + 5,
                10,
                "five more checks of the answering worker",
            )
        finally:
            silent.close()


def load_app(command: str = "supervisor", env_file: str | None = "supervisor.env", **args: Any) -> PicoAPI:
    """The app ``picoapi COMMAND --env-file ENV_FILE`` would serve; this process's environment left as it was."""
    ns = argparse.Namespace(
        **{"command": command, "app": None, "env_file": env_file, "port": None, "bind": None, **args}
    )
    with mock.patch.dict(os.environ):
        return picoapi._load_app(ns)


class TestCommandLine:
    def test_help_and_version(self) -> None:
        out = subprocess.run([sys.executable, "-m", "picoapi", "--help"], capture_output=True, text=True, cwd=HERE)
        assert out.returncode == 0 and "example:" in out.stdout
        out = subprocess.run([sys.executable, "-m", "picoapi", "--version"], capture_output=True, text=True, cwd=HERE)
        assert out.stdout.strip() == f"picoapi {picoapi.__version__}"

    def test_config_error_is_one_line(self) -> None:
        env = {**os.environ, "API_PORT": "eighty"}
        out = subprocess.run(
            [sys.executable, "-m", "picoapi", "supervisor"], capture_output=True, text=True, cwd=HERE, env=env
        )
        assert out.returncode == 2
        assert out.stderr.strip() == "picoapi: API_PORT must be a whole number from 1 to 65535, got 'eighty'"

    def test_each_side_reads_its_own_env_file_before_the_folders_env(self, cluster: Cluster) -> None:
        cluster.supervisor()
        (cluster.tmp / ".env").write_text("API_TITLE=the-supervisors-title\nAPI_TAGS=wrong\n")  # one folder, two sides
        settings = cluster.settings(0.2, {"API_TITLE": "from-its-file"})
        (cluster.tmp / "worker.env").write_text("".join(f"{var}={value}\n" for var, value in settings.items()))
        args = ["worker", "echo_worker:app", "--env-file", "worker.env", "--port"]
        port = cluster._start(lambda p: [*args, str(p)], {}, None).port
        wait_for(lambda: cluster.status(f"127.0.0.1:{port}") == "healthy", 15, "its registration")
        entry = next(s for s in cluster.services() if s["id"] == f"127.0.0.1:{port}")
        assert (entry["name"], entry["tags"]) == ("from-its-file", ["echo"])
        missing = picoapi_cli("worker", "echo_worker:app", "--env-file", "nowhere.env")
        assert missing.returncode == 2 and missing.stderr == (
            "picoapi: --env-file 'nowhere.env' does not exist; pass the path of an existing file\n"
        )

    def test_an_env_file_is_the_sides_settings_instead_of_dotenv(self) -> None:
        """As PicoAPI(env_file=...): from the worker's folder, nothing of its ./.env reaches the supervisor."""
        with open(".env", "w") as dotenv:
            dotenv.write("API_TITLE=resizer\nAPI_TAGS=resize\nAPI_HEALTH_PATH=/hc\n")
        with open("supervisor.env", "w") as own:
            own.write("API_BIND=127.0.0.1\nAPI_PORT=8100\n")
        app = load_app()
        assert (app.title, app.config.health_path, app.config.tags) == ("PicoAPI supervisor", "/health", ())
        assert (app.config.bind, app.config.port) == ("127.0.0.1", 8100)

    def test_an_env_file_wins_over_a_blank_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An exported but empty variable counts as unset, as for ./.env: the file's value holds."""
        with open("supervisor.env", "w") as own:
            own.write("API_TITLE=from-env-file\nAPI_BIND=127.0.0.1\n")
        monkeypatch.setenv("API_TITLE", "")
        assert load_app().title == "from-env-file"

    @pytest.mark.parametrize(
        "content", [b"API_TITLE=caf\xe9\n", b"API_TITLE=ok\nAPI_TAGS=a\x00b\n", None], ids=["latin-1", "nul", "dir"]
    )
    def test_an_unreadable_env_file_is_one_line_naming_it(self, capsys: Any, content: bytes | None) -> None:
        if content is None:
            os.mkdir("supervisor.env")
        else:
            with open("supervisor.env", "wb") as own:
                own.write(content)
        with pytest.raises(ConfigError, match="^cannot read the settings file 'supervisor.env' .*save it as UTF-8"):
            PicoAPI(env_file="supervisor.env")
        with mock.patch.dict(os.environ), mock.patch("uvicorn.run") as run:
            assert picoapi.main(["supervisor", "--env-file", "supervisor.env", "--bind", "127.0.0.1"]) == 2
        err = capsys.readouterr().err
        assert not run.called and "'supervisor.env'" in err and len(err.splitlines()) == 1

    def test_the_demo_worker_with_another_title_is_one_line(self, capsys: Any) -> None:
        with mock.patch.dict(os.environ, {"API_HOST": "127.0.0.1", "API_TITLE": "resizer"}), mock.patch("uvicorn.run"):
            assert picoapi.main(["worker", "picoapi_demo:worker", "--bind", "127.0.0.1", "--port", "8001"]) == 2
        assert capsys.readouterr().err == (
            "picoapi: API_TITLE must name one of the demo's workers (upper, reverse, count), got 'resizer'\n"
        )

    @pytest.mark.parametrize("port", [0, 65536])
    def test_a_bad_port_is_refused_not_ignored(self, port: int) -> None:
        with open("supervisor.env", "w") as own:
            own.write("API_BIND=127.0.0.1\nAPI_PORT=8100\n")
        with pytest.raises(ConfigError, match=f"^--port must be from 1 to 65535, got {port}$"):
            load_app(port=port)

    def test_the_examples_in_help_run_as_written(self, tmp_path: Any) -> None:
        """``picoapi`` on the PATH, as after ``. .venv/bin/activate``; the examples use ports 8100 and 8001."""
        examples = {}
        for command in ("supervisor", "worker", "status"):
            found = re.search(r"example: (.*)", " ".join(picoapi_cli(command, "--help").stdout.split()))
            assert found, command
            examples[command] = found[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        env["PATH"] = f"{venv_shims(tmp_path)}{os.pathsep}{env['PATH']}"
        servers = []
        try:
            for command in ("supervisor", "worker"):
                log = tmp_path / f"{command}.log"
                CHILD_LOGS.append(log)
                with open(log, "ab") as out:
                    servers.append(
                        subprocess.Popen(
                            ["bash", "-c", examples[command]],
                            cwd=tmp_path,
                            env=env,
                            stdout=out,
                            stderr=out,
                            start_new_session=True,
                        )
                    )
            healthy = "http://127.0.0.1:8100/services?status=healthy"
            wait_for(lambda: requests.get(healthy, timeout=1).json(), 20, "the worker of the example, healthy")
            out = subprocess.run(
                ["bash", "-c", examples["status"]], cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[1].split()[:5] == [
                "127.0.0.1:8001",
                "upper",
                "0.0.1",
                "text,upper",
                "healthy",
            ]
            assert out.stdout.endswith("\n1 worker: 1 healthy\n")
        finally:
            for server in servers:
                os.killpg(server.pid, signal.SIGTERM)
            for server in servers:
                server.wait(10)


class TestDemo:
    @pytest.mark.parametrize("flags", [["--pace", "nan"], ["--pace", "-1"], ["--interval", "0"], ["--interval", "inf"]])
    def test_bad_pace_or_interval_is_one_line_before_anything_starts(
        self, flags: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert picoapi.main(["demo", *flags]) == 2
        err = capsys.readouterr().err
        assert "--interval must be 0.05 to 86400 seconds and --pace 0 to 3600" in err and len(err.splitlines()) == 1

    def test_demo_runs_end_to_end_vendored_and_leaves_nothing(self, tmp_path: Any) -> None:
        """picoapi.py and picoapi_demo.py copied into a project, in a venv with the dependencies but no picoapi."""
        project, temp = tmp_path / "project", tmp_path / "tmp"
        project.mkdir()
        temp.mkdir()
        shutil.copy(os.path.join(HERE, "picoapi.py"), project)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)
        python = str(tmp_path / "venv" / "bin" / "python")
        site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True)
        # Our dependencies as a plain path: the .pth files there (our editable install of picoapi) are not run.
        with open(os.path.join(site.stdout.decode().strip(), "deps.pth"), "w") as pth:
            pth.write(sysconfig.get_paths()["purelib"] + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_") and k != "PYTHONPATH"}
        env["TMPDIR"] = str(temp)
        unvendored = subprocess.run([python, "-c", "import fastapi, picoapi"], cwd=temp, env=env, capture_output=True)
        assert b"No module named 'picoapi'" in unvendored.stderr  # only the copy provides it
        alone = subprocess.run([python, "-m", "picoapi", "demo"], capture_output=True, text=True, cwd=project, env=env)
        assert alone.returncode == 2 and alone.stderr == (
            "picoapi: the demo is in picoapi_demo.py: pip install picoapi, or copy it beside picoapi.py\n"
        )
        shutil.copy(os.path.join(HERE, "picoapi_demo.py"), project)
        out = subprocess.run(
            [python, "-m", "picoapi", "demo", "--interval", "0.3", "--pace", "0"],
            capture_output=True,
            text=True,
            cwd=project,
            env=env,
            timeout=90,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "answered 'HELLO PICOAPI'" in out.stdout
        assert "marked 'reverse' unhealthy after" in out.stdout
        assert "'reverse' is healthy again" in out.stdout
        dashboard = re.search(r"dashboard (http://127\.0\.0\.1:\d+/dashboard)", out.stdout)
        assert dashboard is not None
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out.stdout)}
        assert len(ports) == 4  # the supervisor and three workers
        for port in ports:  # nothing listens any more: every process is gone
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        assert os.listdir(temp) == []  # its directory of settings and logs is gone

    @pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])  # SIGHUP: its terminal closed
    def test_an_interrupted_demo_leaves_nothing_either(self, tmp_path: Any, stop: signal.Signals) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        env["TMPDIR"] = str(tmp_path)
        demo = subprocess.Popen(
            [sys.executable, "-m", "picoapi", "demo", "--interval", "0.3", "--pace", "30"],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        said: list[str] = []
        threading.Thread(target=lambda: said.extend(demo.stdout or ()), daemon=True).start()

        def registered() -> bool:
            return sum("registered:" in line for line in said) == 3

        try:
            wait_for(lambda: registered() or demo.poll() is not None, 60, "the demo's registrations")
            assert registered(), "".join(said)
            assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]
            assert next(tmp_path.iterdir()).name.startswith("picoapi-demo-")
            demo.send_signal(stop)
            assert demo.wait(15) == 130
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
        wait_for(lambda: "interrupted: stopped everything\n" in "".join(said[-1:]), 5, "its last word")
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "".join(said))}
        assert len(ports) == 4
        for port in ports:
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        assert list(tmp_path.iterdir()) == []

    def test_no_healthy_worker_is_one_line_not_a_traceback(self, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
        """A check can fail on a busy machine just before a task: the demo waits, then says so in one line."""

        class Started:  # a process that runs until it is stopped
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.returncode: int | None = None

            def poll(self) -> int | None:
                return self.returncode

            def terminate(self) -> None:
                self.returncode = -15

            kill = terminate

            def wait(self, timeout: float | None = None) -> int | None:
                return self.returncode

        monkeypatch.setattr(subprocess, "Popen", Started)
        registered = [status_entry(f"127.0.0.1:{i}", name=name, tags=["text", name]) for i, name in enumerate("abc")]

        def services(request: Any) -> tuple[int, dict[str, str], str]:
            tags = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)["tag"]
            unhealthy = len(tags) == 2  # registered, but every check failing by the time of a task
            return 200, {}, json.dumps([{**e, "status": "unhealthy"} if unhealthy else e for e in registered])

        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.add_callback(responses.GET, re.compile(r"http://127\.0\.0\.1:\d+/services"), callback=services)
            started = time.monotonic()
            assert picoapi.main(["demo", "--interval", "0.05", "--pace", "0"]) == 1
        assert time.monotonic() - started < 10  # a deadline, not a hang
        err = capsys.readouterr().err
        assert err == "picoapi: timed out waiting for 1 healthy worker tagged text and upper\n"
        assert len(err.splitlines()) == 1


class TestExample:
    def test_example_system_runs_as_the_readme_says(self, tmp_path: Any) -> None:
        """examples/: a supervisor with POST /jobs and two kinds of worker, as real processes."""
        os.symlink(os.path.join(HERE, "examples"), tmp_path / "examples")  # run from a root with no .env
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        env["PYTHONPATH"] = HERE
        procs: list[Child] = []
        try:
            sup = ["supervisor", "examples.supervisor:app", "--env-file", "examples/supervisor.env", "--port"]
            procs.append(serve(lambda p: [*sup, str(p)], env, tmp_path / "sup.log", tmp_path))
            url = f"http://127.0.0.1:{procs[0].port}"
            env["API_REGISTER_PATH"] = url + "/register"  # the environment wins over the --env-file
            for name in ("resizer", "reader"):
                procs.append(
                    serve(
                        lambda p, n=name: [
                            "worker",
                            f"examples.{n}:app",
                            "--env-file",
                            "examples/worker.env",
                            "--port",
                            str(p),
                        ],
                        env,
                        tmp_path / f"{name}.log",
                        tmp_path,
                    )
                )
            resize_port, ocr_port = procs[1].port, procs[2].port
            healthy = url + "/services?tag=image&status=healthy"
            wait_for(lambda: len(requests.get(healthy, timeout=1).json()) == 2, 20, "two healthy workers")
            jobs = [
                {"kind": "resize", "payload": {"width": 640, "height": 480, "scale": 0.5}},
                {"kind": "ocr", "payload": {"image": "HELLO PICOAPI"}},
            ]
            resize, ocr = (requests.post(url + "/jobs", json=job, timeout=5).json() for job in jobs)
            assert resize == {
                "kind": "resize",
                "worker": f"127.0.0.1:{resize_port}",
                "result": {"width": 320, "height": 240},
            }
            assert ocr["worker"] == f"127.0.0.1:{ocr_port}" and ocr["result"] == {"text": "hello picoapi", "words": 2}
            missing = requests.post(url + "/jobs", json={"kind": "translate", "payload": {}}, timeout=5)
            assert missing.status_code == 503 and missing.json()["tags"] == ["translate"]
            spec = requests.get(f"{url}/services/127.0.0.1:{resize_port}/openapi", timeout=5).json()
            assert list(spec["paths"]) == ["/resize"]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def venv_shims(root: Any) -> Any:
    """``root/.venv/bin`` as the quickstart leaves it: ``picoapi`` and ``python`` run this checkout's module."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, command in (("picoapi", f"{sys.executable} -m picoapi"), ("python", sys.executable)):
        (bin_dir / name).write_text(f'#!/bin/sh\nPYTHONPATH="{HERE}" exec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def readme_blocks(text: str) -> list[tuple[str, str | None]]:
    """The README's ```sh blocks in order, each with the ```text block right after it (the output it shows) or None."""
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL))
    found = []
    for block, after in zip(blocks, [*blocks[1:], None], strict=True):
        if block[1] == "sh":
            shown = after is not None and after[1] == "text" and not text[block.end() : after.start()].strip()
            found.append((block[2], after[2] if shown and after else None))
    return found


def comparable(output: str) -> list[str]:
    """Output lines as the README shows them: times and latencies (decimals) vary, and so does the space around them."""
    return [" ".join(re.sub(r"\d+\.\d+", "N", line).split()) for line in output.strip().splitlines()]


class TestReadme:
    def test_every_sh_block_runs_as_written_with_the_output_shown(self, tmp_path: Any) -> None:
        """After the quickstart, from the root, in one shell as a reader would: blocks ending in ``&`` start servers,
        which the shell's process group takes down at the end; only 127.0.0.1 is reached."""
        with open(os.path.join(HERE, "README.md")) as file:
            blocks = readme_blocks(file.read())
        (demo, _), (tests, _) = blocks[:2]
        assert demo.strip().endswith(".venv/bin/picoapi demo")
        with open(os.path.join(HERE, ".ci", "run")) as file:
            assert tests.strip() in file.read().splitlines()  # CI runs the quickstart's test command verbatim
        assert shutil.which("curl"), "the README's commands use curl: install it (.ci/run does)"
        for port in (8100, 8001, 8002):  # the example's fixed ports
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                raise AssertionError(f"port {port}, which the README's example uses, is taken")
        os.symlink(os.path.join(HERE, "examples"), tmp_path / "examples")
        venv_shims(tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
        shell = subprocess.Popen(
            ["bash"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        CHILD_LOGS.extend(sorted(tmp_path.glob("*.log")))
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in shell.stdout or ()], daemon=True).start()
        try:
            for number, (command, shown) in enumerate(blocks[2:], 3):
                assert shell.stdin is not None
                shell.stdin.write(f"{command}\nprintf '\\nblock {number} exited %s\\n' $?\n")
                shell.stdin.flush()
                output, deadline = [], time.monotonic() + 60
                while not (output and output[-1].startswith(f"block {number} exited ")):
                    try:
                        output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
                    except queue.Empty:
                        raise AssertionError(f"sh block {number} still runs after 60 s:\n{command}") from None
                CHILD_LOGS.extend(p for p in sorted(tmp_path.glob("*.log")) if p not in CHILD_LOGS)
                said = "".join(output[:-1])
                assert output[-1] == f"block {number} exited 0\n", f"sh block {number} failed:\n{command}\n{said}"
                if shown is not None:
                    assert comparable(said) == comparable(shown), f"sh block {number}:\n{command}\n{said}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)
            shell.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)


class TestPackaging:
    def test_sdist_and_wheel_build_without_a_warning_and_hold_what_the_readme_names(self, tmp_path: Any) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its warning is the machine's
        command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), HERE]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        said = (out.stdout + out.stderr).splitlines()
        assert [line for line in said if re.search("warn|deprecat", line, re.IGNORECASE)] == []
        name = f"picoapi-{picoapi.__version__}"
        with tarfile.open(tmp_path / f"{name}.tar.gz") as sdist:
            held = {member.removeprefix(f"{name}/") for member in sdist.getnames()}
        modules = {"picoapi.py", "picoapi_demo.py"}  # the module and its demo: in the sdist and in the wheel
        wanted = {"LICENSE", "README.md", ".env.example", "test_picoapi.py", "conftest.py", *modules}
        examples = {f"examples/{f}" for f in os.listdir(os.path.join(HERE, "examples")) if f != "__pycache__"}
        assert wanted | examples <= held
        with zipfile.ZipFile(tmp_path / f"{name}-py3-none-any.whl") as wheel:
            metadata = wheel.read(f"{name}.dist-info/METADATA").decode()
            scripts = wheel.read(f"{name}.dist-info/entry_points.txt").decode()
            assert f"{name}.dist-info/licenses/LICENSE" in wheel.namelist()
            assert modules <= set(wheel.namelist())
        assert picoapi.__version__ == "2.0.0" and "\nVersion: 2.0.0\n" in metadata
        assert "\nLicense-Expression: MIT\n" in metadata and "License ::" not in metadata
        assert "picoapi = picoapi:main" in scripts


# -- Dashboard, status command and a real browser ------------------------------------------


class Rows(HTMLParser):
    """The dashboard's worker rows and status counts, read from its DOM."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.page = page
        self.rows: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, str] = {}
        self._row: dict[str, Any] | None = None
        self._count: str | None = None
        self._in_cell = False
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and found.get("class") == "worker":
            self._row = {"status": found["data-status"], "cells": []}
            self.rows[str(found["data-id"])] = self._row
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
            self._in_cell = True
        elif tag == "a" and found.get("data-count"):
            self._count = found["data-count"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        self._in_cell = self._in_cell and tag != "td"
        self._count = None if tag == "a" else self._count

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._in_cell:
            self._row["cells"][-1] += data
        if self._count:
            self.counts[self._count] = data


def dashboard(client: TestClient, query: str = "") -> Rows:
    response = client.get("/dashboard" + query)
    assert response.status_code == 200, response.text
    return Rows(response.text)


class TestDashboard:
    def test_page_escapes_everything_and_runs_only_its_script(self) -> None:
        app = PicoAPI(mode="supervisor", title="<b>jobs</b>")
        app.registry.register(reg("127.0.0.1", 1, name="<script>alert(1)</script>", tags=["a&b", "'\"x"]))  # type: ignore[union-attr]
        response = TestClient(app).get("/dashboard?tag=a%26b")
        page = response.text
        assert response.headers["content-type"].startswith("text/html")
        assert "<script>alert(1)" not in page and "<b>jobs" not in page and page.count("<script>") == 1
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;jobs&lt;/b&gt;" in page  # as text
        assert 'value="a&amp;b"' in page and "&#39;&quot;x" in page  # attribute values escaped too
        assert Rows(page).rows["127.0.0.1:1"]["cells"][:4] == [
            "<script>alert(1)</script>",
            "127.0.0.1:1",
            "1.2.0",
            "a&b '\"x",
        ]
        assert "innerHTML" not in page and "textContent" in page  # the script puts text in as text, never as markup
        assert 'http-equiv="refresh"' not in page and "setTimeout(update, 2000)" in page  # updates, never reloads
        assert "http://" not in page and "https://" not in page and "src=" not in page  # no external asset
        script = page.split("<script>")[1].split("</script>")[0]
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        policy = response.headers["content-security-policy"]
        assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
        assert "/dashboard" not in app.openapi()["paths"] and "/dashboard/summary" not in app.openapi()["paths"]

    def test_summary_trouble_first_with_why_and_since_when(self) -> None:
        app = PicoAPI(mode="supervisor", title="jobs")
        registry = app.registry
        assert registry is not None
        clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
        registry.clock, registry._wall = clock, wall
        registry.register(reg("127.0.0.1", 1, name="<script>alert(1)</script>", tags=["a", "<b>"]))
        registry.register(reg("127.0.0.1", 2, name="ok", tags=["a"]))
        registry.record("127.0.0.1:1", OK)
        registry.record("127.0.0.1:2", OK)
        registry.record("127.0.0.1:2", FAIL)
        clock.advance(5)
        wall.advance(5)
        registry.record("127.0.0.1:2", FAIL)  # unhealthy from now on
        clock.advance(30)
        wall.advance(30)
        registry.record("127.0.0.1:2", FAIL)
        data = dashboard(TestClient(app))
        assert "<h1>jobs</h1>" in data.page and "Checks postponed" not in data.page
        assert data.counts == {"healthy": "1 healthy", "unhealthy": "1 unhealthy", "unknown": "0 unknown"}
        assert "1-2 of 2 workers shown, 2 in all" in data.page
        (troubled_id, troubled), (_, fine) = data.rows.items()  # trouble first
        assert troubled_id == "127.0.0.1:2" and troubled["status"] == "unhealthy" and troubled["cells"][9] == "3"
        since = time.strftime("%X", time.localtime(1_800_000_005.0))  # the wall time it became unhealthy
        assert troubled["cells"][5] == "refused" and troubled["cells"][6] == f"{since} (30.0s ago)"
        assert fine["cells"][0] == "<script>alert(1)</script>" and fine["cells"][3] == "a <b>"  # text, not markup
        assert fine["cells"][5:7] == ["", "-"]

    def test_counts_follow_the_tag_filter_and_bad_tags_are_refused(self) -> None:
        app = supervisor_with(1, tags=("resize", "png"))
        app.registry.register(reg("127.0.0.1", 2, tags=["ocr"]))  # type: ignore[union-attr]
        client = TestClient(app)
        for query, ids, counts in [
            ("?tag=resize+png", ["127.0.0.1:1"], {"healthy": 1, "unhealthy": 0, "unknown": 0}),
            ("?tag=resize,png", ["127.0.0.1:1"], {"healthy": 1, "unhealthy": 0, "unknown": 0}),
            ("?tag=ocr", ["127.0.0.1:2"], {"healthy": 0, "unhealthy": 0, "unknown": 1}),
            ("", ["127.0.0.1:2", "127.0.0.1:1"], {"healthy": 1, "unhealthy": 0, "unknown": 1}),
            ("?tag=ocr&status=healthy", [], {"healthy": 0, "unhealthy": 0, "unknown": 1}),
        ]:
            data = dashboard(client, query)
            shown = {status: f"{n} {status}" for status, n in counts.items()}
            assert (list(data.rows), data.counts, "2 in all" in data.page) == (ids, shown, True), query
        for bad in ["a:b", "x" * 65, "\x1b[31m"]:
            assert "tag must" in field_error(client.get("/dashboard", params={"tag": bad}))
        assert "at most 32 times" in field_error(client.get("/dashboard?tag=" + "+".join("t" * 33)))
        assert client.get("/dashboard?status=bad").status_code == 422

    def test_ten_thousand_workers_in_pages_trouble_first(self) -> None:
        app = PicoAPI(mode="supervisor")
        registry = app.registry
        assert registry is not None
        for port in range(1, 10_001):
            registry.register(reg("127.0.0.1", port, tags=["ocr"] if port % 10 else ["resize"]))
        troubled = [f"127.0.0.1:{port}" for port in (9001, 9002, 9003)]
        for port in range(1, 10_001):
            registry.record(f"127.0.0.1:{port}", OK)
        for wid in troubled:
            registry.record(wid, FAIL)
            registry.record(wid, FAIL)
        client = TestClient(app)  # no lifespan, so no checker: the statuses stay as recorded here
        first = client.get("/dashboard")
        assert len(first.content) < 150_000 and "position: sticky" in first.text  # a page, never every worker
        data = Rows(first.text)
        assert data.counts == {"healthy": "9997 healthy", "unhealthy": "3 unhealthy", "unknown": "0 unknown"}
        assert len(data.rows) == 200 and "1-200 of 10000 workers shown, 10000 in all" in data.page
        assert list(data.rows)[:3] == troubled  # trouble first, on the first page
        assert '<a href="?page=2">next page</a>' in data.page and "previous page" not in data.page
        assert len(dashboard(client, "?page=50").rows) == 200 and dashboard(client, "?page=51").rows == {}
        seen, page, links = list[str](), 1, ""  # the filter is kept from page to page
        while rows := (found := dashboard(client, f"?tag=resize&page={page}")).rows:
            seen += rows
            links += found.page
            page += 1
        assert sorted(seen) == sorted(f"127.0.0.1:{port}" for port in range(10, 10_001, 10)) and page == 6
        assert '<a href="?tag=resize&amp;page=5">next page</a>' in links
        assert '<a href="?tag=resize&amp;page=4">previous page</a>' in links
        assert list(dashboard(client, "?status=unhealthy").rows) == troubled


def metric_families(text: str) -> dict[str, Any]:
    """GET /metrics read by prometheus_client's parser: family name -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


class TestMetrics:
    def test_families_and_values_after_register_fail_recover(self) -> None:
        app = PicoAPI(mode="supervisor", max_workers=50)
        registry = app.registry
        assert registry is not None
        client = TestClient(app)  # no lifespan: the checks are the ones scripted here
        assert client.put("/register", json=body(port=9001, tags=["resize", "png"])).status_code == 201
        assert client.put("/register", json=body(port=9002, tags=["resize"])).status_code == 201
        assert client.put("/register", json=body(port=9002, tags=["resize"])).status_code == 200  # a refresh
        registry.record("127.0.0.1:9001", CheckResult(True, 200, 0.003, late=0.2))
        registry.record("127.0.0.1:9002", CheckResult(True, 200, 0.03, late=0.0))
        registry.record("127.0.0.1:9001", CheckResult(False, None, 0.7, "refused", late=3.0))
        registry.record("127.0.0.1:9001", CheckResult(False, None, 20.0, "timed out"))  # unhealthy now
        assert dashboard(client).counts["unhealthy"] == "1 unhealthy"
        registry.record("127.0.0.1:9001", CheckResult(True, 200, 0.004))  # recovered
        assert client.delete("/register/127.0.0.1:9002").status_code == 204
        response = client.get("/metrics")
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        found = metric_families(response.text)
        assert set(found) == {
            "picoapi_workers",
            "picoapi_workers_max",
            "picoapi_tag_workers",
            "picoapi_tags",
            "picoapi_checks",
            "picoapi_check_latency_seconds",
            "picoapi_check_lateness_seconds",
            "picoapi_checks_in_flight",
            "picoapi_registrations",
            "picoapi_deregistrations",
            "picoapi_checker_trouble",
        }
        status = {dict(labels)["status"]: value for (_, labels), value in found["picoapi_workers"].items()}
        assert status == {"healthy": 1, "unhealthy": 0, "unknown": 0}
        assert found["picoapi_workers_max"] == {("picoapi_workers_max", ()): 50}
        by_tag = {tuple(dict(labels).values()): n for (_, labels), n in found["picoapi_tag_workers"].items() if n}
        assert by_tag == {("healthy", "png"): 1, ("healthy", "resize"): 1}
        checks = {dict(labels)["result"]: n for (_, labels), n in found["picoapi_checks"].items()}
        assert checks == {"ok": 3, "failed": 2, "postponed": 0}
        latency = found["picoapi_check_latency_seconds"]
        buckets = {dict(labels)["le"]: n for (name, labels), n in latency.items() if name.endswith("_bucket")}
        assert buckets["0.005"] == 2 and buckets["0.05"] == 3 and buckets["1"] == 4 and buckets["10"] == 4
        assert buckets["+Inf"] == latency[("picoapi_check_latency_seconds_count", ())] == 5
        assert latency[("picoapi_check_latency_seconds_sum", ())] == pytest.approx(20.737)
        lateness = found["picoapi_check_lateness_seconds"]
        late = {dict(labels)["le"]: n for (name, labels), n in lateness.items() if name.endswith("_bucket")}
        assert (late["0.1"], late["0.25"], late["2.5"], late["5"], late["+Inf"]) == (3, 4, 4, 5, 5)
        assert found["picoapi_registrations"] == {("picoapi_registrations_total", ()): 2}
        assert found["picoapi_deregistrations"] == {("picoapi_deregistrations_total", ()): 1}
        assert found["picoapi_checks_in_flight"] == {("picoapi_checks_in_flight", ()): 0}
        assert found["picoapi_checker_trouble"] == {("picoapi_checker_trouble", ()): 0}
        assert "/metrics" in app.openapi()["paths"]

    def test_postponed_checks_and_trouble_are_the_supervisors_own_errors(self) -> None:
        registry, pool = Registry(clock=FakeClock()), InlinePool()
        checker = HealthChecker(registry, submit=pool.submit)
        registry.register(reg("127.0.0.1", 1), address="127.0.0.1")
        pool.outcome["127.0.0.1:1"] = CheckResult(False, None, None, "supervisor could not check: EMFILE", True)
        checker.run_pending()
        found = metric_families(picoapi._exposition(registry, checker))
        assert found["picoapi_checks"][("picoapi_checks_total", (("result", "postponed"),))] == 1
        assert found["picoapi_checks"][("picoapi_checks_total", (("result", "failed"),))] == 0
        assert found["picoapi_checker_trouble"] == {("picoapi_checker_trouble", ()): 1}
        assert found["picoapi_checks_in_flight"] == {("picoapi_checks_in_flight", ()): 0}

    def test_a_check_under_way_shows_in_flight(self) -> None:
        accepted, release = threading.Event(), threading.Event()

        def silent(conn: socket.socket) -> None:  # takes the request, never answers: the check stays in flight
            accepted.set()
            release.wait(10)

        with raw_server(silent) as port:
            registry = Registry()
            registry.register(reg("127.0.0.1", port, interval=5, health={"timeout": 5}), address="127.0.0.1")
            checker = HealthChecker(registry)
            checker.start()
            try:
                assert accepted.wait(10), "the check never connected"
                found = metric_families(picoapi._exposition(registry, checker))
            finally:
                release.set()
                checker.stop()
        assert found["picoapi_checks_in_flight"] == {("picoapi_checks_in_flight", ()): 1}

    def test_a_check_begun_late_shows_in_the_lateness_histogram(self) -> None:
        """By the checker itself, not a CheckResult built by hand: this one begins 2 s after it was due."""
        offset = [0.0]
        with raw_server(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as port:
            registry = Registry(clock=lambda: time.monotonic() + offset[0])
            registry.register(reg("127.0.0.1", port, interval=60), address="127.0.0.1")  # due now
            offset[0] = 2.0  # the checker wakes 2 s after the check was due
            checker = HealthChecker(registry)
            checker.start()
            try:
                wait_for(lambda: registry.metrics.checks != [0, 0], 10, "the check's result")
                found = metric_families(picoapi._exposition(registry, checker))
            finally:
                checker.stop()
        late = found["picoapi_check_lateness_seconds"]
        assert late[("picoapi_check_lateness_seconds_count", ())] == 1
        assert late[("picoapi_check_lateness_seconds_sum", ())] >= 1.9

    def test_removals_after_deregister_after_are_counted(self) -> None:
        """Else an operator cannot tell a worker removed for staying unhealthy from a DELETE that never came."""
        clock = FakeClock()
        registry = Registry(deregister_after=10, clock=clock)
        registry.register(reg("127.0.0.1", 9001), address="127.0.0.1")
        for result in (OK, FAIL, FAIL):  # unhealthy
            registry.record("127.0.0.1:9001", result)
        clock.advance(11)
        change = registry.record("127.0.0.1:9001", FAIL)
        assert change is not None and change.removed and len(registry) == 0
        found = metric_families(picoapi._exposition(registry, None))
        assert found["picoapi_deregistrations"] == {("picoapi_deregistrations_total", ()): 1}

    def test_tag_series_are_bounded_and_label_values_escaped(self) -> None:
        registry = Registry(max_workers=200)
        hostile = 'a"b\\c'
        for port in range(1, 81):  # 80 tags of one worker each
            registry.register(reg("127.0.0.1", port, tags=[f"t{port:02}"]))
        registry.register(reg("127.0.0.1", 100, tags=[hostile, "t80"]))
        for port in range(101, 104):
            registry.register(reg("127.0.0.1", port, tags=[hostile]))
        found = metric_families(picoapi._exposition(registry, None))
        tags = {dict(labels)["tag"] for _, labels in found["picoapi_tag_workers"]}
        assert picoapi.METRICS_MAX_TAGS == 50 and len(found["picoapi_tag_workers"]) == 50 * 3
        assert tags == {hostile, "t80", *(f"t{i:02}" for i in range(1, 49))}  # the largest, then by name
        assert found["picoapi_tags"] == {("picoapi_tags", ()): 81}
        assert found["picoapi_tag_workers"][("picoapi_tag_workers", (("status", "unknown"), ("tag", hostile)))] == 4


class TestServiceDiscovery:
    def test_healthy_workers_as_target_groups_filtered_by_tag(self) -> None:
        app = supervisor_with(1, 2, tags=("resize", "png"), name="resizer", version="2.1.0")
        registry = app.registry
        assert registry is not None
        registry.register(reg("127.0.0.1", 3, tags=["resize"]))  # unknown: not a target yet
        registry.register(reg("127.0.0.1", 4, tags=["ocr"]))
        registry.record("127.0.0.1:4", OK)
        registry.record("127.0.0.1:2", FAIL)
        registry.record("127.0.0.1:2", FAIL)  # unhealthy: not a target
        client = TestClient(app)
        everyone = client.get("/prometheus/targets").json()
        assert [group["targets"] for group in everyone] == [["127.0.0.1:1"], ["127.0.0.1:4"]]
        assert everyone[0]["labels"] == {
            "__meta_picoapi_id": "127.0.0.1:1",
            "__meta_picoapi_name": "resizer",
            "__meta_picoapi_version": "2.1.0",
            "__meta_picoapi_tags": ",resize,png,",
            "__meta_picoapi_scheme": "http",
        }
        assert [g["targets"] for g in client.get("/prometheus/targets?tag=resize&tag=png").json()] == [["127.0.0.1:1"]]
        assert client.get("/prometheus/targets?tag=nothing").json() == []
        assert "tag must be" in field_error(client.get("/prometheus/targets", params={"tag": "a:b"}))
        assert "/prometheus/targets" in app.openapi()["paths"]

    def test_a_tag_with_a_comma_cannot_pose_as_another_tag(self) -> None:
        """__meta_picoapi_tags is ',resize,png,': a tag 'x,resize' would match a relabel regex '.*,resize,.*' as if
        the worker were tagged resize. ',' is refused wherever tags are checked, naming the tag and the rule."""
        client = TestClient(PicoAPI(mode="supervisor", env_file=None))
        error = field_error(client.put("/register", json={**body(), "tags": ["x,resize"]}))
        assert "body.tags: Value error, each tag must be 1 to 64 characters without spaces, ':' or ','" in error
        assert "got 'x,resize'" in error
        with pytest.raises(ConfigError, match="API_TAGS items must be .* without spaces, ':' or ',', got 'x,resize'"):
            Config.load(environ={"API_TAGS": "png:x,resize"}, env_file=None)


def picoapi_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
    return subprocess.run(
        [sys.executable, "-m", "picoapi", *args],
        capture_output=True,
        text=True,
        cwd=HERE,
        env={**clean, **(env or {})},
        timeout=60,
    )


SERVICES = "http://127.0.0.1/services"
#: A GET /services entry as a supervisor sends it.
SERVICE_ENTRY = {
    **json.loads(json.dumps(picoapi._out(Registry().register(reg("127.0.0.1", 1))[0]))),
    "status": "healthy",
}


def status_entry(wid: str, **fields: Any) -> dict[str, Any]:
    return {**SERVICE_ENTRY, "id": wid, **fields}


@contextlib.contextmanager
def fake_supervisor(
    answer: Callable[[dict[str, list[str]]], tuple[Any, dict[str, str]]], status: int = 200
) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``status`` and ``answer(query)``: a body (JSON unless
    bytes), headers."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            payload, headers = answer(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown() waits a poll
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


class TestStatusCommand:
    def test_table_tags_and_json_against_a_live_supervisor(self, cluster: Cluster) -> None:
        cluster.supervisor()
        port = cluster.worker().port
        wait_for(lambda: cluster.status(f"127.0.0.1:{port}") == "healthy", 15, "registration")
        requests.put(cluster.url + "/register", json=body(port=free_port(), tags=["other"]), timeout=2)
        out = picoapi_cli("status", cluster.url)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["ID", "NAME", "VERSION", "TAGS", "STATUS", "LAST", "CHECK", "LATENCY"]
        row = next(line for line in lines if line.startswith(f"127.0.0.1:{port}"))
        assert row.split()[1:5] == ["echo", "0.0.1", "echo", "healthy"]
        assert lines[0].index("STATUS") == row.index("healthy")  # aligned
        assert lines[-1] == "2 workers: 1 healthy, 1 unknown"  # nothing listens for the second: never checked good
        only = picoapi_cli("status", cluster.url, "--tag", "echo")
        assert [line.split()[0] for line in only.stdout.splitlines()[1:-2]] == [f"127.0.0.1:{port}"]
        as_json = json.loads(picoapi_cli("status", cluster.url, "--json", "--tag", "other").stdout)
        assert [e["tags"] for e in as_json] == [["other"]]
        by_register_url = picoapi_cli("status", cluster.url + "/register", "--tag", "echo")  # as in API_REGISTER_PATH
        assert by_register_url.returncode == 0 and comparable(by_register_url.stdout)[1:] == comparable(only.stdout)[1:]
        assert by_register_url.stdout.endswith("\n1 worker: 1 healthy\n")
        at_a_worker = picoapi_cli("status", f"http://127.0.0.1:{port}")
        assert at_a_worker.returncode == 1 and at_a_worker.stderr == (
            f"picoapi: http://127.0.0.1:{port}/services answered HTTP 404: not a PicoAPI supervisor "
            "(pass its base URL or its /register URL)\n"
        )

    def test_without_a_url_it_asks_register_paths_supervisor_or_says_what_to_pass(self, capsys: Any) -> None:
        assert picoapi.main(["status"]) == 2
        assert capsys.readouterr().err == (
            "picoapi: no supervisor to ask: pass its URL (e.g. picoapi status http://127.0.0.1:8100) "
            "or set API_REGISTER_PATH\n"
        )
        with fake_supervisor(lambda query: ([status_entry("127.0.0.1:1")], {})) as url, open(".env", "w") as dotenv:
            dotenv.write(f"API_REGISTER_PATH={url}/register\n")
            dotenv.close()
            assert picoapi.main(["status"]) == 0
        assert capsys.readouterr().out.endswith("\n1 worker: 1 healthy\n")

    @pytest.mark.parametrize("suffix", ["", "/", "/register", "/register/"])
    def test_base_or_register_url_and_a_failed_checks_latency(self, capsys: Any, suffix: str) -> None:
        entries = [
            status_entry("127.0.0.1:1", last_latency=0.0021, failures=0),
            status_entry("127.0.0.1:2", last_latency=0.0001, failures=2, status="unhealthy"),  # refused at once
        ]
        with fake_supervisor(lambda query: (entries, {})) as url:
            assert picoapi.main(["status", url + suffix]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].endswith(" 2.1 ms") and lines[2].endswith(" -")  # a failed check's time says nothing
        assert lines[-1] == "2 workers: 1 healthy, 1 unhealthy"

    @pytest.mark.parametrize("status", [404, 405])
    def test_what_is_not_a_supervisor_is_named(self, capsys: Any, status: int) -> None:
        with fake_supervisor(lambda query: ({"detail": "Method Not Allowed"}, {}), status) as url:
            assert picoapi.main(["status", url]) == 1
        assert capsys.readouterr().err == (
            f"picoapi: {url}/services answered HTTP {status}: not a PicoAPI supervisor "
            "(pass its base URL or its /register URL)\n"
        )

    def test_wait_says_what_never_came_and_why(self, capsys: Any) -> None:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens
        assert picoapi.main(["status", url, "--wait", "2", "--tag", "ocr", "--timeout", "0.3"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"picoapi: timed out waiting for 2 healthy workers tagged ocr (last: cannot reach the supervisor at {url}: "
        )
        with fake_supervisor(lambda query: ([status_entry("127.0.0.1:1"), status_entry("127.0.0.1:2")], {})) as url:
            assert picoapi.main(["status", url, "--wait", "2", "--timeout", "5"]) == 0
        assert capsys.readouterr().out.endswith("\n2 workers: 2 healthy\n")

    def test_default_url_from_the_register_path(self, cluster: Cluster) -> None:
        cluster.supervisor()
        out = picoapi_cli("status", env={"API_REGISTER_PATH": cluster.url + "/register"})
        assert out.returncode == 0 and out.stdout.strip().endswith("0 workers")

    def test_unreachable_supervisor_is_one_line_and_exit_1(self) -> None:
        port = free_port()
        out = picoapi_cli("status", f"http://127.0.0.1:{port}")
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith(f"picoapi: cannot reach the supervisor at http://127.0.0.1:{port}: ")
        assert len(out.stderr.strip().splitlines()) == 1

    def test_follows_the_pages_of_a_live_supervisor(self, cluster: Cluster) -> None:
        cluster.supervisor()
        assert set(register_many(cluster.url, range(1, 1202), 8)) == {201}
        out = picoapi_cli("status", cluster.url)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 1 + 1201 + 2 and out.stdout.splitlines()[-1].startswith("1201 workers: ")
        assert len({e["id"] for e in json.loads(picoapi_cli("status", cluster.url, "--json").stdout)}) == 1201

    def test_hostile_entries_cannot_reach_the_terminal(self, capsys: Any) -> None:
        attack = "\x1b]0;pwned\x07\x1b[2J"
        forged = "\n127.0.0.1:2  forged  1.0  x  healthy  -  -"
        entries = [
            status_entry("127.0.0.1:1", name=f"evil{attack}{forged}", tags=[f"t{attack}", "u\u202e\x9b"]),
            status_entry(f"127.0.0.1:3{attack}", version=f"1{attack}\n\n9 workers: 9 healthy"),
        ]
        with fake_supervisor(lambda query: (entries, {})) as url:
            assert picoapi.main(["status", url]) == 0
            table = capsys.readouterr().out
            assert picoapi.main(["status", url, "--json"]) == 0
            as_json = capsys.readouterr().out
        for out in (table, as_json):
            assert not {"\x1b", "\x07", "\x9b", "\u202e"} & set(out), out
        lines = table.splitlines()
        assert len(lines) == 1 + 2 + 2 and lines[1].startswith("127.0.0.1:1 ") and lines[2].startswith("127.0.0.1:3")
        assert lines[-1] == "2 workers: 2 healthy" and "\\x1b]0;pwned\\x07" in lines[1]
        assert json.loads(as_json) == entries

    @pytest.mark.parametrize(
        ("answer", "why"),
        [
            ({"workers": []}, "malformed page (the answer: Input should be a valid list)"),
            ([1], "malformed page (entry 0: Input should be a valid dictionary"),
            ([{"id": "x"}], "malformed page (entry 0.name: Field required)"),
            ([{**SERVICE_ENTRY, "tags": "png"}], "malformed page (entry 0.tags: Input should be a valid list)"),
            ([{**SERVICE_ENTRY, "name": 5}], "malformed page (entry 0.name: Input should be a valid string)"),
            (
                [{**SERVICE_ENTRY, "last_check": "soon"}],
                "malformed page (entry 0.last_check: Input should be a valid number)",
            ),
            ([SERVICE_ENTRY, SERVICE_ENTRY], "entries out of id order"),
            (b"<html>", "did not answer JSON"),
            (b"[" * 200_000, "did not answer JSON"),  # RecursionError
            (b'[{"port": ' + b"1" * 5000 + b"}]", "did not answer JSON"),  # ValueError: int max str digits
            ([{**SERVICE_ENTRY, "last_latency": float("nan")}], "did not answer JSON"),  # --json would print NaN
        ],
    )
    def test_malformed_answer_is_one_line_and_exit_1(self, capsys: Any, answer: Any, why: str) -> None:
        with fake_supervisor(lambda query: (answer, {})) as url:
            assert picoapi.main(["status", url]) == 1
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith(f"picoapi: {url}/services ") and why in out.err
        assert len(out.err.splitlines()) == 1 and "not a PicoAPI supervisor" in out.err

    def test_endless_or_looping_pages_are_bounded(self, capsys: Any) -> None:
        def endless(query: dict[str, list[str]]) -> tuple[Any, dict[str, str]]:
            after = int(query.get("after", ["0"])[0])
            return [status_entry(f"{after + 1:09d}")], {"Link": f'<{SERVICES}?after={after + 1:09d}>; rel="next"'}

        with fake_supervisor(endless) as url:
            assert picoapi.main(["status", url, "--json"]) == 1
        out = capsys.readouterr()
        assert len(json.loads(out.out)) == picoapi.STATUS_MAX_PAGES
        assert out.err == "picoapi: stopped after 100 pages (100 workers); narrow it with --tag\n"
        with fake_supervisor(lambda query: ([SERVICE_ENTRY], {"Link": f'<{SERVICES}>; rel="next"'})) as url:
            assert picoapi.main(["status", url]) == 1  # the same page again: out of id order, not a loop
        assert "entries out of id order" in capsys.readouterr().err

    @pytest.mark.parametrize("wait", [[], ["--wait", "1"]])
    def test_timeout_bounds_each_answer_in_all(self, capsys: Any, wait: list[str]) -> None:
        """A supervisor sending a byte every 0.1 s never lets a read time out: --timeout bounds the whole answer."""

        def trickling(request: bytes, conn: socket.socket) -> None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n[")
            for _ in range(300):  # 30 s
                conn.sendall(b" ")
                time.sleep(0.1)

        with raw_supervisor(trickling) as url:
            started = time.monotonic()
            assert picoapi.main(["status", url, "--timeout", "1", *wait]) == 1
            assert time.monotonic() - started < 10  # a deadline, not a hang
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "timed out" in err

    def test_an_answer_is_read_up_to_a_bound(self, capsys: Any) -> None:
        sent = [0]

        def endless(request: bytes, conn: socket.socket) -> None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n[")
            while sent[0] < 200_000_000:
                conn.sendall(b" " * 65536)
                sent[0] += 65536

        with raw_supervisor(endless) as url:
            assert picoapi.main(["status", url]) == 1
        assert sent[0] < 32_000_000, f"read {sent[0] / 1e6:.0f} MB of the answer"
        assert "sent a page over 8 MB: not a PicoAPI supervisor" in capsys.readouterr().err

    def test_an_error_says_what_failed_never_what_the_far_end_sent(self, capsys: Any) -> None:
        def banner(request: bytes, conn: socket.socket) -> None:
            conn.sendall(b"SSH-2.0-OpenSSH_9.6p1 SECRET-BANNER\r\n")

        with raw_supervisor(banner) as url:
            assert picoapi.main(["status", url, "--timeout", "2"]) == 1
        err = capsys.readouterr().err
        assert err.endswith(": BadStatusLine: a malformed HTTP answer\n") and "SSH" not in err, err

    def test_a_redirect_is_not_followed(self, capsys: Any) -> None:
        """Else the supervisor's URL could send the command anywhere, its answer printed as that registry."""
        asked: list[bytes] = []
        with raw_supervisor(lambda request, conn: asked.append(request)) as elsewhere:

            def redirect(request: bytes, conn: socket.socket) -> None:
                where = picoapi._base_url(elsewhere) + "/services"
                conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())

            with raw_supervisor(redirect) as url:
                assert picoapi.main(["status", url, "--timeout", "2"]) == 1
        assert asked == [] and "answered HTTP 302" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("url", "fix"),
        [("127.0.0.1:8100", "http://127.0.0.1:8100"), ("ftp://keeper:8100/register", "http://keeper:8100/register")],
    )
    def test_a_url_without_http_says_what_to_pass(self, capsys: Any, url: str, fix: str) -> None:
        assert picoapi.main(["status", url, "--timeout", "1"]) == 2
        assert capsys.readouterr().err == (
            f"picoapi: the supervisor's URL must begin with http:// or https://: pass '{fix}', got '{url}'\n"
        )

    @pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300"])
    def test_a_bad_timeout_is_one_line_and_exit_2(self, capsys: Any, value: str) -> None:
        assert picoapi.main(["status", "http://127.0.0.1:9", "--timeout", value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("picoapi: --timeout must be a number of seconds above 0") and len(err.splitlines()) == 1

    @pytest.mark.parametrize("command", ["supervisor", "worker", "status", "demo"])
    def test_every_command_has_help_with_an_example(self, command: str) -> None:
        out = picoapi_cli(command, "--help")
        assert out.returncode == 0 and "example" in out.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(HERE, "test-artifacts")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: its fds 3 and 4),
    so a test can type into a page and read it while it lives, with no package beyond the browser."""

    def __init__(self, profile: Any) -> None:
        assert CHROMIUM is not None
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()

        def as_fds_3_and_4() -> None:
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]  # clear of 3 and 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        self.proc = subprocess.Popen(
            [CHROMIUM, *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=as_fds_3_and_4,
            start_new_session=True,  # its renderers and helpers share its process group: close() ends them all
        )
        os.close(to_child)
        os.close(from_child)
        self._ids, self._buffer, self.session = iter(range(1, 1 << 30)), b"", ""

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command (on the attached page, once there is one); its result, within 20 s."""
        wanted = next(self._ids)
        message = {
            "id": wanted,
            "method": method,
            "params": params,
            **({"sessionId": self.session} if self.session else {}),
        }
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 20
        while True:
            while b"\0" in self._buffer:
                line, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(line)
                if answer.get("id") == wanted:
                    assert "error" not in answer, answer
                    return dict(answer["result"])
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._from_browser, 1 << 20) if ready else b""
            assert chunk, f"chromium did not answer {method} within 20 s"
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str) -> Any:
        """The value of ``expression`` in the page."""
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in answer, answer
        return answer["result"].get("value")

    def rows(self) -> dict[str, dict[str, Any]]:
        """The dashboard's worker rows as it shows them now: id -> status and cell texts."""
        rows = self.js(
            "[...document.querySelectorAll('tr.worker')].map((tr) => "
            "({id: tr.dataset.id, status: tr.dataset.status, cells: [...tr.cells].map((td) => td.textContent)}))"
        )
        return {row["id"]: row for row in rows}

    def counts(self) -> dict[str, str]:
        """The dashboard's status counts as it shows them now."""
        counts = "[...document.querySelectorAll('[data-count]')].map((a) => [a.dataset.count, a.textContent])"
        return dict(self.js(f"Object.fromEntries({counts})"))

    def close(self) -> None:
        """Ask the browser to quit, then end its process group, whatever is left of it."""
        self.session = ""
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close")  # it quits without answering: the pipe closes
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PICOAPI_REQUIRE_BROWSER"),
    reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it and requires this test",
)
class TestDashboardInABrowser:
    def test_live_rows_why_since_when_filter_kept_and_counts_follow_it(
        self, cluster: Cluster, browser: Browser
    ) -> None:
        cluster.supervisor(API_TITLE="<i>jobs</i>")
        workers = [cluster.worker(interval=0.3) for _ in range(2)]
        ids = [f"127.0.0.1:{worker.port}" for worker in workers]
        wait_for(lambda: all(cluster.status(i) == "healthy" for i in ids), 20, "two healthy workers")
        hostile = body(port=free_port(), name="<script>alert(1)</script>", tags=["other"], interval=0.3)
        requests.put(cluster.url + "/register", json=hostile, timeout=2).raise_for_status()
        browser.open(cluster.url + "/dashboard")
        rows = wait_for(lambda: len(r := browser.rows()) == 3 and r, 10, "three rows")
        assert {i: rows[i]["status"] for i in ids} == dict.fromkeys(ids, "healthy")
        assert [rows[i]["cells"][0] for i in ids] == ["echo", "echo"]
        assert "<script>alert(1)</script>" in [row["cells"][0] for row in rows.values()]  # text, not a script
        assert browser.js("document.scripts.length") == 1 and browser.js("document.title") == "<i>jobs</i> - PicoAPI"
        browser.js("window.sameDocument = true; document.getElementById('tag').focus()")
        browser.send("Input.insertText", text="ech")  # a filter half typed, not submitted
        workers[0].kill()
        workers[0].wait(5)
        killed = wait_for(lambda: (r := browser.rows().get(ids[0])) and r["status"] == "unhealthy" and r, 15, "it")
        assert browser.js("window.sameDocument") is True  # updated in place: the page was never reloaded
        assert browser.js("document.getElementById('tag').value") == "ech"  # what was typed stays, and the focus
        assert browser.js("document.activeElement.id") == "tag"
        assert "Connection refused" in killed["cells"][5]  # why
        assert re.fullmatch(r".+ \(\d+\.\ds ago\)", killed["cells"][6])  # since when
        everyone = {"healthy": "1 healthy", "unhealthy": "2 unhealthy", "unknown": "0 unknown"}
        wait_for(lambda: browser.counts() == everyone, 10, "the counts of every worker")
        assert [row["status"] for row in browser.rows().values()] == ["unhealthy", "unhealthy", "healthy"]
        browser.send("Input.insertText", text="o")
        browser.js("document.getElementById('filter').requestSubmit()")
        filtered = {"healthy": "1 healthy", "unhealthy": "1 unhealthy", "unknown": "0 unknown"}
        wait_for(lambda: browser.counts() == filtered, 10, "counts of the filter's workers")  # the filter's only
        assert set(browser.rows()) == set(ids) and browser.js("location.search") == "?tag=echo"
        os.makedirs(ARTIFACTS, exist_ok=True)
        browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=400, deviceScaleFactor=1, mobile=False)
        shot = base64.b64decode(browser.send("Page.captureScreenshot")["data"])
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        with open(os.path.join(ARTIFACTS, "dashboard.png"), "wb") as png:
            png.write(shot)
        browser.js("document.getElementById('tag').value = 'a:b'; document.getElementById('filter').requestSubmit()")
        shown = "document.getElementById('error').hidden ? '' : document.getElementById('error').textContent"
        refusal = wait_for(lambda: browser.js(shown), 10, "the bad filter's refusal shown")
        assert refusal.startswith("Not updated: tag must be 1 to 64 characters") and len(browser.rows()) == 2


PROMETHEUS = shutil.which("prometheus")


@contextlib.contextmanager
def prometheus(config: dict[str, Any], tmp_path: Any) -> Iterator[str]:
    """Our own Prometheus on 127.0.0.1 (own config, storage and free port; never the system's service):
    yields its URL once it is ready, and stops it."""
    assert PROMETHEUS is not None
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = tmp_path / "prometheus.log"
    CHILD_LOGS.append(log)
    for _ in range(5):
        port = free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=out,
                cwd=tmp_path,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(requests.RequestException):
                    if listens(proc.pid, port) and requests.get(url + "/-/ready", timeout=1).ok:
                        yield url
                        return
                time.sleep(0.1)
            if "address already in use" not in log.read_text(errors="replace"):
                raise AssertionError(f"prometheus did not get ready on {port}; its log is shown below")
        finally:
            proc.kill()
            proc.wait(10)
    raise AssertionError("lost the race for a free port five times")


@pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("PICOAPI_REQUIRE_PROMETHEUS"),
    reason="needs Debian's prometheus (apt-get install prometheus); .ci/run installs it and requires this test",
)
class TestPrometheus:
    def test_scrapes_the_supervisor_and_discovers_its_healthy_workers(self, cluster: Cluster, tmp_path: Any) -> None:
        cluster.supervisor()
        workers = [cluster.worker(interval=0.3) for _ in range(2)]
        ids = [f"127.0.0.1:{worker.port}" for worker in workers]
        other = body(port=free_port(), tags=["other"], interval=60)  # not asked for: the filter leaves it out
        requests.put(cluster.url + "/register", json=other, timeout=2).raise_for_status()
        wait_for(lambda: all(cluster.status(i) == "healthy" for i in ids), 20, "two healthy workers")
        supervisor = cluster.url.removeprefix("http://")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "picoapi", "static_configs": [{"targets": [supervisor]}]},
                {
                    "job_name": "workers",
                    "http_sd_configs": [
                        {"url": cluster.url + "/prometheus/targets?tag=echo", "refresh_interval": "1s"}
                    ],
                    "relabel_configs": [
                        {"source_labels": ["__meta_picoapi_name"], "target_label": "service"},
                        {"source_labels": ["__meta_picoapi_version"], "target_label": "version"},
                    ],
                },
            ],
        }

        with prometheus(config, tmp_path) as url:

            def targets(job: str) -> dict[str, dict[str, Any]]:
                found = requests.get(url + "/api/v1/targets?state=active", timeout=2).json()["data"]["activeTargets"]
                return {t["labels"]["instance"]: t for t in found if t["labels"]["job"] == job}

            wait_for(lambda: targets("picoapi")[supervisor]["health"] == "up", 20, "the supervisor's /metrics scraped")
            found = wait_for(lambda: (t := targets("workers")) and set(t) == set(ids) and t, 20, "the workers found")
            for wid in ids:
                assert found[wid]["labels"] == {
                    "instance": wid,
                    "job": "workers",
                    "service": "echo",
                    "version": "0.0.1",
                }
                meta = {k: v for k, v in found[wid]["discoveredLabels"].items() if k.startswith("__meta_picoapi_")}
                assert meta == {
                    "__meta_picoapi_id": wid,
                    "__meta_picoapi_name": "echo",
                    "__meta_picoapi_version": "0.0.1",
                    "__meta_picoapi_tags": ",echo,",
                    "__meta_picoapi_scheme": "http",
                }

            def healthy_workers() -> str:
                query = {"query": 'picoapi_workers{status="healthy"}'}
                answer = requests.get(url + "/api/v1/query", params=query, timeout=2).json()["data"]["result"]
                return str(answer[0]["value"][1])

            wait_for(lambda: healthy_workers() == "2", 20, "the supervisor's gauge read by Prometheus")
            workers[0].kill()
            workers[0].wait(5)
            wait_for(lambda: set(targets("workers")) == {ids[1]}, 20, "the dead worker dropped from the targets")
            wait_for(lambda: healthy_workers() == "1", 20, "the gauge following it")


# -- Reliability and security ----------------------------------------------------------------
# Figures these tests measure go to test-artifacts/reliability.json (quoted in the README).

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def record_figure(name: str, value: Any) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "reliability.json")
    figures = json.load(open(path)) if os.path.exists(path) else {}
    figures[name] = value
    with open(path, "w") as out:
        json.dump(figures, out, indent=2, sort_keys=True)


FUZZ_EXAMPLES = 50


def without_lifespan(app: Any) -> Any:
    """The app behind an ASGI layer that answers lifespan events itself: the fuzzed API
    needs no health checker, and loading a schema at import must start no thread."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    return asgi


fuzzed = schemathesis.openapi.from_asgi(
    "/openapi.json", without_lifespan(PicoAPI(mode="supervisor", env_file=None, max_workers=20))
)


class TestFuzzing:
    @pytest.fixture(autouse=True)
    def no_dns(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Generated host names resolve to a loopback address: no query leaves the machine."""
        monkeypatch.setattr(picoapi, "_resolve", lambda host: host if picoapi._ip(host) else "127.0.0.9")

    @fuzzed.parametrize()
    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def test_supervisor_api(self, case: Any) -> None:
        """No 5xx; every status, content type, header and body conforms to the schema.

        Those are the checks run. Not run: whether schema-valid input is accepted (the
        rule that a health address be the registrant's own host and port spans two
        fields, which JSON Schema cannot say, so such bodies rightly get 422) and
        whether schema-invalid input is refused (in a query string "false" is a string
        as good as any, so a tag named "false" is rightly accepted).
        """
        case.call_and_validate(checks=FUZZ_CHECKS)


def register_many(url: str, ports: range, clients: int, method: str = "PUT") -> list[int]:
    """Send PUT (or DELETE) for each port from ``clients`` threads; returns the statuses."""
    import http.client

    statuses: list[int] = []
    lock = threading.Lock()
    host, port = url.split("//")[1].split(":")
    chunks = [ports[i::clients] for i in range(clients)]

    def client(chunk: range) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        got = []
        for worker_port in chunk:
            if method == "PUT":
                payload = json.dumps(body(port=worker_port, interval=3600, tags=["load"]))
                conn.request("PUT", "/register", payload, {"Content-Type": "application/json"})
            else:
                conn.request("DELETE", f"/register/127.0.0.1:{worker_port}")
            response = conn.getresponse()
            response.read()
            got.append(response.status)
        conn.close()
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


class TestLoad:
    def test_thousands_of_registrations_from_32_clients(self, cluster: Cluster) -> None:
        """Created, registered again (a refresh), deregistered, with queries meanwhile: counts exact, no error.

        3,000 rather than 10,000: every new entry is checked at once now, and the suite must stay fast."""
        cluster.supervisor()
        query_failures: list[str] = []
        queries = [0]
        stop = threading.Event()

        def query() -> None:
            session = requests.Session()
            while not stop.is_set():
                try:
                    response = session.get(cluster.url + "/services", params={"tag": "load"}, timeout=10)
                    response.json()
                    queries[0] += 1
                    if response.status_code != 200:
                        query_failures.append(f"HTTP {response.status_code}")
                except (requests.RequestException, ValueError) as exc:
                    query_failures.append(repr(exc))
                stop.wait(0.25)

        readers = [threading.Thread(target=query) for _ in range(2)]
        for reader in readers:
            reader.start()
        count = 3_000
        ports = range(1, count + 1)
        try:
            started = time.monotonic()
            created = register_many(cluster.url, ports, 32)
            create_s = time.monotonic() - started
            assert created.count(201) == count
            assert len(picoapi._services(cluster.url, (), 10)[0]) == count
            started = time.monotonic()
            replaced = register_many(cluster.url, ports, 32)
            replace_s = time.monotonic() - started
            assert replaced.count(200) == count and len(picoapi._services(cluster.url, (), 10)[0]) == count
            started = time.monotonic()
            deleted = register_many(cluster.url, ports, 32, method="DELETE")
            delete_s = time.monotonic() - started
            assert deleted.count(204) == count and cluster.services() == []
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        assert query_failures == [] and queries[0] > 0
        record_figure(
            "load",
            {
                "registrations": count,
                "clients": 32,
                "create_s": round(create_s, 2),
                "replace_s": round(replace_s, 2),
                "delete_s": round(delete_s, 2),
                "errors": 0,
                "concurrent_queries": queries[0],
                "query_failures": 0,
            },
        )


class TestRestart:
    def test_sigkill_with_registry_file_every_worker_back_at_once(self, cluster: Cluster, tmp_path: Any) -> None:
        db = str(tmp_path / "registry.db")
        sup = cluster.supervisor(API_REGISTRY_FILE=db)
        ports = [cluster.worker(interval=0.3).port for _ in range(3)]
        ids = [f"127.0.0.1:{port}" for port in ports]
        wait_for(lambda: all(cluster.status(i) == "healthy" for i in ids), 20, "three workers")
        sup.kill()
        sup.wait(5)
        restarted_at = time.time()
        cluster.supervisor(API_REGISTRY_FILE=db)
        assert sorted(s["id"] for s in cluster.services()) == sorted(ids)  # all back at once
        wait_for(
            lambda: all((s["last_check"] or 0) > restarted_at and s["status"] == "healthy" for s in cluster.services()),
            5,
            "every loaded worker checked after the restart",
        )

    def test_sigkill_without_file_every_worker_back_within_the_bound(self, cluster: Cluster) -> None:
        sup = cluster.supervisor()
        interval = 0.3
        ports = [cluster.worker(interval=interval).port for _ in range(3)]
        ids = [f"127.0.0.1:{port}" for port in ports]
        wait_for(lambda: all(cluster.status(i) == "healthy" for i in ids), 20, "three workers")
        sup.kill()
        sup.wait(5)
        killed = time.monotonic()
        cluster.supervisor()
        wait_for(lambda: all(cluster.status(i) == "healthy" for i in ids), 15, "re-registrations")
        took = time.monotonic() - killed
        bound = 3 * interval + min(interval, 5.0)  # the README's bound, from the last check heard
        record_figure(
            "restart_without_file",
            {
                "workers": 3,
                "interval_s": interval,
                "all_back_after_s": round(took, 2),
                "documented_bound_s": bound,
                "lost": 0,
            },
        )
        # from the kill, which comes after the last check; the restart itself takes part of it
        assert took < bound + 3.0


class TestFaultyHealthEndpoints:
    def test_each_fault_classified_within_deadline_others_not_delayed(self) -> None:
        def trickle(conn: socket.socket) -> None:
            for byte in b"HTTP/1.1 200 OK\r\n":
                conn.sendall(bytes([byte]))
                time.sleep(0.1)

        def reset(conn: socket.socket) -> None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

        def huge(conn: socket.socket) -> None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            with contextlib.suppress(OSError):
                for _ in range(200):
                    conn.sendall(b"x" * 65536)

        faults = {
            "trickle": (trickle, "no answer within 0.3s"),
            "silent": (lambda c: time.sleep(3), "no answer within 0.3s"),
            "reset": (reset, "Error"),
            "500": (lambda c: c.sendall(b"HTTP/1.1 500 Internal Server Error\r\n\r\n"), "HTTP 500"),
            "redirect": (
                lambda c: c.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\n\r\n"),
                "HTTP 302",
            ),
        }
        with contextlib.ExitStack() as stack:
            ports = {name: stack.enter_context(raw_server(handler)) for name, (handler, _) in faults.items()}
            good = stack.enter_context(raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")))
            big = stack.enter_context(raw_server(huge))
            registry = Registry()
            checker = HealthChecker(registry)
            for port in [*ports.values(), good, big]:
                registry.register(reg("127.0.0.1", port, interval=0.3))
            checker.start()
            try:
                started = time.monotonic()
                for name, port in ports.items():
                    wait_for(lambda p=port: registry.get(f"127.0.0.1:{p}").status == "unhealthy", 5, name)
                classified_s = time.monotonic() - started
                wait_for(lambda: registry.get(f"127.0.0.1:{good}").successes >= 5, 5, "the good worker's checks")
                assert checker.is_running
            finally:
                checker.stop()
        for name, (_, error) in faults.items():
            assert error in registry.get(f"127.0.0.1:{ports[name]}").last_error, name  # type: ignore[union-attr]
        assert registry.get(f"127.0.0.1:{big}").status == "healthy"  # 200 is 200; the body is never read
        *counts, total_lateness = registry.metrics.lateness
        mean_lateness = total_lateness / sum(counts)
        assert mean_lateness < 0.05
        record_figure(
            "faulty_endpoints",
            {
                "faults": sorted([*faults, "huge body"]),
                "all_classified_after_s": round(classified_s, 2),
                "deadline_s": 0.3,
                "mean_lateness_ms": round(mean_lateness * 1000, 2),
                "checker_survived": True,
            },
        )


CHURN_CYCLES = 400


class TestChurn:
    def test_register_deregister_cycles_leave_nothing_behind(self) -> None:
        app = PicoAPI(mode="supervisor")
        threads = settled_thread_count()
        with TestClient(app) as client:
            client.put("/register", json=body(port=1))
            client.delete("/register/127.0.0.1:1")
            ours, files = picoapi_threads(), len(os.listdir("/proc/self/fd"))
            for i in range(CHURN_CYCLES):
                assert client.put("/register", json=body(port=1 + i % 7, interval=0.05)).status_code in (200, 201)
                assert client.delete(f"/register/127.0.0.1:{1 + i % 7}").status_code == 204
            registry = app.registry
            assert registry is not None and len(registry) == 0
            assert len(registry._heap) <= 130  # lazy cancellation, compacted
            assert picoapi_threads() == ours
            assert len(os.listdir("/proc/self/fd")) <= files  # no growth (others' garbage may close meanwhile)
        assert picoapi_threads() == [] and settled_thread_count() <= threads  # no growth
        record_figure(
            "churn",
            {
                "register_deregister_cycles": CHURN_CYCLES,
                "app_start_stop_cycles": 50,
                "threads_left": 0,
                "files_left": 0,
                "heap_entries_after": len(registry._heap),
            },
        )


ALL_VARIABLES = [setting.var for setting in picoapi._SETTINGS.values()]
ANY_VALUE = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.-:/![]eE "),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.text(max_size=20), max_size=5),
    st.binary(max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


class TestConfigProperties:
    @pytest.mark.parametrize("var", ALL_VARIABLES)
    @settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.one_of(st.text(), st.text(alphabet="0123456789.-:/![]eE² ")))
    def test_environment_value_is_valid_or_names_the_variable(self, var: str, raw: str) -> None:
        try:
            Config.load(environ={var: raw}, env_file=None)
        except ConfigError as exc:
            assert var in str(exc)

    @pytest.mark.parametrize("field", list(picoapi._SETTINGS))
    @settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=ANY_VALUE)
    def test_keyword_value_is_valid_or_names_the_variable(self, field: str, value: Any) -> None:
        try:
            Config.load({field: value}, env_file=None)
        except ConfigError as exc:
            assert picoapi._SETTINGS[field].var in str(exc)


class TestSecurity:
    def test_token_never_in_supervisor_logs_or_answers(self, caplog: Any) -> None:
        caplog.set_level(logging.DEBUG)
        with TestClient(PicoAPI(mode="supervisor", register_token="s3cret-token")) as client:
            answers = [
                client.put("/register", json=body(), headers={"Authorization": "Bearer wrong"}),
                client.put("/register", json=body(), headers={"Authorization": "Bearer s3cret-token"}),
                client.put("/register", json={"bad": "body"}, headers={"Authorization": "Bearer s3cret-token"}),
                client.get("/services"),
                client.get("/dashboard"),
                client.delete("/register/127.0.0.1:9001", headers={"Authorization": "Bearer s3cret-token"}),
            ]
        assert [a.status_code for a in answers] == [403, 201, 422, 200, 200, 204]
        assert all("s3cret-token" not in a.text and "s3cret-token" not in str(a.headers) for a in answers)
        assert "s3cret-token" not in caplog.text

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1.nip.io:9001/health",
            "http://127.0.0.1:9001@169.254.169.254/health",
            "http://user:pw@127.0.0.1:9001/health",
            "http://[::1]:9001/health",
            "http://127.0.0.1:9002/health",
            "http://localhost:9001/health",
        ],
    )
    def test_health_address_must_be_the_registrants_own(self, supervisor: TestClient, url: str) -> None:
        payload = {**body(), "health": {"url": url, "interval": 1}}
        assert "health.url must" in field_error(supervisor.put("/register", json=payload))


class TestFlapping:
    def test_alternating_health_is_bounded_in_memory(self) -> None:
        import tracemalloc

        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock)
        worker, _ = registry.register(reg(interval=1))
        for i in range(1000):  # warm up: every code path has run
            registry.record(worker.id, FAIL if i % 2 else OK)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(10_000):
            registry.pop_due(clock())
            registry.record(worker.id, FAIL if i % 2 else OK)
            clock.advance(0.3)
        grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        assert registry.get(worker.id).status == "healthy"  # type: ignore[union-attr]
        assert grown < 20_000  # bytes, after 10,000 checks: nothing accumulates per check
        assert len(registry._heap) <= 66


# -- Robustness: no single input, fault or slow peer stalls the checker ----------------------------


class ScriptedPool:
    """Like InlinePool, but a check may also be lost (never reported) or make submit() raise."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def submit(self, checks: list[Any], headers: dict[str, str], done: Callable[..., None]) -> None:
        for check in checks:
            outcome = self.outcomes.pop(0) if self.outcomes else "ok"
            if outcome == "raise":
                raise RuntimeError("a bug in the pool")
            if outcome != "lost":
                result = {"ok": OK, "fail": FAIL, "postponed": CheckResult(False, None, None, "EMFILE", True)}
                done(check, result[outcome])


def assert_one_future_check_each(registry: Registry) -> None:
    """The heap's invariant: every registered worker has exactly one live entry, due within interval + timeout."""
    live: dict[str, list[float]] = {}
    for due, seq, wid in registry._heap:
        entry = registry._workers.get(wid)
        if entry is not None and entry._heap_seq == seq:
            live.setdefault(wid, []).append(due)
    assert sorted(live) == sorted(registry._workers)
    now = registry.clock()
    for wid, dues in live.items():
        entry = registry._workers[wid]
        assert len(dues) == 1 and dues[0] <= now + entry.interval + entry.timeout + 1e-9, (wid, dues, now)


class TestCheckerInvariant:
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("register"), st.integers(1, 6), st.sampled_from([0.05, 0.3, 1.0, 10.0])),
                st.tuples(st.just("deregister"), st.integers(1, 6), st.just(0.0)),
                st.tuples(st.just("advance"), st.just(0), st.floats(0.0, 12.0)),
                st.tuples(st.just("suspect"), st.integers(1, 6), st.just(0.0)),
                st.tuples(
                    st.just("outcomes"), st.just(0), st.sampled_from(["ok", "fail", "lost", "raise", "postponed"])
                ),
            ),
            max_size=60,
        )
    )
    def test_every_worker_always_has_exactly_one_future_check(self, steps: list[tuple[str, int, Any]]) -> None:
        clock = FakeClock()
        registry = Registry(clock=clock, wall=clock, deregister_after=5.0)
        pool = ScriptedPool()
        checker = HealthChecker(registry, submit=pool.submit)
        for action, n, value in steps:
            if action == "register":
                registry.register(reg(port=n, interval=value))
            elif action == "deregister":
                registry.deregister(f"10.0.0.5:{n}")
            elif action == "suspect":
                registry.mark_suspect(f"10.0.0.5:{n}")
            elif action == "outcomes":
                pool.outcomes.extend([value] * 3)
            else:
                clock.advance(value)
            with contextlib.suppress(RuntimeError):  # the thread's loop logs it; the schedule must not care
                checker.run_pending()
            assert_one_future_check_each(registry)

    def test_a_check_that_cannot_be_built_fails_alone(self) -> None:
        """A non-ASCII health path (from a registry file written before it was refused) beside good checks."""
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            registry = Registry()
            good = [registry.register(reg("127.0.0.1", port + 0, interval=0.1))[0]]
            bad = Registration.model_construct(
                **{
                    **reg("127.0.0.1", 1).model_dump(),
                    "health": HealthSpec.model_construct(
                        url="http://127.0.0.1:1/sant\u00e9", interval=0.1, timeout=None
                    ),
                }
            )
            registry.register(bad, address="127.0.0.1")
            checker = HealthChecker(registry)
            checker.start()
            try:
                wait_for(lambda: registry.get("127.0.0.1:1").failures >= 2, 5, "the bad check failing")
                wait_for(lambda: registry.get(good[0].id).successes >= 5, 5, "the good checks going on")
            finally:
                checker.stop()
        assert registry.get("127.0.0.1:1").last_error.startswith("cannot check")
        assert_one_future_check_each(registry)

    def test_run_pending_before_start_queues_the_checks(self) -> None:
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            registry = Registry()
            worker, _ = registry.register(reg("127.0.0.1", port, interval=0.05))
            checker = HealthChecker(registry)
            assert checker.run_pending() == 1  # not an AttributeError: the pool takes it when it starts
            checker.start()
            try:
                wait_for(lambda: registry.get(worker.id).last_success, 5, "the queued check")
            finally:
                checker.stop()


class TestOwnTrouble:
    def test_out_of_descriptors_postpones_checks_and_says_so(self, tmp_path: Any) -> None:
        """A supervisor limited to 64 descriptors, flooded with idle connections to its own port."""
        import http.client
        import resource

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as worker_port:
            env = {k: v for k, v in os.environ.items() if not k.startswith("API_")}
            proc = serve(
                lambda p: ["supervisor", "--bind", "127.0.0.1", "--port", str(p)],
                {**env, "PYTHONPATH": HERE},
                tmp_path / "supervisor.log",
                tmp_path,
                preexec_fn=limit,
            )
            port, flood = proc.port, list[socket.socket]()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # kept alive through the flood

                def get(path: str, method: str = "GET", payload: Any = None) -> tuple[int, Any]:
                    headers = {"Content-Type": "application/json"} if payload else {}
                    conn.request(method, path, json.dumps(payload) if payload else None, headers)
                    answer = conn.getresponse()
                    content = answer.read()
                    return answer.status, json.loads(content)

                assert get("/register", "PUT", body(port=worker_port, interval=0.1))[0] == 201
                wid = f"127.0.0.1:{worker_port}"
                wait_for(lambda: get(f"/services/{wid}")[1]["status"] == "healthy", 5, "a healthy worker")
                for _ in range(80):
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                health = wait_for(lambda: (a := get("/health"))[0] == 503 and a[1], 10, "the supervisor's own trouble")
                assert "Too many open files" in health["failing"]["picoapi-checker"]
                conn.request("GET", "/dashboard")
                page = conn.getresponse().read().decode()  # says the supervisor's own trouble first
                assert "Checks postponed: supervisor could not check: Too many open files" in page
                for _ in range(10):  # a second of checks that cannot be made
                    assert get(f"/services/{wid}")[1]["status"] == "healthy"
                    time.sleep(0.1)
                for sock in flood:
                    sock.close()
                flood.clear()
                wait_for(lambda: get("/health")[0] == 200, 10, "checks made again")
                assert get(f"/services/{wid}")[1]["status"] == "healthy"
            finally:
                for sock in flood:
                    sock.close()
                proc.kill()
                proc.wait(10)
        assert "checks are postponed, not counted against workers" in (tmp_path / "supervisor.log").read_text()


class TestSlowResolver:
    def test_slow_names_cannot_take_every_thread_or_touch_the_checks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real, release = socket.getaddrinfo, threading.Event()

        def resolver(host: Any, *args: Any, **kwargs: Any) -> Any:  # slow names; no query leaves the machine
            if str(host).startswith("slow"):
                release.wait(10)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        with raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")) as port:
            app = PicoAPI(mode="supervisor")
            with TestClient(app) as client:
                named = {**body(port=port, interval=0.05), "host": "localhost"}
                named["health"]["url"] = f"http://localhost:{port}/health"
                assert client.put("/register", json=named).status_code == 201
                slow = []
                for i in range(picoapi.MAX_RESOLVING):
                    payload = {**body(port=9000 + i), "host": f"slow{i}.example"}
                    payload["health"]["url"] = f"http://slow{i}.example:{9000 + i}/health"
                    thread = threading.Thread(target=lambda p=payload: slow.append(client.put("/register", json=p)))
                    thread.start()
                wait_for(
                    lambda: app._supervisor.busy["host names are being resolved"] == picoapi.MAX_RESOLVING,
                    5,
                    "four slow resolutions",
                )
                extra = {**body(port=9100), "host": "slow-extra.example"}
                extra["health"]["url"] = "http://slow-extra.example:9100/health"
                refused = client.put("/register", json=extra)
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
                before = app.registry.get(f"localhost:{port}").successes
                wait_for(lambda: app.registry.get(f"localhost:{port}").successes >= before + 5, 5, "checks by name")
                release.set()
                wait_for(lambda: len(slow) == picoapi.MAX_RESOLVING, 10, "the slow registrations' answers")
        assert [a.status_code for a in slow] == [422] * picoapi.MAX_RESOLVING
        assert "does not resolve" in slow[0].json()["detail"][0]["msg"]
        assert app.registry.get(f"localhost:{port}").address == "127.0.0.1"


# -- Trust: nothing a client says is acted on until it has been verified ------------------------


def call_from(source: str, url: str, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    """One request to ``url`` from the loopback address ``source``, as another host on the network would send it."""
    import http.client

    parts = requests.utils.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5, source_address=(source, 0))
    try:
        conn.request(
            method, path, json.dumps(payload) if payload is not None else None, {"Content-Type": "application/json"}
        )
        answer = conn.getresponse()
        content = answer.read()
        return answer.status, json.loads(content) if content else None
    finally:
        conn.close()


def instance_server(instance: str, status: int = 200) -> contextlib.AbstractContextManager[int]:
    """A health endpoint on 127.0.0.1 that answers as the worker process ``instance``."""
    answer = f"HTTP/1.1 {status} OK\r\nX-PicoAPI-Instance: {instance}\r\nContent-Length: 0\r\n\r\n".encode()
    return raw_server(lambda c: c.sendall(answer))


class TestTrust:
    @pytest.mark.parametrize(
        ("host", "status", "message"),
        [
            ("2130706433", 422, "host '2130706433' is another spelling of 127.0.0.1; register '127.0.0.1'"),
            ("0177.0.0.1", 422, "another spelling of 127.0.0.1"),
            ("0x7f.1", 422, "another spelling of 127.0.0.1"),
            ("127.1", 422, "another spelling of 127.0.0.1"),
            ("::ffff:127.0.0.1", 422, "another spelling of 127.0.0.1"),
            ("0.0.0.0", 403, "resolves to 0.0.0.0, an unspecified, link-local, multicast or broadcast address"),
            ("169.254.169.254", 403, "resolves to 169.254.169.254, an unspecified, link-local"),
            ("metadata.google.internal", 403, "resolves to 169.254.169.254, an unspecified, link-local"),
            ("127.0.0.3", 403, "host '127.0.0.3' resolves to 127.0.0.3, but the registration came from 127.0.0.1"),
        ],
    )
    def test_forged_hosts_in_every_spelling_are_refused(
        self, supervisor: TestClient, monkeypatch: pytest.MonkeyPatch, host: str, status: int, message: str
    ) -> None:
        real = socket.getaddrinfo

        def resolver(name: Any, *args: Any, **kwargs: Any) -> Any:  # the cloud's metadata name, without DNS
            if name == "metadata.google.internal" and not kwargs.get("flags"):  # a name, not a number
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 0))]
            return real(name, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        port = 9001
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/health"
        answer = supervisor.put(
            "/register", json={**body(port=port), "host": host, "health": {"url": url, "interval": 1}}
        )
        assert answer.status_code == status
        detail = answer.json()["detail"]
        assert message in (detail if isinstance(detail, str) else detail[0]["msg"])
        assert supervisor.get("/services").json() == []

    def test_only_an_address_it_registers_from_unless_its_network_is_listed(self, cluster: Cluster) -> None:
        cluster.supervisor()

        def claim(host: str) -> dict[str, Any]:
            return {**body(port=9001), "host": host, "health": {"url": f"http://{host}:9001/h", "interval": 1}}

        status, answer = call_from("127.0.0.2", cluster.url, "PUT", "/register", claim("127.0.0.3"))
        assert status == 403 and "resolves to 127.0.0.3, but the registration came from 127.0.0.2" in answer["detail"]
        assert call_from("127.0.0.2", cluster.url, "PUT", "/register", claim("127.0.0.2"))[0] == 201
        assert [s["address"] for s in cluster.services()] == ["127.0.0.2"]
        cluster.close()
        cluster.supervisor(API_REGISTER_NETWORKS="127.0.0.0/29!169.254.0.0/16")  # NAT or containers: opened on purpose
        assert call_from("127.0.0.2", cluster.url, "PUT", "/register", claim("127.0.0.3"))[0] == 201
        assert call_from("127.0.0.2", cluster.url, "PUT", "/register", claim("169.254.169.254"))[0] == 201
        assert call_from("127.0.0.2", cluster.url, "PUT", "/register", claim("127.0.0.9"))[0] == 403  # not listed

    def test_no_read_back_through_last_error(self, cluster: Cluster) -> None:
        banner = b"SSH-2.0-OpenSSH_9.6p1 Debian-3 secret-banner\r\n"
        with raw_server(lambda c: c.sendall(banner)) as port:
            cluster.supervisor()
            payload = {**body(port=port, interval=0.1)}
            assert requests.put(cluster.url + "/register", json=payload, timeout=5).status_code == 201
            wid = f"127.0.0.1:{port}"
            entry = wait_for(
                lambda: next((s for s in cluster.services() if s["id"] == wid and s["last_check"]), None), 10, "a check"
            )
        assert entry["last_error"] == "ValueError: not an HTTP response" and entry["status"] != "healthy"
        assert "SSH" not in json.dumps(cluster.services())

    def test_a_new_entry_gets_no_work_before_a_good_check(self, cluster: Cluster) -> None:
        cluster.supervisor()
        real = cluster.worker(interval=0.2)
        wait_for(lambda: cluster.status(f"127.0.0.1:{real.port}") == "healthy", 15, "the real worker")
        decoy = {**body(port=9009, interval=0.2, tags=["echo"]), "host": "127.0.0.2"}
        decoy["health"]["url"] = "http://127.0.0.2:9009/health"  # nothing answers there
        assert call_from("127.0.0.2", cluster.url, "PUT", "/register", decoy)[0] == 201
        for _ in range(10):
            healthy = requests.get(cluster.url + "/services", params={"tag": "echo", "status": "healthy"}, timeout=2)
            assert [s["id"] for s in healthy.json()] == [f"127.0.0.1:{real.port}"]
            time.sleep(0.1)

    def test_re_put_and_delete_of_a_live_worker_are_refused(self, cluster: Cluster) -> None:
        cluster.supervisor()
        with instance_server("live1") as port:
            wid = f"127.0.0.1:{port}"
            mine = body(port=port, interval=0.2, instance="live1")
            assert requests.put(cluster.url + "/register", json=mine, timeout=5).status_code == 201
            wait_for(lambda: cluster.status(wid) == "healthy", 10, "the live worker")
            other = {**mine, "tags": ["stolen"], "instance": "intruder"}
            other["host"], other["health"] = "127.0.0.2", {**mine["health"], "url": f"http://127.0.0.2:{port}/health"}
            assert (
                call_from(
                    "127.0.0.2",
                    cluster.url,
                    "PUT",
                    "/register",
                    {**other, "host": "127.0.0.1", "health": mine["health"]},
                )[0]
                == 403
            )
            status, answer = call_from(
                "127.0.0.1", cluster.url, "PUT", "/register", {**mine, "tags": ["stolen"], "instance": "copy2"}
            )
            assert status == 409 and f"{wid} is served by another live instance" in answer["detail"]
            assert call_from("127.0.0.2", cluster.url, "DELETE", f"/register/{wid}")[0] == 403
            assert call_from("127.0.0.1", cluster.url, "DELETE", f"/register/{wid}?instance=copy2")[0] == 409
            assert (
                requests.put(cluster.url + "/register", json={**mine, "instance": "live2"}, timeout=5).status_code
                == 200
            )
            # a sibling process stops: the entry stays while another of its processes answers
            assert call_from("127.0.0.1", cluster.url, "DELETE", f"/register/{wid}?instance=live2")[0] == 204
            assert cluster.status(wid) == "healthy"
            assert [s["tags"] for s in cluster.services()] == [["resize"]]
        # the last one stops (nothing answers any more): the entry leaves
        assert call_from("127.0.0.1", cluster.url, "DELETE", f"/register/{wid}?instance=live1")[0] == 204
        assert cluster.status(wid) is None

    def test_a_check_answered_by_another_process_turns_the_entry_unhealthy(self, cluster: Cluster) -> None:
        cluster.supervisor()
        with instance_server("stranger") as port:
            wid = f"127.0.0.1:{port}"
            mine = body(port=port, interval=0.1, instance="gone")
            assert requests.put(cluster.url + "/register", json=mine, timeout=5).status_code == 201
            entry = wait_for(
                lambda: next((s for s in cluster.services() if s["id"] == wid and s["failures"] >= 2), None),
                10,
                "checks",
            )
        assert (
            entry["status"] != "healthy" and entry["last_error"] == f"answered by a process that did not register {wid}"
        )


# -- Trust boundaries: who may send, write, host and read back ------------------------------


@contextlib.contextmanager
def recording_server(
    host: str, answer: Callable[[Any], tuple[int, dict[str, str]]] = lambda h: (200, {})
) -> Iterator[tuple[int, list[tuple[str, dict[str, str], bytes]]]]:
    """An HTTP server on ``host`` that reads every request whole; yields its port and what it received
    (request line, headers, body). ``answer`` gives the status and headers of an empty answer."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_any(self) -> None:
            content = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append((f"{self.command} {self.path}", dict(self.headers), content))
            status, headers = answer(self)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": "0"}.items():
                self.send_header(name, value)
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = do_any  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown() waits a poll
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


def trickling(seconds: float, seen: list[int] | None = None) -> Callable[[socket.socket], None]:
    """A raw_server handler that promises a big answer and sends a byte every 50 ms for ``seconds``;
    ``seen`` gets an item per connection."""

    def handler(conn: socket.socket) -> None:
        if seen is not None:
            seen.append(1)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(int(seconds / 0.05)):
            conn.sendall(b" ")
            time.sleep(0.05)

    return handler


def raw_request(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request from 127.0.0.2, another host, with exactly ``headers`` (Host among them)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


CARD = {"card": "4111 1111 1111 1111"}
FAKE_CREDENTIALS = {"AccessKeyId": "AKIAIOSFODNN7EXAMPLE", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"}


class TestTrustBoundaries:
    # 1. Dispatch goes only where it was sent

    @pytest.mark.parametrize("dispatch", ["call", "broadcast"])
    def test_work_is_not_redirected_to_another_host(self, dispatch: str) -> None:
        with recording_server("127.0.0.3") as (thief, stolen):
            elsewhere = {"Location": f"http://127.0.0.3:{thief}/steal"}
            moved = lambda h: (200, {}) if h.path == "/health" else (307, elsewhere)  # noqa: E731
            with recording_server("127.0.0.1", moved) as (port, received):
                app = supervisor_with(port)
                wid = f"127.0.0.1:{port}"

                def send(**options: Any) -> requests.Response:
                    auth = {"Authorization": "Bearer job-secret"}
                    if dispatch == "call":
                        return app.call("resize", "POST", "/charge", json=CARD, headers=auth, **options)
                    answer = app.broadcast("resize", "POST", "/charge", json=CARD, headers=auth, **options)[wid]
                    assert isinstance(answer, requests.Response), answer
                    return answer

                with TestClient(app):  # its shutdown stops the broadcast threads
                    refused = send()
                    assert refused.status_code == 307 and refused.headers["Location"] == elsewhere["Location"]
                    assert [r[0] for r in received if r[0] != "GET /health"] == ["POST /charge"] and stolen == []
                    assert send(allow_redirects=True).status_code == 200  # followed only when asked
        assert [(line, content) for line, _, content in stolen] == [("POST /steal", json.dumps(CARD).encode())]

    # 2. Browsers cannot write

    def test_cross_origin_writes_need_an_origin_listed_by_name(self) -> None:
        evil = {"Origin": "http://evil.example"}
        with TestClient(PicoAPI(mode="supervisor")) as client:  # API_CORS_ALLOW_ORIGINS='*', the default
            put = client.put("/register", json=body(), headers=evil)
            assert put.status_code == 403 and "access-control-allow-origin" not in put.headers
            assert "'http://evil.example'" in put.json()["detail"] and "API_CORS_ALLOW_ORIGINS" in put.json()["detail"]
            assert client.get("/services").json() == []
            preflight = client.options(
                "/register", headers={**evil, "Access-Control-Request-Method": "PUT"}
            )  # a browser asks first, and must not be told yes
            assert preflight.status_code == 403 and "access-control-allow-methods" not in preflight.headers
            assert client.put("/register", json=body()).status_code == 201  # no Origin: a worker, curl
            gone = client.delete("/register/127.0.0.1:9001", headers={"Origin": "null"})  # a sandboxed page
            assert gone.status_code == 403 and len(client.get("/services").json()) == 1
            preflight = client.options(
                "/register/127.0.0.1:9001", headers={**evil, "Access-Control-Request-Method": "DELETE"}
            )
            assert preflight.status_code == 403
            read = client.get("/services", headers=evil)  # reads keep the configured CORS
            assert read.status_code == 200 and read.headers["access-control-allow-origin"] == "*"
            assert client.delete("/register/127.0.0.1:9001").status_code == 204
        with TestClient(PicoAPI(mode="supervisor"), root_path="/api") as client:  # behind a proxy's path prefix
            assert client.put("/api/register", json=body(), headers=evil).status_code == 403

    def test_a_listed_origin_may_write(self) -> None:
        ops, evil = {"Origin": "http://ops.example"}, {"Origin": "http://evil.example"}
        with TestClient(PicoAPI(mode="supervisor", cors_allow_origins="http://ops.example")) as client:
            preflight = client.options("/register", headers={**ops, "Access-Control-Request-Method": "PUT"})
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ops["Origin"]
            put = client.put("/register", json=body(), headers=ops)
            assert put.status_code == 201 and put.headers["access-control-allow-origin"] == ops["Origin"]
            assert client.put("/register", json=body(port=9002), headers=evil).status_code == 403
            assert client.delete("/register/127.0.0.1:9001", headers=ops).status_code == 204
        with TestClient(PicoAPI(mode="supervisor", cors_allow_origins="*!http://ops.example")) as client:
            assert client.put("/register", json=body(), headers=ops).status_code == 201  # '*' reads, ops writes
            assert client.put("/register", json=body(port=9002), headers=evil).status_code == 403

    def test_a_workers_own_routes_keep_plain_cors(self) -> None:
        app = PicoAPI()

        @app.put("/register")
        def theirs() -> dict[str, bool]:
            return {"theirs": True}

        with TestClient(app) as client:
            assert client.put("/register", headers={"Origin": "http://any.example"}).status_code == 200

    # 3. API_ALLOWED_HOSTS

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("keeper!keeper.internal!127.0.0.1", ("keeper", "keeper.internal", "127.0.0.1")),
            ("Keeper!*.Internal!::1!", ("keeper", "*.internal", "[::1]")),
            ("[::1]!*", ("[::1]", "*")),
        ],
    )
    def test_allowed_hosts_are_read(self, raw: str, expected: tuple[str, ...]) -> None:
        assert Config.load(environ={"API_ALLOWED_HOSTS": raw}, env_file=None).allowed_hosts == expected
        assert Config.load(env_file=None).allowed_hosts == ()  # unset: every host

    @pytest.mark.parametrize("raw", ["keeper:8100", "http://keeper", "keeper/x", "*keeper", "kee*per", "k eeper"])
    def test_bad_allowed_host_names_the_variable_value_and_fix(self, raw: str) -> None:
        with pytest.raises(ConfigError, match=rf"API_ALLOWED_HOSTS .*without scheme or port.*got '{re.escape(raw)}'"):
            Config.load(environ={"API_ALLOWED_HOSTS": raw}, env_file=None)

    def test_allowed_hosts_must_cover_api_host(self) -> None:
        with pytest.raises(ConfigError, match=r"API_ALLOWED_HOSTS must list API_HOST \('worker7'\).*health checks"):
            Config.load(environ={"API_ALLOWED_HOSTS": "keeper", "API_HOST": "worker7"}, env_file=None)
        for allowed in ("worker7", "*.internal", "*"):
            host = "worker7" if allowed != "*.internal" else "worker7.internal"
            Config.load(environ={"API_ALLOWED_HOSTS": allowed, "API_HOST": host}, env_file=None)

    @pytest.mark.parametrize("mode", ["supervisor", "worker"])
    def test_other_hosts_are_refused(self, mode: Any) -> None:
        app = PicoAPI(mode=mode, allowed_hosts="keeper!keeper.internal!127.0.0.1")
        with TestClient(app, base_url="http://keeper.internal:8100") as client:
            assert client.get("/health").status_code == 200
            assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
            assert client.get("/health", headers={"Host": "evil.example:8100"}).status_code == 400
            assert client.get("/health", headers={"Host": "127.0.0.1:8100"}).status_code == 200
            put = client.put("/register", json=body(), headers={"Host": "evil.example"})
            assert put.status_code == 400
        with TestClient(PicoAPI(mode=mode)) as client:  # unset: every host is served, as before
            assert client.get("/health", headers={"Host": "evil.example"}).status_code == 200

    def test_rebound_name_cannot_reach_supervisor_or_worker(self, cluster: Cluster) -> None:
        cluster.supervisor(API_ALLOWED_HOSTS="127.0.0.1")
        port = cluster.worker(API_ALLOWED_HOSTS="127.0.0.1").port  # its API_HOST, so its checks pass
        wid = f"127.0.0.1:{port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration under the listed host")
        assert cluster.sup_port is not None
        rebound = {"Host": f"evil.example:{cluster.sup_port}", "Origin": f"http://evil.example:{cluster.sup_port}"}
        for target, path in [(cluster.sup_port, "/services"), (port, "/health"), (port, "/openapi.json")]:
            assert raw_request(target, "GET", path, rebound)[0] == 400
        assert raw_request(cluster.sup_port, "DELETE", f"/register/{wid}", rebound)[0] == 400
        assert raw_request(cluster.sup_port, "GET", "/services", {"Host": f"127.0.0.1:{cluster.sup_port}"})[0] == 200
        unlisted = picoapi.check_once(f"http://localhost:{port}/health", 2, {picoapi.SUPERVISOR_HEADER: "x"})
        assert not unlisted.ok and unlisted.status_code == 400  # checks answer only under a listed host
        assert cluster.status(wid) == "healthy"

    # 4. No read-back through /services/{id}/openapi

    def test_openapi_only_from_a_ready_worker(self) -> None:
        document = json.dumps({"openapi": "3.1.0", "paths": {}}).encode()
        with http_worker(lambda h: (200, document)) as (port, _, paths):
            app = PicoAPI(mode="supervisor")
            registry = app.registry
            assert registry is not None
            wid = registry.register(reg("127.0.0.1", port, interval=60))[0].id  # unknown: never checked
            client = TestClient(app)  # no lifespan: no checker to check it meanwhile
            unchecked = client.get(f"/services/{wid}/openapi")
            registry.record(wid, OK)
            registry.mark_suspect(wid)  # a call could not connect to it since
            suspect = client.get(f"/services/{wid}/openapi")
            registry.record(wid, OK)
            ready = client.get(f"/services/{wid}/openapi")
            schema = client.get("/openapi.json").json()["paths"]["/services/{worker_id}/openapi"]["get"]
        for refused in (unchecked, suspect):
            assert refused.status_code == 409 and "is not healthy" in refused.json()["detail"]
        assert ready.status_code == 200 and ready.json()["openapi"] == "3.1.0"
        assert [p for p in paths if p != "GET /health"] == ["GET /openapi.json"]  # only the ready one was asked
        assert {"409", "502", "503"} <= set(schema["responses"])

    @pytest.mark.parametrize(
        "answer",
        [
            lambda h: (200, json.dumps(FAKE_CREDENTIALS).encode()),  # JSON, but no OpenAPI document
            lambda h: (200, json.dumps([FAKE_CREDENTIALS]).encode()),
            lambda h: (200, json.dumps({"openapi": FAKE_CREDENTIALS}).encode()),
            lambda h: (200, b"AccessKeyId=" + FAKE_CREDENTIALS["AccessKeyId"].encode()),
            lambda h: (404, json.dumps({"detail": FAKE_CREDENTIALS}).encode()),
        ],
    )
    def test_openapi_never_echoes_what_is_not_an_openapi_document(self, answer: Any) -> None:
        with http_worker(answer) as (port, _, _paths):  # no lifespan: no check meanwhile (the 404 would fail it)
            response = TestClient(supervisor_with(port)).get(f"/services/127.0.0.1:{port}/openapi")
        assert response.status_code == 502
        assert "AKIA" not in response.text and "wJalr" not in response.text

    def test_openapi_garbage_from_the_far_end_is_not_echoed(self) -> None:
        with raw_server(lambda c: c.sendall(b"AKIAIOSFODNN7EXAMPLE secret garbage\r\n\r\n")) as port:
            # no lifespan: the checker's first check would find the garbage and the route refuse before fetching
            response = TestClient(supervisor_with(port)).get(f"/services/127.0.0.1:{port}/openapi")
        assert response.status_code == 502 and "AKIA" not in response.text, response.text

    def test_openapi_trickle_is_cut_at_the_total_deadline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(picoapi, "OPENAPI_TIMEOUT", 0.5)
        with raw_server(trickling(3.0)) as port:
            with TestClient(supervisor_with(port)) as client:
                started = time.monotonic()
                response = client.get(f"/services/127.0.0.1:{port}/openapi")
                elapsed = time.monotonic() - started
        assert response.status_code == 502 and "within 0.5s" in response.json()["detail"]
        assert 0.5 <= elapsed < 1.5, elapsed  # the trickle goes on for 3 s

    def test_openapi_fetches_cannot_take_the_shared_threads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(picoapi, "OPENAPI_TIMEOUT", 1.0)
        seen: list[int] = []
        with raw_server(trickling(3.0, seen)) as port:
            app = supervisor_with(port)

            @app.get("/sync")
            def sync_route() -> dict[str, bool]:  # runs on the thread pool the sync routes share
                return {"ok": True}

            with TestClient(app) as client:
                answers: list[Any] = []
                url = f"/services/127.0.0.1:{port}/openapi"
                threads = [threading.Thread(target=lambda: answers.append(client.get(url))) for _ in range(45)]
                for thread in threads:
                    thread.start()
                wait_for(lambda: len(seen) >= picoapi.OPENAPI_MAX_FETCHES, 3, "fetches trickling")  # and a check
                started = time.monotonic()
                assert client.get("/sync").json() == {"ok": True}
                waited = time.monotonic() - started
                for thread in threads:
                    thread.join(10)
        assert waited < 0.5, waited  # on a thread held by a fetch it would wait ~3 s
        statuses = [a.status_code for a in answers]
        assert len(statuses) == 45 and set(statuses) <= {502, 503}
        assert statuses.count(502) <= picoapi.OPENAPI_MAX_FETCHES
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "being fetched" in busy.json()["detail"]


class TestNoRebinding:
    def test_work_goes_to_the_address_verified_at_registration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A registered name re-pointed at another host afterwards (DNS rebinding) does not move the work."""
        hosts: list[str] = []

        def answer(handler: Any) -> tuple[int, bytes]:
            hosts.append(handler.headers["Host"])
            return 200, b'{"openapi": "3.1.0", "paths": {}}'

        with http_worker(answer) as (port, _, paths):
            app = PicoAPI(mode="supervisor")
            assert app.registry is not None
            named = reg("localhost", port, tags=["resize"])
            worker, _ = app.registry.register(named, address="127.0.0.1")
            app.registry.record(worker.id, OK)
            real = socket.getaddrinfo
            monkeypatch.setattr(
                socket, "getaddrinfo", lambda h, *a, **k: real("127.0.0.3" if h == "localhost" else h, *a, **k)
            )
            assert app.call("resize", "GET", "/work").status_code == 200
            assert list(app.broadcast("resize", "GET", "/work").values())[0].status_code == 200  # type: ignore[union-attr]
            assert TestClient(app).get(f"/services/localhost:{port}/openapi").status_code == 200
        assert paths == ["GET /work", "GET /work", "GET /openapi.json"]
        assert hosts == [f"localhost:{port}"] * 3  # under its own name, at its verified address


# -- Shared ports: one address, several processes, real servers ----------------------------

#: The echo worker, logging what picoapi says (as `picoapi worker` does) under plain uvicorn too.
LOGGED_WORKER_MODULE = """
import logging

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(process)d]: %(message)s")

from echo_worker import app
"""


@contextlib.contextmanager
def statuses_of(cluster: Cluster, wid: str) -> Iterator[list[str | None]]:
    """Every status the supervisor lists for ``wid`` (None: not listed), sampled when the block starts, every 50 ms
    while it runs and once more when it ends (a block that ends at once still has samples)."""
    seen: list[str | None] = []
    done = threading.Event()

    def sample() -> None:
        while True:
            stop = done.is_set()
            with contextlib.suppress(requests.RequestException, ValueError):
                seen.append(cluster.status(wid))
            if stop:
                break
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(5)


class TestSharedPorts:
    """Workers whose address is served by another process, by several, or by none: never handed out wrongly."""

    @staticmethod
    def uvicorn(cluster: Cluster, *options: str, interval: float = 0.2, **env: str) -> Child:
        """``python -m uvicorn logged_worker:app --port P`` as an operator would start it, not through ``picoapi
        worker``; its API_PORT is P unless given."""
        (cluster.tmp / "logged_worker.py").write_text(LOGGED_WORKER_MODULE)
        args = ["logged_worker:app", "--host", "127.0.0.1", *options, "--port"]

        def settings(port: int) -> dict[str, str]:
            return cluster.settings(interval, {"API_PORT": str(port), **env})

        return cluster._start(lambda p: [*args, str(p)], settings, None, "uvicorn")

    @staticmethod
    def copy(cluster: Cluster, port: int, **env: str) -> str:
        """Start ``picoapi worker`` on ``port``, which is taken, and return its log once it exited (10 s at most)."""
        log = cluster.tmp / f"copy{len(CHILD_LOGS)}.log"
        CHILD_LOGS.append(log)
        environ = {**{k: v for k, v in os.environ.items() if not k.startswith("API_")}, "PYTHONPATH": HERE}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "picoapi", "worker", "echo_worker:app", "--port", str(port)],
                cwd=cluster.tmp,
                env={**environ, **cluster.settings(0.3, env)},
                stdout=out,
                stderr=out,
            )
        try:
            assert proc.wait(10) != 0, "a copy on a taken port kept running"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        return log.read_text(errors="replace")

    @staticmethod
    def answering(port: int) -> str:
        """The instance that answers the health path at ``port``."""
        return str(requests.get(f"http://127.0.0.1:{port}/health", timeout=1).headers["X-PicoAPI-Instance"])

    def test_plain_uvicorn_on_another_port_than_registered_is_never_handed_out(self, cluster: Cluster) -> None:
        cluster.supervisor()
        registered = free_port()  # API_PORT, where nothing listens; uvicorn binds a port of its own
        worker = self.uvicorn(cluster, API_PORT=str(registered))
        wid = f"127.0.0.1:{registered}"
        error = f"ERROR picoapi [{worker.pid}]: registered {wid} but nothing answers there ("
        with statuses_of(cluster, wid) as seen:
            wait_for(lambda: error in worker.log.read_text(), 10, "the self-check's ERROR")
            wait_for(lambda: cluster.status(wid) == "unhealthy", 10, "its start-up grace to end")
        assert f"pass --port {registered} to uvicorn" in worker.log.read_text()
        assert seen and "healthy" not in seen, seen
        assert requests.get(f"http://127.0.0.1:{worker.port}/echo?text=hi", timeout=1).ok  # it serves, elsewhere

    def test_a_second_copy_on_a_taken_port_never_takes_the_live_worker_out(self, cluster: Cluster) -> None:
        cluster.supervisor()
        live = cluster.worker(interval=0.3)
        wid = f"127.0.0.1:{live.port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "the live worker")
        instance = self.answering(live.port)
        with statuses_of(cluster, wid) as seen:
            other = self.copy(cluster, live.port, API_TITLE="billing", API_VERSION="2.0")
            same = self.copy(cluster, live.port)
            checked = next(s for s in cluster.services() if s["id"] == wid)["last_check"]
            wait_for(lambda: cluster.services()[0]["last_check"] > checked, 5, "a check after both copies")
        served = f"{wid} is served by another live instance; {cluster.url}/register refused this one: HTTP 409: "
        assert f"RegistrationError: {served}{wid} is served by another live instance (echo 0.0.1)" in other
        assert "Application startup failed" in other
        assert "address already in use" in same and "Application shutdown complete" in same
        assert set(seen) == {"healthy"}, seen
        assert [s["id"] for s in cluster.services()] == [wid] and self.answering(live.port) == instance

    def test_uvicorn_workers_are_one_entry_until_the_server_stops(self, cluster: Cluster) -> None:
        cluster.supervisor()
        server = self.uvicorn(cluster, "--workers", "2", interval=0.2)
        wid = f"127.0.0.1:{server.port}"

        def registered() -> list[str]:
            return re.findall(rf"registered with \S+ as {re.escape(wid)} \(instance (\w+)\)", server.log.read_text())

        wait_for(lambda: len(registered()) == 2 and cluster.status(wid) == "healthy", 20, "both processes")
        assert self.answering(server.port) in registered()  # it is the server we started that answers
        with statuses_of(cluster, wid) as seen:
            successes = next(s for s in cluster.services() if s["id"] == wid)["successes"]
            wait_for(lambda: cluster.services()[0]["successes"] >= successes + 12, 10, "four watchdog periods")
        assert set(seen) == {"healthy"}, seen
        log = server.log.read_text()
        assert len(registered()) == 2 and "WARNING" not in log and "ERROR" not in log  # no process registered again
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and listens(int(p), server.port)]
        children.remove(server.pid)
        assert len(children) == 2
        with statuses_of(cluster, wid) as seen:
            os.kill(children[0], signal.SIGKILL)  # uvicorn starts another process, which joins the entry
            wait_for(lambda: len(registered()) == 3, 15, "the new process's registration")
            wait_for(lambda: cluster.status(wid) == "healthy", 5, "the entry, healthy")
        assert None not in seen and cluster.status(wid) == "healthy", seen
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        wait_for(lambda: cluster.status(wid) is None, 5, "the entry to leave with the server")

    def test_a_liveness_probe_does_not_keep_a_forgotten_worker_from_registering_again(self, cluster: Cluster) -> None:
        supervisor = cluster.supervisor()
        port = cluster.worker(interval=0.2).port
        wid = f"127.0.0.1:{port}"
        wait_for(lambda: cluster.status(wid) == "healthy", 15, "registration")
        stop = threading.Event()

        def probe() -> None:  # Kubernetes' liveness probe, a load balancer's: no supervisor header
            while not stop.wait(0.3):
                with contextlib.suppress(requests.RequestException):
                    requests.get(f"http://127.0.0.1:{port}/health", timeout=0.5)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            supervisor.kill()
            supervisor.wait(5)
            cluster.supervisor()  # forgot the worker: no registry file
            wait_for(lambda: cluster.status(wid) == "healthy", 10, "registration again, despite the prober")
        finally:
            stop.set()
            prober.join(5)


class TestLogging:
    """PicoAPI's lines under plain uvicorn: as uvicorn's own (prefix, level), unless the user set logging up."""

    @staticmethod
    def uvicorn(cluster: Cluster, module: str, *options: str, **env: str) -> Child:
        args = [f"{module}:app", "--host", "127.0.0.1", *options, "--port"]
        return cluster._start(
            lambda p: [*args, str(p)], lambda p: cluster.settings(0.2, {"API_PORT": str(p), **env}), None, "uvicorn"
        )

    def test_info_and_warnings_come_out_as_uvicorns_at_its_level(self, cluster: Cluster) -> None:
        cluster.supervisor()
        worker = self.uvicorn(cluster, "echo_worker")
        registered = f"INFO:     registered with {cluster.url}/register as 127.0.0.1:{worker.port} (instance "
        wait_for(lambda: registered in worker.log.read_text(), 10, "its INFO line")
        quiet = self.uvicorn(cluster, "echo_worker", "--log-level", "warning", API_REGISTER_PATH="")
        why = (
            "WARNING:  not registering with a supervisor: API_REGISTER_PATH is not set (its tags ['echo'] go nowhere), "
            "so this worker serves as a plain app; set API_REGISTER_PATH to the supervisor's /register URL"
        )
        wait_for(lambda: why in quiet.log.read_text(), 10, "its WARNING")
        stop = [cluster.procs.pop(), cluster.procs.pop()]
        for proc in stop:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        log = quiet.log.read_text()
        assert log.count("not registering") == 1 and "INFO" not in log, log  # once; uvicorn's level, for both
        assert "Application shutdown complete" in worker.log.read_text() and "\nnot registering" not in log

    def test_a_users_own_logging_set_up_is_left_alone(self, cluster: Cluster) -> None:
        (cluster.tmp / "logged_worker.py").write_text(LOGGED_WORKER_MODULE)
        worker = self.uvicorn(cluster, "logged_worker", API_REGISTER_PATH="")
        wait_for(lambda: "not registering" in worker.log.read_text(), 10, "its WARNING")
        log = worker.log.read_text()
        assert (
            f"WARNING picoapi [{worker.pid}]: not registering with a supervisor" in log and "WARNING:  not" not in log
        )
