"""data_gen.py: the input transform, the labels checks, packing, and the packed loader against the JPEG one.

Also holds make_fake_data(), the tiny learnable data dir that test_train.py trains on.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten

import data_gen
from data_gen import IMAGENET_MEAN, IMAGENET_STD, augment, augment_params, make_loader, pack_split, preprocess
from test_face import OpCount
from utils import REPO, UserError, read_image, write_jpeg


def fake_face(age: int, gender: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A face-sized picture whose labels show: a top band whose grey rises with age, a red (male) or blue tint."""
    face = rng.integers(40, 90, (size, size, 3)).astype(np.uint8)  # (S, S, 3) noise as background
    face[: size // 3] = int(40 + 2 * age)  # the band
    face[size // 3:, :, 0 if gender else 2] += 120  # the tint
    return face


def make_fake_data(root, n_train: int = 48, n_valid: int = 16, size: int = 32, pack: bool = False, seed: int = 0):
    """A data dir as pre_process.py writes it: faces/00/*.jpg, labels.csv, summary.json (and the packed arrays)."""
    rng = np.random.default_rng(seed)
    rows = ["image,source,identity,age,gender,split"]
    for i in range(n_train + n_valid):
        age, gender = int(rng.integers(10, 80)), i % 2
        write_jpeg(root / "faces" / "00" / f"{i}.jpg", fake_face(age, gender, size, rng))
        rows.append(f"faces/00/{i}.jpg,00/{i}.jpg,nm{i},{age},{gender},{'train' if i < n_train else 'valid'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "summary.json").write_text(json.dumps({"size": size}))
    if pack:
        for split in ("train", "valid"):
            pack_split(root, split)
    return root


@pytest.fixture
def data(tmp_path):
    return make_fake_data(tmp_path / "data", n_train=12, n_valid=7, pack=True)


def batches(loader):
    xs, ages, genders = zip(*loader)
    return torch.cat(xs), torch.cat(ages), torch.cat(genders)


# --- the transform ------------------------------------------------------------------------------

def test_preprocess_is_the_imagenet_normalisation():
    faces = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    manual = (faces.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # (N, S, S, 3)
    x = preprocess(faces)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(manual.transpose(0, 3, 1, 2)).float(), atol=1e-6)
    assert torch.equal(preprocess(faces[1]), x[1:])  # one face (S, S, 3) -> a batch of one


def test_validation_input_is_the_demo_input(data):
    """What validation feeds the network equals preprocess() of the same JPEG, on both paths."""
    first = preprocess(read_image(data / "faces/00/12.jpg"))  # the first valid face
    for jpeg in (True, False):
        x, _, _ = next(iter(make_loader(data, "valid", False, 4, workers=0, jpeg=jpeg)))
        assert torch.equal(x[:1], first)


def test_packed_equals_jpeg(data):
    packed = make_loader(data, "valid", False, 3, jpeg=False)
    jpeg = make_loader(data, "valid", False, 3, workers=1, jpeg=True)
    assert type(packed).__name__ == "PackedLoader" and type(jpeg).__name__ == "JpegLoader"
    assert len(packed) == len(jpeg) == 3  # 7 faces, the last batch partial
    for a, b in zip(batches(packed), batches(jpeg)):
        assert torch.equal(a, b)
    # training: the same seeded order (checked through the labels) on both paths, a new one per epoch
    orders = []
    for jpeg_path in (False, True):
        loader = make_loader(data, "train", True, 4, workers=0, jpeg=jpeg_path, seed=3)
        loader.set_epoch(2)
        orders.append(batches(loader)[1])
    assert torch.equal(orders[0], orders[1]) and len(orders[0]) == 12
    loader.set_epoch(3)
    assert not torch.equal(batches(loader)[1], orders[1])


def test_shards_cover_the_split(data):
    valid = [batches(make_loader(data, "valid", False, 2, rank=r, world_size=2))[1] for r in (0, 1)]
    assert sorted(torch.cat(valid).tolist()) == sorted(batches(make_loader(data, "valid", False, 2))[1].tolist())
    train = [make_loader(data, "train", True, 2, rank=r, world_size=2) for r in (0, 1)]
    assert len(train[0]) == len(train[1]) == 3  # 12 faces, 6 per process


@pytest.mark.parametrize("rank, world_size", [(0, 1), (0, 2), (1, 2)])
def test_prefetching_yields_the_batches_of_the_synchronous_loader(data, rank, world_size):
    """The background thread (prefetch > 0) prepares exactly the batches made on demand: order, shard, augmentation."""
    def epochs(prefetch):
        loader = make_loader(data, "train", True, 2, seed=5, rank=rank, world_size=world_size, prefetch=prefetch)
        out = []
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            out.append(batches(loader))  # two passes also reuse the staging slots
        return out

    synchronous = epochs(0)
    assert not torch.equal(synchronous[0][1], synchronous[1][1])  # a new order per epoch
    for prefetch in (1, 3):
        for mine, theirs in zip(epochs(prefetch), synchronous):
            for a, b in zip(mine, theirs):
                assert torch.equal(a, b)


PREFETCH_UNDER_TORCHRUN = """
import os, sys, torch
from data_gen import make_loader
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
def epoch(prefetch):
    loader = make_loader(sys.argv[1], "train", True, 2, seed=5, rank=rank, world_size=world, prefetch=prefetch)
    loader.set_epoch(3)
    return [torch.cat(t) for t in zip(*loader)]
torch.save(dict(sync=epoch(0), prefetched=epoch(2)), f"{sys.argv[2]}/rank{rank}.pt")
"""


def test_prefetching_under_torchrun_yields_each_shard_of_the_synchronous_loader(data, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(PREFETCH_UNDER_TORCHRUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(data), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for shard in shards:
        for a, b in zip(shard["prefetched"], shard["sync"]):
            assert torch.equal(a, b)
    ages = torch.cat([s["sync"][1] for s in shards])
    assert len(ages) == 12 and not torch.equal(shards[0]["sync"][0], shards[1]["sync"][0])  # two halves, not copies


def test_prefetching_stops_when_the_consumer_does(data, monkeypatch):
    import threading

    loader = make_loader(data, "train", True, 2, prefetch=2)
    for _ in loader:
        break  # the thread must not go on filling a queue nobody reads
    assert not [t for t in threading.enumerate() if t.name == "packed-loader"]
    fill = data_gen.Slot.fill
    calls = []

    def failing_fill(*a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk gone")
        return fill(*a)

    monkeypatch.setattr(data_gen.Slot, "fill", failing_fill)
    got = []
    with pytest.raises(OSError, match="disk gone"):  # raised in the consumer, after the batches made before it
        for batch in loader:
            got.append(batch)
    assert len(got) == 2
    assert not [t for t in threading.enumerate() if t.name == "packed-loader"]


def test_augment_keeps_shapes_and_ranges():
    x = torch.rand(16, 3, 32, 32) * 255  # pixel values
    p = augment_params(16, torch.Generator().manual_seed(0))
    assert p.shape == (16, 9)
    linear = p[:, [0, 1, 3, 4]].view(16, 2, 2)  # rotation and zoom, times a flip
    zoom = 1 / linear[:, 1].norm(dim=1)  # the second row is (sin, cos) / zoom
    assert zoom.min() >= 0.9 and zoom.max() <= 1.1 and (linear.det() < 0).any() and (linear.det() > 0).any()
    assert p[:, [2, 5]].abs().max() <= 0.1 and p[:, 6:].min() >= 0.8 and p[:, 6:].max() <= 1.2
    y = augment(x, p)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 255
    assert not torch.allclose(y, x, atol=0.05 * 255)  # it does something
    assert abs(y.mean() - x.mean()) < 0.1 * 255  # but mildly
    assert torch.equal(p, augment_params(16, torch.Generator().manual_seed(0)))  # seeded
    assert torch.equal(augment(x.to(memory_format=torch.channels_last), p), y)


def test_augmenting_a_batch_launches_few_ops():
    """The augmentation's parameters (affine maps, jitter factors) are made on the host with the random numbers, so
    the loader's thread runs at most 50 ops per batch on the device (on a GPU each one host work, most a launch),
    where deriving them there took 63."""
    faces = loader_faces(8)
    params = augment_params(8, torch.Generator().manual_seed(0))
    data_gen.network_input(faces, params)  # the cached constants made
    with OpCount() as count:
        data_gen.network_input(faces, params)
    assert count.count <= 50


class TensorBytes(OpCount):
    """Bytes of the tensors each op reads (its arguments) and writes (its results): on a GPU, the memory traffic they
    cost. Views, allocations and _unsafe_view (a view that autograd does not track as one) move nothing; an out=
    tensor is written, not read: it counts as the result it is."""

    FREE = {"empty", "empty_like", "empty_strided", "_unsafe_view"}

    def cost(self, func, args, kwargs, out) -> int:
        if func.is_view or func.overloadpacket.__name__ in self.FREE:
            return 0
        read = {k: v for k, v in (kwargs or {}).items() if k != "out"}
        tensors = [t for t in tree_flatten((args, read, out))[0] if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def loader_faces(n: int, size: int = 112) -> torch.Tensor:
    """uint8 faces (n, 3, S, S) as the packed loader hands them to network_input: NHWC rows permuted, channels_last."""
    nhwc = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return nhwc.permute(0, 3, 1, 2)


def test_the_training_input_costs_few_passes_over_the_batch():
    """The loader's uint8 faces to the augmented, normalised input in the model's channels_last, as the step takes it:
    at most 90 bytes read and written per value of the batch (a pass over it in float32 is 8). It took 112 until
    2026-12-08: two passes each to make floats and to normalise, and the step's conversion of grid_sample's NCHW."""
    faces = loader_faces(8)
    with TensorBytes() as traffic:
        data_gen.network_input(faces, augment_params(8, torch.Generator().manual_seed(0))).contiguous(
            memory_format=torch.channels_last)
    assert traffic.count / faces.numel() <= 90


def test_the_validation_input_is_two_passes():
    """uint8 to float in one pass (5 bytes per value), the normalisation in another (8): 13, where it took 29."""
    faces = loader_faces(8)
    with TensorBytes() as traffic:
        data_gen.network_input(faces).contiguous(memory_format=torch.channels_last)
    assert traffic.count / faces.numel() <= 13.01


def test_the_input_keeps_the_faces_memory_format():
    """channels_last faces give a channels_last input, augmented or not (grid_sample itself writes NCHW), and NCHW
    faces an NCHW one; the values do not depend on it."""
    params = augment_params(4, torch.Generator().manual_seed(1))
    for augmented in (None, params):
        faces = loader_faces(4, 16)
        last = data_gen.network_input(faces, augmented)
        plain = data_gen.network_input(faces.contiguous(), augmented)
        assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
        assert plain.is_contiguous()
        assert torch.allclose(last, plain, atol=1e-6)


def test_augmented_batches_stay_in_range(data):
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for jpeg in (False, True):
        loader = make_loader(data, "train", True, 4, workers=0, jpeg=jpeg)
        x, age, gender = next(iter(loader))
        assert x.shape == (4, 3, 32, 32) and age.dtype == gender.dtype == torch.long
        per_channel = x.transpose(0, 1).reshape(3, -1)  # (3, N*S*S)
        assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()


# --- packing and the checks ------------------------------------------------------------------------

def test_pack_split_writes_the_faces(tmp_path):
    data = make_fake_data(tmp_path, n_train=5, n_valid=2)
    assert pack_split(data, "valid") == data / "faces_valid.npy"
    faces = np.load(data / "faces_valid.npy", mmap_mode="r")
    assert faces.shape == (2, 32, 32, 3) and faces.dtype == np.uint8
    assert np.array_equal(faces[1], read_image(data / "faces/00/6.jpg"))
    assert sorted(p.name for p in data.iterdir()) == ["faces", "faces_valid.json", "faces_valid.npy", "labels.csv",
                                                      "summary.json"]


def test_packing_tasks_fill_their_rows_of_the_array(tmp_path, monkeypatch):
    """Tasks of PACK_CHUNK faces on 2 threads: every row is its face, the last, short task's too; a face of another
    size is a one-line error naming it, which leaves no temp file and the array packed before, and the tasks not yet
    started are dropped."""
    data = make_fake_data(tmp_path, n_train=10, n_valid=2)
    monkeypatch.setattr(data_gen, "PACK_CHUNK", 4)  # 3 tasks, the last of 2 faces
    pack_split(data, "train", workers=2)
    faces = np.load(data / "faces_train.npy")
    assert faces.shape == (10, 32, 32, 3)
    for i in range(10):
        assert np.array_equal(faces[i], read_image(data / f"faces/00/{i}.jpg")), i
    write_jpeg(data / "faces/00/6.jpg", np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(UserError, match=r"faces/00/6.jpg: 40x40, the first face is 32x32; rerun pre_process.py"):
        pack_split(data, "train", workers=2)
    assert not list(tmp_path.glob(".*.tmp")) and np.array_equal(np.load(data / "faces_train.npy"), faces)
    read, reads = data_gen.read_face, []

    def slow_after_the_bad_face(path):  # the one thread cannot race through the rest before the failure is seen
        reads.append(path)
        if int(path.stem) > 6:
            time.sleep(1.0)
        return read(path)

    monkeypatch.setattr(data_gen, "read_face", slow_after_the_bad_face)
    monkeypatch.setattr(data_gen, "PACK_CHUNK", 1)  # a task a face: those after the failed one are dropped
    with pytest.raises(UserError, match="faces/00/6.jpg"):
        pack_split(data, "train", workers=1)
    assert len(reads) <= 1 + 7 + 1, reads  # the first face, the tasks up to the failed one, one started meanwhile


def test_a_current_pack_is_kept_and_a_face_written_after_it_repacks(tmp_path, capsys):
    data = make_fake_data(tmp_path, n_train=5, n_valid=2)
    an_hour_ago = time.time_ns() - 3600 * 10**9  # file times tick every few ms: clear of the array's own
    for face in (data / "faces").rglob("*.jpg"):
        os.utime(face, ns=(an_hour_ago, an_hour_ago))
    packed = pack_split(data, "valid")
    packed_at = packed.stat().st_mtime_ns
    capsys.readouterr()
    assert pack_split(data, "valid") == packed and packed.stat().st_mtime_ns == packed_at
    assert f"{packed}: up to date with labels.csv and its 2 faces, kept" in capsys.readouterr().out
    write_jpeg(data / "faces/00/6.jpg", np.full((32, 32, 3), 200, np.uint8))  # the second valid face, made again
    pack_split(data, "valid")
    assert "up to date" not in capsys.readouterr().out
    assert np.array_equal(np.load(packed)[1], read_image(data / "faces/00/6.jpg"))
    np.save(packed, np.load(packed).astype(np.float32))  # its sidecar still matches: one the loader refuses
    assert not data_gen.pack_is_current(data, "valid", data_gen.read_labels(data, "valid").images)
    (data / "faces_valid.json").write_text(json.dumps(dict(images=2, images_sha256="0" * 64)))  # packed for others
    assert not data_gen.pack_is_current(data, "valid", data_gen.read_labels(data, "valid").images)
    (data / "faces/00/6.jpg").unlink()
    assert not data_gen.pack_is_current(data, "valid", ["faces/00/5.jpg", "faces/00/6.jpg"])  # a face gone


def test_stale_pack_is_refused(data):
    np.save(data / "faces_valid.npy", np.zeros((3, 32, 32, 3), np.uint8))  # labels.csv has 7 valid rows
    with pytest.raises(UserError, match="faces_valid.npy.*7 rows.*--pack-only"):
        make_loader(data, "valid", False, 4)


def test_pack_of_other_images_is_refused(data):
    """An array packed for another labels.csv is refused even when its row count matches (--no-pack over old output)."""
    lines = (data / "labels.csv").read_text().splitlines()
    valid = [i for i, line in enumerate(lines) if line.endswith(",valid")]
    lines[valid[0]], lines[valid[1]] = lines[valid[1]], lines[valid[0]]  # same 7 rows, two faces swapped
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="faces_valid.npy: packed for other images than labels.csv.*--pack-only"):
        make_loader(data, "valid", False, 4)
    make_loader(data, "train", True, 4)  # the train rows did not change: its array is still good
    pack_split(data, "valid")
    x, _, _ = next(iter(make_loader(data, "valid", False, 1)))
    assert torch.equal(x[0], preprocess(read_image(data / "faces/00/13.jpg"))[0])  # the new first valid face


def test_pack_without_its_list_is_refused(data):
    (data / "faces_valid.json").unlink()  # as an older version, or a kill between the two renames, leaves it
    with pytest.raises(UserError, match="faces_valid.json.*missing.*--pack-only"):
        make_loader(data, "valid", False, 4)


def test_emptied_split_loses_its_pack(data):
    (data / "labels.csv").write_text((data / "labels.csv").read_text().replace(",valid", ",train"))
    assert pack_split(data, "valid") is None
    assert not (data / "faces_valid.npy").exists() and not (data / "faces_valid.json").exists()


@pytest.mark.parametrize("text, match", [
    ("", "line 1: empty file"),
    ("image,age,gender\n", "line 1: header"),
    ("image,source,identity,age,gender,split\nfaces/00/0.jpg,s,i,30,1,train\nfaces/00/1.jpg,s,i,abc,1,train\n",
     "line 3: age 'abc'"),
    ("image,source,identity,age,gender,split\nfaces/00/0.jpg,s,i,101,1,train\n", "line 2: age '101'"),
    ("image,source,identity,age,gender,split\nfaces/00/0.jpg,s,i,30,1,train\n\nfaces/00/1.jpg,s,i,30,m,train\n",
     "line 4: gender 'm'"),
    ("image,source,identity,age,gender,split\nfaces/00/0.jpg,s,i,30,1,test\n", "line 2: split 'test'"),
    ("image,source,identity,age,gender,split\nfaces/00/0.jpg,s,30,1,train\n", "line 2: 5 fields"),
])
def test_malformed_labels_name_the_line(tmp_path, text, match):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(UserError, match=match):
        data_gen.FaceDataset(tmp_path, "train", train=False)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(UserError, match="labels.csv not found.*pre_process.py"):
        make_loader(tmp_path, "train", True, 4)
    data = make_fake_data(tmp_path / "d", n_train=3, n_valid=0)
    (data / "faces/00/1.jpg").unlink()
    with pytest.raises(UserError, match=r"faces/00/1.jpg: listed in labels.csv but missing \(1 of 3"):
        make_loader(data, "train", True, 4, jpeg=True)
    with pytest.raises(UserError, match="no rows with split valid"):
        make_loader(data, "valid", False, 4)
