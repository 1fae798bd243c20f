"""A worker that reads text out of images (here: out of a string, shouting removed).

From the repository root: picoapi worker examples.reader:app --env-file examples/worker.env --port 8002
"""

from pydantic import BaseModel

from picoapi import PicoAPI

app = PicoAPI(title="reader", tags=["ocr", "image"], version="1.0.0")


class Page(BaseModel):
    image: str


@app.post("/ocr")
def ocr(page: Page) -> dict[str, object]:
    words = page.image.lower().split()
    return {"text": " ".join(words), "words": len(words)}
