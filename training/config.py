"""Typed training configuration. Defaults are the paper's (section 4.1, appendix A); the CPU
recipe overrides them explicitly. Saved as JSON next to every run and inside every checkpoint."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from byorl.training.attacks import check_budget
from byorl.training.augment import AugmentConfig


@dataclass
class ModelConfig:
    arch: str = "preact_resnet34"
    width: int = 2
    proj_hidden: int = 4096
    proj_dim: int = 256


@dataclass
class DataConfig:
    source: str = "cifar10"
    root: str = "data"
    download: bool = False
    extra_unlabeled: list[str] = field(default_factory=list)
    image_size: int = 32


@dataclass
class AttackConfig:
    """The inner maximisation. method 'none' turns BYORL into plain BYOL."""

    method: str = "apgd"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 40
    step_size: float | None = None  # PGD only; AutoPGD adapts its own

    def __post_init__(self):
        if self.method not in ("apgd", "pgd", "none"):
            raise ValueError(f"attack method must be apgd, pgd or none, got {self.method!r}")
        check_budget(self.norm, self.eps)


@dataclass
class OptimConfig:
    epochs: float = 1000
    warmup_epochs: float = 10
    batch_size: int = 512  # global, over all processes
    lr: float = 2.0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lars_eta: float = 1e-3
    tau_base: float = 0.996


BN_VIEWS = ("separate", "concat")
SWITCH = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")
# What a saved config without these fields was trained with: one batch of both views, and
# (under torchrun) each GPU's own BatchNorm statistics.
LEGACY = {"bn_views": "concat", "sync_bn": False}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    out: str = "runs/byorl"
    device: str = "auto"  # auto = CUDA when present, else CPU
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    log_every: int = 10
    checkpoint_every: int = 50
    # How BatchNorm sees the two views: "separate" (each view through the networks on its own,
    # as the published BYOL: each view normalised with its own statistics) or "concat" (both in
    # one batch, statistics mixed: the recipe of the configs saved before this field existed).
    bn_views: str = "separate"
    sync_bn: bool = True  # under DDP: BatchNorm statistics of the global batch, not one GPU's
    compile: str = "auto"  # torch.compile the networks: auto = on CUDA only; or on / off

    def __post_init__(self):
        for name, allowed in (("bn_views", BN_VIEWS), ("compile", SWITCH),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A saved config as what it was trained with: a field it lacks (it was written before
        the field existed) takes its LEGACY value, not today's default."""
        d = {**LEGACY, **d}
        a = dict(d.get("augment", {}))
        for k in ("crop_scale", "crop_ratio"):
            if k in a:
                a[k] = tuple(a[k])
        return cls(
            model=ModelConfig(**d.get("model", {})),
            data=DataConfig(**d.get("data", {})),
            augment=AugmentConfig(**a),
            attack=AttackConfig(**d.get("attack", {})),
            optim=OptimConfig(**d.get("optim", {})),
            **{
                k: v
                for k, v in d.items()
                if k not in ("model", "data", "augment", "attack", "optim")
            },
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
