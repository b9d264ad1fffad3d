"""models.py and metrics.py: heads, age losses and their prediction rules, weights loading, metrics by hand."""
import math

import numpy as np
import pytest
import torch
import torchvision

import models
from metrics import MetricSums, compute_metrics
from models import age_loss, build_model, load_checkpoint, predict_age, total_loss
from utils import UserError


def one_hot_logits(probs: dict[int, float]) -> torch.Tensor:
    """(1, 101) logits whose softmax puts `probs` on the given ages (and ~0 elsewhere)."""
    logits = torch.full((1, models.NUM_AGES), -1e4)
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
    loss = total_loss(gender_logits, age_out, torch.tensor([0, 1, 1, 0]), torch.tensor([3, 30, 60, 100]), kind, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for head in (model.gender_head, model.age_head):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert predict_age(age_out, kind).shape == (4,)


def test_regression_starts_near_the_data():
    torch.manual_seed(0)
    _, age_out = build_model("resnet18", "l1").eval()(torch.randn(8, 3, 32, 32))
    assert (predict_age(age_out, "l1") - 35).abs().max() < 5


def test_prediction_rules_by_hand():
    logits = one_hot_logits({20: 0.5, 30: 0.3, 60: 0.2})
    assert predict_age(logits, "ce").item() == 20.0  # the most likely age
    expected = 0.5 * 20 + 0.3 * 30 + 0.2 * 60  # 31
    assert predict_age(logits, "dex").item() == pytest.approx(expected, abs=1e-3)
    assert predict_age(logits, "mv").item() == pytest.approx(expected, abs=1e-3)
    assert predict_age(torch.tensor([[41.5]]), "l1").item() == 41.5


def test_losses_by_hand():
    out, target = torch.tensor([[30.0], [50.0]]), torch.tensor([33, 40])
    assert age_loss(out, target, "l1").item() == pytest.approx((3 + 10) / 2)
    assert age_loss(out, target, "l2").item() == pytest.approx((9 + 100) / 2)
    logits = one_hot_logits({20: 0.5, 30: 0.5})
    ce = -math.log(0.5)
    assert age_loss(logits, torch.tensor([20]), "ce").item() == pytest.approx(ce, abs=1e-4)
    assert age_loss(logits, torch.tensor([20]), "dex").item() == pytest.approx(ce, abs=1e-4)
    # mean 25, variance 25: CE + 0.2 * (25 - 20)^2 / 2 + 0.05 * 25
    assert age_loss(logits, torch.tensor([20]), "mv").item() == pytest.approx(ce + 0.2 * 12.5 + 0.05 * 25, abs=1e-3)


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


def test_load_checkpoint(tmp_path):
    torch.manual_seed(2)
    model = build_model("resnet18", "mv").eval()
    torch.save(dict(model=model.state_dict(), config=dict(arch="resnet18", age_loss="mv", size=32)), tmp_path / "c.pt")
    loaded, cfg = load_checkpoint(tmp_path / "c.pt", "cpu")
    assert cfg["size"] == 32 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    with pytest.raises(UserError, match="none.pt not found.*train.py.*make quickstart"):
        load_checkpoint(tmp_path / "none.pt", "cpu")


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
