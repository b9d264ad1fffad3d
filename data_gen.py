"""Faces and labels for training and validation: the input normalisation, the augmentation and two loaders.

Not run directly: train.py calls make_loader(), pre_process.py calls pack_split(), demo.py,
evaluate.py and export.py call preprocess() (the validation transform, so serving sees what
validation saw).

Both loaders yield the same batches on the device: (x (N, 3, S, S) float normalised, age (N,) long
years, gender (N,) long, 1 male 0 female), in the same seeded order (a DistributedSampler: one
permutation per epoch, a shard per process), augmented by the same augment():
  packed  DATA/faces_{split}.npy, every face of a split in one uint8 (N, S, S, 3) array written by
          pack_split(); memory-mapped, batches gathered out of it into reused (pinned, on CUDA)
          buffers, copied to the device as uint8 (4x less than float) on a side stream and augmented
          there, the whole batch at once; with prefetch > 0 a background thread does all of it ahead
          of the training step. Used when the file exists; refused unless faces_{split}.json says it
          holds the images labels.csv lists, in order.
  JPEG    FaceDataset: DataLoader workers decode DATA/<image> and augment each face on the CPU.
  dummy   train.py --dummy: the packed loader over random faces held in memory (dummy_split).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import config
from utils import ImageError, UserError, disk_full, in_background, read_image, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB; the torchvision backbones were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_COLUMNS = ("image", "source", "identity", "age", "gender", "split")
SPLITS = ("train", "valid")
PACK_CHUNK = 1024  # faces a packing task decodes into its rows of the array: ~0.25 s of a core, 160 tasks for IMDB

# augmentation: mild, since the faces are already aligned onto a template
MAX_ROTATE_DEG = 10.0
MAX_SCALE = 0.10  # zoom factor in [0.9, 1.1]
MAX_SHIFT = 0.05  # translation, as a fraction of the side
JITTER = 0.2  # brightness, contrast and saturation factors in [0.8, 1.2]
AUGMENT_DRAWS = 8  # random numbers per face: flip, angle, zoom, shift x and y, brightness, contrast, saturation
AUGMENT_PARAMS = 9  # what augment() takes per face, derived from those: the affine map (2 x 3), the 3 jitter factors


# --- the input transform ---------------------------------------------------------------------

def preprocess(faces: np.ndarray) -> torch.Tensor:
    """Aligned RGB uint8 faces (N, S, S, 3), or one (S, S, 3), -> the network's input (N, 3, S, S) float32."""
    faces = np.asarray(faces)
    return network_input(to_nchw(faces[None] if faces.ndim == 3 else faces))


