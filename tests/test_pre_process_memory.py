"""pre_process.align_all decodes at most a batch or so ahead of detection (plus its size-sorting window), shrinks
the photos for the search on other threads, and writes the same faces."""
import threading
import time
import tracemalloc

import numpy as np
import pytest

import face
import pre_process
from utils import read_image, write_jpeg


@pytest.mark.parametrize("workers,sort_batches,device", [(1, 1, "cpu"), (0, 1, "cpu"), (1, 3, "cpu"), (1, 1, "cuda:0")])
def test_decoding_stays_a_window_ahead_of_detection(tmp_path, monkeypatch, workers, sort_batches, device):
    n, batch, side = 40, 4, 700
    photo_bytes = side * side * 3  # one decoded photo in the parent
    todo = []
    for i in range(n):
        src = tmp_path / "photos" / f"{i}.jpg"
        write_jpeg(src, np.full((side, side, 3), 6 * i, np.uint8))  # its own grey, to check the pairing
        todo.append((src, tmp_path / "faces" / f"{i}.jpg"))
    held = []  # decoded photos alive in the parent at each detection, from the bytes traced

    def slow_detect(detector, images, searches):
        time.sleep(0.1)  # detection is the slow step, so decoding has time to race ahead
        held.append(tracemalloc.get_traced_memory()[0] / photo_bytes)
        return images, [False] * len(images)

    monkeypatch.setattr(face, "FaceDetector", lambda device: None)
    monkeypatch.setattr(face, "detect_in_crops", slow_detect)
    shrunk_on = set()  # the threads the photos were shrunk on: off the detecting thread on a GPU with workers
    def prepare_crop(detector, img, fraction):
        shrunk_on.add(threading.current_thread())
        return "a search"  # a stand-in: None would mean the full pyramid

    monkeypatch.setattr(face, "prepare_crop", prepare_crop)
    monkeypatch.setattr(face, "align_central", lambda img, found, size, center: dict(face=np.ascontiguousarray(img[:size, :size])))
    tracemalloc.start()
    try:
        dropped, retried = pre_process.align_all(todo, 32, "drop", device, workers, batch, 95, sort_batches=sort_batches)
    finally:
        tracemalloc.stop()
    assert dropped == {} and retried == 0 and len(held) == n // batch
    assert (threading.main_thread() not in shrunk_on) == (workers > 0 and device.startswith("cuda")) and shrunk_on
    # the sorting window's batches and the next one decoded ahead of them (+ half a photo of bookkeeping);
    # the unbounded imap over every photo held 32 of the 40 here
    assert max(held) <= (sort_batches + 1) * batch + 0.5, [round(h, 1) for h in held]
    for i, (_, dst) in enumerate(todo):
        assert abs(read_image(dst).mean() - 6 * i) < 2  # every face written from its own photo, in order
