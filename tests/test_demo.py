"""demo.py on the real sample photos: detection, results.json, the failure cases, video, sheet, no skew."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import demo
import inference
from utils import REPO, UserError, read_image

SAMPLES = ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg")


@pytest.fixture(scope="module")
def run(tmp_path_factory, samples, checkpoint):
    """One demo.py run, as a user starts it, on the samples + a flat gray photo + a text file named .jpg + a file that
    Pillow identifies and then fails on with NotImplementedError."""
    from test_read_image import dds_of_unknown_pixel_format

    root = tmp_path_factory.mktemp("demo")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    for name in SAMPLES:
        shutil.copy(samples / name, inp / name)
    Image.new("RGB", (320, 240), (128, 128, 128)).save(inp / "gray.png")
    (inp / "notes.jpg").write_text("this is not a photo\n")
    dds_of_unknown_pixel_format(inp / "texture.jpg")
    (inp / "readme.txt").write_text("not an image suffix: ignored\n")
    proc = subprocess.run([sys.executable, "demo.py", "--checkpoint", str(checkpoint), "--input", str(inp),
                           "--output", str(out), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    results = {e["image"].split("/")[-1]: e for e in json.loads((out / "results.json").read_text())}
    return dict(proc=proc, inp=inp, out=out, results=results)


def test_one_confident_face_per_portrait(run):
    for name in SAMPLES:
        faces = run["results"][name]["faces"]
        assert len(faces) == 1, (name, faces)
        assert faces[0]["score"] > 0.9


def test_astronaut_box_where_mtcnn_puts_it(run):
    x1, y1, x2, y2 = run["results"]["astronaut.jpg"]["faces"][0]["box"]
    # the MTCNN reference (ipazc/mtcnn) on skimage's astronaut: x=182 y=64 w=83 h=107
    assert abs(x1 - 182) <= 3 and abs(y1 - 64) <= 3
    assert abs((x2 - x1) - 83) <= 3 and abs((y2 - y1) - 107) <= 3
    marks = np.array(run["results"]["astronaut.jpg"]["faces"][0]["landmarks"])
    assert ((marks >= [x1, y1]) & (marks <= [x2, y2])).all()  # the 5 landmarks lie inside the box
    assert marks[0, 0] < marks[1, 0] and marks[3, 0] < marks[4, 0]  # left eye, right eye; mouth left, right
    assert marks[:2, 1].max() < marks[2, 1] < marks[3:, 1].min()  # eyes above the nose above the mouth


def test_results_schema_and_annotated_files(run):
    assert list(run["results"]) == sorted(["astronaut.jpg", "camera.jpg", "grace_hopper.jpg", "gray.png", "notes.jpg",
                                           "texture.jpg"])
    for name in SAMPLES:
        entry = run["results"][name]
        assert entry["image"] == str(run["inp"] / name)
        for face in entry["faces"]:
            assert len(face["box"]) == 4 and all(isinstance(v, float) for v in face["box"])
            assert np.array(face["landmarks"]).shape == (5, 2)
            assert face["gender"] in ("male", "female")
            assert 0.5 <= face["gender_prob"] <= 1.0
            assert isinstance(face["age"], float) and 0 <= face["age"] <= 120
            assert face["age_std"] is face["age_low"] is face["age_high"] is None  # an l1 head: no interval
            assert f"{face['gender']} {100 * face['gender_prob']:.0f}%, {face['age']:.0f}" in run["proc"].stdout
        annotated, original = read_image(run["out"] / name), read_image(run["inp"] / name)
        assert annotated.shape == original.shape  # the same file name, the same size, boxes drawn on it
        assert np.abs(annotated.astype(int) - original).max() > 100


def test_no_face_is_reported_and_copied_unannotated(run):
    assert run["results"]["gray.png"]["faces"] == []
    assert "gray.png: no face found" in run["proc"].stdout
    assert np.array_equal(read_image(run["out"] / "gray.png"), read_image(run["inp"] / "gray.png"))


def test_not_an_image_is_one_line_and_the_run_goes_on(run):
    entry = run["results"]["notes.jpg"]
    assert "not image" in entry["error"] and entry["faces"] == []
    errors = [line for line in run["proc"].stderr.splitlines() if "notes.jpg" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "Traceback" not in run["proc"].stderr
    assert not (run["out"] / "notes.jpg").exists()
    assert run["proc"].returncode == 1  # the others were written; the status says one input failed
    assert all((run["out"] / n).is_file() for n in SAMPLES)


def test_a_file_pillow_fails_on_is_one_line_and_the_run_goes_on(run):
    """Whatever Pillow raises on a corrupt file (here NotImplementedError) is that photo's error, not the run's."""
    entry = run["results"]["texture.jpg"]
    assert "truncated: Unknown pixel format" in entry["error"] and entry["faces"] == []
    errors = [line for line in run["proc"].stderr.splitlines() if "texture.jpg" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in run["proc"].stderr
    assert all((run["out"] / n).is_file() for n in SAMPLES)


def test_missing_checkpoint_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "demo.py", "--checkpoint", str(tmp_path / "nope.pt"), "--output",
                           str(tmp_path / "o"), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nope.pt") in lines[0] and "train.py" in lines[0]
    assert "make quickstart" in lines[0]


def test_empty_folder_and_missing_input(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in this folder"):
        demo.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no such file or folder"):
        demo.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "nope.jpg"), "--output", str(tmp_path / "o")])
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="would overwrite the input"):
        demo.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "empty" / ".." / "x.png"),
                   "--output", str(tmp_path)])


def test_an_output_that_is_a_file_is_refused_before_the_work(tmp_path, samples, checkpoint, monkeypatch):
    """--output naming a file, or a path under one: one line naming it, before the model is even loaded."""
    monkeypatch.setattr(demo, "Predictor", lambda *a, **k: pytest.fail("loaded the model before checking --output"))
    taken = tmp_path / "taken.jpg"
    taken.write_bytes(b"a file")
    for output, culprit in ((taken, taken), (taken / "out", taken), (taken / "a" / "b", taken)):
        for mode in ([], ["--sheet", str(samples)]):
            with pytest.raises(UserError, match=f"^--output {output}: {culprit} is a file, not a folder"):
                demo.main(["--checkpoint", str(checkpoint), "--input", str(samples / "astronaut.jpg"),
                           "--output", str(output), *mode])
    assert taken.read_bytes() == b"a file"


def test_phone_photo_stored_rotated_is_annotated_upright(tmp_path, samples, checkpoint):
    """EXIF Orientation 6 (a phone held upright, the pixels stored sideways): the face is found, the output is upright."""
    from test_read_image import save_rotated

    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(samples / "grace_hopper.jpg", inp / "upright.jpg")
    save_rotated(samples / "grace_hopper.jpg", inp / "phone.jpg", 6)
    results = {Path(r["image"]).name: r for r in demo.main(["--checkpoint", str(checkpoint), "--input", str(inp),
                                                            "--output", str(tmp_path / "out"), "--device", "cpu"])}
    phone, upright = results["phone.jpg"], results["upright.jpg"]
    assert len(phone["faces"]) == len(upright["faces"]) == 1
    assert np.allclose(phone["faces"][0]["box"], upright["faces"][0]["box"], atol=4)  # where it is when upright
    annotated = read_image(phone["output"])
    assert annotated.shape == (600, 512, 3)  # upright: as tall as the portrait
    assert np.abs(annotated.astype(int) - read_image(upright["output"])).mean() < 3


def test_min_face_below_mtcnns_window_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--min-face", "8"])
    assert e.value.code == 2 and "at least 12" in capsys.readouterr().err
    assert demo.parse_args(["--min-face", "12"]).min_face == 12


def test_ensure_samples_rewrites_missing_photos(tmp_path, samples):
    paths = demo.ensure_samples(tmp_path)
    assert [p.name for p in paths] == list(SAMPLES)
    for p in paths:  # what the committed files hold is what the packages give
        assert np.abs(read_image(p).astype(int) - read_image(samples / p.name)).max() <= 2
    assert (tmp_path / "grace_hopper.jpg").read_bytes() == (samples / "grace_hopper.jpg").read_bytes()
    assert read_image(tmp_path / "camera.jpg").shape == (512, 512, 3)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every input batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)

    def predict_age(self, age_out):
        return self.model.predict_age(age_out)

    def head_outputs(self, gender_logits, age_out, flip=False):
        return self.model.head_outputs(gender_logits, age_out, flip)


def test_no_skew_between_demo_and_validation(tmp_path, samples, checkpoint):
    """For the same aligned face, demo.py feeds the network exactly the tensor validation builds."""
    import data_gen
    from face import align_face

    ann = inference.Predictor(str(checkpoint), "cpu", 0.9)
    ann.model = Recorder(ann.model)
    image = read_image(samples / "astronaut.jpg")
    faces = ann.analyse(image)
    assert len(faces) == 1 and len(ann.model.inputs) == 1
    demo_tensor = ann.model.inputs[0][0]

    found = ann.detector.detect([image])[0]
    face = align_face(image, np.asarray(found.landmarks, np.float32)[0], ann.size)
    # a lossless file the validation path reads, in pre_process.py's layout
    data = tmp_path / "data"
    (data / "faces" / "00").mkdir(parents=True)
    Image.fromarray(face).save(data / "faces" / "00" / "a.png")
    (data / "labels.csv").write_text("image,source,identity,age,gender,split\nfaces/00/a.png,00/a.jpg,1,30,0,valid\n")
    valid_tensor = data_gen.FaceDataset(data, "valid", train=False)[0][0]
    assert demo_tensor.dtype == valid_tensor.dtype and demo_tensor.shape == valid_tensor.shape
    assert torch.equal(demo_tensor, valid_tensor)


def test_all_faces_of_a_photo_in_one_batch(tmp_path, samples, checkpoint):
    ann = inference.Predictor(str(checkpoint), "cpu", 0.9)
    ann.model = Recorder(ann.model)
    a, h = read_image(samples / "astronaut.jpg"), read_image(samples / "grace_hopper.jpg")
    both = np.zeros((600, 512 + 512, 3), np.uint8)
    both[:512, :512], both[:, 512:] = a, h  # grace_hopper is 600 x 512
    faces = ann.analyse(both)
    assert len(faces) == 2
    assert [x.shape[0] for x in ann.model.inputs] == [2]
    assert sorted(f["box"][0] < 512 for f in faces) == [False, True]


def make_video(path, samples, frames=3, fps=5):
    """A tiny mp4 of the astronaut portrait, `frames` frames long."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = cv2.cvtColor(read_image(samples / "astronaut.jpg"), cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (512, 512))
    for _ in range(frames):
        writer.write(frame)
    writer.release()
    return path


