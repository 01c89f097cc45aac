"""Experiment grids (only the missing cells) and Optuna studies over K, step and epochs."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from benchmark import schema, tracking
from benchmark.config import RunConfig
from benchmark.errors import DivergenceError, RunStopped, UserError, one_line
from benchmark.locks import DatabaseLock, FileLock
from benchmark.registry import METHODS

# Fields of RunConfig that change where a run is logged or how it is computed, not what it is.
NOT_IDENTITY = ("experiment", "device", "data_root", "download", "compile", "log_model",
                "register", "system_metrics", "diagnostics")
TAG_CELL = "cell_key"
TAG_GRID = "grid"
# What a spec may hold where one value or a list of them is expected (YAML's plain values).
SCALARS = (str, int, float, bool, type(None))


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


def config_from(values: dict, where: str) -> RunConfig:
    """A RunConfig from spec values; a key RunConfig does not have is a method parameter
    when the method takes it, and an error otherwise (checked when resolved)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    known = {k: v for k, v in values.items() if k in fields}
    extra = {k: v for k, v in values.items() if k not in fields}
    given = known.get("method_params") or {}
    if not isinstance(given, dict):
        raise UserError(f"{where}: method_params must be a mapping (name: value), got "
                        f"{describe(given)}")
    known["method_params"] = {**given, **extra}
    try:
        return RunConfig(**known)
    except TypeError as err:
        raise UserError(f"{where}: {err}") from None


def resolved_in(cfg: RunConfig, where: str) -> RunConfig:
    """``cfg.resolved()``, its mistakes (a wrong type, name or number) told as one line that
    names the spec file."""
    try:
        return cfg.resolved()
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def describe(value: Any) -> str:
    """A value as an error message names it: its YAML kind, or itself when plain."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def check_values(value: Any, where: str) -> None:
    """One plain value, or a non-empty list of them (an axis of a grid)."""
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where} is an empty list; give at least one value")
        for item in value:
            if not isinstance(item, SCALARS):
                raise UserError(f"{where} must list plain values, got {describe(item)} in it")
    elif not isinstance(value, SCALARS):
        raise UserError(f"{where} must be a value or a list of values, got {describe(value)}")


def check_mapping(value: Any, where: str, what: str = "a mapping (name: value)") -> None:
    if value is not None and not isinstance(value, dict):
        raise UserError(f"{where} must be {what}, got {describe(value)}")


def cell_key(cfg: RunConfig) -> str:
    """What identifies a finished cell: the resolved configuration without where it is logged."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:24]


# Grids ---------------------------------------------------------------------------------------
GRID_AXES = {"datasets": "dataset", "losses": "loss", "methods": "method",
             "backbones": "backbone", "ratios": "ratio", "seeds": "seed"}
# What a block (a partial spec) may set; the top level also names the grid and its experiment.
# `reference` and `groups` shape the grid's report (see benchmark.report).
BLOCK_KEYS = ("settings", "method_params", "description", *GRID_AXES)
GRID_KEYS = ("name", "experiment", "blocks", "reference", "groups", "analysis", *BLOCK_KEYS)


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
    description: str = ""  # the spec's, for the experiment's description

    @classmethod
    def from_spec(cls, path: str | Path, overrides: dict | None = None) -> "Grid":
        spec = read_spec(path)
        check_grid_spec(spec, str(path))
        name = spec.get("name", Path(path).stem)
        experiment = spec.get("experiment", f"grid-{name}")
        cells: list[RunConfig] = []
        for block in spec.get("blocks") or [{}]:
            merged = {**spec, **block, "settings": {**(spec.get("settings") or {}),
                                                    **(block.get("settings") or {})}}
            cells.extend(cls._cells(merged, experiment, overrides or {}, str(path)))
        # Resolving checks every cell, so a mistake in the spec shows before anything runs.
        unique = {cell_key(cfg): cfg for cfg in (resolved_in(c, str(path)) for c in cells)}
        return cls(name=name, experiment=experiment, cells=list(unique.values()),
                   description=str(spec.get("description") or ""))

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
            # A method that is no name is refused when the cell is resolved.
            accepted = METHODS.create(cfg.method).accepted_params() \
                if isinstance(cfg.method, str) and cfg.method in METHODS else set()
            cfg.method_params.update({k: v for k, v in params.items() if k in accepted})
            yield cfg


