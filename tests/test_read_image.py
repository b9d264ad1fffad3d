"""utils.read_image on what real folders hold: rotated phone photos, 16-bit PNGs, huge or unreadable files."""
import csv
import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import pre_process
from synth_imdb import generate
from utils import ImageError, read_image, read_image_or_reason

# EXIF Orientation -> how the camera stored the upright picture (the inverse of what a viewer applies)
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def save_rotated(upright: Path, dst: Path, orientation: int) -> Path:
    """The photo as a phone stores it: pixels turned, an EXIF Orientation tag saying how to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(upright).transpose(STORED[orientation]).save(dst, format="JPEG", quality=95, exif=exif)
    return dst


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, samples, orientation):
    upright = read_image(samples / "grace_hopper.jpg")  # 600 x 512: a turn shows in the shape too
    rotated = read_image(save_rotated(samples / "grace_hopper.jpg", tmp_path / "phone.jpg", orientation))
    assert rotated.shape == upright.shape == (600, 512, 3)
    assert np.abs(rotated.astype(int) - upright).mean() < 3  # the same picture, up to a JPEG re-encode


def ramp16() -> np.ndarray:
    """(64, 64) uint16 covering 0..65535."""
    return np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PGM"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, fmt):
    a = ramp16()
    path = tmp_path / f"deep.{fmt.lower()}"
    if fmt == "PGM":  # Pillow opens 16-bit PGMs as mode I, PNG and TIFF as I;16
        cv2.imwrite(str(path), a)
    else:
        Image.fromarray(a).save(path, format=fmt)
    assert Image.open(path).mode.startswith("I")
    rgb = read_image(path)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb == rgb[:, :, :1]).all()  # gray
    assert np.abs(rgb[:, :, 0].astype(int) - np.rint(a / 257)).max() == 0
    assert len(np.unique(rgb)) == 256  # every 8-bit level, not only black and white


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A 70-byte PNG whose header declares side x side pixels (the pixel data is a 1x1 image's)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC, so Pillow reads on
    path.write_bytes(bytes(data))
    return path


def dds_of_unknown_pixel_format(path: Path) -> Path:
    """An 8x8 DDS whose pixel format has no flags: Pillow identifies it, then its plugin raises NotImplementedError."""
    header = struct.pack("<7I44x8I5I", 124, 0x1007, 8, 8, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0x1000, 0, 0, 0, 0)
    path.write_bytes(b"DDS " + header + bytes(8 * 8 * 4))
    return path


def test_any_error_of_pillows_is_an_image_error(tmp_path):
    """Not only OSError: whatever a format plugin raises on a corrupt file is this file's error, not the run's."""
    path = dds_of_unknown_pixel_format(tmp_path / "texture.jpg")
    with pytest.raises(ImageError, match="truncated: Unknown pixel format flags 0") as e:
        read_image(path)
    assert isinstance(e.value.__cause__, NotImplementedError) and e.value.reason == "truncated"
    assert read_image_or_reason(path) == "truncated"  # evaluate.py and pre_process.py count it and go on


def test_decompression_bomb_is_an_image_error(tmp_path):
    path = bomb_png(tmp_path / "huge.png")
    with pytest.raises(ImageError, match="too large") as e:
        read_image(path)
    assert e.value.reason == "too_large"
    assert read_image_or_reason(path) == "too_large"


def test_a_size_over_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    """read_image's max_pixels judges the size the file declares: the pixels are never decoded."""
    from PIL import ImageFile

    path = bomb_png(tmp_path / "big.png", side=5000)  # 70 bytes, 25 MP declared: under Pillow's own limit
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a photo over max_pixels"))
    with pytest.raises(ImageError, match="too large: 5000x5000 pixels, over the limit of 1,000,000") as e:
        read_image(path, max_pixels=1_000_000)
    assert e.value.reason == "too_large"


def test_unreadable_files_are_image_errors(tmp_path, monkeypatch):
    # the tests run as root, whom chmod 000 does not stop: a folder under an image name is a real
    # OSError from the kernel; a PermissionError is raised by a patched Path.read_bytes
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="unreadable: Is a directory") as e:
        read_image(tmp_path / "folder.jpg")
    assert e.value.reason == "unreadable"
    locked = tmp_path / "locked.jpg"
    Image.new("RGB", (8, 8)).save(locked)
    deny_reading(monkeypatch, locked)
    assert read_image_or_reason(locked) == "unreadable"
    with pytest.raises(ImageError, match="Permission denied"):
        read_image(locked)
    with pytest.raises(FileNotFoundError):  # missing stays its own case (callers count it as missing_file)
        read_image(tmp_path / "nope.jpg")


def deny_reading(monkeypatch, path: Path) -> None:
    """Reading `path` raises PermissionError, as for a file of another user with mode 600."""
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_pre_process_counts_odd_files_and_goes_on(tmp_path, monkeypatch):
    """A bomb and an unreadable photo are counted skips; a 16-bit photo is used."""
    root, out = tmp_path / "crop", tmp_path / "out"
    _, truth = generate(root, 8, seed=14, dirty_fraction=0.0)
    paths = sorted(truth)
    bomb_png(root / paths[0])
    deny_reading(monkeypatch, root / paths[1])
    gray = np.asarray(Image.open(root / paths[2]).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(root / paths[2], format="PNG")  # a 16-bit PNG under its .jpg name
    # --workers 0 decodes in this process, where the patch applies
    pre_process.main(["--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0", "--no-pack"])
    dropped = json.loads((out / "summary.json").read_text())["dropped"]
    assert (dropped.get("too_large"), dropped.get("unreadable")) == (1, 1)
    with open(out / "labels.csv") as f:
        rows = {r["source"]: r for r in csv.DictReader(f)}
    assert paths[2] in rows and not {paths[0], paths[1]} & set(rows)
    face = read_image(out / rows[paths[2]]["image"])
    assert 40 < face.mean() < 215 and face.std() > 20  # a face, not a black-and-white mask
