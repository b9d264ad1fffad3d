"""Write the built-in dataset: a small IMDB-WIKI look-alike in exactly the real layout.

    python synth_imdb.py --out data/builtin_crop --n 1200

It writes OUT/imdb.mat (the real struct, in the bytes scipy.io.savemat writes, so that loadmat reads
it back in the real file's shapes and dtypes) and the photos under OUT/NN/, each cut around a face
with a 40% margin as in imdb_crop. The faces are the real portraits that installed packages ship
(skimage's astronaut and camera, matplotlib's grace_hopper), re-posed per photo; their age and
gender are drawn at random per person and painted on so a network can learn them:
  - age: a forehead band whose grey level rises with age (greying hair), plus wrinkle lines;
  - gender: a beard under the mouth on men.
The base portrait is chosen independently of gender, so identity is no shortcut. A few entries
are dirty on purpose (no face score, a second face, unknown gender, an impossible age, a missing,
empty or corrupt file) so that every filter of pre_process.py has work to do. This data teaches
a model nothing about real faces: it exists to prove that the pipeline runs and learns.
"""
from __future__ import annotations

import datetime as dt
import os
import struct
import time
from pathlib import Path

import cv2
import numpy as np

from utils import argument_parser, atomic_write_bytes, run_main, write_jpeg

DIRTY_KINDS = ("no_face_score", "second_face", "gender_unknown", "age_out_of_range",
               "missing_file", "empty_file", "corrupt_file")


