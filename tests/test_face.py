"""face.py: MTCNN weights and nets, the detector against the mtcnn package's own output, batching,
NMS / resampling / cropping against straightforward re-implementations, and the alignment helpers."""
import math
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import face


@pytest.fixture(scope="module")
def detector():
    return face.FaceDetector(device="cpu")


@pytest.fixture(scope="module")
def portraits():
    """The three sample portraits as RGB uint8: astronaut 512x512, camera 512x512 (gray), Grace Hopper 600x512."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = np.asarray(im.convert("RGB"))
    camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    return [skimage.data.astronaut(), camera, hopper]


@pytest.fixture(scope="module")
def images(portraits):
    """The portraits plus an odd-size crop of one, so that a batch mixes three sizes."""
    return portraits + [portraits[2][37:437, 11:390]]


@pytest.fixture(scope="module")
def alone(detector, images):
    """Each image detected on its own (the per-image mode)."""
    return [detector.detect([im])[0] for im in images]


# --- weights and nets -------------------------------------------------------------------------

def test_weights_load_without_tensorflow():
    for name, n_arrays in (("pnet", 13), ("rnet", 16), ("onet", 21)):
        w = face.load_mtcnn_weights(name)
        assert len(w) == n_arrays and all(a.dtype == np.float32 for a in w)
    pnet, rnet, onet = face.load_mtcnn()
    # every parameter was written (a fresh nn.PReLU is 0.25 everywhere, a fresh conv is random)
    assert not torch.allclose(pnet.prelu1.weight, torch.full_like(pnet.prelu1.weight, 0.25))
    assert torch.equal(onet.fc6_3.bias, torch.from_numpy(face.load_mtcnn_weights("onet")[-1]))
    # the package's __init__ imports TensorFlow; face.py must only read its weight files
    assert "tensorflow" not in sys.modules and "mtcnn" not in sys.modules


def test_missing_weights_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(face.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install mtcnn==1\.0\.0"):
        face.load_mtcnn_weights("pnet")


def test_dense_layer_reads_keras_flatten_order():
    """R-Net's fc4 on NCHW features equals Keras' Dense on Permute((2, 1, 3)) + Flatten of NHWC features."""
    _, rnet, _ = face.load_mtcnn()
    keras_kernel, keras_bias = face.load_mtcnn_weights("rnet")[9:11]  # fc4: (576, 128), (128,)
    feats = torch.randn(4, 64, 3, 3, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)
    keras_in = feats.permute(0, 3, 2, 1).reshape(4, -1).numpy()  # NHWC -> (W, H, C) -> flat
    want = keras_in @ keras_kernel + keras_bias
    with torch.no_grad():
        got = rnet.fc4(feats.flatten(1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- the detector -----------------------------------------------------------------------------

def test_astronaut_matches_the_mtcnn_package(alone):
    """The mtcnn 1.0.0 package (TensorFlow) on skimage's astronaut: box x, y, w, h and landmarks, +-2 px.

    The package reports integers (rounded), so a faithful port lands within 0.5 px of each; we
    also check 0.75 px, which a one-pixel slip in any box convention of the algorithm exceeds.
    """
    faces = alone[0]
    assert len(faces) == 1
    assert faces.boxes.dtype == np.float32 and faces.boxes.shape == (1, 4) and faces.landmarks.shape == (1, 5, 2)
    x1, y1, x2, y2 = faces.boxes[0]
    box, ref_box = [x1, y1, x2 - x1, y2 - y1], [182, 64, 83, 107]
    ref_marks = [[204, 100], [245, 102], [224, 126], [202, 139], [244, 140]]  # l eye, r eye, nose, mouth l, r
    np.testing.assert_allclose(box, ref_box, atol=2)
    np.testing.assert_allclose(faces.landmarks[0], ref_marks, atol=2)
    assert faces.scores[0] > 0.99
    np.testing.assert_allclose(box, ref_box, atol=0.75)
    np.testing.assert_allclose(faces.landmarks[0], ref_marks, atol=0.75)


def test_batch_equals_one_by_one(detector, images, alone):
    """One batch of different-size photos (plus an odd-size crop) gives each photo's own results."""
    together = detector.detect(images)
    assert len(together) == len(images)
    for a, b in zip(alone, together):
        assert len(a) == len(b)
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
        np.testing.assert_allclose(b.landmarks, a.landmarks, atol=1e-3)
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        assert np.all(np.diff(b.scores) <= 0)  # sorted, best first
    # every sample is a portrait: exactly one confident face (with these weights, no other detection at all)
    for faces in alone[:3]:
        assert (faces.scores > 0.9).sum() == 1


