"""Annotate photos, a video or a webcam with every face's gender and age.

    python demo.py --checkpoint runs/r18_112/best.pt --input images --output out/demo
    python demo.py --input a.jpg b.png photos/       # files and folders, mixed
    python demo.py --checkpoint runs/r18_112/best.onnx  # export.py's ONNX model: ~2x faster on a CPU
    python demo.py --input clip.mp4                   # -> OUT/clip.mp4, every frame annotated
    python demo.py --input 0 --show                   # webcam 0 -> OUT/webcam0.mp4, until q or Ctrl-C
    python demo.py --sheet data/UTKFace               # labelled photos -> OUT/sheet.png

Photos (and a video's frames) are decoded ahead in threads and analysed in batches of
--photo-batch photos (inference.Predictor): MTCNN finds every face and its 5 landmarks in the
whole batch at once (face.py), each face is aligned onto the ArcFace template at the
checkpoint's size (face.align_face), all faces of the batch are predicted in one forward pass
through data_gen.preprocess (the validation transform, so serving sees what validation saw),
and the results are those of one photo at a time. Each box, its landmarks and a label like
`female 97%, 29 (24-35)` are drawn: the probability of that gender (calibrated by the checkpoint's
temperature), the age and, for the distribution heads (ce, dex, mv), its 80% interval (l1/l2
heads have none: `female 97%, 29`). --flip averages each face with its mirror image. Photos are turned upright by their EXIF
orientation first (utils.read_image). Writes:
  OUT/<file name>    the annotated photo (a photo without a face: copied unannotated); inputs with
                     the same name get name_1.jpg, name_2.jpg, ...; no input is ever written over
  OUT/<stem>.mp4     the annotated video (webcam N: webcamN.mp4), named the same way
  OUT/results.json   one entry per input: a photo's {image, output, faces [{box [x1,y1,x2,y2], score,
                     landmarks 5x[x,y], gender, gender_prob, age, age_std, age_low, age_high
                     (null for l1/l2)}]}, a video's {video, output, fps,
                     frames [{frame (index), time (s), faces [as a photo's]}]}, or {..., error}
A file that is not an image is reported on stderr and the run goes on; the exit status is then 1.
Without --input it annotates the sample photos in images/ (written there first if missing).
--sheet takes a UTKFace-named folder or a CSV (image,age,gender; see evaluate.py) and draws a
table like the original README's: photo, aligned face, prediction, truth, one row per photo.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

import config
# before data_gen/face (torch): inference sets torch's OpenMP spinning, read when torch loads
from inference import (COLOURS, IMAGE_SUFFIXES, PREDICTION_KEYS, Labelled, Predictor, add_checkpoint_option,
                       ensure_samples, list_images, predict, prediction_fields, read_ahead, read_csv_labels, read_utkface)
from face import detect_and_align
from utils import (REPO, ImageError, UserError, argument_parser, atomic_write_bytes, check_output_folder, in_background,
                   pid_alive, pyplot, read_image, run_main, save_figure, write_json)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
LANDMARK_COLOUR = (60, 220, 60)


# --- inputs --------------------------------------------------------------------------------------

def collect_inputs(items: list[str]) -> list[tuple[str, object]]:
    """[(kind, value)]: ('image', Path), ('video', Path) or ('webcam', int), in the order given."""
    out: list[tuple[str, object]] = []
    for item in items:
        if item.isdigit():
            out.append(("webcam", int(item)))
            continue
        path = Path(item)
        if path.resolve() == (REPO / config.IMAGES).resolve():  # the repository's samples: (re)write missing ones
            ensure_samples(path)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise UserError(f"--input {path}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            out += [("image", p) for p in images]
        elif path.is_file():
            out.append(("video" if path.suffix.lower() in VIDEO_SUFFIXES else "image", path))
        else:
            raise UserError(f"--input {path}: no such file or folder")
    return out


def first_output_name(kind: str, value: Path | int) -> str:
    """The file name an input's result gets in the output folder unless taken (see Outputs)."""
    if kind == "webcam":
        return f"webcam{value}.mp4"
    return Path(value).stem + ".mp4" if kind == "video" else Path(value).name