def base_portraits() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The shipped portraits as (RGB image, its 5 landmarks (5, 2), face box side) found by our MTCNN."""
    # here: face loads torch, and scripts/imdb_scale.py's spawned workers import this module for imdb_sized alone
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    from face import FaceDetector

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    images = [skimage.data.astronaut(), camera, hopper]
    faces = FaceDetector().detect(images)
    return [(img, f.landmarks[0], float(f.boxes[0, 2] - f.boxes[0, 0])) for img, f in zip(images, faces)]


def matlab_datenum(day: dt.date) -> int:
    """MATLAB serial date number of a day (what imdb.mat stores in dob)."""
    return day.toordinal() + 366


def birth_for_age(rng: np.random.Generator, age: int, taken: int) -> dt.date:
    """A birthday that gives `age` under the mid-year rule: born before July -> taken - year."""
    month = int(rng.integers(1, 13))
    year = taken - age - (1 if month >= 7 else 0)
    return dt.date(year, month, int(rng.integers(1, 29)))


def pose(rng: np.random.Generator, image: np.ndarray, marks: np.ndarray, box_side: float) -> tuple[np.ndarray, np.ndarray]:
    """Re-pose a portrait: random scale, tilt and shift, cropped with the IMDB 40% margin."""
    face = rng.uniform(90, 115)  # face box side in the new photo
    scale = face / box_side
    side = int(round(face * 1.8))  # 40% margin on every side
    centre = marks.mean(axis=0)
    m = cv2.getRotationMatrix2D(tuple(map(float, centre)), rng.uniform(-8, 8), scale)
    m[:, 2] += side / 2 - centre + rng.uniform(-0.04, 0.04, 2) * side
    photo = cv2.warpAffine(image, m, (side, side), borderMode=cv2.BORDER_REFLECT)
    new_marks = marks @ m[:, :2].T + m[:, 2]  # (5, 2)
    if rng.random() < 0.5:
        photo = photo[:, ::-1].copy()
        new_marks = new_marks[[1, 0, 2, 4, 3]] * [-1, 1] + [side - 1, 0]
    return photo, new_marks


def paint(rng: np.random.Generator, photo: np.ndarray, marks: np.ndarray, age: int, male: bool) -> np.ndarray:
    """Paint the age and gender cues onto a posed photo, placed relative to its landmarks."""
    left, right, nose, mouth_l, mouth_r = marks
    axis = (right - left) / np.linalg.norm(right - left)  # along the eyes
    up = np.array([axis[1], -axis[0]])  # towards the forehead
    d = np.linalg.norm(right - left)
    eyes = (left + right) / 2
    layer = photo.copy()

    def quad(centre, half_w, half_h):  # a rectangle aligned with the face, as int polygon
        c = np.array(centre)
        pts = [c + sx * half_w * axis + sy * half_h * up for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        return np.round(pts).astype(np.int32)

    grey = int(30 + 2.2 * age)  # 0 years -> 30 (dark hair) ... 100 years -> 250 (white)
    band = quad(eyes + 0.8 * d * up, 0.95 * d, 0.3 * d)
    cv2.fillPoly(layer, [band], (grey, grey, grey))
    for k in range(age // 20):  # one wrinkle line per 20 years, just above the eyes
        y = 0.35 + 0.08 * k
        a, b = eyes + y * d * up - 0.5 * d * axis, eyes + y * d * up + 0.5 * d * axis
        cv2.line(layer, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), (90, 60, 50), 1)
    if male:
        chin = (mouth_l + mouth_r) / 2 - 0.45 * d * up
        angle = float(np.degrees(np.arctan2(axis[1], axis[0])))
        cv2.ellipse(layer, tuple(np.round(chin).astype(int)), (int(0.75 * d), int(0.32 * d)), angle, 0, 360,
                    (45, 32, 25), -1)
    out = cv2.addWeighted(layer, 0.85, photo, 0.15, 0)
    tint = rng.uniform(0.85, 1.15, 3)  # per-photo colour cast, so colour alone says nothing
    noise = rng.normal(0, 4, out.shape)
    return np.clip(out * tint + noise, 0, 255).astype(np.uint8)


def imdb_sized(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    """A square crop resized to IMDB's spread of sizes: short side 150-700 px (median ~430), long side up to 1.3x.

    The long side keeps the 40% margin; the short one is cut evenly on both sides, as a crop
    clipped by its photo's edge is (the face stays central, filling more of the short side).
    """
    short = int(np.clip(rng.lognormal(np.log(430), 0.35), 150, 700))
    long = int(short * rng.uniform(1.0, 1.3))
    big = cv2.resize(photo, (long, long), interpolation=cv2.INTER_AREA if long < photo.shape[0] else cv2.INTER_CUBIC)
    cut = (long - short) // 2
    return np.ascontiguousarray(big[:, cut:cut + short] if rng.random() < 0.5 else big[cut:cut + short])


def generate(out: Path, n: int, seed: int = 0, photos_per_person: int = 4,
             dirty_fraction: float = 0.05) -> tuple[dict, dict]:
    """Write OUT/imdb.mat and n photos.

    Returns ({'clean': count, dirty kind: count}, {full_path: (painted age, male)}).
    """
    rng = np.random.default_rng(seed)
    portraits = base_portraits()
    n_people = -(-n // photos_per_person)
    people = [dict(base=int(rng.integers(len(portraits))), male=bool(rng.random() < 0.5),
                   name=f"Synthetic Person {i + 1}") for i in range(n_people)]
    fields = {k: [] for k in ("dob", "photo_taken", "full_path", "gender", "name", "face_location",
                              "face_score", "second_face_score", "celeb_id")}
    counts = {"clean": 0, **{k: 0 for k in DIRTY_KINDS}}
    truth = {}
    for i in range(n):
        pid = i // photos_per_person
        person = people[pid]
        age = int(rng.integers(1, 91))
        taken = int(rng.integers(1990, 2016))
        birth = birth_for_age(rng, age, taken)
        rel = f"{i % 100:02d}/nm{pid + 1:07d}_rm{int(rng.integers(1e8, 1e9))}_{birth.year}-{birth.month}-{birth.day}_{taken}.jpg"
        photo, new_marks = pose(rng, *portraits[person["base"]])
        photo = paint(rng, photo, new_marks, age, person["male"])
        side = photo.shape[0]
        box = np.round([side * 0.28 + 200, side * 0.28 + 150, side * 0.72 + 200, side * 0.72 + 150]).astype(np.uint16)
        record = dict(dob=matlab_datenum(birth), photo_taken=taken, full_path=rel,
                      gender=1.0 if person["male"] else 0.0, name=person["name"], face_location=box[None],
                      face_score=float(rng.uniform(1.5, 5.0)), second_face_score=np.nan, celeb_id=pid + 1)
        kind = DIRTY_KINDS[int(rng.integers(len(DIRTY_KINDS)))] if rng.random() < dirty_fraction else "clean"
        counts[kind] += 1
        truth[rel] = (age, person["male"])
        if kind == "no_face_score":
            record["face_score"] = -np.inf
        elif kind == "second_face":
            record["second_face_score"] = float(rng.uniform(1, 3))
        elif kind == "gender_unknown":
            record["gender"] = np.nan
        elif kind == "age_out_of_range":
            record["dob"] = matlab_datenum(dt.date(taken + 3, 1, 1))  # born after the photo
        path = out / rel
        if kind == "empty_file":
            atomic_write_bytes(path, b"")
        elif kind == "corrupt_file":
            atomic_write_bytes(path, b"this is not a JPEG\n" * 20)
        elif kind != "missing_file":
            write_jpeg(path, photo, quality=90)
        for k, v in record.items():
            fields[k].append(v)
    write_mat(out / "imdb.mat", fields, [p["name"] for p in people])
    return counts, truth


def write_mat(path: Path, fields: dict, celeb_names: list[str]) -> None:
    """Save the struct in imdb.mat's layout: 1x1 struct `imdb`, every field a 1xN array or cell, in MATLAB's level-5
    format, byte for byte what scipy.io.savemat writes (tested) but for the date in the header.

    Our own writer because savemat writes a cell element by element in Python: a 460,723-row file (127 MB,
    scripts/imdb_scale.py's) took it 42-51 s, us 3.9-4.3 s, the same bytes (2-core EPYC, 2 runs each, alternated),
    time a GPU lease runs short of."""
    struct_fields = {
        "dob": np.array(fields["dob"], dtype=np.int32),
        "photo_taken": np.array(fields["photo_taken"], dtype=np.uint16),
        "full_path": list(fields["full_path"]),
        "gender": np.array(fields["gender"], dtype=np.float64),
        "name": list(fields["name"]),
        "face_location": [np.asarray(v) for v in fields["face_location"]],
        "face_score": np.array(fields["face_score"], dtype=np.float64),
        "second_face_score": np.array(fields["second_face_score"], dtype=np.float64),
        "celeb_names": list(celeb_names),
        "celeb_id": np.array(fields["celeb_id"], dtype=np.uint16),
    }
    length = max(map(len, struct_fields)) + 1  # field names: NUL-padded to the longest plus one
    names = b"".join(n.encode().ljust(length, b"\0") for n in struct_fields)
    body = [_element(MI_INT32, struct.pack("<i", length)), _element(MI_INT8, names)]
    body += [_cell(v) if isinstance(v, list) else _numeric(v.reshape(1, -1)) for v in struct_fields.values()]
    description = f"MATLAB 5.0 MAT-file Platform: {os.name}, Created on: {time.asctime()}".encode()
    header = description.ljust(116, b"\0") + struct.pack("<qH", 0, 0x0100) + b"IM"
    atomic_write_bytes(path, header + _matrix(MX_STRUCT, (1, 1), b"".join(body), b"imdb"))


# MATLAB level-5 codes (as scipy.io.matlab names them): element data types, and array classes by numpy dtype
MI_INT8, MI_UINT16, MI_INT32, MI_UINT32, MI_DOUBLE, MI_MATRIX, MI_UTF8 = 1, 4, 5, 6, 9, 14, 16
MX_CELL, MX_STRUCT, MX_CHAR = 1, 2, 4
MX_NUMERIC = {"float64": (6, MI_DOUBLE), "int32": (12, MI_INT32), "uint16": (11, MI_UINT16)}


def _element(mi: int, data: bytes) -> bytes:
    """A data element: up to 4 bytes packed into its tag, else tag, data and zeros to 8-byte alignment."""
    n = len(data)
    if n <= 4:
        return struct.pack("<I", n << 16 | mi) + data.ljust(4, b"\0")
    return struct.pack("<II", mi, n) + data + b"\0" * (-n % 8)


def _matrix(mx: int, dims: tuple[int, int], body: bytes, name: bytes = b"") -> bytes:
    """A matrix element: array flags (class), dimensions, name, then body."""
    content = (struct.pack("<IIII", MI_UINT32, 8, mx, 0) + _element(MI_INT32, struct.pack("<2i", *dims))
               + _element(MI_INT8, name) + body)
    return struct.pack("<II", MI_MATRIX, len(content)) + content


def _numeric(a: np.ndarray) -> bytes:
    """A 2-D numeric array (MATLAB stores columns first)."""
    mx, mi = MX_NUMERIC[a.dtype.name]
    return _matrix(mx, a.shape, _element(mi, a.tobytes(order="F")))


def _char(s: str) -> bytes:
    """A string as a 1 x len char array of UTF-8 bytes; an empty one as 0 x 0, as MATLAB stores ''."""
    return _matrix(MX_CHAR, (1, len(s)) if s else (0, 0), _element(MI_UTF8, s.encode()))


def _cell(values: list) -> bytes:
    """A 1 x N cell of strings or 2-D numeric arrays."""
    return _matrix(MX_CELL, (1, len(values)),
                   b"".join(_char(v) if isinstance(v, str) else _numeric(v) for v in values))


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--out", default="data/builtin_crop", help="where to write imdb.mat and NN/ (default: %(default)s)")
    p.add_argument("--n", type=int, default=1200, help="number of photos (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args()
    counts, _ = generate(Path(args.out), args.n, args.seed)
    print(f"wrote {args.n} photos and imdb.mat to {args.out}: {counts}")


if __name__ == "__main__":
    run_main(main)