def test_small_memory_caps_change_nothing(detector, images, alone, monkeypatch):
    """Several P-Net canvases and many small R-Net / O-Net chunks give the same faces."""
    monkeypatch.setattr(face, "_MAX_CANVAS_PIXELS", 50_000)  # below one tile: a P-Net pass per tile
    monkeypatch.setattr(face, "_MAX_CROP_PIXELS", 7 * 24 * 24)  # R-Net 7 crops a pass, O-Net 1
    for a, b in zip([alone[0], alone[3]], detector.detect([images[0], images[3]])):
        assert len(a) == len(b) == 1
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
        np.testing.assert_allclose(b.landmarks, a.landmarks, atol=1e-3)


def test_small_photos_get_a_small_tile_and_the_same_faces(detector, images, alone, monkeypatch):
    """A pyramid that fits a tile smaller than _TILE is run on that (P-Net's cost is the tile's area);
    the faces are those of the full 384 x 384 tile."""
    small = np.ascontiguousarray(images[3][::2, ::2])  # ~200 px: its whole pyramid fits ~ 200 x 200
    rects = [(0, s, int(small.shape[0] * s), int(small.shape[1] * s)) for s in face.pyramid_scales(*small.shape[:2])]
    side = face.tile_side(rects)
    assert max(r[2] for r in rects) <= side < face._TILE
    assert face.tile_side(rects * 50) == face._TILE  # many levels: the full tile
    fitted = detector.detect([small])[0]
    monkeypatch.setattr(face, "tile_side", lambda rects: face._TILE)
    full = detector.detect([small])[0]
    assert len(fitted) == len(full) >= 1
    np.testing.assert_allclose(fitted.boxes, full.boxes, atol=1e-3)
    np.testing.assert_allclose(fitted.landmarks, full.landmarks, atol=1e-3)


def test_a_larger_min_face_finds_the_same_portrait_faces(images, alone):
    """demo.py's --min-face: the portraits' faces (57 px and up) are found from 40 px, as from 20."""
    coarse = face.FaceDetector(device="cpu", min_face_size=40).detect(images[:3])
    for a, b in zip(alone[:3], coarse):
        best = int(np.argmax(b.scores))
        assert b.scores[best] > 0.9
        assert np.abs(b.boxes[best] - a.boxes[0]).max() < 0.1 * (a.boxes[0][2] - a.boxes[0][0])


def test_no_face(detector):
    gray = np.full((240, 320, 3), 128, np.uint8)
    tiny = np.zeros((8, 8, 3), np.uint8)  # below P-Net's 12 px window at every scale
    assert detector.detect([]) == []
    for faces in detector.detect([gray, tiny, gray[:, :, 0]]):  # a 2-D gray image is accepted too
        assert len(faces) == 0
        assert faces.boxes.shape == (0, 4) and faces.scores.shape == (0,) and faces.landmarks.shape == (0, 5, 2)
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([gray.astype(np.float32)])


def test_pnet_on_packed_canvas_equals_pnet_alone():
    """An odd-size image packed beside another one: its P-Net outputs equal a run on it alone (Keras "same" pooling)."""
    pnet, _, _ = face.load_mtcnn()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 3, 37, 41, generator=g), torch.randn(1, 3, 30, 20, generator=g)
    canvas = torch.randn(1, 3, 40, 66, generator=g)  # junk everywhere else
    canvas[..., :37, :41], canvas[..., 2:32, 44:64] = a, b
    valid = torch.zeros(1, 1, 38, 64, dtype=torch.bool)
    valid[..., :35, :39] = True
    valid[..., 2:30, 44:62] = True
    with torch.no_grad():
        reg, prob = pnet(canvas, valid)
        reg_a, prob_a = pnet(a)  # TF "same" pooling ignores the padded row / column: ceil_mode does too
        reg_b, prob_b = pnet(b)
    oa, ob = (face._pnet_out(37), face._pnet_out(41)), (face._pnet_out(30), face._pnet_out(20))
    assert prob_a.shape[1:] == oa and prob_b.shape[1:] == ob
    torch.testing.assert_close(prob[:, :oa[0], :oa[1]], prob_a)
    torch.testing.assert_close(reg[..., :oa[0], :oa[1]], reg_a)
    torch.testing.assert_close(prob[:, 1:1 + ob[0], 22:22 + ob[1]], prob_b)


