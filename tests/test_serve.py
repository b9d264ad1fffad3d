"""serve.py over HTTP on the loopback interface: answers, concurrency, bad uploads, ONNX, and the page in a browser."""
import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serve.py needs FastAPI: pip install -r requirements.txt")
pytest.importorskip("uvicorn", reason="serve.py needs uvicorn: pip install -r requirements.txt")

import inference
from bench_inference import free_port, post_image, start_server, stop_server
from utils import jpeg_bytes, read_image

SAMPLES = ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg")
MAX_BYTES = 200_000  # the samples are 60-100 kB; small enough that an oversized upload is cheap to send
MAX_PIXELS = 1_000_000  # the samples have at most 600 x 512; a few of them still share an MTCNN call


@pytest.fixture(scope="module")
def served(checkpoint, samples):
    """serve.py as a user starts it: (its process, its base URL)."""
    proc, url = start_server(checkpoint, "--max-bytes", str(MAX_BYTES), "--detect-pixels", str(MAX_PIXELS),
                              "--device", "cpu")
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


@pytest.fixture(scope="module")
def expected(checkpoint, samples):
    """Each sample's faces as inference.Predictor finds them, in this process."""
    predictor = inference.Predictor(checkpoint, "cpu")
    return {name: predictor.analyse(read_image(samples / name)) for name in SAMPLES}


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_predict_gives_the_faces_of_the_photo(server, checkpoint, samples, expected):
    status, body = post_image(server + "/predict", (samples / "astronaut.jpg").read_bytes(), "astronaut.jpg")
    assert status == 200
    assert body == dict(faces=expected["astronaut.jpg"], width=512, height=512)
    assert get_json(server + "/health") == (200, dict(status="ok", checkpoint=str(checkpoint), size=112, device="cpu",
                                                      backend="torch", flip=False))


def test_16_concurrent_requests_give_16_right_answers(server, samples, expected):
    photos = [SAMPLES[i % 3] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda name: post_image(server + "/predict", (samples / name).read_bytes(), name), photos))
    for name, (status, body) in zip(photos, answers):
        assert status == 200 and inference.records_match(body["faces"], expected[name]), name


