"""IMDB-WIKI metadata -> aligned faces + labels.csv.

    python pre_process.py --root data/imdb_crop --out data/imdb_112 --size 112
    torchrun --nproc_per_node=8 pre_process.py --device cuda ...   # the photos shared by 8 GPUs
    torchrun --nproc_per_node=4 pre_process.py --device cuda ...   # 4 processes on one GPU (or round robin)

Reads imdb.mat (or wiki.mat) under --root, computes each photo's age, filters, caps the number
of photos per age, detects the face and its 5 landmarks with MTCNN (face.py), aligns it onto the
ArcFace template and writes:
  OUT/faces/NN/<name>.jpg   the aligned faces (SIZE x SIZE, RGB JPEG)
  OUT/faces/settings.json   the --size and --fallback they were made with (a rerun must match)
  OUT/labels.csv            image,source,identity,age,gender,split  (gender: 1 male, 0 female)
  OUT/summary.json          counts kept and dropped per reason, the photos this run retried with MTCNN's
                            full pyramid (--min-face-fraction), the settings used, and per process
                            ("ranks") the photos it aligned, its device and where its align phase's seconds went:
                            waiting for photos, detecting and aligning, waiting for writes (also printed;
                            on a GPU a long wait for photos says to raise --workers)
  OUT/age_hist.png          the age distribution after the cap
  OUT/faces_{train,valid}.npy  every face of a split in one uint8 array (unless --no-pack, which deletes
                               old ones that no longer match), and faces_{train,valid}.json, the images each holds
Under torchrun each process aligns its share (RANK of WORLD_SIZE, GPU LOCAL_RANK, round robin where the
processes outnumber the GPUs: several may share one) and rank 0 writes
labels.csv, summary.json (with each rank's photos and seconds) and the packed arrays once all are done.
A rerun skips faces already written; labels.csv is written last, from what is on disk, so a
killed run loses nothing and a rerun ends with the same files. An array packed after its faces for the
same labels.csv is kept, not repacked. `--pack-only` packs an existing OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator

import numpy as np
from tqdm import tqdm

import config
from utils import (UserError, argument_parser, atomic_write_text, check_least, csv_text, in_background, map_ahead,
                   pick_device, process_device, pyplot, read_image, read_image_or_reason, run_main, save_figure,
                   write_jpeg, write_json)

FIELDS = ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")
PHOTO_WAIT_ADVICE = 20  # % of the align phase spent waiting for photos above which a GPU run advises more --workers


@dataclass
class Meta:
    """The per-photo columns of imdb.mat / wiki.mat that we use, as flat arrays of length N."""
    full_path: np.ndarray  # (N,) str, relative to the root
    dob: np.ndarray  # (N,) int64, MATLAB serial date number
    photo_taken: np.ndarray  # (N,) int64, year
    gender: np.ndarray  # (N,) float64: 1 male, 0 female, NaN unknown
    face_score: np.ndarray  # (N,) float64, -inf where no face was found
    second_face_score: np.ndarray  # (N,) float64, NaN where there is no second face
    identity: np.ndarray  # (N,) str: IMDB celeb_id, WIKI the id that starts the file name


# --- 1. metadata ---------------------------------------------------------------------------

def find_mat(root: Path, dataset: str | None) -> Path:
    """imdb.mat or wiki.mat under root, with errors a user can act on."""
    if not root.is_dir():
        raise UserError(f"--root {root}: no such folder; it should be the unpacked imdb_crop/ (or wiki_crop/) "
                        "holding imdb.mat and folders 00..99 (see README: Dataset)")
    names = [f"{dataset}.mat"] if dataset else ["imdb.mat", "wiki.mat"]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise UserError(f"--root {root}: no {' or '.join(names)} there; expected the unpacked imdb_crop/ (or "
                    "wiki_crop/) with its .mat file beside folders 00..99")


def load_meta(path: Path, dataset: str | None = None) -> tuple[str, Meta]:
    """Parse imdb.mat / wiki.mat as scipy.io.loadmat returns the real file: (dataset name, Meta)."""
    import scipy.io  # here: the spawned decode workers import this module, and only the parent reads the .mat

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for truncated or foreign files
        raise UserError(f"{path}: cannot be read as a MATLAB .mat file ({type(e).__name__}: {e}); "
                        "download it again") from e
    keys = [k for k in ("imdb", "wiki") if k in mat]
    name = dataset or (keys[0] if keys else None)
    if name not in mat:
        raise UserError(f"{path}: no top-level struct {name or 'imdb or wiki'!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    try:
        return name, meta_of(mat[name][0, 0], name, path)
    except (IndexError, TypeError, ValueError) as e:  # an empty struct or cell, a field of another shape
        raise UserError(f"{path}: struct {name!r} is not in {name}.mat's layout ({type(e).__name__}: {e}); "
                        "download it again") from e


def meta_of(struct: np.ndarray, name: str, path: Path) -> Meta:
    """load_meta's Meta from the struct loadmat gave; a missing field or one of another length is a UserError."""
    present = struct.dtype.names or ()
    fields = FIELDS + (("celeb_id",) if name == "imdb" else ())
    for field in fields:
        if field not in present:
            raise UserError(f"{path}: struct {name!r} lacks the field {field!r}")
    col = lambda f: struct[f].ravel()  # every per-photo field is a 1xN array
    full_path = np.array([str(p[0]) for p in col("full_path")])
    n = len(full_path)
    for field in fields:  # celeb_id too: one of another length would pair photos with other people's identities
        if col(field).shape[0] != n:
            raise UserError(f"{path}: field {field!r} has {col(field).shape[0]} entries, full_path has {n}")
    if name == "imdb":
        identity = col("celeb_id").astype(np.int64).astype(str)
    else:  # wiki: 17/10000217_1981-05-05_2009.jpg -> 10000217
        identity = np.array([Path(p).name.split("_")[0] for p in full_path])
    # cast before arithmetic: loadmat gives int32 / uint16 here, and uint16 - 2010 wraps around
    return Meta(full_path=full_path, dob=col("dob").astype(np.int64), photo_taken=col("photo_taken").astype(np.int64),
                gender=col("gender").astype(np.float64), face_score=col("face_score").astype(np.float64),
                second_face_score=col("second_face_score").astype(np.float64), identity=identity)