# --- the nets in onnxruntime -------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_detector():
    """The detector with its nets in onnxruntime (exported into the user's cache on the first run, ~15 s)."""
    return face.FaceDetector(device="cpu", backend="onnx")


def test_onnx_nets_equal_the_torch_nets():
    """Each exported net on inputs it was not traced with: P-Net at odd sizes on a packed canvas (its mask), R-Net and
    O-Net at other batch sizes; the outputs are torch's to float rounding."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 37, 53, generator=g)
    valid = torch.rand(3, 1, 35, 51, generator=g) > 0.3
    cases = [(0, (x, valid)), (1, (torch.randn(7, 3, 24, 24, generator=g),)), (2, (torch.randn(1, 3, 48, 48, generator=g),))]
    nets, onnx_nets = face.load_mtcnn(), face.onnx_mtcnn()
    for i, args in cases:
        with torch.no_grad():
            want = nets[i](*args)
        got = onnx_nets[i](*args)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            # P-Net's cells whose window leaves the mask are garbage on both sides (NaN where all of it is -inf)
            ok = torch.isfinite(b)
            torch.testing.assert_close(a[ok], b[ok], rtol=1e-4, atol=1e-5)
            assert ok.float().mean() > 0.3


def test_onnx_backend_finds_the_torch_faces(onnx_detector, images, alone):
    """The portraits alone and a batch of photos of three sizes: the same faces as with the torch nets."""
    for found in ([onnx_detector.detect([im])[0] for im in images], onnx_detector.detect(images)):
        for a, b in zip(alone, found):
            assert len(a) == len(b) >= 1
            np.testing.assert_allclose(b.boxes, a.boxes, atol=0.01)  # px; measured: up to 0.0004
            np.testing.assert_allclose(b.landmarks, a.landmarks, atol=0.01)  # measured: up to 0.0008
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)
    gray = np.full((240, 320, 3), 128, np.uint8)
    assert [len(f) for f in onnx_detector.detect([gray, images[0]])] == [0, 1]


def test_onnx_nets_are_exported_once_into_the_cache(portraits, tmp_path, monkeypatch, capsys):
    """The first detector exports the three graphs into the cache; a later one (another process) only reads them.
    An unwritable cache costs the export each time, with a warning, but still detects."""
    face.onnx_mtcnn(tmp_path)
    files = sorted(tmp_path.rglob("*.onnx"))
    assert [f.name for f in files] == ["onet.onnx", "pnet.onnx", "rnet.onnx"]
    assert len({f.parent for f in files}) == 1 and len(files[0].parent.name) == 16  # one folder, named by the key
    graphs = {f.stem: f.read_bytes() for f in files}

    def must_not_export(name, net):
        raise AssertionError("exported again, though the cache holds the graphs")

    key = face._onnx_key()
    monkeypatch.setattr(face, "_onnx_key", lambda: key)  # it hashes the code of _export_net, replaced below
    monkeypatch.setattr(face, "_export_net", must_not_export)
    face.FaceDetector(backend="onnx", onnx_cache=tmp_path)
    assert sorted(tmp_path.rglob("*")) == sorted([files[0].parent, *files])  # no temp files left
    exported = []
    monkeypatch.setattr(face, "_export_net", lambda name, net: exported.append(name) or graphs[name])
    (tmp_path / "a_file").write_text("")
    detector = face.FaceDetector(backend="onnx", onnx_cache=tmp_path / "a_file" / "cache")
    assert exported == ["pnet", "rnet", "onet"]
    assert "cannot write the MTCNN ONNX cache" in capsys.readouterr().err
    assert len(detector.detect(portraits[:1])[0]) == 1
    with pytest.raises(ValueError, match="CPU"):
        face.FaceDetector(device="meta", backend="onnx")


# --- the building blocks against plain re-implementations --------------------------------------

def _tf_resize_area_reference(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TensorFlow's ResizeArea written out per output pixel (float64): fractional coverage / (sy * sx)."""
    h, w = img.shape[:2]
    sy, sx = h / oh, w / ow
    out = np.zeros((oh, ow) + img.shape[2:])
    for y in range(oh):
        for x in range(ow):
            acc = 0.0
            for i in range(math.floor(y * sy), math.ceil((y + 1) * sy)):
                cy = min(i + 1, (y + 1) * sy) - max(i, y * sy)
                for j in range(math.floor(x * sx), math.ceil((x + 1) * sx)):
                    cx = min(j + 1, (x + 1) * sx) - max(j, x * sx)
                    acc = acc + cy * cx * img[min(max(i, 0), h - 1), min(max(j, 0), w - 1)]
            out[y, x] = acc / (sy * sx)
    return out


