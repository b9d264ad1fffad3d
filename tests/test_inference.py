"""inference.py: photos analysed in batches give the records of one at a time; bounded decoding; no script imports another."""
import ast
import time

import numpy as np
import pytest
import torch

import inference
from utils import REPO, read_image

SCRIPTS = ("demo", "evaluate", "export", "bench", "serve", "bench_inference")


class Counter(torch.nn.Module):
    """Wraps a model and records the batch size of each forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)

    def predict_age(self, age_out):
        return self.model.predict_age(age_out)

    def head_outputs(self, gender_logits, age_out, flip=False):
        return self.model.head_outputs(gender_logits, age_out, flip)


@pytest.fixture(scope="module")
def photos(samples):
    """The three portraits, one mirrored, a photo with two faces and one with none: (name, RGB)."""
    a, c, h = (read_image(samples / n) for n in ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg"))
    both = np.zeros((600, 1024, 3), np.uint8)
    both[:512, :512], both[:, 512:] = a, h  # grace_hopper is 600 x 512
    gray = np.full((240, 320, 3), 128, np.uint8)
    return [("a", a), ("c", c), ("h", h), ("a_mirror", np.ascontiguousarray(a[:, ::-1])), ("both", both),
            ("gray", gray)]


def test_batched_equals_one_at_a_time(checkpoint, photos):
    predictor = inference.Predictor(checkpoint, "cpu", 0.9, photo_batch=4)
    alone = [predictor.analyse(img) for _, img in photos]
    predictor.model = Counter(predictor.model)
    streamed = list(predictor.analyse_stream(photos))
    assert [name for name, _, _ in streamed] == [name for name, _ in photos]
    assert all(inference.records_match(faces, a) for (_, _, faces), a in zip(streamed, alone, strict=True))
    assert [len(f) for f in alone] == [1, 1, 1, 1, 2, 0]
    # 6 photos, 4 a batch: two MTCNN calls and two forward passes, with all faces of each group
    assert predictor.model.batches == [4, 2]
    for face in alone[4]:
        assert set(face) == {"box", "score", "landmarks", "gender", "gender_prob", "age", "age_std", "age_low", "age_high"}
        assert face["gender"] in ("female", "male") and 0.5 <= face["gender_prob"] <= 1


def test_a_grey_photo_gives_the_faces_of_its_rgb_copy(checkpoint, samples):
    """A grey (H, W) or (H, W, 1) photo, which the detector takes, is analysed as its RGB copy (the aligned faces
    crashed the network's preprocessing)."""
    predictor = inference.Predictor(checkpoint, "cpu", 0.9)
    grey = read_image(samples / "camera.jpg")[:, :, 0]  # a grey photo, made RGB by read_image
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    want = predictor.analyse(rgb)
    assert len(want) == 1
    assert predictor.analyse(grey) == predictor.analyse(grey[:, :, None]) == want
    assert all(inference.records_match(got, want) for got in predictor.analyse_batch([grey, rgb]))


def test_records_match_up_to_their_last_digit():
    """records_match: the same faces with each number within one unit of its last kept digit (batches of other
    sizes round differently on some CPUs and GPUs), and nothing further off."""
    face = dict(box=[10.0, 20.0, 50.5, 70.25], score=0.9991, landmarks=[[20.0, 30.0]] * 5, gender="male",
                gender_prob=0.6241, age=35.0, age_std=None, age_low=None, age_high=None)
    assert inference.records_match([face], [dict(face, gender_prob=0.6242, age=34.99, box=[10.01, 20.0, 50.5, 70.25])])
    for other in (dict(face, gender_prob=0.6243), dict(face, age=35.02), dict(face, box=[10.02, 20.0, 50.5, 70.25]),
                  dict(face, landmarks=[[20.0, 30.03]] * 5), dict(face, gender="female"), dict(face, age_std=1.0)):
        assert not inference.records_match([face], [other]), other
    assert not inference.records_match([face], [face, face]) and inference.records_match([], [])
    assert set(inference.DECIMALS) == set(face) - {"gender"}  # a rule for every number of a record


def test_groups_bounded_by_pixels_and_errors_pass_through(checkpoint, photos):
    predictor = inference.Predictor(checkpoint, "cpu", 0.9, photo_batch=16, detect_pixels=600 * 1024)
    seen = []
    detect = predictor.detector.detect
    predictor.detector.detect = lambda images: seen.append(len(images)) or detect(images)
    items = [(name, img) for name, img in photos[:3]] + [("bad", "not_image")] + photos[4:]
    out = list(predictor.analyse_stream(items))
    assert [(name, faces is None) for name, _, faces in out] == [(name, name == "bad") for name, _ in items]
    assert out[3][1] == "not_image"  # the reason comes back as it was given
    # 512x512 + 512x512 = 524,288 px fit 614,400; the third photo opens a new group; the 1024x600 photo goes alone
    assert seen == [2, 1, 1, 1]


def test_an_onnx_model_runs_no_torch_network(checkpoint, onnx_checkpoint, photos, monkeypatch):
    """With a .onnx model, the request path calls no torch module (MTCNN's nets included), and finds the faces
    the .pt model's path finds, with the same predictions to onnxruntime's rounding."""
    want = inference.Predictor(checkpoint, "cpu", 0.9).analyse_batch([img for _, img in photos])
    predictor = inference.Predictor(onnx_checkpoint, "cpu", 0.9)

    def no_torch_network(module, *args, **kwargs):
        raise AssertionError(f"torch ran {type(module).__name__} on the request path of an .onnx model")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_torch_network)
    got = [predictor.analyse(img) for _, img in photos] + predictor.analyse_batch([img for _, img in photos])
    assert all(inference.records_match(a, b) for a, b in zip(got[:6], got[6:]))  # one at a time and batched
    assert [len(faces) for faces in got] == [len(faces) for faces in want * 2] == [1, 1, 1, 1, 2, 0] * 2
    for g, w in zip(sum(got, []), sum(want * 2, [])):
        assert np.abs(np.subtract(g["box"], w["box"])).max() <= 0.02
        assert np.abs(np.subtract(g["landmarks"], w["landmarks"])).max() <= 0.02
        assert g["gender"] == w["gender"] and abs(g["age"] - w["age"]) < 0.02


