"""What a thread beside it costs the thread that feeds a GPU in pre_process.py, through the GIL, on a CPU.

    .venv/bin/python scripts/gil_cost.py

On a GPU the feeding thread's MTCNN glue is host work between launches: ~60 small ops a photo (at
--batch 64), each releasing the GIL for its dispatch and taking it back after. A thread that wants
the GIL meanwhile takes it at each release, so the feeding thread waits at each op for that thread
to let go. Stood in here by tiny torch ops on the CPU (dispatch only, as a launch), timed alone and
beside one thread of each kind, on the other core, alternately (both orders):
  - hashing: C work that holds no GIL (sha256 of 20 MB): what two busy cores cost anyway;
  - shrink: face.prepare_crop as on the CPU (one cv2 resize a photo: few GIL hand-offs);
  - shrink+pyramid: face.prepare_crop as on a GPU, which also makes P-Net's pyramid (host_pyramid:
    ~10 torch ops a level, 5-6 levels an IMDB-sized crop), as pre_process.py's --workers threads do;
  - small ops: torch ops on a 64 x 64 x 3 tensor, back to back;
  - shrink+pyramid in a process: the same work as pre_process.py's decode processes could do it, in an
    interpreter of its own (what is left is what two busy cores cost, as with hashing).
Prints the glue's time beside each, over its time alone. Not a CI test: about a minute of 2 cores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402  (after the path is set, as the repo's modules)
import torch  # noqa: E402

import face  # noqa: E402
from inference import ensure_samples  # noqa: E402
from synth_imdb import imdb_sized  # noqa: E402
from utils import argument_parser, read_image, run_main  # noqa: E402


def glue(ops: int) -> float:
    """Seconds for `ops` tiny torch ops with a little Python between them: the feeding thread's host work."""
    a, b, idx = torch.zeros(16), torch.ones(16), torch.arange(8)
    start = time.perf_counter()
    for i in range(ops // 4):
        a = (a + b)[idx].sum() * b  # four ops
        if i % 8 == 0:
            sum(float(x) for x in range(5))
    return time.perf_counter() - start


def imdb_photos() -> list[np.ndarray]:
    """48 photos at IMDB's sizes, made from the sample portraits (seeded)."""
    rng = np.random.default_rng(0)
    portraits = [read_image(path) for path in ensure_samples()]
    return [imdb_sized(rng, portraits[i % 3]) for i in range(48)]


def neighbours(photos: list[np.ndarray]) -> dict[str, Callable[[], object]]:
    """One unit of each neighbour's work, run in a loop on its thread."""
    on_cpu = face.FaceDetector(device="cpu").crop_plan()
    on_gpu = dataclasses.replace(on_cpu, pyramid=True)  # a GPU detector's: prepare_crop makes the pyramid too
    big, small = bytes(20_000_000), torch.rand(64, 64, 3)
    turn = iter(range(10**12))
    return {"hashing": lambda: hashlib.sha256(big).digest(),
            "shrink": lambda: face.prepare_crop(on_cpu, photos[next(turn) % len(photos)], 0.25),
            "shrink+pyramid": lambda: face.prepare_crop(on_gpu, photos[next(turn) % len(photos)], 0.25),
            "small ops": lambda: (small * 2 + 1).mean()}


PROCESS = "shrink+pyramid in a process"  # beside()'s work for the neighbour in a process of its own


def in_a_process(stop: mp.synchronize.Event, ready: mp.synchronize.Event) -> None:
    """shrink+pyramid's loop in a spawned process: ready once its photos and detector are made."""
    torch.set_num_threads(1)
    photos = imdb_photos()
    work = neighbours(photos)["shrink+pyramid"]
    ready.set()
    while not stop.is_set():
        work()


def beside(work: Callable[[], object] | str | None, ops: int, calls: int) -> float:
    """The glue's seconds over `calls` calls, with `work` looping meanwhile on a thread (a callable) or in a process
    (PROCESS), or alone (None)."""
    if work == PROCESS:
        ctx = mp.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Event()
        neighbour: threading.Thread | mp.process.BaseProcess | None = ctx.Process(target=in_a_process,
                                                                                 args=(stop, ready))
        neighbour.start()
        ready.wait()
    else:
        stop = threading.Event()

        def loop() -> None:
            torch.set_num_threads(1)
            while not stop.is_set():
                work()

        neighbour = threading.Thread(target=loop, daemon=True) if work else None
        if neighbour:
            neighbour.start()
    time.sleep(0.05)
    try:
        return sum(glue(ops) for _ in range(calls))
    finally:
        stop.set()
        if neighbour:
            neighbour.join()


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--ops", type=int, default=1500, help="ops per glue call (default: %(default)s)")
    p.add_argument("--calls", type=int, default=20, help="glue calls per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, each kind in turn, the order flipped "
                   "every other round (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work: dict[str, Callable[[], object] | str] = {**neighbours(imdb_photos()), PROCESS: PROCESS}
    beside(None, args.ops, 3)  # warm-up
    kinds = ["alone", *work]
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            seconds[kind].append(beside(work.get(kind), args.ops, args.calls))
    alone = sum(seconds["alone"])
    per_op = alone / (args.rounds * args.calls * args.ops) * 1e6
    print(f"the glue alone: {per_op:.2f} us an op ({args.rounds} rounds of {args.calls} x {args.ops} ops)")
    for kind in work:
        print(f"  beside {kind:28s} {sum(seconds[kind]) / alone:.2f}x as long")


if __name__ == "__main__":
    run_main(main)