def check_grid_spec(spec: dict, where: str) -> None:
    """The shape of a grid spec (``UserError`` naming the file and the key): every axis one
    value or a list of them, ``settings`` and ``method_params`` mappings, ``blocks`` a list of
    mappings.  The values themselves are checked when the cells are resolved."""
    _check_keys(spec, GRID_KEYS, where, "grid specs")
    for key in ("name", "experiment"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            raise UserError(f"{where}: {key} must be a non-empty text, got {describe(spec[key])}")
    blocks = spec.get("blocks")
    if blocks is not None and not (isinstance(blocks, list) and blocks):
        raise UserError(f"{where}: blocks must be a non-empty list of mappings (partial specs), "
                        f"got {describe(blocks)}")
    _check_grid_part(spec, where, "")
    for number, block in enumerate(blocks or []):
        prefix = f"blocks[{number}]"
        check_mapping(block, f"{where}: {prefix}", "a mapping (a partial spec)")
        _check_keys(block, BLOCK_KEYS, f"{where}: {prefix}", "a block")
        _check_grid_part(block, where, f"{prefix}.")


def _check_keys(spec: dict, allowed: tuple[str, ...], where: str, what: str) -> None:
    unknown = sorted(set(map(str, spec)) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; {what} take "
                        f"{', '.join(sorted(allowed))}")


def _check_grid_part(part: dict, where: str, prefix: str) -> None:
    for plural in GRID_AXES:
        if plural in part:
            check_values(part[plural], f"{where}: {prefix}{plural}")
    for key in ("settings", "method_params"):
        check_mapping(part.get(key), f"{where}: {prefix}{key}")
    for name, values in (part.get("method_params") or {}).items():
        check_values(values, f"{where}: {prefix}method_params.{name}")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def finished_cells(experiment: str) -> dict[str, Any]:
    """The newest finished run of every cell (by its ``cell_key`` tag) in ``experiment``."""
    cells: dict[str, Any] = {}
    for run in tracking.find_runs(experiment):  # newest first
        key = run.data.tags.get(TAG_CELL)
        if key:
            cells.setdefault(key, run)
    return cells


def order_for_sharing(cells: list[RunConfig]) -> list[RunConfig]:
    """Cells that share a phase 1 run back to back, so it is trained once and then reused
    from memory."""
    return sorted(cells, key=RunConfig.phase1_key)


def cell_label(cfg: RunConfig) -> str:
    """A resolved cell's readable identity without its seed: its ``cell`` tag."""
    from benchmark.pipeline import cell_tag  # PyTorch, only once a grid or study runs

    return cell_tag(cfg)


def failure_reason(err: BaseException) -> str:
    """One line: the error's type and message, and where it was raised when it is no
    failure the suite expects (a bug shows its place without a traceback on every cell)."""
    reason = f"{type(err).__name__}: {one_line(err)}"
    if not isinstance(err, (UserError, DivergenceError)):
        frames = traceback.extract_tb(err.__traceback__)
        if frames:
            reason += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return reason


# A grid's parent run: named after the grid, it holds the spec, the progress and the summary,
# and the cells are nested under it.
TAG_GRID_ROLE = "grid_role"  # "parent" or "cell"
TAG_GRID_SPEC = "grid_spec"  # the spec file's path as given to the command
SPEC_ARTIFACT = "spec.yaml"  # the spec file, verbatim
CELLS_ARTIFACT = "cells.csv"  # every resolved cell: label, seed, cell_key, settings
SUMMARY_TABLE = "grid_summary.json"  # one row per cell (MLflow's table view)
SUMMARY_CSV = "grid_summary.csv"  # the same rows as CSV
CELLS_DONE, CELLS_FAILED, CELLS_TOTAL = "grid/cells_done", "grid/cells_failed", "grid/cells_total"
HEADLINE = tuple(schema.test(score) for score in ("bac", "gm", "gm_macro", "f1_macro"))
RUN_STATES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


class CellsFailed(Exception):
    """Ends a grid's parent run FAILED when some of its cells failed (the grid itself went on
    to the end: the command reports the cells, not this)."""


@dataclass
class CellOutcome:
    """One row of a grid's summary: a cell, and what became of it."""

    cfg: RunConfig
    label: str
    status: str = "NOT RUN"  # FINISHED, FAILED, or NOT RUN (the grid was stopped first)
    when: str = ""  # "earlier" (a finished run found) or "now"
    run_id: str = ""
    metrics: dict = field(default_factory=dict)
    reason: str = ""

    def row(self) -> dict:
        return {"cell": self.label, "seed": self.cfg.seed, "status": self.status,
                "when": self.when, "run_id": self.run_id,
                **{name: self.metrics.get(name) for name in HEADLINE},
                "failure_reason": self.reason, "cell_key": cell_key(self.cfg)}


def run_grid(path: str | Path, overrides: dict | None = None, progress: bool = True,
             jobs: int | None = None, address: str | None = None,
             cpus_per_cell: float | None = None, gpus_per_cell: float | None = None) -> dict:
    """Run every cell of the grid that has no finished run yet, nested under the grid's parent
    run; returns counts, the parent's id and experiment, and under ``failures`` a
    ``(cell, reason)`` pair per failed cell.

    The cells run in this process one after another, or, with ``jobs`` (above 1) or
    ``address``, as tasks of a Ray cluster (see ``benchmark.engine``), each holding
    ``cpus_per_cell`` threads and ``gpus_per_cell`` of a GPU.  However many ``grid``
    commands share the tracking store, on however many machines, each cell runs exactly once
    and each phase 1 (and generator) is trained once: a driver claims a cell, and the stages
    it will train, in the store's ledger (``benchmark.ledger``) before its task starts, and a
    claim of a driver that ended or died is void (see ``_run_cells``).

    The parent run is named after the grid and tagged ``grid_role=parent``, ``grid=<name>``;
    a rerun finds it by those tags and resumes it (no second parent), and so counts and lists
    the cells finished earlier too.  It carries the spec (``spec.yaml``), the resolved cells
    (``cells.csv``), the progress (``grid/cells_done``, ``grid/cells_failed``,
    ``grid/cells_total``, step = cells processed) and at the end a summary table
    (``grid_summary.json`` and ``.csv``); it ends FINISHED when every cell has a finished run,
    FAILED when some failed (their number in ``failure_reason``), KILLED on an interrupt.
    Under ``mlflow run`` the project's run is already active: the grid's parent nests under
    it, in its experiment, where the next ``mlflow run`` of the grid finds it again.

    A mistake in the spec stops everything before any run exists (``UserError``), and so does
    one met by the first cell (missing data, say: likely every cell's); a parent run made for
    that grid is then deleted again.  After that a cell that fails, for whatever reason, is
    recorded (its run, if it got one, ends FAILED with the reason) and the grid goes on with
    the others.  An interrupt stops the grid."""
    from benchmark import engine as engines
    from benchmark.ledger import Ledger

    grid = Grid.from_spec(path, overrides)
    resources = engines.default_resources(jobs, address, cpus_per_cell, gpus_per_cell)
    experiment = tracking.logging_experiment(grid.experiment)
    finished = finished_cells(experiment)
    outcomes = {cell_key(cfg): CellOutcome(cfg, cell_label(cfg)) for cfg in grid.cells}
    for key, run in finished.items():
        if key in outcomes:
            outcomes[key] = _finished_outcome(outcomes[key], run, "earlier")
    todo = order_for_sharing([cfg for cfg in grid.cells if cell_key(cfg) not in finished])
    counts = {"cells": len(grid.cells), "already_finished": len(grid.cells) - len(todo),
              "ran": 0, "failed": 0, "phase1_trained": 0, "failures": [],
              "elsewhere": 0, "experiment": experiment, "parent_run_id": None}
    stopped_at_first_cell = False
    # The engine first: a cluster that cannot be reached, or lacks the GPUs asked for, is told
    # before any run exists.
    engine = engines.make_engine(jobs, address, resources,
                                 {"MLFLOW_TRACKING_URI": _absolute_uri()}) if todo else None
    ledger = None
    try:
        ledger = Ledger.open()
        ledger.register()
        parents = _grid_parent(ledger, grid, experiment)
        with tracking.TrackedRun(grid.experiment, grid.name,
                                 {TAG_GRID_ROLE: "parent", TAG_GRID: grid.name,
                                  TAG_GRID_SPEC: str(path)},
                                 resume_run_id=parents[0].info.run_id if parents else None,
                                 experiment_description=grid_description(grid, path)) as parent:
            counts.update(parent_run_id=parent.run_id, experiment=parent.experiment)
            parent.log_text(Path(path).read_text(), SPEC_ARTIFACT)
            parent.log_text(_csv([{"cell": o.label, "seed": o.cfg.seed,
                                   "cell_key": cell_key(o.cfg), **_settings(o.cfg)}
                                  for o in outcomes.values()]), CELLS_ARTIFACT)
            log_grid_progress(parent, counts)
            try:
                _run_cells(grid, todo, outcomes, counts, parent, progress, engine, resources,
                           ledger)
            except UserError:
                stopped_at_first_cell = not counts["ran"] and not counts["failed"]
                with contextlib.suppress(Exception):  # the mistake matters more
                    log_grid_summary(parent, grid, path, outcomes, counts)
                raise
            except BaseException:
                with contextlib.suppress(Exception):  # the interrupt matters more
                    log_grid_summary(parent, grid, path, outcomes, counts)
                raise
            log_grid_summary(parent, grid, path, outcomes, counts)
            if counts["failed"]:
                raise CellsFailed(f"{counts['failed']} of {counts['cells']} cells failed (see "
                                  f"{SUMMARY_TABLE})")
    except CellsFailed:
        pass
    except UserError:
        if stopped_at_first_cell and not parents and counts["parent_run_id"]:
            tracking.delete_run(counts["parent_run_id"])
        raise
    finally:
        if engine is not None:
            engine.close()
        if ledger is not None:
            with contextlib.suppress(Exception):  # ending matters more than saying so
                ledger.close()
    return counts


def _absolute_uri() -> str:
    """The tracking URI as another process started elsewhere reads it (a SQLite file's path
    made absolute)."""
    from benchmark.store import sqlite_path

    uri = tracking.tracking_uri()
    database = sqlite_path(uri)
    return f"sqlite:///{database.absolute()}" if database is not None else uri


def _claim_name(kind: str, *parts: str) -> str:
    """A ledger claim's name: ``kind`` and a digest of what it is about."""
    return f"{kind}.{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:24]}"


def _grid_parent(ledger, grid: Grid, experiment: str) -> list:
    """The grid's parent run(s) found in the store, after making sure that of several drivers
    starting the same grid at once only one creates it: the one holding the ledger's claim
    (the others wait here until it exists)."""
    query = f"tags.{TAG_GRID_ROLE} = 'parent' and tags.{TAG_GRID} = '{grid.name}'"
    name = _claim_name("grid-parent", experiment, grid.name)
    deadline = time.monotonic() + 120
    while True:
        parents = tracking.find_runs(experiment, query, RUN_STATES)
        if parents:
            return parents
        ledger.refresh()
        if ledger.claim(name):
            return []
        if time.monotonic() > deadline:
            raise UserError(f"grid '{grid.name}': another driver claimed its parent run two "
                            f"minutes ago and has not made it")
        time.sleep(0.5)


def _finished_outcome(outcome: "CellOutcome", run, when: str) -> "CellOutcome":
    return dataclasses.replace(outcome, label=run.data.tags.get(schema.TAG_CELL, outcome.label),
                               status="FINISHED", when=when, run_id=run.info.run_id,
                               metrics=dict(run.data.metrics))


# How often a driver looks again at cells it waits for (held by another driver, or needing a
# stage that another of its tasks is training).
POLL_S = 2.0


class _StageCache:
    """Which cached stages the store holds: a stage found stays found; one missing is looked
    for once per ``look_again`` (once per round of the driver, however many cells share it)."""

    def __init__(self):
        self._found: set[tuple[str, str]] = set()
        self._missing: set[tuple[str, str]] = set()

    def look_again(self) -> None:
        self._missing.clear()

    def has(self, stage: str, key: str) -> bool:
        if (stage, key) in self._found:
            return True
        if (stage, key) not in self._missing:
            if tracking.find_stage_run(stage, key):
                self._found.add((stage, key))
                return True
            self._missing.add((stage, key))
        return False


def _stages_to_train(cfg: RunConfig, cache: _StageCache) -> list[tuple[str, str]]:
    """The cached stages ``cfg``'s cell would compute now (none when its phase 1 is there):
    its phase 1, its training set, and the phase 1s of other cells its method uses."""
    if cache.has("phase1", cfg.phase1_key()):
        return []
    needs = [("phase1", cfg.phase1_key())]
    training_key = cfg.training_set_key()
    if training_key and not cache.has("training_set", training_key):
        needs.append(("training_set", training_key))
    for other in cfg.method_instance().phase1s_used(cfg):
        key = other.resolved().phase1_key()
        if not cache.has("phase1", key):
            needs.append(("phase1", key))
    return needs


def _run_cells(grid: Grid, todo: list[RunConfig], outcomes: dict[str, CellOutcome],
               counts: dict, parent: tracking.TrackedRun, progress: bool, engine, resources,
               ledger) -> None:
    """The grid's missing cells on ``engine``, nested under ``parent``; a ``UserError`` of the
    first one is raised, any other failure recorded.

    A cell starts once this driver holds, in the ledger, the cell and every stage the cell
    would train (its phase 1, its generator), and no task of this driver is training one of
    those stages already (the cells sharing a phase 1 wait for the first, then reuse it).  A
    cell or stage held by another live driver waits; a cell it finished counts as finished
    (``when="elsewhere"``), one it failed in this pass as failed (it is not tried twice).  A
    claim taken over from a driver that died waits until the runs that driver's tasks left
    alive are over, so a cell is never finished twice."""
    from tqdm.auto import tqdm

    from benchmark.engine import InProcess, run_cell_task

    # In this process, its own threads; in a task, the CPUs it holds.
    threads = None if isinstance(engine, InProcess) else max(1, int(resources.cpus))
    driver = None if isinstance(engine, InProcess) else tracking.process_tags()
    started_ms = int(time.time() * 1000)
    experiment = parent.experiment
    cache = _StageCache()
    pending = list(todo)
    in_flight: dict[Any, tuple[RunConfig, list[tuple[str, str]], int]] = {}
    training: set[tuple[str, str]] = set()
    bar = tqdm(total=counts["cells"], initial=counts["already_finished"],
               desc=f"grid {grid.name}", unit="cell", disable=not progress or not todo,
               dynamic_ncols=True)
    say = tqdm.write if progress else print
    tags_of = {TAG_GRID: grid.name, TAG_GRID_ROLE: "cell", "mlflow.parentRunId": parent.run_id}
    if progress and todo:
        tqdm.write(f"grid {grid.name}: {len(todo)} of {counts['cells']} cells to run, on "
                   f"{engine.name}" + (f", up to {engine.slots} at once" if engine.slots > 1
                                       else ""))

    def count_done(outcome: CellOutcome) -> None:
        bar.update(1)
        log_grid_progress(parent, counts)

    while pending or in_flight:
        if pending and len(in_flight) < engine.slots:
            ledger.refresh()
            cache.look_again()
            finished = finished_cells(experiment)
            failed_now = _failed_since(experiment, grid.name, started_ms)
            running = _running_cells(experiment, grid.name)
            for cfg in list(pending):
                if len(in_flight) >= engine.slots:
                    break
                key = cell_key(cfg)
                outcome = outcomes[key]
                if key in finished:  # by another driver, or by a task of a dead one
                    pending.remove(cfg)
                    outcomes[key] = _finished_outcome(outcome, finished[key], "elsewhere")
                    counts["elsewhere"] += 1
                    counts["already_finished"] += 1
                    say(f"{outcome.label} seed {cfg.seed}: finished by another driver "
                        f"(run {finished[key].info.run_id})")
                    count_done(outcomes[key])
                    continue
                cell_claim = _claim_name("cell", experiment, key)
                holder = ledger.holder(cell_claim)
                if holder not in (None, ledger.token) and ledger.alive(holder):
                    if key in failed_now:  # the other driver tried it in this pass
                        pending.remove(cfg)
                        run = failed_now[key]
                        outcome.status, outcome.when, outcome.run_id = "FAILED", "elsewhere", \
                            run.info.run_id
                        outcome.reason = run.data.tags.get(tracking.TAG_FAILURE, "")
                        counts["failed"] += 1
                        counts["failures"].append((f"{outcome.label} seed {cfg.seed}",
                                                   outcome.reason))
                        count_done(outcome)
                    continue
                # The cell first, then its stages: a driver never holds a stage while it
                # waits for a cell another driver holds (no two drivers wait on each other).
                if not ledger.claim(cell_claim):
                    continue
                if running.get(key):  # left by a dead driver's task that is still alive
                    continue
                needs = _stages_to_train(cfg, cache)
                if any(need in training for need in needs):
                    continue
                if not all(ledger.claim(_claim_name(*need)) for need in needs):
                    continue
                pending.remove(cfg)
                training.update(needs)
                task_cfg = dataclasses.replace(cfg, experiment=experiment)
                handle = engine.submit(run_cell_task, task_cfg, {**tags_of, TAG_CELL: key},
                                       threads, driver)
                in_flight[handle] = (cfg, needs, int(time.time() * 1000))
                bar.set_postfix_str(f"{len(in_flight)} running")
        done = engine.wait(list(in_flight), timeout=POLL_S)
        if not done and not in_flight and pending:
            time.sleep(POLL_S)
        for handle, result in done:
            cfg, needs, submitted_ms = in_flight.pop(handle)
            training.difference_update(needs)
            key = cell_key(cfg)
            outcome = outcomes[key]
            worker = result["worker"]
            if not result["ok"]:
                if result["user_error"] and not counts["ran"] and not counts["failed"]:
                    raise UserError(result["message"])
                counts["failed"] += 1
                counts["failures"].append((f"{outcome.label} seed {cfg.seed}", result["reason"]))
                # The cell's run, when it got one before failing.
                runs = tracking.find_runs(experiment, f"tags.{TAG_CELL} = '{key}' and "
                                          f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                                          ("FAILED", "KILLED"))
                fresh = [r for r in runs if r.info.start_time >= submitted_ms]
                outcome.status, outcome.when, outcome.reason = "FAILED", "now", result["reason"]
                outcome.run_id = fresh[0].info.run_id if fresh else ""
                tqdm.write(f"cell failed ({outcome.label} seed {cfg.seed}, {worker}, "
                           f"{result['seconds']:.0f} s): {result['reason']}", file=sys.stderr)
            else:
                counts["ran"] += 1
                counts["phase1_trained"] += not result["phase1_reused"]
                m = result["metrics"]
                outcome.status, outcome.when = "FINISHED", "now"
                outcome.run_id, outcome.metrics = result["run_id"], dict(m)
                say(f"{outcome.label} seed {cfg.seed}: BAC {m[schema.test('bac')]:.4f} "
                    f"GM {m[schema.test('gm_macro')]:.4f} F1 {m[schema.test('f1_macro')]:.4f} "
                    f"({worker}, {result['seconds']:.0f} s, run {result['run_id']})")
            count_done(outcome)
        if done:
            bar.set_postfix_str(f"{len(in_flight)} running")
    bar.close()


def _failed_since(experiment: str, grid_name: str, since_ms: int) -> dict[str, Any]:
    """The grid's cells whose newest run, started since ``since_ms``, failed."""
    found: dict[str, Any] = {}
    for run in tracking.find_runs(experiment, f"tags.{TAG_GRID} = '{grid_name}' and "
                                              f"tags.{TAG_GRID_ROLE} = 'cell' and "
                                              f"attributes.start_time >= {since_ms}",
                                  ("FAILED", "KILLED")):
        found.setdefault(run.data.tags.get(TAG_CELL), run)
    return found


def _running_cells(experiment: str, grid_name: str) -> dict[str, list]:
    """The grid's cells with a RUNNING run whose process may be alive, by cell key."""
    found: dict[str, list] = {}
    now = time.time()
    for run in tracking.find_runs(experiment, f"tags.{TAG_GRID} = '{grid_name}' and "
                                              f"tags.{TAG_GRID_ROLE} = 'cell'", ("RUNNING",)):
        if tracking.dead_reason(run.data.tags, run.info.start_time, now) is None:
            found.setdefault(run.data.tags.get(TAG_CELL), []).append(run)
    return found


def log_grid_progress(parent: tracking.TrackedRun, counts: dict) -> None:
    """Cells done, failed and in all, at step = cells processed (finished earlier included)."""
    done = counts["already_finished"] + counts["ran"]
    parent.log_metrics({CELLS_DONE: done, CELLS_FAILED: counts["failed"],
                        CELLS_TOTAL: counts["cells"]}, step=done + counts["failed"])
    parent.flush()  # now, not with the next batch: the UI shows the grid advancing


def log_grid_summary(parent: tracking.TrackedRun, grid: Grid, path: str | Path,
                     outcomes: dict[str, CellOutcome], counts: dict) -> None:
    """The summary table (one row per cell, in the spec's order) and the parent's
    description; a rerun replaces both."""
    import pandas as pd

    rows = [outcome.row() for outcome in outcomes.values()]
    parent.log_table(pd.DataFrame(rows), SUMMARY_TABLE)
    parent.log_text(_csv(rows), SUMMARY_CSV)
    done = counts["already_finished"] + counts["ran"]
    not_run = counts["cells"] - done - counts["failed"]
    text = (f"Grid **{grid.name}** from `{path}`: {counts['cells']} cells, {done} finished "
            f"({counts['ran']} in the latest pass), {counts['failed']} failed"
            + (f", {not_run} not run" if not_run else "") +
            f". Every cell's run and test scores: `{SUMMARY_TABLE}` (also `{SUMMARY_CSV}`); "
            f"the spec: `{SPEC_ARTIFACT}`; the resolved cells: `{CELLS_ARTIFACT}`.")
    tracking.set_run_tags(parent.run_id, {tracking.NOTE: text})


def grid_description(grid: Grid, path: str | Path) -> str:
    """What an experiment holding this grid holds (its description, set when it has none)."""
    axes = [(plural, ", ".join(dict.fromkeys(str(getattr(cfg, name)) for cfg in grid.cells)))
            for plural, name in GRID_AXES.items()]
    text = (f"Grid {grid.name} from {path}: {len(grid.cells)} cells ("
            + "; ".join(f"{plural} {values}" for plural, values in axes) + "). ")
    if grid.description:
        text += f"{grid.description} "
    return text + (f"The run named {grid.name} (tag {TAG_GRID_ROLE}=parent) holds the spec, "
                   f"the progress and a summary table; the cells are nested under it (tag "
                   f"{TAG_GRID_ROLE}=cell; group by the tag `{schema.TAG_CELL}` to average "
                   f"over seeds).")


def _settings(cfg: RunConfig) -> dict:
    """A resolved cell's settings as CSV columns (mappings as JSON)."""
    return {name: json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
            for name, value in dataclasses.asdict(cfg).items() if name not in NOT_IDENTITY}


def _csv(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False)


def grid_summary(counts: dict) -> str:
    """What a grid did, for the end of the command: one line, then one per failed cell."""
    elsewhere = counts.get("elsewhere")
    lines = [f"grid: {counts['cells']} cells, {counts['already_finished']} already finished"
             + (f" ({elsewhere} of them by another driver meanwhile)" if elsewhere else "") + ", "
             f"{counts['ran']} ran ok now ({counts['phase1_trained']} phase-1 trainings), "
             f"{counts['failed']} failed; experiment '{counts['experiment']}', parent run "
             f"{counts['parent_run_id']}"]
    lines += [f"  failed: {cell}: {reason}" for cell, reason in counts.get("failures", [])]
    return "\n".join(lines)


# Optuna studies ------------------------------------------------------------------------------
DEFAULT_JOURNAL = "optuna-studies.log"
TAG_STUDY = "optuna_study"
TAG_TRIAL = "optuna_trial"
TAG_ROLE = "study_role"  # "study" (the parent), "trial", "final" (the test evaluation)
TAG_TRIAL_STATE = "trial_state"
STUDY_KEYS = ("study", "experiment", "trials", "cell", "search_space", "sampler", "pruner",
              "storage", "description")
DISTRIBUTION_KEYS = {"int": ("type", "low", "high", "log"),
                     "float": ("type", "low", "high", "log"),
                     "categorical": ("type", "choices")}
# The Optuna user attribute naming the process that runs a trial (file-locked storages).
ATTR_WORKER = "benchmark_worker"
# How often a process whose free trial slots are all taken by running trials looks again
# (one of them may yet be pruned or fail, and then it runs a replacement).
WAIT_FOR_SLOT_S = 2.0
# Server databases (several machines): Optuna's heartbeat tells a dead process's trials.
HEARTBEAT_S, GRACE_S = 60, 300


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
    source: str = ""  # the spec file, for messages

    @classmethod
    def from_file(cls, path: str | Path) -> "StudySpec":
        """The spec, its shape checked (``UserError`` naming the file and the key); the
        cell and the ends of every range are resolved as configurations by ``check``."""
        where = str(path)
        spec = read_spec(path)
        _check_keys(spec, STUDY_KEYS, where, "study specs")
        missing = [k for k in ("study", "cell", "search_space", "sampler") if k not in spec]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (a study spec names its "
                            "study, cell, search_space and a seeded sampler)")
        for key in ("study", "experiment", "storage"):
            if key in spec and not (isinstance(spec[key], str) and spec[key]):
                raise UserError(f"{where}: {key} must be a non-empty text, got "
                                f"{describe(spec[key])}")
        trials = spec.get("trials", 12)
        if not _is_int(trials) or trials < 1:
            raise UserError(f"{where}: trials must be a positive integer, got {describe(trials)}")
        check_mapping(spec["cell"], f"{where}: cell", "a mapping of the cell's settings")
        sampler, pruner = spec["sampler"], spec.get("pruner") or {"name": "MedianPruner"}
        for key, value in (("sampler", sampler), ("pruner", pruner)):
            example = "{name: TPESampler, seed: 0}" if key == "sampler" else "{name: NopPruner}"
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                raise UserError(f"{where}: {key} must be a mapping with a name, such as "
                                f"{example}, got {describe(value)}")
        if "seed" not in sampler:
            raise UserError(f"{where}: the sampler needs a seed (Optuna's defaults change "
                            "between versions, so the spec names and seeds its sampler)")
        if not _is_int(sampler["seed"]) or sampler["seed"] < 0:
            raise UserError(f"{where}: sampler.seed must be a non-negative integer, got "
                            f"{describe(sampler['seed'])}")
        space = spec["search_space"]
        if not isinstance(space, dict) or not space:
            raise UserError(f"{where}: search_space must be a mapping of parameter name to "
                            f"distribution, such as {{k_neighbors: {{type: int, low: 5, high: "
                            f"300}}}}, got {describe(space)}")
        for name, dist in space.items():
            check_distribution(dist, f"{where}: search_space.{name}")
        return cls(name=spec["study"], experiment=spec.get("experiment", "eos-tuning"),
                   trials=trials, cell=dict(spec["cell"] or {}), space=dict(space),
                   sampler=dict(sampler), pruner=dict(pruner), storage=spec.get("storage"),
                   source=where)

    def config(self, params: dict) -> RunConfig:
        return config_from({**self.cell, **params, "experiment": self.experiment},
                           self.source or self.name)

    def check(self) -> None:
        """Resolve the cell, and the cell with each parameter at each end of its range (each
        choice): a value the configuration refuses fails here, before anything is created."""
        resolved_in(self.config({}), f"{self.source}: cell")
        for name, dist in self.space.items():
            probes = dist["choices"] if dist["type"] == "categorical" else \
                (dist["low"], dist["high"])
            for value in probes:
                resolved_in(self.config({name: value}),
                            f"{self.source}: search_space.{name} = {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_distribution(dist: Any, where: str) -> None:
    """One search-space entry: ``{type: int|float, low, high, log}`` with low <= high (and
    low > 0 on a log scale), or ``{type: categorical, choices: [...]}`` with plain choices."""
    kind = dist.get("type") if isinstance(dist, dict) else None
    if kind not in DISTRIBUTION_KEYS:
        got = describe(kind) if isinstance(dist, dict) else describe(dist)
        raise UserError(f"{where} needs type int, float or categorical, such as {{type: int, "
                        f"low: 5, high: 300}}, got {got}")
    _check_keys(dist, DISTRIBUTION_KEYS[kind], where, f"{kind} distributions")
    if kind == "categorical":
        choices = dist.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: a categorical needs a non-empty list of choices, got "
                            f"{describe(choices)}")
        check_values(choices, f"{where}.choices")
        return
    fits = _is_int if kind == "int" else _is_number
    for end in ("low", "high"):
        if end not in dist:
            raise UserError(f"{where}: a range needs low and high; {end} is missing")
        if not fits(dist[end]):
            raise UserError(f"{where}.{end} must be {'an integer' if kind == 'int' else 'a number'}"
                            f", got {describe(dist[end])}")
    if dist["low"] > dist["high"]:
        raise UserError(f"{where}: low ({dist['low']}) is above high ({dist['high']})")
    if not isinstance(dist.get("log", False), bool):
        raise UserError(f"{where}.log must be true or false, got {describe(dist['log'])}")
    if dist.get("log") and dist["low"] <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got {dist['low']}")


def make_storage(url: str | None):
    """Optuna storage: a journal file several processes on one machine can share (default),
    or any storage URL (``postgresql://...`` for several machines, ``sqlite:///...``)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or "://" not in url:
        return JournalStorage(JournalFileBackend(url or DEFAULT_JOURNAL))
    if url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url)
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S)


class StudyLocks:
    """The locks that keep a study exact however many processes share it.

    - ``claims()``: held while a process counts the study's trials and creates one (so that
      COMPLETE plus RUNNING trials never exceed the target), and while the parent run is
      found or created.
    - ``phase1(key)``: held while a trial trains the phase 1 of ``key``; the others wait,
      then reuse it.
    - ``final()``: held while the best trial's test evaluation is looked for and, if missing,
      run.

    A journal file or SQLite storage (one machine) keeps its locks as files in a folder beside
    it, ``<storage file>.locks/``; a process there also holds a lock file of its own for as
    long as it runs trials, so that the trials of a killed process are told by their lock
    being free (and are failed, freeing their slots).  A PostgreSQL or MySQL storage (several
    machines) uses the server's advisory locks, and Optuna's heartbeat for killed processes.
    """

    def __init__(self, storage_url: str | None, study: str):
        from benchmark.store import sqlite_path

        url = storage_url or DEFAULT_JOURNAL
        self.study = hashlib.sha256(study.encode()).hexdigest()[:16]
        self.folder: Path | None = None
        self.engine = None
        if "://" not in url:
            self.folder = Path(url).absolute().parent / f"{Path(url).name}.locks"
        elif url.startswith("sqlite"):
            database = sqlite_path(url)
            if database is None:  # in memory: one process only, nothing to share
                database = Path(f"optuna-memory-{os.getpid()}")
            self.folder = database.parent / f"{database.name}.locks"
        else:
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self.engine = sqlalchemy.create_engine(url, poolclass=NullPool)
            if self.engine.dialect.name not in ("postgresql", "mysql", "mariadb"):
                raise UserError(f"storage {url}: studies shared by several processes need a "
                                f"journal file, SQLite, PostgreSQL or MySQL storage")
        self.worker = uuid.uuid4().hex
        self._worker_lock: FileLock | None = None

    def _lock(self, name: str):
        if self.folder is not None:
            return FileLock(self.folder / f"{name}.lock")
        return DatabaseLock(self.engine, f"benchmark-{name}")

    def claims(self):
        return self._lock(f"{self.study}-claims")

    def final(self):
        return self._lock(f"{self.study}-final")

    def phase1(self, key: str):
        return self._lock(f"phase1-{key}")  # store-wide: studies sharing a cell share it too

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """This process is alive, for as long as the block runs (file-locked storages)."""
        if self.folder is not None:
            self._worker_lock = FileLock(self.folder / f"worker-{self.worker}.lock")
            self._worker_lock.acquire()
        try:
            yield
        finally:
            if self._worker_lock is not None:
                self._worker_lock.release()
                self._worker_lock.path.unlink(missing_ok=True)
                self._worker_lock = None

    def _alive(self, worker: str | None) -> bool:
        if worker == self.worker:
            return True
        path = self.folder / f"worker-{worker}.lock"
        if not worker or not path.exists():
            return False
        probe = FileLock(path)
        if not probe.acquire(wait=False):
            return True
        probe.release()
        path.unlink(missing_ok=True)
        return False

    def fail_dead_trials(self, study) -> list[int]:
        """Mark FAIL the RUNNING trials whose process is gone (call with ``claims()`` held);
        returns their numbers."""
        import optuna

        if self.folder is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)
            return []
        dead = [t.number for t in study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if not self._alive(t.user_attrs.get(ATTR_WORKER))]
        for number in dead:
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        return dead


def _component(module, spec: dict, kind: str, where: str):
    """An Optuna sampler or pruner from its spec ``{name: ..., <its arguments>}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name or not hasattr(module, name):
        raise UserError(f"{where}: unknown Optuna {kind} '{name}'")
    try:
        return getattr(module, name)(**spec)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: bad {kind} settings for {name}: {one_line(err)}") from None


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


