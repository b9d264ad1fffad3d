"""Shared fixtures: the sample photos, a tiny checkpoint in train.py's format and its ONNX export, aligned sample faces."""
import atexit
import os
import shutil
import tempfile

import pytest

# before config is imported (by utils below): the MTCNN ONNX cache and anything else cached goes into a folder of
# this session's, so tests neither write into the user's ~/.cache nor pass on what an earlier run left there;
# subprocesses inherit it
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="age_gender_tests_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

from utils import REPO

SIZE = 112
# the files that take minutes (on one thread of a 2-core AVX2 CPU, 2026-12-07: 6, 1.6, 2 and 1.8), run first: `make test`
# hands whole files to its 2 workers in this order (pytest-xdist --dist loadfile --no-loadscope-reorder), so
# the longest ones start at once, side by side, and the short ones fill in around them
SLOW_FILES = ("test_readme_commands.py", "test_reproduce.py", "test_bench.py", "test_train.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: SLOW_FILES.index(item.path.name) if item.path.name in SLOW_FILES else len(SLOW_FILES))


@pytest.fixture(scope="session")
def samples():
    """images/ with the three sample portraits (written from scikit-image / matplotlib if missing)."""
    import demo

    demo.ensure_samples(REPO / "images")
    return REPO / "images"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """best.pt as train.py writes it ({"model": state dict, "config": {...}}): a random ResNet-18, l1 head."""
    import torch

    import models

    torch.manual_seed(0)
    model = models.build_model("resnet18", "l1", "none")
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args,
                "config": {"arch": "resnet18", "age_loss": "l1", "size": SIZE}}, path)
    return path


@pytest.fixture(scope="session")
def onnx_checkpoint(checkpoint, tmp_path_factory):
    """That checkpoint exported to ONNX by export.py."""
    import export

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export.main(["--checkpoint", str(checkpoint), "--out", str(path)])
    return path


@pytest.fixture(scope="session")
def aligned_faces(samples):
    """The central face of each sample portrait, aligned at SIZE by face.py: list of (SIZE, SIZE, 3) uint8."""
    from face import FaceDetector, align_face, central_face
    from utils import read_image

    images = [read_image(samples / n) for n in ("astronaut.jpg", "camera.jpg", "grace_hopper.jpg")]
    found = FaceDetector(device="cpu").detect(images)
    return [align_face(img, f.landmarks[central_face(f, img.shape)], SIZE) for img, f in zip(images, found)]
