"""Face detection (MTCNN in PyTorch, or its three nets in onnxruntime) and alignment onto the ArcFace 5-point template.

Not run directly: the one implementation of detection + alignment, shared by pre_process.py,
demo.py, evaluate.py and the benchmark. In Python:

    from face import FaceDetector, align_face
    faces = FaceDetector(device="cpu").detect([rgb])[0]          # boxes, scores, landmarks (K, 5, 2)
    aligned = align_face(rgb, faces.landmarks[0], size=112)       # (112, 112, 3) uint8

Detection replicates the algorithm of the `mtcnn` PyPI package, version 1.0.0 (the TensorFlow
implementation by Iván de Paz Centeno), and loads the weights that package ships. Its stages:

  P-Net  over an image pyramid (scales 0.6 * 0.709**k, area resampling), threshold 0.6,
         NMS 0.5 per scale, NMS 0.7 across scales, boxes made square;
  R-Net  on 24x24 bilinear crops of those boxes, threshold 0.7, NMS 0.7, boxes made square;
  O-Net  on 48x48 crops, threshold 0.8, 5 landmarks, NMS 0.7 (intersection over the smaller box);
  boxes clipped to the image (the package's default `fit_to_image=True`), landmarks not.

The package is never imported: its __init__ imports TensorFlow, which crashes when imported
after torchvision. We only read its weight files (`pip install mtcnn==1.0.0`).

Batching: the pyramid levels of every image of a batch are packed into equal tiles that P-Net
runs over as one batch, and R-Net / O-Net run once over the candidates of all images; a batch
gives the per-image results (up to float rounding).

FaceDetector(backend="onnx") runs the three nets in onnxruntime instead of torch (inference.Predictor
does so for an .onnx model): they are exported once with torch.onnx into a cache folder
(config.MTCNN_ONNX_CACHE, keyed by the weights and the nets' code) that later runs read; the
arithmetic between the nets stays as it is.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import config
from utils import atomic_write_bytes, onnx_session, read_image_or_reason

# --- alignment template -------------------------------------------------------------------

# ArcFace / InsightFace 5-point template for a 112x112 crop: left eye, right eye (as seen in the
# image), nose tip, left and right mouth corners, in (x, y) pixels.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# IMDB-WIKI crops keep a 40% margin on each side of the face box, so the face is the middle
# 1 / (1 + 2 * 0.4) of each dimension of the crop.
IMDB_MARGIN = 0.4

# --- MTCNN constants of the mtcnn 1.0.0 package (its keyword defaults) -----------------------

_MIN_SIZE = 12  # P-Net's receptive field: the smallest pyramid level it can see a face in
_ONET_SIDE = 48  # O-Net's input: the detail at which every face is finally judged
_PNET_STRIDE = 2
_PNET_CELL = 12
_NMS_PNET_PER_SCALE = 0.5
_NMS_PNET_ALL = 0.7
_NMS_RNET = 0.7
_NMS_ONET = 0.7  # with method "min"

# Caps on temporaries, so a big batch or a huge photo degrades to several passes, not to OOM.
_MAX_CANVAS_PIXELS = 4_000_000  # P-Net tiles per pass: ~ 4M px -> ~ 0.3 GB of activations (float32)
# On a CPU, P-Net over more than ~ 2 tiles of 384 x 384 per pass (or over one much larger tile)
# falls out of cache and runs 2-3x slower per pixel. A tile still grows to hold the largest level.
_CPU_CANVAS_PIXELS = 2 * 384 * 384
_TILE = 384
_MAX_NMS_PAIRS = 1 << 20  # box pairs compared at once in NMS
_MAX_CROP_PIXELS = 4096 * 24 * 24  # R-Net / O-Net input pixels per forward pass (~ 30 MB)
# On a CPU, R-Net over 128 crops a pass (O-Net over 32) keeps each activation near 7 MB: 64 IMDB-sized photos gave
# R-Net 674 crops, whose first activations at once are 36 MB each, and both nets ran 1.1-1.3x faster in such chunks.
_CPU_CROP_PIXELS = 128 * 24 * 24


# --- weights --------------------------------------------------------------------------------

_INSTALL_HINT = "pip install mtcnn==1.0.0  (only its weight files are used; it is never imported)"


def mtcnn_weights_dir() -> str:
    """The folder holding pnet.lz4, rnet.lz4, onet.lz4 inside the installed `mtcnn` package."""
    # find_spec on a top-level name locates the package without running its __init__ (TensorFlow)
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MTCNN weights not found: the `mtcnn` package is not installed; {_INSTALL_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def load_mtcnn_weights(name: str) -> list[np.ndarray]:
    """The Keras weight list of one net ("pnet", "rnet" or "onet") as the package ships it."""
    path = os.path.join(mtcnn_weights_dir(), f"{name}.lz4")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MTCNN weights not found at {path}; {_INSTALL_HINT}")
    import joblib  # lazy: only needed here, and it pulls in lz4

    weights = joblib.load(path)
    return [np.asarray(w, dtype=np.float32) for w in weights]


def _load_keras(modules: Sequence[nn.Module], weights: list[np.ndarray],
                flatten_hwc: dict[int, tuple[int, int, int]]) -> None:
    """Copy a Keras weight list into torch modules given in the Keras layer order.

    Conv kernels are HWIO in Keras, OIHW in torch. Dense kernels are (in, out). The first dense
    layer of R-Net / O-Net follows Permute((2, 1, 3)) + Flatten of an NHWC tensor, i.e. its inputs
    are ordered (W, H, C); we reorder its columns to (C, H, W) once here so that forward() can
    flatten the NCHW tensor directly. `flatten_hwc` maps such a module's position to (H, W, C).
    """
    it = iter(weights)

    def take() -> np.ndarray:
        value = next(it, None)
        if value is None:
            raise ValueError("MTCNN weight file has fewer arrays than the network has parameters")
        return value

    def put(param: torch.Tensor, value: np.ndarray) -> None:
        if tuple(param.shape) != value.shape:  # copy_ would broadcast silently
            raise ValueError(f"MTCNN weight shape {value.shape} does not fit {tuple(param.shape)}")
        param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    for pos, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            put(m.weight, take().transpose(3, 2, 0, 1))  # HWIO -> OIHW
            put(m.bias, take())
        elif isinstance(m, nn.Linear):
            w = take().T  # (in, out) -> (out, in)
            if pos in flatten_hwc:
                h, wd, c = flatten_hwc[pos]
                w = w.reshape(-1, wd, h, c).transpose(0, 3, 2, 1).reshape(w.shape[0], -1)
            put(m.weight, w)
            put(m.bias, take())
        elif isinstance(m, nn.PReLU):
            put(m.weight, take().reshape(-1))  # (1, 1, C) shared over H, W -> (C,)
        else:
            raise TypeError(f"unexpected module {m!r}")
    if next(it, None) is not None:
        raise ValueError("MTCNN weight file has more arrays than the network has parameters")


# --- networks -------------------------------------------------------------------------------

def keras_max_pool(x: torch.Tensor, k: int, s: int, same: bool) -> torch.Tensor:
    """Keras MaxPooling2D(k, s, padding="same" | "valid") of (N, C, H, W).

    "same" pads with -inf (never the max) as TF does: out = ceil(L / s), the smaller half of the
    pad before. On NCHW tensors, written as a running max over k strided views per axis: on a CPU
    several times faster than torch's max-pool layer. On NHWC (channels_last) tensors torch's
    layer is the fast one, and it is used where TF's padding is all after the input (ceil_mode).
    Exported to ONNX it is that layer (MaxPool) wherever it is exact.
    """
    outs, pads = [], []
    for length in x.shape[2:]:
        out = -(-length // s) if same else (length - k) // s + 1
        outs.append(out)
        pads.append(max((out - 1) * s + k - length, 0) if same else 0)
    # (one channel reads as both layouts: such a tensor keeps the strided path). Exported, the layer is taken
    # wherever it is exact: the strided views would fix the traced size's padding in the graph, wrong for
    # P-Net's other sizes.
    layer = torch.onnx.is_in_onnx_export() or x.is_contiguous(memory_format=torch.channels_last)
    if layer and x.shape[1] > 1 and all(p // 2 == 0 for p in pads):
        y = F.max_pool2d(x, k, s, ceil_mode=same)
        if list(y.shape[2:]) == outs:  # ceil_mode drops a window that would start in the padding
            return y
    for axis, out, pad in zip((2, 3), outs, pads):
        if pad:
            spec = [0, 0, 0, 0]
            spec[(3 - axis) * 2:(3 - axis) * 2 + 2] = [pad // 2, pad - pad // 2]
            x = F.pad(x, spec, value=float("-inf"))
        span = (out - 1) * s + 1
        y = None
        for j in range(k):
            v = x.narrow(axis, j, span)
            v = v[..., ::s, :] if axis == 2 else v[..., ::s]
            y = v if y is None else torch.maximum(y, v)
        x = y
    return x


class PReLU(nn.PReLU):
    """nn.PReLU that runs a channels_last (N, C, H, W) input on the CPU as N * H rows of W * C values.

    Torch's CPU kernel loops over the channels innermost on such a tensor, and MTCNN's 10 to 32 channels
    fill a vector register once or not at all: P-Net's first PReLU took 5x as long as in rows of W * C
    (the weight tiled W times; the same products, bit for bit). Exported to ONNX it is the plain layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last)
                or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        n, c, h, w = x.shape
        y = F.prelu(x.permute(0, 2, 3, 1).reshape(n * h, w * c), self.weight.repeat(w))  # (N * H, W * C)
        return y.view(n, h, w, c).permute(0, 3, 1, 2)  # (N, C, H, W), channels_last


