"""The GPU-only paths: train.py's captured step (--cuda-graph), an epoch's syncs, --profile's kernels, pre_process.py's
host work for MTCNN on threads and in processes. Skipped without CUDA (CI has none); scripts/gpu_bench.sh runs this file on
the device machine before timing anything."""
import json
import warnings

import pytest
import torch

import train
from models import build_model
from test_data_gen import make_fake_data
from test_train import epoch_under
from utils import read_jsonl, seed_everything

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_cudnn():
    """fp32 and cuDNN's deterministic kernels: the eager and the captured step then compute the same numbers."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


def steps_of(graphed: bool, batches: list, lrs: list[float]) -> tuple[dict, float, train.Step]:
    """The model's state after one step per batch at the given lrs, the step's loss sum, and the step."""
    device = torch.device("cuda")
    seed_everything(0)
    model = build_model("resnet18", "l1").to(device, memory_format=torch.channels_last)
    optimizer = train.make_optimizer(model, lrs[0], 0.9, 5e-4)
    autocast = train.make_autocast(train.parse_args(["--no-amp"]), device)[1]
    step = (train.GraphedStep if graphed else train.Step)(model, model.loss, optimizer, autocast, 0.1, device)
    model.train()
    for (x, age, gender), lr in zip(batches, lrs):
        step.set_lr(lr)
        step(x, age, gender)
    return {k: v.clone() for k, v in model.state_dict().items()}, step.loss_sum.item(), step


def test_captured_step_trains_as_the_eager_one(exact_cudnn):
    """3 eager warm-up steps, the capture, then replays on new batches with a changing lr: the same weights, BatchNorm
    statistics and loss sum as the eager step (up to float rounding). A graph that kept its first batch or lr would
    drift from the eager weights by far more than the tolerance."""
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.rand(16, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 101, (16,), device="cuda", generator=g).float(),
                torch.randint(0, 2, (16,), device="cuda", generator=g)) for _ in range(8)]
    lrs = [0.01 * (i + 1) for i in range(8)]
    eager, eager_loss, _ = steps_of(False, batches, lrs)
    graphed, graphed_loss, step = steps_of(True, batches, lrs)
    assert step.graph is not None and step.warmed == train.GraphedStep.WARMUP  # 3 warm-up steps, 1 capture, 4 replays
    assert graphed_loss == pytest.approx(eager_loss, rel=1e-4)
    for name, want in eager.items():
        assert torch.allclose(graphed[name].float(), want.float(), rtol=1e-3, atol=1e-4), name


def test_train_py_with_cuda_graph_trains_resumes_and_saves_plain_checkpoints(tmp_path):
    data = make_fake_data(tmp_path / "data", n_train=64, n_valid=16, pack=True)
    common = ["--data", str(data), "--out", str(tmp_path / "run"), "--pretrained", "none", "--device", "cuda",
              "--batch-size", "8", "--cuda-graph"]
    train.main(common + ["--epochs", "1"])
    train.main(common + ["--epochs", "2", "--resume", str(tmp_path / "run" / "last.pt")])
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["train_loss"], r["val_loss"], r["lr"]])).all() for r in log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cuda_graph"] is True
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(g["lr"], float) for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
def test_profile_sees_the_gpu_s_kernels(tmp_path, monkeypatch, graphed):
    """train.py --profile on a GPU: kernels recorded (inside graph replays too), on the steps of every thread."""
    import config

    monkeypatch.setattr(config, "PROFILE_SKIP", 5)  # past the captured step's 3 warm-up steps and its capture
    data = make_fake_data(tmp_path / "data", n_train=128, n_valid=8, pack=True)
    out = tmp_path / "run"
    train.main(["--data", str(data), "--out", str(out), "--pretrained", "none", "--device", "cuda", "--batch-size",
                "8", "--epochs", "1", "--profile", "6", *(["--cuda-graph"] if graphed else [])])
    s = json.loads((out / "profile.json").read_text())
    assert s["steps"] == 6 and s["device_busy_ms"] > 0 and 0 < s["device_busy_share"], s
    assert {"main", "loader"} <= {t["thread"] for t in s["threads"]}
    assert "ms (" in (out / "profile.txt").read_text().splitlines()[0]


class SyncWarnings:
    """Within `with`, torch.cuda's sync debug mode on "warn", counting the syncs it reports: .item(), a copy to the
    host, a stream or device synchronize (not a wait on an event, which the packed loader's reused buffers need)."""

    def __enter__(self) -> "SyncWarnings":
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(*exc)
        self.count = sum("synchronizing CUDA operation" in str(w.message) for w in self.records)


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
def test_an_epoch_syncs_only_when_it_logs(tmp_path, graphed):
    """Issue 10: no host sync inside an epoch but at the logging steps, counted by the GPU's own debug mode (the CPU
    test counts host reads of values). Epochs of 6 and 12 steps (both past the captured step's warm-up and capture)
    sync alike; logging at every step syncs a fixed number of times more per step."""
    data = make_fake_data(tmp_path / "data", n_train=96, n_valid=8, pack=True)
    extra = ["--cuda-graph"] if graphed else []

    def syncs(faces: int, log_every: int) -> tuple[int, int]:
        watch = SyncWarnings()
        return epoch_under(watch, data, "cuda", faces, log_every, "l1", *extra), watch.count

    syncs(48, 1000)  # first, untold: the loader's constant tables go to the GPU once, in blocking copies
    (few_steps, few), (many_steps, many) = syncs(48, 1000), syncs(96, 1000)
    assert (few_steps, many_steps) == (6, 12)
    assert 0 < few == many, (few, many)
    steps, every = syncs(96, 1)
    assert every > many and (every - many) % (steps - 1) == 0, (every, many)


def test_imdb_crops_on_the_gpu_find_the_cpu_s_faces(samples, exact_cudnn):
    """pre_process.py on a GPU: prepare_crop makes each crop's P-Net pyramid on the host, search_crops draws it on
    the canvas and sends that in one copy; the central faces are the CPU's (which resizes the levels in detect()), to
    a pixel."""
    import numpy as np

    import face
    from synth_imdb import imdb_sized
    from utils import read_image

    rng = np.random.default_rng(0)
    portraits = [read_image(samples / n) for n in ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg")]
    crops = [imdb_sized(rng, portraits[i % 3]) for i in range(12)]
    found = {}
    for device in ("cpu", "cuda"):
        detector = face.FaceDetector(device=device)
        searches = [face.prepare_crop(detector.crop_plan(), c, 0.25) for c in crops]
        assert all((s.pyramid is None) == (device == "cpu") for s in searches)
        found[device] = face.search_crops(detector, searches)
    for crop, cpu, gpu in zip(crops, found["cpu"], found["cuda"]):
        i, j = face.central_face(cpu, crop.shape), face.central_face(gpu, crop.shape)
        assert (i is None) == (j is None)
        if i is not None:
            assert np.abs(cpu.landmarks[i] - gpu.landmarks[j]).max() < 1.0


def test_crops_prepared_in_the_decoding_processes_on_the_gpu(tmp_path):
    """pre_process.py --device cuda --prepare-in processes (the decoding worker shrinks each photo and makes its
    P-Net pyramid) writes the faces, byte for byte, that --prepare-in threads writes (threads beside the feeding one)."""
    import numpy as np

    import pre_process
    from synth_imdb import generate, imdb_sized
    from utils import read_image, write_jpeg

    root = tmp_path / "crop"
    generate(root, 8, seed=22, dirty_fraction=0.0)
    rng = np.random.default_rng(1)
    for path in sorted(root.glob("*/*.jpg")):
        write_jpeg(path, imdb_sized(rng, read_image(path)), quality=90)
    faces = {}
    for where in ("threads", "processes"):
        out = tmp_path / where
        pre_process.main(["--root", str(root), "--out", str(out), "--device", "cuda", "--workers", "2", "--batch", "4",
                          "--no-pack", "--prepare-in", where])
        faces[where] = {p.relative_to(out): p.read_bytes() for p in sorted((out / "faces").rglob("*.jpg"))}
    assert len(faces["threads"]) >= 6 and faces["processes"] == faces["threads"]


def test_the_packed_loader_leaves_the_step_on_its_own_stream(tmp_path):
    """The batches are made on the loader's side stream, one for every epoch, and the step runs on its own: with
    prefetch 0 the side stream's context stayed open across the yield, so the step ran on it, a new stream each epoch
    (every epoch re-allocated the step's memory, and epochs were not ordered against each other: bench.py's grid)."""
    from data_gen import make_loader

    data = make_fake_data(tmp_path / "data", n_train=32, n_valid=8, pack=True)
    loader = make_loader(data, "train", True, batch_size=8, device=torch.device("cuda"), workers=0, seed=0, rank=0,
                         world_size=1, jpeg=False, limit=None, prefetch=0, dummy=None)  # made in this thread
    mine, sides = torch.cuda.current_stream(), []
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        for x, age, gender in loader:
            assert torch.cuda.current_stream() == mine
            (x.float().mean() + age.float().mean()).item()  # a step's use, on this stream
        sides.append(loader.stream)
    assert sides[0] is sides[1] and sides[0] != mine
