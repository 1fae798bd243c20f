"""A worker that resizes images (here: computes the new size).

From the repository root: picoapi worker examples.resizer:app --env-file examples/worker.env --port 8001
"""

from pydantic import BaseModel, Field

from picoapi import PicoAPI

app = PicoAPI(title="resizer", tags=["resize", "image"], version="1.0.0")


class Resize(BaseModel):
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    scale: float = Field(gt=0, le=10)


@app.post("/resize")
def resize(job: Resize) -> dict[str, int]:
    return {"width": round(job.width * job.scale), "height": round(job.height * job.scale)}
