"""Issue 15: age intervals, calibrated gender probabilities, flip averaging, errors per group.

Each number is checked against a case worked out by hand (or, for the temperature, against the
over-confidence it was built with).
"""
import numpy as np
import pytest
import torch

import config
import evaluate as ev
import inference
import metrics
import models

# one hand-made age distribution over 0..100: its cdf is 0.05 (20), 0.30 (25), 0.70 (30), 0.85 (35), 1.0 (40)
MASS = {20: 0.05, 25: 0.25, 30: 0.40, 35: 0.15, 40: 0.15}
MEAN = sum(a * p for a, p in MASS.items())  # 30.5
STD = np.sqrt(sum(p * (a - MEAN) ** 2 for a, p in MASS.items()))  # sqrt(29.75)


@pytest.fixture(scope="module")
def heads():
    """Untrained models of each head kind (only their head rules are used here)."""
    torch.manual_seed(0)
    return {kind: models.AgeGenderNet("resnet18", kind) for kind in ("ce", "dex", "mv", "l1")}


def logits_of(mass: dict) -> torch.Tensor:
    """(1, 101) age logits whose softmax is `mass` (1e-12 elsewhere)."""
    p = torch.full((1, 101), 1e-12, dtype=torch.float64)
    for age, share in mass.items():
        p[0, age] = share
    return p.log().float()


def test_interval_and_std_of_hand_made_distributions(heads):
    age_out = torch.cat([logits_of(MASS), logits_of({50: 1.0})])  # (2, 101); the second: all mass at 50
    gender = torch.zeros(2, 2)
    for kind in ("dex", "mv", "ce"):
        out = heads[kind].head_outputs(gender, age_out)
        # 10th percentile: the first age whose cdf reaches 0.1 (25); 90th: reaches 0.9 (40)
        assert out["age_low"].tolist() == [25.0, 50.0] and out["age_high"].tolist() == [40.0, 50.0]
        assert out["age_std"].tolist() == pytest.approx([STD, 0.0], abs=1e-3)
        assert out["age"].tolist() == pytest.approx([30.0 if kind == "ce" else MEAN, 50.0], abs=1e-3)
    wider = heads["dex"].head_outputs(gender, age_out[:1], interval=0.95)  # 2.5th .. 97.5th percentile
    assert (wider["age_low"].item(), wider["age_high"].item()) == (20.0, 40.0)
    out = heads["l1"].head_outputs(gender, torch.zeros(2, 1))
    assert all(torch.isnan(out[k]).all() for k in ("age_std", "age_low", "age_high"))  # no interval


def test_coverage_by_hand():
    low, high = np.array([25, 50, 10, 30]), np.array([40, 50, 20, 35])
    true = np.array([41, 50, 10, 36])  # outside (just), inside (a point interval), inside (on the bound), outside
    assert metrics.interval_coverage(low, high, true) == 0.5
    assert metrics.interval_coverage(np.full(2, np.nan), np.full(2, np.nan), np.array([3, 4])) is None
    records = [dict(age=float(t), age_low=float(lo), age_high=float(hi), age_std=1.0) for lo, hi, t in zip(low, high, true)]
    report = ev.interval_report(records)
    assert report["coverage"] == 0.5 and report["level"] == config.AGE_INTERVAL
    assert report["by_age_bucket"]["10-19"] == dict(n=1, coverage=1.0)
    assert report["by_age_bucket"]["30-39"] == dict(n=1, coverage=0.0)
    assert report["by_age_bucket"]["40-49"] == dict(n=1, coverage=0.0)
    assert report["by_age_bucket"]["0-9"] == dict(n=0, coverage=None)
    assert report["mean_width"] == pytest.approx((15 + 0 + 10 + 5) / 4)
    assert ev.interval_report([dict(age=3.0, age_low=None, age_high=None, age_std=None)]) is None


