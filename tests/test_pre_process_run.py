"""pre_process.py end to end on the built-in dataset: outputs, drop counts, alignment, rerun."""
import csv
import json
import shutil

import numpy as np
import pytest

import config
import pre_process
from synth_imdb import generate
from utils import UserError, read_image, write_jpeg

N = 48


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    counts, truth = generate(root, N, seed=5, dirty_fraction=0.25)
    out = tmp_path_factory.mktemp("faces")
    pre_process.main(["--root", str(root), "--out", str(out), "--size", "112", "--device", "cpu",
                      "--workers", "1", "--valid-fraction", "0.3"])
    return root, out, counts, truth


def read_labels(out):
    with open(out / "labels.csv") as f:
        return list(csv.DictReader(f))


def test_outputs_and_drop_counts(built):
    root, out, counts, _ = built
    rows = read_labels(out)
    summary = json.loads((out / "summary.json").read_text())
    d = summary["dropped"]
    # every dirty entry the generator planted is dropped under its own reason
    assert d["face_score"] == counts["no_face_score"]
    assert d["second_face"] == counts["second_face"]
    assert d["gender_unknown"] == counts["gender_unknown"]
    assert d["age_out_of_range"] == counts["age_out_of_range"]
    assert d["missing_file"] == counts["missing_file"]
    assert d.get("empty", 0) == counts["empty_file"] and d.get("not_image", 0) == counts["corrupt_file"]
    # MTCNN misses the odd profile view of camera(), as it misses some real photos
    assert d.get("no_face", 0) <= 0.1 * counts["clean"]
    assert len(rows) == counts["clean"] - d.get("no_face", 0) == summary["kept"]
    assert set(rows[0]) >= {"image", "source", "identity", "age", "gender", "split"}
    assert {r["split"] for r in rows} == {"train", "valid"}
    for r in rows:
        face = read_image(out / r["image"])
        assert face.shape == (112, 112, 3)
        assert 0 <= int(r["age"]) <= 100 and r["gender"] in ("0", "1")
        assert (root / r["source"]).is_file()
    assert (out / "age_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["settings"]["batch"] == config.DETECT_BATCH  # --batch's default on the CPU, as it was resolved


def test_ages_match_the_generator(built):
    """The ages and genders pre_process derives from the .mat are the ones the generator painted."""
    _, out, _, truth = built
    for r in read_labels(out):
        age, male = truth[r["source"]]
        assert (int(r["age"]), int(r["gender"])) == (age, int(male))


def test_aligned_faces_land_on_the_template(built):
    """Detecting the aligned face again puts its landmarks on the ArcFace template."""
    from face import FaceDetector, template
    _, out, _, _ = built
    rows = read_labels(out)[:6]
    faces = FaceDetector().detect([read_image(out / r["image"]) for r in rows])
    errors = [np.abs(f.landmarks[0] - template(112)).max() for f in faces]
    assert np.median(errors) < 6, errors  # JPEG, painted cues and re-detection noise; not exact


def test_packed_arrays_match_labels(built):
    _, out, _, _ = built
    rows = read_labels(out)
    for split in ("train", "valid"):
        arr = np.load(out / f"faces_{split}.npy", mmap_mode="r")
        mine = [r for r in rows if r["split"] == split]
        assert arr.shape == (len(mine), 112, 112, 3) and arr.dtype == np.uint8
        assert np.array_equal(arr[0], read_image(out / mine[0]["image"]))


def test_rerun_skips_finished_faces_and_keeps_current_arrays(built, capsys):
    root, out, _, _ = built
    written = [*(out / "faces").rglob("*.jpg"), out / "labels.csv", out / "faces_train.npy", out / "faces_valid.npy"]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    pre_process.main(["--root", str(root), "--out", str(out), "--size", "112", "--device", "cpu",
                      "--workers", "0", "--valid-fraction", "0.3"])
    said = capsys.readouterr().out
    # the metadata stage's line comes first: at IMDB's size the next one takes ~9 s
    assert said.startswith(f"reading {root / 'imdb.mat'} (") and f"{len(stamps) - 3} faces already written" in said
    assert said.count("up to date with labels.csv") == 2, said
    assert {p: p.stat().st_mtime_ns for p in written} == stamps  # no face, labels.csv or array written again


def test_a_face_aligned_again_is_packed_again(built, capsys):
    """A rerun that writes a face again (here: one deleted) drops the array that held the old one under --no-pack,
    keeps the other split's, and repacks it when packing."""
    root, out, _, _ = built
    row = read_labels(out)[0]
    other = "valid" if row["split"] == "train" else "train"
    kept_at = (out / f"faces_{other}.npy").stat().st_mtime_ns
    (out / row["image"]).unlink()
    argv = ["--root", str(root), "--out", str(out), "--size", "112", "--device", "cpu", "--workers", "0",
            "--valid-fraction", "0.3"]
    pre_process.main([*argv, "--no-pack"])
    assert (out / row["image"]).is_file() and read_labels(out)[0] == row
    assert not (out / f"faces_{row['split']}.npy").exists() and not (out / f"faces_{row['split']}.json").exists()
    assert (out / f"faces_{other}.npy").stat().st_mtime_ns == kept_at
    pre_process.main(argv)
    mine = [r for r in read_labels(out) if r["split"] == row["split"]]
    assert mine[0] == row
    assert np.array_equal(np.load(out / f"faces_{row['split']}.npy")[0], read_image(out / row["image"]))
    assert (out / f"faces_{other}.npy").stat().st_mtime_ns == kept_at


def test_another_size_into_the_same_folder_is_refused(built):
    """--size 224 into a folder made at 112 would keep the 112 px faces there: refused before anything is written."""
    root, out, _, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for flags, elsewhere in ((["--size", "224", "--fallback", "drop"], f"{out}_224"),
                             (["--size", "112", "--fallback", "center"], f"{out}_center")):
        with pytest.raises(UserError, match=rf"{out / 'faces'} holds faces made with --size 112 --fallback drop; "
                                            rf"this run asks for {' '.join(flags)}.*--out {elsewhere}\) "
                                            rf"or delete {out / 'faces'}"):
            pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", *flags])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_faces_made_before_the_record_tell_their_size(tmp_path):
    out = tmp_path / "old"
    write_jpeg(out / "faces" / "00" / "a.jpg", np.zeros((112, 112, 3), np.uint8))  # no settings.json: an older run
    with pytest.raises(UserError, match="made with --size 112; this run asks for --size 224"):
        pre_process.check_face_settings(out, 224, "drop")
    pre_process.check_face_settings(out, 112, "center")  # the size matches; the fallback is unknown
    assert json.loads((out / "faces" / "settings.json").read_text()) == dict(size=112, fallback="center")


@pytest.mark.parametrize("damage", [b"{\"size\": 11", b"\xff\xfe", b"[112]"])
def test_a_damaged_settings_record_is_a_user_error_that_says_the_fix(tmp_path, damage):
    out = tmp_path / "old"
    write_jpeg(out / "faces" / "00" / "a.jpg", np.zeros((112, 112, 3), np.uint8))
    (out / "faces" / "settings.json").write_bytes(damage)
    with pytest.raises(UserError, match=r"settings.json is damaged .*delete it and rerun"):
        pre_process.check_face_settings(out, 112, "drop")


def test_default_out_follows_the_dataset_and_the_size(tmp_path):
    """WIKI's faces once went to data/imdb_112 too, replacing IMDB's labels.csv and arrays and mixing the faces."""
    assert pre_process.parse_args([]).out == config.DATA == "data/imdb_112"
    assert pre_process.parse_args(["--size", "224"]).out == "data/imdb_224"
    assert pre_process.parse_args(["--size", "224", "--out", "x"]).out == "x"
    (tmp_path / "wiki.mat").write_bytes(b"")
    assert pre_process.parse_args(["--root", str(tmp_path)]).out == "data/wiki_112"
    assert pre_process.parse_args(["--root", str(tmp_path), "--dataset", "imdb"]).out == "data/imdb_112"
    (tmp_path / "imdb.mat").write_bytes(b"")  # both: imdb, as find_mat reads it first
    assert pre_process.parse_args(["--root", str(tmp_path), "--size", "224"]).out == "data/imdb_224"


@pytest.mark.parametrize("argv, said", [
    (["--batch", "0"], "--batch must be at least 1"),  # it once held every decoded photo, then crashed
    (["--per-age", "-1"], "--per-age must be at least 1"),
    (["--limit", "-5"], "--limit must be 0 or more"),  # it once dropped the last 5 photos
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--valid-fraction", "1.5"], "--valid-fraction must be between 0 and 1"),
    (["--valid-fraction", "0"], "--valid-fraction must be between 0 and 1"),
])
def test_an_option_out_of_its_range_names_itself(argv, said, capsys):
    with pytest.raises(SystemExit):
        pre_process.parse_args(argv)
    assert f"error: {said}" in capsys.readouterr().err


def test_a_mat_without_its_photos_says_where_they_go(tmp_path):
    """Every photo missing (the .mat copied alone, or the photos unpacked elsewhere) once wrote an empty labels.csv,
    rc 0, and train.py then blamed --valid-fraction."""
    generate(tmp_path / "crop", 12, seed=3, dirty_fraction=0.0)
    for folder in (tmp_path / "crop").iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)
    with pytest.raises(UserError, match=rf"--root {tmp_path / 'crop'}: none of the \d+ photos that pass the filters "
                                        rf"is there \(e.g. {tmp_path / 'crop'}/\d\d/.*\.jpg\); unpack imdb_crop.tar"):
        pre_process.main(["--root", str(tmp_path / "crop"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out" / "labels.csv").exists()


@pytest.mark.parametrize("cores, local_processes, want", [
    (16, 1, config.WORKERS_CUDA),  # the device machine: the H200 figures' 8
    (6, 1, 5),  # the cores less the one that feeds the GPU
    (16, 4, 3),  # torchrun's 4 processes on one box share its cores
    (16, 8, config.WORKERS), (2, 1, config.WORKERS),  # never fewer than the CPU's default
])
def test_workers_default_follows_the_device_and_the_cores(monkeypatch, cores, local_processes, want):
    monkeypatch.setattr(pre_process.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert pre_process.decode_workers("cuda:0", local_processes) == want
    assert pre_process.decode_workers("cpu", local_processes) == config.WORKERS
    assert pre_process.parse_args([]).workers is None  # resolved by run() for its device, into summary.json


def test_faces_sought_from_a_fraction_keep_the_full_pyramids_photos(tmp_path):
    """On IMDB-sized crops, faces sought from half the short side (in shrunk photos) keep the photos the full
    pyramid alone keeps (--min-face-fraction 0), among them 4 copies of the astronaut photo, whose ~100 px face
    in 512 px the first pass misses and the retry finds; summary.json counts the retries."""
    import skimage.data

    from synth_imdb import imdb_sized

    root = tmp_path / "crop"
    generate(root, 16, seed=21, dirty_fraction=0.0)
    rng = np.random.default_rng(0)
    for i, path in enumerate(sorted(root.glob("*/*.jpg"))):
        write_jpeg(path, skimage.data.astronaut() if i % 4 == 0 else imdb_sized(rng, read_image(path)), quality=90)
    runs = {}
    for fraction in ("0.5", "0"):
        out = tmp_path / f"out_{fraction}"
        pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "1", "--batch", "4",
                          "--no-pack", "--min-face-fraction", fraction])
        runs[fraction] = (read_labels(out), json.loads((out / "summary.json").read_text()))
    rows, summary = runs["0"]
    assert summary["retried"] == 0 and len(rows) >= 14  # the full pyramid misses the odd profile view of camera()
    assert runs["0.5"][0] == rows  # the same rows, in the same order
    assert 4 <= runs["0.5"][1]["retried"] <= 4 + 16 - len(rows)  # the astronauts, and any photo with no face at all


def test_crops_prepared_in_the_decoding_processes_give_the_same_faces(tmp_path, monkeypatch):
    """--prepare-in processes: each photo is shrunk, and here its P-Net pyramid made as for a GPU, in the decoding
    worker, never in this process; detect() draws those pyramids and finds the faces, bit for bit, that --prepare-in
    threads finds with the CPU's inline shrinking and its own resizing."""
    import face
    from synth_imdb import imdb_sized

    root = tmp_path / "crop"
    generate(root, 8, seed=22, dirty_fraction=0.0)
    rng = np.random.default_rng(1)
    for path in sorted(root.glob("*/*.jpg")):
        write_jpeg(path, imdb_sized(rng, read_image(path)), quality=90)
    prepared_here, searches_seen = [], []
    prepare_crop, search_crops = face.prepare_crop, face.search_crops

    def counted_prepare(plan, img, fraction):
        prepared_here.append(plan.pyramid)
        return prepare_crop(plan, img, fraction)

    def seen_search(detector, searches):
        searches_seen.extend(s.pyramid is not None for s in searches)
        return search_crops(detector, searches)

    monkeypatch.setattr(face, "prepare_crop", counted_prepare)  # in this process only: a worker runs the real one
    monkeypatch.setattr(face, "search_crops", seen_search)
    plain_plan = face.FaceDetector.crop_plan
    runs = {}
    for where in ("threads", "processes"):
        # a GPU's plan in the workers: the pyramids made there travel back and detect() draws them
        monkeypatch.setattr(face.FaceDetector, "crop_plan", lambda self, host: face.CropPlan(
            self.min_face_size, self.scale_factor, where == "processes"))
        prepared_here.clear(), searches_seen.clear()
        out = tmp_path / where
        pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "1", "--batch", "4",
                          "--no-pack", "--prepare-in", where])
        rows = read_labels(out)
        runs[where] = rows, {r["image"]: (out / r["image"]).read_bytes() for r in rows}
        assert len(searches_seen) == 8 and set(searches_seen) == {where == "processes"}
        assert prepared_here == ([] if where == "processes" else [False] * 8)
    monkeypatch.setattr(face.FaceDetector, "crop_plan", plain_plan)
    assert len(runs["threads"][0]) >= 6 and runs["processes"] == runs["threads"]
    assert pre_process.parse_args([]).prepare_in == config.PREPARE_IN == "threads"