class Outputs:
    """The output folder's file names of one run, each given once: inputs named alike get name_1.ext, ...

    (An input in the output folder would be written over by its own result; main() refuses that
    first, and the names given here, its own name plus a suffix, then never fall on another input.)
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.used = {"results.json"}  # written last: no annotated photo may take its name

    def claim(self, name: str) -> Path:
        """folder/name, or folder/name_1.ext, name_2.ext, ... when this run already used it."""
        stem, suffix, k = Path(name).stem, Path(name).suffix, 1
        while name in self.used:
            name, k = f"{stem}_{k}{suffix}", k + 1
        self.used.add(name)
        return self.folder / name


VIDEO_TMP = ".{stem}.{pid}.tmp.mp4"  # a video being written (renamed when complete); pid: whose it is


def remove_stale_videos(folder: Path) -> list[Path]:
    """Delete the temp videos of runs that were killed (their process is gone); a live run's are kept."""
    removed = []
    for tmp in folder.glob(".*.tmp.mp4"):
        pid = tmp.name[:-len(".tmp.mp4")].rsplit(".", 1)[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def display_available() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# --- analysis and drawing ------------------------------------------------------------------------

def label(face: dict) -> str:
    """`female 97%, 29 (24-35)`: gender, its probability, age and its interval (where the head has one)."""
    interval = f" ({face['age_low']:.0f}-{face['age_high']:.0f})" if face.get("age_low") is not None else ""
    return f"{face['gender']} {100 * face['gender_prob']:.0f}%, {face['age']:.0f}{interval}"


def fit_scale(text: str, font: int, scale: float, thick: int, width: int) -> float:
    """The font scale at which text is at most width px wide: scale, or less (a narrow photo's label was cut off)."""
    tw = cv2.getTextSize(text, font, scale, thick)[0][0]
    return scale if tw <= width else scale * (width - thick) / (tw - thick)  # a text is thick px + scale x its glyphs


def draw(image: np.ndarray, faces: list[dict], labels: bool = True) -> np.ndarray:
    """A copy of the RGB photo with each face's box, 5 landmarks and (if labels) its label drawn."""
    out = image.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    scale = max(0.4, min(h, w) / 900)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for f in faces:
        colour = COLOURS[f["gender"]]
        x1, y1, x2, y2 = (int(round(v)) for v in f["box"])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick, cv2.LINE_AA)
        for x, y in f["landmarks"]:
            cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, LANDMARK_COLOUR, -1, cv2.LINE_AA)
        if not labels:
            continue
        text = label(f)
        size = fit_scale(text, font, scale, thick, w - 4)  # its box is 2 px wider, and rounding may add 1
        (tw, th), base = cv2.getTextSize(text, font, size, thick)
        ty = y1 - base - 2 if y1 - th - base - 4 >= 0 else min(y2 + th + 2, h - base - 1)  # above the box, else below
        tx = min(max(x1, 0), max(w - tw - 2, 0))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + base), colour, -1)
        cv2.putText(out, text, (tx + 1, ty), font, size, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def encode_like(rgb: np.ndarray, name: str) -> tuple[bytes, str]:
    """(encoded bytes, file name): the format the name's suffix says, else PNG with .png appended."""
    fmt = Image.registered_extensions().get(Path(name).suffix.lower())
    buf = io.BytesIO()
    try:
        if fmt is None:
            raise ValueError("unknown suffix")
        Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    except (ValueError, OSError, KeyError):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        name += ".png"
    return buf.getvalue(), name


class Shower:
    """cv2 windows for --show, only where a display and a GUI-enabled OpenCV exist."""

    def __init__(self, wanted: bool):
        self.on = wanted and display_available()
        if wanted and not self.on:
            print("--show: no display here (DISPLAY is not set); showing nothing", file=sys.stderr)

    def show(self, rgb: np.ndarray, wait_ms: int) -> bool:
        """Show a frame; False when the user pressed q or Esc."""
        if not self.on:
            return True
        try:
            cv2.imshow("demo (q: quit)", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            return cv2.waitKey(wait_ms) & 0xFF not in (ord("q"), 27)
        except cv2.error:
            print("--show: this OpenCV has no GUI support (opencv-python-headless); showing nothing", file=sys.stderr)
            self.on = False
            return True

    def close(self) -> None:
        if self.on:
            cv2.destroyAllWindows()


# --- the three kinds of input ----------------------------------------------------------------

def read_or_error(path: Path) -> np.ndarray | str:
    """The upright RGB photo, or the one-line message saying why it cannot be used."""
    try:
        return read_image(path)
    except ImageError as e:
        return str(e)
    except FileNotFoundError as e:
        return f"{path}: cannot be read ({e.strerror})"


def process_images(paths: list[Path], predictor: Predictor, outputs: Outputs, shower: Shower,
                   workers: int) -> Iterator[dict]:
    """results.json's entry of each photo, in order: decoded ahead in threads, analysed in batches of photos."""
    for path, image, faces in predictor.analyse_stream(read_ahead(paths, read_or_error, workers)):
        if faces is None:
            print(f"error: {image}", file=sys.stderr)
            yield dict(image=str(path), error=image, faces=[])
            continue
        if not faces:
            print(f"{path}: no face found; copied unannotated")
        annotated = draw(image, faces)
        data, name = encode_like(annotated, path.name)
        out = outputs.claim(name)
        atomic_write_bytes(out, data)
        if faces:
            print(f"{path}: " + "; ".join(label(f) for f in faces))
        shower.show(annotated, 0)
        yield dict(image=str(path), output=str(out), faces=faces)


def read_frames(cap: "cv2.VideoCapture", max_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) until the video ends or max_frames (0: no limit) were read."""
    for index in itertools.count():
        if max_frames and index >= max_frames:
            return
        ok, bgr = cap.read()
        if not ok:
            return
        yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def process_video(source: Path | int, predictor: Predictor, outputs: Outputs, shower: Shower, max_frames: int) -> dict:
    """Annotate every frame into OUT/<name>.mp4 until the video ends (webcam: q, Ctrl-C or --max-frames).

    Frames are decoded by a background thread at most a batch of photos ahead and analysed in
    batches (a webcam's one at a time: a batch would delay what is shown). The faces of each frame
    are listed (frames: frame index, time in the output video in s, faces); the video is written
    under a temp name, renamed when complete and deleted otherwise.
    """
    webcam = isinstance(source, int)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet: a bad file gets our one line, not its
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its WARN lines would repeat our one-line error
    try:
        cap = cv2.VideoCapture(source if webcam else str(source))
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not cap.isOpened():
        msg = f"webcam {source}: cannot be opened" if webcam else f"{source}: cannot be opened as a video"
        print(f"error: {msg}", file=sys.stderr)
        return dict(video=str(source), error=msg, frames=[])
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and np.isfinite(fps) and fps > 0 else 25.0
    out = outputs.claim(first_output_name("webcam" if webcam else "video", source))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / VIDEO_TMP.format(stem=out.stem, pid=os.getpid())  # no half video under the real name
    writer, frames, renamed = None, [], False
    decoding = in_background(read_frames(cap, max_frames), predictor.photo_batch, "video-frames")
    analysed = predictor.analyse_stream(decoding, photo_batch=1 if webcam else 0)
    try:
        try:
            for index, rgb, faces in analysed:
                shown = draw(rgb, faces)
                if writer is None:
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (rgb.shape[1], rgb.shape[0]))
                    if not writer.isOpened():
                        raise UserError(f"{out}: cannot be written (no mp4v encoder in this OpenCV?)")
                writer.write(cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
                frames.append(dict(frame=index, time=round(index / fps, 3), faces=faces))
                if not shower.show(shown, 1):
                    break
        except KeyboardInterrupt:
            if not webcam:
                raise
            print("stopped (Ctrl-C)")
        finally:
            analysed.close()
            decoding.close()  # stops the decoding thread before its capture is released
            cap.release()
            if writer is not None:
                writer.release()
        if frames:
            os.replace(tmp, out)
            renamed = True
    finally:
        if not renamed:  # interrupted, failed or empty: the temp file goes
            tmp.unlink(missing_ok=True)
    if not frames:
        msg = f"{source}: no frame could be read"
        print(f"error: {msg}", file=sys.stderr)
        return dict(video=str(source), error=msg, frames=[])
    print(f"{source}: {len(frames)} frames, {sum(len(f['faces']) for f in frames)} faces -> {out}")
    return dict(video=str(source), output=str(out), fps=fps, frames=frames)


def count_faces(results: list[dict]) -> int:
    """Faces in results.json's entries: a photo's, and those of every frame of a video."""
    return sum(len(r.get("faces", [])) + sum(len(f["faces"]) for f in r.get("frames", [])) for r in results)


def make_sheet(source: Path, ann: Predictor, out: Path, rows: int) -> list[dict]:
    """A table like the original README's: photo | aligned | prediction | truth, one row per photo.

    The prediction is green when its gender is right and its age within 5 years, red otherwise.
    """
    items: list[Labelled] = read_csv_labels(source)[:rows] if source.is_file() else read_utkface(source)[0][:rows]
    entries, table = [], []
    for item in items:
        try:
            image = read_image(item.path)
        except (ImageError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        found = detect_and_align(ann.detector, [image], ann.size)[0]
        truth = f"{'male' if item.gender else 'female'}, {item.age:.0f}"
        if found is None:
            table.append((image, None, "no face found", truth, "gray"))
            entries.append(dict(image=str(item.path), truth=truth, faces=[]))
            continue
        pred = predict(ann.model, ann.cfg, found["face"][None], ann.device, 1, ann.flip)
        face = dict(box=found["box"].tolist(), **prediction_fields({k: pred[k][0] for k in PREDICTION_KEYS}))
        marked = draw(image, [dict(face, landmarks=found["landmarks"].tolist())], labels=False)
        right = (face["gender"] == "male") == bool(item.gender) and abs(face["age"] - item.age) <= 5
        table.append((marked, found["face"], label(face), truth, "#2a7d2a" if right else "#b22222"))
        entries.append(dict(image=str(item.path), truth=truth, faces=[face]))
    if not table:
        raise UserError(f"--sheet {source}: none of its photos could be read")
    fig, axes = pyplot().subplots(len(table), 4, figsize=(10, 2.6 * len(table)), squeeze=False)
    for ax, title in zip(axes[0], ("photo", "aligned", "prediction", "truth")):
        ax.set_title(title)
    for row, (photo, face, pred, truth, colour) in zip(axes, table):
        row[0].imshow(photo)
        if face is not None:
            row[1].imshow(face)
        row[2].text(0.5, 0.5, pred, ha="center", va="center", fontsize=12, color=colour)
        row[3].text(0.5, 0.5, truth, ha="center", va="center", fontsize=12)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(ax in row[:2])
    save_figure(fig, out, dpi=90)
    print(f"wrote {out} ({len(table)} rows)")
    return entries


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_checkpoint_option(p)
    p.add_argument("--input", nargs="+", default=None,
                   help=f"image files, folders, a video file or a webcam index (default: the samples in {config.IMAGES}/)")
    p.add_argument("--output", default=config.DEMO_OUT, help="where the annotated photos go (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--min-score", type=float, default=config.DEMO_MIN_SCORE,
                   help="ignore detections whose MTCNN score is below this (default: %(default)s)")
    p.add_argument("--min-face", type=int, default=config.DEMO_MIN_FACE,
                   help="smallest face looked for, in pixels (MTCNN's min_face_size) (default: %(default)s)")
    p.add_argument("--photo-batch", type=int, default=config.DETECT_BATCH,
                   help="photos (or video frames) per MTCNN call and forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=config.WORKERS, help="photo decoding threads (default: %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="average each face with its mirror image (twice the network's work; a .onnx must be exported with --flip)")
    p.add_argument("--show", action="store_true", help="also show each result in a window (when a display exists)")
    p.add_argument("--max-frames", type=int, default=0, help="video/webcam: stop after N frames, 0 = all (default: %(default)s)")
    p.add_argument("--sheet", default=None, metavar="FOLDER_OR_CSV",
                   help="instead: a labelled UTKFace folder or image,age,gender CSV -> OUTPUT/sheet.png")
    p.add_argument("--sheet-rows", type=int, default=config.SHEET_ROWS, help="photos in the sheet (default: %(default)s)")
    args = p.parse_args(argv)
    if args.photo_batch < 1:
        p.error(f"--photo-batch {args.photo_batch}: must be at least 1")
    if args.min_face < 12:
        p.error(f"--min-face {args.min_face}: must be at least 12 (MTCNN's window; smaller faces would mean upsampling)")
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out_dir = Path(args.output)
    check_output_folder(out_dir, f"--output {out_dir}")
    if args.sheet:
        source = Path(args.sheet)
        if not source.exists():
            raise UserError(f"--sheet {source}: no such file or folder")
        ann = Predictor(args.checkpoint, args.device, args.min_score, args.min_face, flip=args.flip)
        return make_sheet(source, ann, out_dir / "sheet.png", args.sheet_rows)
    inputs = collect_inputs(args.input or [os.path.relpath(REPO / config.IMAGES)])
    for kind, value in inputs:
        target = out_dir / first_output_name(kind, value)
        if kind != "webcam" and target.exists() and target.samefile(value):  # samefile: links, case-blind disks
            raise UserError(f"--output {out_dir}: would overwrite the input {value}; choose another folder")
    predictor = Predictor(args.checkpoint, args.device, args.min_score, args.min_face, photo_batch=args.photo_batch,
                          flip=args.flip)
    shower = Shower(args.show)
    results, outputs = [], Outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_videos(out_dir)
    # `timeout`, `docker stop` and schedulers stop with SIGTERM: as Ctrl-C, so that results.json keeps what was done
    terminated = signal.signal(signal.SIGTERM, interrupt)
    try:
        # consecutive photos go through the batched path together; each video or webcam on its own
        for photos, group in itertools.groupby(inputs, key=lambda item: item[0] == "image"):
            if photos:
                for entry in process_images([value for _, value in group], predictor, outputs, shower, args.workers):
                    results.append(entry)  # one by one: an interrupted run's results.json keeps the photos done
            else:
                for _, value in group:  # one by one, as the photos: an interrupt keeps the videos done
                    results.append(process_video(value, predictor, outputs, shower, args.max_frames))
    finally:
        signal.signal(signal.SIGTERM, terminated)
        shower.close()
        write_json(out_dir / "results.json", results)  # also when interrupted: what was done so far
    errors = sum("error" in r for r in results)
    print(f"{len(results)} inputs, {count_faces(results)} faces, {errors} errors -> {out_dir}/ (results.json)")
    if errors:
        sys.exit(1)
    return results


if __name__ == "__main__":
    run_main(main)
