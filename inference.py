"""Use a trained model: load it, find every face of a batch of photos and predict its gender and age.

Not run directly: demo.py, evaluate.py, export.py, bench.py and serve.py all use this module (and
face.py, models.py, data_gen.py, utils.py), never each other.

    from inference import Predictor
    predictor = Predictor("runs/r18_112/best.onnx")        # or a best.pt written by train.py
    faces = predictor.analyse(read_image("photo.jpg"))      # one photo
    for path, image, faces in predictor.analyse_stream(decoded(paths)):  # a folder, batched
        ...

A face record is what demo.py's results.json and serve.py's /predict hold: box [x1, y1, x2, y2]
and score (MTCNN), landmarks 5 x [x, y], gender (female | male), gender_prob (the probability of
that gender, calibrated by the checkpoint's temperature), age (years), and for the distribution
heads (ce, dex, mv) age_std and the 80% interval age_low..age_high (years; null for l1/l2, which
predict one value and no spread). With flip, each face and its mirror image go through the
network in one batch and their outputs are averaged (models.AgeGenderNet.head_outputs). A batch
of photos goes through MTCNN in one call and all of their faces through the network in one
forward pass (data_gen.preprocess, the validation transform);
the records are the same as analysing each photo alone (tests/test_inference.py checks).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pickle
import shlex
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeAlias, TypeVar

# Idle OpenMP threads of torch spin for ~300,000 iterations after each op by default, holding the
# cores that onnxruntime (an .onnx checkpoint) needs between detector calls: ~1.6x slower
# predictions on 2 cores. Read once, when torch loads (the scripts import this module before
# torch); a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np
import torch

import config
from data_gen import IMAGENET_MEAN, IMAGENET_STD, preprocess
from face import FaceDetector, align_face, as_rgb
from metrics import fit_temperature
from models import load_checkpoint, mirrored, model_args_of, model_from_checkpoint, read_checkpoint
from utils import (UserError, atomic_torch_save, atomic_write_bytes, chunks_within, jpeg_bytes, map_ahead, onnx_session,
                   pick_device, read_image_or_reason)

GENDERS = ("female", "male")  # index = class id: 0 female, 1 male (as in labels.csv)
COLOURS = {"female": (230, 60, 140), "male": (40, 120, 240)}  # RGB of a face's box and label: demo.py's drawings, serve.py's page
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INPUT, OUTPUTS = "face", ("gender_prob", "age", "age_std", "age_low", "age_high")  # the ONNX graph's names: export.py writes them, OnnxModel reads them
INTERVAL_KEYS = ("age_std", "age_low", "age_high")  # NaN (l1/l2) in the arrays, null in the records
# digits after the point a face record keeps of each number (face_record): finer ones are noise
DECIMALS = dict(box=2, score=4, landmarks=2, gender_prob=4, age=2, age_std=2, age_low=2, age_high=2)

T = TypeVar("T")
Model: TypeAlias = "torch.nn.Module | OnnxModel"  # what load_model gives: a .pt's network, or an exported .onnx


# --- model ---------------------------------------------------------------------------------

def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, for every script that loads a model with load_model."""
    parser.add_argument("--checkpoint", default=config.CHECKPOINT,
                        help="best.pt written by train.py, or a .onnx written by export.py (onnxruntime on the CPU: "
                             "faster there) (default: %(default)s)")