def test_read_ahead_is_bounded_and_ordered():
    started = []

    def read(i):
        started.append(i)
        time.sleep(0.002)
        return i * i

    stream = inference.read_ahead(range(100), read, workers=2, ahead=4)
    got = []
    for i, value in stream:
        got.append((i, value))
        assert len(started) <= i + 4  # item i and at most 3 after it: 4 in flight
    assert got == [(i, i * i) for i in range(100)]


def test_read_ahead_reads_every_item_even_none():
    items = [3, None, 0, 5]
    assert list(inference.read_ahead(items, lambda i: i is None, workers=2)) == [(3, False), (None, True), (0, False), (5, False)]


def test_decoded_gives_reasons_for_bad_files(tmp_path, samples):
    (tmp_path / "bad.jpg").write_text("not a photo")
    (tmp_path / "empty.png").write_bytes(b"")
    paths = [samples / "astronaut.jpg", tmp_path / "bad.jpg", tmp_path / "empty.png", tmp_path / "missing.jpg"]
    out = list(inference.decoded(paths, workers=2))
    assert [p for p, _ in out] == paths
    assert out[0][1].shape == (512, 512, 3)
    assert [r for _, r in out[1:]] == ["not_image", "empty", "missing_file"]


def test_no_script_imports_another():
    """demo, evaluate, export, bench, serve share inference/face/models/data_gen/utils, never each other."""
    for script in SCRIPTS:
        tree = ast.parse((REPO / f"{script}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        for string in (n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)):
            imported |= {line.split()[1].rstrip(",") for line in string.splitlines()
                         if line.startswith(("import ", "from "))}  # bench's `python -c` scripts
        assert not imported & (set(SCRIPTS) - {script}), (script, sorted(imported & set(SCRIPTS)))


def test_one_implementation_of_the_moved_code():
    for name in ("def load_model", "class OnnxModel", "def predict(", "def predicted_gender", "class Labelled",
                 "def read_csv_labels", "def ensure_samples", "def gender_of", "INPUT, OUTPUTS ="):
        homes = [s for s in (*SCRIPTS, "inference") if f"\n{name}" in (REPO / f"{s}.py").read_text()]  # at module level
        assert homes == ["inference"], (name, homes)
