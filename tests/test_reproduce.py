"""reproduce.py end to end on the built-in dataset (--quick), three of its rows (--runs): killed in a training stage
and rerun, results.json complete, a third invocation (through `make reproduce`) that runs no stage."""
import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reproduce
from synth_imdb import generate
from utils import REPO, UserError, read_jsonl

N = 80  # built-in photos: ~75 faces, both splits of both protocols non-empty
EPOCHS = 2  # the killed run has one epoch on disk to resume from and one to run after
KEYS = {"size", "arch", "age_loss", "age_weight", "split", "epochs", "gender_acc", "age_mae", "cs5", "seconds"}


KILLED = next(r for r in reproduce.RUNS if reproduce.recipe_of(r).get("arch") == "resnet50")  # the slowest epoch: the widest window to kill in
# --runs: a row with a recipe before the killed one, the killed one (224 px, no original MAE) and one with train.py's
# defaults on the identity split: every data dir, both kinds of row, in a third of the time of all eight
RUNS = [reproduce.RUNS[0], KILLED, next(r for r in reproduce.RUNS if r.recipe is None and r.split == "identity")]


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    generate(root, N, seed=3)
    return root


def arguments(crop: Path, out: Path) -> list[str]:
    return ["--quick", "--root", str(crop), "--out", str(out), "--epochs", str(EPOCHS), "--runs", *(r.name for r in RUNS)]


def command(crop: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "reproduce.py"), *arguments(crop, out)]