def age_at_photo(dob: int, photo_taken: int) -> int:
    """Age when the photo was taken, the photo assumed mid-year (the IMDB-WIKI authors' rule)."""
    # MATLAB datenum counts from year 0; a date past 9999 (a broken entry) is an age out of range, not a crash
    birth = dt.datetime.fromordinal(min(max(int(dob) - 366, 1), dt.date.max.toordinal()))
    return int(photo_taken) - birth.year - (0 if birth.month < 7 else 1)


def filter_meta(meta: Meta, root: Path, min_score: float, min_age: int, max_age: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ages (N,), keep mask (N,), dropped count per reason); the first failing rule names the drop."""
    ages = np.array([age_at_photo(d, t) for d, t in zip(meta.dob, meta.photo_taken)], dtype=np.int64)
    with np.errstate(invalid="ignore"):
        rules = [  # (reason, rows that fail it)
            ("face_score", ~(np.isfinite(meta.face_score) & (meta.face_score >= min_score))),
            ("second_face", ~np.isnan(meta.second_face_score)),
            ("gender_unknown", ~np.isin(meta.gender, (0.0, 1.0))),
            ("age_out_of_range", (ages < min_age) | (ages > max_age)),
        ]
    keep = np.ones(len(ages), dtype=bool)
    dropped = {}
    for reason, bad in rules:
        dropped[reason] = int((keep & bad).sum())
        keep &= ~bad
    # a stat per surviving file is cheap; decoding them all is not, so decoding is checked later
    # os.path, not pathlib: over 282,127 files pathlib took 1.8-2.6 s against 1.0, most of it building Path objects
    exists = np.array([k and os.path.isfile(os.path.join(root, p)) for k, p in zip(keep, meta.full_path)])
    dropped["missing_file"] = int((keep & ~exists).sum())
    if keep.any() and not exists.any():  # the .mat without its photos, or photos unpacked elsewhere
        raise UserError(f"--root {root}: none of the {int(keep.sum())} photos that pass the filters is there (e.g. "
                        f"{os.path.join(root, meta.full_path[keep][0])}); unpack imdb_crop.tar (or wiki_crop.tar) so "
                        "that its folders 00..99 sit beside the .mat")
    return ages, keep & exists, dropped


def cap_per_age(ages: np.ndarray, keep: np.ndarray, per_age: int, seed: int) -> np.ndarray:
    """Indices of at most per_age kept photos of each age, a seeded choice, in ascending order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for age in np.unique(ages[keep]):
        idx = np.flatnonzero(keep & (ages == age))
        chosen.append(rng.choice(idx, per_age, replace=False) if len(idx) > per_age else idx)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def assign_split(identity: np.ndarray, source: np.ndarray, mode: str, valid_fraction: float, seed: int) -> np.ndarray:
    """'train' / 'valid' per row: whole identities (default) or single photos (their source path).

    Each side comes from a seeded hash of the identity (or the photo) alone, never from its place
    in the selection: another --per-age, --limit or --min-face-score moves nobody across the split.
    """
    keys = identity if mode == "identity" else source
    return np.array(["valid" if unit_hash(seed, str(k)) < valid_fraction else "train" for k in keys], dtype="<U5")


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1), uniform over keys, that depends on (seed, key) only; stable across runs and platforms."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


