"""The comparison for registration throughput: a bare FastAPI app doing the same work as
PicoAPI's PUT /register (the same Registration model and response model, a dict insert
under a lock), without the registry's index, schedule or middleware.

    uvicorn bare_app:app --port 8101
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastapi import FastAPI, Response  # noqa: E402

from picoapi import Registration, WorkerOut  # noqa: E402

app = FastAPI()
lock = threading.Lock()
workers: dict[str, dict[str, Any]] = {}


@app.put("/register", response_model=WorkerOut)
async def register(reg: Registration, response: Response) -> Any:
    wid = f"{reg.host}:{reg.port}"
    entry = {
        "id": wid,
        **reg.model_dump(),
        "address": reg.host,
        "status": "healthy",
        "suspect": False,
        "registered_at": time.time(),
        "last_check": None,
        "last_success": None,
        "failures": 0,
        "successes": 0,
        "last_status_code": None,
        "last_latency": None,
        "last_error": "",
    }
    with lock:
        created = wid not in workers
        workers[wid] = entry
    response.status_code = 201 if created else 200
    return entry
