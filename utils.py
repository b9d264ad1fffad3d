"""Helpers shared by every script: errors, atomic writes, images, onnxruntime sessions, seeding, devices, code version,
background producers.

Not run directly.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections import deque
from concurrent.futures import Executor, Future
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REPO = Path(__file__).resolve().parent
T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad file): printed as one line, exit 2."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(): user errors, a full disk and a permission refused become one line on stderr and a
    non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        line = machine_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: stopped; files written so far are complete", file=sys.stderr)
        sys.exit(130)


def machine_error(e: OSError) -> str | None:
    """The line for an OSError the user fixes on the machine, not in the code: a full disk, a permission refused; None
    for any other."""
    if isinstance(e, PermissionError) and e.filename:
        return f"{e.filename}: permission denied; give this user access to it, or choose another path"
    if e.errno == errno.EROFS and e.filename:
        return f"{e.filename}: on a read-only file system; choose another path"
    if not disk_full(e):
        return None
    # a full disk fails the clean-up's writes too (a log's flush): name the first file refused, the deepest in the
    # chain of errors raised while handling one another that has a name
    chain = [e]
    while disk_full(chain[-1].__context__):
        chain.append(chain[-1].__context__)
    named = [x.filename for x in chain if x.filename]
    # every file is written to a temp name and renamed: the half-written one is a temp file, which reruns remove
    where = f" writing {named[-1]}" if named else ""
    return (f"no space left on the device{where} ({e.strerror}): free some space (or write elsewhere) and go on from "
            "the files written before it, which are complete")


def disk_full(e: BaseException) -> bool:
    """Whether e is a write refused for want of space (the device's or the user's quota)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """Every script's parser: its docstring as the help, kept as written, and no abbreviated options (argparse would
    take `--work 4` for `--workers 4`, or a typo for the option it happens to begin: an unknown option must fail)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


RECIPES = REPO / "configs"  # the experiment recipes we ship


def check_least(parser: argparse.ArgumentParser, args: argparse.Namespace, least: dict[str, float]) -> None:
    """parser.error naming the first option of `least` ({dest: the least value}) below it; one not given (None) is
    left to its default, and a NaN fails."""
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and not value >= low:
            parser.error(f"--{name.replace('_', '-')} must be {'0 or more' if low == 0 else f'at least {low}'}")


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      base: Sequence[str] = ()) -> argparse.Namespace:
    """parser's options from argv, where `--config FILE` (an option of parser's) names a recipe: a TOML file of
    the same options, keys spelled as the flags without their dashes (`batch-size = 32`, `amp = false`). The
    recipe's options go before the command line's, so that the command line overrides them; `base` (tokens, such as
    a resumed run's options) goes before both."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    recipe = pre.parse_known_args(argv)[0].config
    return parser.parse_args([*base, *([] if recipe is None else recipe_argv(parser, recipe)), *argv])


def recipe_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The options of the recipe at `path` as command-line tokens for `parser`; a UserError names a bad file or key."""
    try:
        recipe = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        shipped = ", ".join(str(p.relative_to(REPO)) for p in sorted(RECIPES.glob("*.toml")))
        raise UserError(f"--config {path}: not found; a recipe is a TOML file of options, e.g. one of {shipped}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--config {path}: not a readable TOML file ({e})") from None
    for key in recipe:
        if f"--{key}" not in parser._option_string_actions or key in ("config", "help"):
            raise UserError(f"--config {path}: {key!r} is not an option of this script; a recipe's keys are its "
                            f"options without the dashes (see --help)")
    return options_argv(parser, recipe, f"--config {path}")


def options_argv(parser: argparse.ArgumentParser, options: dict, source: str) -> list[str]:
    """options ({flag without its dashes: value}, each an option of parser's) as command-line tokens for parser; a
    UserError that starts with `source` names a value of the wrong kind (argparse's own error would not say where
    the value came from)."""
    actions = parser._option_string_actions  # argparse keeps no public map from a flag to its action
    argv = []
    for key, value in options.items():
        action = actions[f"--{key}"]
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(action, argparse._StoreTrueAction) and isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif action.nargs == 0 or isinstance(value, (bool, dict, list)):
            raise UserError(f"{source}: {key} = {value!r}: expected "
                            f"{'true or false' if action.nargs == 0 else 'a number or a string'}")
        else:
            check_option_value(action, key, value, source)
            argv += [f"--{key}", str(value)]
    return argv


def check_option_value(action: argparse.Action, key: str, value: object, source: str) -> None:
    """A UserError starting with `source` unless `value` converts to action's type and is one of its choices."""
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} = {value!r}: expected {getattr(action.type, '__name__', 'another value')}"
                        ) from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{source}: {key} = {value!r}: expected one of {', '.join(map(str, action.choices))}")


