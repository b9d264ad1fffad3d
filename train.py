"""Train the age-and-gender network on a pre-processed data dir (pre_process.py's output).

    python train.py --data data/imdb_112 --out runs/r18_112
    torchrun --nproc_per_node=8 train.py --data data/imdb_112 --out runs/r18_112   # DDP, a shard per process
    python train.py --data data/imdb_112 --out runs/r18_112 --resume runs/r18_112/last.pt
    python train.py --config configs/original_r18_l1.toml --data data/imdb_112   # a recipe; flags override it
    torchrun --nproc_per_node=8 train.py --dummy --epochs 1 --out runs/smoke   # random faces: checks a new box

Every epoch trains on the train split, validates on the valid split and writes, in OUT:
  config.json    the resolved settings, the git commit and the torch version (at the start)
  metrics.jsonl  one line per epoch: epoch, gender_acc, age_mae, cs5, train_loss, val_loss, score,
                 lr, seconds, train_images_per_s
  last.pt        the latest epoch: model, model_args, optimizer, epoch, best, config, metrics
  best.pt        the same for the epoch with the lowest score = age_mae + BEST_GENDER_WEIGHT *
                 (1 - gender_acc), so 1 point of gender accuracy is worth 0.1 year of MAE (default)
  tb/            TensorBoard scalars: tensorboard --logdir OUT/tb
At the end, one gender temperature is fitted on the validation split and stored in best.pt
(model_args.gender_temperature): the probability demo/serve/evaluate show is then calibrated.
Checkpoints hold plain values and state dicts only: torch.load(path, weights_only=True) reads them.
A fresh run (no --resume) over an existing OUT starts its metrics.jsonl and tb/ over.
The learning rate is a function of the epochs done (warm-up, then cosine): a run resumed with another
batch size, GPU count or --epochs continues at the same point of the run with the current settings.
`python train.py --help` lists every option with its default (all from config.py).
"""
from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.autograd import DeviceType
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile, schedule
from tqdm import tqdm

import config
from data_gen import PREPARE_LABEL, WAIT_LABEL, JpegLoader, PackedLoader, make_loader, packed_path
from inference import calibrate_checkpoint
from metrics import TEMPERATURE_RANGE, MetricSums
from models import AGE_LOSSES, ARCHS, AgeGenderNet, build_model, is_calibrated, model_args_of
from utils import (CtrlCBetweenSteps, UserError, append_jsonl, argument_parser, atomic_torch_save, atomic_write_bytes,
                   atomic_write_text, check_least, check_output_folder, disk_full, git_commit, options_argv,
                   parse_with_recipe, pick_device, process_device, read_jsonl, run_main, seed_everything, write_json)

