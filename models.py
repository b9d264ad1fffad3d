"""The network (a ResNet backbone with a gender head and an age head), the age losses and their prediction rules.

Not run directly: train.py builds and trains the model, demo.py / evaluate.py / export.py load it with
load_checkpoint() and turn its age output into years with model.predict_age().

Age losses (`kind`) and what the age head outputs:
  l1, l2  1 value, the standardised age (years - AGE_MEAN) / AGE_STD (regression); loss: |error| or
          error^2 in those units; prediction = AGE_MEAN + AGE_STD * that value
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


class AgeGenderNet(nn.Module):
    """ResNet features, average-pooled, feeding two linear heads: gender (2 logits) and age (1 or one per year).

    model_args (saved in every checkpoint) rebuild it: arch, age_loss, the age range of the class
    heads and the standardisation of the regression heads, which predict (age - age_mean) / age_std:
    a target of unit scale keeps l2's gradients small at the large learning rates of big batches.
    """

    def __init__(self, arch: str, age_loss: str, min_age: int = config.MIN_AGE, max_age: int = config.MAX_AGE,
                 age_mean: float = config.AGE_MEAN, age_std: float = config.AGE_STD):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}")
        if age_loss not in AGE_LOSSES:
            raise UserError(f"--age-loss {age_loss}: unknown; choose one of {', '.join(AGE_LOSSES)}")
        self.model_args = dict(arch=arch, age_loss=age_loss, min_age=min_age, max_age=max_age, age_mean=age_mean,
                               age_std=age_std)
        self.kind, self.min_age, self.age_mean, self.age_std = age_loss, min_age, age_mean, age_std
        self.register_buffer("ages", torch.arange(min_age, max_age + 1, dtype=torch.float32), persistent=False)
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # the heads below replace the ImageNet classifier
        self.gender_head = nn.Linear(features, 2)
        self.age_head = nn.Linear(features, 1 if age_loss in REGRESSION else len(self.ages))
        if age_loss in REGRESSION:  # a fresh head predicts age_mean for every face, then learns from there
            nn.init.zeros_(self.age_head.weight)
            nn.init.zeros_(self.age_head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)  # (N, C) pooled features, bf16 under autocast
        # the heads in fp32 whatever the autocast: an argmax over 101 bf16 logits ties towards the youngest
        # class, and validation must see the outputs evaluate.py sees
        with torch.autocast(x.device.type, enabled=False):
            f = f.float()
            return self.gender_head(f), self.age_head(f)  # (N, 2), (N, 1 | num ages) float32

    def predict_age(self, age_out: torch.Tensor) -> torch.Tensor:
        """Predicted age in years (N,) float32 from the age head's output, by the rule of its loss."""
        age_out = age_out.float()
        if self.kind in REGRESSION:
            return age_out[:, 0] * self.age_std + self.age_mean
        if self.kind == "ce":
            return (age_out.argmax(dim=1) + self.min_age).float()
        return age_out.softmax(dim=1) @ self.ages  # dex, mv: the expected age

    def age_loss(self, age_out: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """Mean age loss over the batch; age_out (N, 1 | num ages), age (N,) integer years.

        l1/l2 compare standardised ages, so l1 is the error in units of age_std years, l2 its square.
        """
        age_out = age_out.float()
        if self.kind in REGRESSION:
            loss = F.l1_loss if self.kind == "l1" else F.mse_loss
            return loss(age_out[:, 0], (age.float() - self.age_mean) / self.age_std)
        ce = F.cross_entropy(age_out, age.long() - self.min_age)
        if self.kind in ("ce", "dex"):
            return ce
        p = age_out.softmax(dim=1)  # (N, num ages)
        mean = p @ self.ages  # (N,)
        variance = (p * (self.ages[None, :] - mean[:, None]) ** 2).sum(dim=1)  # (N,)
        mean_loss = 0.5 * ((mean - age.float()) ** 2).mean()
        lambda_mean, lambda_var = config.MV_LAMBDAS
        return ce + lambda_mean * mean_loss + lambda_var * variance.mean()

    def loss(self, gender_logits: torch.Tensor, age_out: torch.Tensor, gender: torch.Tensor, age: torch.Tensor,
             age_weight: float) -> torch.Tensor:
        """The training objective, in fp32: gender cross-entropy + age_weight * age loss (a scalar)."""
        return F.cross_entropy(gender_logits.float(), gender) + age_weight * self.age_loss(age_out, age)


def build_model(arch: str, age_loss: str, pretrained: str = "none", **head) -> AgeGenderNet:
    """A fresh model; pretrained: "imagenet" (torchvision download), "none" (random init) or a local state dict PATH.

    head: AgeGenderNet's age-head settings (min_age, max_age, age_mean, age_std), config.py's by default.
    """
    model = AgeGenderNet(arch, age_loss, **head)
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


# --- checkpoints -------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, device: str | torch.device) -> tuple[AgeGenderNet, dict]:
    """(model in eval mode on device, the training config) from a best.pt / last.pt written by train.py."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `python train.py --out DIR` (writes DIR/best.pt) "
                        "or run `make quickstart` (writes runs/quickstart/best.pt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = AgeGenderNet(**model_args_of(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def model_args_of(ckpt: dict) -> dict:
    """The AgeGenderNet arguments a train.py checkpoint was written with."""
    cfg = ckpt["config"]
    # checkpoints from before model_args: the regression heads predicted years, unstandardised
    return ckpt.get("model_args", dict(arch=cfg["arch"], age_loss=cfg["age_loss"], age_mean=0.0, age_std=1.0))