def load_model(path: str | Path, device: str | torch.device) -> tuple[Model, dict]:
    """(model, its config) with errors a user can act on: a .pt from train.py in eval mode on device,
    or a .onnx from export.py as an OnnxModel (onnxruntime, on the CPU whatever the device)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: not found; train one with `python train.py --out {path.parent}` "
                        "(or run `make quickstart`, which writes runs/quickstart/best.pt)")
    if path.suffix.lower() == ".onnx":
        model = OnnxModel(path)
        return model, model.cfg
    try:
        model, cfg = load_checkpoint(path, device)
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise UserError(f"--checkpoint {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "is it a best.pt/last.pt written by train.py?") from e
    model.eval()
    return model, cfg


def export_command(onnx: str | Path, checkpoint: str | None, flip: bool = False) -> str:
    """The export.py command that writes the .onnx file again from the checkpoint its metadata records (the path as
    export.py was given it): without it, export.py would export its default checkpoint, another model."""
    source = shlex.quote(checkpoint) if checkpoint else "CHECKPOINT"  # unknown (an unreadable file, or not export.py's): a placeholder
    return f"`python export.py --checkpoint {source}{' --flip' if flip else ''} --out {shlex.quote(str(onnx))}`"


class OnnxModel:
    """A model written by export.py, run by onnxruntime on the CPU.

    On a CPU it predicts a face ~2x faster than PyTorch eager (its convolutions come fused with
    their batch norm and ReLU), which is most of a photo's time in demo.py.
    """

    def __init__(self, path: Path):
        try:
            self.session = onnx_session(str(path))
        except Exception as e:  # onnxruntime's own exception types (Fail, InvalidProtobuf, ...)
            raise UserError(f"--checkpoint {path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                            f"export it again: {export_command(path, None)}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        redo = f"export it again: {export_command(path, meta.get('checkpoint'), meta.get('flip') == 'True')}"
        try:
            size, mean, std = int(meta["size"]), json.loads(meta["mean"]), json.loads(meta["std"])
        except (KeyError, ValueError) as e:
            raise UserError(f"--checkpoint {path}: not an export.py model (metadata {e} missing or unreadable); {redo}") from e
        if not (np.allclose(mean, IMAGENET_MEAN) and np.allclose(std, IMAGENET_STD)):
            raise UserError(f"--checkpoint {path}: exported for the input normalisation mean {mean} std {std}, "
                            f"not this repository's ({list(IMAGENET_MEAN)}, {list(IMAGENET_STD)}); {redo}")
        # files exported before the intervals have only gender_prob and age: the rest is then NaN (null)
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in OUTPUTS]
        self.flip = meta.get("flip") == "True"  # exported with --flip: the mirror is inside the graph
        self.cfg = dict(size=size, arch=meta.get("arch"), age_loss=meta.get("age_loss"), onnx=str(path), flip=self.flip,
                        gender_temperature=float(meta.get("gender_temperature", 1.0)), checkpoint=meta.get("checkpoint"))

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """x (N, 3, S, S) normalised, on the CPU -> head_outputs' arrays: gender_prob (N, 2), age, age_std,
        age_low, age_high (N,)."""
        got = dict(zip(self.outputs, self.session.run(self.outputs, {INPUT: x.contiguous().numpy()})))
        nan = np.full(len(x), np.nan, np.float32)
        return {k: got.get(k, nan) for k in OUTPUTS}


PREDICTION_KEYS = ("p_male", "age") + INTERVAL_KEYS  # predict()'s arrays


def check_flip(model: Model, flip: bool) -> None:
    """A UserError where flip is asked of an ONNX file exported without it (its graph cannot average)."""
    if isinstance(model, OnnxModel) and flip and not model.flip:
        raise UserError(f"--flip: {model.cfg['onnx']} was exported without it; export it again with it: "
                        f"{export_command(model.cfg['onnx'], model.cfg['checkpoint'], flip=True)}, or drop --flip")


def _as_prediction(out: dict) -> dict[str, np.ndarray]:
    """head_outputs' tensors or OnnxModel's arrays -> {p_male, age, age_std, age_low, age_high} (N,) numpy."""
    out = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return dict(p_male=out["gender_prob"][:, 1], **{k: out[k] for k in ("age",) + INTERVAL_KEYS})


def predict(model: Model, cfg: dict, faces: np.ndarray, device: str | torch.device, batch_size: int = 64,
            flip: bool = False) -> dict[str, np.ndarray]:
    """{p_male, age, age_std, age_low, age_high}: arrays (N,) for aligned faces, uint8 (N, S, S, 3) RGB,
    by a load_model() model (the interval keys NaN for l1/l2 heads).

    The faces go through data_gen.preprocess, the transform of the validation data path, so
    evaluation, the demo and the service see exactly what validation saw. flip: each face and
    its mirror image in one batch, outputs averaged; a PyTorch model then also gives the plain
    predictions of the same forward pass under "plain" (a dict like the result), which
    evaluate.py reports beside them. An ONNX model flips only if exported with --flip (the
    mirror is then inside its graph, whatever flip says).
    """
    check_flip(model, flip)
    parts, plain = [], []
    with torch.inference_mode():
        for start in range(0, len(faces), batch_size):
            x = preprocess(faces[start:start + batch_size])  # (B, 3, S, S)
            if isinstance(model, OnnxModel):
                parts.append(_as_prediction(model(x)))
                continue
            x = x.to(device)
            gender_logits, age_out = model(mirrored(x) if flip else x)  # (B | 2B, 2), (B | 2B, 1 | num ages)
            parts.append(_as_prediction(model.head_outputs(gender_logits, age_out, flip=flip)))
            if flip:
                n = len(x)
                plain.append(_as_prediction(model.head_outputs(gender_logits[:n], age_out[:n])))
    result = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.float32) for k in PREDICTION_KEYS}
    if plain:
        result["plain"] = {k: np.concatenate([p[k] for p in plain]) for k in PREDICTION_KEYS}
    return result


def predicted_gender(p_male: np.ndarray) -> np.ndarray:
    """Class id per face: 1 (male) where p_male > 0.5, as argmax over the two logits."""
    return (np.asarray(p_male) > 0.5).astype(np.int64)


def gender_of(p_male: float) -> tuple[str, float]:
    """("male" | "female", the probability of that gender) from P(male), by predicted_gender's rule."""
    male = bool(predicted_gender(p_male))
    return GENDERS[male], float(p_male if male else 1 - p_male)


