"""train.py end to end on a tiny learnable data dir (32x32 faces), on the CPU."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import data_gen
import train
import utils
from data_gen import make_loader, preprocess
from metrics import compute_metrics
import models
import reproduce
from models import load_checkpoint
from test_data_gen import make_fake_data
from test_face import OpCount
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
    return compute_metrics(model.predict_age(age_out).numpy(), np.array([int(r[3]) for r in rows]),
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
    assert set(ckpt) == {"model", "model_args", "optimizer", "epoch", "best", "config", "metrics"}
    assert_logged(recomputed_metrics(run / "last.pt", data), read_jsonl(run / "metrics.jsonl")[-1])


def test_resume_continues_where_it_stopped(run, data, tmp_path):
    """1 epoch, then --resume to 2: the same losses and the same final weights and optimizer as 2 epochs at once."""
    train.main(args(data, tmp_path, "--epochs", 1))
    train.main(args(data, tmp_path, "--resume", tmp_path / "last.pt"))
    log, straight = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["train_loss"] for r in log] == pytest.approx([r["train_loss"] for r in straight], abs=1e-5)
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in straight])
    resumed, once = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path, run))
    for a, b in zip(resumed["optimizer"]["state"].values(), once["optimizer"]["state"].values()):
        assert torch.allclose(a["momentum_buffer"], b["momentum_buffer"], atol=1e-5)
    for key, value in once["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-5), key


def test_resume_refuses_other_settings(run, data, tmp_path):
    with pytest.raises(UserError, match="settings differ: arch 'resnet18' in the checkpoint, 'resnet34' now"):
        train.main(args(data, tmp_path, "--epochs", 3, "--arch", "resnet34", "--resume", run / "last.pt"))
    with pytest.raises(UserError, match="already trained 2 epochs; pass --epochs 2 or more"):
        train.main(args(data, tmp_path, "--epochs", 1, "--resume", run / "last.pt"))
    with pytest.raises(UserError, match="--resume .*nothere.pt: not found"):
        train.main(args(data, tmp_path, "--resume", tmp_path / "nothere.pt"))


def test_resuming_a_finished_run_repairs_its_log_and_trains_nothing(run, data, tmp_path, capsys):
    """Killed between the last epoch's checkpoint and its metrics line: a resume completes the log, trains nothing."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    log = copy / "metrics.jsonl"
    # the last line never written, or cut short by a full disk
    log.write_text(log.read_text().splitlines(keepends=True)[0] + '{"age_mae": 27.8, "cs5"')
    best = train.main(args(data, copy, "--resume", copy / "last.pt"))
    assert "already trained 2 epochs, nothing to do" in capsys.readouterr().out
    assert read_jsonl(log) == read_jsonl(run / "metrics.jsonl")
    assert (copy / "best.pt").read_bytes() == (run / "best.pt").read_bytes()  # calibrated: left as it is
    # killed in the calibration at the end: best.pt as save_epoch wrote it; the resume calibrates it
    raw = torch.load(copy / "best.pt", weights_only=True)
    raw.pop("calibrated")
    raw["model_args"]["gender_temperature"] = 1.0
    torch.save(raw, copy / "best.pt")
    train.main(args(data, copy, "--resume", copy / "last.pt"))
    assert "gender temperature" in capsys.readouterr().out
    calibrated = torch.load(copy / "best.pt", weights_only=True)
    assert calibrated["calibrated"] and calibrated["model_args"]["gender_temperature"] == pytest.approx(
        torch.load(run / "best.pt", weights_only=True)["model_args"]["gender_temperature"], rel=1e-3)
    assert best == torch.load(run / "last.pt", weights_only=True)["best"]
    assert torch.load(copy / "last.pt", weights_only=True)["epoch"] == 2
    # into another --out: nothing to train, so nothing written there (a log alone would pass for a run)
    assert train.main(args(data, tmp_path / "other", "--resume", copy / "last.pt")) == best
    assert f"nothing to do (pass --epochs above that to train on); nothing written to {tmp_path / 'other'}" in \
        capsys.readouterr().out
    assert not (tmp_path / "other").exists()


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
    save_epoch, loss = train.save_epoch, models.AgeGenderNet.loss
    monkeypatch.setattr(train, "save_epoch", lambda *a: (save_epoch(*a), saved.append(1)))
    monkeypatch.setattr(models.AgeGenderNet, "loss", lambda *a: loss(*a) * (float("nan") if saved else 1.0))
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


