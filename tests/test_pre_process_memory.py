"""pre_process.align_all decodes at most a batch or so ahead of detection (plus its size-sorting window), shrinks
the photos for the search on other threads, writes the same faces, and says where its time went."""
import re
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import config
import face
import pre_process
from utils import REPO, read_image, write_jpeg


def grey_photos(root, n: int, side: int) -> list[tuple]:
    """align_all's todo: n photos, photo i all of grey 6 * i (to check the pairing), and the faces' targets."""
    todo = []
    for i in range(n):
        src = root / "photos" / f"{i}.jpg"
        write_jpeg(src, np.full((side, side, 3), 6 * i, np.uint8))
        todo.append((src, root / "faces" / f"{i}.jpg"))
    return todo


class NoNets:
    """align_all's detector without MTCNN's nets: its settings and its crop plan."""

    min_face_size, scale_factor = 20, 0.709
    crop_plan = face.FaceDetector.crop_plan

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)


def stand_in_mtcnn(monkeypatch) -> None:
    """align_all's MTCNN replaced: no nets, a stand-in search per photo, and the corner of each photo aligned as its
    face (so each written face shows which photo it came from); each test sets its own face.search_crops."""
    monkeypatch.setattr(face, "FaceDetector", NoNets)
    monkeypatch.setattr(face, "prepare_crop", lambda plan, img, fraction: "a search")
    monkeypatch.setattr(face, "align_central", lambda img, found, size, center: dict(face=img[:size, :size].copy()))


@pytest.mark.parametrize("workers,sort_batches,device,prepare_in", [
    (1, 1, "cpu", "threads"), (0, 1, "cpu", "threads"), (1, 3, "cpu", "threads"), (1, 1, "cuda:0", "threads"),
    (1, 1, "cuda:0", "processes")])  # a worker process prepares the searches: real ones, shrunk photos and pyramids
def test_decoding_stays_a_window_ahead_of_detection(tmp_path, monkeypatch, workers, sort_batches, device, prepare_in):
    n, batch, side = 40, 4, 700
    photo_bytes = side * side * 3  # one decoded photo in the parent
    todo = grey_photos(tmp_path, n, side)
    held = []  # decoded photos alive in the parent at each detection, from the bytes traced
    # what a photo comes with from a worker that prepares its search: its shrunk copy and P-Net's pyramid (measured:
    # 0.11 of the photo); the stand-in searches of the threads weigh nothing
    search = face.prepare_crop(NoNets("cuda:0").crop_plan(), np.zeros((side, side, 3), np.uint8),
                               config.MIN_FACE_FRACTION)
    per_photo = 1 + (search.image.nbytes + sum(p.nbytes for p in search.pyramid)) / photo_bytes \
        if prepare_in == "processes" else 1

    def slow_detect(detector, searches):
        time.sleep(0.1)  # detection is the slow step, so decoding has time to race ahead
        held.append(tracemalloc.get_traced_memory()[0] / photo_bytes)
        return [["a face"]] * len(searches)  # one in each

    stand_in_mtcnn(monkeypatch)
    monkeypatch.setattr(face, "search_crops", slow_detect)
    shrunk_on = set()  # the threads the photos were shrunk on: off the detecting thread on a GPU with workers
    torch_threads = set()  # and the torch threads each had for its ops (the pyramid's)

    def prepare_crop(plan, img, fraction):
        shrunk_on.add(threading.current_thread())
        torch_threads.add(torch.get_num_threads())
        return "a search"  # a stand-in: None would mean the full pyramid

    monkeypatch.setattr(face, "prepare_crop", prepare_crop)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # threads started from here on get 2 too, unless set otherwise
    tracemalloc.start()
    try:
        dropped, retried, seconds = pre_process.align_all(todo, 32, "drop", device, workers, batch, 95,
                                                          sort_batches=sort_batches, prepare_in=prepare_in)
        assert torch.get_num_threads() == 2  # as it was: set back
    finally:
        tracemalloc.stop()
        torch.set_num_threads(before)
    assert dropped == {} and retried == 0 and len(held) == n // batch
    assert seconds["detect"] >= 0.1 * n // batch  # the clock puts slow_detect's sleeps where they were
    if prepare_in == "processes":
        assert not shrunk_on  # all in the worker
    else:
        assert (threading.main_thread() not in shrunk_on) == (workers > 0 and device.startswith("cuda")) and shrunk_on
        # on a GPU, one each: else each thread's torch ops start an OpenMP team as large as the machine
        assert torch_threads == ({1} if workers > 0 and device.startswith("cuda") else {2})
    # the sorting window's batches and the next one decoded ahead of them (+ half a photo of bookkeeping); on a
    # GPU, also the next window and the photo the thread taking them in holds; the unbounded imap over every photo
    # held 32 of the 40 here
    next_window = sort_batches * batch + 1 if workers > 0 and device.startswith("cuda") else 0
    assert max(held) <= ((sort_batches + 1) * batch + next_window) * per_photo + 0.5, [round(h, 1) for h in held]
    for i, (_, dst) in enumerate(todo):
        assert abs(read_image(dst).mean() - 6 * i) < 2  # every face written from its own photo, in order