def test_ece_by_hand():
    p_male = np.array([0.9, 0.9, 0.75, 0.3, 0.62])
    truth = np.array([1, 0, 1, 0, 1])
    # confidences 0.9, 0.9, 0.75, 0.7, 0.62 (bins of width 1/15: 13, 13, 11, 10, 9); right: 1, 0, 1, 1, 1
    # ECE = 2/5 |0.5 - 0.9| + 1/5 |1 - 0.75| + 1/5 |1 - 0.7| + 1/5 |1 - 0.62|
    want = (2 * 0.4 + 0.25 + 0.3 + 0.38) / 5
    r = metrics.reliability(p_male, truth)
    assert r["ece"] == pytest.approx(want) and metrics.expected_calibration_error(p_male, truth) == pytest.approx(want)
    assert len(r["counts"]) == metrics.ECE_BINS == 15 and sum(r["counts"]) == 5
    assert (r["counts"][13], r["accuracy"][13], r["confidence"][13]) == (2, 0.5, pytest.approx(0.9))
    assert r["accuracy"][0] is None
    assert metrics.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0  # sure and right


def test_temperature_fitting_lowers_the_ece_of_an_over_confident_model():
    rng = np.random.default_rng(0)
    margin = rng.normal(0, 2, 4000)  # a calibrated model's log-odds of male
    truth = (rng.random(4000) < 1 / (1 + np.exp(-margin))).astype(np.int64)  # drawn from its own probabilities
    logits = np.stack([np.zeros_like(margin), 4 * margin], 1)  # the same model, over-confident: logits x 4
    before = metrics.expected_calibration_error(1 / (1 + np.exp(-logits[:, 1])), truth)
    t = metrics.fit_temperature(logits, truth)
    after = metrics.expected_calibration_error(1 / (1 + np.exp(-logits[:, 1] / t)), truth)
    assert 3.5 < t < 4.5  # it finds the scale it was built with
    assert after < before / 3 and after < 0.03
    assert metrics.gender_nll(logits, truth, t) < metrics.gender_nll(logits, truth, 1.0)


def test_calibrate_checkpoint_stores_the_fitted_temperature(tmp_path, checkpoint):
    """What train.py calls at the end of a run: the fitted T goes into model_args, and load_checkpoint
    gives a model whose gender probability is softmax(logits / T)."""
    import shutil

    path = tmp_path / "best.pt"
    shutil.copy(checkpoint, path)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gender = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    model, _ = models.load_checkpoint(path, "cpu")
    with torch.inference_mode():
        logits = model(x)[0]
    t = inference.calibrate_checkpoint(path, [(x[:5], None, gender[:5]), (x[5:], None, gender[5:])], "cpu")
    assert t == pytest.approx(metrics.fit_temperature(logits.numpy(), gender.numpy()))
    loaded, _ = models.load_checkpoint(path, "cpu")
    assert loaded.gender_temperature == t and loaded.model_args["gender_temperature"] == t
    with torch.inference_mode():
        got = loaded.head_outputs(*loaded(x))["gender_prob"]
    torch.testing.assert_close(got, torch.softmax(logits / t, 1))
    old = torch.load(checkpoint, weights_only=True)
    del old["model_args"]["gender_temperature"]  # a checkpoint from before calibration
    torch.save(old, tmp_path / "old.pt")
    assert models.load_checkpoint(tmp_path / "old.pt", "cpu")[0].gender_temperature == 1.0