class PNet(nn.Module):
    """Proposal net: fully convolutional, a 12x12 window every 2 px -> box offsets, face prob."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)  # box regression
        self.conv4_2 = nn.Conv2d(32, 2, 1)  # face / not face

    def keras_order(self) -> list[nn.Module]:
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3, self.conv4_1, self.conv4_2]

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W) normalised -> offsets (N, 4, h, w), face prob (N, h, w).

        valid (N, 1, H-2, W-2) bool marks conv1 outputs that lie inside an image packed into x;
        the rest become -inf so that max-pooling ignores them, exactly as the "same" padding of a
        separate per-image run would. Outputs whose window leaves their image are garbage
        (possibly NaN) and must be discarded by the caller.
        """
        x = self.prelu1(self.conv1(x))  # (N, 10, H-2, W-2)
        if valid is not None:  # in place: on a CPU 3.5x faster than a new tensor
            x = x.masked_fill_(~valid, float("-inf"))
        x = keras_max_pool(x, 2, 2, same=True)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))  # (N, 32, h, w)
        return self.conv4_1(x), F.softmax(self.conv4_2(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement net: 24x24 crop -> box offsets (N, 4), face prob (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), PReLU(128)
        self.fc5_1 = nn.Linear(128, 4)
        self.fc5_2 = nn.Linear(128, 2)

    def keras_order(self) -> list[nn.Module]:
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3,
                self.fc4, self.prelu4, self.fc5_1, self.fc5_2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = keras_max_pool(self.prelu1(self.conv1(x)), 3, 2, same=True)  # (N, 28, 11, 11)
        x = keras_max_pool(self.prelu2(self.conv2(x)), 3, 2, same=False)  # (N, 48, 4, 4)
        x = self.prelu3(self.conv3(x))  # (N, 64, 3, 3)
        x = self.prelu4(self.fc4(x.flatten(1)))  # (N, 128)
        return self.fc5_1(x), F.softmax(self.fc5_2(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: 48x48 crop -> box offsets (N, 4), landmarks (N, 10) as x1..x5, y1..y5, prob (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), PReLU(256)
        self.fc6_1 = nn.Linear(256, 4)
        self.fc6_2 = nn.Linear(256, 10)
        self.fc6_3 = nn.Linear(256, 2)

    def keras_order(self) -> list[nn.Module]:
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3, self.conv4, self.prelu4,
                self.fc5, self.prelu5, self.fc6_1, self.fc6_2, self.fc6_3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = keras_max_pool(self.prelu1(self.conv1(x)), 3, 2, same=True)  # (N, 32, 23, 23)
        x = keras_max_pool(self.prelu2(self.conv2(x)), 3, 2, same=False)  # (N, 64, 10, 10)
        x = keras_max_pool(self.prelu3(self.conv3(x)), 2, 2, same=True)  # (N, 64, 4, 4)
        x = self.prelu4(self.conv4(x))  # (N, 128, 3, 3)
        x = self.prelu5(self.fc5(x.flatten(1)))  # (N, 256)
        return self.fc6_1(x), self.fc6_2(x), F.softmax(self.fc6_3(x), dim=1)[:, 1]


@torch.no_grad()
def load_mtcnn() -> tuple[PNet, RNet, ONet]:
    """The three nets with the mtcnn package's weights, in eval mode on the CPU."""
    pnet, rnet, onet = PNet(), RNet(), ONet()
    _load_keras(pnet.keras_order(), load_mtcnn_weights("pnet"), {})
    _load_keras(rnet.keras_order(), load_mtcnn_weights("rnet"), {6: (3, 3, 64)})
    _load_keras(onet.keras_order(), load_mtcnn_weights("onet"), {8: (3, 3, 128)})
    return pnet.eval(), rnet.eval(), onet.eval()


# --- the same nets in onnxruntime -------------------------------------------------------------

_NETS = ("pnet", "rnet", "onet")
# each graph's input and output names, in the order of forward()'s arguments and results
_ONNX_IO = {"pnet": (("x", "valid"), ("reg", "prob")),
            "rnet": (("x",), ("reg", "prob")),
            "onet": (("x",), ("reg", "landmarks", "prob"))}


class OnnxNet:
    """One MTCNN net exported to ONNX, run by onnxruntime, called as its torch module is: CPU tensors in and out."""

    def __init__(self, model: str | bytes, inputs: Sequence[str]) -> None:
        self.session, self.inputs = onnx_session(model), tuple(inputs)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # NCHW, as the graph takes it (its CPU kernels repack to their own blocked layout)
        feed = {name: t.contiguous().numpy() for name, t in zip(self.inputs, args)}
        return tuple(torch.from_numpy(a) for a in self.session.run(None, feed))


def _export_net(name: str, net: nn.Module) -> bytes:
    """One net as ONNX bytes: the dynamo exporter at export.py's opset; batch free, and P-Net's height and width."""
    batch = torch.export.Dim("batch", min=1)
    if name == "pnet":
        h, w = torch.export.Dim("height", min=_PNET_CELL), torch.export.Dim("width", min=_PNET_CELL)
        args = (torch.randn(2, 3, 40, 46), torch.ones(2, 1, 38, 44, dtype=torch.bool))
        dynamic = {"x": {0: batch, 2: h, 3: w}, "valid": {0: batch, 2: h - 2, 3: w - 2}}
    else:
        side = 24 if name == "rnet" else _ONET_SIDE
        args, dynamic = (torch.randn(2, 3, side, side),), {"x": {0: batch}}
    inputs, outputs = _ONNX_IO[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and progress warnings
        program = torch.onnx.export(net, args, dynamo=True, opset_version=config.ONNX_OPSET, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=dynamic, verbose=False)
    return program.model_proto.SerializeToString()


def _onnx_key() -> str:
    """What the exported graphs depend on: the weight files, the nets' code, the opset and torch's exporter."""
    digest = hashlib.sha256(f"{config.ONNX_OPSET} {torch.__version__}".encode())
    for name in _NETS:
        digest.update(Path(mtcnn_weights_dir(), f"{name}.lz4").read_bytes())
    for code in (keras_max_pool, PReLU, _load_keras, PNet, RNet, ONet, load_mtcnn, _export_net):
        digest.update(inspect.getsource(code).encode())
    return digest.hexdigest()[:16]


def onnx_mtcnn(cache: str | os.PathLike = config.MTCNN_ONNX_CACHE) -> tuple[OnnxNet, OnnxNet, OnnxNet]:
    """P-Net, R-Net, O-Net in onnxruntime, exported once (~10 s on 2 cores) into cache/<key>/ and read from there.

    Where the cache cannot be written the graphs are exported in memory for this process alone,
    with a warning on stderr: every start then pays the export again.
    """
    folder = Path(cache).expanduser() / _onnx_key()
    paths = [folder / f"{name}.onnx" for name in _NETS]
    if all(p.is_file() for p in paths):
        models: list[str | bytes] = [str(p) for p in paths]
    else:
        models = [_export_net(name, net) for name, net in zip(_NETS, load_mtcnn())]
        try:
            for path, data in zip(paths, models):
                atomic_write_bytes(path, data)
        except OSError as e:
            print(f"warning: cannot write the MTCNN ONNX cache {folder} ({e.strerror or e}); exported in memory "
                  "for this run only; point XDG_CACHE_HOME at a writable folder to keep it", file=sys.stderr)
    pnet, rnet, onet = (OnnxNet(m, _ONNX_IO[name][0]) for name, m in zip(_NETS, models))
    return pnet, rnet, onet


# --- results --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is elementwise, not a bool
class Faces:
    """The faces found in one image, sorted by score, highest first.

    boxes      (K, 4) float32  x1, y1, x2, y2 in pixels, clipped to the image
    scores     (K,)   float32  O-Net face probability
    landmarks  (K, 5, 2) float32  (x, y) of left eye, right eye, nose, mouth left, mouth right,
               "left" as seen in the image (the person's right); not clipped
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> "Faces":
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


# --- building blocks of the detector (torch, device-agnostic) ---------------------------------

def pyramid_scales(height: int, width: int, min_face_size: int = 20, scale_factor: float = 0.709) -> np.ndarray:
    """The package's pyramid: (12 / min_face_size) * scale_factor**k, its own count rule (float64)."""
    min_dim = min(width, height)
    if min_dim <= 0:
        return np.zeros((0,), np.float64)
    count = round(-((np.log(min_dim / _MIN_SIZE) / np.log(scale_factor)) + 1))
    return (_MIN_SIZE / min_face_size) * scale_factor ** np.arange(max(count, 0))


def _pnet_out(size: int) -> int:
    """P-Net output length for an input length: conv3x3, pool2 ("same"), conv3x3, conv3x3."""
    return max(-(-(size - 2) // 2) - 4, 0)


def pyramid_rects(height: int, width: int, min_face_size: int, scale_factor: float) -> list[tuple[float, int, int]]:
    """(scale, h, w) of each level of a photo's pyramid that P-Net can run on."""
    rects = []
    for s in pyramid_scales(height, width, min_face_size, scale_factor):
        # the package passes shape * scale (float) as the size; TF truncates it to int32
        hs, ws = int(height * s), int(width * s)
        if _pnet_out(hs) > 0 and _pnet_out(ws) > 0:
            rects.append((float(s), hs, ws))
    return rects


def _area_taps(pairs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Taps of TensorFlow's ResizeArea along one axis for each (in_size, out_size) pair, computed together.

    Returns indices and weights, each flat: pair p's (out_p, K_p) taps in row-major order, one pair
    after the other, and the (out_p, K_p) of each pair. Output cell o covers input span [o*s, (o+1)*s),
    s = in/out, each input cell weighted by the fraction it covers, divided by s; indices are clamped
    as TF does; float32 like the TF kernel. One vectorised pass over every pair: a batch's pyramids
    have hundreds of distinct pairs, and numpy's per-call cost made them ~0.1 ms each.
    """
    n_in = np.array([n for n, _ in pairs], dtype=np.int64)
    n_out = np.array([n for _, n in pairs], dtype=np.int64)
    if (n_out < 1).any() or (n_in < 1).any():
        raise ValueError(f"sizes must be positive: {list(pairs)}")
    row_pair = np.repeat(np.arange(len(pairs)), n_out)  # (R,) the pair of each output cell
    first_row = np.cumsum(n_out) - n_out
    s = (n_in.astype(np.float32) / n_out.astype(np.float32))[row_pair]  # (R,)
    o = (np.arange(row_pair.size) - first_row[row_pair]).astype(np.float32)
    lo, hi = o * s, (o + 1) * s
    start, end = np.floor(lo).astype(np.int64), np.ceil(hi).astype(np.int64)
    k_pair = np.maximum.reduceat(end - start, first_row)  # K of each pair: its widest span
    k_row = k_pair[row_pair]
    cell = np.repeat(np.arange(row_pair.size), k_row)  # (E,) the output cell of each tap
    i = start[cell] + np.arange(cell.size) - np.repeat(np.cumsum(k_row) - k_row, k_row)
    fi, lo, hi, s = i.astype(np.float32), lo[cell], hi[cell], s[cell]
    w = np.where(fi < lo, np.where(fi + 1 > hi, s, fi + 1 - lo), np.where(fi + 1 > hi, hi - fi, np.float32(1)))
    w = np.where(i < end[cell], w, 0).astype(np.float32) / s
    return np.clip(i, 0, n_in[row_pair[cell]] - 1), w, list(zip(n_out.tolist(), k_pair.tolist()))


Taps = tuple[torch.Tensor, torch.Tensor]  # one axis' taps on a device: indices (out * K,), weights (out, 1, K)


def area_taps_on(pairs: Sequence[tuple[int, int]], device: torch.device) -> list[Taps]:
    """_area_taps of each (in_size, out_size) pair on `device`, sent in one copy of indices and one of weights.

    On a GPU a copy from pageable host memory waits for the device to finish its queue: one pair of
    copies for a whole P-Net pass, not one per pyramid level and axis, keeps the host ahead. The
    taps come shaped as _resize_rows takes them, so a level costs no reshaping of its own.
    """
    indices, weights, shapes = _area_taps(pairs)
    sizes = [n * k for n, k in shapes]
    indices = torch.from_numpy(indices).to(device).split(sizes)
    weights = torch.from_numpy(weights).to(device).split(sizes)
    return [(i, w.view(n, 1, k)) for i, w, (n, k) in zip(indices, weights, shapes)]


def _resize_rows(x: torch.Tensor, taps: Taps) -> torch.Tensor:
    """Area-resample along the first axis of x (L, ...) -> (out, 1, prod(...)): gather whole rows (L's slices, of
    any strides), then one weighted sum each."""
    idx, w = taps  # (out * K,), (out, 1, K)
    rows = x.index_select(0, idx)  # (out * K, ...), contiguous
    return torch.bmm(w, rows.view(w.shape[0], w.shape[2], -1))  # (out, 1, M)


def area_resize(image: torch.Tensor, taps_y: Taps, taps_x: Taps) -> torch.Tensor:
    """TensorFlow-exact AREA resize of an (H, W, C) float image -> (C, out_h, out_w), any device.

    taps_y, taps_x: area_taps_on's for (H, out_h) and (W, out_w). Separable; each pass gathers
    whole rows (of the image, then of its transpose, strided) instead of single elements. On a GPU
    the host's work per op sets P-Net's pace: ten ops a pyramid level.
    """
    w, c = image.shape[1:]
    out_h, out_w = taps_y[1].shape[0], taps_x[1].shape[0]
    x = _resize_rows(image, taps_y).view(out_h, w, c).transpose(0, 1)  # (W, out_h, C), strided
    x = _resize_rows(x, taps_x)  # (out_w, 1, out_h*C)
    return x.view(out_w, out_h, c).permute(2, 1, 0)  # (C, out_h, out_w)


def _pair_iou(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """IoU of box pairs (P, 4) x (P, 4); areas without the +1 of pixel-inclusive conventions, as the package."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    denom = area_a + area_b - inter if method == "union" else torch.minimum(area_a, area_b)
    return inter / denom


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
             method: str = "union") -> torch.Tensor:
    """Indices kept by the package's NMS within each group, ordered by (group, score descending).

    The package's NMS is not the greedy one: a box is dropped when ANY higher-scored box of its
    group overlaps it by more than `threshold`, even a box that was itself dropped ("fast NMS").
    We reproduce that. Only same-group pairs are compared, in bounded chunks, so there is no
    (N, N) matrix across a whole batch and no Python loop over boxes.
    """
    n = scores.shape[0]
    dev = scores.device
    if n == 0:
        return torch.zeros((0,), dtype=torch.long, device=dev)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # contiguous groups, best first
    b = boxes[order]
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    first = torch.repeat_interleave(starts, counts)  # (n,) position of the group's best box
    rank = torch.arange(n, device=dev) - first  # boxes ahead of each one in its group
    ends = torch.cumsum(rank, 0)  # pair ranges: box i owns pairs [ends[i] - rank[i], ends[i])
    total = int(ends[-1])
    suppressed = torch.zeros(n, dtype=torch.bool, device=dev)
    if total > 0:
        # element boundaries so that each chunk holds about _MAX_NMS_PAIRS pairs
        cuts = []
        if total > _MAX_NMS_PAIRS:
            marks = torch.arange(_MAX_NMS_PAIRS, total, _MAX_NMS_PAIRS, device=dev)
            cuts = torch.searchsorted(ends, marks, right=True).tolist()
        bounds = [0, *cuts, n]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            r = rank[lo:hi]
            i = torch.repeat_interleave(torch.arange(lo, hi, device=dev), r)  # (P,)
            if i.numel() == 0:
                continue
            k = torch.arange(i.numel(), device=dev) - (torch.cumsum(r, 0) - r)[i - lo]
            j = first[i] + k  # the k-th better box of i's group
            hit = _pair_iou(b[i], b[j], method) > threshold  # NaN (empty boxes) -> False, like numpy
            suppressed[i[hit]] = True
    return order[~suppressed]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box (N, 4) to a square around its centre, side = its longer side."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _refine(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """R-Net / O-Net regression: offsets in units of the pixel-inclusive size (x2 - x1 + 1)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * torch.stack([w, h, w, h], dim=1)


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (..., 3) -> the values P-Net takes, (rgb - 127.5) / 128, float32 (..., 3)."""
    return pixels.float().sub_(127.5).div_(128.0)  # in place: one buffer, not three


def host_pyramid(image: np.ndarray, min_face_size: int, scale_factor: float) -> list[np.ndarray]:
    """P-Net's pyramid of one RGB uint8 photo (H, W, 3), made on the CPU: (h, w, 3) float32 per pyramid_rects level.

    detect(..., pyramids=) draws these on P-Net's canvas on the host and sends it in one copy a
    pass: on a GPU the levels resized there cost the feeding thread ~19 dispatches each (5 or 6
    levels an IMDB crop), and this runs beforehand, on other threads or processes (prepare_crop). The same
    area_resize as detect()'s, so on a CPU the values are the same, bit for bit.
    """
    rects = pyramid_rects(*image.shape[:2], min_face_size, scale_factor)
    if not rects:
        return []
    h, w = image.shape[:2]
    taps = area_taps_on([pair for _, hs, ws in rects for pair in ((h, hs), (w, ws))], torch.device("cpu"))
    x = normalized(torch.from_numpy(image.astype(np.float32)))  # (H, W, 3); a copy, so a read-only photo will do
    return [area_resize(x, taps_y, taps_x).permute(1, 2, 0).numpy() for taps_y, taps_x in zip(taps[::2], taps[1::2])]


class _Batch:
    """All images of one detect() call in a single flat (sum H*W, 3) normalised buffer.

    One buffer (instead of a padded stack) lets crops gather from images of different sizes
    without padding, which would change the results at the borders.
    """

    def __init__(self, images: list[np.ndarray], device: torch.device) -> None:
        self.shapes = [im.shape[:2] for im in images]
        sizes = [h * w for h, w in self.shapes]
        self.bases = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        flat = torch.from_numpy(np.concatenate([im.reshape(-1, 3) for im in images]))  # (M, 3) uint8
        self.flat = normalized(flat.to(device))  # (M, 3): one host->device copy, normalised there, no transpose
        self.base_t = torch.from_numpy(self.bases).to(device)
        self.h_t = torch.tensor([h for h, _ in self.shapes], device=device)
        self.w_t = torch.tensor([w for _, w in self.shapes], device=device)

    def image(self, i: int) -> torch.Tensor:
        """Image i as (H, W, 3), a view of the buffer."""
        h, w = self.shapes[i]
        b = int(self.bases[i])
        return self.flat[b:b + h * w].view(h, w, 3)

    def crops(self, img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """tf.image.crop_and_resize (bilinear, extrapolation 0) of pixel boxes (N, 4) -> (N, 3, size, size).

        TF takes boxes normalised by the image size and samples at box * (size - 1), so a box's
        pixel coordinates are scaled by (H - 1) / H; we keep that to stay on the reference.
        """
        hgt = self.h_t[img].float()[:, None]  # (N, 1)
        wid = self.w_t[img].float()[:, None]
        t = torch.arange(size, device=boxes.device, dtype=torch.float32)[None]  # (1, S)
        y1, x1 = boxes[:, 1:2] / hgt, boxes[:, 0:1] / wid
        y2, x2 = boxes[:, 3:4] / hgt, boxes[:, 2:3] / wid
        in_y = y1 * (hgt - 1) + t * ((y2 - y1) * (hgt - 1) / (size - 1))  # (N, S)
        in_x = x1 * (wid - 1) + t * ((x2 - x1) * (wid - 1) / (size - 1))
        inside = ((in_y >= 0) & (in_y <= hgt - 1))[:, :, None] & ((in_x >= 0) & (in_x <= wid - 1))[:, None, :]
        y0f, x0f = torch.floor(in_y), torch.floor(in_x)
        ly, lx = (in_y - y0f)[:, :, None, None], (in_x - x0f)[:, None, :, None]
        hmax, wmax = hgt.long() - 1, wid.long() - 1
        top, bottom = y0f.long().clamp(min=0).minimum(hmax), torch.ceil(in_y).long().clamp(min=0).minimum(hmax)
        left, right = x0f.long().clamp(min=0).minimum(wmax), torch.ceil(in_x).long().clamp(min=0).minimum(wmax)
        base = self.base_t[img][:, None, None]
        stride = wid.long()[:, :, None]

        def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.flat[base + r[:, :, None] * stride + c[:, None, :]]  # (N, S, S, 3)

        tl, tr, bl, br = at(top, left), at(top, right), at(bottom, left), at(bottom, right)
        upper = tl + (tr - tl) * lx
        lower = bl + (br - bl) * lx
        out = torch.where(inside[..., None], upper + (lower - upper) * ly, torch.zeros((), device=boxes.device))
        return out.permute(0, 3, 1, 2)  # (N, 3, S, S), channels_last in memory


def tile_side(rects: list[tuple[int, float, int, int]]) -> int:
    """Smallest side of a P-Net tile: _TILE, or less where all pyramid levels fit in one smaller tile.

    P-Net's cost is the tile's area, so a small photo (or a large min_face_size) must not pay for a
    mostly empty 384 x 384 canvas; the 1.3 leaves room for the shelf packing's waste.
    """
    area = sum(hs * ws for _, _, hs, ws in rects)
    return min(_TILE, math.ceil(math.sqrt(1.3 * area) / 2) * 2)


def _pack(rects: list[tuple[int, int]], min_side: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Shelf-pack rectangles (h, w) into equal tiles: (tile h, tile w, [(tile, y, x) per rect]).

    Equal tiles stack into one batch for P-Net. Offsets are even so each rect keeps P-Net's
    stride-2 grid. First-fit decreasing height; a rect never spans two tiles.
    """
    even = [((h + 1) // 2 * 2, (w + 1) // 2 * 2) for h, w in rects]
    tile_h = max(min_side, max(h for h, _ in even))
    tile_w = max(min_side, max(w for _, w in even))
    where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(rects)
    shelves: list[list[int]] = []  # shelves of the current tile: [y, height, used width]
    tile, used_h = 0, 0
    for r in sorted(range(len(rects)), key=lambda r: (-even[r][0], -even[r][1])):
        h, w = even[r]
        for shelf in shelves:
            if shelf[2] + w <= tile_w and h <= shelf[1]:
                where[r] = (tile, shelf[0], shelf[2])
                shelf[2] += w
                break
        else:
            if used_h + h > tile_h:  # the tile is full: start the next one
                tile, used_h, shelves = tile + 1, 0, []
            shelves.append([used_h, h, w])
            where[r] = (tile, used_h, 0)
            used_h += h
    return tile_h, tile_w, where


# --- the detector ---------------------------------------------------------------------------

def as_rgb(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 (H, W, 3) photo as the detector takes it: a grey (H, W) or (H, W, 1) one made RGB."""
    image = np.asarray(image)
    if image.ndim == 2:  # grayscale photos (common in IMDB-WIKI): replicate to RGB
        image = image[:, :, None]
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


class FaceDetector:
    """MTCNN face + 5-landmark detector (the mtcnn 1.0.0 package's algorithm and weights).

    Defaults are the package's: min_face_size 20, scale factor 0.709, thresholds 0.6 / 0.7 / 0.8
    for P-Net / R-Net / O-Net. backend "torch" runs the three nets as torch modules on `device`;
    "onnx" runs them in onnxruntime (onnx_mtcnn, exported into onnx_cache), on the CPU only, and
    keeps torch for the arithmetic between them (pyramid, NMS, crops), which runs no network.
    """

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), scale_factor: float = 0.709,
                 backend: str = "torch", onnx_cache: str | os.PathLike = config.MTCNN_ONNX_CACHE) -> None:
        self.device = torch.device(device)
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = scale_factor
        if backend == "onnx":
            if self.device.type != "cpu":
                raise ValueError(f"the onnx backend runs on the CPU, not on {self.device}")
            # NCHW, the layout onnxruntime takes; on 2 CPU cores it ran P-Net 2x, R-Net 1.7x, O-Net 1.5x faster
            # than torch's NHWC below
            self.memory_format = torch.contiguous_format
            self.pnet, self.rnet, self.onet = onnx_mtcnn(onnx_cache)
        elif backend == "torch":
            # NHWC (channels_last) tensors throughout: on a CPU, R-Net runs 2x faster than NCHW, O-Net 1.3x, P-Net 1.05x
            self.memory_format = torch.channels_last
            self.pnet, self.rnet, self.onet = (m.to(self.device, memory_format=self.memory_format) for m in load_mtcnn())
        else:
            raise ValueError(f"backend {backend!r}: torch or onnx")

    def crop_plan(self, host_pyramid: bool = True) -> CropPlan:
        """prepare_crop's plan for this detector: with P-Net's pyramids made on the host for a GPU (unless host_pyramid
        is False), where resizing the levels in detect() costs the feeding thread ~82 ops a photo. Never for a CPU:
        there detect() resizes a pass's levels together, 6.9 ms a photo against 7.9 made ahead (2 cores, batches of
        16, 2026-12-07)."""
        return CropPlan(self.min_face_size, self.scale_factor, host_pyramid and self.device.type != "cpu")

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], min_face_sizes: Sequence[int] | None = None,
               pyramids: Sequence[list[np.ndarray]] | None = None) -> list[Faces]:
        """Faces of each RGB uint8 (H, W, 3) image (sizes may differ; (H, W) gray is accepted); one Faces per image.

        min_face_sizes, one per image, replaces self.min_face_size for that image's pyramid (P-Net
        then never scans the scales of smaller faces). pyramids, one per image: its host_pyramid
        (for its min face size and this scale_factor), made ahead. Results equal those of
        detecting each image alone, up to float rounding.
        """
        if len(images) == 0:
            return []
        n = len(images)
        min_faces = [self.min_face_size] * n if min_face_sizes is None else list(min_face_sizes)
        if len(min_faces) != n or (pyramids is not None and len(pyramids) != n):
            raise ValueError(f"{len(min_faces)} min_face_sizes and {n if pyramids is None else len(pyramids)} "
                             f"pyramids for {n} images")
        batch = _Batch([as_rgb(im) for im in images], self.device)
        boxes, img = self._stage_pnet(batch, min_faces, pyramids)
        if boxes.shape[0]:
            boxes, img = self._stage_rnet(batch, boxes, img)
        if boxes.shape[0] == 0:
            return [Faces.empty() for _ in range(n)]
        boxes, scores, marks, img = self._stage_onet(batch, boxes, img)
        # clip boxes to the image like the package's fit_to_image (landmarks stay as predicted)
        boxes = torch.stack([boxes[:, 0].clamp(min=0).minimum(batch.w_t[img] - 1),
                             boxes[:, 1].clamp(min=0).minimum(batch.h_t[img] - 1),
                             boxes[:, 2].clamp(min=0).minimum(batch.w_t[img] - 1),
                             boxes[:, 3].clamp(min=0).minimum(batch.h_t[img] - 1)], dim=1)
        # one device->host copy for the whole batch; rows are already sorted by (image, score desc)
        counts = torch.bincount(img, minlength=n).cpu().numpy()
        boxes_np = boxes.float().cpu().numpy()
        scores_np = scores.float().cpu().numpy()
        marks_np = marks.float().cpu().numpy()
        out, at = [], 0
        for c in counts:
            out.append(Faces(boxes_np[at:at + c], scores_np[at:at + c], marks_np[at:at + c]))
            at += c
        return out

    def _stage_pnet(self, batch: _Batch, min_faces: list[int], pyramids: Sequence[list[np.ndarray]] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate square boxes (N, 4) and their image index (N,) from the pyramid of every image."""
        dev = self.device
        rects = [(i, s, hs, ws) for i, ((h, w), min_face) in enumerate(zip(batch.shapes, min_faces))
                 for s, hs, ws in pyramid_rects(h, w, min_face, self.scale_factor)]  # levels: (image, scale, h, w)
        planes = None if pyramids is None else [level for pyramid in pyramids for level in pyramid]  # one per rect
        if planes is not None and [p.shape[:2] for p in planes] != [(hs, ws) for *_, hs, ws in rects]:
            raise ValueError("pyramids are not host_pyramid's for these images, min face sizes and scale factor")
        empty = torch.zeros((0, 4), device=dev), torch.zeros((0,), dtype=torch.long, device=dev)
        if not rects:
            return empty
        tile_h, tile_w, where = _pack([(hs, ws) for _, _, hs, ws in rects], tile_side(rects))
        n_tiles = max(t for t, _, _ in where) + 1
        per_pass = self._per_pass(tile_h * tile_w, _MAX_CANVAS_PIXELS, _CPU_CANVAS_PIXELS)
        # (R, 3) tile and output-grid origin of each pyramid level
        origin_t = torch.tensor([(t, y // 2, x // 2) for t, y, x in where], device=dev)
        rect_img = torch.tensor([i for i, _, _, _ in rects], device=dev)  # (R,) image of each level
        scale_t = torch.tensor([s for _, s, _, _ in rects], device=dev, dtype=torch.float32)
        found = []
        for first in range(0, n_tiles, per_pass):
            canvas, valid, owner = self._pass_input(batch, rects, where, first, min(per_pass, n_tiles - first),
                                                    tile_h, tile_w, planes)
            reg, prob = self.pnet(canvas, valid)  # (n, 4, out_h, out_w), (n, out_h, out_w)
            # cells outside every level are garbage (maybe NaN): the owner mask drops them
            ct, cy, cx = ((owner >= 0) & (prob > self.thresholds[0])).nonzero(as_tuple=True)
            found.append((owner[ct, cy, cx], cy, cx, reg[ct, :, cy, cx], prob[ct, cy, cx]))
        r, cy, cx, reg, score = (torch.cat(t) for t in zip(*found))
        if r.numel() == 0:
            return empty
        # the package's generate_bounding_box: window corners (2*cell + 1, 2*cell + 12), offsets in
        # units of the width between them (11), then / scale (the nominal one, not the truncated ratio)
        ly = (cy - origin_t[r, 1]).float() * _PNET_STRIDE
        lx = (cx - origin_t[r, 2]).float() * _PNET_STRIDE
        x1, y1, x2, y2 = lx + 1, ly + 1, lx + _PNET_CELL, ly + _PNET_CELL
        side = _PNET_CELL - 1
        boxes = torch.stack([x1 + reg[:, 0] * side, y1 + reg[:, 1] * side,
                             x2 + reg[:, 2] * side, y2 + reg[:, 3] * side], dim=1) / scale_t[r][:, None]
        keep = fast_nms(boxes, score, r, _NMS_PNET_PER_SCALE)  # per image and pyramid level
        boxes, score, img = boxes[keep], score[keep], rect_img[r[keep]]
        keep = fast_nms(boxes, score, img, _NMS_PNET_ALL)  # per image, across levels
        return _square(boxes[keep]), img[keep]

    def _pass_input(self, batch: _Batch, rects: list[tuple[int, float, int, int]], where: list[tuple[int, int, int]],
                    first: int, n: int, tile_h: int, tile_w: int, planes: list[np.ndarray] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P-Net's input for tiles first .. first + n - 1: canvas (n, 3, H, W), valid (n, 1, H-2, W-2), owner.

        owner (n, out_h, out_w) holds the pyramid level of each output cell (-1: none). The two masks
        are drawn on the host, where a rectangle is free, and sent in one copy each; on a GPU, drawing
        them on the device cost two launches and eight more ops per level. planes: each level made
        ahead (host_pyramid), drawn on the host too; None: resized here, from the batch's images.
        """
        valid = np.zeros((n, 1, tile_h - 2, tile_w - 2), dtype=bool)
        owner = np.full((n, _pnet_out(tile_h), _pnet_out(tile_w)), -1, dtype=np.int64)
        levels = [(r, t - first, y, x) for r, (t, y, x) in enumerate(where) if first <= t < first + n]
        for r, t, y, x in levels:
            _, _, hs, ws = rects[r]
            valid[t, 0, y:y + hs - 2, x:x + ws - 2] = True
            owner[t, y // 2:y // 2 + _pnet_out(hs), x // 2:x // 2 + _pnet_out(ws)] = r
        if planes is None:
            canvas = self._resized_canvas(batch, rects, levels, n, tile_h, tile_w)
        else:
            drawn = np.zeros((n, tile_h, tile_w, 3), np.float32)  # NHWC: the canvas channels_last
            for r, t, y, x in levels:
                drawn[t, y:y + rects[r][2], x:x + rects[r][3]] = planes[r]
            canvas = torch.from_numpy(drawn).permute(0, 3, 1, 2).to(self.device)
            canvas = canvas.contiguous(memory_format=self.memory_format)
        return canvas, torch.from_numpy(valid).to(self.device), torch.from_numpy(owner).to(self.device)

    def _resized_canvas(self, batch: _Batch, rects: list[tuple[int, float, int, int]],
                        levels: list[tuple[int, int, int, int]], n: int, tile_h: int, tile_w: int) -> torch.Tensor:
        """P-Net's canvas (n, 3, H, W) on the device, each level (rect, tile, y, x) area-resized there from its image."""
        # (in, out) sizes of each level's rows, then of its columns
        pairs = [pair for r, *_ in levels for pair in ((batch.shapes[rects[r][0]][0], rects[r][2]),
                                                      (batch.shapes[rects[r][0]][1], rects[r][3]))]
        taps = area_taps_on(pairs, self.device)
        canvas = torch.empty((n, 3, tile_h, tile_w), device=self.device, memory_format=self.memory_format).zero_()
        images = {i: batch.image(i) for i in {rects[r][0] for r, *_ in levels}}  # a view per photo, not per level
        for (r, t, y, x), taps_y, taps_x in zip(levels, taps[::2], taps[1::2]):
            i, _, hs, ws = rects[r]
            canvas[t, :, y:y + hs, x:x + ws] = area_resize(images[i], taps_y, taps_x)
        return canvas

    def _per_pass(self, pixels: int, most: int, on_cpu: int) -> int:
        """Items of `pixels` pixels one net pass takes: up to `most` pixels, on a CPU up to the fewer `on_cpu`
        (cache-sized); at least one item."""
        budget = min(most, on_cpu) if self.device.type == "cpu" else most
        return max(budget // pixels, 1)

    def _run_chunked(self, net: nn.Module | OnnxNet, batch: _Batch, boxes: torch.Tensor, img: torch.Tensor,
                     size: int) -> tuple[torch.Tensor, ...]:
        """net over crops of all candidates of all images, in chunks bounding the crop memory."""
        step = self._per_pass(size * size, _MAX_CROP_PIXELS, _CPU_CROP_PIXELS)
        outs = [net(batch.crops(img[a:a + step], boxes[a:a + step], size)) for a in range(0, boxes.shape[0], step)]
        return tuple(torch.cat(t) for t in zip(*outs))

    def _stage_rnet(self, batch: _Batch, boxes: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined square boxes (N, 4) and image index (N,)."""
        reg, score = self._run_chunked(self.rnet, batch, boxes, img, 24)
        boxes = _refine(boxes, reg)
        ok = score > self.thresholds[1]
        boxes, score, img = boxes[ok], score[ok], img[ok]
        keep = fast_nms(boxes, score, img, _NMS_RNET)
        return _square(boxes[keep]), img[keep]

    def _stage_onet(self, batch: _Batch, boxes: torch.Tensor, img: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final boxes (K, 4), scores (K,), landmarks (K, 5, 2), image index (K,), by (image, score desc)."""
        reg, marks, score = self._run_chunked(self.onet, batch, boxes, img, 48)
        # landmarks are relative to the input box, in the package's pixel-inclusive convention
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        marks = torch.stack([w * marks[:, :5] + boxes[:, 0:1] - 1, h * marks[:, 5:] + boxes[:, 1:2] - 1], dim=2)
        boxes = _refine(boxes, reg)
        ok = score > self.thresholds[2]
        boxes, score, marks, img = boxes[ok], score[ok], marks[ok], img[ok]
        keep = fast_nms(boxes, score, img, _NMS_ONET, method="min")
        return boxes[keep], score[keep], marks[keep], img[keep]


# --- alignment ------------------------------------------------------------------------------

def template(size: int) -> np.ndarray:
    """The ArcFace 5-point template for a (size, size) crop: (5, 2) float32, scaled by size / 112."""
    return ARCFACE_TEMPLATE_112 * np.float32(size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    src, dst: (N, 2) points, N >= 2. Returns the (2, 3) float64 matrix M with dst ~ M @ [x, y, 1].
    Umeyama (1991): the closed form, with the sign fix that forbids a mirror image, which a
    face crop must never be.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two matching (N >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(s)
    if var_s <= 0:
        raise ValueError("source points coincide: no similarity transform")
    cov = d.T @ s / len(s)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The face with these 5 landmarks (5, 2) warped onto the ArcFace template: (size, size, 3) uint8.

    Pixels outside the photo become black (BORDER_CONSTANT), as in InsightFace's norm_crop: a
    replicated border smears the photo's edge into streaks, a texture the age/gender model could
    latch onto; black is a uniform, obviously-empty region.
    """
    m = similarity_transform(landmarks, template(size))
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def central_face(faces: Faces, image_shape: Sequence[int]) -> int | None:
    """Index of the face whose box centre is nearest the image centre; None when there is no face.

    IMDB-WIKI photos are crops cut around the labelled face with a 40% margin, so the labelled
    face is the central one, whatever other (possibly more confident) faces appear at the edges.
    """
    if len(faces) == 0:
        return None
    h, w = image_shape[:2]
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2  # (K, 2) x, y
    return int(np.argmin(((centres - [w / 2, h / 2]) ** 2).sum(1)))


def center_landmarks(image_shape: Sequence[int], size: int) -> np.ndarray:
    """Pseudo-landmarks (5, 2) for `--fallback center`: align_face() with them crops the central square.

    With a 40% margin on each side the face box is the middle 1/1.8 of each dimension of the
    photo. We take the square with that box's centre (the photo's) and area, side
    sqrt(H * W) / 1.8, and map the template's (size, size) frame onto it: the template scaled by
    side / size and shifted to the square's corner. A square, because alignment is a similarity
    (no stretching); for a square photo it is exactly the central box.
    """
    h, w = image_shape[:2]
    side = math.sqrt(h * w) / (1.0 + 2.0 * IMDB_MARGIN)
    corner = np.array([(w - side) / 2, (h - side) / 2])
    return (template(size).astype(np.float64) * (side / size) + corner).astype(np.float32)


def detect_and_align(detector: FaceDetector, images: list[np.ndarray], size: int,
                     center_fallback: bool = False) -> list[dict | None]:
    """Per photo: the central face (central_face) aligned with align_face, or None where none is found.

    Each dict: face (size, size, 3) uint8, box (4,) or None, landmarks (5, 2), score. With
    center_fallback a photo without a face gets the central region its 40% margin implies
    (center_landmarks), box None and score 0.
    """
    found = detector.detect(images) if images else []
    return [align_central(img, faces, size, center_fallback) for img, faces in zip(images, found)]


def align_central(image: np.ndarray, faces: Faces, size: int, center_fallback: bool = False) -> dict | None:
    """detect_and_align's result for one photo whose faces were found already."""
    i = central_face(faces, image.shape)
    if i is None and not center_fallback:
        return None
    if i is None:
        marks, box, score = center_landmarks(image.shape, size), None, 0.0
    else:
        marks = np.asarray(faces.landmarks[i], dtype=np.float32)
        box, score = np.asarray(faces.boxes[i], dtype=np.float32), float(np.asarray(faces.scores)[i])
    return dict(face=align_face(image, marks, size), box=box, landmarks=marks, score=score)


def crop_min_face(min_face_size: int, shape: Sequence[int], fraction: float) -> int:
    """The smallest face worth looking for in an IMDB-WIKI crop of this shape: fraction of its short side.

    The labelled face spans 1 / (1 + 2 * IMDB_MARGIN) ~ 0.56 of the crop, so at a fraction well
    below that P-Net skips only scales where that face cannot be. Never below the detector's own, min_face_size.
    """
    return max(min_face_size, int(fraction * min(shape[:2])))


def _shrunk(image: np.ndarray, min_face: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, (kx, ky)): the image area-shrunk so that min_face becomes about _ONET_SIDE px, and the factors.

    O-Net, the last stage, sees every face as a 48 x 48 crop, so a face of that size or more loses
    nothing O-Net would see, while P-Net's input, the normalised copy and the crops all shrink.
    """
    factor = min_face / _ONET_SIDE
    h, w = image.shape[:2]
    if factor <= 1:
        return image, np.ones(2, np.float32)
    small = cv2.resize(image, (max(round(w / factor), 1), max(round(h / factor), 1)), interpolation=cv2.INTER_AREA)
    return small, np.array([w / small.shape[1], h / small.shape[0]], np.float32)


def _unshrunk(faces: Faces, k: np.ndarray) -> Faces:
    """Faces found in a photo shrunk by k = (kx, ky), in the photo's own pixels (pixel centres map to centres)."""
    if (k == 1).all():
        return faces
    shift = (k - 1) / 2  # (x + 0.5) * k - 0.5
    return Faces(faces.boxes * np.tile(k, 2) + np.tile(shift, 2), faces.scores, faces.landmarks * k + shift)


@dataclass(frozen=True, eq=False)
class CropSearch:
    """An IMDB-WIKI crop made ready for search_crops by prepare_crop: what P-Net searches, from what face size."""

    image: np.ndarray  # the photo area-shrunk so that its smallest face sought is about _ONET_SIDE px (or itself)
    k: np.ndarray  # (kx, ky): photo pixels per searched pixel
    min_face: int  # the smallest face sought, in the searched image's pixels
    pyramid: list[np.ndarray] | None  # for a GPU, host_pyramid of image from min_face: P-Net's levels, made ahead


@dataclass(frozen=True)
class CropPlan:
    """What prepare_crop takes of a detector (FaceDetector.crop_plan): plain values, so that a process without one,
    such as pre_process.py's decoding workers, can prepare the crops."""

    min_face_size: int  # the detector's smallest face, in pixels
    scale_factor: float  # its pyramid's
    pyramid: bool  # make P-Net's pyramid too (CropSearch.pyramid), for a GPU detector


def prepare_crop(plan: CropPlan, image: np.ndarray, fraction: float) -> CropSearch:
    """The photo shrunk (_shrunk) for faces of crop_min_face px and up, and its pyramid if the plan says so:
    search_crops' host work before detection.

    A function of its own so that a caller can run it ahead of detection, in threads (cv2 and torch
    release the GIL) or in other processes: an IMDB-sized photo takes ~2 ms of a core, time a GPU's
    feeding thread cannot spare.
    """
    image = as_rgb(image)  # as detect() takes it: a grey photo's pyramid has 3 channels too
    min_face = crop_min_face(plan.min_face_size, image.shape, fraction)
    small, k = _shrunk(image, min_face)
    # the min face in the shrunk photo: _ONET_SIDE, or the photo's own where it was not shrunk
    small_face = int(min_face / k.min())
    pyramid = host_pyramid(small, small_face, plan.scale_factor) if plan.pyramid else None
    return CropSearch(small, k, small_face, pyramid)


def searchable(image: np.ndarray | str, fraction: float) -> bool:
    """Whether a photo gets a prepare_crop: it is one (not the reason it is unusable, utils.read_image_or_reason's),
    and fraction is not 0 (then the full pyramid searches the photo itself)."""
    return fraction > 0 and not isinstance(image, str)


def read_for_search(path: str | os.PathLike, plan: CropPlan, fraction: float
                    ) -> tuple[np.ndarray | str, CropSearch | None]:
    """(the photo, or the reason it is unusable; its prepare_crop where searchable): a decoding process's whole share
    of a photo where it also prepares the search (pre_process.py --prepare-in processes; its pool starts each such
    process with start_crop_worker)."""
    image = read_image_or_reason(path)
    return image, prepare_crop(plan, image, fraction) if searchable(image, fraction) else None


def start_crop_worker() -> None:
    """A process pool's initializer for read_for_search's workers: Ctrl-C is the parent's to handle, and each worker's
    cv2 and torch ops run on one thread (else every worker starts thread pools as large as the machine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def search_crops(detector: FaceDetector, searches: list[CropSearch]) -> list[Faces]:
    """The faces of each IMDB-WIKI crop from its smallest face sought up (prepare_crop's), in the photo's own pixels;
    none where it has none that large (pre_process.py retries those with the full pyramid, a batch at a time, so
    that every photo a plain detect() finds a face in still has one)."""
    if not searches:
        return []
    pyramids = None if any(s.pyramid is None for s in searches) else [s.pyramid for s in searches]
    found = detector.detect([s.image for s in searches], [s.min_face for s in searches], pyramids)
    return [_unshrunk(f, s.k) for f, s in zip(found, searches)]