def test_on_a_gpu_the_next_window_is_decoded_while_one_is_detected(tmp_path, monkeypatch):
    """Decoding as fast as detection (2 workers) keeps the device busy: only the first window is waited for.

    Taken in by the consumer, decoding stalled at each window: the next window's photos, all but one
    batch of them, were submitted only after the last batch of the window was detected."""
    n, batch, sort_batches, workers, decode_s = 40, 4, 2, 2, 0.04
    todo = grey_photos(tmp_path, n, 64)
    stand_in_mtcnn(monkeypatch)

    def decode(path):
        time.sleep(decode_s)
        return read_image(path)

    def detect(detector, searches):  # a window's detection takes as long as decoding the next one
        time.sleep(decode_s * len(searches) / workers * 1.25)
        return [["a face"]] * len(searches)  # one in each

    # threads for the worker processes, which would not see the stand-ins
    monkeypatch.setattr(pre_process, "ProcessPoolExecutor", lambda n, **kwargs: ThreadPoolExecutor(n))
    monkeypatch.setattr(pre_process, "read_image_or_reason", decode)
    monkeypatch.setattr(face, "search_crops", detect)
    spent = pre_process.align_all(todo, 32, "drop", "cuda:0", workers, batch, 95, sort_batches=sort_batches)[2]
    decoding = n * decode_s / workers  # 0.8 s, of which the first window's 0.16 s must be waited for
    # taken in by the consumer: 0.48 s (0.16 + 4 windows x 4 photos x 0.02 s)
    assert spent["photos"] < 0.35 * decoding, spent
    for i, (_, dst) in enumerate(todo):
        assert abs(read_image(dst).mean() - 6 * i) < 2


def test_photos_the_crop_search_misses_are_retried_a_batch_at_a_time(tmp_path, monkeypatch):
    """The full pyramid gets one MTCNN call per batch of the photos the crop search missed (and one for the rest at
    the end), not one in every batch with a miss: on a GPU a call costs ~1,000 ops of host work whatever its size.
    Every photo still gets its face, from its own photo; one with none anywhere is counted."""
    todo = grey_photos(tmp_path, 24, 64)
    full_calls = []

    def number(img: np.ndarray) -> int:  # photo i is all grey 6 * i
        return round(float(img.mean()) / 6)

    class Detector(NoNets):
        def detect(self, images):
            full_calls.append(len(images))
            return [[] if number(img) == 21 else ["a face"] for img in images]  # photo 21 has none at all

    monkeypatch.setattr(face, "FaceDetector", Detector)
    monkeypatch.setattr(face, "prepare_crop", lambda plan, img, fraction: img)  # the search: the photo itself
    monkeypatch.setattr(face, "search_crops", lambda detector, searches: [[] if number(s) % 3 == 0 else ["a face"]
                                                                          for s in searches])  # misses 0, 3, 6, ...
    monkeypatch.setattr(face, "align_central",
                        lambda img, found, size, center: dict(face=img[:size, :size].copy()) if found else None)
    dropped, retried, _ = pre_process.align_all(todo, 32, "drop", "cpu", 0, 4, 95, sort_batches=1)
    assert retried == 8 and dropped == {"no_face": 1}
    assert full_calls == [4, 4]  # per batch of 4 it was [2, 1, 1, 2, 1, 1]
    for i, (_, dst) in enumerate(todo):
        assert not dst.exists() if i == 21 else abs(read_image(dst).mean() - 6 * i) < 2


def test_no_host_pyramids_leaves_the_pyramids_to_the_device(tmp_path, monkeypatch):
    """--no-host-pyramids (a GPU's feeding thread resizes P-Net's levels itself) reaches each photo's prepare_crop."""
    todo = grey_photos(tmp_path, 6, 64)
    stand_in_mtcnn(monkeypatch)
    asked = []
    monkeypatch.setattr(face, "prepare_crop", lambda plan, img, fraction: asked.append(plan.pyramid) or "a search")
    monkeypatch.setattr(face, "search_crops", lambda detector, searches: [["a face"]] * len(searches))
    for host in (True, False):
        asked.clear()
        pre_process.align_all(todo, 32, "drop", "cuda:0", 0, 4, 95, sort_batches=1, host_pyramids=host)
        assert asked == [host] * len(todo)
    assert pre_process.parse_args([]).host_pyramids is config.HOST_PYRAMIDS is True
    assert pre_process.parse_args(["--no-host-pyramids"]).host_pyramids is False


