"""Export a checkpoint to ONNX, with the age rule inside, and check it against PyTorch.

    python export.py --checkpoint runs/r18_112/best.pt --out runs/r18_112/model.onnx
    python export.py --checkpoint runs/r18_112/best.pt --flip   # the mirror image averaged in the graph

The ONNX graph takes `face`: float32 (N, 3, S, S), an aligned face normalised exactly as
data_gen.preprocess does (S and the normalisation are in the model's metadata), with N free,
and returns
  gender_prob  (N, 2)  softmax over (female, male) of the logits divided by the checkpoint's
                       calibration temperature (models.AgeGenderNet.head_outputs)
  age          (N,)    years, the checkpoint's own prediction rule (models.predict_age) applied
  age_std, age_low, age_high  (N,)  the spread and the 80% interval of the predicted age
                       distribution (ce/dex/mv); NaN for l1/l2 heads, which have none
so an ONNX user needs nothing from this repository. With --flip the graph runs each face and its
mirror image and averages their outputs (metadata flip=True; demo/serve/evaluate then flip). After writing, the file is run with
onnxruntime on random inputs of two batch sizes other than the one traced, and the largest
difference from PyTorch is printed; above --tolerance the script exits non-zero (and the file
is kept, for inspection, under its name with .failed appended).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import config
from data_gen import IMAGENET_MEAN, IMAGENET_STD
from inference import INPUT, OUTPUTS, load_model
from models import AgeGenderNet, mirrored
from utils import UserError, argument_parser, atomic_write_bytes, check_output_folder, run_main


def wrapped(model: AgeGenderNet, flip: bool = False) -> torch.nn.Module:
    """The model plus its head outputs (models.AgeGenderNet.head_outputs), as one module returning OUTPUTS."""
    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, face):
            gender_logits, age_out = self.model(mirrored(face) if flip else face)
            out = self.model.head_outputs(gender_logits, age_out, flip=flip)
            return tuple(out[k] for k in OUTPUTS)

    return Exported().eval()


def to_onnx(module: torch.nn.Module, size: int, opset: int, exporter: str) -> tuple[bytes, str]:
    """(ONNX bytes, the exporter that made them) with a dynamic batch dimension.

    torch 2.14's default is the dynamo exporter (torch.export + onnxscript, both installed and fully
    offline); it is tried first. If it fails on some model, the TorchScript exporter
    (dynamo=False, deprecated but still shipped) is the fallback.
    """
    example = torch.randn(2, 3, size, size)
    tries = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    errors = []
    for kind in tries:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if kind == "dynamo":
                        batch = torch.export.Dim("batch", min=1, max=4096)
                        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                                          input_names=[INPUT], output_names=list(OUTPUTS),
                                          dynamic_shapes={"face": {0: batch}}, external_data=False,
                                          verbose=False)
                    else:
                        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                                          input_names=[INPUT], output_names=list(OUTPUTS),
                                          dynamic_axes={name: {0: "batch"} for name in (INPUT,) + OUTPUTS})
                return path.read_bytes(), kind
            except Exception as e:  # the exporters raise many types; the next one gets its turn
                errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if len(tries) > 1:
                    print(f"the {kind} exporter failed ({errors[-1]}); trying the next", file=sys.stderr)
    raise UserError("ONNX export failed: " + " | ".join(errors))


def add_metadata(data: bytes, meta: dict) -> bytes:
    """The ONNX bytes with `meta` as metadata_props and the batch dimension named 'batch'."""
    proto = onnx.load_from_string(data)
    for name, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=name, value=str(value)))
    return proto.SerializeToString()


def check(module: torch.nn.Module, data: bytes, size: int, batches: tuple[int, ...] = (1, 5), seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over all outputs, on random inputs of the given batch sizes
    (NaN on both sides, the intervals of l1/l2 heads, counts as equal; on one side only, as inf)."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, 3, size, size, generator=g)
        with torch.inference_mode():
            expected = [t.numpy() for t in module(x)]
        got = session.run(list(OUTPUTS), {INPUT: x.numpy()})
        for name, e, o in zip(OUTPUTS, expected, got):
            if o.shape != e.shape:
                raise UserError(f"onnxruntime gave {name} of shape {o.shape} for batch {n}; PyTorch {e.shape}")
            diff = np.abs(o.astype(np.float64) - e.astype(np.float64))
            diff[np.isnan(o) & np.isnan(e)] = 0.0
            worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max()))
    return worst


def check_out(out: Path, checkpoint: Path) -> None:
    """A UserError, before any work, where out would write over the checkpoint, is a folder or lies under a file, or
    lacks the .onnx suffix by which inference.load_model tells an ONNX model (demo.py, evaluate.py and serve.py would
    read it as a .pt)."""
    if out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out}: is the --checkpoint, which the ONNX file would overwrite; name another file, "
                        f"e.g. {checkpoint.with_suffix('.onnx')}")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the .onnx file to write, e.g. "
                        f"{out / checkpoint.with_suffix('.onnx').name}")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: not a .onnx file name, which is how the scripts that load it tell an ONNX model; "
                        f"e.g. {out.with_suffix('.onnx')}")
    check_output_folder(out.parent, f"--out {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--checkpoint", default=config.CHECKPOINT, help="best.pt written by train.py (default: %(default)s)")
    p.add_argument("--out", default=None, help="the .onnx file to write (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=config.ONNX_OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: dynamo, falling back to torchscript (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=config.ONNX_TOLERANCE,
                   help="largest allowed |onnxruntime - PyTorch| (default: %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="average each face with its mirror image inside the graph (twice the compute)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if Path(args.checkpoint).suffix.lower() == ".onnx":
        raise UserError(f"--checkpoint {args.checkpoint}: already ONNX; export.py reads a best.pt written by train.py")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    check_out(out, Path(args.checkpoint))
    model, cfg = load_model(args.checkpoint, torch.device("cpu"))
    size = int(cfg["size"])
    module = wrapped(model.float(), args.flip)
    data, used = to_onnx(module, size, args.opset, args.exporter)
    meta = dict(input=f"{INPUT}: float32 (N, 3, {size}, {size}), an aligned RGB face normalised as data_gen.preprocess",
                outputs="gender_prob (N, 2): softmax over (female, male) of logits / gender_temperature; age (N,): years; "
                        f"age_std, age_low, age_high (N,): the spread and the {100 * config.AGE_INTERVAL:g}% interval of "
                        "the age distribution (NaN: l1/l2)",
                size=size, flip=args.flip, gender_temperature=model.gender_temperature, age_interval=config.AGE_INTERVAL,
                arch=cfg.get("arch"), age_loss=cfg.get("age_loss"), checkpoint=str(args.checkpoint),
                exporter=used, mean=[float(v) for v in IMAGENET_MEAN], std=[float(v) for v in IMAGENET_STD])
    data = add_metadata(data, meta)
    diff = check(module, data, size)
    ok = diff <= args.tolerance
    target = out if ok else out.with_name(out.name + ".failed")
    atomic_write_bytes(target, data)
    print(f"wrote {target} ({len(data) / 1e6:.1f} MB, {used} exporter, opset {args.opset}, batch dimension dynamic)")
    print(f"onnxruntime vs PyTorch, batches 1 and 5: largest difference {diff:.3g} (tolerance {args.tolerance:g})")
    if not ok:
        raise UserError(f"the ONNX model differs from PyTorch by {diff:.3g} > --tolerance {args.tolerance:g}; "
                        f"kept it as {target} for inspection")
    return dict(out=str(target), exporter=used, max_diff=diff)


if __name__ == "__main__":
    run_main(main)
