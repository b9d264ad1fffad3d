"""train.py killed mid-run: SIGKILL then --resume ends where an uninterrupted run ends; Ctrl-C says what was saved."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
import utils
from test_data_gen import make_fake_data
from utils import REPO, read_jsonl

EPOCHS = 3
TIMING = ("seconds", "train_images_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_data(tmp_path_factory.mktemp("data"), n_train=192, n_valid=16, pack=True)


def command(data, out, *extra):
    return [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--pretrained", "none",
            "--device", "cpu", "--batch-size", "16", "--workers", "0", "--epochs", str(EPOCHS), *extra]


def start_and_wait_for_epoch_1(data, out):
    proc = subprocess.Popen(command(data, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    log = out / "metrics.jsonl"  # its first line comes after epoch 1's checkpoints
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    return proc


def without_timing(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(data, whole), cwd=REPO, check=True, capture_output=True)
    proc = start_and_wait_for_epoch_1(data, killed)
    time.sleep(0.2)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "last.pt", weights_only=True)  # never half-written
    assert saved["epoch"] < EPOCHS, "the kill must land before the run ends"
    subprocess.run(command(data, killed, "--resume", str(killed / "last.pt")), cwd=REPO, check=True,
                   capture_output=True)
    resumed, straight = read_jsonl(killed / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == list(range(1, EPOCHS + 1))
    for mine, theirs in zip(without_timing(resumed), without_timing(straight)):
        assert mine == pytest.approx(theirs, abs=1e-5)
    a, b = (torch.load(d / "best.pt", weights_only=True) for d in (killed, whole))
    assert a["epoch"] == b["epoch"]
    for key, value in b["model"].items():
        assert torch.allclose(a["model"][key].float(), value.float(), atol=1e-5), key


def test_ctrl_c_stops_cleanly_and_says_what_was_saved(data, tmp_path):
    proc = start_and_wait_for_epoch_1(data, tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a training process behind a failed test
    tail = err[-2000:]
    assert proc.returncode == 130, tail
    on_disk = torch.load(tmp_path / "last.pt", weights_only=True)["epoch"]
    assert 1 <= on_disk < EPOCHS, tail
    assert f"holds epoch {on_disk}; go on with --resume {tmp_path / 'last.pt'}" in err, tail
    assert "Traceback" not in err


def test_a_full_disk_says_what_was_saved_and_the_resume_completes(data, tmp_path, monkeypatch, capsys):
    """ENOSPC while saving epoch 1's best.pt (just after its last.pt): what last.pt holds and how to go on, then the
    one line naming the file; --resume, with space again, trains to the end."""
    fsync = os.fsync

    def full_after_last_pt(fd):
        if (tmp_path / "last.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", full_after_last_pt)
    with pytest.raises(SystemExit) as stopped:
        utils.run_main(lambda: train.main(command(data, tmp_path)[2:]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"stopped in epoch 1: {tmp_path / 'last.pt'} holds epoch 1; go on with --resume {tmp_path / 'last.pt'}" in err
    assert f"error: no space left on the device writing {tmp_path / 'best.pt'} (No space left on device)" in err
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    utils.run_main(lambda: train.main(command(data, tmp_path, "--resume", str(tmp_path / "last.pt"))[2:]))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] >= 1