# --- photos -> face records ------------------------------------------------------------------

def pixels(image: np.ndarray) -> int:
    return int(image.shape[0] * image.shape[1])


def detector_for(model: Model, device: torch.device | str, min_face: int = 20) -> FaceDetector:
    """The MTCNN detector to go with model: for an ONNX model its nets run in onnxruntime too, on the CPU, so
    that no torch network runs on that model's path."""
    onnx = isinstance(model, OnnxModel)
    return FaceDetector(device="cpu" if onnx else str(device), min_face_size=min_face,
                        backend="onnx" if onnx else "torch")


class Predictor:
    """Detector + model: every face of a batch of photos with its gender and age.

    Photos are grouped for MTCNN by at most photo_batch photos and detect_pixels pixels (its working
    memory grows with the pixels), and all faces of a group are predicted in one forward pass of at
    most batch_size faces.
    """

    def __init__(self, checkpoint: str | Path, device: str = config.DEVICE, min_score: float = config.DEMO_MIN_SCORE,
                 min_face: int = config.DEMO_MIN_FACE, batch_size: int = config.EVAL_BATCH,
                 photo_batch: int = config.DETECT_BATCH, detect_pixels: int = config.DETECT_PIXELS, flip: bool = False):
        self.device = pick_device(device)
        self.model, self.cfg = load_model(checkpoint, self.device)
        self.size = int(self.cfg["size"])
        self.detector = detector_for(self.model, self.device, min_face)
        self.min_score, self.batch_size = min_score, batch_size
        self.photo_batch, self.detect_pixels = photo_batch, detect_pixels
        self.flip = flip or bool(self.cfg.get("flip"))  # an ONNX file exported with --flip always flips
        check_flip(self.model, flip)

    def analyse(self, image: np.ndarray) -> list[dict]:
        """Every face of one photo (RGB, or grey as the detector takes it) with score >= min_score (face records, best
        score first)."""
        return self.analyse_batch([image])[0]

    def analyse_batch(self, images: list[np.ndarray]) -> list[list[dict]]:
        """The face records of each photo (RGB or grey): one MTCNN call, one forward pass for all their faces."""
        images = [as_rgb(image) for image in images]  # the detector takes grey photos: their aligned faces need RGB too
        found, aligned = [], []
        for image, faces in zip(images, self.detector.detect(images) if images else []):
            boxes, scores, marks = (np.asarray(faces.boxes, np.float32).reshape(-1, 4),
                                    np.asarray(faces.scores, np.float32).reshape(-1),
                                    np.asarray(faces.landmarks, np.float32).reshape(-1, 5, 2))
            keep = np.flatnonzero(scores >= self.min_score)
            found.append((boxes[keep], scores[keep], marks[keep]))
            aligned += [align_face(image, m, self.size) for m in marks[keep]]
        if aligned:
            pred = predict(self.model, self.cfg, np.stack(aligned), self.device, self.batch_size, self.flip)
        out, at = [], 0
        for boxes, scores, marks in found:
            out.append([face_record(boxes[k], scores[k], marks[k], {key: pred[key][at + k] for key in PREDICTION_KEYS})
                        for k in range(len(scores))])
            at += len(scores)
        return out

    def analyse_stream(self, items: Iterable[tuple[T, np.ndarray | object]], photo_batch: int = 0
                       ) -> Iterator[tuple[T, np.ndarray | object, list[dict] | None]]:
        """(key, image, faces) for each (key, image) in order, analysed in groups of at most photo_batch
        (default: the predictor's) photos and detect_pixels pixels.

        An entry whose image is not an array (a decoding error, say) passes through with faces None.
        Lazy: it holds one group of photos at a time.
        """
        def cost(item: tuple) -> int:
            return pixels(item[1]) if isinstance(item[1], np.ndarray) else 0

        for group in chunks_within(items, self.detect_pixels, cost, photo_batch or self.photo_batch):
            images = [img for _, img in group if isinstance(img, np.ndarray)]
            results = iter(self.analyse_batch(images))
            for key, img in group:
                yield key, img, next(results) if isinstance(img, np.ndarray) else None