@pytest.mark.parametrize("shape,out", [((13, 17), (7, 9)), ((9, 10), (9, 10)), ((5, 6), (8, 11)), ((40, 33), (11, 23))])
def test_area_resize_is_tensorflows(shape, out):
    img = np.random.default_rng(0).uniform(-1, 1, shape + (3,))
    taps = face.area_taps_on([(shape[0], out[0]), (shape[1], out[1])], torch.device("cpu"))
    got = face.area_resize(torch.from_numpy(img).float(), *taps).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, _tf_resize_area_reference(img, *out), atol=1e-5)


def test_a_passes_taps_travel_in_one_copy():
    """area_taps_on's taps for many levels (computed together) are views of one index and one weight buffer (on a
    GPU, each copy from pageable memory waits for the device), each the shape and values of its pair's taps alone."""
    pairs = [(430, 107), (322, 80), (430, 76), (322, 57), (17, 17), (5, 8), (700, 12)]
    taps = face.area_taps_on(pairs, torch.device("cpu"))
    for k in (0, 1):
        assert len({t[k].untyped_storage().data_ptr() for t in taps}) == 1
    assert len({w.shape[2] for _, w in taps}) > 3  # pairs of different widths K, each its own
    for pair, (idx, w) in zip(pairs, taps):
        want_idx, want_w = face.area_taps_on([pair], torch.device("cpu"))[0]
        assert w.shape == want_w.shape and w.shape[:2] == (pair[1], 1) and idx.shape == (w.shape[0] * w.shape[2],)
        torch.testing.assert_close(idx, want_idx, rtol=0, atol=0)
        torch.testing.assert_close(w, want_w, rtol=0, atol=0)
        assert (w.sum(2) - 1).abs().max() < 1e-5  # an output cell's weights cover its span once
    with pytest.raises(ValueError, match="sizes must be positive"):
        face.area_taps_on([(5, 3), (7, 0)], torch.device("cpu"))


class OpCount(TorchDispatchMode):
    """Counts the ops dispatched in this thread inside it, or only those whose names are in `names`: on a GPU each
    is host work (a dispatch, most also a launch). tests/test_train.py's HostReads counts the ones that sync;
    tests/test_data_gen.py's TensorBytes weighs each op by the bytes it moves (cost)."""

    def __init__(self, names: set[str] | None = None) -> None:
        super().__init__()
        self.names, self.count = names, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += self.cost(func, args, kwargs, out)
        return out

    def cost(self, func, args, kwargs, out) -> int:
        """What one op adds to the count: 1 for a counted op."""
        return self.names is None or func.overloadpacket.__name__ in self.names


