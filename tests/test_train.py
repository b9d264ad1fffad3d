"""train.py end to end on a tiny learnable data dir (32x32 faces), on the CPU."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from data_gen import preprocess
from metrics import compute_metrics
from models import load_checkpoint, predict_age
from test_data_gen import make_fake_data
from utils import REPO, UserError, read_jsonl

EPOCHS = 2


def args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--pretrained", "none", "--device", "cpu", "--batch-size", "16",
            "--workers", "0", "--epochs", str(EPOCHS), *map(str, extra)]


def recomputed_metrics(checkpoint, data) -> dict:
    """The valid split's metrics from a checkpoint, computed the way evaluate.py and demo.py do (load_checkpoint, preprocess)."""
    model, cfg = load_checkpoint(checkpoint, "cpu")
    rows = [line.split(",") for line in (data / "labels.csv").read_text().splitlines()[1:] if line.endswith(",valid")]
    with torch.no_grad():
        gender_logits, age_out = model(preprocess(np.load(data / "faces_valid.npy")))
    return compute_metrics(predict_age(age_out, cfg["age_loss"]).numpy(), np.array([int(r[3]) for r in rows]),
                           gender_logits.argmax(1).numpy(), np.array([int(r[4]) for r in rows]))


def assert_logged(m: dict, logged: dict) -> None:
    assert m["gender_acc"] == pytest.approx(logged["gender_acc"])
    assert m["age_mae"] == pytest.approx(logged["age_mae"], abs=1e-4)
    assert m["cs5"] == pytest.approx(logged["cs5"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_data(tmp_path_factory.mktemp("data"), n_train=64, n_valid=16, pack=True)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One finished two-epoch run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run")
    train.main(args(data, out))
    return out


def test_loss_falls_and_the_files_are_written(run):
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[0]) >= {"epoch", "gender_acc", "age_mae", "cs5", "train_loss", "val_loss", "lr", "seconds",
                           "train_images_per_s"}
    assert log[1]["train_loss"] < log[0]["train_loss"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["size"] == 32 and cfg["arch"] == "resnet18" and cfg["torch"] == torch.__version__ and "git_commit" in cfg
    assert cfg["peak_lr"] == pytest.approx(0.01 * 16 / 32)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == min(log, key=lambda r: r["score"])["epoch"]


def test_checkpoint_reproduces_the_logged_validation(run, data):
    """load_checkpoint + preprocess (what evaluate.py and demo.py do) give the metrics train.py logged."""
    ckpt = torch.load(run / "last.pt", weights_only=True)  # plain values and state dicts only
    assert set(ckpt) == {"model", "optimizer", "scheduler", "epoch", "best", "config", "metrics"}
    assert_logged(recomputed_metrics(run / "last.pt", data), read_jsonl(run / "metrics.jsonl")[-1])


def test_resume_continues_where_it_stopped(run, data, tmp_path):
    """1 epoch, then --resume to 2: the same losses and the same final weights and optimizer as 2 epochs at once."""
    train.main(args(data, tmp_path, "--epochs", 1))
    train.main(args(data, tmp_path, "--resume", tmp_path / "last.pt"))
    log, straight = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["train_loss"] for r in log] == pytest.approx([r["train_loss"] for r in straight], abs=1e-5)
    resumed, once = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path, run))
    assert resumed["scheduler"]["last_epoch"] == once["scheduler"]["last_epoch"] == 2 * 4
    for a, b in zip(resumed["optimizer"]["state"].values(), once["optimizer"]["state"].values()):
        assert torch.allclose(a["momentum_buffer"], b["momentum_buffer"], atol=1e-5)
    for key, value in once["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-5), key


def test_resume_refuses_other_settings(run, data, tmp_path):
    with pytest.raises(UserError, match="settings differ: arch 'resnet18' in the checkpoint, 'resnet34' now"):
        train.main(args(data, tmp_path, "--epochs", 3, "--arch", "resnet34", "--resume", run / "last.pt"))
    with pytest.raises(UserError, match="already trained 2 epochs"):
        train.main(args(data, tmp_path, "--resume", run / "last.pt"))
    with pytest.raises(UserError, match="--resume .*nothere.pt: not found"):
        train.main(args(data, tmp_path, "--resume", tmp_path / "nothere.pt"))


def test_same_seed_same_loss(run, data, tmp_path):
    """Seeded on the CPU: a second run repeats the first epoch's loss; another seed does not. Also the JPEG path."""
    def first_loss(out, *extra):
        train.main(args(data, out, "--epochs", 1, *extra))
        return read_jsonl(out / "metrics.jsonl")[0]["train_loss"]

    assert first_loss(tmp_path / "again") == read_jsonl(run / "metrics.jsonl")[0]["train_loss"]
    assert first_loss(tmp_path / "seed7", "--seed", 7) != first_loss(tmp_path / "again")
    jpeg = [first_loss(tmp_path / f"jpeg{i}", "--jpeg", "--workers", 2) for i in range(2)]  # workers decode and augment
    assert jpeg[0] == jpeg[1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    saved = []
    save_epoch, total_loss = train.save_epoch, train.total_loss
    monkeypatch.setattr(train, "save_epoch", lambda *a: (save_epoch(*a), saved.append(1)))
    monkeypatch.setattr(train, "total_loss", lambda *a: total_loss(*a) * (float("nan") if saved else 1.0))
    with pytest.raises(UserError, match="nan or inf in epoch 2.*last.pt holds the last good one"):
        train.main(args(data, tmp_path, "--log-every", 2))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_torchrun_two_processes(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *args(data, out, "--batch-size", 8)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]  # written once, by rank 0
    assert done.stdout.count("best: epoch") == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 16
    # the logged validation covers both processes' stripes: all 16 faces, as a single process computes it
    assert_logged(recomputed_metrics(out / "last.pt", data), log[-1])


def test_unknown_options_fail(data, tmp_path):
    for bad in (["--bogus"], ["--epo", "3"], ["--age-loss", "huber"]):
        with pytest.raises(SystemExit) as e:
            train.main(args(data, tmp_path, *bad))
        assert e.value.code == 2