def test_a_failed_detection_on_a_gpu_stops_the_thread_taking_photos_in(tmp_path, monkeypatch):
    """The error reaches the caller, and neither the thread taking the photos in nor its pools outlive align_all."""
    todo = grey_photos(tmp_path, 24, 64)
    stand_in_mtcnn(monkeypatch)
    calls = []

    def detect(detector, searches):
        calls.append(len(searches))
        if len(calls) == 2:
            time.sleep(0.3)  # the thread fills its queue meanwhile, and waits for room
            raise RuntimeError("CUDA error: an illegal memory access")
        return [["a face"]] * len(searches)  # one in each

    monkeypatch.setattr(face, "search_crops", detect)
    before = set(threading.enumerate())
    try:
        pre_process.align_all(todo, 32, "drop", "cuda:0", 2, 4, 95, sort_batches=1)
    except RuntimeError as e:
        caught = e  # held, as a caller's handler would: its traceback keeps align_all's generators alive
    assert "illegal memory access" in str(caught) and calls == [4, 4]
    assert not [t.name for t in set(threading.enumerate()) - before if t.name != "tqdm_monitor"]  # tqdm's own


def test_feed_speed_runs_a_tree_s_align_phase_with_the_stand_in_detector(tmp_path, monkeypatch):
    """scripts/feed_speed.py's run of a tree (here this one): every photo of every repeat goes through, the stand-in's
    sleeps are in the time, and the phase split comes back."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import feed_speed

    rng = np.random.default_rng(0)
    for i in range(6):  # noise: a JPEG over feed_speed's 1000 bytes, under which a file counts as a planted broken one
        write_jpeg(tmp_path / "photos" / f"{i % 2:02d}" / f"{i}.jpg", rng.integers(0, 255, (300, 200, 3), np.uint8))
    run = feed_speed.feed(REPO, dict(detect_s=0.02, workers=1, batch=4, repeat=2, root=str(tmp_path / "photos"),
                                     out=str(tmp_path / "out")))
    assert run["photos"] == 12 and run["seconds"] >= 12 * 0.02, run
    assert run["report"].startswith("align: ") and "detecting and aligning" in run["report"]
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 12


def test_the_align_clock_says_where_the_time_went(tmp_path, monkeypatch):
    """Slow decoding shows as waiting for photos, slow detection as detecting and aligning; on a GPU the first is
    reported with the advice to raise --workers, the second without. The wait for the first batch is told apart."""
    todo = grey_photos(tmp_path, 8, 64)
    stand_in_mtcnn(monkeypatch)

    def seconds(decode_s: float, detect_s: float) -> dict:
        def decode(path):
            time.sleep(decode_s)
            return read_image(path)

        def detect(detector, searches):
            time.sleep(detect_s)
            return [["a face"]] * len(searches)  # one in each

        monkeypatch.setattr(pre_process, "read_image_or_reason", decode)  # --workers 0 decodes in this process
        monkeypatch.setattr(face, "search_crops", detect)
        spent = pre_process.align_all(todo, 32, "drop", "cuda:0", 0, 4, 95, sort_batches=1)[2]
        assert sum(v for k, v in spent.items() if k not in ("total", "first")) <= spent["total"]
        assert 0 < spent["first"] <= spent["total"]  # from the start, so it overlaps "photos" but is not within it
        return spent

    decoding = seconds(0.1, 0)  # 8 photos
    assert decoding["photos"] >= 0.8 and decoding["photos"] > 5 * decoding["detect"]
    # after its 4 photos (and the 3 that --workers 0 decodes ahead when asked for them), before all 8: 0.7 s, one
    # photo's 0.1 s of slack for a loaded machine (at 0.05 s a photo the slack was 50 ms)
    assert 0.4 <= decoding["first"] < 0.8
    assert f"(the first batch after {decoding['first']:.1f} s)" in pre_process.phase_report(decoding, "cuda:0", 0)
    assert int(re.search(r"waiting for photos (\d+)%", pre_process.phase_report(decoding, "cuda:0", 0))[1]) >= 50
    assert "raise --workers (0)" in pre_process.phase_report(decoding, "cuda:0", 0)
    assert "raise --workers" not in pre_process.phase_report(decoding, "cpu", 0)  # there the cores are MTCNN's
    detecting = seconds(0, 0.2)  # 2 batches
    assert detecting["detect"] >= 0.4 and detecting["detect"] > 5 * detecting["photos"]
    assert "raise --workers" not in pre_process.phase_report(detecting, "cuda:0", 0)
