"""Serve a trained model over HTTP: post a photo, get every face's box, gender and age as JSON.

    python serve.py --checkpoint runs/r18_112/best.onnx [--host 127.0.0.1] [--port 8000]
    curl -F image=@images/astronaut.jpg http://127.0.0.1:8000/predict

Endpoints:
  POST /predict  the photo as the multipart form field `image` -> 200 {"faces": [...], "width": W,
                 "height": H}, each face as in demo.py's results.json (box [x1, y1, x2, y2], score,
                 landmarks 5 x [x, y], gender, gender_prob, age, age_std, age_low, age_high: null
                 for l1/l2 heads), in the upright photo's pixels (its
                 EXIF orientation applied). A missing field, an empty upload or a truncated or corrupt image: 400;
                 a file that is not an image: 415; an upload over --max-bytes (a chunked one too,
                 refused as it streams in, never spooled whole) or a photo of more
                 than --detect-pixels pixels (refused on the size its file declares, before
                 decoding): 413; --max-queue photos already waiting for the model: 503; each
                 with {"error": "..."} saying why.
  GET /health    {"status": "ok", "checkpoint", "backend": onnxruntime | torch, "size", "device", "flip"}
  GET /          a page where one picks or drops a photo and sees its faces drawn, and the JSON.

Requests are decoded concurrently in worker threads; one inference thread owns the model and
takes every photo waiting (after --wait-ms for more to arrive) as one batch through
inference.Predictor: MTCNN once for the batch, one forward pass for all its faces. With a .onnx
checkpoint (export.py) the age/gender network and MTCNN's three nets (face.py) run in onnxruntime,
on the CPU: no torch network on the request path (torch only does the arithmetic between MTCNN's
nets). --flip averages each face with its mirror image (a .onnx: export it with --flip);
/health says whether it is on.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import tempfile
import threading
import time
from concurrent.futures import Future

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import config
from inference import COLOURS, OnnxModel, Predictor, add_checkpoint_option
from utils import ImageError, argument_parser, read_image, run_main

STATUS_OF_REASON = {"empty": 400, "truncated": 400, "not_image": 415, "too_large": 413, "unreadable": 400}
FORM_SLACK = 64 * 1024  # bytes of multipart framing and other fields allowed beyond --max-bytes


class Batcher:
    """One thread that owns the predictor; photos queued while it works go through it together.

    At most max_queue decoded photos wait: each holds up to --detect-pixels pixels of memory.
    """

    def __init__(self, predictor: Predictor, wait_s: float, max_queue: int = config.SERVE_MAX_QUEUE):
        self.predictor, self.wait_s = predictor, wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.closing = False  # the inference thread took the closing mark: no batch after this one
        self.thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.thread.start()

    def submit(self, image: np.ndarray) -> Future:
        """A future of the photo's face records; queue.Full where max_queue photos wait already."""
        future: Future = Future()
        self.queue.put_nowait((future, image))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _take(self) -> list | None:
        """The next batch: the first photo, then those arriving within wait_s, up to a batch of photos."""
        first = None if self.closing else self.queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.predictor.photo_batch:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # closing: finish this batch, then stop (a mark put back could block on a full queue)
                self.closing = True
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                # analyse_stream splits the batch further where its pixels exceed DETECT_PIXELS
                for future, _, faces in self.predictor.analyse_stream(batch):
                    future.set_result(faces)
            except Exception as e:  # the requests of this batch fail (500); the service goes on
                for future, _ in batch:
                    if not future.done():
                        future.set_exception(e)


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """The upload as an upright RGB photo, by utils.read_image (the one decoder of the project), from a temp file;
    one of more than max_pixels pixels is refused before it is decoded."""
    with tempfile.NamedTemporaryFile(prefix="serve-upload-") as f:  # Pillow tells the format by content, not name
        f.write(data)
        f.flush()
        return read_image(f.name, max_pixels)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(predictor: Predictor, checkpoint: str, max_bytes: int = config.SERVE_MAX_BYTES,
             wait_ms: float = config.SERVE_WAIT_MS, max_queue: int = config.SERVE_MAX_QUEUE) -> FastAPI:
    """The service around a loaded predictor (its inference thread runs while the app does)."""
    batcher: Batcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal batcher
        batcher = Batcher(predictor, wait_ms / 1000, max_queue)
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="age and gender", lifespan=lifespan)
    page = PAGE.replace("__COLOURS__", json.dumps({k: f"rgb{v}" for k, v in COLOURS.items()}))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return dict(status="ok", checkpoint=checkpoint, size=predictor.size, device=str(predictor.device),
                    backend="onnxruntime" if isinstance(predictor.model, OnnxModel) else "torch", flip=predictor.flip)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        too_big = f"the upload is over the limit of {max_bytes:,} bytes (serve.py --max-bytes)"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes + FORM_SLACK:  # refused before reading the body
            return error(413, too_big)
        body = await body_within(request, max_bytes + FORM_SLACK)  # a chunked upload states no length
        if body is None:
            return error(413, too_big)
        try:
            form = await with_body(request, body).form(max_files=1, max_fields=8)
        except Exception as e:  # starlette's MultiPartException and the parser's errors: a malformed body
            return error(400, f"not a readable multipart form ({e}); send the photo as multipart/form-data, "
                              "e.g. curl -F image=@photo.jpg")
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return error(400, "no file in the form field `image`; send the photo as multipart/form-data, "
                                  "e.g. curl -F image=@photo.jpg")
            data = await upload.read(max_bytes + 1)
            name = upload.filename or "upload"
        finally:
            await form.close()
        if len(data) > max_bytes:
            return error(413, too_big)
        try:  # MTCNN's memory grows with the pixels: more than detect_pixels are refused before decoding
            image = await run_in_threadpool(decode, data, predictor.detect_pixels)
        except ImageError as e:
            detail = {"empty": "the upload is empty", "not_image": "the upload is not an image Pillow can read",
                      "truncated": "the image is truncated or corrupt",
                      "too_large": f"too many pixels ({e.detail}); send a smaller photo (serve.py --detect-pixels)",
                      }.get(e.reason, e.reason.replace("_", " "))
            return error(STATUS_OF_REASON.get(e.reason, 400), f"{name}: {detail}")
        try:
            future = batcher.submit(image)
        except queue.Full:
            return error(503, f"{name}: busy, {max_queue} photos are waiting for the model (serve.py --max-queue); "
                              "send it again shortly")
        try:
            faces = await asyncio.wrap_future(future)
        except Exception as e:
            return error(500, f"inference failed: {type(e).__name__}: {e}")
        return JSONResponse(dict(faces=faces, width=int(image.shape[1]), height=int(image.shape[0])))

    return app


