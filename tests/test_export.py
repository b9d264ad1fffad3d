"""export.py: the ONNX file runs in onnxruntime like the PyTorch model, at any batch size."""
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from inference import load_model
from utils import UserError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export.main(["--checkpoint", str(checkpoint), "--out", str(out)])
    return out, result


def test_export_reports_small_difference(exported):
    out, result = exported
    assert result["out"] == str(out) and out.is_file()
    assert result["exporter"] in ("dynamo", "torchscript")
    assert result["max_diff"] < 1e-3


def test_onnx_matches_torch_at_other_batch_sizes(exported, checkpoint):
    out, _ = exported
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # a named, free batch dimension
    meta = {p.key: p.value for p in proto.metadata_props}
    model, cfg = load_model(checkpoint, torch.device("cpu"))
    assert meta["size"] == str(cfg["size"]) and meta["age_loss"] == cfg["age_loss"]
    from data_gen import IMAGENET_MEAN, IMAGENET_STD
    assert json.loads(meta["mean"]) == list(IMAGENET_MEAN) and json.loads(meta["std"]) == list(IMAGENET_STD)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["gender_prob", "age", "age_std", "age_low", "age_high"]
    s = int(cfg["size"])
    for n in (3, 7):
        x = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(n))
        prob, age, *interval = session.run(None, {"face": x.numpy()})
        assert prob.shape == (n, 2) and age.shape == (n,)
        assert all(v.shape == (n,) and np.isnan(v).all() for v in interval)  # an l1 head: no interval
        with torch.inference_mode():
            logits, age_out = model(x)  # the bare model + the repo's own rule, outside the wrapper
            want_prob = torch.softmax(logits, 1).numpy()
            want_age = model.predict_age(age_out).numpy()
        np.testing.assert_allclose(prob.sum(1), 1, atol=1e-5)
        assert np.abs(prob - want_prob).max() < 1e-4
        assert np.abs(age - want_age).max() < 1e-3


def test_too_large_difference_fails(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(export, "check", lambda *a, **k: 0.5)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="differs from PyTorch by 0.5"):
        export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--exporter", "torchscript"])
    assert not out.exists() and (tmp_path / "m.onnx.failed").is_file()


def test_out_naming_the_checkpoint_or_not_onnx_is_refused_before_exporting(tmp_path, checkpoint, monkeypatch):
    """--out the checkpoint itself (by another spelling of its path, too) would write ONNX bytes over the trained
    model; an --out without .onnx would be read back as a .pt. Both are refused before anything is exported."""
    monkeypatch.setattr(export, "to_onnx", lambda *a: pytest.fail("exported before checking --out"))
    before = checkpoint.read_bytes()
    monkeypatch.chdir(checkpoint.parent)
    for out in (str(checkpoint), "best.pt", f"../{checkpoint.parent.name}/best.pt"):
        with pytest.raises(UserError, match=f"--out {out}: is the --checkpoint, which the ONNX file would overwrite"):
            export.main(["--checkpoint", str(checkpoint), "--out", out])
    assert checkpoint.read_bytes() == before
    for name in ("model.pt", "model"):
        out = tmp_path / name
        with pytest.raises(UserError, match=rf"--out {re.escape(str(out))}: not a \.onnx file name.*e\.g\. "
                                            rf"{re.escape(str(tmp_path / 'model.onnx'))}$"):
            export.main(["--checkpoint", str(checkpoint), "--out", str(out)])
    assert not list(tmp_path.iterdir())


def test_out_naming_a_folder_or_under_a_file_is_refused_before_exporting(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(export, "to_onnx", lambda *a: pytest.fail("exported before checking --out"))
    for folder in (tmp_path / "exports", tmp_path / "exports.onnx"):
        folder.mkdir()
        with pytest.raises(UserError, match=f"^--out {folder}: is a folder; name the .onnx file to write, "
                                            f"e.g. {folder / 'best.onnx'}$"):
            export.main(["--checkpoint", str(checkpoint), "--out", str(folder)])
    (tmp_path / "notes").write_text("a file")
    out = tmp_path / "notes" / "model.onnx"
    with pytest.raises(UserError, match=f"^--out {out}: {tmp_path / 'notes'} is a file, not a folder"):
        export.main(["--checkpoint", str(checkpoint), "--out", str(out)])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found; train one"):
        export.main(["--checkpoint", str(tmp_path / "none.pt")])


def test_expected_age_rule_is_inside_the_graph(tmp_path):
    """A dex head (101 logits): the ONNX age output is already the expected age in years."""
    import models

    torch.manual_seed(1)
    model = models.build_model("resnet18", "dex", "none").eval()
    ckpt = tmp_path / "dex.pt"
    torch.save({"model": model.state_dict(), "config": {"arch": "resnet18", "age_loss": "dex", "size": 112}}, ckpt)
    result = export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "dex.onnx")])
    assert result["max_diff"] < 1e-3
    session = ort.InferenceSession(str(tmp_path / "dex.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    _, age, *_ = session.run(None, {"face": x.numpy()})
    with torch.inference_mode():
        p = torch.softmax(model(x)[1], 1)
    want = (p * torch.arange(101, dtype=torch.float32)).sum(1).numpy()  # sum_i p_i * i, by hand
    assert age.shape == (2,) and np.abs(age - want).max() < 1e-3


def test_temperature_flip_and_interval_inside_the_graph(tmp_path):
    """A dex head with a stored temperature, exported with --flip: the ONNX outputs equal the repo's
    rule worked out here by hand (logits / T, the face and its mirror averaged, quantiles of the cdf),
    and the .onnx's predict() equals the .pt's with flip."""
    import models
    from inference import predict

    torch.manual_seed(2)
    model = models.build_model("resnet18", "dex", "none", gender_temperature=2.5).eval()
    ckpt = tmp_path / "dex.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args,
                "config": {"arch": "resnet18", "age_loss": "dex", "size": 112}}, ckpt)
    out = tmp_path / "dex_flip.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out), "--flip"])["max_diff"] < 1e-3
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["flip"] == "True" and float(meta["gender_temperature"]) == 2.5
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    prob, age, std, low, high = session.run(None, {"face": x.numpy()})
    with torch.inference_mode():
        (g1, a1), (g2, a2) = model(x), model(x.flip(3))
    p = ((torch.softmax(g1 / 2.5, 1) + torch.softmax(g2 / 2.5, 1)) / 2).numpy()
    dist = ((torch.softmax(a1, 1) + torch.softmax(a2, 1)) / 2).numpy().astype(np.float64)  # (3, 101)
    ages = np.arange(101)
    mean = dist @ ages
    cdf = dist.cumsum(1)
    np.testing.assert_allclose(prob, p, atol=1e-5)
    np.testing.assert_allclose(age, mean, atol=1e-3)
    np.testing.assert_allclose(std, np.sqrt((dist * (ages - mean[:, None]) ** 2).sum(1)), atol=1e-3)
    np.testing.assert_array_equal(low, [ages[np.argmax(c >= 0.1)] for c in cdf])
    np.testing.assert_array_equal(high, [ages[np.argmax(c >= 0.9)] for c in cdf])

    faces_u8 = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    onnx_model, cfg = load_model(out, torch.device("cpu"))
    torch_model, torch_cfg = load_model(ckpt, torch.device("cpu"))
    got, want = predict(onnx_model, cfg, faces_u8, "cpu", flip=True), predict(torch_model, torch_cfg, faces_u8, "cpu", flip=True)
    for key in ("p_male", "age", "age_std", "age_low", "age_high"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-3)