class CtrlCBetweenSteps:
    """Within `with`, a first Ctrl-C only asks to stop; `check()` (called between steps) raises it.

    A KeyboardInterrupt that lands anywhere can land inside a constructor (a tqdm bar's __init__ once
    took it, and the bar's __del__ then printed a traceback over the clean message): raised only at
    `check()`, it lands where the loop is between two whole steps. A second Ctrl-C interrupts at once,
    for a step that hangs. Main thread only (Python's rule for signal handlers).
    """

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "CtrlCBetweenSteps":
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def steps(self, items: Iterable[T]) -> Iterator[T]:
        """items, with check() before each one."""
        for item in items:
            self.check()
            yield item


# --- atomic writes: a killed process leaves the old file or the new one, never half of one ---

_UMASK = os.umask(0)
os.umask(_UMASK)  # the only way to read the umask is to set it

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file (a full disk): name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_folder(folder: str | os.PathLike, label: str) -> None:
    """A UserError starting with label (the option and the path given) where folder cannot be a folder to write into,
    as it or a folder above it is a file: called before the work, which would otherwise end in a traceback when its
    results are written."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{label}: {path} is a file, not a folder; choose another path")
            return


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; a line is written whole with one write() call."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file as append_jsonl writes it; an unfinished last line (no newline: a write cut
    short by a full disk) is not one."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")  # the last: "" after a final newline, else unfinished
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def csv_text(columns: Sequence[str], rows: list[dict]) -> str:
    """Rows (dicts keyed by columns) as CSV with a header line, "\n" line ends."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: list[dict]) -> None:
    """Atomically write rows as csv_text does."""
    atomic_write_text(path, csv_text(columns, rows))


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend: figures are only ever saved here, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: "matplotlib.figure.Figure", path: str | os.PathLike, dpi: int = 100) -> None:
    """Atomically write a matplotlib figure as PNG (tight layout) and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# --- images ------------------------------------------------------------------------------

class ImageError(Exception):
    """A file that is not a usable image; `reason` is a short key for counting
    (empty, not_image, truncated, too_large, unreadable)."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}")