def test_prelu_on_channels_last_runs_as_rows_and_gives_the_same_values():
    """face.PReLU takes a CPU channels_last input as rows of W * C values (the weight tiled: one repeat op), and
    every value is nn.PReLU's, bit for bit; NCHW and 2-D inputs take the plain layer."""
    torch.manual_seed(0)
    for c, shape in ((10, (2, 10, 38, 46)), (28, (3, 28, 22, 22)), (128, (5, 128))):
        ours, plain = face.PReLU(c), torch.nn.PReLU(c)
        with torch.no_grad():
            ours.weight.uniform_(-1, 1)
            plain.weight.copy_(ours.weight)
        x = torch.randn(shape)
        layouts = [(x, 0)] if x.dim() == 2 else [(x, 0), (x.contiguous(memory_format=torch.channels_last), 1)]
        for inp, repeats in layouts:
            with torch.no_grad(), OpCount({"repeat"}) as count:
                y = ours(inp)
            assert count.count == repeats, (shape, inp.stride())
            assert torch.equal(y, plain(inp).detach()) and y.stride() == inp.stride()


def test_the_cpu_runs_r_net_and_o_net_in_cache_sized_chunks(detector, images):
    """On the CPU R-Net takes 128 crops a pass and O-Net 32 (_CPU_CROP_PIXELS), however many candidates there are."""
    batch = face._Batch([images[0]], torch.device("cpu"))
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0]]).repeat(300, 1)  # (300, 4)
    sizes = []

    def net(x: torch.Tensor) -> tuple[torch.Tensor]:
        sizes.append(x.shape[0])
        return (x.sum(dim=(1, 2, 3)),)

    for side, chunks in ((24, [128, 128, 44]), (48, [32] * 9 + [12])):
        sizes.clear()
        (out,) = detector._run_chunked(net, batch, boxes, torch.zeros(300, dtype=torch.long), side)
        assert sizes == chunks and out.shape == (300,) and torch.all(out == out[0])  # the same crop 300 times


def test_a_pyramid_level_costs_few_ops(detector):
    """P-Net's input for a pass (_pass_input): each pyramid level's resize and its placement on the canvas
    take at most 16 ops, views included, whatever the level's size: on a GPU each op is host work (a
    dispatch, most also a launch), and the photos' levels are most of a batch's ops (29 a level before
    2026-12-07, when this failed)."""
    photo = np.random.default_rng(0).integers(0, 256, (430, 350, 3), dtype=np.uint8)
    batch = face._Batch([photo], torch.device("cpu"))

    def ops(levels: int) -> int:
        rects = [(0, float(s), int(430 * s), int(350 * s)) for s in face.pyramid_scales(430, 350)[:levels]]
        tile_h, tile_w, where = face._pack([(h, w) for *_, h, w in rects], face.tile_side(rects))
        n_tiles = max(t for t, _, _ in where) + 1
        with OpCount() as count:
            _, _, owner = detector._pass_input(batch, rects, where, 0, n_tiles, tile_h, tile_w)
        assert {int(r) for r in owner.unique()} == set(range(-1, levels))  # every level drawn
        return count.count

    one, many = ops(1), ops(9)
    assert (many - one) / 8 <= 16, (one, many)