# --- 2. faces --------------------------------------------------------------------------------

def face_path(full_path: str) -> str:
    """Where the aligned face of a source photo goes, relative to OUT."""
    return str(Path("faces") / Path(full_path).with_suffix(".jpg"))


def check_face_settings(out: Path, size: int, fallback: str) -> None:
    """Refuse to add faces to OUT/faces made at another --size or --fallback; record this run's for the next.

    A rerun keeps the faces already written, so a mismatch would silently mix two kinds of face.
    """
    record = out / "faces" / "settings.json"
    wanted = dict(size=size, fallback=fallback)
    first = next((out / "faces").rglob("*.jpg"), None)
    if first is None:
        made = {}  # nothing to mix with
    elif record.is_file():
        made = read_face_settings(record)
    else:  # faces written before the record existed: they tell their size, not their fallback
        made = dict(size=read_image(first).shape[0])
    if any(made.get(k, v) != v for k, v in wanted.items()):
        # data/imdb_112 -> data/imdb_224; a folder not named for its size gets the size added
        elsewhere = (str(out).removesuffix(f"_{made['size']}") + f"_{size}" if made.get("size", size) != size
                     else f"{out}_{fallback}")
        made_with = " ".join(f"--{k} {made[k]}" for k in wanted if k in made)
        raise UserError(f"{out / 'faces'} holds faces made with {made_with}; this run asks for --size {size} "
                        f"--fallback {fallback}, and a rerun keeps the faces already there, so the folder would mix "
                        f"both. Write to a folder of its own (e.g. --out {elsewhere}) or delete {out / 'faces'} to "
                        "remake every face")
    if made != wanted:
        write_json(record, wanted)


def read_face_settings(record: Path) -> dict:
    """OUT/faces/settings.json as written by check_face_settings; a damaged one is a UserError that says the fix."""
    try:
        made = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        made = None
    if not isinstance(made, dict):
        raise UserError(f"{record} is damaged (not the JSON object pre_process.py writes there); delete it and rerun: "
                        "the size is then read from the faces already written")
    return made


def align_all(todo: list[tuple[Path, Path]], size: int, fallback: str, device: str, workers: int,
              batch: int, quality: int, min_face_fraction: float = config.MIN_FACE_FRACTION,
              sort_batches: int = config.SORT_BATCHES,
              host_pyramids: bool = config.HOST_PYRAMIDS,
              prepare_in: str = config.PREPARE_IN) -> tuple[dict, int, dict[str, float]]:
    """Detect, align and write every (source, target) pair: (dropped count per reason, photos retried, PhaseClock
    seconds: where the time went).

    `workers` processes decode while MTCNN runs, but at most a batch or so ahead of it, and write
    the faces; the photos held at once (a few MB each at full size) stay bounded however many
    photos there are: the decode-ahead window, and `sort_batches` batches sorted by size (on a GPU,
    twice that: the next window is taken in while one is detected).
    Faces are looked for from min_face_fraction of each photo's short side up (0: from
    MTCNN's 20 px); a photo with none that large is retried with the full pyramid, with others
    like it, a batch of them at a time (held until then: at most a batch). host_pyramids: on a GPU, P-Net's
    pyramids are made on the host, with the shrinking (face.prepare_crop), not on the device. prepare_in: where
    prepare_crop runs: "threads" (on a GPU, `workers` threads of this process; on the CPU, inline) or "processes"
    (the decoding workers, as they decode).
    """
    # here, not at the top: the spawned decode workers import this module, and need neither
    import face
    import torch

    clock = PhaseClock()
    detector = face.FaceDetector(device=device)
    plan = detector.crop_plan(host_pyramids)
    in_decoders = prepare_in == "processes" and workers > 0
    dropped: dict[str, int] = {}
    retried = 0
    ahead = max(batch, 2 * workers)  # the next batch, and enough queued to keep every worker busy
    # on a GPU a thread takes the photos in, so that the next window is decoded (and prepared) while one is detected
    fed = workers > 0 and device.startswith("cuda")
    torch_threads = torch.get_num_threads()  # set back after: torch.set_num_threads is also every new thread's
    pool, shrinker = start_pools(workers, in_decoders, threaded=fed and not in_decoders)
    writes: deque[Future] = deque()
    undecoded = 0  # photos that failed to decode, already on the progress bar
    feed: Generator | None = None  # the thread taking decoded photos in, on a GPU
    try:
        with tqdm(total=len(todo), desc="align", unit="photo") as bar:
            searched = searched_photos(todo, pool, shrinker, in_decoders, plan, min_face_fraction, ahead)
            if fed:
                searched = feed = in_background(searched, batch * max(sort_batches, 1), "photo-feed")
            batches = size_sorted_batches(searched, batch, sort_batches, dropped)
            missed: list[tuple[Path, np.ndarray]] = []  # photos the crop search found no face in, to retry
            while True:
                with clock("photos"):  # decoded by the workers, shrunk by the threads or by the workers
                    chunk = next(batches, None)
                    if chunk is not None:
                        chunk = [(dst, img, None if s is None else s.result()) for dst, img, s in chunk]
                        clock.first_batch()
                with clock("detect"):
                    faces, missing = align_batch(detector, chunk, size, fallback == "center") if chunk else ([], [])
                    settled = len(chunk or ()) - len(missing)  # photos now with their face, or with none at all
                    missed += missing
                    retried += len(missing)
                    # the full pyramid, a batch at a time: one more MTCNN call per batch of them, not per batch
                    if missed and (chunk is None or len(missed) >= batch):
                        faces += align_full(detector, missed, size, fallback == "center")
                        settled, missed = settled + len(missed), []
                if len(faces) < settled:
                    dropped["no_face"] = dropped.get("no_face", 0) + settled - len(faces)
                for dst, pixels in faces:
                    writes.append(pool.submit(write_jpeg, dst, pixels, quality))
                with clock("writes"):  # bounded; a failed write raises here
                    while len(writes) > ahead or (writes and writes[0].done()):
                        writes.popleft().result()
                unread = sum(n for reason, n in dropped.items() if reason != "no_face") - undecoded
                bar.update(len(chunk or ()) + unread)
                undecoded += unread
                if chunk is None:
                    break
            with clock("writes"):
                while writes:
                    writes.popleft().result()
            bar.update(bar.total - bar.n)  # photos that failed to decode after the last batch
    except BrokenProcessPool as e:  # most often the kernel's OOM killer: a traceback would not say the fix
        # the other cause: a script that calls main() unguarded, which each spawned worker runs again as it starts
        raise UserError(f"a decoding process died: the faces written so far are kept, and the same command goes on "
                        f"from them; if the machine ran out of memory (`dmesg` names the OOM killer), give it fewer "
                        f"--workers than {workers}; if an error is printed above, a script of yours that calls "
                        f"pre_process.main needs `if __name__ == \"__main__\":` (the workers are spawned)") from e
    finally:
        if feed is not None:  # stopped before the pools it waits on
            feed.close()
        pool.shutdown(cancel_futures=True)
        shrinker.shutdown(cancel_futures=True)
        torch.set_num_threads(torch_threads)
    return dropped, retried, clock.total()


