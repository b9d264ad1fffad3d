"""The network (a ResNet backbone with a gender head and an age head), the age losses and their prediction rules.

Not run directly: train.py builds and trains the model, demo.py / evaluate.py / export.py load it with
load_checkpoint() and turn its age output into years with model.predict_age().

Age losses (`kind`) and what the age head outputs:
  l1, l2  1 value, the standardised age (years - AGE_MEAN) / AGE_STD (regression); prediction =
          AGE_MEAN + AGE_STD * that value; loss: |error| or error^2 of the prediction, in years
  ce      101 logits over ages 0..100, cross-entropy; prediction = the most likely age (argmax)
  dex     101 logits, cross-entropy (DEX, Rothe et al.); prediction = the expected age sum_i p_i * i
  mv      101 logits, mean-variance loss (Pan et al., CVPR 2018): cross-entropy + l1 * mean loss
          + l2 * variance loss of the predicted distribution; prediction = the expected age

head_outputs() turns the two heads into what users see: the gender probability divided by the
calibration temperature (gender_temperature, fitted on the validation split after training;
1.0 in older checkpoints) and, for ce/dex/mv, the spread of the predicted age distribution:
age_std and the central AGE_INTERVAL interval (age_low, age_high). l1/l2 predict one value and
have no interval (NaN there, null in the records).
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
    heads and the standardisation of the regression heads, which predict (age - age_mean) / age_std
    (unit-scale parameters, zero-initialised at age_mean) yet train exactly as a head that outputs years
    (see _age_head); gender_temperature divides the gender logits of the probability users see (not the loss).
    """

    def __init__(self, arch: str, age_loss: str, min_age: int = config.MIN_AGE, max_age: int = config.MAX_AGE,
                 age_mean: float = config.AGE_MEAN, age_std: float = config.AGE_STD, gender_temperature: float = 1.0):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}")
        if age_loss not in AGE_LOSSES:
            raise UserError(f"--age-loss {age_loss}: unknown; choose one of {', '.join(AGE_LOSSES)}")
        if not gender_temperature > 0:
            raise UserError(f"gender_temperature {gender_temperature}: must be positive")
        self.model_args = dict(arch=arch, age_loss=age_loss, min_age=min_age, max_age=max_age, age_mean=age_mean,
                               age_std=age_std, gender_temperature=float(gender_temperature))
        self.kind, self.min_age, self.age_mean, self.age_std = age_loss, min_age, age_mean, age_std
        self.gender_temperature = float(gender_temperature)
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
            return self.gender_head(f), self._age_head(f)  # (N, 2), (N, 1 | num ages) float32

    def _age_head(self, f: torch.Tensor) -> torch.Tensor:
        """age_head(f) (N, 1 | num ages) from the features f (N, C) float32; for l1/l2 with gradients scaled.

        The l1/l2 loss is in years, i.e. on age_std * output, so plain SGD would move this head age_std^2
        times as far (in years) as it moves a head that outputs years, the original's; at a GPU batch's lr
        that made l2 diverge. Dividing its parameters' gradients by age_std^2 gives exactly the years
        head's steps (momentum and weight decay included), while the values stay unchanged.
        """
        if self.kind not in REGRESSION or not torch.is_grad_enabled():
            return self.age_head(f)
        scale = 1.0 / self.age_std ** 2
        weight, bias = (p.detach() + (p - p.detach()) * scale for p in (self.age_head.weight, self.age_head.bias))
        return F.linear(f, weight, bias)

    def predict_age(self, age_out: torch.Tensor) -> torch.Tensor:
        """Predicted age in years (N,) float32 from the age head's output, by the rule of its loss."""
        return self._years(self._age_value(age_out))

    def _age_value(self, age_out: torch.Tensor) -> torch.Tensor:
        """What flip averaging averages: the distribution (N, num ages) of ce/dex/mv, the value (N, 1) of l1/l2."""
        age_out = age_out.float()
        return age_out if self.kind in REGRESSION else age_out.softmax(dim=1)

    def _years(self, value: torch.Tensor) -> torch.Tensor:
        """(N,) years from _age_value's output, by the rule of the loss."""
        if self.kind in REGRESSION:
            return value[:, 0] * self.age_std + self.age_mean
        if self.kind == "ce":
            return (value.argmax(dim=1) + self.min_age).float()
        return value @ self.ages  # dex, mv: the expected age

    def head_outputs(self, gender_logits: torch.Tensor, age_out: torch.Tensor, flip: bool = False,
                     interval: float = config.AGE_INTERVAL) -> dict[str, torch.Tensor]:
        """What a user sees, float32: gender_prob (N, 2) (softmax of logits / gender_temperature), age (N,)
        years, age_std, age_low, age_high (N,) (NaN for l1/l2).

        flip: the batch (2N) holds N faces then their mirror images (mirrored()); the two gender
        probabilities and the two age distributions (l1/l2: values) of each face are averaged.
        age_low/age_high: the (1 - interval) / 2 and (1 + interval) / 2 quantiles of the age
        distribution, i.e. the smallest age whose cumulative probability reaches them, so at least
        `interval` of the predicted mass lies in [age_low, age_high].
        """
        prob = torch.softmax(gender_logits.float() / self.gender_temperature, dim=1)  # (B, 2)
        value = self._age_value(age_out)  # (B, num ages) or (B, 1)
        if flip:
            n = prob.shape[0] // 2
            prob, value = (prob[:n] + prob[n:]) / 2, (value[:n] + value[n:]) / 2  # (N, 2), (N, num ages | 1)
        age = self._years(value)  # (N,)
        if self.kind in REGRESSION:
            nan = torch.full_like(age, float("nan"))
            return dict(gender_prob=prob, age=age, age_std=nan, age_low=nan, age_high=nan)
        mean = value @ self.ages  # (N,)
        std = ((value * (self.ages[None, :] - mean[:, None]) ** 2).sum(dim=1)).clamp_min(0).sqrt()  # (N,)
        cdf = value.cumsum(dim=1)  # (N, num ages)
        last = float(len(self.ages) - 1)

        def quantile(q: float) -> torch.Tensor:  # (N,) years: classes below the one where the cdf reaches q
            return (cdf < q).float().sum(dim=1).clamp(max=last) + self.min_age

        return dict(gender_prob=prob, age=age, age_std=std, age_low=quantile((1 - interval) / 2),
                    age_high=quantile((1 + interval) / 2))

    def age_loss(self, age_out: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """Mean age loss over the batch; age_out (N, 1 | num ages), age (N,) integer years.

        l1/l2 compare the predicted age in years (age_mean + age_std * output), as the original did, so
        --age-weight keeps its meaning: l1 is the error in years, l2 in years^2. The head still outputs
        the standardised age (unit scale, zero-initialised at age_mean).
        """
        age_out = age_out.float()
        if self.kind in REGRESSION:
            loss = F.l1_loss if self.kind == "l1" else F.mse_loss
            return loss(self._years(age_out), age.float())
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


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """(2N, 3, S, S): the faces x (N, 3, S, S), then their horizontal mirror images (for head_outputs(flip=True))."""
    return torch.cat([x, x.flip(3)])


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

def read_checkpoint(path: str | Path) -> dict:
    """A best.pt / last.pt written by train.py, on the CPU (plain values and state dicts only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `python train.py --out DIR` (writes DIR/best.pt) "
                        "or run `make quickstart` (writes runs/quickstart/best.pt)")
    return torch.load(path, map_location="cpu", weights_only=True)


def is_calibrated(path: str | Path) -> bool:
    """Whether train.py's last step (inference.calibrate_checkpoint) marked the best.pt at path; memory-mapped: its
    keys are read, not its weights."""
    return bool(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("calibrated"))


def model_from_checkpoint(ckpt: dict, device: str | torch.device) -> AgeGenderNet:
    """The model a checkpoint rebuilds from its own model_args, in eval mode on device."""
    model = AgeGenderNet(**model_args_of(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_checkpoint(path: str | Path, device: str | torch.device) -> tuple[AgeGenderNet, dict]:
    """(model in eval mode on device, the training config) from a best.pt / last.pt written by train.py."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt["config"]


def model_args_of(ckpt: dict) -> dict:
    """The AgeGenderNet arguments a train.py checkpoint was written with."""
    cfg = ckpt["config"]
    # checkpoints from before model_args: the regression heads predicted years, unstandardised
    return ckpt.get("model_args", dict(arch=cfg["arch"], age_loss=cfg["age_loss"], age_mean=0.0, age_std=1.0))