# settings a checkpoint cannot be resumed under if they change: they change the model or its input
RESUME_MUST_MATCH = ("arch", "age_loss", "size")
# settings a resume may change: the learning rate then follows the schedule they make (schedule_changes says how)
SCHEDULE_KEYS = ("global_batch", "lr", "warmup_epochs", "epochs", "momentum", "weight_decay")
# options a resume does not take from its checkpoint (it takes every other one the command line leaves out): where
# it goes on, what only one invocation asks for, and the machine's own (its device, bf16 on its CPU, its cores, the
# loader): a resume on another machine takes that one's defaults, and says where they differ
NOT_RESUMED = ("resume", "out", "profile", "device", "amp_cpu", "workers", "prefetch", "jpeg", "compile",
               "compile_mode", "cuda_graph")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="an experiment recipe: a TOML file of these options without their dashes, e.g. "
                        "configs/original_r18_l1.toml; the command line overrides it (default: none)")
    p.add_argument("--data", default=config.DATA, help="pre-processed data dir with labels.csv (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help=f"run directory (default: the --resume file's folder, else {config.OUT})")
    p.add_argument("--arch", default=config.ARCH, choices=ARCHS, help="backbone (default: %(default)s)")
    p.add_argument("--pretrained", default=config.PRETRAINED,
                   help="imagenet (torchvision download), none, or PATH to a local backbone state dict (default: %(default)s)")
    p.add_argument("--age-loss", default=config.AGE_LOSS, choices=AGE_LOSSES,
                   help="age head and loss, see models.py (default: %(default)s)")
    p.add_argument("--age-weight", type=float, default=None,
                   help=f"loss = gender CE + this * age loss, l1 in years, l2 in years^2 (default: {config.AGE_WEIGHT}; "
                        f"{config.AGE_WEIGHT_L2} with --age-loss l2)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step per process (default: {config.BATCH_SIZE_CUDA} on CUDA, "
                        f"{config.BATCH_SIZE_CPU} on the CPU; 32 is the original's)")
    p.add_argument("--epochs", type=int, default=config.EPOCHS, help="total epochs, counting resumed ones (default: %(default)s)")
    p.add_argument("--lr", type=float, default=config.LR,
                   help=f"peak learning rate at a global batch of {config.LR_BATCH}, scaled linearly (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=config.MOMENTUM, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=config.WEIGHT_DECAY,
                   help="on weights, not on norms and biases (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=config.WARMUP_EPOCHS,
                   help="linear warm-up, then cosine decay to 0, per step (default: %(default)s)")
    p.add_argument("--workers", type=int, default=config.NUM_WORKERS,
                   help="DataLoader workers of the JPEG path, per process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=config.SEED, help="init, data order and augmentation (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=config.AMP,
                   help="bf16 autocast on CUDA, and on the CPU with --amp-cpu; --no-amp: fp32 everywhere "
                        "(default: %(default)s)")
    p.add_argument("--amp-cpu", action=argparse.BooleanOptionalAction, default=config.AMP_CPU,
                   help="bf16 autocast on the CPU too (default: on where the CPU has bf16 instructions, "
                        "AVX512-BF16 or AMX; off elsewhere, where bf16 is emulated and slower than fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=config.CHANNELS_LAST,
                   help="NHWC memory format (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=config.COMPILE,
                   help="torch.compile the model (default: %(default)s)")
    p.add_argument("--compile-mode", default=config.COMPILE_MODE, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode; reduce-overhead captures CUDA graphs (default: %(default)s)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=config.CUDA_GRAPH,
                   help="capture the whole training step (forward, backward, SGD) as one CUDA graph and replay it; "
                        "one GPU, no --compile; ignored on the CPU (default: %(default)s)")
    p.add_argument("--prefetch", type=int, default=config.PREFETCH,
                   help="packed loader: batches prepared ahead in a background thread, 0 for none (default: %(default)s)")
    p.add_argument("--dummy", type=int, nargs="?", const=config.SIZE, default=None, metavar="SIZE",
                   help=f"train on random faces in memory instead of --data ({config.DUMMY_FACES} training, "
                        f"{config.DUMMY_VALID} validation, SIZE px, {config.SIZE} if not given): checks a machine, "
                        "its GPUs and torchrun before there is a dataset (default: off)")
    p.add_argument("--jpeg", action="store_true",
                   help="decode the JPEGs even where faces_{split}.npy exists (default: off; for comparisons)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N faces of each split, 0 = all (default: all; for smoke tests)")
    p.add_argument("--resume", default=None,
                   help="continue from this last.pt, with the options it was trained with where the command line "
                        "(or --config) does not give them (default: none, a fresh run)")
    p.add_argument("--profile", type=int, default=config.PROFILE, metavar="N",
                   help=f"record N training steps of the first epoch with torch.profiler, after {config.PROFILE_SKIP} "
                        "unrecorded ones, into OUT/profile.txt (where a step's time goes), profile.json and "
                        "profile_trace.json.gz (Perfetto, chrome://tracing); 0: off (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=config.LOG_EVERY,
                   help="steps between progress updates and non-finite-loss checks (default: %(default)s)")
    p.add_argument("--best-gender-weight", type=float, default=config.BEST_GENDER_WEIGHT,
                   help="best.pt minimises age_mae + this * (1 - gender_acc) (default: %(default)s)")
    args = parse_with_recipe(p, argv, base=resumed_options(p, argv))
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else config.OUT
    check_output_folder(args.out, f"--out {args.out}")
    check_least(p, args, dict(batch_size=1, epochs=1, log_every=1, prefetch=0, profile=0, warmup_epochs=0, momentum=0,
                              weight_decay=0, limit=0))
    args.limit = args.limit or None  # 0: all, so that a resume can lift a smoke run's limit
    if not args.lr > 0:
        p.error("--lr must be above 0")
    if args.dummy is not None:
        if args.dummy < 32 or args.jpeg:
            p.error("--dummy SIZE: a face side of at least 32 px, and no --jpeg (the dummy faces are in memory)")
        args.data = None  # config.json then says that no data dir was read
    if args.amp_cpu is None:
        args.amp_cpu = cpu_has_bf16()
    if args.age_weight is None:  # l2's loss is in years^2, the others' in years or nats: each its own default
        args.age_weight = config.AGE_WEIGHT_L2 if args.age_loss == "l2" else config.AGE_WEIGHT
    return args


# --- processes, devices, precision -------------------------------------------------------------

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = process_device(pick_device(device_name), world, int(os.environ.get("LOCAL_RANK", 0)))
    # also for one process on cuda:N: torch.cuda.graph and current_stream() use the current device; plain "cuda" is
    # the current one already (and set_device needs an index)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def wrap_model(raw: torch.nn.Module, args: argparse.Namespace, world: int, device: torch.device) -> torch.nn.Module:
    """DDP around the model, then torch.compile around DDP, so the compiled backward overlaps the all-reduce."""
    model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw
    return torch.compile(model, mode=args.compile_mode) if args.compile else model


def memory_format_of(args: argparse.Namespace) -> torch.memory_format:
    return torch.channels_last if args.channels_last else torch.contiguous_format


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast speeds training up."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_autocast(args: argparse.Namespace, device: torch.device) -> tuple[bool, functools.partial]:
    """(amp on?, a torch.autocast factory): bf16 on CUDA with --amp, on the CPU only with --amp-cpu too
    (parse_args resolved its default from the CPU)."""
    amp = args.amp and (device.type == "cuda" or args.amp_cpu)
    return amp, functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=amp)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics, so that all validate the model rank 0 saves.

    DDP broadcasts them only at the start of each training forward; each process's last batch then moved its own.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --- optimisation -----------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on the weights only: decaying norm scales and biases only hurts.

    Fused on CUDA (one kernel for the whole update); the CPU gets the default foreach update.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = next(iter(params)).device.type == "cuda" or None
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, fused=fused)


def lr_at(epochs_done: float, peak_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The learning rate after `epochs_done` (fractional) epochs: linear warm-up to the peak, then cosine to 0.

    A function of the share of the run done, not of a step count, so a resumed run with another
    batch size or process count continues at the same point.
    """
    if epochs_done < warmup_epochs:
        return peak_lr * epochs_done / warmup_epochs
    decay = epochs - warmup_epochs  # may be 0: a run that only warms up ends at the peak
    progress = min(1.0, (epochs_done - warmup_epochs) / decay) if decay > 0 else 0.0
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


# --- one step ---------------------------------------------------------------------------------

class Step:
    """One optimisation step on a batch: forward under autocast, loss, backward, SGD update, run eagerly.

    The epoch's loss sum and count of non-finite losses stay on the device (reading them is a host
    sync); reset() zeroes them in place, so that a captured graph adding to them stays valid.
    model: the network as trained (DDP, compiled); loss_fn: AgeGenderNet.loss of the model inside.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 autocast: functools.partial, age_weight: float, device: torch.device) -> None:
        self.model, self.loss_fn, self.optimizer, self.autocast = model, loss_fn, optimizer, autocast
        self.age_weight = age_weight
        self.loss_sum = torch.zeros((), device=device)  # sum over the epoch's images of the batch-mean loss
        self.nonfinite = torch.zeros((), device=device)  # steps whose loss was nan or inf

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.nonfinite.zero_()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, x: torch.Tensor, age: torch.Tensor, gender: torch.Tensor) -> None:
        with self.autocast():
            gender_logits, age_out = self.model(x)  # (B, 2), (B, 1 | 101), float32
        loss = self.loss_fn(gender_logits, age_out, gender, age, self.age_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * x.shape[0]
        self.nonfinite += loss.detach().isfinite().logical_not()


class GraphedStep(Step):
    """The same step captured once as a CUDA graph and replayed: one launch a step instead of hundreds, so the
    GPU never waits on Python, nor on the loader's thread, which shares the interpreter with the launches.

    The first WARMUP steps run eagerly on a side stream, as torch.cuda.graphs asks: cuDNN's autotuning, the
    momentum buffers and the other lazy allocations happen before the capture. The next step is captured on
    static copies of its batch (and replayed at once); each later batch is copied into them. The learning
    rate lives in a device tensor that fused SGD reads, so the schedule goes on without a new capture. A
    batch of another shape (train.py drops the last partial one, so none there) runs eagerly.
    """

    WARMUP = 3  # eager steps before the capture

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self.loss_sum.device
        lr = torch.tensor(float(self.optimizer.param_groups[0]["lr"]), device=device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # one tensor for every group: set_lr is one fill, queued like a kernel
        # autocast's cast cache would keep tensors allocated during the capture alive past it
        self.autocast = functools.partial(self.autocast, cache_enabled=False)
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] = ()
        self.warmed = 0

    def set_lr(self, lr: float) -> None:
        self.optimizer.param_groups[0]["lr"].fill_(lr)

    def __call__(self, x: torch.Tensor, age: torch.Tensor, gender: torch.Tensor) -> None:
        batch = (x, age, gender)
        if self.graph is None and self.warmed < self.WARMUP:
            self.warmed += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                super().__call__(*batch)
            torch.cuda.current_stream().wait_stream(self.side)
        elif self.graph is None:
            self.static = tuple(t.clone() for t in batch)  # clone keeps x's memory format
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's own memory
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the loader's thread goes on preparing batches (its own stream, event syncs) meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                super().__call__(*self.static)
            self.graph.replay()  # a capture records the step without running it
        elif any(s.shape != t.shape for s, t in zip(self.static, batch)):
            super().__call__(*batch)
        else:
            for s, t in zip(self.static, batch):
                s.copy_(t)
            self.graph.replay()


def make_step(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
              autocast: functools.partial, args: argparse.Namespace, device: torch.device) -> Step:
    """The step train_one_epoch runs: captured as a CUDA graph with --cuda-graph on CUDA, eager otherwise."""
    graphed = args.cuda_graph and device.type == "cuda"
    return (GraphedStep if graphed else Step)(model, loss_fn, optimizer, autocast, args.age_weight, device)


# --- profiling ----------------------------------------------------------------------------------

class StepProfiler:
    """torch.profiler over `steps` training steps (0: off), after config.PROFILE_SKIP unrecorded ones and WARMUP
    (the profiler's own start-up), in every thread: the loader's prefetching one and, on a GPU, autograd's run beside
    the one launching the step. Then it writes OUT/profile.txt (a summary and the busiest ops), profile.json (the
    summary) and profile_trace.json.gz, and records nothing more. step() ends a training step."""

    WARMUP = 1

    @staticmethod
    def unrecorded() -> int:
        """Steps of the epoch run before the first one recorded."""
        return config.PROFILE_SKIP + StepProfiler.WARMUP

    def __init__(self, steps: int = 0, out: Path = Path("."), cuda: bool = False) -> None:
        self.out, self.cuda = out, cuda
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda
        self.prof = profile(activities=activities, on_trace_ready=self.report,
                            schedule=schedule(wait=config.PROFILE_SKIP, warmup=self.WARMUP, active=steps, repeat=1),
                            experimental_config=_ExperimentalConfig(profile_all_threads=True)) if steps else None

    def __enter__(self) -> StepProfiler:
        if self.prof is not None:
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.prof is not None:
            self.prof.__exit__(*exc)

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def report(self, prof: profile) -> None:
        events = prof.events()
        summary = profile_summary(events, self.cuda)
        write_json(self.out / "profile.json", summary)
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        atomic_write_text(self.out / "profile.txt", profile_text(summary) + "\n\n"
                          + events.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
        trace = self.out / "profile_trace.json.gz"
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            atomic_write_bytes(trace, gzip.compress(Path(f"{tmp}/trace.json").read_bytes(), compresslevel=6))
        tqdm.write(f"profile of {summary['steps']} steps: {self.out / 'profile.txt'}, {trace.name} (Perfetto)")


def profile_summary(events: list, cuda: bool) -> dict:
    """Per recorded step, in ms: its wall time; the device's busy time (its kernels' and copies' sum, None on the
    CPU); per thread, the time in torch ops (main: the one that launches the step; loader: the one preparing batches,
    if another); the loader's preparation and the step's wait for it.

    events: torch.profiler's; on a GPU the steps and the labels are also drawn on the device's timeline (user
    annotations), and each op's device time is also its kernels': only the host's events and the device's own
    activities are counted."""
    host = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e for e in host if e.name.startswith("ProfilerStep")]
    labels = (PREPARE_LABEL, WAIT_LABEL)

    def per_step(us: float) -> float:
        return us / len(steps) / 1000

    def span(label: str) -> float:
        return per_step(sum(e.cpu_time_total for e in host if e.name == label))

    main = steps[0].thread
    loader = next((e.thread for e in host if e.name == PREPARE_LABEL and e.thread != main), None)
    ops: dict[int, float] = {}
    for e in host:
        if e.name not in labels and not e.name.startswith("ProfilerStep"):
            ops[e.thread] = ops.get(e.thread, 0.0) + e.self_cpu_time_total
    step_ms = per_step(sum(e.cpu_time_total for e in steps))
    device_ms = per_step(sum(e.self_device_time_total for e in events
                             if e.device_type != DeviceType.CPU and not e.is_user_annotation)) if cuda else None
    threads = [dict(thread={main: "main", loader: "loader"}.get(t, f"other {t}"), ops_ms=per_step(us))
               for t, us in sorted(ops.items(), key=lambda kv: -kv[1])]
    return dict(steps=len(steps), skipped=config.PROFILE_SKIP, step_ms=step_ms, device_busy_ms=device_ms,
                device_busy_share=None if device_ms is None else device_ms / step_ms,
                prepare_batch_ms=span(PREPARE_LABEL), wait_for_batch_ms=span(WAIT_LABEL), threads=threads)


def profile_text(s: dict) -> str:
    device = ("the CPU itself" if s["device_busy_ms"] is None
              else "not seen: no kernel recorded (torch.profiler without CUPTI?)" if s["device_busy_ms"] == 0
              else f"busy {s['device_busy_ms']:.2f} ms ({100 * s['device_busy_share']:.0f}%: its kernels' and copies' sum)")
    lines = [f"{s['steps']} steps recorded after {s['skipped']}: {s['step_ms']:.2f} ms a step; the device {device}",
             f"the loader: {s['prepare_batch_ms']:.2f} ms a step preparing a batch, the step's wait for it "
             f"{s['wait_for_batch_ms']:.2f} ms",
             "time in torch ops a step, per thread (main launches the step; other: autograd's backward, on a GPU):"]
    # threads under 0.005 ms a step (DDP's, say) stay in profile.json only
    return "\n".join(lines + [f"  {t['thread']}: {t['ops_ms']:.2f} ms" for t in s["threads"] if t["ops_ms"] >= 0.005])


# --- one epoch --------------------------------------------------------------------------------

def train_one_epoch(step: Step, loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    args: argparse.Namespace, epoch: int, world: int, writer: SummaryWriter | None,
                    ctrl_c: CtrlCBetweenSteps, profiler: StepProfiler) -> tuple[float, float]:
    """(mean training loss over all processes, images/s over all processes).

    Each step's lr is the schedule at the middle of that step (lr_at with args' peak_lr).
    writer: rank 0's TensorBoard writer; None on the other ranks, which show no bar either.
    ctrl_c: where a Ctrl-C stops the epoch (between two steps); profiler: told of each step's end.
    """
    step.model.train()
    step.reset()
    memory_format = memory_format_of(args)
    seen, start = 0, time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{args.epochs} train", unit="step", disable=writer is None,
               leave=False, dynamic_ncols=True)
    for i, (x, age, gender) in enumerate(ctrl_c.steps(loader), 1):
        step.set_lr(lr_at(epoch - 1 + (i - 0.5) / len(loader), args.peak_lr, args.warmup_epochs, args.epochs))
        step(x.contiguous(memory_format=memory_format), age, gender)  # x (B, 3, S, S)
        profiler.step()
        seen += x.shape[0]
        if i % args.log_every == 0 or i == len(loader):
            stop_if_nonfinite(step.nonfinite, epoch, i, args.out)
            running, images_per_s = step.loss_sum.item() / seen, seen * world / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{running:.4f}", img_s=f"{images_per_s:.0f}")
            bar.update(i - bar.n)
            if writer is not None:
                writer.add_scalar("train/running_loss", running, (epoch - 1) * len(loader) + i)
    bar.close()
    loss_sum = step.loss_sum.double()
    totals = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_full((), seen)]))
    total_loss_sum, total_seen = totals.tolist()  # the host sync that ends the epoch's clock
    return total_loss_sum / total_seen, total_seen / (time.perf_counter() - start)