def test_flip_needs_a_flip_export(exported, checkpoint):
    """The hint exports the model again from its own checkpoint (export.py's default is another model)."""
    from inference import predict

    onnx_model, cfg = load_model(exported[0], torch.device("cpu"))
    with pytest.raises(UserError, match=re.escape(f"exported without it; export it again with it: `python export.py "
                                                  f"--checkpoint {checkpoint} --flip --out {exported[0]}`")):
        predict(onnx_model, cfg, np.zeros((1, 112, 112, 3), np.uint8), "cpu", flip=True)


def test_export_it_again_names_the_checkpoint_it_came_from(tmp_path, exported, checkpoint):
    """An ONNX file load_model refuses (another input normalisation) is to be exported again from the checkpoint and
    with the --flip its metadata records."""
    proto = onnx.load(str(exported[0]))
    meta = {p.key: p for p in proto.metadata_props}
    meta["mean"].value, meta["flip"].value = "[0.5, 0.5, 0.5]", "True"
    odd = tmp_path / "odd.onnx"
    onnx.save(proto, str(odd))
    with pytest.raises(UserError, match=re.escape(f"export it again: `python export.py --checkpoint {checkpoint} "
                                                  f"--flip --out {odd}`")):
        load_model(odd, torch.device("cpu"))


def test_demo_and_evaluate_take_the_onnx_file(exported, checkpoint, samples, tmp_path):
    """--checkpoint model.onnx: the same faces and predictions as the .pt it came from."""
    import demo

    out, _ = exported
    runs = {}
    for name, path in (("pt", checkpoint), ("onnx", out)):
        runs[name] = demo.main(["--checkpoint", str(path), "--input", str(samples / "astronaut.jpg"),
                                str(samples / "grace_hopper.jpg"), "--output", str(tmp_path / name), "--device", "cpu"])
    faces = {name: [f for r in res for f in r["faces"]] for name, res in runs.items()}
    assert len(faces["onnx"]) == len(faces["pt"]) == 2
    for a, b in zip(faces["onnx"], faces["pt"]):
        assert a["box"] == b["box"] and a["gender"] == b["gender"]
        assert abs(a["age"] - b["age"]) < 0.02 and abs(a["gender_prob"] - b["gender_prob"]) < 2e-4

    from inference import OnnxModel, predict

    faces_u8 = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    onnx_model, cfg = load_model(out, torch.device("cpu"))
    assert isinstance(onnx_model, OnnxModel) and cfg["size"] == 112 and cfg["age_loss"] == "l1"
    torch_model, torch_cfg = load_model(checkpoint, torch.device("cpu"))
    got = predict(onnx_model, cfg, faces_u8, "cpu", batch_size=2)  # batches of 2, 2, 1
    want = predict(torch_model, torch_cfg, faces_u8, "cpu")
    assert got["p_male"].shape == got["age"].shape == (5,)
    np.testing.assert_allclose(got["p_male"], want["p_male"], atol=1e-4)
    np.testing.assert_allclose(got["age"], want["age"], atol=1e-3)


def test_an_onnx_file_not_from_export_is_refused(tmp_path, exported):
    out, _ = exported
    bare = onnx.load(str(out))
    del bare.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(bare, str(plain))
    with pytest.raises(UserError, match="not an export.py model"):
        load_model(plain, torch.device("cpu"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load it"):
        load_model(junk, torch.device("cpu"))
    with pytest.raises(UserError, match="already ONNX"):
        export.main(["--checkpoint", str(out)])