@contextlib.contextmanager
def phase1_trained_once(locks: StudyLocks, cfg: RunConfig) -> Iterator[None]:
    """Run the block (a trial) holding the lock of its phase 1 when no finished run holds that
    phase 1 yet: the trial that trains it goes first, and the others, waiting here, then find
    and reuse it.  Without the lock, two processes starting a study would both train it."""
    key = cfg.resolved().phase1_key()
    if tracking.find_phase1_run(key) is not None:
        yield
        return
    with locks.phase1(key):
        yield


TRIALS_TABLE = "trials.json"  # one row per trial (MLflow's table view)
TRIALS_CSV = "trials.csv"  # the same rows as CSV


def study_description(spec: StudySpec, target: int) -> str:
    """What an experiment holding this study holds (its description, set when it has none)."""
    cell = resolved_in(spec.config({}), spec.source)
    return (f"Optuna study {spec.name} from {spec.source}: {target} trials of {cell_label(cell)} "
            f"seed {cell.seed} over {', '.join(spec.space)}, maximizing validation BAC. The run "
            f"study-{spec.name} (tag {TAG_ROLE}=study) holds the spec, a table of the trials and "
            f"the best configuration; the trials (tag {TAG_ROLE}=trial) are nested under it and "
            f"never see the test set; the best configuration's test evaluation is tagged "
            f"{TAG_ROLE}=final.")


