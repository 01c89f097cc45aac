"""Experiment grids (only the missing cells) and Optuna studies over K, step and epochs."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from benchmark import tracking
from benchmark.config import RunConfig
from benchmark.errors import DivergenceError, RunStopped, UserError
from benchmark.registry import METHODS

# Fields of RunConfig that change where a run is logged or how it is computed, not what it is.
NOT_IDENTITY = ("experiment", "device", "data_root", "download", "compile")
TAG_CELL = "cell_key"
TAG_GRID = "grid"


def read_spec(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} must hold a mapping of settings")
    return spec


def config_from(values: dict, spec_name: str) -> RunConfig:
    """A RunConfig from spec values; a key RunConfig does not have is a method parameter
    when the method takes it, and an error otherwise (checked when resolved)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    known = {k: v for k, v in values.items() if k in fields}
    extra = {k: v for k, v in values.items() if k not in fields}
    known["method_params"] = {**known.get("method_params", {}), **extra}
    try:
        return RunConfig(**known)
    except TypeError as err:
        raise UserError(f"{spec_name}: {err}") from None


def cell_key(cfg: RunConfig) -> str:
    """What identifies a finished cell: the resolved configuration without where it is logged."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:24]


# Grids ---------------------------------------------------------------------------------------
GRID_AXES = {"datasets": "dataset", "losses": "loss", "methods": "method",
             "backbones": "backbone", "ratios": "ratio", "seeds": "seed"}


@dataclass
class Grid:
    """A grid spec: the product of its axes (datasets, losses, methods, backbones, ratios,
    seeds, and any method parameter given as a list under ``method_params``), with
    ``settings`` fixed for every cell.  ``blocks`` (optional) is a list of partial specs, each
    overriding the top level, for tables whose rows differ (CelebA on ResNet-56, say).
    ``cells`` are resolved (defaults filled in, every value checked) and unique."""

    name: str
    experiment: str
    cells: list[RunConfig] = field(default_factory=list)

    @classmethod
    def from_spec(cls, path: str | Path, overrides: dict | None = None) -> "Grid":
        spec = read_spec(path)
        name = spec.get("name", Path(path).stem)
        experiment = spec.get("experiment", f"grid-{name}")
        unknown = set(spec) - {"name", "experiment", "blocks", "settings", "method_params",
                               "description", *GRID_AXES}
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; grid specs "
                            f"take {', '.join(sorted(GRID_AXES))}, method_params, settings, "
                            f"blocks, experiment, name")
        cells: list[RunConfig] = []
        for block in spec.get("blocks") or [{}]:
            merged = {**spec, **block, "settings": {**spec.get("settings", {}),
                                                    **block.get("settings", {})}}
            cells.extend(cls._cells(merged, experiment, overrides or {}, str(path)))
        # Resolving checks every cell, so a mistake in the spec shows before anything runs.
        unique = {cell_key(cfg): cfg for cfg in (c.resolved() for c in cells)}
        return cls(name=name, experiment=experiment, cells=list(unique.values()))

    @staticmethod
    def _cells(spec: dict, experiment: str, overrides: dict, where: str) -> Iterator[RunConfig]:
        axes = {field_name: _as_list(spec.get(plural, [None])) for plural, field_name
                in GRID_AXES.items()}
        param_axes = {k: _as_list(v) for k, v in (spec.get("method_params") or {}).items()}
        names = list(axes) + list(param_axes)
        for combo in itertools.product(*axes.values(), *param_axes.values()):
            values = {k: v for k, v in zip(names, combo) if v is not None and v != "default"}
            params = {k: values.pop(k) for k in list(values) if k in param_axes}
            values.update(spec.get("settings") or {})
            values.update(overrides)
            values["experiment"] = experiment
            cfg = config_from(values, where)
            # A parameter axis applies to the methods that take it (K means nothing to `none`).
            accepted = METHODS.create(cfg.method).accepted_params() if cfg.method in METHODS \
                else set()
            cfg.method_params.update({k: v for k, v in params.items() if k in accepted})
            yield cfg


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def finished_cell_keys(experiment: str) -> set[str]:
    return {run.data.tags.get(TAG_CELL) for run in tracking.find_runs(experiment)} - {None}


def order_for_sharing(cells: list[RunConfig]) -> list[RunConfig]:
    """Cells that share a phase 1 run back to back, so it is trained once and then reused
    from memory."""
    return sorted(cells, key=RunConfig.phase1_key)


def run_grid(path: str | Path, overrides: dict | None = None, progress: bool = True) -> dict:
    """Run every cell of the grid that has no finished run yet; returns counts."""
    from tqdm.auto import tqdm

    from benchmark.pipeline import run_cell

    grid = Grid.from_spec(path, overrides)
    done = finished_cell_keys(grid.experiment)
    todo = order_for_sharing([cfg for cfg in grid.cells if cell_key(cfg) not in done])
    counts = {"cells": len(grid.cells), "already_finished": len(grid.cells) - len(todo),
              "ran": 0, "failed": 0, "phase1_trained": 0}
    bar = tqdm(todo, desc=f"grid {grid.name}", unit="cell", disable=not progress or not todo,
               dynamic_ncols=True)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.dataset}/{cfg.loss}/{cfg.method}/s{cfg.seed}")
        try:
            result = run_cell(cfg, progress=False, tags={TAG_CELL: cell_key(cfg),
                                                         TAG_GRID: grid.name})
        except DivergenceError as err:
            counts["failed"] += 1
            tqdm.write(f"cell failed ({cfg.method}, {cfg.loss}, seed {cfg.seed}): {err}",
                       file=sys.stderr)
            continue
        counts["ran"] += 1
        counts["phase1_trained"] += not result["phase1_reused"]
        m = result["metrics"]
        tqdm.write(f"{cfg.dataset} {cfg.loss} {cfg.method} seed {cfg.seed}: "
                   f"BAC {m['test_bac']:.4f} GM {m['test_gm_macro']:.4f} "
                   f"F1 {m['test_f1_macro']:.4f} (run {result['run_id']})")
    counts["experiment"] = grid.experiment
    return counts


# Optuna studies ------------------------------------------------------------------------------
DEFAULT_JOURNAL = "optuna-studies.log"
TAG_STUDY = "optuna_study"
TAG_TRIAL = "optuna_trial"
TAG_ROLE = "study_role"  # "study" (the parent), "trial", "final" (the test evaluation)
TAG_TRIAL_STATE = "trial_state"


@dataclass
class StudySpec:
    """A tuning spec: the fixed cell, the search space, trials, sampler, pruner, storage."""

    name: str
    experiment: str
    trials: int
    cell: dict
    space: dict
    sampler: dict
    pruner: dict
    storage: str | None

    @classmethod
    def from_file(cls, path: str | Path) -> "StudySpec":
        spec = read_spec(path)
        missing = [k for k in ("study", "cell", "search_space", "sampler") if k not in spec]
        if missing:
            raise UserError(f"{path}: missing {', '.join(missing)} (a study spec names its "
                            "study, cell, search_space and a seeded sampler)")
        sampler = dict(spec["sampler"])
        if "seed" not in sampler:
            raise UserError(f"{path}: the sampler needs a seed (Optuna's defaults change "
                            "between versions, so the spec names and seeds its sampler)")
        trials = spec.get("trials", 12)
        if not isinstance(trials, int) or trials < 1:
            raise UserError(f"{path}: trials must be a positive integer, got {trials}")
        for name, dist in spec["search_space"].items():
            if not isinstance(dist, dict) or dist.get("type") not in ("int", "float",
                                                                      "categorical"):
                raise UserError(f"{path}: search_space.{name} needs type int, float or "
                                "categorical")
        return cls(name=spec["study"], experiment=spec.get("experiment", "eos-tuning"),
                   trials=trials, cell=dict(spec["cell"]), space=dict(spec["search_space"]),
                   sampler=sampler, pruner=dict(spec.get("pruner") or {"name": "MedianPruner"}),
                   storage=spec.get("storage"))

    def config(self, params: dict) -> RunConfig:
        return config_from({**self.cell, **params, "experiment": self.experiment}, self.name)


def make_storage(url: str | None):
    """Optuna storage: a journal file several processes on one machine can share (default),
    or any storage URL (``postgresql://...`` for several machines, ``sqlite:///...``)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or "://" not in url:
        return JournalStorage(JournalFileBackend(url or DEFAULT_JOURNAL))
    return optuna.storages.RDBStorage(url)


def _component(module, spec: dict, kind: str):
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name or not hasattr(module, name):
        raise UserError(f"unknown Optuna {kind} '{name}'")
    try:
        return getattr(module, name)(**spec)
    except TypeError as err:
        raise UserError(f"bad {kind} settings for {name}: {err}") from None


def suggest(trial, space: dict) -> dict:
    params = {}
    for name, dist in space.items():
        if dist["type"] == "int":
            params[name] = trial.suggest_int(name, dist["low"], dist["high"],
                                             log=dist.get("log", False))
        elif dist["type"] == "float":
            params[name] = trial.suggest_float(name, dist["low"], dist["high"],
                                               log=dist.get("log", False))
        else:
            params[name] = trial.suggest_categorical(name, dist["choices"])
    return params


class _Pruned(RunStopped):
    """Raised inside a trial's run when Optuna's pruner stops it."""


def run_study(path: str | Path, storage: str | None = None, trials: int | None = None,
              progress: bool = True) -> dict:
    """Run (or continue) a study until it holds ``trials`` completed trials, every trial a
    nested MLflow run under one parent per study; then evaluate the best configuration on test
    once.  The objective is validation BAC; test is never seen by the search."""
    import optuna

    from benchmark.pipeline import run_cell

    spec = StudySpec.from_file(path)
    target = trials or spec.trials
    sampler = _component(optuna.samplers, spec.sampler, "sampler")
    pruner = _component(optuna.pruners, spec.pruner, "pruner")
    spec.config({}).resolved()  # a bad cell fails before anything is created
    for name, dist in spec.space.items():
        probe = dist["low"] if dist["type"] != "categorical" else dist["choices"][0]
        spec.config({name: probe}).resolved()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=make_storage(storage or spec.storage),
                                sampler=sampler, pruner=pruner, direction="maximize",
                                load_if_exists=True)

    def completed() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    def objective(trial) -> float:
        params = suggest(trial, spec.space)

        def report(epoch: int, val_bac: float) -> None:
            trial.report(val_bac, epoch)
            if trial.should_prune():
                tracking.tag_active_run({TAG_TRIAL_STATE: "PRUNED"})
                raise _Pruned(f"pruned by {type(pruner).__name__} at epoch {epoch}")

        tags = {TAG_STUDY: spec.name, TAG_TRIAL: str(trial.number), TAG_ROLE: "trial"}
        try:
            result = run_cell(spec.config(params), progress=False, evaluate_test=False,
                              on_head_epoch=report, tags=tags, run_name=f"trial-{trial.number}")
        except _Pruned:
            raise optuna.TrialPruned() from None
        tracking.set_run_tags(result["run_id"], {TAG_TRIAL_STATE: "COMPLETE"})
        return result["metrics"]["val_bac"]

    parents = tracking.find_runs(spec.experiment, f"tags.{TAG_STUDY} = '{spec.name}' and "
                                 f"tags.{TAG_ROLE} = 'study'",
                                 statuses=("FINISHED", "FAILED", "KILLED", "RUNNING"))
    with tracking.TrackedRun(spec.experiment, f"study-{spec.name}",
                             {TAG_STUDY: spec.name, TAG_ROLE: "study"},
                             resume_run_id=parents[0].info.run_id if parents else None) as parent:
        parent.log_params({"study": spec.name, "trials": target, "cell": spec.cell,
                           "search_space": spec.space, "sampler": spec.sampler,
                           "pruner": spec.pruner, "storage": storage or spec.storage or
                           DEFAULT_JOURNAL, "objective": "validation BAC (maximize)"})
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=min(completed(), target), desc=f"study {spec.name}",
                       unit="trial", dynamic_ncols=True)

        def after_trial(study_, trial_) -> None:
            if bar is not None:
                bar.n = min(completed(), target)
                bar.set_postfix(best=f"{study_.best_value:.4f}" if completed() else "-")
                bar.refresh()
            if completed() >= target:
                study_.stop()

        if completed() < target:
            # Pruned and failed trials do not count: go on until `target` have completed, with
            # a bound so a study whose every trial is pruned still ends.
            study.optimize(objective, n_trials=3 * (target - completed()) + 10,
                           callbacks=[after_trial], catch=(DivergenceError,))
        if bar is not None:
            bar.close()
        best = study.best_trial
        states = [t.state for t in study.get_trials(deepcopy=False)]
        parent.log_metrics({"best_val_bac": best.value, "completed_trials": completed(),
                            "pruned_trials": states.count(optuna.trial.TrialState.PRUNED),
                            "failed_trials": states.count(optuna.trial.TrialState.FAIL)})
        parent.set_tags({f"best.{k}": str(v) for k, v in best.params.items()}
                        | {"best.trial": str(best.number)})
        finals = tracking.find_runs(spec.experiment, f"tags.{TAG_STUDY} = '{spec.name}' and "
                                    f"tags.{TAG_ROLE} = 'final' and "
                                    f"tags.`best.trial` = '{best.number}'")
        if finals:
            final_run, final_metrics = finals[0].info.run_id, finals[0].data.metrics
        else:
            result = run_cell(spec.config(best.params), progress=False,
                              tags={TAG_STUDY: spec.name, TAG_ROLE: "final",
                                    "best.trial": str(best.number)},
                              run_name=f"best-trial-{best.number}-on-test")
            final_run, final_metrics = result["run_id"], result["metrics"]
        parent.log_metrics({f"final_{k}": v for k, v in final_metrics.items()
                            if k.startswith("test_") and "class" not in k})
    return {"study": spec.name, "experiment": spec.experiment, "completed": completed(),
            "trials": len(study.trials), "best_params": best.params, "best_val_bac": best.value,
            "final_run_id": final_run, "final_metrics": final_metrics, "parent_run_id": parent.run_id}