@pytest.mark.parametrize("argv, said", [
    (["--prefetch", "-1"], "--prefetch must be 0 or more"),
    (["--profile", "-1"], "--profile must be 0 or more"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more"),
    (["--momentum", "-0.5"], "--momentum must be 0 or more"),
    (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
    (["--limit", "-1"], "--limit must be 0 or more"),
    (["--lr", "0"], "--lr must be above 0"),
])
def test_an_option_out_of_its_range_names_itself(argv, said, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert f"error: {said}" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_the_run(monkeypatch):
    monkeypatch.chdir(REPO)
    for out in ("README.md", "README.md/run"):
        with pytest.raises(UserError, match=rf"^--out {out}: README.md is a file, not a folder"):
            train.parse_args(["--out", out])


def test_resume_of_a_file_that_is_no_last_pt_says_so(tmp_path):
    """A model's bare state dict (or another script's file) is refused in one line, not with a KeyError."""
    torch.save(models.build_model("resnet18", "l1", "none").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UserError, match=r"weights.pt: not a last.pt of train.py \(it lacks model, optimizer, epoch, "
                                        r"best, config\)"):
        train.parse_args(["--resume", str(tmp_path / "weights.pt")])


def test_one_process_on_cuda_n_makes_it_the_current_device(monkeypatch):
    """torch.cuda.graph and current_stream() without a device use the current one: --device cuda:1 alone must make
    cuda:1 current, or --cuda-graph would capture on cuda:0 what runs on cuda:1 (torchrun's processes did already)."""
    current = []

    def set_device(device):  # as torch's: an index or an indexed device (plain "cuda" raised a ValueError)
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        current.append(device)

    monkeypatch.setattr(train, "pick_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert train.init_distributed("cuda:1") == (0, 1, torch.device("cuda:1"))
    assert current == [torch.device("cuda:1")]
    assert train.init_distributed("cuda") == (0, 1, torch.device("cuda"))  # the current device: nothing to set
    assert train.init_distributed("cpu")[2] == torch.device("cpu") and len(current) == 1


# --- resuming under other settings, precision, scale, placement ----------------------------------

def test_resume_with_another_batch_size_and_more_epochs_follows_the_new_schedule(data, tmp_path, capsys):
    """Stopped after 1 epoch at batch 8, resumed at batch 16 for 4 epochs: epochs 2-4 get the learning rates of a
    straight 4-epoch run at batch 16 (not the old run's step count, which once left lr at 0), and the run says so."""
    straight = tmp_path / "straight"
    train.main(args(data, straight, "--epochs", 4))
    resumed = tmp_path / "resumed"
    train.main(args(data, resumed, "--epochs", 1, "--batch-size", 8))
    capsys.readouterr()
    train.main(args(data, resumed, "--epochs", 4, "--resume", resumed / "last.pt"))
    said = capsys.readouterr().out
    assert "resuming after epoch 1 with global_batch 8 -> 16; epochs 1 -> 4" in said
    assert f"\nfaces from {data / 'faces_train.npy'} (packed)\n" in said  # the line after the start's
    assert "the learning rate goes from 0.0025 to 0.005" in said  # the peak at batch 8, then at 16
    lrs = [r["lr"] for r in read_jsonl(resumed / "metrics.jsonl")]
    want = [r["lr"] for r in read_jsonl(straight / "metrics.jsonl")]
    assert lrs[1:] == pytest.approx(want[1:]) and min(lrs[1:3]) > 0


def test_a_resume_goes_on_with_the_run_s_options_unless_given_new_ones(data, tmp_path, capsys):
    """--resume alone (no --config, --data or --out) goes on as the run was trained, in its folder: a recipe run
    resumed without its recipe once fell back to the default age weight, and without --out into runs/r18_112."""
    recipe, out = tmp_path / "r.toml", tmp_path / "run"
    recipe.write_text("age-weight = 0.5\nseed = 3\nbatch-size = 8\n")
    train.main(["--config", str(recipe), "--data", str(data), "--out", str(out), "--pretrained", "none",
                "--device", "cpu", "--workers", "0", "--epochs", "1"])
    capsys.readouterr()
    train.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--device", "cpu"])
    assert "resuming with" not in capsys.readouterr().out  # nothing changed but the epochs
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["age_weight"], cfg["seed"], cfg["batch_size"], cfg["data"], cfg["pretrained"], cfg["out"],
            cfg["config"]) == (0.5, 3, 8, str(data), "none", str(out), str(recipe))  # the recipe's path: provenance
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    train.main(["--resume", str(out / "last.pt"), "--epochs", "3", "--seed", "4", "--age-weight", "0.2",
                "--device", "cpu"])
    assert "resuming with age_weight 0.5 -> 0.2; seed 3 -> 4 (the rest as the run was trained)" in capsys.readouterr().out
    # the machine's own settings are this machine's defaults, not the first run's --device cpu and --workers 0; the
    # device used and the precision are said where they change
    train.main(["--resume", str(out / "last.pt"), "--epochs", "4"])
    assert "resuming with" not in capsys.readouterr().out  # --device auto is this CPU, in the same precision
    assert json.loads((out / "config.json").read_text())["workers"] == config.NUM_WORKERS
    native = train.cpu_has_bf16()
    train.main(["--resume", str(out / "last.pt"), "--epochs", "5", "--no-amp-cpu" if native else "--amp-cpu"])
    assert f"resuming with amp_enabled {native} -> {not native} (the rest" in capsys.readouterr().out


def test_a_resume_can_lift_a_smoke_run_s_limit_and_leave_its_random_faces(data, tmp_path, capsys):
    """--limit 0 (all) and --data take a resumed --dummy --limit run over the whole data dir; the limit could not
    be lifted, and a --data beside the resumed --dummy was dropped without a word."""
    smoke = tmp_path / "smoke"
    train.main(["--dummy", "32", "--limit", "32", "--out", str(smoke), "--pretrained", "none", "--device", "cpu",
                "--batch-size", "16", "--epochs", "1"])
    capsys.readouterr()
    train.main(["--resume", str(smoke / "last.pt"), "--epochs", "2", "--data", str(data), "--limit", "0"])
    said = capsys.readouterr().out
    assert f"faces from {data / 'faces_train.npy'} (packed)" in said
    assert "data None -> " in said and "dummy 32 -> None" in said and "limit 32 -> None" in said
    cfg = json.loads((smoke / "config.json").read_text())
    assert (cfg["dummy"], cfg["limit"], cfg["data"]) == (None, None, str(data))


def test_resume_takes_momentum_and_weight_decay_from_the_options(run, data, tmp_path):
    train.main(args(data, tmp_path, "--epochs", 3, "--momentum", 0.5, "--weight-decay", 0.001,
                    "--resume", run / "last.pt"))
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["momentum"], g["weight_decay"]) for g in groups] == [(0.5, 0.001), (0.5, 0.0)]
    # resumed into another folder: it holds the whole run's log and a best.pt, whichever epoch was best
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert read_jsonl(tmp_path / "metrics.jsonl")[:2] == read_jsonl(run / "metrics.jsonl")
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] in (1, 2, 3)