def prediction_fields(pred: dict) -> dict:
    """A face's gender, gender_prob, age, age_std, age_low, age_high from predict()'s values for it
    (rounded: sub-0.01-year digits are noise; NaN intervals -> None)."""
    gender, gender_prob = gender_of(pred["p_male"])
    return dict(gender=gender, gender_prob=round(gender_prob, DECIMALS["gender_prob"]),
                age=round(float(pred["age"]), DECIMALS["age"]),
                **{k: None if np.isnan(pred[k]) else round(float(pred[k]), DECIMALS[k]) for k in INTERVAL_KEYS})


def face_record(box: np.ndarray, score: float, marks: np.ndarray, pred: dict) -> dict:
    """One face as results.json and /predict give it (rounded: sub-pixel digits are noise)."""
    return dict(box=[round(float(v), DECIMALS["box"]) for v in box], score=round(float(score), DECIMALS["score"]),
                landmarks=[[round(float(v), DECIMALS["landmarks"]) for v in point] for point in marks],
                **prediction_fields(pred))


def records_match(a: list[dict], b: list[dict]) -> bool:
    """Whether two photos' face records are the same faces, each number within one unit of its last digit kept.

    Batches of other sizes round differently: on GPUs (cuDNN) and on CPUs whose oneDNN kernels depend
    on the batch (AVX-512: ~1e-6 in a logit), which moves a rounded digit now and then.
    """
    def close(key: str, x: object, y: object) -> bool:
        if key not in DECIMALS or x is None or y is None:
            return x == y
        return bool(np.allclose(x, y, rtol=0, atol=1.01 * 10.0 ** -DECIMALS[key]))

    return len(a) == len(b) and all(x.keys() == y.keys() and all(close(k, x[k], y[k]) for k in x) for x, y in zip(a, b))


def calibrate_checkpoint(path: str | Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         device: str | torch.device) -> float | None:
    """Fit the gender temperature on (x, age, gender) batches (the validation split) and store it in the
    checkpoint's model_args (rewritten atomically); returns it, or None where none fits (fit_temperature: every
    gender right), 1.0 then stored. train.py calls it on best.pt."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, device)
    logits, genders = [], []
    with torch.inference_mode():
        for x, _, gender in batches:
            logits.append(model(x.to(device))[0].float().cpu())  # (B, 2)
            genders.append(gender.cpu())
    temperature = fit_temperature(torch.cat(logits).numpy(), torch.cat(genders).numpy())
    # none fits: the raw probability (T = 1), also over a temperature an earlier fit stored
    ckpt["model_args"] = dict(model_args_of(ckpt), gender_temperature=1.0 if temperature is None else temperature)
    ckpt["calibrated"] = True  # models.is_calibrated: a run resumed after a kill here calibrates again
    atomic_torch_save(ckpt, path)
    return temperature


def read_ahead(items: Iterable[T], read: Callable[[T], object], workers: int = config.WORKERS,
               ahead: int = 0) -> Iterator[tuple[T, object]]:
    """(item, read(item)) in order, read in `workers` threads at most `ahead` items in advance
    (default: two per worker), so memory does not grow with the number of items."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        yield from map_ahead(pool, lambda item: (item, read(item)), items, max(1, ahead or 2 * workers))


