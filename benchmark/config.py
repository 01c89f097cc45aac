"""The run configuration: defaults from the dataset, validation, and the phase-1 cache key."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from benchmark import __version__
from benchmark.data.profiles import PROFILES
from benchmark.errors import UserError
from benchmark.registry import BACKBONES, DATASETS, LOSSES, METHODS
from benchmark.train import Schedule

# Bump when a change alters what phase 1 produces for the same configuration, so that the
# stage cache stops handing out extractors trained by the older code.
PHASE1_CODE_VERSION = "1"

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    """One benchmark cell; ``None`` means "the dataset's (or method's) default"."""

    dataset: str = "digits"
    method: str = "eos"
    loss: str = "ce"
    backbone: str = "resnet32"
    epochs: int | None = None
    head_epochs: int = 10
    batch_size: int | None = None
    lr: float = 0.1
    image_size: int | None = None
    profile: str | None = None
    ratio: float | None = None
    subset_seed: int = 0
    seed: int = 0
    val_fraction: float = 0.2
    method_params: dict = field(default_factory=dict)
    loss_params: dict = field(default_factory=dict)
    backbone_params: dict = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    compile: bool = False  # torch.compile the phase-1 model (speed only, same configuration)
    experiment: str = "eos-benchmark"

    def resolved(self) -> "RunConfig":
        """A copy with every default filled in and every value checked (``UserError``)."""
        for registry, name in ((DATASETS, self.dataset), (METHODS, self.method),
                               (LOSSES, self.loss), (BACKBONES, self.backbone)):
            registry.get(name)
        defaults = DATASETS.get(self.dataset).defaults
        cfg = dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else defaults.epochs,
            batch_size=self.batch_size if self.batch_size is not None else defaults.batch_size,
            image_size=self.image_size if self.image_size is not None else defaults.image_size,
            profile=self.profile if self.profile is not None else defaults.profile,
            ratio=self.ratio if self.ratio is not None else defaults.ratio,
            method_params={k: v for k, v in self.method_params.items() if v is not None},
        )
        positive = {"epochs": cfg.epochs, "head_epochs": cfg.head_epochs,
                    "batch_size": cfg.batch_size, "image_size": cfg.image_size, "lr": cfg.lr}
        positive.update({k: v for k, v in cfg.method_params.items()
                         if k in ("k_neighbors", "max_step")})
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"{name} must be positive, got {value}")
        if cfg.method_params.get("max_step", 1) > 1:
            raise UserError(f"max_step must be at most 1, got {cfg.method_params['max_step']}")
        if cfg.ratio < 1:
            raise UserError(f"imbalance ratio must be at least 1, got {cfg.ratio}")
        if cfg.profile not in PROFILES:
            raise UserError(f"unknown profile '{cfg.profile}'; valid profiles: {', '.join(PROFILES)}")
        if not 0 < cfg.val_fraction < 1:
            raise UserError(f"val_fraction must lie strictly between 0 and 1, got {cfg.val_fraction}")
        if cfg.device not in DEVICES:
            raise UserError(f"unknown device '{cfg.device}'; valid devices: {', '.join(DEVICES)}")
        check_loss_params(cfg)
        BACKBONES.check_params(cfg.backbone, cfg.backbone_params)
        accepted = METHODS.create(cfg.method).accepted_params()
        unknown = sorted(set(cfg.method_params) - accepted)
        if unknown:
            raise UserError(f"method '{cfg.method}' takes no parameter {', '.join(unknown)}"
                            f"{'; it takes ' + ', '.join(sorted(accepted)) if accepted else ''}")
        return cfg

    @property
    def schedule(self) -> Schedule:
        return Schedule(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)

    @property
    def head_schedule(self) -> Schedule:
        """Phase 3 as in the reference: SGD at a constant lr 0.1, batch 128, no warm-up."""
        return Schedule(epochs=self.head_epochs, lr=0.1, batch_size=128, warmup_fraction=0.0,
                        decay_fractions=(1.0, 1.0))

    def phase1_identity(self) -> dict:
        """Everything that determines the phase-1 model and its embeddings (of a resolved
        config); post-hoc methods add nothing, so they share one phase 1."""
        method_identity = METHODS.create(self.method, **self.method_params).phase1_identity()
        return {
            "dataset": self.dataset, "image_size": self.image_size, "profile": self.profile,
            "ratio": self.ratio, "subset_seed": self.subset_seed,
            "val_fraction": self.val_fraction, "backbone": self.backbone,
            "backbone_params": self.backbone_params, "loss": self.loss,
            "loss_params": self.loss_params, "method_phase1": method_identity,
            "schedule": dataclasses.asdict(self.schedule), "seed": self.seed,
            "code": f"{__version__}/{PHASE1_CODE_VERSION}",
        }

    def phase1_key(self) -> str:
        text = json.dumps(self.phase1_identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def as_params(self) -> dict:
        params = dataclasses.asdict(self)
        for group in ("method", "loss", "backbone"):
            params.pop(f"{group}_params")
            params.update({f"{group}.{k}": v for k, v in getattr(self, f"{group}_params").items()})
        return params


def check_loss_params(cfg: RunConfig) -> None:
    """Build the loss once on stand-in counts: a misspelt or out-of-range parameter fails here,
    as one line, instead of inside a run."""
    try:
        LOSSES.create(cfg.loss, class_counts=[2, 1], schedule=cfg.schedule, **cfg.loss_params)
    except TypeError as err:
        # "...__init__() got an unexpected keyword argument 'gama'" -> the argument's name
        name = str(err).rsplit(" ", 1)[-1] if "unexpected keyword" in str(err) else str(err)
        raise UserError(f"loss '{cfg.loss}' takes no parameter {name}") from None
