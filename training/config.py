"""Typed training configuration, validated once. Defaults are the paper's (section 4.1, appendix
A); the CPU recipe overrides them explicitly. Saved as JSON next to every run and inside every
checkpoint.

pydantic models: a wrong type, an unknown field or a value outside its choices fails at once,
naming the field, whether it comes from a saved config.json or the command line (the CLI builds
a dict of its flags over the base config and validates it here, in one place). The fixed choices
are `Literal` types, which the CLI lists in its --help.
"""

import json
from pathlib import Path
from typing import Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field

AttackMethod = Literal["apgd", "pgd", "none"]
Norm = Literal["linf", "l2"]
BnViews = Literal["separate", "concat"]
Switch = Literal["auto", "on", "off"]
Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]  # what the CLI offers; configs take any torch device
EvalMode = Literal["full", "quick"]  # the attack suite: the paper's, or smoke runs only
NORMS = get_args(Norm)
# What a saved config without these fields was trained with: one batch of both views, and
# (under torchrun) each GPU's own BatchNorm statistics.
LEGACY = {"bn_views": "concat", "sync_bn": False}


class Config(BaseModel):
    """Every config of the project (training, heads, baselines, experiments, the attack suite):
    unknown fields are errors (a typo must not silently train the default), and assignments
    are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def updated(self, **changes) -> Self:
        """A copy with `changes`, validated as a new config would be (`model_copy(update=...)`
        alone checks nothing)."""
        return self.model_validate({**self.model_dump(), **changes})


class ModelConfig(Config):
    arch: str = Field("preact_resnet34", description="preact_resnet_small, preact_resnet18, ..34")
    width: int = Field(2, ge=1, description="Width multiplier (1, 2, 4).")
    proj_hidden: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)


class DataConfig(Config):
    source: str = Field("cifar10", description="cifar10, cifar100, an ImageFolder dir or .tar.gz")
    root: str = Field("data", description="Where torchvision keeps/downloads CIFAR.")
    download: bool = Field(False, description="Let torchvision download CIFAR.")
    extra_unlabeled: list[str] = Field(default_factory=list,
                                       description="Extra unlabeled image folders/archives.")
    image_size: int = Field(32, ge=1)


class AugmentConfig(Config):
    """The views' augmentations (appendix A; `augment.augment` applies them)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    color_strength: float = Field(0.5, ge=0)  # the paper's s: jitter (0.8s, 0.8s, 0.8s, 0.2s)
    jitter_p: float = Field(0.8, ge=0, le=1)
    gray_p: float = Field(0.2, ge=0, le=1)


class AttackConfig(Config):
    """The inner maximisation. method 'none' turns BYORL into plain BYOL."""

    method: AttackMethod = Field("apgd", description="apgd (paper), pgd, or none (= BYOL).")
    norm: Norm = "linf"
    eps: float = Field(8 / 255, ge=0, allow_inf_nan=False,
                       description="Budget, e.g. 8/255 or 128/255")
    steps: int = Field(40, ge=0, description="Attack steps K")
    step_size: float | None = Field(None, gt=0)  # PGD only; AutoPGD adapts its own


class OptimConfig(Config):
    epochs: float = Field(1000, gt=0)
    warmup_epochs: float = Field(10, ge=0)
    batch_size: int = Field(512, ge=1, description="Global batch size (over all processes).")
    lr: float = Field(2.0, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lars_eta: float = Field(1e-3, gt=0)
    tau_base: float = Field(0.996, ge=0, le=1, description="Initial EMA decay of the target.")


class TrainConfig(Config):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = 0
    out: str = "runs/byorl"
    device: str = "auto"  # auto = CUDA when present, else CPU
    precision: Precision = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    # How BatchNorm sees the two views: "separate" (each view through the networks on its own,
    # as the published BYOL: each view normalised with its own statistics) or "concat" (both in
    # one batch, statistics mixed: the recipe of the configs saved before this field existed).
    bn_views: BnViews = Field(
        "separate",
        description="separate (each view its own BatchNorm batch, the paper's) or concat.")
    sync_bn: bool = Field(True, description="Under torchrun: global-batch BatchNorm (default).")
    compile: Switch = Field("auto", description="torch.compile: auto (CUDA only), on, off.")

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A saved config as what it was trained with: a field it lacks (it was written before
        the field existed) takes its LEGACY value, not today's default."""
        return cls.model_validate({**LEGACY, **d})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