def network_input(faces: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 faces (N, 3, S, S) -> the network's input (N, 3, S, S) float32 on their device and in their memory format
    (the loaders' are channels_last, as the model, so the step converts nothing): augmented with params
    (N, AUGMENT_PARAMS) from augment_params where given (training), then normalised."""
    layout = torch.channels_last if faces.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    x = faces.float()  # (N, 3, S, S) pixel values 0-255: the / 255 rides on normalize's pass, not one of its own
    return normalize(x if params is None else augment(x, params), layout)


def to_nchw(faces: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> a uint8 tensor (N, 3, S, S), channels_last in memory.

    A copy: decoded images and memory maps are read-only, which torch.from_numpy warns about.
    """
    return torch.tensor(faces).permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """Pixel values (N, 3, S, S) in [0, 255] -> ImageNet-normalised (N, 3, S, S) in `memory_format`: (x / 255 - mean)
    / std as one pass, x * (1 / (255 std)) - mean / std, which also converts the layout (augment's NCHW to the model's
    channels_last) at no cost: the plain formula took three passes, and a conversion a fourth."""
    scale, shift = normalize_affine(x.device)
    return torch.addcmul(shift, x, scale, out=torch.empty_like(x, memory_format=memory_format))


@functools.lru_cache(maxsize=None)
def normalize_affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std), each (1, 3, 1, 1) on `device`; cached: built per batch they would be a
    host->device copy per batch."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return 1 / (255 * std), -mean / std


def augment_params(n: int, generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, AUGMENT_PARAMS) per face: its affine map (flip, rotation, zoom, shift; flattened 2 x 3) and its brightness,
    contrast and saturation factors, from AUGMENT_DRAWS uniform numbers drawn on the CPU from `generator` (into `out`
    if given), so a seeded generator augments alike on any device. Made on the host: there a face's few numbers cost
    nothing, where on a GPU each of these ~20 ops was a launch per batch from the loader's thread."""
    u = torch.rand(n, AUGMENT_DRAWS, generator=generator).mul_(2).sub_(1)  # (n, 8) in [-1, 1)
    flip = torch.where(u[:, 0] < 0, -1.0, 1.0)  # (n,)
    angle = u[:, 1] * math.radians(MAX_ROTATE_DEG)
    scale = 1 + u[:, 2] * MAX_SCALE
    cos, sin = angle.cos() / scale, angle.sin() / scale
    shift = u[:, 3:5] * 2 * MAX_SHIFT  # affine_grid's coordinates span 2 per side
    # theta maps output to input coordinates: rotation/zoom times a horizontal flip, plus the shift
    theta = torch.stack([cos * flip, -sin, shift[:, 0], sin * flip, cos, shift[:, 1]], dim=1)  # (n, 6)
    return torch.cat([theta, 1 + JITTER * u[:, 5:8]], dim=1, out=out)  # (n, 9)


def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Random flip, rotation, zoom, shift and colour jitter per face of a batch of pixel values (N, 3, S, S) in
    [0, 255], on x's device; the result is in [0, 255] too, and NCHW, as grid_sample writes it.

    params: (N, AUGMENT_PARAMS) from augment_params, on x's device. The packed loader copies it there
    from a pinned buffer: a copy from pageable memory would wait for everything queued on its stream.
    """
    theta = params[:, :6].view(-1, 2, 3)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, S, S, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)  # (N, 3, S, S)
    brightness, contrast, saturation = params[:, 6:].T[..., None, None, None]  # 3 x (N, 1, 1, 1)
    # each line one pass over the batch or two, where the plain formulas took twice as many: on a GPU these passes
    # are the loader's share of the card's memory traffic, which the training step shares; NCHW, as grid_sample
    # writes it: on a CPU these per-image and per-channel broadcasts ran up to 6x slower over channels_last
    x = x.mul_(brightness).clamp_(0, 255)  # in place: grid_sample's output is new
    mean_gray = luminance(x).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1)
    x = torch.lerp(mean_gray, x, contrast).clamp_(0, 255)  # (x - mean_gray) * contrast + mean_gray
    return torch.lerp(luminance(x), x, saturation).clamp_(0, 255)  # (x - gray) * saturation + gray


def luminance(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 grey of RGB (N, 3, S, S) -> (N, 1, S, S), as one matrix product over the channels."""
    n, _, h, w = x.shape
    return torch.matmul(luma_weights(x.device), x.flatten(2)).view(n, 1, h, w)  # (1, 3) @ (N, 3, S*S)


@functools.lru_cache(maxsize=None)
def luma_weights(device: torch.device) -> torch.Tensor:
    # cached, as normalize_affine: built per batch it would be a host->device copy per batch
    return torch.tensor([[0.299, 0.587, 0.114]], device=device)  # (1, 3)


# --- labels ------------------------------------------------------------------------------------

@dataclass
class Labels:
    """The rows of one split of labels.csv, in file order."""
    images: list[str]  # paths relative to the data dir
    age: np.ndarray  # (N,) int64 years
    gender: np.ndarray  # (N,) int64, 1 male 0 female


def read_labels(data_dir: str | os.PathLike, split: str) -> Labels:
    """Check every row of DATA/labels.csv and return those of `split`; a bad row is a UserError naming its line."""
    path = Path(data_dir) / "labels.csv"
    if not path.is_file():
        raise UserError(f"{path} not found; write it with `python pre_process.py --out {data_dir}` "
                        "(or `make quickstart` for the built-in dataset)")
    images, ages, genders = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}: line 1: empty file; expected the header {','.join(LABEL_COLUMNS)}")
            if tuple(header) != LABEL_COLUMNS:
                raise UserError(f"{path}: line 1: header {','.join(header)!r}; expected {','.join(LABEL_COLUMNS)}")
            for row in reader:
                if not row:
                    continue
                image, age, gender, row_split = parse_row(row, f"{path}: line {reader.line_num}")
                if row_split == split:
                    images.append(image)
                    ages.append(age)
                    genders.append(gender)
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: line {reader.line_num + 1}: not a readable CSV ({e})") from e
    return Labels(images, np.array(ages, dtype=np.int64), np.array(genders, dtype=np.int64))


