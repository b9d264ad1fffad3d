"""Measure the inference paths: a folder batched vs one photo at a time, and serve.py under load.

    python bench_inference.py folder --checkpoint runs/r18_112/best.onnx   # the batching ratio
    python bench_inference.py serve --checkpoint runs/r18_112/best.onnx    # requests/s, p50/p99
    python bench_inference.py folder --checkpoint runs/r18_112/best.pt --device cuda --crops 400   # photos/s on a GPU

folder: the sample portraits of images/ plus --crops built-in crops (synth_imdb.py's IMDB-WIKI
        look-alike photos, written to a temp folder), analysed by inference.Predictor (a) one
        photo at a time, read then analysed, as demo.py did, and (b) as a folder: decoded ahead in
        threads and analysed --photo-batch photos per MTCNN call and forward pass. The two are
        alternated over --repeats rounds after a warm-up; their face records must match on the CPU
        (inference.records_match: the same faces, each number within one unit of its last digit, as
        oneDNN's AVX-512 kernels round a little differently per batch size); on a GPU, where cuDNN's
        kernels depend on the batch's shape, they are compared and the verdict recorded. Prints ms
        per photo and photos/s of each and the ratio (one at a time / batched); --out writes them as
        JSON (bench.py reads it).
serve:  starts serve.py on a free port of 127.0.0.1 (loopback only), sends --requests POST /predict
        of the sample portraits from --clients concurrent clients, checks every answer is a 200 with
        the faces of that photo (records_match), prints requests/s and the p50/p99 latency, and
        stops the server.
Timings taken while other programs use the CPU are skewed: the script prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import config
from inference import Predictor, add_checkpoint_option, decoded, ensure_samples, list_images, records_match
from utils import REPO, UserError, argument_parser, read_image, read_image_or_reason, run_main, write_json

LOOPBACK = "127.0.0.1"


# --- folder: batched vs one at a time ------------------------------------------------------------

def builtin_crops(folder: Path, n: int) -> list[Path]:
    """n photos of the built-in dataset (synth_imdb.py, run as a user runs it) in folder; the usable ones."""
    if n <= 0:
        return []
    proc = subprocess.run([sys.executable, "synth_imdb.py", "--out", str(folder), "--n", str(n)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise UserError(f"synth_imdb.py failed: {proc.stderr.strip()[-500:]}")
    # its few dirty entries (empty, corrupt, missing) are left out: both modes would skip them alike
    return [p for sub in sorted(folder.iterdir()) if sub.is_dir() for p in list_images(sub)
            if isinstance(read_image_or_reason(p), np.ndarray)]


def one_at_a_time(predictor: Predictor, paths: list[Path]) -> list[list[dict]]:
    return [predictor.analyse(read_image(p)) for p in paths]


def batched(predictor: Predictor, paths: list[Path], workers: int) -> list[list[dict]]:
    return [faces for _, _, faces in predictor.analyse_stream(decoded(paths, workers))]


def bench_folder(args: argparse.Namespace) -> dict:
    predictor = Predictor(args.checkpoint, args.device, min_face=args.min_face, photo_batch=args.photo_batch)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        paths = ensure_samples(REPO / config.IMAGES) + builtin_crops(Path(tmp), args.crops)
        modes = {"one_at_a_time": lambda: one_at_a_time(predictor, paths),
                 "batched": lambda: batched(predictor, paths, args.workers)}
        for run in modes.values():  # warm-up: first calls allocate and pick kernels
            run()
        seconds = {name: [] for name in modes}
        results = {}
        for r in range(args.repeats):
            for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                t = time.perf_counter()
                results[name] = modes[name]()
                seconds[name].append(time.perf_counter() - t)
                print(f"  round {r + 1} {name:14s} {1000 * seconds[name][-1] / len(paths):7.1f} ms/photo", flush=True)
    identical = results["one_at_a_time"] == results["batched"]
    matching = all(records_match(a, b) for a, b in zip(results["one_at_a_time"], results["batched"]))
    ms = {name: 1000 * sum(s) / len(s) / len(paths) for name, s in seconds.items()}
    res = dict(photos=len(paths), faces=sum(len(f) for f in results["batched"]), ms_per_photo=ms,
               photos_per_s={name: 1000 / v for name, v in ms.items()}, ratio=ms["one_at_a_time"] / ms["batched"],
               identical=identical, matching=matching, device=str(predictor.device), photo_batch=args.photo_batch,
               workers=args.workers,
               load_average=os.getloadavg(), cpus=os.cpu_count())
    print(f"{len(paths)} photos ({res['faces']} faces) on {predictor.device}: one at a time "
          f"{ms['one_at_a_time']:.1f} ms/photo, batched {ms['batched']:.1f} ms/photo "
          f"({res['photos_per_s']['batched']:.0f} photos/s): {res['ratio']:.2f}x; results identical: {identical}, "
          f"matching: {matching}; "
          f"load average {res['load_average'][0]:.1f} on {res['cpus']} cores")
    if not matching and predictor.device.type == "cpu":
        raise UserError("batched and one-at-a-time results differ beyond rounding")
    return res


# --- serve: HTTP load -------------------------------------------------------------------------------

def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with one file field."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_image(url: str, data: bytes, filename: str = "photo.jpg", field: str = "image",
               timeout: float = 120) -> tuple[int, dict]:
    """(HTTP status, JSON body) of POST url with the photo as a multipart file field."""
    body, content_type = multipart(field, filename, data)
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_server(checkpoint: str | Path, *extra: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """serve.py on a free loopback port, as a user starts it; (process, base URL) once /health answers."""
    port = free_port()
    # serve.py runs in the repository: a relative checkpoint is the caller's, from the caller's folder
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(Path(checkpoint).absolute()),
                             "--host", LOOPBACK, "--port", str(port), *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"serve.py did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def same_answer(got: tuple[int, dict], want: tuple[int, dict]) -> bool:
    """Whether a /predict answer (status, body) is want's: its faces matching (records_match), the rest equal."""
    (status, body), (want_status, want_body) = got, want
    return status == want_status and body.keys() == want_body.keys() and all(
        records_match(body[k], want_body[k]) if k == "faces" else body[k] == want_body[k] for k in body)