def start_pools(workers: int, in_decoders: bool, threaded: bool) -> tuple[Executor, Executor]:
    """align_all's executors: `workers` processes that decode the photos (and, in_decoders, prepare their searches),
    and, if threaded, `workers` threads of this process that prepare them (else inline)."""
    import face  # as in align_all
    import torch

    # spawn: fork after torch threads start can deadlock; Ctrl-C is the parent's to handle. The workers' functions are
    # other modules': this one may be __main__, which a worker cannot import under `python -m cProfile`
    initializer, initargs = (face.start_crop_worker, ()) if in_decoders else (signal.signal, (signal.SIGINT,
                                                                                              signal.SIG_IGN))
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs) if workers > 0 else _InlineExecutor()
    # threaded on a GPU: the threads shrink the photos for the search while this one feeds the device; on the CPU the
    # cores are torch's, and shrinking in threads beside it ran 16-19% slower (2 cores). Their torch ops (the
    # pyramids) each on its own thread: else each thread starts an OpenMP team as large as the machine (8 x 16 on a
    # GPU box); with 16 torch threads on 2 cores, 8 threads took 1.5x as long with 114 threads
    shrinker = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if threaded \
        else _InlineExecutor()
    return pool, shrinker


def searched_photos(todo: list[tuple[Path, Path]], pool: Executor, shrinker: Executor, in_decoders: bool,
                    plan: "face.CropPlan", fraction: float, ahead: int
                    ) -> Iterator[tuple[Path, np.ndarray | str, Future | None]]:
    """(target, photo or the reason it is unusable, the future of its face.prepare_crop) for each pair of todo, in
    order, decoded by pool `ahead` photos ahead; the searches prepared by the decoding processes (in_decoders) or by
    shrinker."""
    import face  # as in align_all

    targets, sources = (dst for _, dst in todo), (src for src, _ in todo)
    if in_decoders:
        read = functools.partial(face.read_for_search, plan=plan, fraction=fraction)
        prepared = map_ahead(pool, read, sources, ahead)
        return ((dst, img, _done(search)) for dst, (img, search) in zip(targets, prepared))
    photos = zip(targets, map_ahead(pool, read_image_or_reason, sources, ahead))
    return with_searches(shrinker, photos, plan, fraction)