def frame_count(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


def test_video_frames_go_through_in_batches(tmp_path, samples, checkpoint):
    """A video's frames are analysed a batch of photos at a time: 5 frames, batches of 2 -> forward passes of 2, 2, 1."""
    clip = make_video(tmp_path / "clip.mp4", samples, frames=5)
    predictor = inference.Predictor(str(checkpoint), "cpu", 0.9, photo_batch=2)
    alone = predictor.analyse(read_image(samples / "astronaut.jpg"))
    predictor.model = Recorder(predictor.model)
    entry = demo.process_video(clip, predictor, demo.Outputs(tmp_path / "out"), demo.Shower(False), 0)
    assert [x.shape[0] for x in predictor.model.inputs] == [2, 2, 1]
    assert [f["frame"] for f in entry["frames"]] == [0, 1, 2, 3, 4]
    assert all(len(f["faces"]) == 1 and np.allclose(f["faces"][0]["box"], alone[0]["box"], atol=6) for f in entry["frames"])
    assert frame_count(tmp_path / "out" / "clip.mp4") == 5


def test_video_and_unreadable_video(tmp_path, samples, checkpoint, capsys):
    make_video(tmp_path / "clip.mp4", samples)
    (tmp_path / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "clip.mp4"), str(tmp_path / "broken.mp4"),
                   "--output", str(out), "--device", "cpu"])
    assert e.value.code == 1
    results = json.loads((out / "results.json").read_text())
    # a video lists its frames: index, time in s (5 fps), and that frame's faces as a photo lists them
    assert [(f["frame"], f["time"]) for f in results[0]["frames"]] == [(0, 0.0), (1, 0.2), (2, 0.4)]
    photo = inference.Predictor(str(checkpoint), "cpu", 0.9).analyse(read_image(samples / "astronaut.jpg"))
    for f in results[0]["frames"]:
        assert len(f["faces"]) == 1 and f["faces"][0].keys() == photo[0].keys()
        assert np.allclose(f["faces"][0]["box"], photo[0]["box"], atol=6)  # mp4v's compression moves it a little
    assert "faces" not in results[0] and results[0]["fps"] == 5
    assert "cannot be opened as a video" in results[1]["error"] and results[1]["frames"] == []
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {tmp_path / 'broken.mp4'}: cannot be opened as a video"]
    assert "2 inputs, 3 faces, 1 errors" in captured.out  # the closing line counts the video's faces
    assert frame_count(out / "clip.mp4") == 3
    assert not list(out.glob(".*"))  # no temp file left


