"""The run configuration: defaults from the dataset, validation, and the stage cache keys."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field

from benchmark import __version__
from benchmark.data.profiles import PROFILES, VALIDATIONS
from benchmark.errors import UserError, one_line
from benchmark.methods import DEFAULT_METHOD, make_method
from benchmark.registry import BACKBONES, DATASETS, DIAGNOSTICS, LOSSES
from benchmark.train import Schedule

# Bump when a change alters what phase 1 produces for the same configuration, so that the
# stage cache stops handing out extractors trained by the older code.
# 2: balanced validation set drawn from the unused pool; the data's identity in the key.
PHASE1_CODE_VERSION = "2"
# The same for what follows a method's training-set stage (only such methods' keys change).
# 2: the stage's random draws no longer shift the random state phase 1 starts from.
TRAINING_SET_CODE_VERSION = "2"

DEVICES = ("auto", "cpu", "cuda")
HEAD_RECIPES = ("continue", "reference")
MAX_SEED = 2**32 - 1  # numpy's and imbalanced-learn's RandomState take no more

# Arguments the pipeline itself passes to a backbone or a loss: a user cannot set them there.
SUITE_BACKBONE_ARGS = {"in_channels": "the dataset's channels", "image_size": "--image-size"}
SUITE_LOSS_ARGS = {"class_counts": "the training subset", "schedule": "--epochs and --lr"}


@dataclass
class RunConfig:
    """One benchmark cell; ``None`` means "the dataset's (or method's) default"."""

    dataset: str = "digits"
    method: str = DEFAULT_METHOD
    loss: str = "ce"
    backbone: str = "resnet32"
    epochs: int | None = None
    head_epochs: int = 10
    head_recipe: str = "continue"
    batch_size: int | None = None
    lr: float = 0.1
    image_size: int | None = None
    profile: str | None = None
    ratio: float | None = None
    subset_seed: int = 0
    seed: int = 0
    validation: str = "auto"
    val_per_class: int = 20
    val_fraction: float = 0.2
    method_params: dict = field(default_factory=dict)
    loss_params: dict = field(default_factory=dict)
    backbone_params: dict = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    compile: bool = False  # torch.compile the phase-1 model (speed only, same configuration)
    experiment: str = "eos-benchmark"
    # What is logged, not what is computed: never part of a cell's identity.
    log_model: bool = True  # the final model as an MLflow PyTorch model (pyfunc on uint8 images)
    register: str | None = None  # also register that model under this name
    system_metrics: bool = True  # MLflow's CPU / memory / GPU sampling (needs psutil)
    diagnostics: list | None = None  # analyses logged into the run; None: the default ones

    def resolved(self) -> "RunConfig":
        """A copy with every default filled in and every value checked (``UserError``)."""
        check_field_types(self)
        for registry, name in ((DATASETS, self.dataset), (LOSSES, self.loss),
                               (BACKBONES, self.backbone)):
            registry.get(name)
        method = make_method(self.method, self.method_params)
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
                    "batch_size": cfg.batch_size, "image_size": cfg.image_size, "lr": cfg.lr,
                    "val_per_class": cfg.val_per_class}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"{name} must be positive, got {value}")
        if cfg.ratio < 1:
            raise UserError(f"imbalance ratio must be at least 1, got {cfg.ratio}")
        for name in ("seed", "subset_seed"):
            if not 0 <= getattr(cfg, name) <= MAX_SEED:
                raise UserError(f"{name} must lie in [0, 2**32 - 1], got {getattr(cfg, name)}")
        for name, value, choices in (("profile", cfg.profile, PROFILES),
                                     ("validation", cfg.validation, VALIDATIONS),
                                     ("head recipe", cfg.head_recipe, HEAD_RECIPES),
                                     ("device", cfg.device, DEVICES)):
            if value not in choices:
                raise UserError(f"unknown {name} '{value}'; valid: {', '.join(choices)}")
        if not 0 < cfg.val_fraction < 1:
            raise UserError(f"val_fraction must lie strictly between 0 and 1, got {cfg.val_fraction}")
        check_component_params("loss", cfg.loss, LOSSES, cfg.loss_params, SUITE_LOSS_ARGS)
        check_loss_params(cfg)
        check_component_params("backbone", cfg.backbone, BACKBONES, cfg.backbone_params,
                               SUITE_BACKBONE_ARGS)
        method.validate()
        if cfg.diagnostics is not None:
            for name in cfg.diagnostics:
                DIAGNOSTICS.get(name)
        return cfg

    @property
    def schedule(self) -> Schedule:
        return Schedule(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)

    @property
    def head_schedule(self) -> Schedule:
        """Phase 3: SGD at lr 0.1, momentum 0.9, weight decay 2e-4, batch 128 (the reference's
        values).  ``continue`` (default) starts from the phase-1 head at a constant lr;
        ``reference`` starts from a fresh head with the reference's linear warm-up over 5
        epochs (``lr * epoch / 5``).  Both keep the epoch with the best validation BAC (the
        reference picks it on the test set, which this suite never does)."""
        warmup = min(5, self.head_epochs) / self.head_epochs if self.head_recipe == "reference" \
            else 0.0
        return Schedule(epochs=self.head_epochs, lr=0.1, batch_size=128, warmup_fraction=warmup,
                        decay_fractions=(1.0, 1.0))

    def method_instance(self):
        return make_method(self.method, self.method_params)

    def data_identity(self) -> dict:
        """What identifies the data a cell reads: the dataset's own fingerprint of its files
        (so two folders with the same class names never share a cached stage) and every
        choice that shapes the images."""
        return _data_identity(self.dataset, self.data_root, self.download)

    def training_set_identity(self) -> dict:
        """Everything that determines the images phase 1 trains on (of a resolved config)."""
        identity = {
            "dataset": self.dataset, "data": self.data_identity(), "image_size": self.image_size,
            "profile": self.profile, "ratio": self.ratio, "subset_seed": self.subset_seed,
            "validation": self.validation, "val_per_class": self.val_per_class,
            "val_fraction": self.val_fraction,
            "method": self.method_instance().stage_identity("training_set"),
            "code": f"{__version__}/{PHASE1_CODE_VERSION}",
        }
        if identity["method"]:
            identity["stage_code"] = TRAINING_SET_CODE_VERSION
        return identity

    def training_set_key(self) -> str | None:
        """Key of the method's training-set stage; ``None`` when the method has none."""
        identity = self.training_set_identity()
        return stage_key(identity) if identity["method"] else None

    def phase1_identity(self) -> dict:
        """Everything that determines the phase-1 model and its embeddings (of a resolved
        config); post-hoc methods add nothing, so they share one phase 1."""
        return {
            "training_set": self.training_set_identity(), "backbone": self.backbone,
            "backbone_params": self.backbone_params, "loss": self.loss,
            "loss_params": self.loss_params,
            "method_phase1": self.method_instance().stage_identity("phase1"),
            "schedule": dataclasses.asdict(self.schedule), "seed": self.seed,
            "code": f"{__version__}/{PHASE1_CODE_VERSION}",
        }

    def phase1_key(self) -> str:
        return stage_key(self.phase1_identity())

    def as_params(self) -> dict:
        params = dataclasses.asdict(self)
        for group in ("method", "loss", "backbone"):
            params.pop(f"{group}_params")
            params.update({f"{group}.{k}": v for k, v in getattr(self, f"{group}_params").items()})
        return params