async def body_within(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as more than limit bytes have come (the rest is never read).

    Starlette's form parser would spool a whole upload to disk before anyone could look at its size.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def with_body(request: Request, body: bytes) -> Request:
    """A request like `request` whose body, already read, is `body`."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}
    return Request(request.scope, receive)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Age and gender</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 #drop { display: block; border: 2px dashed #999; border-radius: 8px; padding: 1.2em; text-align: center; max-width: 40em; }
 #drop.over { border-color: #2a7; background: #efe; }
 #out { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; margin-top: 1em; }
 canvas { max-width: min(100%, 720px); height: auto; border: 1px solid #ccc; }
 pre { background: #f6f6f6; padding: .8em; max-width: 40em; max-height: 36em; overflow: auto; font-size: 12px; }
</style></head>
<body>
<h1>Age and gender</h1>
<label id="drop">Drop a photo here, or pick one: <input type="file" id="file" accept="image/*"></label>
<p id="status">Every face found gets its box, landmarks, gender and age.</p>
<div id="out"><canvas id="canvas" width="0" height="0"></canvas><pre id="json"></pre></div>
<script>
const COLOURS = __COLOURS__;
const $ = (id) => document.getElementById(id);

function label(f) {  // as demo.py's: female 97%, 29 (24-35)
  const interval = f.age_low === null || f.age_low === undefined ? "" : ` (${Math.round(f.age_low)}-${Math.round(f.age_high)})`;
  return `${f.gender} ${Math.round(100 * f.gender_prob)}%, ${Math.round(f.age)}${interval}`;
}

function draw(bitmap, result) {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  canvas.width = result.width; canvas.height = result.height;  // the server's upright pixels
  ctx.drawImage(bitmap, 0, 0, result.width, result.height);
  const thick = Math.max(2, Math.round(Math.min(result.width, result.height) / 250));
  ctx.font = `${Math.max(12, Math.round(Math.min(result.width, result.height) / 28))}px sans-serif`;
  for (const f of result.faces) {
    const [x1, y1, x2, y2] = f.box, colour = COLOURS[f.gender];
    ctx.lineWidth = thick; ctx.strokeStyle = colour; ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = "rgb(60, 220, 60)";
    for (const [x, y] of f.landmarks) { ctx.beginPath(); ctx.arc(x, y, thick + 1, 0, 2 * Math.PI); ctx.fill(); }
    const text = label(f), m = ctx.measureText(text), h = parseInt(ctx.font) + 4;
    // above the box, else below; inside the photo, as demo.py's
    const ty = y1 - h >= 0 ? y1 - h : Math.min(y2, result.height - h);
    const tx = Math.min(Math.max(x1, 0), Math.max(result.width - m.width - 6, 0));
    ctx.fillStyle = colour; ctx.fillRect(tx, ty, m.width + 6, h);
    ctx.fillStyle = "white"; ctx.fillText(text, tx + 3, ty + h - 5);
  }
}

async function analyse(file) {
  document.body.dataset.state = "busy";
  $("status").textContent = `analysing ${file.name} ...`;
  const form = new FormData();
  form.append("image", file);
  try {
    const response = await fetch("predict", { method: "POST", body: form });
    const result = await response.json();
    $("json").textContent = JSON.stringify(result, null, 2);
    if (!response.ok) {
      $("status").textContent = `error ${response.status}: ${result.error}`;
      document.body.dataset.state = "error";
      return;
    }
    draw(await createImageBitmap(file, { imageOrientation: "from-image" }), result);
    $("status").textContent = `${file.name}: ${result.faces.length} face(s): ` + result.faces.map(label).join("; ");
    document.body.dataset.state = "done";
  } catch (e) {
    $("status").textContent = `error: ${e}`;
    document.body.dataset.state = "error";
  }
}

$("file").addEventListener("change", () => { if ($("file").files.length) analyse($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_checkpoint_option(p)
    p.add_argument("--host", default=config.SERVE_HOST, help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=config.SERVE_PORT, help="TCP port (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=config.SERVE_MAX_BYTES,
                   help="largest upload accepted, bytes (default: %(default)s)")
    p.add_argument("--wait-ms", type=float, default=config.SERVE_WAIT_MS,
                   help="how long a photo waits for others to share its batch (default: %(default)s)")
    p.add_argument("--photo-batch", type=int, default=config.DETECT_BATCH,
                   help="most photos in one batch (default: %(default)s)")
    p.add_argument("--detect-pixels", type=int, default=config.DETECT_PIXELS,
                   help="photo pixels per MTCNN call, and the largest photo accepted (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=config.SERVE_MAX_QUEUE,
                   help="most decoded photos waiting for the model; more get 503 (default: %(default)s)")
    p.add_argument("--min-score", type=float, default=config.DEMO_MIN_SCORE,
                   help="ignore detections whose MTCNN score is below this (default: %(default)s)")
    p.add_argument("--min-face", type=int, default=config.DEMO_MIN_FACE,
                   help="smallest face looked for, in pixels (default: %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="average each face with its mirror image (twice the network's work; a .onnx must be exported with --flip)")
    args = p.parse_args(argv)
    for name in ("max_bytes", "photo_batch", "detect_pixels", "max_queue"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.min_face < 12:
        p.error(f"--min-face {args.min_face}: must be at least 12 (MTCNN's window)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    predictor = Predictor(args.checkpoint, args.device, args.min_score, args.min_face, photo_batch=args.photo_batch,
                          detect_pixels=args.detect_pixels, flip=args.flip)
    app = make_app(predictor, str(args.checkpoint), args.max_bytes, args.wait_ms, args.max_queue)
    backend = "onnxruntime" if isinstance(predictor.model, OnnxModel) else f"torch on {predictor.device}"
    print(f"serving {args.checkpoint} ({backend}) on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    # a port in use: uvicorn logs "address already in use" and exits 3
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