class PhaseClock:
    """Wall seconds of align_all in each phase: waiting for photos (decoded, shrunk), detecting and aligning a batch
    (align_batch), waiting for writes; the rest (Python between them, the bar) is total less their sum. Also "first",
    the seconds from the start until the first batch was in hand (the detector's load, the workers' start-up and the
    first window's decoding: it overlaps "photos"), which a long run pays once: a short timed run can leave it out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(("photos", "detect", "writes"), 0.0)

    def first_batch(self) -> None:
        """Called when a batch is in hand: the first call sets "first"."""
        self.seconds.setdefault("first", time.perf_counter() - self.start)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - began

    def total(self) -> dict[str, float]:
        return dict(self.seconds, total=time.perf_counter() - self.start)


def phase_report(seconds: dict[str, float], device: str, workers: int) -> str:
    """One line of where the align phase's time went, and what to change when photos kept the device waiting."""
    total = seconds["total"] or 1.0
    share = {k: 100 * seconds[k] / total for k in ("photos", "detect", "writes")}
    first = f" (the first batch after {seconds['first']:.1f} s)" if "first" in seconds else ""
    line = (f"align: {seconds['total']:.1f} s{first}, waiting for photos {share['photos']:.0f}%, detecting and "
            f"aligning {share['detect']:.0f}%, waiting for writes {share['writes']:.0f}%")
    if device.startswith("cuda") and share["photos"] > PHOTO_WAIT_ADVICE:
        line += (f"; the GPU waited for photos: decoding is the bottleneck, raise --workers ({workers}) if there "
                 "are idle cores")
    return line


def with_searches(pool: Executor, photos: Iterable[tuple[Path, np.ndarray | str]], plan: "face.CropPlan",
                  fraction: float) -> Iterator[tuple[Path, np.ndarray | str, Future | None]]:
    """(target, photo or the reason it is unusable, the future of its face.prepare_crop), submitted as it comes.

    None where it is not searchable. Submitted when size_sorted_batches takes the photo into its window, a batch or
    more before its detection.
    """
    import face  # see align_all

    for dst, img in photos:
        usable = face.searchable(img, fraction)
        yield dst, img, pool.submit(face.prepare_crop, plan, img, fraction) if usable else None


def _done(value: object) -> Future | None:
    """A finished Future of value (None for None): a search made in a decoding worker, as with_searches' are."""
    return None if value is None else _InlineExecutor().submit(lambda: value)


def align_batch(detector: "face.FaceDetector", chunk: list[tuple[Path, np.ndarray, "face.CropSearch | None"]], size: int,
                center_fallback: bool) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, np.ndarray]]]:
    """([(target, aligned face (size, size, 3))] of the photos with a face, [(target, photo)] of those the crop
    search found none in, for align_full) for one batch.

    chunk: (target, photo, its face.prepare_crop, or None with min_face_fraction 0: then MTCNN's full pyramid, and
    nothing is missed). A function of its own so that no other decoded photo outlives its batch (the caller's
    locals would).
    """
    import face  # see align_all

    photos, searches = [(dst, img) for dst, img, _ in chunk], [search for _, _, search in chunk]
    if any(search is None for search in searches):
        return align_full(detector, photos, size, center_fallback), []
    found = face.search_crops(detector, searches)
    hits = [(photo, faces) for photo, faces in zip(photos, found) if len(faces)]
    return align_found(hits, size, center_fallback), [photo for photo, faces in zip(photos, found) if not len(faces)]


def align_full(detector: "face.FaceDetector", photos: list[tuple[Path, np.ndarray]], size: int,
               center_fallback: bool) -> list[tuple[Path, np.ndarray]]:
    """[(target, aligned face)] of the (target, photo) pairs with a face, looked for with MTCNN's full pyramid."""
    return align_found(list(zip(photos, detector.detect([img for _, img in photos]))), size, center_fallback)


def align_found(found: list[tuple[tuple[Path, np.ndarray], "face.Faces"]], size: int,
                center_fallback: bool) -> list[tuple[Path, np.ndarray]]:
    """[(target, aligned face)] of ((target, photo), its faces) pairs: the central face of each, if any."""
    import face  # see align_all

    aligned = [(dst, face.align_central(img, faces, size, center_fallback)) for (dst, img), faces in found]
    return [(dst, a["face"]) for dst, a in aligned if a is not None]