def test_a_run_resumed_into_another_out_starts_it_with_the_best_so_far(tmp_path, capsys):
    """OUT must end with a best.pt even when the resumed epochs never beat the best so far (the calibration at the end
    reads it): the run's best.pt beside last.pt is copied into a new OUT; without it the best starts over."""
    run, ckpt = tmp_path / "run", dict(epoch=3, best=dict(epoch=2, score=1.0))
    run.mkdir()
    torch.save(ckpt, run / "last.pt")
    torch.save(dict(epoch=2, model={"w": torch.ones(2)}), run / "best.pt")
    assert train.best_in_out(run / "last.pt", run, ckpt) is ckpt["best"]  # in place: its best.pt is there already
    assert train.best_in_out(run / "last.pt", tmp_path / "new", ckpt) is ckpt["best"]
    assert (tmp_path / "new" / "best.pt").read_bytes() == (run / "best.pt").read_bytes()
    torch.save(dict(epoch=1), run / "best.pt")  # not the best the checkpoint names
    assert train.best_in_out(run / "last.pt", tmp_path / "other", ckpt) is None
    assert not (tmp_path / "other" / "best.pt").exists() and "not epoch 2, the best so far" in capsys.readouterr().err
    (run / "best.pt").unlink()  # last.pt moved alone
    assert train.best_in_out(run / "last.pt", tmp_path / "other", ckpt) is None


