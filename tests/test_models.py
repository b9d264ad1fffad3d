"""models.py and metrics.py: heads, age losses and their prediction rules, weights loading, metrics by hand."""
import math

import numpy as np
import pytest
import torch
import torchvision

import config
import models
from metrics import MetricSums, compute_metrics
from models import AgeGenderNet, build_model, load_checkpoint
from utils import UserError


@pytest.fixture(scope="module")
def nets():
    """One fresh ResNet-18 per age loss, for the rules that only need its head settings."""
    return {kind: AgeGenderNet("resnet18", kind) for kind in models.AGE_LOSSES}


def one_hot_logits(probs: dict[int, float]) -> torch.Tensor:
    """(1, 101) logits whose softmax puts `probs` on the given ages (and ~0 elsewhere)."""
    logits = torch.full((1, 101), -1e4)
    for age, p in probs.items():
        logits[0, age] = math.log(p)
    return logits


# --- the network and the losses ------------------------------------------------------------------

@pytest.mark.parametrize("kind", models.AGE_LOSSES)
def test_each_age_loss_trains_both_heads(kind):
    torch.manual_seed(0)
    model = build_model("resnet18", kind)
    x = torch.randn(4, 3, 32, 32)
    gender_logits, age_out = model(x)
    assert gender_logits.shape == (4, 2)
    assert age_out.shape == (4, 1 if kind in ("l1", "l2") else 101)
    loss = model.loss(gender_logits, age_out, torch.tensor([0, 1, 1, 0]), torch.tensor([3, 30, 60, 100]), 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for head in (model.gender_head, model.age_head):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.predict_age(age_out).shape == (4,)


def test_regression_starts_near_the_data():
    torch.manual_seed(0)
    model = build_model("resnet18", "l1").eval()
    _, age_out = model(torch.randn(8, 3, 32, 32))
    assert (model.predict_age(age_out) - config.AGE_MEAN).abs().max() < 5


@pytest.mark.parametrize("kind", models.AGE_LOSSES)
def test_heads_run_in_fp32_under_bf16_autocast(kind):
    """The backbone may run in bf16; the logits, the age rule and the loss must not (ce's argmax ties in bf16)."""
    torch.manual_seed(0)
    model = build_model("resnet18", kind)
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gender_logits, age_out = model(x)
        loss = model.loss(gender_logits, age_out, torch.tensor([0, 1, 1, 0]), torch.tensor([3, 30, 60, 100]), 0.1)
    assert gender_logits.dtype == age_out.dtype == loss.dtype == torch.float32
    assert model.predict_age(age_out).dtype == torch.float32


def test_prediction_rules_by_hand(nets):
    logits = one_hot_logits({20: 0.5, 30: 0.3, 60: 0.2})
    assert nets["ce"].predict_age(logits).item() == 20.0  # the most likely age
    expected = 0.5 * 20 + 0.3 * 30 + 0.2 * 60  # 31
    assert nets["dex"].predict_age(logits).item() == pytest.approx(expected, abs=1e-3)
    assert nets["mv"].predict_age(logits).item() == pytest.approx(expected, abs=1e-3)
    # regression heads predict the standardised age: AGE_MEAN + AGE_STD * output
    out = torch.tensor([[0.0], [1.0], [-0.5]])
    want = [config.AGE_MEAN, config.AGE_MEAN + config.AGE_STD, config.AGE_MEAN - 0.5 * config.AGE_STD]
    assert nets["l1"].predict_age(out).tolist() == pytest.approx(want)
    assert nets["l2"].predict_age(out).tolist() == pytest.approx(want)


def test_losses_by_hand(nets):
    mean, std = config.AGE_MEAN, config.AGE_STD
    out = torch.tensor([[0.0], [1.0]])  # ages mean and mean + std
    target = torch.tensor([round(mean) + 3, round(mean + std) - 10])
    errors = [mean - target[0].item(), mean + std - target[1].item()]  # in years, the original's units
    assert nets["l1"].age_loss(out, target).item() == pytest.approx(sum(abs(e) for e in errors) / 2)
    assert nets["l2"].age_loss(out, target).item() == pytest.approx(sum(e * e for e in errors) / 2)
    logits = one_hot_logits({20: 0.5, 30: 0.5})
    ce = -math.log(0.5)
    assert nets["ce"].age_loss(logits, torch.tensor([20])).item() == pytest.approx(ce, abs=1e-4)
    assert nets["dex"].age_loss(logits, torch.tensor([20])).item() == pytest.approx(ce, abs=1e-4)
    # mean 25, variance 25: CE + 0.2 * (25 - 20)^2 / 2 + 0.05 * 25
    assert nets["mv"].age_loss(logits, torch.tensor([20])).item() == pytest.approx(ce + 0.2 * 12.5 + 0.05 * 25, abs=1e-3)
    gender_logits = torch.tensor([[2.0, 0.0]])
    gender_ce = torch.nn.functional.cross_entropy(gender_logits, torch.tensor([1])).item()
    assert nets["dex"].loss(gender_logits, logits, torch.tensor([1]), torch.tensor([20]), 0.1).item() == \
        pytest.approx(gender_ce + 0.1 * ce, abs=1e-4)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_the_standardised_head_trains_as_a_head_in_years(kind):
    """The loss and every SGD step (momentum, weight decay) match a head that outputs years (age_std 1, the
    original's units), so --age-weight means what it meant there; the head's values are age_head's own."""
    torch.manual_seed(0)
    x, gender, age = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)), torch.randint(10, 80, (8,))
    runs = []
    for std in (config.AGE_STD, 1.0):
        torch.manual_seed(1)
        model = build_model("resnet18", kind, age_mean=config.AGE_MEAN, age_std=std)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        losses, ages = [], []
        for _ in range(4):
            gender_logits, age_out = model(x)
            loss = model.loss(gender_logits, age_out, gender, age, 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            ages.append(model.predict_age(age_out.detach()))  # (8,) years
        runs.append((torch.stack(losses), torch.stack(ages)))
        features = torch.randn(4, model.age_head.in_features)
        assert torch.equal(model._age_head(features), model.age_head(features))  # only the gradients are scaled
    (standardised_loss, standardised_ages), (years_loss, years_ages) = runs
    assert (standardised_ages[-1] - config.AGE_MEAN).abs().max() > 0.1  # the head has moved
    torch.testing.assert_close(standardised_loss, years_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standardised_ages, years_ages, rtol=1e-4, atol=1e-3)


def test_unknown_settings_are_user_errors():
    with pytest.raises(UserError, match="--arch resnet99"):
        build_model("resnet99", "l1")
    with pytest.raises(UserError, match="--age-loss huber"):
        build_model("resnet18", "huber")


# --- weights -------------------------------------------------------------------------------------

def test_local_pretrained_state_dict(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()  # stands in for downloaded ImageNet weights, fc included
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", "dex", str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    with pytest.raises(UserError, match="not a torchvision ResNet state dict|does not fit"):
        build_model("resnet34", "dex", str(tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="nothere.pth: no such file"):
        build_model("resnet18", "dex", str(tmp_path / "nothere.pth"))


def test_imagenet_offline_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(UserError, match="--pretrained imagenet: cannot get.*--pretrained PATH.*--pretrained none"):
        build_model("resnet18", "l1", "imagenet")


def test_load_checkpoint_rebuilds_the_model_from_its_model_args(tmp_path):
    torch.manual_seed(2)
    model = build_model("resnet18", "l2", min_age=10, max_age=80, age_mean=30.0, age_std=10.0).eval()
    torch.nn.init.normal_(model.age_head.weight, std=0.1)  # not the zero init: the outputs must differ per face
    torch.save(dict(model=model.state_dict(), model_args=model.model_args, config=dict(arch="resnet18", age_loss="l2",
                                                                                        size=32)), tmp_path / "c.pt")
    loaded, cfg = load_checkpoint(tmp_path / "c.pt", "cpu")
    assert cfg["size"] == 32 and not loaded.training and loaded.model_args == model.model_args
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
        assert torch.equal(model.predict_age(model(x)[1]), loaded.predict_age(loaded(x)[1]))
    with pytest.raises(UserError, match="none.pt not found.*train.py.*make quickstart"):
        load_checkpoint(tmp_path / "none.pt", "cpu")


def test_a_checkpoint_from_before_model_args_predicts_years(tmp_path):
    """Older checkpoints hold no model_args; their regression heads output years, as they were trained to."""
    model = build_model("resnet18", "l1").eval()
    torch.nn.init.constant_(model.age_head.bias, 41.5)
    torch.save(dict(model=model.state_dict(), config=dict(arch="resnet18", age_loss="l1", size=32)), tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt", "cpu")
    with torch.no_grad():
        assert loaded.predict_age(loaded(torch.randn(1, 3, 32, 32))[1]).item() == pytest.approx(41.5)


# --- metrics -------------------------------------------------------------------------------------

PRED_AGE = np.array([20.0, 31.0, 40.5, 70.0, 10.0])
TRUE_AGE = np.array([25, 30, 35, 70, 16])  # errors 5, 1, 5.5, 0, 6
PRED_GENDER = np.array([1, 0, 1, 1, 0])
TRUE_GENDER = np.array([1, 1, 1, 0, 0])  # 3 of 5 right


def test_metrics_by_hand():
    m = compute_metrics(PRED_AGE, TRUE_AGE, PRED_GENDER, TRUE_GENDER)
    assert m == {"gender_acc": pytest.approx(0.6), "age_mae": pytest.approx(17.5 / 5), "cs5": pytest.approx(0.6)}
    assert compute_metrics(PRED_AGE, TRUE_AGE, PRED_GENDER, TRUE_GENDER, k=1)["cs1"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        compute_metrics([], [], [], [])


def test_device_sums_match_the_numpy_metrics():
    sums = MetricSums(torch.device("cpu"))
    for part, loss in ((slice(0, 2), 1.0), (slice(2, 5), 4.0)):  # two batches of 2 and 3
        sums.update(torch.tensor(PRED_AGE[part]), torch.tensor(TRUE_AGE[part]), torch.tensor(PRED_GENDER[part]),
                    torch.tensor(TRUE_GENDER[part]), torch.tensor(loss))
    m = sums.compute()
    assert m.pop("loss") == pytest.approx((2 * 1.0 + 3 * 4.0) / 5)  # weighted by batch size
    assert m == pytest.approx(compute_metrics(PRED_AGE, TRUE_AGE, PRED_GENDER, TRUE_GENDER))
