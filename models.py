"""The network (a ResNet backbone with a gender head and an age head), the age losses and their prediction rules.

Not run directly: train.py builds and trains the model, demo.py / evaluate.py / export.py load it with
load_checkpoint() and turn its age output into years with predict_age().

Age losses (`kind`) and what the age head outputs:
  l1, l2  1 value, the age in years (regression); prediction = that value
  ce      101 logits over ages 0..100, cross-entropy; prediction = the most likely age (argmax)
  dex     101 logits, cross-entropy (DEX, Rothe et al.); prediction = the expected age sum_i p_i * i
  mv      101 logits, mean-variance loss (Pan et al., CVPR 2018): cross-entropy + l1 * mean loss
          + l2 * variance loss of the predicted distribution; prediction = the expected age
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import config
from utils import UserError

ARCHS = ("resnet18", "resnet34", "resnet50")
AGE_LOSSES = ("l1", "l2", "ce", "dex", "mv")
REGRESSION = ("l1", "l2")
NUM_AGES = config.MAX_AGE - config.MIN_AGE + 1  # age classes of ce/dex/mv: one per year


class AgeGenderNet(nn.Module):
    """ResNet features, average-pooled, feeding two linear heads: gender (2 logits) and age (1 or NUM_AGES)."""

    def __init__(self, arch: str, age_loss: str):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}")
        if age_loss not in AGE_LOSSES:
            raise UserError(f"--age-loss {age_loss}: unknown; choose one of {', '.join(AGE_LOSSES)}")
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # the heads below replace the ImageNet classifier
        self.gender_head = nn.Linear(features, 2)
        self.age_head = nn.Linear(features, 1 if age_loss in REGRESSION else NUM_AGES)
        if age_loss in REGRESSION:
            # from scratch the output would start near 0 years and L1 moves it by lr per step: start near the data
            nn.init.constant_(self.age_head.bias, config.REGRESSION_INIT_AGE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)  # (N, C) pooled features
        return self.gender_head(f), self.age_head(f)  # (N, 2), (N, 1 | NUM_AGES)


def build_model(arch: str, age_loss: str, pretrained: str = "none") -> AgeGenderNet:
    """A fresh model; pretrained: "imagenet" (torchvision download), "none" (random init) or a local state dict PATH."""
    model = AgeGenderNet(arch, age_loss)
    if pretrained == "imagenet":
        load_backbone(model, imagenet_state_dict(arch), f"torchvision's ImageNet {arch} weights")
    elif pretrained != "none":
        path = Path(pretrained)
        if not path.is_file():
            raise UserError(f"--pretrained {path}: no such file; pass imagenet, none, or a local {arch} state dict")
        load_backbone(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model


def imagenet_state_dict(arch: str) -> dict:
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a corrupt download a RuntimeError
        raise UserError(f"--pretrained imagenet: cannot get {weights.url} ({type(e).__name__}: {e}); offline, "
                        f"pass --pretrained PATH (a {arch} state dict saved on a connected machine) or --pretrained none"
                        ) from e


def load_backbone(model: AgeGenderNet, state: dict, source: str) -> None:
    """Load torchvision ResNet keys (conv1.weight, layer1.0.bn1.running_mean, ...) into the backbone; fc.* is ignored."""
    if not isinstance(state, dict):
        raise UserError(f"{source}: not a state dict (a {type(state).__name__})")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: another depth of ResNet
        raise UserError(f"{source}: does not fit this backbone ({str(e).splitlines()[-1].strip()})") from e
    if missing or unexpected:
        raise UserError(f"{source}: not a torchvision ResNet state dict for this backbone "
                        f"({len(missing)} keys missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")


# --- losses and predictions ------------------------------------------------------------------

def age_loss(age_out: torch.Tensor, age_target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean age loss over the batch; age_out (N, 1 | NUM_AGES), age_target (N,) integer years."""
    age_out = age_out.float()  # softmax and squared years overflow bf16's precision
    if kind in REGRESSION:
        loss = F.l1_loss if kind == "l1" else F.mse_loss
        return loss(age_out[:, 0], age_target.float())
    classes = age_target.long() - config.MIN_AGE  # (N,)
    ce = F.cross_entropy(age_out, classes)
    if kind in ("ce", "dex"):
        return ce
    if kind != "mv":
        raise ValueError(f"unknown age loss {kind!r}")
    p = age_out.softmax(dim=1)  # (N, NUM_AGES)
    ages = age_axis(age_out)  # (NUM_AGES,)
    mean = p @ ages  # (N,)
    variance = (p * (ages[None, :] - mean[:, None]) ** 2).sum(dim=1)  # (N,)
    mean_loss = 0.5 * ((mean - age_target.float()) ** 2).mean()
    lambda_mean, lambda_var = config.MV_LAMBDAS
    return ce + lambda_mean * mean_loss + lambda_var * variance.mean()


def predict_age(age_out: torch.Tensor, kind: str) -> torch.Tensor:
    """Predicted age in years (N,) float from the age head's output, by the rule of the loss it was trained with."""
    if kind in REGRESSION:
        return age_out[:, 0].float()
    if kind == "ce":
        return (age_out.argmax(dim=1) + config.MIN_AGE).float()
    if kind in ("dex", "mv"):
        return age_out.float().softmax(dim=1) @ age_axis(age_out)
    raise ValueError(f"unknown age loss {kind!r}")


def age_axis(age_out: torch.Tensor) -> torch.Tensor:
    """The age in years of each class, (NUM_AGES,) float32 on age_out's device."""
    return torch.arange(config.MIN_AGE, config.MAX_AGE + 1, device=age_out.device, dtype=torch.float32)


def total_loss(gender_logits: torch.Tensor, age_out: torch.Tensor, gender: torch.Tensor, age: torch.Tensor,
               kind: str, age_weight: float) -> torch.Tensor:
    """The training objective: gender cross-entropy + age_weight * age loss (a scalar)."""
    return F.cross_entropy(gender_logits.float(), gender) + age_weight * age_loss(age_out, age, kind)


# --- checkpoints -------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, device: str | torch.device) -> tuple[AgeGenderNet, dict]:
    """(model in eval mode on device, the training config) from a best.pt / last.pt written by train.py."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `python train.py --out DIR` (writes DIR/best.pt) "
                        "or run `make quickstart` (writes runs/quickstart/best.pt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], cfg["age_loss"], "none")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