@pytest.mark.parametrize("stale", [True, False])
@pytest.mark.parametrize("own_folder", [True, False])
def test_a_resume_mends_a_best_pt_a_kill_left_behind(tmp_path, stale, own_folder):
    """Killed after last.pt, before best.pt, in an epoch that was the best: best.pt is an older epoch's (or none, in
    a new folder); the resume writes the checkpoint as best.pt, in its folder or into another --out."""
    run, ckpt = tmp_path / "run", dict(epoch=3, best=dict(epoch=3, score=1.0), model={"w": torch.ones(2)})
    run.mkdir()
    torch.save(ckpt, run / "last.pt")
    if stale:
        torch.save(dict(epoch=2, model={"w": torch.zeros(2)}), run / "best.pt")
    out = run if own_folder else tmp_path / "other"
    out.mkdir(exist_ok=True)
    assert train.best_in_out(run / "last.pt", out, ckpt) is ckpt["best"]
    mended = torch.load(out / "best.pt", weights_only=True)
    assert mended["epoch"] == 3 and torch.equal(mended["model"]["w"], torch.ones(2))


def test_bf16_training_validates_what_evaluate_reproduces(data, tmp_path):
    """With bf16 autocast (--amp-cpu) validation still runs in fp32, so the logged metrics, which choose best.pt,
    are the ones load_checkpoint + preprocess (evaluate.py's path, fp32) recompute."""
    out = tmp_path / "bf16"
    train.main(args(data, out, "--epochs", 1, "--amp-cpu", "--age-loss", "ce"))
    assert json.loads((out / "config.json").read_text())["amp_enabled"]
    assert_logged(recomputed_metrics(out / "last.pt", data), read_jsonl(out / "metrics.jsonl")[-1])


@pytest.mark.parametrize("kind", models.AGE_LOSSES)
def test_every_age_loss_trains_at_the_gpu_batch_and_its_scaled_lr(tmp_path_factory, tmp_path, kind):
    """Batch 256 with the lr scaled for a global batch of 1024 (peak 0.32), each loss at its default weight: no nan
    or inf. l2 at 0.1 in years^2, or its loss in years without models' gradient scaling of the head, diverges here."""
    big = tmp_path_factory.getbasetemp() / "big"
    if not (big / "labels.csv").is_file():
        make_fake_data(big, n_train=512, n_valid=16, pack=True)
    train.main(args(big, tmp_path, "--batch-size", config.BATCH_SIZE_CUDA, "--lr", 0.01 * 1024 / 256,
                    "--age-loss", kind, "--log-every", 1, "--warmup-epochs", 0.5))
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert json.loads((tmp_path / "config.json").read_text())["peak_lr"] == pytest.approx(0.32)
    assert all(np.isfinite([r["train_loss"], r["val_loss"], r["age_mae"]]).all() for r in log)


def test_cuda_graph_on_the_cpu_is_the_eager_step(run, data, tmp_path):
    """--cuda-graph is ignored on the CPU (as --amp is): the same seeded run, the same loss; the option is recorded."""
    train.main(args(data, tmp_path, "--epochs", 1, "--cuda-graph"))
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"] == read_jsonl(run / "metrics.jsonl")[0]["train_loss"]
    assert json.loads((tmp_path / "config.json").read_text())["cuda_graph"] is True
    opts = train.parse_args(["--cuda-graph"])
    train.resolve_batch(opts, 1, torch.device("cpu"))
    model = models.build_model("resnet18", "l1")
    step = train.make_step(model, model.loss, train.make_optimizer(model, 0.1, 0.9, 0.0), lambda: None, opts,
                           torch.device("cpu"))
    assert type(step) is train.Step


def test_cuda_graph_refuses_torchrun_and_compile():
    """A captured step cannot hold DDP's all-reduce, and torch.compile brings its own graphs: both refused, saying
    what to do (checked before any CUDA work, so a device object is enough)."""
    cuda = torch.device("cuda")
    with pytest.raises(UserError, match="--cuda-graph: one process only, not 2 under torchrun"):
        train.check_cuda_graph(train.parse_args(["--cuda-graph"]), 2, cuda)
    with pytest.raises(UserError, match="--cuda-graph with --compile: choose one.*reduce-overhead"):
        train.check_cuda_graph(train.parse_args(["--cuda-graph", "--compile"]), 1, cuda)
    train.check_cuda_graph(train.parse_args(["--cuda-graph", "--compile"]), 2, torch.device("cpu"))  # ignored there
    train.check_cuda_graph(train.parse_args(["--no-cuda-graph", "--compile"]), 2, cuda)