def stop_if_nonfinite(nonfinite: torch.Tensor, epoch: int, step: int, out: str) -> None:
    """Raise when any process saw a nan/inf loss; all processes check at the same steps, so they stop together."""
    if all_reduce_sum(nonfinite.clone()).item():
        raise UserError(f"the training loss became nan or inf in epoch {epoch}, by step {step}; stopped, nothing saved "
                        f"from this epoch ({Path(out) / 'last.pt'} holds the last good one, if any); "
                        "lower --lr or --age-weight")


@torch.inference_mode()
def validate(raw: AgeGenderNet, loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             args: argparse.Namespace, device: torch.device, show_bar: bool, ctrl_c: CtrlCBetweenSteps) -> dict:
    """gender_acc, age_mae, cs5, loss over the whole valid split (the sum of every process's stripe).

    raw is the model without DDP (the stripes differ in length, and DDP's forward would wait for
    the other processes) nor compile (eval mode would compile a second graph), in fp32: the
    numbers that choose best.pt are the ones evaluate.py reproduces.
    """
    raw.eval()
    memory_format = memory_format_of(args)
    sums = MetricSums(device)
    bar = tqdm(ctrl_c.steps(loader), total=len(loader), desc="valid", unit="step", disable=not show_bar, leave=False,
               dynamic_ncols=True)
    for x, age, gender in bar:
        gender_logits, age_out = raw(x.contiguous(memory_format=memory_format))  # (B, 2), (B, 1 | 101)
        loss = raw.loss(gender_logits, age_out, gender, age, args.age_weight)
        sums.update(raw.predict_age(age_out), age, gender_logits.argmax(dim=1), gender, loss)
    sums.all_reduce()
    return sums.compute()