def parse_row(row: list[str], where: str) -> tuple[str, int, int, str]:
    if len(row) != len(LABEL_COLUMNS):
        raise UserError(f"{where}: {len(row)} fields; expected {len(LABEL_COLUMNS)} ({','.join(LABEL_COLUMNS)})")
    image, _source, _identity, age, gender, split = row
    if not image:
        raise UserError(f"{where}: empty image path")
    if not (age.strip().isdigit() and config.MIN_AGE <= int(age) <= config.MAX_AGE):
        raise UserError(f"{where}: age {age!r} is not an integer in {config.MIN_AGE}..{config.MAX_AGE}")
    if gender.strip() not in ("0", "1"):
        raise UserError(f"{where}: gender {gender!r} is not 1 (male) or 0 (female)")
    if split not in SPLITS:
        raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    return image, int(age), int(gender), split


def load_split(data_dir: str | os.PathLike, split: str) -> Labels:
    """read_labels(), refusing an empty split."""
    labels = read_labels(data_dir, split)
    if not labels.images:
        raise UserError(f"{Path(data_dir) / 'labels.csv'}: no rows with split {split}; "
                        "rerun pre_process.py with a --valid-fraction that leaves images on both sides")
    return labels


def head(labels: Labels, limit: int | None) -> Labels:
    """The first `limit` rows (all for None)."""
    return Labels(labels.images[:limit], labels.age[:limit], labels.gender[:limit])


def read_face(path: Path) -> np.ndarray:
    """One aligned face (S, S, 3) uint8; a missing or broken file is a UserError naming it."""
    try:
        return read_image(path)
    except FileNotFoundError as e:
        raise UserError(f"{path}: listed in labels.csv but missing; rerun pre_process.py") from e
    except ImageError as e:
        raise UserError(f"{e}; delete it and rerun pre_process.py, which aligns its photo again (a rerun keeps "
                        "the faces that are there)") from e


# --- the JPEG path -----------------------------------------------------------------------------