def log_trials_summary(parent: tracking.TrackedRun, spec: StudySpec, study, target: int,
                       path: str | Path, final_run: str, final_metrics: dict) -> None:
    """The table of every trial (number, state, parameters, validation BAC, run) and the
    parent's description; a later end of the study replaces both."""
    import pandas as pd

    runs = {}  # trial number -> its newest run (a trial's run exists once it started)
    for run in tracking.find_runs(parent.experiment, f"tags.{TAG_STUDY} = '{spec.name}' and "
                                                     f"tags.{TAG_ROLE} = 'trial'", RUN_STATES):
        runs.setdefault(run.data.tags.get(TAG_TRIAL), run.info.run_id)
    rows = [{"trial": t.number, "state": t.state.name,
             **{name: t.params.get(name) for name in spec.space},
             schema.VAL_BAC: t.value, "run_id": runs.get(str(t.number), "")}
            for t in study.get_trials(deepcopy=False)]
    parent.log_table(pd.DataFrame(rows), TRIALS_TABLE)
    parent.log_text(_csv(rows), TRIALS_CSV)
    best = study.best_trial
    states = [row["state"] for row in rows]
    params = ", ".join(f"{k}={v}" for k, v in best.params.items())
    test_bac = final_metrics.get(schema.test("bac"))
    text = (f"Study **{spec.name}** from `{path}`: {states.count('COMPLETE')} of {target} "
            f"trials completed ({states.count('PRUNED')} pruned, {states.count('FAIL')} "
            f"failed). Best: trial {best.number} ({params}), validation BAC "
            f"{best.value:.4f}" + (f"; on test BAC {test_bac:.4f}" if test_bac is not None
                                   else "") +
            f" ([run]({tracking.run_link(final_run)})). Every trial: `{TRIALS_TABLE}` (also "
            f"`{TRIALS_CSV}`); the spec: `{SPEC_ARTIFACT}`.")
    tracking.set_run_tags(parent.run_id, {tracking.NOTE: text})


