"""pre_process.py against what a week-long IMDB job meets: odd images, bad files, SIGKILL, reruns."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pre_process
import utils
from synth_imdb import generate
from test_data_gen import make_fake_data
from utils import REPO, read_image


def labels(out: Path) -> list[dict]:
    with open(out / "labels.csv") as f:
        return list(csv.DictReader(f))


def test_unusual_but_valid_images_are_used(tmp_path):
    root, out = tmp_path / "crop", tmp_path / "out"
    _, truth = generate(root, 8, seed=11, dirty_fraction=0.0)
    paths = sorted(truth)
    rgb = {p: Image.open(root / p).convert("RGB") for p in paths}
    odd = {}

    def save(i, kind, image, fmt):
        image.save(root / paths[i], format=fmt)
        odd[paths[i]] = kind

    save(0, "grayscale", rgb[paths[0]].convert("L"), "JPEG")
    save(1, "cmyk", rgb[paths[1]].convert("CMYK"), "JPEG")
    save(2, "rgba png", rgb[paths[2]].convert("RGBA"), "PNG")
    save(3, "png under .jpg", rgb[paths[3]], "PNG")
    im = rgb[paths[4]]
    save(4, "very large", im.resize((im.width * 12, im.height * 12)), "JPEG")  # ~2400 px
    save(5, "very small", im.resize((72, 72)), "JPEG")
    w, h = rgb[paths[6]].size  # cut the photo so the face touches the left and top edges
    save(6, "face at the border", rgb[paths[6]].crop((int(w * 0.3), int(h * 0.28), w, h)), "JPEG")
    pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0", "--no-pack"])
    used = {r["source"] for r in labels(out)}
    assert {kind for p, kind in odd.items() if p not in used} == set()
    for r in labels(out):
        assert read_image(out / r["image"]).shape == (112, 112, 3)


def test_photos_too_small_for_a_face_are_no_face_or_centred(tmp_path, capsys):
    """IMDB-WIKI holds placeholder photos of a pixel or a few: no face is found in them, so --fallback drop counts
    them and --fallback center keeps them, stretched to the face size, and then nothing is dropped."""
    root = tmp_path / "crop"
    _, truth = generate(root, 3, seed=13, dirty_fraction=0.0)
    for path, size in zip(sorted(truth), [(1, 1), (3, 2), (1, 400)]):
        Image.new("RGB", size, (128, 0, 0)).save(root / path, format="JPEG")
    for fallback in ("drop", "center"):
        out = tmp_path / fallback
        pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0", "--no-pack",
                          "--fallback", fallback])
        dropped = json.loads((out / "summary.json").read_text())["dropped"]
        assert dropped.get("no_face", 0) == (3 if fallback == "drop" else 0)
        assert [read_image(out / r["image"]).shape for r in labels(out)] == [(112, 112, 3)] * (fallback == "center") * 3
    assert capsys.readouterr().out.rstrip().endswith(f"wrote 3 faces to {out} (0 valid); dropped: none")


def test_broken_files_are_counted_and_the_run_goes_on(tmp_path):
    root, out = tmp_path / "crop", tmp_path / "out"
    _, truth = generate(root, 8, seed=12, dirty_fraction=0.0)
    paths = sorted(truth)
    (root / paths[0]).write_bytes(b"")
    (root / paths[1]).write_text("not an image at all")
    data = (root / paths[2]).read_bytes()
    (root / paths[2]).write_bytes(data[: len(data) // 3])  # truncated JPEG
    pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "1", "--no-pack"])
    dropped = json.loads((out / "summary.json").read_text())["dropped"]
    assert (dropped["empty"], dropped["not_image"], dropped["truncated"]) == (1, 1, 1)
    assert {r["source"] for r in labels(out)}.isdisjoint(paths[:3])
    assert len(labels(out)) >= 4


@pytest.mark.parametrize("argv, words", [
    (["--root", "{tmp}/nope"], "no such folder"),
    (["--root", "{tmp}"], "no imdb.mat or wiki.mat"),
    (["--out", "{tmp}/x", "--pack-only"], "run pre_process.py without --pack-only"),
])
def test_user_errors_are_one_line(tmp_path, argv, words):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "pre_process.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def run(root, out, *extra):
    return [sys.executable, "pre_process.py", "--root", str(root), "--out", str(out), "--device", "cpu",
            "--workers", "1", "--batch", "4", *extra]


def test_sigkill_then_rerun_gives_the_uninterrupted_labels(tmp_path):
    root = tmp_path / "crop"
    generate(root, 64, seed=13, dirty_fraction=0.1)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(run(root, whole), cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen(run(root, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("faces/*/*.jpg"))) < 12:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too, as a kill of the whole job would
    proc.wait()
    n_before = len(list(killed.glob("faces/*/*.jpg")))
    assert 12 <= n_before < len(labels(whole)), "the kill must land mid-run"
    assert not (killed / "labels.csv").exists()  # the label file is written last
    stale = next(killed.glob("faces/*/")) / ".x.jpg.abc123.tmp"  # as a kill mid-write leaves
    stale.write_bytes(b"\xff\xd8half")
    (killed / f".faces_train.npy.{dead_pid()}.tmp").write_bytes(b"\x93NUMPY half")  # as a kill mid-pack leaves
    subprocess.run(run(root, killed), cwd=REPO, check=True, capture_output=True)
    assert (killed / "labels.csv").read_text() == (whole / "labels.csv").read_text()
    assert not list(killed.rglob("*.tmp"))  # no half-written file survives the rerun
    for r in labels(killed):
        assert np.array_equal(read_image(killed / r["image"]).shape, (112, 112, 3))
    for split in ("train", "valid"):
        # batches differ after a rerun, and batched MTCNN equals per-photo MTCNN only to ~1e-5 px,
        # which can move a rounding in the warp: the same faces, not always the same bytes
        a, b = (np.load(d / f"faces_{split}.npy").astype(int) for d in (killed, whole))
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pack_only_removes_what_a_killed_pack_left(tmp_path):
    data = make_fake_data(tmp_path / "data", n_train=5, n_valid=3)
    half = [data / f".faces_{split}.npy.{dead_pid()}.tmp" for split in ("train", "valid")]
    for path in half:
        path.write_bytes(b"\x93NUMPY" + bytes(4096))  # GBs at full scale
    (data / ".labels.csv.k2j4l1.tmp").write_text("image,source")  # a kill inside atomic_write_bytes
    pre_process.main(["--out", str(data), "--pack-only"])
    assert not list(data.rglob("*.tmp"))
    assert np.load(data / "faces_valid.npy").shape == (3, 32, 32, 3)


def die(path) -> None:
    """A decoding worker killed mid-photo, as the kernel's OOM killer kills one."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_decoding_worker_is_a_user_error_that_says_the_fix(tmp_path, monkeypatch, capsys):
    """One line that says what happened, that the faces written are kept and the rerun goes on, and the fix; not
    concurrent.futures' traceback."""
    root = tmp_path / "crop"
    generate(root, 8, seed=17, dirty_fraction=0.0)
    monkeypatch.setattr(pre_process, "read_image_or_reason", die)  # the spawned worker imports this module for it
    with pytest.raises(SystemExit) as stopped:
        pre_process.run_main(lambda: pre_process.main(["--root", str(root), "--out", str(tmp_path / "out"),
                                                       "--device", "cpu", "--workers", "1"]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: a decoding process died") and "fewer --workers than 1" in err, err
    assert "the same command goes on" in err and 'if __name__ == "__main__":' in err


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_completes(tmp_path, monkeypatch, capsys):
    """ENOSPC halfway through the faces: one line that names the face being written and says to free space and go on,
    no temp file left; the same command, run again with space, ends with the labels of a run never stopped."""
    root = tmp_path / "crop"
    generate(root, 16, seed=19, dirty_fraction=0.0)
    argv = lambda out: ["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0", "--no-pack"]
    pre_process.main(argv(tmp_path / "whole"))
    fsync, synced = os.fsync, []

    def full_disk(fd):
        synced.append(fd)
        if len(synced) > 6:  # the 7th file (faces/settings.json, then faces): the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", full_disk)
    with pytest.raises(SystemExit) as stopped:
        utils.run_main(lambda: pre_process.main(argv(tmp_path / "out")))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: no space left on the device writing {tmp_path / 'out' / 'faces'}"), err
    assert err.endswith(".jpg (No space left on device): free some space (or write elsewhere) and go on from the "
                        "files written before it, which are complete"), err
    assert 0 < len(list((tmp_path / "out").rglob("*.jpg"))) < len(labels(tmp_path / "whole"))  # stopped midway
    assert not list((tmp_path / "out").rglob("*.tmp"))
    monkeypatch.undo()
    pre_process.main(argv(tmp_path / "out"))
    assert labels(tmp_path / "out") == labels(tmp_path / "whole")


@pytest.mark.parametrize("refusal, said", [
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied; give this user access to it, or "
                                                               "choose another path"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "on a read-only file system; choose another path"),
])
def test_an_output_folder_this_user_cannot_write_is_one_line(tmp_path, monkeypatch, capsys, refusal, said):
    """A permission refused or a read-only file system (here on the first file written into --out; root ignores
    chmod, so the refusal is made up) is one line naming the path, not a traceback."""
    root, out = tmp_path / "crop", tmp_path / "out"
    generate(root, 4, seed=23, dirty_fraction=0.0)

    def refused(dir, prefix, suffix):
        raise type(refusal)(refusal.errno, refusal.strerror, str(dir))

    monkeypatch.setattr(utils.tempfile, "mkstemp", refused)
    with pytest.raises(SystemExit) as stopped:
        utils.run_main(lambda: pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu"]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {out / 'faces'}: {said}"


def test_a_disk_too_full_for_a_packed_array_is_one_line_not_a_bus_error(tmp_path, monkeypatch, capsys):
    """The array is written through a memory map: into a sparse file on a full disk, the kernel kills the process
    with SIGBUS (no message, a GB-sized temp file left). Its blocks are allocated first, so a full disk is the usual
    line, naming the array, and the temp file is gone (posix_fallocate made to fail: a full disk cannot be made here)."""
    data = make_fake_data(tmp_path / "data", n_train=5, n_valid=3)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(SystemExit) as stopped:
        utils.run_main(lambda: pre_process.main(["--out", str(data), "--pack-only"]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: no space left on the device writing {data / 'faces_train.npy'} "), err
    assert not list(data.glob("*.npy")) and not list(data.glob(".*.tmp"))


def test_a_broken_face_says_to_delete_it_as_a_rerun_keeps_what_is_there(tmp_path, capsys):
    """A face cut short after it was written (a copy interrupted): a rerun skips it, as it is there, so "rerun"
    alone would go round in circles."""
    data = make_fake_data(tmp_path / "data", n_train=5, n_valid=3)
    face = data / "faces" / "00" / "2.jpg"
    face.write_bytes(face.read_bytes()[:300])
    with pytest.raises(SystemExit):
        utils.run_main(lambda: pre_process.main(["--out", str(data), "--pack-only"]))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {face}: truncated") and "delete it and rerun pre_process.py" in err, err