def decoded(paths: Iterable[Path], workers: int = config.WORKERS, ahead: int = 0) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, RGB image or the reason it is unusable: utils.read_image_or_reason) in order, decoded ahead in threads."""
    return read_ahead(paths, read_image_or_reason, workers, ahead)


# --- inputs ----------------------------------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _astronaut() -> bytes:
    import skimage.data  # lazy: only to write a missing sample

    return jpeg_bytes(skimage.data.astronaut())


def _camera() -> bytes:
    import skimage.data

    return jpeg_bytes(skimage.data.camera())  # grayscale; read_image makes it RGB


def _grace_hopper() -> bytes:
    import matplotlib.cbook  # lazy: only to write a missing sample

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return f.read()  # already a JPEG: the bytes as shipped


SAMPLES = {"astronaut.jpg": _astronaut, "camera.jpg": _camera, "grace_hopper.jpg": _grace_hopper}


def ensure_samples(folder: str | Path = config.IMAGES) -> list[Path]:
    """Write the sample portraits (from scikit-image and matplotlib) into folder where missing."""
    folder = Path(folder)
    paths = []
    for name, make in SAMPLES.items():
        path = folder / name
        if not path.is_file():
            atomic_write_bytes(path, make())
            print(f"wrote the sample photo {path}")
        paths.append(path)
    return paths


# --- labelled photos (evaluate.py, demo.py --sheet) ---------------------------------------------

@dataclass
class Labelled:
    """One labelled photo: its path, true age in years, true gender (1 male, 0 female)."""
    path: Path
    age: float
    gender: int


def parse_utkface_name(name: str) -> tuple[int, int] | None:
    """(age, our gender: 1 male 0 female) from `age_gender_race_date.jpg`, or None if it does not parse.

    UTKFace's own gender field is 0 = male, 1 = female: it is flipped here.
    """
    parts = name.split("_")
    if len(parts) < 3:
        return None
    try:
        age, utk_gender = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if utk_gender not in (0, 1) or not 0 <= age <= 130:
        return None
    return age, 1 - utk_gender


def read_utkface(folder: Path) -> tuple[list[Labelled], int]:
    """(labelled photos, number of image files whose name does not parse)."""
    if not folder.is_dir():
        raise UserError(f"--utkface {folder}: no such folder")
    items, bad = [], 0
    for path in list_images(folder):
        parsed = parse_utkface_name(path.name)
        if parsed is None:
            bad += 1
        else:
            items.append(Labelled(path, float(parsed[0]), parsed[1]))
    if not items:
        raise UserError(f"--utkface {folder}: no photo named age_gender_race_date.jpg there"
                        + (f" ({bad} image files with other names)" if bad else ""))
    return items, bad


def parse_gender(value: str) -> int | None:
    """1 (male) / 0 (female) from male/female, m/f or 1/0 (any case); None otherwise."""
    v = value.strip().lower()
    if v in ("male", "m", "1", "1.0"):
        return 1
    if v in ("female", "f", "0", "0.0"):
        return 0
    return None


def read_csv_labels(path: Path) -> list[Labelled]:
    """Rows of a CSV with columns image, age, gender; paths relative to the CSV's folder."""
    if not path.is_file():
        raise UserError(f"--csv {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:  # a spreadsheet's export in Latin-1 or Windows-1252, say
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    missing = [c for c in ("image", "age", "gender") if c not in columns]
    if missing:
        raise UserError(f"--csv {path}: lacks the column(s) {', '.join(missing)} (found: {', '.join(columns) or 'nothing'}); "
                        "expected a header with image,age,gender")
    items = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        try:
            age = float(row["age"])
        except ValueError:
            raise UserError(f"--csv {path}, line {line}: age {row['age']!r} is not a number") from None
        gender = parse_gender(row["gender"])
        if gender is None or not math.isfinite(age):
            raise UserError(f"--csv {path}, line {line}: gender {row['gender']!r} is not male/female, m/f or 1/0"
                            if gender is None else f"--csv {path}, line {line}: age {row['age']!r} is not finite")
        image = Path(row["image"].strip())
        items.append(Labelled(image if image.is_absolute() else path.parent / image, age, gender))
    if not items:
        raise UserError(f"--csv {path}: no rows")
    return items