def test_flip_of_a_symmetric_face_is_the_plain_prediction(heads, aligned_faces):
    face = aligned_faces[0]
    half = face[:, :face.shape[1] // 2]
    symmetric = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], 1))[None]  # (1, S, S, 3)
    model = heads["dex"].eval()
    plain = inference.predict(model, {}, symmetric, "cpu")
    flipped = inference.predict(model, {}, symmetric, "cpu", flip=True)
    for key in inference.PREDICTION_KEYS:
        np.testing.assert_allclose(flipped[key], plain[key], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(flipped["plain"][key], plain[key], rtol=1e-5, atol=1e-4)  # the pass's plain half
    # a face that is not symmetric: the average of it and its mirror, by hand
    one = face[None]
    mirror = np.ascontiguousarray(face[:, ::-1])[None]
    a, b = (inference.predict(model, {}, f, "cpu") for f in (one, mirror))
    both = inference.predict(model, {}, one, "cpu", flip=True)
    np.testing.assert_allclose(both["p_male"], (a["p_male"] + b["p_male"]) / 2, rtol=1e-5)
    assert not np.allclose(a["age"], b["age"], atol=1e-6)  # the mirror does change the prediction


def test_group_table_counts_add_up():
    rng = np.random.default_rng(1)
    n = 500
    true_age = rng.uniform(0, 95, n)
    pred_age = true_age + rng.normal(0, 5, n)
    true_gender, pred_gender = rng.integers(0, 2, n), rng.integers(0, 2, n)
    table = ev.group_table(pred_age, true_age, pred_gender, true_gender, min_n=30)
    assert sum(s["n"] for rows in table.values() for s in rows.values()) == n
    for g, name in enumerate(inference.GENDERS):
        assert sum(s["n"] for s in table[name].values()) == int((true_gender == g).sum())
        for b, label in enumerate(ev.BUCKET_LABELS):
            mask = (true_gender == g) & (ev.age_bucket(true_age) == b)
            s = table[name][label]
            assert s["n"] == mask.sum() and s["few"] == (mask.sum() < 30)
            assert s["age_mae"] == pytest.approx(np.abs(pred_age - true_age)[mask].mean())
            assert s["gender_acc"] == pytest.approx((pred_gender == true_gender)[mask].mean())
    small = ev.group_table([30.0], [31.0], [1], [1], min_n=2)
    assert small["male"]["30-39"] == dict(n=1, age_mae=1.0, gender_acc=1.0, few=True)
    assert small["female"]["30-39"] == dict(n=0, age_mae=None, gender_acc=None, few=True)


def test_predictor_flip_sends_face_and_mirror_in_one_pass(checkpoint, samples):
    """demo.py/serve.py --flip: one forward pass of 2 for a photo's one face; the same box, another probability."""
    from utils import read_image

    photo = read_image(samples / "astronaut.jpg")
    plain = inference.Predictor(checkpoint, "cpu", 0.9).analyse(photo)
    predictor = inference.Predictor(checkpoint, "cpu", 0.9, flip=True)
    sizes, forward = [], predictor.model.forward
    predictor.model.forward = lambda x: (sizes.append(len(x)), forward(x))[1]
    flipped = predictor.analyse(photo)
    assert sizes == [2] and len(flipped) == len(plain) == 1
    assert flipped[0]["box"] == plain[0]["box"] and flipped[0]["gender_prob"] != plain[0]["gender_prob"]


@pytest.mark.parametrize("sign, low, high", [(1, 0.5, 3), (1, 10, 20), (-1, 0.5, 3)])
def test_no_temperature_fits_where_every_gender_is_right_or_every_one_wrong(tmp_path, checkpoint, sign, low, high):
    """Every gender right (the quick start's 106 validation faces): the NLL falls as T -> 0, and the fit once stored
    T = 0.05, which made every probability 1.0, wrong guesses' too; with wide margins the NLL is 0.0 in floats well
    inside the range, where the search stopped anywhere (0.27 at a margin of 10). Every gender wrong: it falls as T
    grows. No T then: calibrate_checkpoint stores 1.0, over what an earlier fit stored, and marks it calibrated."""
    import shutil

    margin = np.random.default_rng(0).uniform(low, high, 200)
    truth = np.arange(200) % 2
    logits = np.stack([-margin, margin], 1) * np.where(truth == 1, sign, -sign)[:, None]  # right (1) or wrong (-1)
    assert metrics.fit_temperature(logits, truth) is None
    tied = logits.copy()
    tied[0] = 0.0  # one exact tie: its NLL is log 2 at every T, the others' still fall as T shrinks (or grows)
    assert metrics.fit_temperature(tied, truth) is None
    path = tmp_path / "best.pt"
    shutil.copy(checkpoint, path)
    earlier = models.read_checkpoint(path)
    earlier["model_args"]["gender_temperature"] = 0.05
    torch.save(earlier, path)
    model, _ = models.load_checkpoint(path, "cpu")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        guessed = model(x)[0].argmax(1)
    right = guessed if sign == 1 else 1 - guessed
    assert inference.calibrate_checkpoint(path, [(x, None, right)], "cpu") is None
    after = models.read_checkpoint(path)
    assert after["model_args"]["gender_temperature"] == 1.0 and after["calibrated"]