def test_same_named_videos_get_their_own_outputs(tmp_path, samples, checkpoint):
    a, b = make_video(tmp_path / "a" / "clip.mp4", samples, 2), make_video(tmp_path / "b" / "clip.mp4", samples, 3)
    out = tmp_path / "out"
    results = demo.main(["--checkpoint", str(checkpoint), "--input", str(a), str(b), "--output", str(out),
                         "--device", "cpu"])
    assert [r["output"] for r in results] == [str(out / "clip.mp4"), str(out / "clip_1.mp4")]
    assert (frame_count(out / "clip.mp4"), frame_count(out / "clip_1.mp4")) == (2, 3)


def test_video_in_the_output_folder_is_not_written_over(tmp_path, samples, checkpoint):
    clip = make_video(tmp_path / "clip.mp4", samples)
    before = clip.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input"):
        demo.main(["--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(tmp_path), "--device", "cpu"])
    assert clip.read_bytes() == before


def demo_cmd(checkpoint, clip, out):
    return [sys.executable, "demo.py", "--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(out),
            "--device", "cpu"]


def start_and_wait_for_temp(cmd, out):
    """Start demo.py; return it with the temp video it is writing, once that exists."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        temps = list(out.glob(".*.tmp.mp4"))
        if temps:
            return proc, temps[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"demo.py wrote no temp video: {proc.communicate()[1]}")


def test_interrupted_and_killed_videos_leave_no_temp_file(tmp_path, samples, checkpoint):
    clip, out = make_video(tmp_path / "clip.mp4", samples, frames=200), tmp_path / "out"
    for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C; `timeout` and `docker stop` (results.json was lost)
        proc, tmp = start_and_wait_for_temp(demo_cmd(checkpoint, clip, out), out)
        proc.send_signal(stop)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130 and "interrupted" in err, (stop, proc.returncode, err[-2000:])
        assert not tmp.exists() and not list(out.glob(".*.tmp.mp4")) and not (out / "clip.mp4").exists()
        assert json.loads((out / "results.json").read_text()) == []
        (out / "results.json").unlink()

    proc, tmp = start_and_wait_for_temp(demo_cmd(checkpoint, clip, out), out)
    proc.send_signal(signal.SIGKILL)  # nothing runs after this: the next run cleans up
    proc.wait()
    assert tmp.exists()
    live = out / f".other.{os.getpid()}.tmp.mp4"  # another run, still going (this process), in the same folder
    live.write_bytes(b"being written")
    short = make_video(tmp_path / "short.mp4", samples, frames=1)
    demo.main(["--checkpoint", str(checkpoint), "--input", str(short), "--output", str(out), "--device", "cpu"])
    assert not tmp.exists() and live.exists()
    assert frame_count(out / "short.mp4") == 1


def test_sheet(tmp_path, samples, checkpoint):
    folder = tmp_path / "utk"
    folder.mkdir()
    for name, age, utk_gender in zip(SAMPLES, (34, 41, 79), (1, 0, 1)):
        shutil.copy(samples / name, folder / f"{age}_{utk_gender}_0_20170101.jpg")
    Image.new("RGB", (100, 100), (90, 90, 90)).save(folder / "50_0_0_1.png")
    entries = demo.main(["--checkpoint", str(checkpoint), "--sheet", str(folder), "--output", str(tmp_path / "o"),
                         "--device", "cpu"])
    assert [e["truth"] for e in entries] == ["female, 34", "male, 41", "male, 50", "female, 79"]
    assert [len(e["faces"]) for e in entries] == [1, 1, 0, 1]
    sheet = read_image(tmp_path / "o" / "sheet.png")
    assert sheet.shape[0] > 3 * sheet.shape[1] / 4  # four rows


@pytest.mark.parametrize("width", [60, 150, 240, 900])
def test_a_label_fits_a_narrow_photo(width, monkeypatch):
    """The label shrinks to the photo's width (at 150 px it was cut off) and keeps its scale where it fits."""
    drawn = []
    real = cv2.putText

    def put_text(img, text, org, font, scale, *rest):
        drawn.append((text, org, font, scale, rest[1]))
        return real(img, text, org, font, scale, *rest)

    monkeypatch.setattr(cv2, "putText", put_text)
    face = dict(box=[width * 0.6, 10, width * 0.95, 80], landmarks=[[width * 0.7, 40]] * 5, gender="female",
                gender_prob=0.97, age=29.0, age_low=24.0, age_high=35.0)
    demo.draw(np.zeros((200, width, 3), np.uint8), [face])
    [(text, (x, _), font, scale, thick)] = drawn
    assert text == "female 97%, 29 (24-35)"
    assert 0 <= x and x + cv2.getTextSize(text, font, scale, thick)[0][0] <= width - 1  # its last column inside
    assert scale == 0.4 if width >= 240 else scale < 0.4  # the smallest scale it had, where the label fits


def test_show_without_display(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    shower = demo.Shower(True)
    assert not shower.on and shower.show(np.zeros((4, 4, 3), np.uint8), 0)
    assert "no display" in capsys.readouterr().err
    monkeypatch.setenv("DISPLAY", ":99")
    shower = demo.Shower(True)
    assert shower.on
    monkeypatch.setattr(cv2, "imshow", lambda *a: (_ for _ in ()).throw(cv2.error("no GUI")))
    assert shower.show(np.zeros((4, 4, 3), np.uint8), 0) and not shower.on  # headless OpenCV: note, go on


def test_an_interrupt_keeps_the_videos_done_in_results_json(tmp_path, samples, checkpoint, monkeypatch):
    """Ctrl-C or SIGTERM in the second video: results.json lists the first (the videos' entries were added only
    once all of them were done, so it listed none)."""
    clips = [make_video(tmp_path / f"{name}.mp4", samples, frames=1) for name in ("a", "b")]
    done = demo.process_video

    def second_interrupted(source, *rest):
        if Path(source).name == "b.mp4":
            raise KeyboardInterrupt
        return done(source, *rest)

    monkeypatch.setattr(demo, "process_video", second_interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--checkpoint", str(checkpoint), "--input", *map(str, clips), "--output", str(tmp_path / "out"),
                   "--device", "cpu"])
    assert [Path(r["video"]).name for r in json.loads((tmp_path / "out" / "results.json").read_text())] == ["a.mp4"]