def test_bad_uploads_get_4xx_and_the_service_keeps_serving(server, samples, expected, tmp_path):
    from test_read_image import dds_of_unknown_pixel_format

    cases = [(b"this is not a photo\n", "notes.jpg", "image", 415, "not an image"),
             (b"", "empty.jpg", "image", 400, "empty"),
             ((samples / "astronaut.jpg").read_bytes()[:5000], "cut.jpg", "image", 400, "truncated"),
             (dds_of_unknown_pixel_format(tmp_path / "t.dds").read_bytes(), "texture.dds", "image", 400, "corrupt"),
             (b"\xff" * (MAX_BYTES + 1), "big.jpg", "image", 413, "over the limit"),  # read, then refused
             (b"\xff" * (MAX_BYTES + 100_000), "huge.jpg", "image", 413, "over the limit"),  # refused by its length
             (jpeg_bytes(np.full((1000, 1200, 3), 90, np.uint8)), "wide.jpg", "image", 413, "1200x1000 pixels"),
             ((samples / "camera.jpg").read_bytes(), "camera.jpg", "photo", 400, "form field `image`")]
    for data, name, field, status, why in cases:
        got, body = post_image(server + "/predict", data, name, field=field)
        assert (got, list(body)) == (status, ["error"]), (name, got, body)
        assert why in body["error"], (name, body)
    request = urllib.request.Request(server + "/predict", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    status, body = post_image(server + "/predict", (samples / "camera.jpg").read_bytes(), "camera.jpg")
    assert status == 200 and body["faces"] == expected["camera.jpg"]


def test_an_onnx_checkpoint_is_run_by_onnxruntime(onnx_checkpoint, samples, expected):
    proc, url = start_server(onnx_checkpoint, "--device", "cpu")
    try:
        assert get_json(url + "/health")[1]["backend"] == "onnxruntime"
        status, body = post_image(url + "/predict", (samples / "grace_hopper.jpg").read_bytes(), "grace_hopper.jpg")
    finally:
        stop_server(proc)
    assert status == 200
    [face], [want] = body["faces"], expected["grace_hopper.jpg"]
    # MTCNN's nets in onnxruntime too: the same face to float rounding
    assert np.abs(np.subtract(face["box"], want["box"])).max() <= 0.02 and face["gender"] == want["gender"]
    assert abs(face["age"] - want["age"]) < 0.02 and abs(face["gender_prob"] - want["gender_prob"]) < 2e-4


def test_a_relative_checkpoint_is_found_from_the_callers_folder(checkpoint, monkeypatch):
    """start_server (bench_inference.py serve) runs serve.py in the repository, with the checkpoint as the caller
    named it from their own folder."""
    monkeypatch.chdir(checkpoint.parent)
    proc, url = start_server(checkpoint.name, "--device", "cpu")
    try:
        assert get_json(url + "/health")[1]["checkpoint"] == str(checkpoint)
    finally:
        stop_server(proc)


def test_photos_arriving_together_share_a_batch(checkpoint, samples, expected):
    """The inference thread takes the photos queued while it works as one batch: fewer forward passes than photos."""
    from serve import Batcher
    from test_inference import Counter

    predictor = inference.Predictor(checkpoint, "cpu", photo_batch=16)
    predictor.model = Counter(predictor.model)
    photos = [SAMPLES[i % 3] for i in range(16)]
    images = {name: read_image(samples / name) for name in SAMPLES}
    batcher = Batcher(predictor, wait_s=0.5)  # long enough that all 16 are queued before the first batch runs
    try:
        futures = [batcher.submit(images[name]) for name in photos]
        answers = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    assert all(inference.records_match(a, expected[name]) for a, name in zip(answers, photos))
    assert predictor.model.batches == [16]  # one forward pass of the 16 photos' 16 faces


def test_the_page_keeps_a_label_inside_the_photo():
    """The page's drawing code (run in Node.js on a stand-in canvas) puts a label inside a narrow photo, as demo.py
    does, for a face at its right edge, with room above it or not."""
    from serve import PAGE

    node = shutil.which("node")
    if node is None:
        pytest.skip("runs the page's drawing code in Node.js")
    script = PAGE.split("<script>")[1].split("async function analyse")[0].replace("__COLOURS__", "{}")
    harness = """
const rects = [];
const ctx = {measureText: (text) => ({width: 7 * text.length}), fillRect: (...r) => rects.push(r),
             drawImage() {}, strokeRect() {}, beginPath() {}, arc() {}, fill() {}, fillText() {}};
globalThis.document = {getElementById: () => ({getContext: () => ctx})};
const face = (y1) => ({box: [100, y1, 148, 148], landmarks: [], gender: "female", gender_prob: 0.97, age: 29,
                       age_low: null, age_high: null});
draw(null, {width: 150, height: 150, faces: [face(120), face(5)]});
console.log(JSON.stringify(rects));
"""
    proc = subprocess.run([node], input=script + harness, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rects = json.loads(proc.stdout)
    assert len(rects) == 2 and all(x >= 0 and y >= 0 and x + w <= 150 and y + h <= 150 for x, y, w, h in rects), rects


# --- the page in a real browser --------------------------------------------------------------

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def webdriver(base, method, path, payload=None):
    """One W3C WebDriver call to chromedriver: its `value`."""
    request = urllib.request.Request(base + path, method=method, data=None if payload is None else json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())["value"]


@pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
def test_the_page_draws_the_faces_in_a_browser(server, samples, expected, tmp_path):
    port = free_port()
    driver = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                webdriver(base, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        options = {"binary": BROWSER, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,760"]}
        session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})["sessionId"]
        s = f"/session/{session}"
        try:
            webdriver(base, "POST", s + "/url", {"url": server + "/"})
            element = webdriver(base, "POST", s + "/element", {"using": "css selector", "value": "#file"})
            webdriver(base, "POST", s + f"/element/{next(iter(element.values()))}/value",
                      {"text": str((samples / "astronaut.jpg").resolve())})
            script = """const c = document.getElementById('canvas'), f = arguments[0];
                return [document.body.dataset.state || '', document.getElementById('json').textContent,
                        document.getElementById('status').textContent, c.width, c.height,
                        f ? Array.from(c.getContext('2d').getImageData(f[0], f[1], 1, 1).data) : null];"""
            for _ in range(300):
                state, text, status, width, height, _ = webdriver(base, "POST", s + "/execute/sync", {"script": script, "args": [None]})
                if state in ("done", "error"):
                    break
                time.sleep(0.1)
            assert state == "done", status
            face = expected["astronaut.jpg"][0]
            assert json.loads(text) == dict(faces=[face], width=512, height=512)
            assert (width, height) == (512, 512) and "1 face(s)" in status and face["gender"] in status
            x1, y1, x2, y2 = face["box"]
            edge = [round(x1), round((y1 + y2) / 2)]  # on the box's left side, drawn in the gender's colour
            pixel = webdriver(base, "POST", s + "/execute/sync", {"script": script, "args": [edge]})[5]
            assert max(abs(a - b) for a, b in zip(pixel[:3], inference.COLOURS[face["gender"]])) < 40, pixel
            png = base64.b64decode(webdriver(base, "GET", s + "/screenshot"))
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            (tmp_path / "page.png").write_bytes(png)
            if os.environ.get("SERVE_SCREENSHOT"):  # the README's picture: SERVE_SCREENSHOT=images/readme/serve.png
                with open(os.environ["SERVE_SCREENSHOT"], "wb") as f:
                    f.write(png)
        finally:
            webdriver(base, "DELETE", s)
    finally:
        driver.terminate()
        driver.wait(timeout=20)


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams_in(server):
    """No Content-Length to refuse up front: past the limit the service answers at once, not at the body's end.

    The body sent is a well-formed start of a multipart upload, then 1 MiB of the file, with no
    closing boundary or chunk: a service that read on to the end of the body (as the form parser
    did, spooling the file to disk) would never answer.
    """
    host, port = server.removeprefix("http://").split(":")
    chunks = [b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
              b"Content-Type: image/jpeg\r\n\r\n"] + [b"\xff" * 65536] * 16  # 1 MiB, over 5 times the limit
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        with contextlib.suppress(ConnectionError):  # the service may close the connection after its answer
            for chunk in chunks:  # the socket buffers hold them all
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = http.client.HTTPResponse(conn)
        answer.begin()  # (a timeout here: the service waited for the rest of the body)
        status, body = answer.status, json.loads(answer.read())
    assert status == 413 and "over the limit" in body["error"], (status, body)


def gray_png(width, height):
    """A PNG of width x height gray pixels of one level, compressed row by row (140 kB for 12000 x 12000)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" + b"\x80" * width  # each row: filter type 0, then its pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def memory_kb(pid, key):
    """VmRSS or VmHWM (the peak) of a process, in kB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads a process's peak memory from Linux's /proc")
def test_a_photo_over_the_pixel_limit_is_refused_before_it_is_decoded(served):
    """A 140 kB PNG declaring 12000 x 12000 pixels (576 MB once decoded and made RGB) gets its 413 from its
    header: the server's peak memory does not grow by the photo."""
    proc, url = served
    data = gray_png(12000, 12000)
    assert len(data) < MAX_BYTES
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = memory_kb(proc.pid, "VmRSS")
    status, body = post_image(url + "/predict", data, "bomb.png")
    grew = memory_kb(proc.pid, "VmHWM") - before
    assert (status, list(body)) == (413, ["error"]) and "12000x12000 pixels, over the limit" in body["error"], body
    assert grew < 100_000, f"the server's peak memory grew by {grew / 1000:.0f} MB"


class Stalled:
    """A stand-in predictor whose inference waits for `release`, so that photos pile up in the queue."""
    photo_batch, detect_pixels, size, device, flip, model = 1, MAX_PIXELS, 112, "cpu", False, None

    def __init__(self):
        self.taken, self.release = threading.Event(), threading.Event()

    def analyse_stream(self, batch):
        self.taken.set()
        self.release.wait(60)
        for future, image in batch:
            yield future, image, []


def test_a_full_queue_answers_503_and_the_queued_photos_are_answered(samples):
    """With --max-queue 1 and the model busy on one photo, one more photo waits and the others get 503 at once."""
    import uvicorn

    from serve import make_app

    predictor, port = Stalled(), free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(predictor, "stalled.pt", max_queue=1), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, photo = f"http://127.0.0.1:{port}/predict", jpeg_bytes(np.full((64, 64, 3), 90, np.uint8))
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.05)
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(post_image, url, photo, "first.jpg")
            assert predictor.taken.wait(60)  # the model works on the first photo
            rest = [pool.submit(post_image, url, photo, f"{i}.jpg") for i in range(4)]
            refused, deadline = [], time.monotonic() + 60
            while len(refused) < 3:  # one of the four fits the queue; the other three are answered at once
                assert time.monotonic() < deadline, f"{len(refused)} of the 3 photos over the queue answered"
                refused = [f.result() for f in rest if f.done()]
                time.sleep(0.05)
            predictor.release.set()
            answers = [first.result(timeout=60)] + [f.result(timeout=60) for f in rest]
    finally:
        predictor.release.set()
        server.should_exit = True
        thread.join(timeout=30)
    assert sorted(status for status, _ in answers) == [200, 200, 503, 503, 503]
    for status, body in answers:
        if status == 503:
            assert list(body) == ["error"] and "waiting for the model (serve.py --max-queue)" in body["error"], body
        else:
            assert body == dict(faces=[], width=64, height=64)
