"""PicoAPI's supervisor for the registration benchmark, served exactly like bare_app.py.

uvicorn pico_app:app --port 8102
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from picoapi import PicoAPI  # noqa: E402

app = PicoAPI(mode="supervisor", env_file=None, max_workers=100_000)