class HostReads(OpCount):
    """Counts the ops, dispatched in this thread, that read a tensor's values on the host: .item() and bool() (through
    _local_scalar_dense) and the ops whose output size depends on the values. On a GPU each waits for the queue of
    launched kernels. (.tolist(), .numpy() and .cpu() of a CPU tensor dispatch nothing, so they go uncounted.)"""

    def __init__(self) -> None:
        super().__init__({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                          "repeat_interleave", "equal", "is_nonzero"})


def epoch_under(watch, data, device: str, faces: int, log_every: int, age_loss: str = "l1", *extra) -> int:
    """One epoch of train_one_epoch over the first `faces` training faces (batch 8, resnet18, the packed loader in
    this thread), only it inside the context manager `watch`; returns its steps."""
    opts = train.parse_args(args(data, "unused", "--device", device, "--batch-size", 8, "--limit", faces,
                                 "--log-every", log_every, "--prefetch", 0, "--age-loss", age_loss, *extra))
    dev = torch.device(device)
    train.resolve_batch(opts, 1, dev)
    loader = make_loader(opts.data, "train", True, batch_size=8, device=dev, workers=0, seed=0, rank=0, world_size=1,
                         jpeg=False, limit=faces, prefetch=0)
    loader.set_epoch(1)
    model = models.build_model("resnet18", age_loss, "none").to(dev, memory_format=train.memory_format_of(opts))
    step = train.make_step(model, model.loss, train.make_optimizer(model, 0.01, 0.9, 5e-4),
                           train.make_autocast(opts, dev)[1], opts, dev)
    with utils.CtrlCBetweenSteps() as ctrl_c, watch:
        train.train_one_epoch(step, loader, opts, 1, 1, None, ctrl_c, train.StepProfiler())
    return len(loader)


@pytest.mark.parametrize("age_loss", models.AGE_LOSSES)
def test_an_epoch_reads_the_device_only_when_it_logs(data, age_loss):
    """Issue 10: no host sync inside an epoch but at the logging steps. One epoch (the packed loader, the step, every
    age loss): the values read on the host do not grow with the steps, and logging at every step reads at every step
    what the epoch's last step reads. tests/test_cuda.py counts the GPU's own syncs the same way."""
    def host_reads(faces: int, log_every: int) -> tuple[int, int]:
        reads = HostReads()
        return epoch_under(reads, data, "cpu", faces, log_every, age_loss), reads.count

    (few_steps, few), (many_steps, many) = host_reads(16, 1000), host_reads(48, 1000)
    assert (few_steps, many_steps) == (2, 6)
    assert 0 < few == many  # the last step logs: the nan check and the running loss
    assert host_reads(48, 1) == (6, 6 * few)


