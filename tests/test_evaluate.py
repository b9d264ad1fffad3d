"""evaluate.py: label readers, the breakdowns on hand-checked arrays, and whole runs on labelled sets."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import evaluate as ev
from face import onnx_mtcnn
import inference
from utils import UserError


# --- pure functions, hand-checked ------------------------------------------------------------

def test_utkface_names_and_gender_flip():
    assert inference.parse_utkface_name("25_0_1_20170116174525125.jpg") == (25, 1)  # UTKFace 0 = male -> ours 1
    assert inference.parse_utkface_name("3_1_2_20161219140546925.jpg.chip.jpg") == (3, 0)  # 1 = female -> 0
    assert inference.parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg") == (39, 0)  # race missing: still usable
    for bad in ("astronaut.jpg", "x_0_1_2.jpg", "25_2_1_2.jpg", "25.jpg"):
        assert inference.parse_utkface_name(bad) is None


@pytest.mark.parametrize("value, expected", [("male", 1), ("M", 1), ("1", 1), ("Female", 0), ("f", 0), ("0", 0),
                                             ("x", None), ("", None), ("2", None)])
def test_csv_gender_values(value, expected):
    assert inference.parse_gender(value) == expected


def test_age_buckets():
    ages = np.array([0, 9.9, 10, 19, 29.5, 69.99, 70, 101])
    assert ev.age_bucket(ages).tolist() == [0, 0, 1, 1, 2, 6, 7, 7]
    assert ev.BUCKET_LABELS == ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")


def test_breakdown_by_hand():
    true_age = np.array([5, 8, 25, 25, 71, 90])
    pred_age = np.array([7, 8, 20, 31, 60, 95])  # errors 2, 0, 5, 6, 11, 5
    true_gender = np.array([0, 1, 0, 1, 1, 0])
    pred_gender = np.array([0, 0, 0, 1, 0, 1])  # right, wrong, right, right, wrong, wrong
    b = ev.breakdown(pred_age, true_age, pred_gender, true_gender)
    by = b["by_age_bucket"]
    assert by["0-9"] == dict(n=2, age_mae=1.0, gender_acc=0.5)
    assert by["20-29"] == dict(n=2, age_mae=5.5, gender_acc=1.0)
    assert by["70+"] == dict(n=2, age_mae=8.0, gender_acc=0.0)
    assert by["10-19"] == dict(n=0, age_mae=None, gender_acc=None)
    assert list(by) == list(ev.BUCKET_LABELS)
    assert b["by_gender"]["female"] == dict(n=3, age_mae=pytest.approx(12 / 3), gender_acc=pytest.approx(2 / 3))
    assert b["by_gender"]["male"] == dict(n=3, age_mae=pytest.approx(17 / 3), gender_acc=pytest.approx(1 / 3))
    # rows true (female, male), columns predicted (female, male)
    assert b["confusion"]["matrix"] == [[2, 1], [2, 1]]


def test_csv_reader(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "l.csv").write_text("Image,age,gender,extra\nsub/a.jpg,31,male,x\nb.png,4.5,0,y\n")
    items = ev.read_csv_labels(tmp_path / "l.csv")
    assert [(i.path, i.age, i.gender) for i in items] == [(tmp_path / "sub/a.jpg", 31.0, 1), (tmp_path / "b.png", 4.5, 0)]
    (tmp_path / "bad.csv").write_text("image,years,gender\na.jpg,3,m\n")
    with pytest.raises(UserError, match="lacks the column.*age"):
        ev.read_csv_labels(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("image,age,gender\na.jpg,3,m\nb.jpg,4,robot\n")
    with pytest.raises(UserError, match="line 3: gender 'robot'"):
        ev.read_csv_labels(tmp_path / "bad2.csv")
    (tmp_path / "quoted.csv").write_bytes(b'image,age,gender\r\n"two\r\nlines.jpg",3,m\r\n')  # a newline in a name
    assert [i.path.name for i in ev.read_csv_labels(tmp_path / "quoted.csv")] == ["two\r\nlines.jpg"]


def test_a_csv_not_in_utf8_is_one_line(tmp_path, checkpoint, samples):
    """A spreadsheet's export in Latin-1 (evaluate.py --csv, demo.py --sheet): one line naming the file, not a
    UnicodeDecodeError's traceback."""
    import demo

    latin1 = tmp_path / "labels.csv"
    latin1.write_bytes("image,age,gender\nJos\u00e9.jpg,30,m\n".encode("latin-1"))
    why = f"^{latin1}: not UTF-8 text \\(byte 0xe9 at offset 20\\); save the CSV as UTF-8$"
    with pytest.raises(UserError, match=why):
        ev.main(["--checkpoint", str(checkpoint), "--csv", str(latin1), "--out", str(tmp_path / "eval")])
    with pytest.raises(UserError, match=why):
        demo.main(["--checkpoint", str(checkpoint), "--sheet", str(latin1), "--output", str(tmp_path / "sheet")])