class FaceDataset(Dataset):
    """(x (3, S, S) float normalised, age, gender) per face of one split, decoded from the JPEGs.

    train=True augments each face with augment(), seeded by (seed, epoch, index): the same face
    gets the same augmentation in the same epoch whatever worker or process decodes it.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, train: bool, limit: int | None = None,
                 seed: int = config.SEED):
        self.root = Path(data_dir)
        self.labels = head(load_split(data_dir, split), limit)
        missing = [p for p in self.labels.images if not (self.root / p).is_file()]
        if missing:
            raise UserError(f"{self.root / missing[0]}: listed in labels.csv but missing "
                            f"({len(missing)} of {len(self.labels.images)} {split} faces are); rerun pre_process.py")
        self.train, self.seed, self.epoch = train, seed, 0
        self.size = read_face(self.root / self.labels.images[0]).shape[0]

    def __len__(self) -> int:
        return len(self.labels.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def face(self, i: int) -> np.ndarray:
        """The i-th face as stored, (S, S, 3) uint8."""
        path = self.root / self.labels.images[i]
        face = read_face(path)
        if face.shape != (self.size, self.size, 3):
            raise UserError(f"{path}: {face.shape[1]}x{face.shape[0]}, the other faces are {self.size}x{self.size}; "
                            "rerun pre_process.py")
        return face

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        params = None
        if self.train:  # hash() of a tuple of ints does not depend on PYTHONHASHSEED
            params = augment_params(1, torch.Generator().manual_seed(hash((self.seed, self.epoch, i))))
        x = network_input(to_nchw(self.face(i)[None]), params)  # (1, 3, S, S)
        return x[0], int(self.labels.age[i]), int(self.labels.gender[i])


# --- loaders -----------------------------------------------------------------------------------

def index_sampler(n: int, train: bool, seed: int, rank: int, world_size: int) -> DistributedSampler | range:
    """Training: a seeded permutation per epoch (set_epoch), padded to a multiple of world_size, a shard per process.
    Validation: every index once, in order, striped over the processes (no padding, so no face counts twice)."""
    if train:
        return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return range(rank, n, world_size)


class JpegLoader:
    """Batches of FaceDataset from DataLoader workers, moved to the device."""

    def __init__(self, dataset: FaceDataset, batch_size: int, train: bool, device: torch.device, workers: int,
                 seed: int, rank: int, world_size: int):
        self.dataset, self.device, self.size = dataset, device, dataset.size
        self.sampler = index_sampler(len(dataset), train, seed, rank, world_size)
        # workers are forked per epoch (not persistent) so that they see the dataset's new epoch
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train,
                                 num_workers=workers, pin_memory=device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for x, age, gender in self.loader:
            yield (x.to(self.device, non_blocking=True), age.to(self.device, non_blocking=True),
                   gender.to(self.device, non_blocking=True))


# what train.py --profile shows of the loader: each batch's preparation (in the prefetching thread, if any) and the
# consumer's wait for it
PREPARE_LABEL, WAIT_LABEL = "loader: prepare a batch", "loader: wait for a batch"


def labelled(items: Iterator, label: str) -> Iterator:
    """items, each wait for the next one recorded as `label` by torch.profiler (when one records)."""
    items, end = iter(items), object()
    while True:
        with record_function(label):
            item = next(items, end)
        if item is end:
            return
        yield item


class PackedLoader:
    """Batches gathered out of a memory-mapped faces_{split}.npy, moved to the device as uint8 and augmented there.

    prefetch > 0: a background thread prepares up to that many batches ahead of the consumer (the
    gather and, on CUDA, the copy and augmentation on a side stream), so the training step never
    waits for them; the batches are the same as with prefetch 0, which prepares each on demand.
    """

    def __init__(self, faces: np.ndarray, labels: Labels, batch_size: int, train: bool, device: torch.device,
                 seed: int, rank: int, world_size: int, prefetch: int = 0):
        self.faces, self.train, self.device, self.seed, self.rank = faces, train, device, seed, rank
        self.size, self.batch_size, self.prefetch = faces.shape[1], batch_size, prefetch
        self.labels = torch.from_numpy(np.stack([labels.age, labels.gender], axis=1))  # (N, 2)
        self.sampler = index_sampler(len(faces), train, seed, rank, world_size)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=train)
        self.epoch = 0
        self.slots: list[Slot] = []  # the staging buffers, kept across epochs
        # the side stream the batches are made on, kept across epochs: the allocator reuses a block only on the stream
        # that freed it, and a stream an epoch would re-allocate every batch's device memory each epoch
        self.stream: torch.cuda.Stream | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        batches = self.prepared()
        if self.prefetch > 0:
            batches = in_background(batches, self.prefetch, "packed-loader")
        for x, age, gender, ready in labelled(batches, WAIT_LABEL):
            if cuda:  # made on the side stream: wait for it, and tell the allocator it is used on this one
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                for t in (x, age, gender):
                    t.record_stream(stream)
            yield x, age, gender

    def prepared(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Event | None]]:
        """(x, age, gender, the event that marks them ready or None) per batch, in order, made in the calling thread."""
        cuda = self.device.type == "cuda"
        if not self.slots:  # one more than can be in flight, so a slot is refilled only after its copy was issued
            self.slots = [Slot(self.batch_size, self.faces.shape[1:], cuda) for _ in range(self.prefetch + 2)]
        if cuda and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        stream = self.stream
        for b, idx in enumerate(self.batches):
            # the side stream only around the batch's making: with prefetch 0 this thread is the consumer's, whose
            # step must run on its own stream after the yield (a context open across it once ran the step there)
            with record_function(PREPARE_LABEL), torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                slot = self.slots[b % len(self.slots)]
                seed = hash((self.seed, self.epoch, self.rank, b)) if self.train else None
                # (B, S, S, 3) uint8, (B, 2) int64, (B, AUGMENT_PARAMS) float32 (training) or None
                faces, labels, params = slot.fill(self.faces, self.labels, idx, seed)
                faces = faces.to(self.device, non_blocking=True)
                # copies on the CPU too: the slot is reused
                labels = labels.to(self.device, non_blocking=True, copy=True)
                params = params if params is None else params.to(self.device, non_blocking=True, copy=True)
                slot.copied = stream.record_event() if cuda else None
                # (B, 3, S, S), channels_last in memory: the step converts nothing
                x = network_input(faces.permute(0, 3, 1, 2), params)
                ready = stream.record_event() if cuda else None
            yield x, labels[:, 0], labels[:, 1], ready


class Slot:
    """A reused staging buffer for one batch: faces (B, S, S, 3) uint8, labels (B, 2) and augmentation parameters
    (B, AUGMENT_PARAMS), pinned for CUDA copies (a copy from pageable memory waits for its stream's queue)."""

    def __init__(self, batch_size: int, face_shape: tuple[int, ...], pin: bool):
        self.faces = torch.empty((batch_size, *face_shape), dtype=torch.uint8, pin_memory=pin)
        self.labels = torch.empty((batch_size, 2), dtype=torch.int64, pin_memory=pin)
        self.params = torch.empty((batch_size, AUGMENT_PARAMS), dtype=torch.float32, pin_memory=pin)
        self.copied: torch.cuda.Event | None = None  # the last copy out of this slot

    def fill(self, faces: np.ndarray, labels: torch.Tensor, idx: list[int],
             seed: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch idx gathered into this slot, and its augmentation drawn with `seed` (None: no augmentation):
        views (n, S, S, 3), (n, 2), (n, AUGMENT_PARAMS) or None."""
        if self.copied is not None:
            self.copied.synchronize()  # the device may still be reading the previous batch out of it
        n = len(idx)
        # mode clip writes straight into out (raise would stage a copy); the sampler's indices are all in range
        np.take(faces, idx, axis=0, out=self.faces.numpy()[:n], mode="clip")
        torch.index_select(labels, 0, torch.as_tensor(idx), out=self.labels[:n])
        params = None if seed is None else augment_params(n, torch.Generator().manual_seed(seed), out=self.params[:n])
        return self.faces[:n], self.labels[:n], params


def fill_rows(faces: np.ndarray, paths: list[Path], start: int) -> int:
    """A packing task: the faces at paths[start:start + PACK_CHUNK] decoded into those rows of faces (N, S, S, 3), each
    checked to have row 0's shape; how many."""
    stop = min(start + PACK_CHUNK, len(paths))
    for i in range(start, stop):
        face = read_face(paths[i])
        if face.shape != faces.shape[1:]:
            raise UserError(f"{paths[i]}: {face.shape[1]}x{face.shape[0]}, the first face is "
                            f"{faces.shape[2]}x{faces.shape[1]}; rerun pre_process.py")
        faces[i] = face
    return stop - start


def packed_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"faces_{split}.npy"


def sidecar_path(packed: Path) -> Path:
    """faces_{split}.json beside faces_{split}.npy: which images the array holds, in order."""
    return packed.with_suffix(".json")


def images_digest(images: list[str]) -> str:
    """SHA-256 of an ordered list of image paths (JSON-encoded, so no path can run into the next)."""
    return hashlib.sha256(json.dumps(images).encode("utf-8")).hexdigest()


def write_sidecar(packed: Path, images: list[str]) -> None:
    """Record, once the array is complete, which images packed holds (open_packed checks it)."""
    write_json(sidecar_path(packed), dict(images=len(images), images_sha256=images_digest(images)))


def remove_packed(data_dir: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> None:
    """Delete faces_{split}.npy and its sidecar for each of splits, so that no array outlives the labels.csv it was
    packed for."""
    for split in splits:
        packed = packed_path(data_dir, split)
        sidecar_path(packed).unlink(missing_ok=True)
        packed.unlink(missing_ok=True)


def open_packed(path: Path, images: list[str], data_dir: str | os.PathLike) -> np.ndarray:
    """The memory-mapped (N, S, S, 3) uint8 array, checked to hold exactly `images` (labels.csv's split, in order)."""
    rebuild = f"rebuild it with `python pre_process.py --out {data_dir} --pack-only` or delete it to use the JPEGs"
    try:
        faces = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: unreadable ({e}); {rebuild}") from e
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[0] != len(images) or faces.shape[3] != 3 \
            or faces.shape[1] != faces.shape[2]:
        raise UserError(f"{path}: {faces.dtype} {tuple(faces.shape)} does not match the {len(images)} rows of "
                        f"labels.csv (stale?); {rebuild}")
    try:
        packed_for = json.loads(sidecar_path(path).read_text(encoding="utf-8"))["images_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: {sidecar_path(path).name}, the list of images it holds, is missing or unreadable "
                        f"(packed by an older version?), so it may not match labels.csv; {rebuild}") from e
    if packed_for != images_digest(images):
        raise UserError(f"{path}: packed for other images than labels.csv lists now (labels.csv was rewritten "
                        f"after packing: stale); {rebuild}")
    return faces


def pack_is_current(data_dir: str | os.PathLike, split: str, images: list[str]) -> bool:
    """Whether faces_{split}.npy is one the loader takes for `images` (open_packed) and was packed after every one of
    those faces was last written: a rerun with nothing new to align keeps it (at IMDB's full size repacking took
    79 s at 112 px and rewrites 5.5 GB; the check stats each face)."""
    root = Path(data_dir)
    packed = packed_path(root, split)
    try:
        open_packed(packed, images, root)
        packed_at = packed.stat().st_mtime_ns
        # strictly older: on a file system with coarse times, a face of the array's own tick is repacked
        return all(os.stat(root / p).st_mtime_ns < packed_at for p in images)
    except (UserError, OSError):  # refused by the loader (missing, stale, unreadable), or a face gone: not current
        return False


def make_loader(data_dir: str | os.PathLike, split: str, train: bool, batch_size: int,
                device: str | torch.device = "cpu", *, workers: int = config.NUM_WORKERS, seed: int = config.SEED,
                rank: int = 0, world_size: int = 1, jpeg: bool = False, limit: int | None = None,
                prefetch: int = 0, dummy: int | None = None) -> PackedLoader | JpegLoader:
    """Batches of one split on `device`: packed when DATA/faces_{split}.npy exists (unless jpeg), else from the JPEGs.

    train: shuffle (seeded, call set_epoch(epoch) each epoch), augment, drop the last partial
    batch; else every face once, in order. rank/world_size: this process's shard. limit: only the
    first `limit` faces of the split. prefetch: batches the packed loader prepares ahead, in a thread.
    dummy: a face side; the packed loader over dummy_split's random faces instead of data_dir's.
    """
    device = torch.device(device)
    if dummy is not None:
        faces, labels = dummy_split(dummy, split, seed)
    elif (packed := packed_path(data_dir, split)).is_file() and not jpeg:
        labels = load_split(data_dir, split)
        faces = open_packed(packed, labels.images, data_dir)
    else:
        dataset = FaceDataset(data_dir, split, train, limit, seed)
        return JpegLoader(dataset, batch_size, train, device, workers, seed, rank, world_size)
    labels = head(labels, limit)
    return PackedLoader(faces[:len(labels.images)], labels, batch_size, train, device, seed, rank, world_size, prefetch)


def dummy_split(size: int, split: str, seed: int) -> tuple[np.ndarray, Labels]:
    """Random faces (N, size, size, 3) uint8 and labels for train.py --dummy: DUMMY_FACES training faces or
    DUMMY_VALID validation ones, drawn from (seed, split), so every process of a run holds the same ones."""
    n = config.DUMMY_FACES if split == "train" else config.DUMMY_VALID
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    faces = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return faces, Labels([f"dummy/{split}/{i}" for i in range(n)], rng.integers(config.MIN_AGE, config.MAX_AGE + 1, n),
                         rng.integers(0, 2, n))


# --- packing -----------------------------------------------------------------------------------

def reserve(tmp: Path, out: Path) -> None:
    """Allocate the disk blocks of the memory-mapped array at `tmp` now: a disk too full for it is then an OSError
    naming `out` here, where a write through the map into a sparse file would be killed by SIGBUS, with no message and
    the temp file left behind (5.5 GB at IMDB's size, 22 GB at 224 px). Where the system cannot allocate ahead
    (posix_fallocate is Linux's), the map's writes take their chance as before."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(tmp, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if disk_full(e):
                raise OSError(e.errno, e.strerror, str(out)) from None


def pack_split(data_dir: str | os.PathLike, split: str, workers: int = config.WORKERS) -> Path | None:
    """Write DATA/faces_{split}.npy from the split's JPEGs, atomically, and faces_{split}.json, the list it holds.

    `workers` threads decode the faces, a task of PACK_CHUNK faces at a time straight into their rows of the array:
    with a task (a future) per face, taken in by this thread, packing took 1.18x and 1.30x as long (2 cores, 20,580
    faces into tmpfs, 2 runs of 3 rounds alternated, 2026-12-07; 0.23 ms a face now). Processes would not hold the
    GIL in turn, but on 2 cores they ran no faster. An empty split gets no array (and loses an old one): None.
    A current array (pack_is_current) is kept as it is.
    """
    root = Path(data_dir)
    labels = read_labels(root, split)
    if not labels.images:
        remove_packed(root, (split,))
        return None
    out = packed_path(root, split)
    if pack_is_current(root, split, labels.images):
        print(f"{out}: up to date with labels.csv and its {len(labels.images)} faces, kept (delete it to repack)")
        return out
    first = read_face(root / labels.images[0])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n = len(labels.images)
    try:
        faces = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *first.shape))  # (N, S, S, 3)
        reserve(tmp, out)
        fill = functools.partial(fill_rows, faces, [root / p for p in labels.images])
        # Pillow decodes with the GIL released; a failed task stops the map, which drops the tasks not yet started
        with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=n, desc=f"pack {split}", unit="face") as bar:
            for done in pool.map(fill, range(0, n, PACK_CHUNK)):
                bar.update(done)
        faces.flush()
        del faces  # unmap before the rename
        # the old sidecar goes first: a kill between the two renames must leave an array that is refused
        sidecar_path(out).unlink(missing_ok=True)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_sidecar(out, labels.images)
    return out