def epochs_logged(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def killed_then_rerun(crop, tmp_path_factory):
    """reproduce.py and the stage it runs SIGKILLed once KILLED has logged its first epoch, then run again to the end.

    Returns (OUT, the epochs KILLED had logged when killed, the second invocation's CompletedProcess).
    """
    out = tmp_path_factory.mktemp("reproduce")
    log = out / "runs" / KILLED.name / "metrics.jsonl"
    with open(out.parent / "killed.log", "w") as output:
        proc = subprocess.Popen(command(crop, out), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while not (log.is_file() and '"epoch": 1,' in log.read_text()):
            assert proc.poll() is None, "reproduce.py ended before the kill:\n" + (out.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "KILLED never finished its first epoch"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is reproduce.py and train.py
        proc.wait()
    killed_at = epochs_logged(log.parent)
    rerun = subprocess.run(command(crop, out), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return out, killed_at, rerun


def test_killed_run_resumes_and_completes(killed_then_rerun):
    out, killed_at, rerun = killed_then_rerun
    assert killed_at == [1], "the kill came after the killed run had finished"
    before = RUNS[:RUNS.index(KILLED)]
    for run in before:  # finished before the kill: not trained again
        assert f"== train {run.name}: finished ({EPOCHS} epochs), skipped" in rerun.stdout
    assert f"== train {KILLED.name}, resuming after epoch 1" in rerun.stdout
    assert f"--resume {out / 'runs' / KILLED.name / 'last.pt'}" in rerun.stdout
    assert "pre_process.py" not in rerun.stdout  # every data dir was complete before the kill
    assert epochs_logged(out / "runs" / KILLED.name) == [1, 2]  # epoch 1 neither lost nor logged twice


def test_results_complete(killed_then_rerun):
    out, _, _ = killed_then_rerun
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(RUNS)
    for run, r in zip(RUNS, results):
        originals = {k for k in ("original_gender_acc", "original_age_mae") if getattr(run, k) is not None}
        assert set(r) == KEYS | originals, run.name
        assert all(r[k] == getattr(run, k) for k in originals)
        assert (r["size"], r["split"], r["epochs"]) == (run.size, run.split, EPOCHS)
        run_dir = out / "runs" / run.name
        log = read_jsonl(run_dir / "metrics.jsonl")
        assert r["seconds"] == pytest.approx(sum(e["seconds"] for e in log)) and r["seconds"] > 0
        # evaluate.py scored best.pt on the faces train.py validated it on: the same numbers (fp32 both)
        best = min(log, key=lambda e: e["score"])
        assert r["gender_acc"] == best["gender_acc"] and r["age_mae"] == pytest.approx(best["age_mae"], abs=0.01)
        assert r["cs5"] == best["cs5"]
        config = json.loads((run_dir / "config.json").read_text())
        # the recipe reached train.py, and --quick's batch overrode the recipe's
        assert config["config"] == (str(REPO / run.recipe) if run.recipe else None)
        options = {k.replace("-", "_"): v for k, v in reproduce.recipe_of(run).items() if k != "batch-size"}
        assert {k: r[k] for k in options} == options
        assert config["batch_size"] == reproduce.QUICK_BATCH and config["limit"] == reproduce.QUICK_LIMIT
        assert config["pretrained"] == "none" and config["device_used"] == "cpu"
        assert f"| {run.name} | {run.size}x{run.size} |" in (out / "results.md").read_text()
    assert (out / "mae_by_age.png").read_bytes()[:4] == b"\x89PNG"
    # the identity split's faces are the 112 px image split's files, not a second MTCNN pass
    identity, image = out / "data" / "112_identity" / "faces", out / "data" / "112_image" / "faces"
    faces = sorted(identity.rglob("*.jpg"))
    assert faces and all(f.stat().st_ino == (image / f.relative_to(identity)).stat().st_ino for f in faces)


def test_second_run_redoes_nothing(killed_then_rerun, crop):
    """`make reproduce` over a finished OUT: no stage runs, no run or data file changes."""
    out, _, _ = killed_then_rerun
    stamps = {p: p.stat().st_mtime_ns for d in ("runs", "data") for p in (out / d).rglob("*")}
    results = (out / "results.json").read_text()
    venv = Path(sys.executable).parent.parent  # the venv running the tests; -o: it is installed, never reinstall
    r = subprocess.run(["make", "reproduce", f"VENV={venv}", "-o", f"{venv}/.installed",
                        f"REPRO_ARGS={shlex.join(arguments(crop, out))}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "\nrun: " not in r.stdout
    assert len(re.findall(r"^== .*, skipped$", r.stdout, re.M)) == len(reproduce.data_dirs(RUNS)) + 2 * len(RUNS)
    assert {p: p.stat().st_mtime_ns for d in ("runs", "data") for p in (out / d).rglob("*")} == stamps
    assert (out / "results.json").read_text() == results


def test_out_of_another_mode_is_refused(killed_then_rerun, crop):
    """The quick runs must never be resumed into the real table: same OUT without --quick stops before any stage."""
    out, _, _ = killed_then_rerun
    with pytest.raises(UserError, match="with --quick"):
        reproduce.main(["--root", str(crop), "--out", str(out), "--epochs", str(EPOCHS)])


def test_runs_pick_rows_in_the_table_s_order_and_only_their_data_dirs():
    names = ["mv_112", "3_r18_112_l2", "mv_112"]
    args = reproduce.parse_args(["--runs", *names])
    assert [run.name for run in args.runs] == ["3_r18_112_l2", "mv_112"]
    assert reproduce.data_dirs(args.runs) == [(112, "image")]
    assert reproduce.data_dirs(reproduce.parse_args([]).runs) == list(reproduce.DATA_DIRS)
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--runs", "6_r18_112_l1"])


def test_failed_stage_names_its_command_and_dir(tmp_path):
    empty = tmp_path / "crop"
    empty.mkdir()
    r = subprocess.run(command(empty, tmp_path / "out"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no imdb.mat or wiki.mat" in r.stderr  # pre_process.py's own message streams through
    assert f"error: pre-process 112 px, split image failed (exit code 2): {sys.executable} " in r.stderr
    assert not (tmp_path / "out" / "reproduce.json").exists()  # a mistyped --root marks OUT for nothing
    assert f"pre_process.py --root {empty} --out {tmp_path / 'out' / 'data' / '112_image'}" in r.stderr
    assert "rerun reproduce.py" in r.stderr
    assert not (tmp_path / "out" / "runs").exists()  # stopped at the failed stage


def test_readme_table_is_the_runs_table():
    """README's Reference results quotes the original's numbers that reproduce.py puts beside ours."""
    section = (REPO / "README.md").read_text().split("## Reference results")[1].split("\n## ")[0]
    assert "python reproduce.py --root data/imdb_crop --out runs/reproduce" in section
    for i, run in enumerate(r for r in reproduce.RUNS if r.original_gender_acc is not None):
        row = next(line for line in section.splitlines() if line.startswith(f"| {i + 1} |"))
        assert f"{run.size}x{run.size}" in row and f"{100 * run.original_gender_acc:.3f}%" in row
        if run.original_age_mae is not None:
            assert f"{run.original_age_mae:.3f}" in row


def test_a_root_given_relative_reaches_pre_process_absolute(tmp_path, monkeypatch):
    """summary.json records --root as pre_process.py is given it: a relative one, read from another folder, named
    other photos, and reproduce.py then said to delete the data dir."""
    commands = []
    monkeypatch.setattr(reproduce, "run_stage", lambda title, cmd, where: commands.append(cmd))
    monkeypatch.chdir(tmp_path)
    reproduce.pre_process_all(reproduce.parse_args(["--root", "crop", "--out", "out", "--runs", RUNS[0].name]))
    assert commands and commands[0][commands[0].index("--root") + 1] == str(tmp_path / "crop")


def test_a_data_dir_a_rerun_went_over_is_still_complete(killed_then_rerun, tmp_path):
    """pre_process.py rerun over a finished data dir rewrites summary.json and keeps labels.csv and the arrays that
    are current: still complete (it was judged unfinished, and pre-processed again at every invocation). Without an
    array's list (a kill between the two files) it is not."""
    out, _, _ = killed_then_rerun
    data = tmp_path / "112_image"
    shutil.copytree(out / "data" / "112_image", data)  # copy2: the times too
    summary = data / "summary.json"
    os.utime(summary, ns=(summary.stat().st_atime_ns, summary.stat().st_mtime_ns + 10**9))
    crop = Path(json.loads(summary.read_text())["settings"]["root"])
    assert reproduce.data_complete(data, crop, 112, "image")
    (data / "faces_valid.json").unlink()
    assert not reproduce.data_complete(data, crop, 112, "image")


def test_a_run_of_other_settings_is_refused_not_mixed_into_the_table(killed_then_rerun, crop, capsys):
    """Another --epochs would have resumed the finished runs with a stretched schedule (or skipped them, fewer):
    the first run's dir is named with what differs, before anything is trained."""
    out, _, _ = killed_then_rerun
    argv = arguments(crop, out)
    argv[argv.index("--epochs") + 1] = str(EPOCHS + 1)
    with pytest.raises(UserError, match=rf"{out / 'runs' / RUNS[0].name} was trained with other settings \(epochs "
                                        rf"{EPOCHS} there, {EPOCHS + 1} now\)"):
        reproduce.main(argv)
    assert "\nrun: " not in capsys.readouterr().out


def test_a_run_killed_in_its_calibration_is_resumed_to_finish_it(killed_then_rerun, crop):
    """train.py's last step fits the gender temperature into best.pt: a run killed there has every epoch logged, and
    was skipped as finished, uncalibrated; reproduce.py resumes it, and train.py only calibrates."""
    out, _, _ = killed_then_rerun
    best = out / "runs" / RUNS[0].name / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt.pop("calibrated")
    torch.save(ckpt, best)
    r = subprocess.run(command(crop, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"== train {RUNS[0].name}, resuming after epoch {EPOCHS}" in r.stdout
    assert f"already trained {EPOCHS} epochs, nothing to do" in r.stdout
    assert torch.load(best, weights_only=True)["calibrated"]