# --- whole runs --------------------------------------------------------------------------------

# (file, age, our gender): the three sample portraits with assigned labels
LABELS = [("astronaut.jpg", 34, 0), ("camera.jpg", 41, 1), ("grace_hopper.jpg", 79, 0)]


def by_hand(rows):
    """Every headline metric and breakdown, from the raw predictions, without evaluate/metrics code."""
    err = [abs(float(r["pred_age"]) - float(r["age"])) for r in rows]
    right = [int(r["pred_gender"]) == int(r["gender"]) for r in rows]
    return dict(mae=sum(err) / len(err), acc=sum(right) / len(right), cs5=sum(e <= 5 for e in err) / len(err),
                err=err, right=right)


def check_against_predictions(out, expected_n):
    m = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert m["n"] == len(rows) == expected_n
    h = by_hand(rows)
    assert m["metrics"]["gender_acc"] == pytest.approx(h["acc"])
    assert m["metrics"]["age_mae"] == pytest.approx(h["mae"], abs=1e-6)
    assert m["metrics"]["cs5"] == pytest.approx(h["cs5"])
    for r, e, ok in zip(rows, h["err"], h["right"]):
        bucket = m["by_age_bucket"][ev.BUCKET_LABELS[min(int(float(r["age"]) // 10), 7)]]
        members = [(e2, ok2) for r2, e2, ok2 in zip(rows, h["err"], h["right"])
                   if min(int(float(r2["age"]) // 10), 7) == min(int(float(r["age"]) // 10), 7)]
        assert bucket["n"] == len(members)
        assert bucket["age_mae"] == pytest.approx(sum(x for x, _ in members) / len(members), abs=1e-6)
        assert bucket["gender_acc"] == pytest.approx(sum(y for _, y in members) / len(members))
    conf = np.zeros((2, 2), int)
    for r in rows:
        conf[int(r["gender"]), int(r["pred_gender"])] += 1
    assert m["confusion"]["matrix"] == conf.tolist()
    for g, name in enumerate(("female", "male")):
        errs = [e for r, e in zip(rows, h["err"]) if int(r["gender"]) == g]
        assert m["by_gender"][name]["n"] == len(errs)
        if errs:
            assert m["by_gender"][name]["age_mae"] == pytest.approx(sum(errs) / len(errs), abs=1e-6)
    for png in ("mae_by_age.png", "age_scatter.png", "gender_acc_by_age.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return m, rows


def test_utkface_folder(tmp_path, samples, checkpoint):
    folder = tmp_path / "utk"
    folder.mkdir()
    for name, age, gender in LABELS:  # UTKFace gender: 0 male, 1 female
        shutil.copy(samples / name, folder / f"{age}_{1 - gender}_0_2017011617452512{age}.jpg.chip.jpg")
    (folder / "gray_30_0_1_2.jpg").write_bytes(b"")  # a name that does not parse
    (folder / "25_1_0_20170101.jpg").write_text("not an image")  # parses, but is not an image
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "eval"
    ev.main(["--checkpoint", str(checkpoint), "--utkface", str(folder), "--out", str(out), "--device", "cpu",
             "--batch-size", "2"])
    m, rows = check_against_predictions(out, 3)
    assert m["skipped"] == {"bad_name": 1, "not_image": 1}
    truth = {r["image"].split("/")[-1].split("_")[0]: (float(r["age"]), int(r["gender"])) for r in rows}
    assert truth == {"34": (34.0, 0), "41": (41.0, 1), "79": (79.0, 0)}  # flipped to ours
    assert m["by_age_bucket"]["70+"]["n"] == 1 and m["by_age_bucket"]["30-39"]["n"] == 1


def test_csv_with_no_face_photo(tmp_path, samples, checkpoint, capsys):
    (tmp_path / "photos").mkdir()
    lines = ["image,age,gender"]
    for name, age, gender in LABELS:
        shutil.copy(samples / name, tmp_path / "photos" / name)
        lines.append(f"photos/{name},{age},{'male' if gender else 'female'}")
    from PIL import Image
    Image.new("RGB", (200, 200), (128, 128, 128)).save(tmp_path / "photos" / "gray.png")
    lines.append("photos/gray.png,50,1")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    ev.main(["--checkpoint", str(checkpoint), "--csv", str(tmp_path / "labels.csv"), "--out", str(out),
             "--device", "cpu"])
    m, rows = check_against_predictions(out, 3)
    assert m["skipped"] == {"no_face": 1}
    assert {r["image"].split("/")[-1]: int(r["gender"]) for r in rows} == {n: g for n, _, g in LABELS}
    text = capsys.readouterr().out
    assert "gender accuracy" in text and "70+" in text and "confusion" in text


def test_known_outputs(tmp_path, samples, checkpoint, monkeypatch):
    """A model whose predictions are known: every metric is checked against numbers worked out by hand."""
    import torch

    import models

    class Known(models.AgeGenderNet):  # every face: p(male) = 4 / (1 + 4) = 0.8, an l1 head saying 38 years
        def __init__(self):
            super().__init__("resnet18", "l1", age_mean=0.0, age_std=1.0)  # its head rules; the output in years

        def forward(self, x):
            n = x.shape[0]
            return torch.tensor([[0.0, float(np.log(4))]]).repeat(n, 1), torch.full((n, 1), 38.0)

    monkeypatch.setattr(ev, "load_model", lambda path, device: (Known(), {"arch": "x", "age_loss": "l1", "size": 112}))
    folder = tmp_path / "utk"
    folder.mkdir()
    for name, age, gender in LABELS:  # truths: (34, F), (41, M), (79, F)
        shutil.copy(samples / name, folder / f"{age}_{1 - gender}_0_1.jpg")
    out = tmp_path / "eval"
    m = ev.main(["--checkpoint", str(checkpoint), "--utkface", str(folder), "--out", str(out), "--device", "cpu"])
    # errors 4, 3, 41; gender right only for the man
    assert m["metrics"]["age_mae"] == pytest.approx(48 / 3)
    assert m["metrics"]["gender_acc"] == pytest.approx(1 / 3)
    assert m["metrics"]["cs5"] == pytest.approx(2 / 3)
    assert m["by_age_bucket"]["30-39"] == dict(n=1, age_mae=4.0, gender_acc=0.0)
    assert m["by_age_bucket"]["40-49"] == dict(n=1, age_mae=3.0, gender_acc=1.0)
    assert m["by_age_bucket"]["70+"] == dict(n=1, age_mae=41.0, gender_acc=0.0)
    assert m["by_gender"]["female"] == dict(n=2, age_mae=22.5, gender_acc=0.0)
    assert m["confusion"]["matrix"] == [[0, 2], [0, 1]]
    with open(out / "predictions.csv") as f:
        assert [float(r["p_male"]) for r in csv.DictReader(f)] == pytest.approx([0.8] * 3)


def write_aligned_data(data, aligned_faces, valid: int):
    """A data dir of the aligned sample faces with LABELS' truths, the first `valid` rows in the valid split."""
    from utils import write_jpeg

    rows = ["image,source,identity,age,gender,split"]
    for i, (face, (name, age, gender)) in enumerate(zip(aligned_faces, LABELS)):
        write_jpeg(data / "faces" / "00" / f"{i}.jpg", face)
        rows.append(f"faces/00/{i}.jpg,00/{name},{i},{age},{gender},{'valid' if i < valid else 'train'}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data


def test_pre_processed_valid_split(tmp_path, samples, checkpoint, aligned_faces):
    """--data reads the valid rows of labels.csv, the aligned faces as they are."""
    data = write_aligned_data(tmp_path / "data", aligned_faces, valid=2)
    out = tmp_path / "eval"
    ev.main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--device", "cpu"])
    m, rows = check_against_predictions(out, 2)  # the train row is not evaluated
    assert m["source"] == dict(kind="pre_processed", path=str(data), split="valid")


def test_user_errors(tmp_path, checkpoint):
    with pytest.raises(UserError, match="no labels.csv"):
        ev.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path)])
    with pytest.raises(UserError, match="not found; train one"):
        ev.main(["--checkpoint", str(tmp_path / "none.pt"), "--csv", str(_csv(tmp_path))])
    (tmp_path / "utk").mkdir()
    with pytest.raises(UserError, match="no photo named"):
        ev.main(["--checkpoint", str(checkpoint), "--utkface", str(tmp_path / "utk")])


def test_an_out_that_is_a_file_is_refused_before_evaluating(tmp_path, checkpoint, monkeypatch):
    """--out naming a file (or a path under one) is one line naming it, before the evaluation, not a traceback after."""
    monkeypatch.setattr(ev, "load_model", lambda *a: pytest.fail("evaluated before checking --out"))
    taken = tmp_path / "metrics.json"
    taken.write_text("{}")
    for out in (taken, taken / "eval"):
        with pytest.raises(UserError, match=f"^--out {out}: {taken} is a file, not a folder"):
            ev.main(["--checkpoint", str(checkpoint), "--csv", str(_csv(tmp_path)), "--out", str(out)])


def _csv(tmp_path):
    (tmp_path / "x.csv").write_text("image,age,gender\na.jpg,3,m\n")
    return tmp_path / "x.csv"


# --- real-world photos: rotated by EXIF, large ones in bounded detection calls ----------------------

def test_csv_photo_stored_rotated_by_a_phone(tmp_path, samples, checkpoint):
    """A portrait stored sideways with EXIF Orientation 6 (as phones do) is turned upright and its face found."""
    from test_read_image import save_rotated

    save_rotated(samples / "astronaut.jpg", tmp_path / "phone.jpg", 6)
    (tmp_path / "labels.csv").write_text("image,age,gender\nphone.jpg,34,female\n")
    m = ev.main(["--checkpoint", str(checkpoint), "--csv", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "e"),
                 "--device", "cpu"])
    assert m["n"] == 1 and m["skipped"] == {}


class RecordingDetector:
    """A FaceDetector that notes the pixels of the photos in each call."""

    def __init__(self):
        from face import FaceDetector

        self.detector, self.calls = FaceDetector(device="cpu"), []

    def detect(self, images):
        self.calls.append([im.shape[0] * im.shape[1] for im in images])
        return self.detector.detect(images)


def test_detection_calls_stay_within_the_pixel_budget(tmp_path, samples, checkpoint):
    from inference import load_model

    model, cfg = load_model(checkpoint, "cpu")
    items = [ev.Labelled(samples / name, age, gender) for name, age, gender in LABELS * 2]  # 6 photos
    pixels = [512 * 512, 512 * 512, 600 * 512] * 2
    runs = {}
    for budget, batch in ((10**9, 128), (600_000, 128), (1, 128), (10**9, 4)):
        detector = RecordingDetector()
        records, skipped = ev.evaluate_photos(items, model, cfg, "cpu", batch, 1, detector, detect_pixels=budget)
        assert skipped == {} and len(records) == 6
        assert sum(detector.calls, []) == pixels  # every photo detected once, in order
        for call in detector.calls:
            assert len(call) <= batch and (sum(call) <= budget or len(call) == 1)  # a larger photo goes alone
        runs[budget, batch] = records, [len(c) for c in detector.calls]
    assert runs[10**9, 128][1] == [6]
    assert runs[600_000, 128][1] == [2, 2, 2]  # 512x512 + 512x512 fit; 600x512 more would not
    assert runs[1, 128][1] == [1] * 6
    assert runs[10**9, 4][1] == [4, 2]
    reference = runs[10**9, 128][0]
    for records, _ in runs.values():  # the same predictions however the photos were grouped
        assert [r["image"] for r in records] == [r["image"] for r in reference]
        for r, ref in zip(records, reference):
            assert r["pred_gender"] == ref["pred_gender"]
            assert r["pred_age"] == pytest.approx(ref["pred_age"], abs=1e-3)
            assert r["p_male"] == pytest.approx(ref["p_male"], abs=1e-4)


def test_decoding_runs_at_most_ahead_photos_in_advance(monkeypatch):
    decoded = []

    def fake_read(path):
        decoded.append(path)
        return np.zeros((2, 2, 3), np.uint8)

    monkeypatch.setattr(ev, "read_image_or_reason", fake_read)
    items = [ev.Labelled(f"{i}.jpg", 30, 1) for i in range(50)]
    stream = ev.read_images(items, workers=2, ahead=4, unit="photo", skipped={})
    for consumed, (item, _) in enumerate(stream, start=1):
        assert len(decoded) <= consumed + 4  # not the whole list at once
    assert consumed == 50 and decoded == [it.path for it in items]


def test_flip_intervals_calibration_and_groups_end_to_end(tmp_path, aligned_faces, capsys):
    """A dex checkpoint with a temperature, --flip: metrics.json gains (and keeps every old key) the
    interval coverage, the ECE at that temperature, the group table, plain vs flipped; the CSV the intervals."""
    import torch

    import metrics
    import models

    torch.manual_seed(3)
    model = models.build_model("resnet18", "dex", "none", gender_temperature=3.0)
    ckpt = tmp_path / "dex.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args,
                "config": {"arch": "resnet18", "age_loss": "dex", "size": 112}}, ckpt)
    data = write_aligned_data(tmp_path / "data", aligned_faces, valid=len(LABELS))
    out = tmp_path / "eval"
    m = ev.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu", "--flip",
                 "--min-group", "2"])
    printed = capsys.readouterr().out
    assert {"n", "photos", "skipped", "metrics", "by_age_bucket", "by_gender", "confusion", "plots",
            "predictions"} <= set(m)
    assert set(m["flip"]) == {"plain", "flipped"} and "plain" in printed and "flipped" in printed
    assert m["flip"]["flipped"]["age_mae"] == pytest.approx(m["metrics"]["age_mae"])
    assert m["calibration"]["temperature"] == 3.0 and sum(m["calibration"]["counts"]) == 3
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    low, high, true = (np.array([float(r[k]) for r in rows]) for k in ("age_low", "age_high", "age"))
    assert (low <= np.array([float(r["pred_age"]) for r in rows])).all()
    assert m["age_interval"]["coverage"] == pytest.approx(((low <= true) & (true <= high)).mean())
    assert m["calibration"]["ece"] == pytest.approx(metrics.expected_calibration_error(
        np.array([float(r["p_male"]) for r in rows]), np.array([int(r["gender"]) for r in rows])), abs=1e-6)
    assert sum(s["n"] for g in m["by_gender_age"].values() for s in g.values()) == m["n"] == 3
    assert m["by_gender_age"]["female"]["30-39"] == dict(n=1, age_mae=pytest.approx(float(abs(
        float(rows[0]["pred_age"]) - 34))), gender_acc=float(rows[0]["pred_gender"] == "0"), few=True)
    assert {"reliability.png", "groups.png"} <= set(m["plots"]) and (out / "groups.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["flip"] == m["flip"]


def test_labelled_photos_with_an_onnx_model_run_no_torch_network(checkpoint, onnx_checkpoint, samples, monkeypatch):
    """evaluate.py --csv / --utkface with a .onnx: MTCNN's nets in onnxruntime too, the same faces as the .pt finds."""
    items = [inference.Labelled(samples / name, age, gender)
             for name, age, gender in (("astronaut.jpg", 45, 0), ("camera.jpg", 40, 1), ("grace_hopper.jpg", 79, 0))]
    pt_model, pt_cfg = inference.load_model(checkpoint, "cpu")
    want, _ = ev.evaluate_photos(items, pt_model, pt_cfg, "cpu", 8, 1)
    model, cfg = inference.load_model(onnx_checkpoint, "cpu")
    onnx_mtcnn()  # MTCNN's nets exported into this session's cache (by torch) now, whatever test ran first

    def no_torch_network(module, *args, **kwargs):
        raise AssertionError(f"torch ran {type(module).__name__} while evaluating with an .onnx model")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_torch_network)
    got, skipped = ev.evaluate_photos(items, model, cfg, "cpu", 8, 1)
    assert skipped == {} and len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g["pred_gender"] == w["pred_gender"] and abs(g["pred_age"] - w["pred_age"]) < 0.05


@pytest.mark.parametrize("argv, said", [(["--limit", "-3"], "--limit -3: must be 0 (all) or more"),
                                        (["--split", "foo"], "argument --split: invalid choice: 'foo'")])
def test_a_bad_limit_or_split_is_refused(argv, said, capsys):
    """--limit -3 once dropped the last 3 faces (a slice's end), and --split foo said to rerun pre_process.py."""
    with pytest.raises((UserError, SystemExit)) as e:
        ev.main(argv)
    assert said in (str(e.value) if e.type is UserError else capsys.readouterr().err)