def size_sorted_batches(photos: Iterable[tuple[Path, np.ndarray | str, Future | None]], batch: int, sort_batches: int,
                        dropped: dict[str, int]) -> Iterator[list[tuple[Path, np.ndarray, Future | None]]]:
    """Batches of decoded (target, photo, its search), sorted by shape within windows of sort_batches batches.

    Photos of one shape share P-Net's tiles (its cost is the tile's area, padding included); the
    window bounds the photos held. A photo that failed to decode is counted in dropped instead.
    """
    window: list[tuple[Path, np.ndarray, Future | None]] = []
    for dst, img, search in photos:
        if isinstance(img, str):
            dropped[img] = dropped.get(img, 0) + 1
            continue
        window.append((dst, img, search))
        if len(window) == batch * max(sort_batches, 1):
            yield from _sorted_chunks(window, batch)
            window = []
    yield from _sorted_chunks(window, batch)


def _sorted_chunks(window: list[tuple[Path, np.ndarray, Future | None]], batch: int
                   ) -> Iterator[list[tuple[Path, np.ndarray, Future | None]]]:
    # by aspect, then area: faces sought from a fraction of the short side make a photo's pyramid a
    # function of its aspect alone; the full pyramid's grows with the area
    window.sort(key=lambda item: (item[1].shape[0] / item[1].shape[1], item[1].shape[0] * item[1].shape[1]))
    for start in range(0, len(window), batch):
        yield window[start:start + batch]


