"""Shows the logs of the processes a failed test started, beside its own report."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    logs = getattr(item.module, "CHILD_LOGS", None)
    if logs is None:
        return
    if report.failed:
        for log in logs:
            try:
                text = log.read_text(errors="replace")
            except OSError as exc:
                text = f"(unreadable: {exc})"
            report.sections.append((f"log of a child process: {log}", text[-20_000:]))
    if report.when == "teardown":
        logs.clear()