def run_study(path: str | Path, storage: str | None = None, trials: int | None = None,
              progress: bool = True, jobs: int | None = None, address: str | None = None,
              cpus_per_trial: float | None = None, gpus_per_trial: float | None = None) -> dict:
    """Run (or continue) a study until it holds ``trials`` completed trials, every trial a
    nested MLflow run under one parent per study; then evaluate the best configuration on test
    once.  The objective is validation BAC; test is never seen by the search.

    Several processes may share a study (the same command started again, with the same
    storage): each claims a trial only while COMPLETE plus RUNNING trials stay below the
    target, under ``StudyLocks.claims()``, so the study ends with exactly ``trials`` complete
    ones; a process with no slot left waits while a running trial might still be pruned or
    fail.  Phase 1 is trained once (by the first trial, under its phase-1 lock) and the test
    evaluation happens once (under the final lock).  A process that joins a study already
    holding N trials seeds its sampler with seed + N, so that it does not draw the same random
    start-up trials again; one process on a fresh study keeps the spec's seed."""
    import optuna

    from benchmark.pipeline import run_cell

    if address or (jobs or 1) > 1:
        return _run_study_on_ray(path, storage, trials, progress, jobs, address,
                                 cpus_per_trial, gpus_per_trial)
    spec = StudySpec.from_file(path)
    target = trials or spec.trials
    sampler = _component(optuna.samplers, spec.sampler, "sampler", spec.source)
    pruner = _component(optuna.pruners, spec.pruner, "pruner", spec.source)
    spec.check()  # a bad cell or range fails before anything is created
    storage_url = storage or spec.storage
    locks = StudyLocks(storage_url, spec.name)
    experiment = tracking.logging_experiment(spec.experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with contextlib.ExitStack() as stack:
        claim = locks.claims()
        with claim:  # one study and one parent run, however many processes start at once
            study = optuna.create_study(study_name=spec.name,
                                        storage=make_storage(storage_url), sampler=sampler,
                                        pruner=pruner, direction="maximize",
                                        load_if_exists=True)
            parents = tracking.find_runs(experiment, f"tags.{TAG_STUDY} = '{spec.name}' and "
                                                     f"tags.{TAG_ROLE} = 'study'", RUN_STATES)
            parent = stack.enter_context(tracking.TrackedRun(
                spec.experiment, f"study-{spec.name}", {TAG_STUDY: spec.name, TAG_ROLE: "study"},
                resume_run_id=parents[0].info.run_id if parents else None,
                experiment_description=study_description(spec, target)))
            parent.log_text(Path(path).read_text(), SPEC_ARTIFACT)
            if not parents:
                parent.log_params({"study": spec.name, "trials": target, "cell": spec.cell,
                                   "search_space": spec.space, "sampler": spec.sampler,
                                   "pruner": spec.pruner,
                                   "storage": storage_url or DEFAULT_JOURNAL,
                                   "objective": "validation BAC (maximize)"})

        def completed() -> int:
            return len(study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.COMPLETE,)))

        def objective(trial) -> float:
            trial.set_user_attr(ATTR_WORKER, locks.worker)
            claim.release()  # the trial is RUNNING in the storage now: its slot is taken
            params = suggest(trial, spec.space)

            def report(epoch: int, val_bac: float) -> None:
                trial.report(val_bac, epoch)
                if trial.should_prune():
                    tracking.tag_active_run({TAG_TRIAL_STATE: "PRUNED"})
                    raise _Pruned(f"pruned by {type(pruner).__name__} at epoch {epoch}")

            tags = {TAG_STUDY: spec.name, TAG_TRIAL: str(trial.number), TAG_ROLE: "trial"}
            cfg = spec.config(params)
            try:
                with phase1_trained_once(locks, cfg):
                    result = run_cell(cfg, progress=False, evaluate_test=False,
                                      on_head_epoch=report, tags=tags,
                                      run_name=f"trial-{trial.number}")
            except _Pruned:
                raise optuna.TrialPruned() from None
            tracking.set_run_tags(result["run_id"], {TAG_TRIAL_STATE: "COMPLETE"})
            return result["metrics"][schema.VAL_BAC]

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

        # Pruned and failed trials do not count: go on until `target` have completed, with a
        # bound so a study whose every trial is pruned still ends.
        attempts_left = 3 * max(target - completed(), 0) + 10
        reseeded = False
        with locks.working():
            while attempts_left:
                claim.acquire()
                try:
                    locks.fail_dead_trials(study)
                    states = [t.state for t in study.get_trials(deepcopy=False)]
                    complete = states.count(optuna.trial.TrialState.COMPLETE)
                    if complete >= target:
                        break
                    if complete + states.count(optuna.trial.TrialState.RUNNING) < target:
                        if not reseeded:
                            study.sampler = _component(optuna.samplers, {
                                **spec.sampler,
                                "seed": (spec.sampler["seed"] + len(states)) % 2**32},
                                "sampler", spec.source)
                            reseeded = True
                        attempts_left -= 1
                        # The objective releases the claim once its trial exists.
                        study.optimize(objective, n_trials=1, callbacks=[after_trial],
                                       catch=(DivergenceError,))
                        continue
                finally:
                    claim.release()
                time.sleep(WAIT_FOR_SLOT_S)
        if bar is not None:
            bar.close()
        if not completed():
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            raise UserError(f"study '{spec.name}': no trial completed ({states.count('FAIL')} "
                            f"failed, {states.count('PRUNED')} pruned); the trials' runs in "
                            f"MLflow say why (tag {tracking.TAG_FAILURE})")
        best = study.best_trial
        states = [t.state for t in study.get_trials(deepcopy=False)]
        parent.log_metrics({"study/best_val_bac": best.value,
                            "study/completed_trials": completed(),
                            "study/pruned_trials": states.count(optuna.trial.TrialState.PRUNED),
                            "study/failed_trials": states.count(optuna.trial.TrialState.FAIL)})
        parent.set_tags({f"best.{k}": str(v) for k, v in best.params.items()}
                        | {"best.trial": str(best.number)})
        with locks.final():  # the test set is seen once, whichever process gets here first
            finals = tracking.find_runs(experiment, f"tags.{TAG_STUDY} = '{spec.name}' and "
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
            # Under the lock, so that the last table written is the one read last (the most
            # complete), however many processes end the study.
            log_trials_summary(parent, spec, study, target, path, final_run, final_metrics)
        parent.log_metrics({f"final/{k}": v for k, v in final_metrics.items()
                            if k.startswith("test/")})
    return {"study": spec.name, "experiment": spec.experiment, "completed": completed(),
            "trials": len(study.trials), "best_params": best.params, "best_val_bac": best.value,
            "final_run_id": final_run, "final_metrics": final_metrics,
            "parent_run_id": parent.run_id}


def check_shared_storage(storage_url: str | None, address: str | None) -> None:
    """Trials on a cluster's other machines cannot share a journal or SQLite file."""
    if address and (storage_url is None or "://" not in storage_url
                    or storage_url.startswith("sqlite")):
        raise UserError("tune --address: the trials run on other machines, which cannot share a "
                        "journal or SQLite file; give --storage postgresql://USER@HOST/DB")


def study_task(spec_name: str, spec_text: str, storage: str | None, trials: int | None,
               driver: dict[str, str] | None = None) -> dict:
    """One of the processes sharing a study, wherever it runs (the spec travels as text: the
    machine may not see the driver's files), ended with the ``driver`` process."""
    import tempfile

    from benchmark.engine import die_with
    from benchmark.errors import one_line

    die_with(driver)
    with tempfile.TemporaryDirectory(prefix="benchmark-study-") as folder:
        path = Path(folder) / spec_name
        path.write_text(spec_text)
        try:
            result = run_study(path, storage, trials, progress=False)
        except Exception as err:  # noqa: BLE001  (told by the driver)
            return {"ok": False, "reason": failure_reason(err), "message": one_line(err),
                    "user_error": isinstance(err, UserError)}
    return {"ok": True, **result}


def _run_study_on_ray(path, storage, trials, progress, jobs, address, cpus, gpus) -> dict:
    """``run_study`` in as many Ray tasks as the cluster has slots (at most ``jobs``), sharing
    the study through its storage and locks exactly as processes started by hand do: phase 1
    is trained once (the first trial holds its lock, the others wait), exactly ``trials``
    complete, and the test evaluation happens once."""
    import optuna

    from benchmark import engine as engines

    spec = StudySpec.from_file(path)
    spec.check()
    target = trials or spec.trials
    storage_url = storage or spec.storage
    check_shared_storage(storage_url, address)
    if storage_url and "://" not in storage_url:
        storage_url = str(Path(storage_url).absolute())
    elif storage_url is None:
        storage_url = str(Path(DEFAULT_JOURNAL).absolute())
    resources = engines.default_resources(jobs, address, cpus, gpus)
    engine = engines.make_engine(jobs, address, resources,
                                 {"MLFLOW_TRACKING_URI": _absolute_uri()})
    try:
        tasks = min(engine.slots, target)
        handles = [engine.submit(study_task, Path(path).name, Path(path).read_text(),
                                 storage_url, target, tracking.process_tags())
                   for _ in range(tasks)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, desc=f"study {spec.name} ({tasks} tasks on "
                       f"{engine.name})", unit="trial", dynamic_ncols=True)
        results = []
        while handles:
            for handle, result in engine.wait(handles, timeout=POLL_S):
                handles.remove(handle)
                results.append(result)
            if bar is not None:
                with contextlib.suppress(Exception):  # the study may not exist yet
                    study = optuna.load_study(study_name=spec.name,
                                              storage=make_storage(storage_url))
                    bar.n = min(target, len(study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))))
                    bar.refresh()
        if bar is not None:
            bar.close()
    finally:
        engine.close()
    done = [r for r in results if r["ok"]]
    if not done:
        first = results[0]
        if first["user_error"]:
            raise UserError(first["message"])
        raise RuntimeError(f"every task of study '{spec.name}' failed: {first['reason']}")
    return {k: v for k, v in done[0].items() if k != "ok"}