class _InlineExecutor(Executor):
    """Executor stand-in for --workers 0: decode in this process, when submitted (handy for debugging)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # delivered by result(), as a worker's would be
            future.set_exception(e)
        return future


# --- 3. outputs ------------------------------------------------------------------------------

def write_labels(out: Path, rows: list[dict]) -> None:
    """labels.csv, after deleting the packed arrays of the one it replaces (pack() writes new ones); one that already
    holds these rows is left as it is, so that a rerun with nothing new to align can keep its arrays."""
    from data_gen import LABEL_COLUMNS, remove_packed  # imported here: data_gen loads torch

    path = out / "labels.csv"
    text = csv_text(LABEL_COLUMNS, rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    remove_packed(out)
    atomic_write_text(path, text)


def plot_ages(path: Path, ages: np.ndarray, per_age: int) -> None:
    """Bar chart of photos per age, like the one in the original README."""
    fig, ax = pyplot().subplots(figsize=(10, 4))
    counts = np.bincount(ages, minlength=config.MAX_AGE + 1)
    ax.bar(np.arange(len(counts)), counts, width=1.0, color="#4C72B0")
    ax.set(xlabel="age (years)", ylabel="photos", title=f"Age distribution after the cap ({len(ages)} photos, at most {per_age} per age)")
    save_figure(fig, path)


def pack(out: Path, workers: int, write: bool = True) -> None:
    """Each split's faces_{split}.npy brought up to date: packed anew unless current (write), or else deleted unless
    current, so that no array outlives the labels.csv or the faces it was packed from."""
    from data_gen import SPLITS, pack_is_current, pack_split, read_labels, remove_packed  # see write_labels

    for split in SPLITS:
        if write:
            pack_split(out, split, workers)
        elif not pack_is_current(out, split, read_labels(out, split).images):
            remove_packed(out, (split,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--root", default=config.ROOT, help="unpacked imdb_crop/ or wiki_crop/ (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {config.DATA_FOR_SIZE}, a folder per dataset and size; {config.DATA} "
                        "for IMDB at the default size)")
    p.add_argument("--size", type=int, default=config.SIZE, help="aligned face side, 112 or 224 (default: %(default)s)")
    p.add_argument("--dataset", choices=("imdb", "wiki"), default=None,
                   help="which .mat to read (default: whichever of imdb.mat, wiki.mat is there)")
    p.add_argument("--per-age", type=int, default=config.PER_AGE, help="cap on photos per age (default: %(default)s)")
    p.add_argument("--min-face-score", type=float, default=config.MIN_FACE_SCORE, help="drop face_score below this (default: %(default)s)")
    p.add_argument("--valid-fraction", type=float, default=config.VALID_FRACTION, help="validation share (default: %(default)s)")
    p.add_argument("--split", choices=("identity", "image"), default=config.SPLIT, help="split by person or by photo (default: %(default)s)")
    p.add_argument("--fallback", choices=("drop", "center"), default=config.FALLBACK, help="when no face is found (default: %(default)s)")
    p.add_argument("--seed", type=int, default=config.SEED, help="seeds the cap and the split (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"decoding and writing processes, 0 = inline; packing's threads (default: {config.WORKERS} on "
                        f"the CPU; on CUDA up to "
                        f"{config.WORKERS_CUDA}, this process's share of the cores less one, at least {config.WORKERS})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"photos per MTCNN call (default: {config.DETECT_BATCH_CUDA} on CUDA, {config.DETECT_BATCH} on the CPU)")
    p.add_argument("--min-face-fraction", type=float, default=config.MIN_FACE_FRACTION,
                   help="look for faces from this fraction of each photo's short side up, retrying a photo without "
                        "one with MTCNN's full pyramid (0: the full pyramid only) (default: %(default)s)")
    p.add_argument("--host-pyramids", action=argparse.BooleanOptionalAction, default=config.HOST_PYRAMIDS,
                   help="on a GPU, the --workers threads make P-Net's pyramids on the host (the GPU's feeding thread "
                        "then runs fewer ops, but shares the GIL with them); off: the feeding thread resizes them on "
                        "the device; ignored on the CPU (default: %(default)s)")
    p.add_argument("--prepare-in", choices=("threads", "processes"), default=config.PREPARE_IN,
                   help="where each photo is shrunk for the search (and, with --host-pyramids on a GPU, its P-Net "
                        "pyramid made): threads, --workers threads beside the one feeding a GPU (inline on the CPU), "
                        "which share its GIL; processes, the --workers decoding processes, each then loading torch "
                        "(with --workers 0: inline) (default: %(default)s)")
    p.add_argument("--sort-batches", type=int, default=config.SORT_BATCHES,
                   help="decoded photos are sorted by size this many batches at a time (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="MTCNN device: auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--quality", type=int, default=config.JPEG_QUALITY, help="JPEG quality of the faces (default: %(default)s)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="also write faces_{train,valid}.npy for the fast loader, unless they are current "
                        "(default: %(default)s)")
    p.add_argument("--pack-only", action="store_true",
                   help="only pack an existing OUT, touching nothing else (a current array is kept: delete it to "
                        "repack)")
    p.add_argument("--limit", type=int, default=0, help="process only the first N photos after the cap, 0 = all (default: %(default)s)")
    args = p.parse_args(argv)
    check_least(p, args, dict(batch=1, per_age=1, limit=0, workers=0))
    if not 0 < args.valid_fraction < 1:
        p.error("--valid-fraction must be between 0 and 1 (the share of identities, or photos, kept for validation)")
    args.out = args.out or config.DATA_FOR_SIZE.format(dataset=dataset_of(Path(args.root), args.dataset), size=args.size)
    return args


def dataset_of(root: Path, dataset: str | None) -> str:
    """The dataset a run on root reads, which names its default --out: imdb where no .mat is there (the run then
    stops at find_mat, which says why)."""
    try:
        return find_mat(root, dataset).stem
    except UserError:
        return dataset or "imdb"


def detect_batch(device: str) -> int:
    """--batch's default on this device: more photos a call on a GPU, where each of a call's own ops is a launch."""
    return config.DETECT_BATCH_CUDA if device.startswith("cuda") else config.DETECT_BATCH


def decode_workers(device: str, local_processes: int) -> int:
    """--workers' default: on a GPU the decoding, writing (and shrinking threads) must keep up with the device, so up
    to WORKERS_CUDA within this process's share of the machine's cores less the one feeding the GPU; WORKERS on the
    CPU, whose cores MTCNN itself needs, and never fewer on a GPU."""
    if not device.startswith("cuda"):
        return config.WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(config.WORKERS, min(config.WORKERS_CUDA, cores // local_processes - 1))


def remove_stale_temp(out: Path) -> None:
    """Delete the temp files a killed run left: half faces in OUT/faces, half labels or packed arrays in OUT.

    A half packed array is GBs at full scale. Every writer here names its temp file .<name>.<tag>.tmp
    beside its target, and two runs into one OUT at once are not supported, so any such file is a dead run's.
    """
    for stale in [*out.glob(".*.tmp"), *(out / "faces").rglob(".*.tmp")]:
        stale.unlink()


def init_shards(device_name: str) -> tuple[int, int, str]:
    """(rank, world size, MTCNN device) under torchrun, or (0, 1, device) alone; LOCAL_RANK picks the GPU, round robin.

    gloo on any device: the processes only wait for each other and exchange a few counts.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world > 1:
        import torch  # here: the spawned decode workers import this module, and torch is heavy
        import torch.distributed as dist

        # more processes than GPUs share them: MTCNN's host glue, not the GPU, bounds one process (an H200
        # aligned 187 photos/s, 2 CPU cores 158)
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        device = process_device(device, world, int(os.environ.get("LOCAL_RANK", 0)), gpus)

        # a rank whose share was written before a kill waits for the others' whole run: no 30-minute default
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(days=7))
    return rank, world, str(device)