def test_a_recipe_sets_options_and_the_command_line_overrides_it(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('# a comment\narch = "resnet50"\nage-loss = "ce"\nbatch-size = 32\namp = false\njpeg = true\n'
                      'lr = 0.02\n')
    a = train.parse_args(["--config", str(recipe)])
    assert (a.arch, a.age_loss, a.batch_size, a.amp, a.jpeg, a.lr, a.config) == (
        "resnet50", "ce", 32, False, True, 0.02, str(recipe))
    assert a.age_weight == config.AGE_WEIGHT and a.epochs == config.EPOCHS  # the rest: train.py's defaults
    b = train.parse_args(["--batch-size", "8", "--amp", f"--config={recipe}", "--arch", "resnet18"])
    assert (b.arch, b.batch_size, b.amp, b.age_loss, b.jpeg) == ("resnet18", 8, True, "ce", True)


@pytest.mark.parametrize("text, match", [
    ('archh = "resnet18"\n', r"'archh' is not an option of this script"),
    ('config = "other.toml"\n', r"'config' is not an option of this script"),
    ('amp = "yes"\n', r"amp = 'yes': expected true or false"),
    ('lr = [0.1]\n', r"lr = \[0.1\]: expected a number or a string"),
    ('arch = resnet18\n', "not a readable TOML file"),
])
def test_a_bad_recipe_is_a_user_error_naming_the_file_and_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        train.parse_args(["--config", str(path)])
    assert str(e.value).startswith(f"--config {path}: ")


@pytest.mark.parametrize("text, match", [
    ('arch = "resnet99"\n', r"arch = 'resnet99': expected one of resnet18, resnet34, resnet50$"),
    ('epochs = 6.5\n', r"epochs = 6.5: expected int$"),
    ('batch-size = "abc"\n', r"batch-size = 'abc': expected int$"),
])
def test_a_recipe_s_values_meet_the_options_checks_naming_the_file(tmp_path, text, match):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as e:  # argparse's own error named no file
        train.parse_args(["--config", str(path)])
    assert str(e.value).startswith(f"--config {path}: ")


def test_a_recipe_s_file_must_exist():
    with pytest.raises(UserError, match=r"--config nope.toml: not found; .* e.g. one of configs/dex.toml, "):
        train.parse_args(["--config", "nope.toml"])


def test_every_shipped_recipe_parses_and_reproduce_names_them():
    recipes = sorted((REPO / "configs").glob("*.toml"))
    assert len(recipes) >= 6
    for path in recipes:
        assert train.parse_args(["--config", str(path)]).config == str(path)
    named = {r.recipe for r in reproduce.RUNS if r.recipe}
    assert named <= {str(p.relative_to(REPO)) for p in recipes}  # each row's recipe ships


def test_dummy_trains_on_random_faces_without_a_data_dir(tmp_path, monkeypatch):
    """--dummy: the whole run (loader, step, validation, checkpoints) without --data, on seeded random faces."""
    monkeypatch.setattr(config, "DUMMY_FACES", 48)
    monkeypatch.setattr(config, "DUMMY_VALID", 16)
    common = ["--out", str(tmp_path / "run"), "--pretrained", "none", "--device", "cpu", "--batch-size", "16",
              "--data", str(tmp_path / "nothing here"), "--epochs", "1"]
    train.main(common + ["--dummy", "32"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["dummy"], cfg["size"], cfg["data"]) == (32, 32, None)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    model, saved = load_checkpoint(tmp_path / "run" / "best.pt", "cpu")
    assert saved["dummy"] == 32 and model(torch.zeros(1, 3, 32, 32))[0].shape == (1, 2)
    # the same faces in every process and run (seeded), other ones in the other split
    a, b, v = (make_loader(None, split, False, 16, dummy=32) for split in ("train", "train", "valid"))
    x_a, x_b, x_v = (next(iter(loader))[0] for loader in (a, b, v))
    assert torch.equal(x_a, x_b) and not torch.equal(x_a, x_v) and x_a.shape == (16, 3, 32, 32)
    assert train.parse_args(["--dummy"]).dummy == config.SIZE
    for bad in (["--dummy", "16"], ["--dummy", "--jpeg"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_profile_records_its_steps_in_every_thread(data, tmp_path, monkeypatch):
    """--profile N: N steps after PROFILE_SKIP, the loader's prefetching thread apart from the one running the step."""
    monkeypatch.setattr(config, "PROFILE_SKIP", 1)  # the data's 16 steps an epoch: 1 skipped, 1 warming up, 8 recorded
    out = tmp_path / "run"
    train.main(args(data, out, "--epochs", 1, "--batch-size", 4, "--profile", 8))
    summary = json.loads((out / "profile.json").read_text())
    assert (summary["steps"], summary["skipped"], summary["device_busy_ms"]) == (8, 1, None)  # None: the CPU
    threads = {t["thread"]: t["ops_ms"] for t in summary["threads"]}
    assert threads["main"] > threads["loader"] > 0 and summary["prepare_batch_ms"] > 0
    assert summary["step_ms"] > threads["main"]
    text = (out / "profile.txt").read_text()
    assert text.startswith("8 steps recorded after 1: ") and "aten::convolution" in text
    with gzip.open(out / "profile_trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    tids = {name: {e["tid"] for e in events if e.get("name", "").startswith(name)}
            for name in ("ProfilerStep", data_gen.PREPARE_LABEL, data_gen.WAIT_LABEL)}
    assert len(tids["ProfilerStep"]) == 1 and tids[data_gen.WAIT_LABEL] == tids["ProfilerStep"]
    assert tids[data_gen.PREPARE_LABEL] and tids[data_gen.PREPARE_LABEL].isdisjoint(tids["ProfilerStep"])
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    with pytest.raises(UserError, match="--profile 15: an epoch has 16 steps, fewer than the 2 run first"):
        train.main(args(data, tmp_path / "short", "--batch-size", 4, "--profile", 15))


def test_profile_summary_counts_a_gpu_s_kernels_once_and_its_annotations_not_at_all():
    """On a GPU the profiler also draws the steps and labels on the device's timeline, and an op's device time is
    its kernels': a step of 1 ms whose one kernel ran 0.4 ms is 40% busy (not 80%, nor 140%)."""
    from torch.autograd.profiler_util import FunctionEvent, Kernel

    def event(i, name, thread, start, end, **kw):
        return FunctionEvent(i, name, thread, start, end, use_device="cuda", **kw)

    step, mm = event(1, "ProfilerStep#12", 1, 0, 1000), event(2, "aten::mm", 1, 100, 300)
    mm.kernels.append(Kernel("gemm", 0, 400))
    wait, prepare, copy = (event(3, data_gen.WAIT_LABEL, 1, 400, 500), event(4, data_gen.PREPARE_LABEL, 2, 0, 600),
                           event(5, "aten::copy_", 2, 100, 350))
    step.cpu_children, prepare.cpu_children = [mm, wait], [copy]
    on_device = [event(6, "ProfilerStep#12", 9, 0, 1000, device_type=torch.autograd.DeviceType.CUDA,
                       is_user_annotation=True),
                 event(7, "gemm", 9, 150, 550, device_type=torch.autograd.DeviceType.CUDA)]
    s = train.profile_summary([step, mm, wait, prepare, copy, *on_device], cuda=True)
    assert (s["steps"], s["step_ms"], s["device_busy_ms"], s["device_busy_share"]) == (1, 1.0, 0.4, 0.4)
    assert (s["prepare_batch_ms"], s["wait_for_batch_ms"]) == (0.6, 0.1)
    assert s["threads"] == [dict(thread="loader", ops_ms=0.25), dict(thread="main", ops_ms=0.2)]
    assert "busy 0.40 ms (40%" in train.profile_text(s)
    assert "no kernel recorded" in train.profile_text(train.profile_summary([step, mm, wait, prepare, copy], cuda=True))


def test_checkpoints_hold_the_lr_as_a_number(tmp_path):
    """The captured step keeps the lr in a device tensor; last.pt still holds a plain float (and the optimizer keeps its tensor)."""
    from tensorboardX import SummaryWriter

    model = models.build_model("resnet18", "l1")
    optimizer = train.make_optimizer(model, 0.1, 0.9, 5e-4)
    lr = torch.tensor(0.05)
    for group in optimizer.param_groups:
        group["lr"] = lr
    record = dict(epoch=1, score=1.0, gender_acc=0.5, age_mae=1.0, cs5=0.5, train_loss=1.0, val_loss=1.0, lr=0.05,
                  seconds=1.0, train_images_per_s=1.0)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        train.save_epoch(tmp_path, writer, record, True, record, {}, model, optimizer)
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [type(g["lr"]) for g in groups] == [float, float] and groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.param_groups[0]["lr"] is lr


def test_default_batch_is_the_devices(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "--epochs", 1)[:8] + ["--workers", "0", "--epochs", "1"])  # no --batch-size
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == config.BATCH_SIZE_CPU
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    said = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert f"(default: {config.BATCH_SIZE_CUDA} on CUDA, {config.BATCH_SIZE_CPU} on the CPU;" in said


def test_default_age_weight_is_the_originals_per_loss():
    """l2's loss is in years^2: it defaults to the original's 0.01, which trains at the GPU batch's lr
    (test_every_age_loss_trains_at_the_gpu_batch_and_its_scaled_lr) where 0.1 diverges."""
    assert train.parse_args([]).age_weight == config.AGE_WEIGHT == 0.1
    assert train.parse_args(["--age-loss", "l2"]).age_weight == config.AGE_WEIGHT_L2 == 0.01
    assert [train.parse_args(["--age-loss", k]).age_weight for k in ("ce", "dex", "mv")] == [config.AGE_WEIGHT] * 3
    assert train.parse_args(["--age-loss", "l2", "--age-weight", "0.5"]).age_weight == 0.5


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_the_cpu_defaults_to_what_the_cpu_computes_natively(monkeypatch, has_bf16):
    """Emulated bf16 trained ResNet-18 ~15x slower than fp32 on a CPU without bf16 instructions: off there."""
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: has_bf16)
    assert train.parse_args([]).amp_cpu is has_bf16
    amp, autocast = train.make_autocast(train.parse_args([]), torch.device("cpu"))
    with autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert amp is has_bf16 and (product.dtype == torch.bfloat16) is has_bf16
    assert train.parse_args(["--amp-cpu"]).amp_cpu is True and train.parse_args(["--no-amp-cpu"]).amp_cpu is False
    assert train.make_autocast(train.parse_args(["--no-amp"]), torch.device("cpu"))[0] is False


def test_each_torchrun_process_takes_its_own_gpu():
    cuda = torch.device("cuda")
    assert utils.process_device(cuda, 4, 2) == torch.device("cuda", 2)
    assert utils.process_device(torch.device("cuda", 1), 1, 0) == torch.device("cuda", 1)  # one process: as asked
    assert utils.process_device(torch.device("cpu"), 4, 2) == torch.device("cpu")
    # pre_process.py's ranks share the GPUs there are: 4 processes on 2 GPUs take 0, 1, 0, 1
    assert [utils.process_device(cuda, 4, k, gpus=2).index for k in range(4)] == [0, 1, 0, 1]
    with pytest.raises(UserError, match="--device cuda:1 under torchrun.*pass --device cuda.*CUDA_VISIBLE_DEVICES"):
        utils.process_device(torch.device("cuda", 1), 2, 0)


def test_compile_wraps_ddp_not_the_reverse(tmp_path, monkeypatch):
    """DDP(compile(model)) cannot overlap the all-reduce with the compiled backward; compile(DDP(model)) can."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        opts = train.parse_args(["--compile"])
        model = train.wrap_model(models.build_model("resnet18", "l1"), opts, 2, torch.device("cpu"))
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(model._orig_mod, DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def test_the_start_says_where_the_faces_come_from(data, tmp_path):
    """Packed, or the JPEGs with the command that packs them (a data dir made with --no-pack), or --jpeg, or --dummy."""
    def said(data_dir, *extra):
        opts = train.parse_args(args(data_dir, tmp_path / "run", *extra))
        return train.faces_source(opts, make_loader(data_dir, "train", True, 16, jpeg=opts.jpeg, dummy=opts.dummy))

    assert said(data) == f"{data / 'faces_train.npy'} (packed)"
    assert said(data, "--jpeg") == f"the JPEGs under {data} (--jpeg)"
    assert said(data, "--dummy", "32") == "random 32x32 faces (--dummy)"
    unpacked = make_fake_data(tmp_path / "unpacked", n_train=16, n_valid=4)
    assert said(unpacked) == (f"the JPEGs under {unpacked}, as {unpacked / 'faces_train.npy'} is not there; "
                              f"`python pre_process.py --out {unpacked} --pack-only` packs them for the faster loader")


def test_compile_is_paid_once_a_run(data, tmp_path, monkeypatch):
    """--compile traces the training model once: the later epochs' steps, and validation (the raw model, in fp32),
    compile nothing more; dynamo's error_on_recompile raises if any does. The eager backend stands in for inductor:
    the guards that decide a recompile are dynamo's."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        train.main(args(data, tmp_path, "--compile"))
    finally:
        torch._dynamo.reset()  # the other tests of this process trace nothing of this one's
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters)  # the model was compiled, and only once
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == EPOCHS


def test_best_pt_holds_the_temperature_fitted_on_the_valid_split(tmp_path):
    """train.py's last step: one gender temperature fitted on the validation split, stored in best.pt only. Three
    validation genders are mislabelled: where every one is right no temperature fits (test_trust)."""
    from metrics import fit_temperature

    data = make_fake_data(tmp_path / "data", n_train=64, n_valid=16, pack=True)
    lines = (data / "labels.csv").read_text().splitlines(keepends=True)
    for i in (-1, -4, -9):  # gender is the fifth column
        cells = lines[i].split(",")
        lines[i] = ",".join(cells[:4] + [str(1 - int(cells[4]))] + cells[5:])
    (data / "labels.csv").write_text("".join(lines))
    run = tmp_path / "run"
    train.main(args(data, run))
    model, _ = load_checkpoint(run / "best.pt", "cpu")
    genders = np.array([int(line.split(",")[4]) for line in (data / "labels.csv").read_text().splitlines()[1:]
                        if line.endswith(",valid")])
    with torch.no_grad():
        logits = model(preprocess(np.load(data / "faces_valid.npy")))[0].numpy()
    stored = torch.load(run / "best.pt", weights_only=True)["model_args"]["gender_temperature"]
    assert stored != 1.0 and model.gender_temperature == stored
    assert stored == pytest.approx(fit_temperature(logits, genders), rel=1e-3)
    assert torch.load(run / "last.pt", weights_only=True)["model_args"]["gender_temperature"] == 1.0