def bench_serve(args: argparse.Namespace) -> dict:
    photos = {p.name: p.read_bytes() for p in ensure_samples(REPO / config.IMAGES)}
    names = list(photos)
    proc, url = start_server(args.checkpoint)
    try:
        expected = {name: post_image(url + "/predict", data, name) for name, data in photos.items()}  # also warms up

        def one(i: int) -> tuple[float, bool]:
            name = names[i % len(names)]
            t = time.perf_counter()
            status, body = post_image(url + "/predict", photos[name], name)
            return time.perf_counter() - t, same_answer((status, body), expected[name])

        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            done = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t
    finally:
        stop_server(proc)
    latency = np.array([d for d, _ in done]) * 1000
    right = sum(ok for _, ok in done)
    res = dict(requests=args.requests, clients=args.clients, right=right, seconds=wall, requests_per_s=args.requests / wall,
               p50_ms=float(np.percentile(latency, 50)), p99_ms=float(np.percentile(latency, 99)),
               load_average=os.getloadavg(), cpus=os.cpu_count())
    print(f"{args.requests} requests, {args.clients} clients: {res['requests_per_s']:.1f} requests/s, "
          f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms; {right} right answers; "
          f"load average {res['load_average'][0]:.1f} on {res['cpus']} cores")
    if right != args.requests:
        raise UserError(f"{args.requests - right} answers differ from the photo's answer alone")
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("mode", choices=("folder", "serve"))
    add_checkpoint_option(p)
    p.add_argument("--crops", type=int, default=40, help="folder: built-in crops added to the samples (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="folder: rounds of each mode (default: %(default)s)")
    p.add_argument("--photo-batch", type=int, default=config.DETECT_BATCH, help="folder: photos per batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=config.WORKERS, help="folder: decoding threads (default: %(default)s)")
    p.add_argument("--min-face", type=int, default=config.DEMO_MIN_FACE, help="smallest face, px (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="folder: cpu | cuda | cuda:N | auto (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    p.add_argument("--requests", type=int, default=400, help="serve: requests in all (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="serve: concurrent clients (default: %(default)s)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: not found; train one (make quickstart) or export one (export.py)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = bench_folder(args) if args.mode == "folder" else bench_serve(args)
    if args.out:
        write_json(args.out, res)
    return res


if __name__ == "__main__":
    run_main(main)
