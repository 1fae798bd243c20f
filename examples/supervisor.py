"""The example's supervisor: POST /jobs hands each job to a healthy worker that does that kind of job.

From the repository root: picoapi supervisor examples.supervisor:app --env-file examples/supervisor.env
"""

from typing import Any

from pydantic import BaseModel

from picoapi import PicoAPI

app = PicoAPI(mode="supervisor", title="jobs")


class Job(BaseModel):
    kind: str  # a tag: "resize" or "ocr"
    payload: dict[str, Any]


@app.post("/jobs")
def submit(job: Job) -> dict[str, Any]:
    """Send the job to the next healthy worker tagged with its kind (503 if there is none)."""
    response = app.call(job.kind, "POST", f"/{job.kind}", json=job.payload, timeout=5)
    response.raise_for_status()
    return {"kind": job.kind, "worker": response.url.split("/")[2], "result": response.json()}