# --- files ------------------------------------------------------------------------------------

def resumed_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """--resume PATH in argv: the options its run was trained with (config.json's, kept in the checkpoint) as
    tokens to go before the recipe's and the command line's, so that a resume left without them goes on as the run
    went (a recipe run resumed without its --config once fell back to the default age weight)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resume")
    pre.add_argument("--data")
    given = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))[0]
    if given.resume is None:
        return []
    # --data given: the run goes on over that data dir, not over a --dummy run's random faces
    left = {*NOT_RESUMED, *(("dummy",) if given.data is not None else ())}
    # memory-mapped: only the config is read here; train() loads the whole checkpoint
    saved = {key.replace("_", "-"): value for key, value in load_resume(given.resume, mmap=True)["config"].items()
             if value is not None and key not in left}
    # an older checkpoint's options that are gone, and what was derived (size, world_size, ...), are not options
    return options_argv(parser, {k: v for k, v in saved.items() if f"--{k}" in parser._option_string_actions},
                        f"--resume {given.resume}")


def load_resume(path: str, mmap: bool = False) -> dict:
    if not Path(path).is_file():
        raise UserError(f"--resume {path}: not found; it is the last.pt of an earlier run (OUT/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file; the message says which
        raise UserError(f"--resume {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    missing = [key for key in ("model", "optimizer", "epoch", "best", "config") if key not in ckpt] \
        if isinstance(ckpt, dict) else ["all of them"]
    if missing:
        raise UserError(f"--resume {path}: not a last.pt of train.py (it lacks {', '.join(missing)}); --resume "
                        "takes the OUT/last.pt that train.py writes after each epoch")
    return ckpt


def in_place(resume: Path, out: Path) -> bool:
    """Whether a run resumed from `resume` goes on in the folder it was trained in (not into another --out)."""
    return out.resolve() == resume.parent.resolve()


def best_in_out(resume: Path, out: Path, ckpt: dict) -> dict | None:
    """The best record a run resumed from `resume` (`ckpt`) goes on from, with OUT/best.pt holding its weights.

    That is the checkpoint's, its weights the best.pt beside `resume`, copied into another --out (the resumed epochs
    may never beat it, and OUT must still end with a best.pt). A best.pt of another epoch (a kill between last.pt
    and best.pt, or a run's old file) or none is mended where the best epoch is the checkpoint's own: it is written
    as best.pt. Otherwise (last.pt moved alone, say) None: the best is chosen again among the epochs trained from here.
    """
    best = ckpt["best"]
    source = resume.with_name("best.pt")
    saved = source.read_bytes() if source.is_file() else None  # read once: checked, then copied
    epoch = None if saved is None else torch.load(io.BytesIO(saved), map_location="cpu", weights_only=True)["epoch"]
    if epoch == best["epoch"]:
        if not in_place(resume, out):
            atomic_write_bytes(out / "best.pt", saved)
        return best
    if best["epoch"] == ckpt["epoch"]:  # killed after last.pt, before best.pt: what save_epoch would have written
        atomic_torch_save(ckpt, out / "best.pt")
        return best
    print(f"{source}: not found (or not epoch {best['epoch']}, the best so far): {out / 'best.pt'} will be the best "
          "of the epochs trained from here", file=sys.stderr)
    return None


def check_resumable(saved: dict, now: dict, path: str) -> None:
    diffs = [f"{k} {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
    if diffs:
        raise UserError(f"--resume {path}: settings differ: {'; '.join(diffs)}; "
                        "use the checkpoint's settings, or start a fresh run in another --out")


def schedule_changes(saved: dict, now: dict, done: int) -> str | None:
    """What a resume under other optimisation settings does, in words; None when nothing changed."""
    diffs = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in SCHEDULE_KEYS if saved.get(k) != now[k]]
    if not diffs:
        return None
    before = lr_at(done, saved["peak_lr"], saved["warmup_epochs"], saved["epochs"])
    after = lr_at(done, now["peak_lr"], now["warmup_epochs"], now["epochs"])
    return (f"resuming after epoch {done} with {'; '.join(diffs)}: the schedule is recomputed for the new settings "
            f"at the same point of the run, so the learning rate goes from {before:g} to {after:g}")


def setting_changes(saved: dict, now: dict, options: Iterable[str]) -> str | None:
    """The settings a resume changed beyond the schedule's (schedule_changes says those), from the checkpoint's
    config to `now` (resolved_config's), in words; None when there are none: each changes what the rest of the run
    learns from, how its best epoch is chosen, or the device and precision it runs in (`options`: train.py's)."""
    # the machine's own options as they resolved (--device auto is this machine's device); not said: where the run
    # goes on, the loader's and the step's knobs (the same numbers either way), what the schedule's line says
    unsaid = {*NOT_RESUMED, *SCHEDULE_KEYS, *RESUME_MUST_MATCH, "batch_size", "peak_lr"}
    keys = [k for k in options if k not in unsaid] + ["device_used", "amp_enabled"]
    diffs = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and saved[k] != now[k]]
    return f"resuming with {'; '.join(diffs)} (the rest as the run was trained)" if diffs else None


def start_logs(out: Path, ckpt: dict | None, resume: Path | None) -> None:
    """Resume: metrics.jsonl holds the resumed run's epochs before the checkpoint's (from the metrics.jsonl beside
    `resume`, also when OUT is another folder) plus the checkpoint's own line; epochs then continue.
    Fresh run: metrics.jsonl and the TensorBoard events start empty."""
    if ckpt is None:
        records = []
        for events in (out / "tb").glob("events.out.tfevents.*"):
            events.unlink()
    else:
        resumed = resume.with_name("metrics.jsonl")
        earlier = read_jsonl(resumed) if resumed.is_file() else []
        records = [r for r in earlier if r["epoch"] < ckpt["epoch"]] + [ckpt["metrics"]]
    log = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)  # append_jsonl's format
    atomic_write_text(out / "metrics.jsonl", log)


def resolve_batch(args: argparse.Namespace, world: int, device: torch.device) -> None:
    """Fill in the device's default batch size and the peak lr it scales to (args.peak_lr)."""
    if args.batch_size is None:
        args.batch_size = config.BATCH_SIZE_CUDA if device.type == "cuda" else config.BATCH_SIZE_CPU
    args.peak_lr = args.lr * args.batch_size * world / config.LR_BATCH


def check_cuda_graph(args: argparse.Namespace, world: int, device: torch.device) -> None:
    """--cuda-graph captures one process's eager step: DDP's all-reduce and torch.compile's own graphs are refused."""
    if not (args.cuda_graph and device.type == "cuda"):
        return
    if world > 1:
        raise UserError(f"--cuda-graph: one process only, not {world} under torchrun; drop --cuda-graph, "
                        "or train on one GPU")
    if args.compile:
        raise UserError("--cuda-graph with --compile: choose one; --compile --compile-mode reduce-overhead is "
                        "torch.compile's own CUDA graphs")


def faces_source(args: argparse.Namespace, loader: PackedLoader | JpegLoader) -> str:
    """Where the training faces come from, said at the start: at IMDB's size on a GPU the JPEG path is the slow one,
    and a data dir made with --no-pack would take it silently."""
    if args.dummy is not None:
        return f"random {args.dummy}x{args.dummy} faces (--dummy)"
    if isinstance(loader, PackedLoader):
        return f"{packed_path(args.data, 'train')} (packed)"
    if args.jpeg:
        return f"the JPEGs under {args.data} (--jpeg)"
    return (f"the JPEGs under {args.data}, as {packed_path(args.data, 'train')} is not there; "
            f"`python pre_process.py --out {args.data} --pack-only` packs them for the faster loader")


def resolved_config(args: argparse.Namespace, size: int, world: int, device: torch.device, amp: bool) -> dict:
    """What config.json and the checkpoints record: every option plus what was derived (plain values only)."""
    return dict(vars(args), size=size, world_size=world, global_batch=args.batch_size * world, device_used=str(device),
                amp_enabled=amp, git_commit=git_commit(), torch=str(torch.__version__))


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    """Train; returns the best epoch's metrics (on every process)."""
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    master = rank == 0  # only it prints bars and writes files
    out = Path(args.out)
    seed_everything(args.seed)
    resolve_batch(args, world, device)
    check_cuda_graph(args, world, device)
    ckpt = load_resume(args.resume) if args.resume else None
    loader_args = dict(batch_size=args.batch_size, device=device, workers=args.workers, seed=args.seed, rank=rank,
                       world_size=world, jpeg=args.jpeg, limit=args.limit, prefetch=args.prefetch, dummy=args.dummy)
    train_loader = make_loader(args.data, "train", True, **loader_args)
    valid_loader = make_loader(args.data, "valid", False, **loader_args)
    check_steps(args, len(train_loader))
    amp, autocast = make_autocast(args, device)
    cfg = resolved_config(args, train_loader.size, world, device, amp)
    if ckpt is not None:
        check_resumable(ckpt["config"], cfg, args.resume)
        if ckpt["epoch"] > args.epochs:
            raise UserError(f"--resume {args.resume}: already trained {ckpt['epoch']} epochs; pass --epochs {ckpt['epoch']} "
                            "or more")
        if ckpt["epoch"] == args.epochs:  # finished, perhaps killed after its last checkpoint
            if master:
                complete_run(ckpt, Path(args.resume), out, args.epochs, valid_loader, device)
            return ckpt["best"]

    memory_format = memory_format_of(args)
    raw = (AgeGenderNet(**model_args_of(ckpt)) if ckpt else build_model(args.arch, args.age_loss, args.pretrained))
    raw = raw.to(device, memory_format=memory_format)
    optimizer = make_optimizer(raw, cfg["peak_lr"], args.momentum, args.weight_decay)
    start_epoch, best, changes = restore(ckpt, raw, optimizer, cfg) if ckpt is not None else (1, None, None)
    model = wrap_model(raw, args, world, device)
    step = make_step(model, raw.loss, optimizer, autocast, args, device)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once

    writer = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            best = best_in_out(Path(args.resume), out, ckpt)
        write_json(out / "config.json", cfg)
        start_logs(out, ckpt, Path(args.resume) if args.resume else None)
        writer = SummaryWriter(str(out / "tb"))
        print(f"training {args.arch}/{args.age_loss} on {device} x{world}, {len(train_loader)} steps of "
              f"{cfg['global_batch']} per epoch, peak lr {cfg['peak_lr']:g}, {'bf16' if amp else 'fp32'}"
              f"{', resuming at epoch ' + str(start_epoch) if ckpt else ''}")
        print(f"faces from {faces_source(args, train_loader)}")
        for said in (changes, setting_changes(ckpt["config"], cfg, vars(args)) if ckpt else None):
            if said:
                print(said)
    epoch, began = start_epoch, time.time()
    try:
        with CtrlCBetweenSteps() as ctrl_c, StepProfiler(args.profile if master else 0, out, device.type == "cuda") as profiler:
            for epoch in range(start_epoch, args.epochs + 1):
                started = time.perf_counter()
                train_loader.set_epoch(epoch)
                train_loss, images_per_s = train_one_epoch(step, train_loader, args, epoch, world, writer, ctrl_c,
                                                            profiler)
                sync_buffers(raw)
                m = validate(raw, valid_loader, args, device, show_bar=master, ctrl_c=ctrl_c)
                record = dict(epoch=epoch, gender_acc=m["gender_acc"], age_mae=m["age_mae"], cs5=m["cs5"],
                              train_loss=train_loss, val_loss=m["loss"],
                              score=m["age_mae"] + args.best_gender_weight * (1 - m["gender_acc"]),
                              lr=float(optimizer.param_groups[0]["lr"]), seconds=time.perf_counter() - started,
                              train_images_per_s=images_per_s)
                improved = best is None or record["score"] < best["score"]
                if improved:
                    best = {k: record[k] for k in ("epoch", "score", "gender_acc", "age_mae", "cs5")}
                if master:
                    save_epoch(out, writer, record, improved, best, cfg, raw, optimizer)
    except (KeyboardInterrupt, OSError) as e:
        if master and (isinstance(e, KeyboardInterrupt) or disk_full(e)):  # what is safe on disk, how to go on
            print("\n" + stopped_line(e, out, epoch, ckpt is not None, began), file=sys.stderr)
        raise
    finally:
        if writer is not None:
            writer.close()
    if master:
        print(f"best: epoch {best['epoch']}, validation gender accuracy {100 * best['gender_acc']:.2f}%, "
              f"age MAE {best['age_mae']:.2f} years ({out / 'best.pt'})")
        calibrate_best(out, valid_loader, device)
    return best


def calibrate_best(out: Path, valid_loader: PackedLoader | JpegLoader, device: torch.device) -> None:
    """The gender probability users see: its temperature fitted on the validation split (this process's share of it
    under torchrun: plenty for one number) and stored in OUT/best.pt."""
    temperature = calibrate_checkpoint(out / "best.pt", valid_loader, device)
    print(f"gender temperature {temperature:.3f} (fitted on the validation split, stored in best.pt)"
          if temperature is not None else "gender temperature: none fits on the validation split (every gender "
          f"right, or its NLL least outside {TEMPERATURE_RANGE[0]:g}..{TEMPERATURE_RANGE[1]:g}); best.pt holds 1.0, "
          "the raw probability")


def check_steps(args: argparse.Namespace, steps: int) -> None:
    """An epoch of `steps` steps (this process's) has room for the run that args asks for, or a UserError says why."""
    if steps == 0:
        raise UserError(f"--batch-size {args.batch_size}: larger than this process's share of the training faces; "
                        "lower it (or --nproc_per_node)")
    if args.profile and steps < StepProfiler.unrecorded() + args.profile:
        raise UserError(f"--profile {args.profile}: an epoch has {steps} steps, fewer than the "
                        f"{StepProfiler.unrecorded()} run first and the {args.profile} recorded; lower "
                        "--profile or --batch-size")


def complete_run(ckpt: dict, resume: Path, out: Path, epochs: int, valid_loader: PackedLoader | JpegLoader,
                 device: torch.device) -> None:
    """--resume of a run that trained all its epochs: if out is its own folder (another --out gets no run of a log
    alone), what a kill after its last checkpoint left undone done (its metrics.jsonl completed, best.pt written,
    calibrated), and a line saying so."""
    own = in_place(resume, out)
    if own:
        start_logs(out, ckpt, resume)
        if best_in_out(resume, out, ckpt) is not None and not is_calibrated(out / "best.pt"):
            calibrate_best(out, valid_loader, device)
    print(f"{resume}: already trained {epochs} epochs, nothing to do (pass --epochs above that to train on); "
          + (f"{out / 'metrics.jsonl'} is complete" if own else f"nothing written to {out}"))


def restore(ckpt: dict, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict) -> tuple[int, dict, str | None]:
    """The checkpoint's weights and momentum buffers into raw and optimizer, whose hyper-parameters stay the current
    options': (the epoch to start at, the best epoch so far, the schedule's changes to print or None)."""
    raw.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(dict(state=ckpt["optimizer"]["state"],
                                   param_groups=optimizer.state_dict()["param_groups"]))
    return ckpt["epoch"] + 1, ckpt["best"], schedule_changes(ckpt["config"], cfg, ckpt["epoch"])


def stopped_line(e: BaseException, out: Path, epoch: int, resumed: bool, began: float) -> str:
    """What a run stopped by Ctrl-C or a full disk in `epoch` leaves on disk, and how to go on."""
    last = out / "last.pt"  # ask the disk: Ctrl-C can land between the save and anything after it
    ours = last.is_file() and (resumed or last.stat().st_mtime >= began)
    return (f"{'interrupted' if isinstance(e, KeyboardInterrupt) else 'stopped'} in epoch {epoch}: "
            + (f"{last} holds epoch {torch.load(last, weights_only=True)['epoch']}; go on with --resume {last}"
               if ours else "no epoch finished, nothing saved"))


def save_epoch(out: Path, writer: SummaryWriter, record: dict, improved: bool, best: dict, cfg: dict,
               raw: AgeGenderNet, optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints first, then the metrics line: a resume repairs the log from the checkpoint (start_logs)."""
    opt = optimizer.state_dict()
    for group in opt["param_groups"]:  # copies; --cuda-graph keeps the lr in a device tensor
        group["lr"] = float(group["lr"])
    ckpt = dict(model=raw.state_dict(), model_args=raw.model_args, optimizer=opt,
                epoch=record["epoch"], best=best, config=cfg, metrics=record)
    atomic_torch_save(ckpt, out / "last.pt")
    if improved:
        atomic_torch_save(ckpt, out / "best.pt")
    append_jsonl(out / "metrics.jsonl", record)
    for key, value in record.items():
        if key != "epoch":
            writer.add_scalar(f"epoch/{key}", value, record["epoch"])
    writer.flush()
    tqdm.write(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, valid loss {record['val_loss']:.4f}, "
               f"gender acc {100 * record['gender_acc']:.2f}%, age MAE {record['age_mae']:.2f}, CS(5) "
               f"{100 * record['cs5']:.1f}%{' (best)' if improved else ''}, {record['seconds']:.0f}s, "
               f"{record['train_images_per_s']:.0f} img/s")


if __name__ == "__main__":
    run_main(main)