def test_crops_of_the_whole_image_are_align_corners_resizes():
    """tf.image.crop_and_resize of box (0, 0, W, H) samples the pixel centres 0 .. W-1: align_corners=True."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (31, 45, 3), dtype=np.uint8), rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)]
    batch = face._Batch(images, torch.device("cpu"))
    boxes = torch.tensor([[0.0, 0.0, 45.0, 31.0], [0.0, 0.0, 16.0, 20.0]])
    got = batch.crops(torch.tensor([0, 1]), boxes, 24)
    for k, im in enumerate(images):
        t = (torch.from_numpy(im).permute(2, 0, 1)[None].float() - 127.5) / 128
        want = torch.nn.functional.interpolate(t, size=(24, 24), mode="bilinear", align_corners=True)[0]
        # (the last row / column may fall a float32 ulp past the edge and read 0, in TF's kernel too)
        torch.testing.assert_close(got[k, :, :-1, :-1], want[:, :-1, :-1], atol=1e-5, rtol=1e-5)
    # a box hanging out of the image: samples outside read 0 (the extrapolation value), inside still bilinear
    out = batch.crops(torch.tensor([0]), torch.tensor([[-45.0, 0.0, 45.0, 31.0]]), 24)[0]
    assert torch.all(out[:, :, :11] == 0) and torch.any(out[:, :, 12:] != 0)


def _package_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """mtcnn.utils.bboxes.nms on an IoU matrix, as the package computes it, for one group."""
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.maximum(0, np.minimum(b[None, :, 2], b[:, None, 2]) - np.maximum(b[None, :, 0], b[:, None, 0]))
    ih = np.maximum(0, np.minimum(b[None, :, 3], b[:, None, 3]) - np.maximum(b[None, :, 1], b[:, None, 1]))
    inter = iw * ih
    den = area[:, None] + area[None, :] - inter if method == "union" else np.minimum(area[:, None], area[None, :])
    failed = (inter / den > threshold) * np.triu(np.ones((len(b), len(b))), k=1)
    return order[failed.sum(axis=0) == 0]


@pytest.mark.parametrize("method", ["union", "min"])
@pytest.mark.parametrize("max_pairs", [1 << 20, 7])  # 7: forces many chunks
def test_fast_nms_is_the_packages_nms(monkeypatch, method, max_pairs):
    monkeypatch.setattr(face, "_MAX_NMS_PAIRS", max_pairs)
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 60, (90, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (90, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(90).astype(np.float32) / 90
    groups = rng.integers(0, 4, 90)
    keep = face.fast_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.4, method)
    keep = keep.numpy()
    want = []
    for g in range(4):
        idx = np.flatnonzero(groups == g)
        want.extend(idx[_package_nms(boxes[idx], scores[idx], 0.4, method)].tolist())
    assert keep.tolist() == want  # same boxes, in (group, score descending) order
    assert 0 < len(keep) < 90


# --- alignment --------------------------------------------------------------------------------

def test_template():
    assert face.ARCFACE_TEMPLATE_112.shape == (5, 2) and face.ARCFACE_TEMPLATE_112.dtype == np.float32
    np.testing.assert_allclose(face.template(112), face.ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(face.template(224), 2 * face.ARCFACE_TEMPLATE_112, rtol=1e-6)


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.7, 1.9, np.array([-13.0, 42.5])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = face.similarity_transform(src, dst)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, np.hstack([scale * rot, shift[:, None]]), atol=1e-9)
    # a mirrored target is fitted by a proper rotation, never by a reflection
    mirrored = dst * [-1, 1]
    assert np.linalg.det(face.similarity_transform(src, mirrored)[:, :2]) > 0


@pytest.mark.parametrize("size", [112, 224])
def test_aligned_face_lands_on_the_template(detector, portraits, alone, size):
    image, marks = portraits[0], alone[0].landmarks[0]
    aligned = face.align_face(image, marks, size)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    found = detector.detect([aligned])[0]
    assert len(found) == 1 and found.scores[0] > 0.9
    again = found.landmarks[0]
    # the warp puts each landmark where the matrix says (detector noise: a few % of the crop)...
    m = face.similarity_transform(marks, face.template(size))
    mapped = marks @ m[:, :2].T + m[:, 2]
    assert np.linalg.norm(again - mapped, axis=1).max() < 0.03 * size
    # ...and that is on the template, up to the least-squares fit of a real face's 5 points
    assert np.linalg.norm(again - face.template(size), axis=1).mean() < 0.05 * size
    assert again[0, 0] < again[1, 0] and again[3, 0] < again[4, 0]  # not mirrored


def test_central_face_picks_the_middle_box():
    boxes = np.array([[0, 0, 50, 50], [300, 10, 390, 100], [160, 110, 240, 190], [150, 250, 200, 300]], np.float32)
    faces = face.Faces(boxes, np.array([0.99, 0.98, 0.80, 0.95], np.float32), np.zeros((4, 5, 2), np.float32))
    assert face.central_face(faces, (300, 400, 3)) == 2  # centre (200, 150): box 2, though least confident
    assert face.central_face(faces, (300, 400)) == 2
    assert face.central_face(face.Faces.empty(), (300, 400, 3)) is None


@pytest.mark.parametrize("shape", [(360, 360, 3), (450, 360, 3), (300, 420, 3)])
def test_center_landmarks_crop_the_central_square(shape):
    """A photo white in the middle 1/1.8 of each side (the face box of a 40% margin crop), black around it."""
    h, w = shape[:2]
    image = np.zeros(shape, np.uint8)
    y0, x0 = round(h * 0.4 / 1.8), round(w * 0.4 / 1.8)
    image[y0:h - y0, x0:w - x0] = 255
    aligned = face.align_face(image, face.center_landmarks(image.shape, 112), 112)[:, :, 0]
    if h == w:  # square: exactly the central box, edge to edge
        assert aligned[1:-1, 1:-1].min() == 255 and aligned.mean() > 250
        return
    # otherwise the centred square of the box's area: across the box's long side all white,
    # across its short side black margins of equal width on both ends
    long_line, short_line = (aligned[:, 56], aligned[56, :]) if h > w else (aligned[56, :], aligned[:, 56])
    side = math.sqrt(h * w) / 1.8
    margin = (side - min(h, w) / 1.8) / 2 * 112 / side  # in output pixels
    assert margin > 4
    assert long_line[1:-1].min() == 255
    lo, hi = math.floor(margin) - 1, math.ceil(margin) + 1
    assert short_line[:lo].max() == 0 and short_line[-lo:].max() == 0 and short_line[hi:-hi].min() == 255


@pytest.mark.parametrize("k,s,same,size", [(2, 2, True, 35), (2, 2, True, 8), (3, 2, True, 22), (3, 2, True, 46),
                                           (3, 2, False, 9), (3, 2, False, 21), (3, 2, True, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_keras_max_pool_matches_padded_max_pool(k, s, same, size, channels_last):
    """Against torch's max-pool with TF's "same" padding (after-side, as the sizes here need) as a -inf pad;
    NCHW takes the strided-view path, NHWC torch's layer where TF pads after the input only."""
    x = torch.randn(2, 3, size, size + 1, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = x
    if same:
        pads = []
        for length in (size + 1, size):  # W then H, as F.pad wants
            out = -(-length // s)
            pad = max((out - 1) * s + k - length, 0)
            pads += [pad // 2, pad - pad // 2]
        ref = torch.nn.functional.pad(x, pads, value=float("-inf"))
    torch.testing.assert_close(face.keras_max_pool(x, k, s, same), torch.nn.functional.max_pool2d(ref, k, s))


# --- IMDB-WIKI crops: faces looked for from a fraction of the short side up ---------------------

def imdb_crop(image: np.ndarray, box: np.ndarray, zoom: int) -> np.ndarray:
    """The face of box cut with IMDB-WIKI's 40% margin on every side, enlarged zoom times (an IMDB-sized crop)."""
    import cv2

    cx, cy = (box[:2] + box[2:]) / 2
    half = 0.9 * max(box[2] - box[0], box[3] - box[1])  # (1 + 2 * 0.4) / 2 of the face's side
    crop = image[int(cy - half):int(cy + half), int(cx - half):int(cx + half)]
    return cv2.resize(crop, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)


def test_crops_are_searched_shrunk_and_find_the_full_pyramids_face(detector, portraits, alone):
    """A 3x-enlarged IMDB-style crop is searched at under half size (its smallest face sought is 48 px there), no
    retry; the landmarks, back in the crop's pixels, are the full-size search's to 5% of the face (measured: up to
    3.3%; the full-size search itself moves its landmarks by up to 2.8% between the crop at 2x and at 3x)."""
    crops = [imdb_crop(p, a.boxes[0], 3) for p, a in zip(portraits, alone[:3])]
    plain = detector.detect(crops)
    found = face.search_crops(detector, [face.prepare_crop(detector.crop_plan(), c, 0.25) for c in crops])
    assert all(len(f) for f in found)  # none to retry
    for crop, a, b in zip(crops, plain, found):
        # so it was searched at under half size
        assert face.crop_min_face(detector.min_face_size, crop.shape, 0.25) > 2 * 48
        i, j = face.central_face(a, crop.shape), face.central_face(b, crop.shape)
        side = a.boxes[i, 2] - a.boxes[i, 0]
        assert np.abs(b.landmarks[j] - a.landmarks[i]).max() < 0.05 * side
        assert np.abs(b.boxes[j] - a.boxes[i]).max() < 0.1 * side


def test_crops_pyramids_made_ahead_give_the_same_faces_for_few_ops(detector, portraits, monkeypatch):
    """For a GPU, prepare_crop makes each crop's P-Net pyramid on the host (host_pyramid), so search_crops only
    draws it on the canvas: the same faces, bit for bit on the CPU, as resizing the levels in detect(); and per photo
    at most 10 ops (on a GPU each one host work, most a launch; measured: none), where resizing them took 82 here.
    For a CPU it makes none: there detect() resizes them faster."""
    from synth_imdb import imdb_sized

    rng = np.random.default_rng(0)
    crops = [imdb_sized(rng, portraits[i % 3]) for i in range(16)]
    assert face.prepare_crop(detector.crop_plan(), crops[0], 0.25).pyramid is None
    monkeypatch.setattr(detector, "device", torch.device("cuda"))  # the nets stay put: prepare_crop runs none
    plan = detector.crop_plan()
    assert face.prepare_crop(detector.crop_plan(False), crops[0], 0.25).pyramid is None  # --no-host-pyramids
    monkeypatch.undo()
    searches = [face.prepare_crop(plan, c, 0.25) for c in crops]
    assert all(len(s.pyramid) >= 4 for s in searches)  # an IMDB crop searched from a quarter of it: 5-6 levels
    resized = detector.detect([s.image for s in searches], [s.min_face for s in searches])
    drawn = detector.detect([s.image for s in searches], [s.min_face for s in searches], [s.pyramid for s in searches])
    assert sum(map(len, resized)) >= 12
    for a, b in zip(resized, drawn):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.landmarks, b.landmarks)
        assert np.array_equal(a.scores, b.scores)

    def per_photo(pyramids: bool) -> float:  # search_crops' pass (a photo with no face is retried in full)
        def ops(n: int) -> int:
            with OpCount() as count:
                detector.detect([s.image for s in searches[:n]], [s.min_face for s in searches[:n]],
                                [s.pyramid for s in searches[:n]] if pyramids else None)
            return count.count

        return (ops(16) - ops(8)) / 8

    resizing, drawing = per_photo(False), per_photo(True)
    assert drawing <= 10 and resizing >= 40, (drawing, resizing)
    with pytest.raises(ValueError, match="pyramids"):  # made for other min face sizes
        detector.detect([s.image for s in searches[:2]], [20, 20], [s.pyramid for s in searches[:2]])


def test_a_face_below_the_derived_minimum_is_found_by_the_retry(detector, images, alone):
    """The astronaut's ~100 px face in its 512 px photo: at 0.5 of the short side (256 px) the first pass finds
    nothing, and the retry with the full pyramid finds the plain detect()'s face."""
    least = face.crop_min_face(detector.min_face_size, images[0].shape, 0.5)
    assert least > 2 * (alone[0].boxes[0, 3] - alone[0].boxes[0, 1])
    first = detector.detect([images[0]], [least])[0]
    assert len(first) == 0  # the face is too small for the first pass
    import pre_process  # where the retry is: align_batch hands the photos it missed to align_full

    crops = [images[0], imdb_crop(images[0], alone[0].boxes[0], 1)]
    chunk = [(i, crop, face.prepare_crop(detector.crop_plan(), crop, 0.5)) for i, crop in enumerate(crops)]
    faces, missed = pre_process.align_batch(detector, chunk, 112, False)
    assert [i for i, _ in faces] == [1] and [i for i, _ in missed] == [0]
    retried = pre_process.align_full(detector, missed, 112, False)
    assert [i for i, _ in retried] == [0]
    np.testing.assert_array_equal(retried[0][1], face.align_central(images[0], alone[0], 112)["face"])


def test_per_image_min_face_sizes_equal_detectors_of_that_size(detector, images):
    """detect(images, min_face_sizes) gives each image what a detector with its min_face_size gives."""
    sizes = [20, 40, 64, 30]
    together = detector.detect(images, sizes)
    for im, size, got in zip(images, sizes, together):
        want = face.FaceDetector(device="cpu", min_face_size=size).detect([im])[0]
        assert len(got) == len(want)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
    with pytest.raises(ValueError, match="min_face_sizes"):
        detector.detect(images, sizes[:2])