def stage_key(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_DATA_IDENTITIES: dict[tuple, dict] = {}


def _data_identity(dataset: str, root: str | None, download: bool) -> dict:
    """Once per process and data source (it may stat every file of a large tree); an identity
    that still lists files to download is not kept, so the one after the download counts."""
    key = (dataset, root, download)
    if key in _DATA_IDENTITIES:
        return _DATA_IDENTITIES[key]
    identity = DATASETS.create(dataset, root=root, download=download).identity()
    if "to_download" not in json.dumps(identity, default=str):
        _DATA_IDENTITIES[key] = identity
    return identity


def _type_ok(value, expected) -> bool:
    """``value`` fits the annotation ``expected`` (int, float, str, bool, dict, or an optional
    of one); a number never passes as text, nor a boolean as a number."""
    options = typing.get_args(expected) if typing.get_origin(expected) in (
        typing.Union, types.UnionType) else (expected,)
    for option in options:
        option = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if option is int and isinstance(value, int):
            return True
        if option is float and isinstance(value, (int, float)):
            return math.isfinite(value)
        if option in (str, dict) and isinstance(value, option):
            return True
        if option is list and isinstance(value, list):
            return all(isinstance(item, str) for item in value)
    return False


def check_field_types(cfg: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            expected = " or ".join(getattr(t, "__name__", str(t)) for t in
                                   (typing.get_args(hints[f.name]) or (hints[f.name],))
                                   if t is not type(None))
            raise UserError(f"{f.name} must be a finite {expected}, got {value!r}"
                            if expected == "float" else
                            f"{f.name} must be {expected}, got {value!r}")


def annotated_params(factory) -> dict[str, typing.Any]:
    """The annotated keyword parameters of a factory (a class: its ``__init__`` and those of its
    bases, since subclasses pass ``**kwargs`` on)."""
    functions = [c.__init__ for c in reversed(factory.__mro__) if "__init__" in vars(c)] \
        if inspect.isclass(factory) else [factory]
    hints: dict = {}
    for function in functions:
        try:
            hints.update(typing.get_type_hints(function))
        except Exception:  # noqa: BLE001  (unresolvable annotations: nothing to check)
            continue
    hints.pop("return", None)
    return hints


def check_component_params(kind: str, name: str, registry, params: dict,
                           suite_args: dict[str, str]) -> None:
    """A backbone's or loss's parameters: none the suite sets itself, none unknown, each of the
    annotated type (``gamma=abc`` is refused here, not deep inside the loss)."""
    for key in params:
        if key in suite_args:
            raise UserError(f"{kind} parameter {key} is set by the suite (from "
                            f"{suite_args[key]}); do not pass it as a {kind} parameter")
    registry.check_params(name, params)
    factory = registry.get(name)
    hints = annotated_params(getattr(factory, "func", factory))
    for key, value in params.items():
        if key in hints and not _type_ok(value, hints[key]):
            expected = getattr(hints[key], "__name__", str(hints[key]))
            raise UserError(f"{kind} '{name}' parameter {key} must be {expected}, "
                            f"got {value!r}")


def check_loss_params(cfg: RunConfig) -> None:
    """Build the loss once on stand-in counts: a misspelt or out-of-range parameter fails here,
    as one line, instead of inside a run."""
    try:
        LOSSES.create(cfg.loss, class_counts=[2, 1], schedule=cfg.schedule, **cfg.loss_params)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            # "...__init__() got an unexpected keyword argument 'gama'" -> the argument's name
            raise UserError(f"loss '{cfg.loss}' takes no parameter "
                            f"{str(err).rsplit(' ', 1)[-1]}") from None
        raise UserError(f"loss '{cfg.loss}': bad parameter value ({one_line(err)})") from None