def read_image(path: str | os.PathLike, max_pixels: int = 0) -> np.ndarray:
    """Decode any image Pillow knows (JPEG, PNG under any name, grayscale, 16-bit, CMYK, RGBA) to upright RGB uint8 (H, W, 3).

    The EXIF Orientation tag is applied: a phone photo stored sideways comes out as it was taken.
    Raises ImageError for zero-byte, non-image, truncated or otherwise corrupt, unreadable (permissions, a folder) and
    over-large files (beyond Pillow's decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS, or, where
    max_pixels > 0, of more than max_pixels pixels: both judged on the size the file declares, before
    decoding, as a small file may declare gigabytes of pixels), FileNotFoundError for missing ones.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:  # PermissionError, IsADirectoryError, EIO: this file is unusable, not the run
        raise ImageError(path, "unreadable", e.strerror or str(e)) from e
    if not data:
        raise ImageError(path, "empty")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: im.size is what the file declares
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageError(path, "too_large", f"{im.width}x{im.height} pixels, over the limit of {max_pixels:,}")
            im.load()  # decodes now, so truncation surfaces here and not later
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # composite on white: transparent pixels are undefined colour otherwise
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            if im.mode.startswith("I"):
                # 16-bit grayscale (PNG and TIFF: I;16, PGM: I) is 0..65535; Pillow's convert would clip
                # it at 255, leaving pure black and white
                gray = np.rint(np.clip(np.asarray(im, dtype=np.float32), 0, 65535) / 257).astype(np.uint8)
                rgb = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(im.convert("RGB"))
    except (ImageError, MemoryError):  # ours (max_pixels), and this machine's want of memory, not the file's fault
        raise
    except Image.DecompressionBombError as e:  # its declared size alone would take GBs: refused before decoding
        raise ImageError(path, "too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError(path, "not_image") from e
    except Exception as e:  # truncation is an OSError; Pillow's format plugins raise any type on a corrupt file
        # (SyntaxError, ValueError, NotImplementedError from a DDS of an unknown pixel format, ...)
        raise ImageError(path, "truncated", str(e)) from e
    return np.ascontiguousarray(rgb)


def read_image_or_reason(path: str | os.PathLike) -> np.ndarray | str:
    """read_image, but a file that can't be used gives its reason (ImageError's, or missing_file).

    For loops over many photos, where one bad file is counted and skipped, not fatal.
    """
    try:
        return read_image(path)
    except ImageError as e:
        return e.reason
    except FileNotFoundError:
        return "missing_file"


def chunks_within(items: Iterable[T], budget: float, cost: Callable[[T], float] = lambda item: 1,
                  max_items: int = 0) -> Iterator[list[T]]:
    """Consecutive items in lists whose costs add up to at most `budget` (and of at most max_items
    items, 0 = no limit); an item costing more than the budget alone makes a list of its own.

    Lazy: it holds one list (and the item that opens the next) at a time, so the memory of a
    stream processed list by list is bounded by the budget, whatever the stream's length.
    """
    chunk: list[T] = []
    total = 0.0
    for item in items:
        c = cost(item)
        if chunk and (total + c > budget or (max_items and len(chunk) >= max_items)):
            yield chunk
            chunk, total = [], 0.0
        chunk.append(item)
        total += c
    if chunk:
        yield chunk


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    """An RGB (or gray) uint8 array encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Atomically write an RGB uint8 array as JPEG."""
    atomic_write_bytes(path, jpeg_bytes(rgb, quality))


# --- onnxruntime ---------------------------------------------------------------------------

def onnx_session(model: str | bytes) -> "onnxruntime.InferenceSession":
    """An onnxruntime session on the CPU for an .onnx path or its bytes, as inference.OnnxModel and the
    ONNX MTCNN (face.OnnxNet) run them.

    Its threads do not spin after a run: spinning threads would hold the cores that the next step
    needs (torch's code between runs, or another session: the detector's nets and the model take turns).
    """
    import onnxruntime as ort  # lazy: only ONNX models and the ONNX detector need it

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# --- reproducibility and devices -----------------------------------------------------------

def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> "torch.device":
    """'auto' -> cuda when present, else cpu; a CUDA device asked for on a machine without one is a user error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return torch.device(name)


def process_device(device: "torch.device", world: int, local_rank: int, gpus: int = 0) -> "torch.device":
    """Under torchrun each process takes the GPU of its LOCAL_RANK; one GPU named for all would fail in NCCL.

    gpus > 0 lets processes share that many GPUs round robin (LOCAL_RANK % gpus): pre_process.py's ranks
    meet only over gloo, and one process's host work (decoding, MTCNN's glue) may leave its GPU idle.
    """
    if world == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"--device {device} under torchrun: every process would use that one GPU; pass --device cuda "
                        "(process N takes cuda:N) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return type(device)("cuda", local_rank % gpus if gpus > 0 else local_rank)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (to tell a live run's temp file from a killed one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def git_commit() -> str | None:
    """The code version of this checkout (commit, '+dirty' when modified), or None outside git.

    AGE_GENDER_COMMIT, where set, is the answer: a copy sent without this checkout's .git (the device
    machine's, whose .git may be another's) is told which commit it runs.
    """
    if os.environ.get("AGE_GENDER_COMMIT"):
        return os.environ["AGE_GENDER_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def map_ahead(pool: Executor, fn: Callable[[T], Any], items: Iterable[T], ahead: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed in `pool` with at most `ahead` (>= 1) submitted and not yet
    taken, so memory does not grow with the number of items."""
    window: deque[Future] = deque()
    for item in items:
        if len(window) == ahead:
            yield window.popleft().result()
        window.append(pool.submit(fn, item))
    while window:
        yield window.popleft().result()


def in_background(items: Iterator, depth: int, name: str) -> Generator:
    """items, produced by a background thread (named `name`) up to `depth` ahead; its exceptions are raised here, in
    order.

    Leaving early (break, an exception in the consumer) stops the thread after its current item.
    """
    done, stop = object(), threading.Event()
    q: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # empty the queue so that a put blocked on it returns
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.01)
        thread.join()