def on_rank0(world: int, rank: int, step: Callable[[], None]) -> None:
    """step() on rank 0 alone while the others wait; a UserError it raises is raised by every rank."""
    error = None
    if rank == 0:
        try:
            step()
        except UserError as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist  # see init_shards

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def gather(world: int, value: object) -> list:
    """Every rank's value, in rank order (the value alone in a single process); a barrier too."""
    if world == 1:
        return [value]
    import torch.distributed as dist  # see init_shards

    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_shards(args.device)
    try:
        run(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist  # see init_shards

            dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int, device: str) -> None:
    """main's work in process `rank` of `world`: its share of the photos; rank 0 also the outputs, at the end."""
    out = Path(args.out)
    if args.workers is None:  # torchrun's processes on this machine share its cores
        args.workers = decode_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if args.pack_only:
        if rank == 0:
            remove_stale_temp(out)
            if not (out / "labels.csv").is_file():
                raise UserError(f"--pack-only: {out / 'labels.csv'} not found; run pre_process.py without --pack-only first")
            pack(out, args.workers)
        return
    if args.batch is None:  # resolved here, so that summary.json's settings hold the batch used
        args.batch = detect_batch(device)
    if args.size < 32:
        raise UserError(f"--size {args.size}: too small to hold a face; use 112 or 224")
    if not 0 <= args.min_face_fraction < 1:
        raise UserError(f"--min-face-fraction {args.min_face_fraction}: use a fraction of the short side in [0, 1), "
                        f"e.g. {config.MIN_FACE_FRACTION} (0: search every face size from 20 px)")
    # before any rank writes: a stale temp file swept later could be another rank's live one
    on_rank0(world, rank, lambda: (remove_stale_temp(out), check_face_settings(out, args.size, args.fallback)))
    root = Path(args.root)
    mat = find_mat(root, args.dataset)
    if rank == 0:  # IMDB's 460,723 rows take ~9 s before the next line: say what happens meanwhile
        print(f"reading {mat} ({mat.stat().st_size / 2**20:.0f} MB) and looking for its photos under {root}", flush=True)
    name, meta = load_meta(mat, args.dataset)
    ages, keep, dropped = filter_meta(meta, root, args.min_face_score, config.MIN_AGE, config.MAX_AGE)
    chosen = cap_per_age(ages, keep, args.per_age, args.seed)
    dropped["over_cap"] = int(keep.sum()) - len(chosen)
    if args.limit:
        chosen = chosen[:args.limit]
    splits = assign_split(meta.identity[chosen], meta.full_path[chosen], args.split, args.valid_fraction, args.seed)
    if rank == 0:
        print(f"{name}: {len(meta.full_path)} photos, {int(keep.sum())} pass the filters, {len(chosen)} after the cap"
              + (f", shared by {world} processes" if world > 1 else ""))

    targets = [out / face_path(meta.full_path[i]) for i in chosen]
    # each rank's share depends on the selection alone, not on what is on disk, so a rerun splits it alike
    share = [(root / meta.full_path[i], t) for i, t in zip(chosen[rank::world], targets[rank::world])]
    todo = [(src, t) for src, t in share if not t.is_file()]
    if len(todo) < len(share):
        print(f"{len(share) - len(todo)} faces already written, skipped" + (f" (rank {rank})" if world > 1 else ""))
    aligned, retried, seconds = align_all(todo, args.size, args.fallback, device, args.workers, args.batch,
                                          args.quality, args.min_face_fraction, args.sort_batches, args.host_pyramids,
                                          args.prepare_in)
    if todo:
        print(phase_report(seconds, device, args.workers) + (f" (rank {rank})" if world > 1 else ""))
    ranks = gather(world, dict(dropped=aligned, retried=retried, photos=len(todo) - sum(aligned.values()),
                               device=device, seconds={k: round(v, 3) for k, v in seconds.items()}))
    if rank != 0:
        return
    for r in ranks:
        for reason, n in r["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n

    rows = [dict(image=face_path(meta.full_path[i]), source=meta.full_path[i], identity=meta.identity[i],
                 age=int(ages[i]), gender=int(meta.gender[i]), split=s)
            for i, s, t in zip(chosen, splits, targets) if t.is_file()]  # what is on disk is the truth
    kept_ages = np.array([r["age"] for r in rows], dtype=np.int64)
    plot_ages(out / "age_hist.png", kept_ages, args.per_age)
    write_json(out / "summary.json", dict(
        dataset=name, photos=len(meta.full_path), kept=len(rows), dropped=dropped,
        retried=sum(r["retried"] for r in ranks),
        train=sum(r["split"] == "train" for r in rows), valid=sum(r["split"] == "valid" for r in rows),
        male=sum(r["gender"] == 1 for r in rows), female=sum(r["gender"] == 0 for r in rows),
        size=args.size, settings=vars(args),
        ranks=[dict(rank=i, photos=r["photos"], device=r["device"], seconds=r["seconds"]) for i, r in enumerate(ranks)]))
    write_labels(out, rows)
    pack(out, args.workers, args.pack)
    print(f"wrote {len(rows)} faces to {out} ({sum(r['split'] == 'valid' for r in rows)} valid); dropped: "
          + (", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"))


if __name__ == "__main__":
    run_main(main)
