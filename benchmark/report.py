"""Reports: MLflow runs as paper, score and runtime tables (LaTeX, PDF, markdown, CSV) and plots."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from tabulate import tabulate

from benchmark import schema, tracking
from benchmark.errors import UserError

DEFAULT_OUT = "reports"
# Report runs live apart from the cells they summarise, so that no cell view lists them.
REPORT_EXPERIMENT = "reports"
REPORTS_DESCRIPTION = (
    "Reports made by `python -m benchmark.report`: one run per report, holding its tables "
    "(LaTeX, a PDF of them all, markdown, CSV), its figures and `runs.json`, the ids of the "
    "benchmark runs it summarised. The cells themselves are in the other experiments.")
# What each --format writes; figures (PNG and PDF) are written whatever the format, the PDF of
# all tables with LaTeX where pdflatex exists.
FORMATS = {"all": ("latex", "markdown", "csv"), "latex": ("latex",),
           "markdown": ("markdown",), "csv": ("csv",)}
DEFAULT_FORMAT = "all"
# MLproject passes every parameter; this value means "not given".
UNSET = "default"

# What a table is about; every combination gets tables of its own.  The backbone counts with
# its parameters (see ``tidy_runs``).
TABLE_KEYS = ("dataset", "backbone_label", "profile", "ratio")
# Training settings that also split tables (runs trained differently are never averaged), but
# are named in titles and file names only where a table must be told apart from another.  The
# device is one because CPU and GPU timings do not mix (and AMP runs on CUDA only).
TRAINING_SETTINGS = ("epochs", "head_epochs", "batch_size", "lr", "image_size", "subset_seed",
                     "val_fraction", "device_used")
SETTING_KEYS = TABLE_KEYS + TRAINING_SETTINGS
# One cell: a setting, a loss with its parameters, a method with its parameters.  The last two
# follow from the method label (its name and parameters other than K, and K) and are kept so
# that layouts can put K on an axis of its own; so does the method's row group (a grid spec's
# ``groups``, "" without).
GROUP_FIELD = "method_group"
CELL_KEYS = SETTING_KEYS + ("loss", "loss_label", "method", "method_label", "method_variant", "K",
                            GROUP_FIELD)

GM_FORMS = {
    "macro": (schema.test("gm_macro"), "imbalanced-learn's macro geometric mean, "
                                       "sqrt(mean recall x mean specificity)"),
    "multiclass": (schema.test("gm"), "the geometric mean of the per-class recalls"),
}
F1_METRIC = schema.test("f1_macro")
BAC_METRIC = schema.test("bac")
RECALL_PREFIX = schema.recall(0)[:-1]

# Stage times, logged as ``time/<stage>_s``: the runtime table has a column for every stage its
# runs logged, and their sum, but for these: the wall clock (it includes loading and
# evaluation), loading a cached phase 1 (no compute: a reused phase 1 logs the time of the run
# that trained it instead, so every method is charged for the phase 1 it needs) and the total.
STAGE_TIME = re.compile(re.escape(schema.TIME_PREFIX) + r"(?P<stage>\w+)" +
                        re.escape(schema.TIME_SUFFIX))
TOTAL_TIME = schema.time("total")
NOT_STAGES = (schema.WALL_TIME, schema.LOAD_TIME, TOTAL_TIME)
# Known stages in pipeline order, with their titles; others follow alphabetically.
STAGE_TITLES = {"generator": "Generator", "pixel_resample": "Pixel resampling",
                "training_set": "Training set", "phase1": "Phase 1", "phase2": "Phase 2",
                "resample": "Resampling", "phase3": "Phase 3"}
# The method whose total time the others are divided by (--reference, a grid's `reference:`).
DEFAULT_REFERENCE = "eos"

# The paper's orders; names they do not know follow alphabetically.  Methods have no fixed
# order: a grid's, else alphabetical with the reference last (``method_order``).
LOSS_ORDER = ("ce", "asl", "focal", "ldam-drw")
DATASET_ORDER = ("cifar10", "svhn", "cifar100", "celeba")
BACKBONE_ORDER = ("resnet32", "resnet56", "densenet", "wrn28")
FIXED_ORDERS = {"loss": LOSS_ORDER, "loss_label": LOSS_ORDER, "dataset": DATASET_ORDER,
                "backbone_label": BACKBONE_ORDER}
METHOD_FIELDS = ("method", "method_label", "method_variant")
# The cell keys that follow from the method: the rest names what a method is compared on.
METHOD_KEYS = METHOD_FIELDS + ("K", GROUP_FIELD)
# Components whose logged parameters (``params.<group>.<name>``) join their label.
VARIANT_GROUPS = ("backbone", "loss", "method")
K_PARAM = "k_neighbors"
PARAM_ALIASES = {K_PARAM: "K"}
# Runs that are no benchmark cell even where they carry the phase-1 key or test scores: tuning
# trials (they never see the test set), a study's parent run, a report, a grid's parent run
# (studies.TAG_ROLE and the grid's role tag; spelled out so that --help does not import
# PyTorch).
TAG_ROLE = "study_role"
NOT_CELL_ROLES = ("trial", "study", "report")
REPORT_ROLE = "report"
TAG_GRID_ROLE = "grid_role"
GRID_PARENT = "parent"


# Gathering ------------------------------------------------------------------------------------
def gather_runs(experiments: list[str] | None, cell_keys: set[str] | None = None,
                grid_name: str | None = None) -> pd.DataFrame:
    """The finished benchmark cells (``is_cell``) of ``experiments``, or of every experiment
    of the store when None, as a tidy frame (see ``tidy_runs``), only those whose
    ``cell_key`` tag is in ``cell_keys`` when given; ``UserError`` for an experiment the store
    lacks or when no run is left."""
    known = tracking.experiment_names()
    unknown = sorted(set(experiments or ()) - set(known))
    if unknown:
        raise UserError(f"unknown experiment {', '.join(map(repr, unknown))} in "
                        f"{tracking.tracking_uri()}; experiments there: "
                        f"{', '.join(known) or 'none'}")
    raw = tracking.finished_runs(known if experiments is None else experiments)
    cells = raw[is_cell(raw)]
    where = (f"experiment {', '.join(map(repr, experiments))} ({tracking.tracking_uri()})"
             if experiments is not None else
             f"any experiment of {tracking.tracking_uri()} ({', '.join(known) or 'none'}); "
             f"run some with: python -m benchmark run, or grid SPEC")
    if cells.empty:
        raise UserError(f"no finished runs in {where}")
    if cell_keys is not None:
        from benchmark.studies import TAG_CELL

        cells = cells[tag(cells, TAG_CELL).isin(cell_keys)]
        if cells.empty:
            raise UserError(f"no finished run of grid '{grid_name}' ({len(cell_keys)} cells) in "
                            f"{where}; run it with: python -m benchmark grid SPEC")
    return tidy_runs(cells)


def is_cell(raw: pd.DataFrame) -> pd.Series:
    """Which runs of MLflow's search frame are benchmark cells: they carry the phase-1 key and
    test scores, and no role of a trial, a study or grid parent or a report."""
    tested = raw[[c for c in raw.columns if c.startswith("metrics.test/")]].notna().any(axis=1)
    return (tag(raw, tracking.TAG_PHASE1_KEY).notna() & tested
            & ~tag(raw, TAG_ROLE).isin(NOT_CELL_ROLES) & tag(raw, TAG_GRID_ROLE).ne(GRID_PARENT))


def tag(raw: pd.DataFrame, name: str) -> pd.Series:
    column = f"tags.{name}"
    return raw[column] if column in raw else pd.Series(None, index=raw.index, dtype=object)


def tidy_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``run_id``, ``experiment``, ``start_time``, ``cell`` (the readable
    ``cell`` tag, where logged), the setting (``TABLE_KEYS``
    and ``TRAINING_SETTINGS``, as logged), ``backbone``, ``loss``, ``method``, ``seed``, the
    labels ``backbone_label`` / ``loss_label`` / ``method_label`` (the name plus every
    ``backbone.*`` / ``loss.*`` / ``method.*`` parameter the run logged, e.g. ``eos (K=3)``:
    variants of one method become separate columns), ``method_variant`` (the method label
    without K), ``K`` (the K in force, ``method_hparam.k_neighbors``; empty for a method
    without one),
    ``train_class_counts`` (JSON list) and every metric under its own name (``test/bac``,
    ``time/phase1_s``, ...: ``benchmark.schema``)."""
    def param(name: str) -> pd.Series:
        column = f"params.{name}"
        return raw[column] if column in raw else pd.Series(None, index=raw.index, dtype=object)

    tidy = pd.DataFrame({"run_id": raw["run_id"], "experiment": raw["experiment"],
                         "start_time": raw["start_time"], "cell": tag(raw, schema.TAG_CELL)})
    for name in ("dataset", "profile", "ratio") + TRAINING_SETTINGS + VARIANT_GROUPS:
        tidy[name] = param(name).fillna("").astype(str)
    tidy["ratio"] = pd.to_numeric(tidy["ratio"], errors="coerce")
    tidy["seed"] = pd.to_numeric(param("seed"), errors="coerce")
    for group in VARIANT_GROUPS:
        tidy[f"{group}_label"] = variant_labels(raw, tidy[group], group)
    tidy["method_variant"] = variant_labels(raw, tidy["method"], "method", leave_out=(K_PARAM,))
    # The K in force (defaults included, logged since the protocol fix); older runs logged
    # only a K the user set.
    effective = param(f"method_hparam.{K_PARAM}").fillna(param(f"method.{K_PARAM}"))
    tidy["K"] = effective.fillna("").astype(str).replace("None", "")
    tidy["train_class_counts"] = param("train_class_counts")
    metrics = raw[[c for c in raw.columns if c.startswith("metrics.")]]
    return pd.concat([tidy, metrics.rename(columns=lambda c: c[len("metrics."):])], axis=1)


def variant_labels(raw: pd.DataFrame, names: pd.Series, prefix: str,
                   leave_out: tuple[str, ...] = ()) -> pd.Series:
    """``name (key=value, ...)`` from the run's ``params.{prefix}.*`` (less ``leave_out``);
    the bare name when the run logged none (the component's defaults)."""
    start = f"params.{prefix}."
    columns = sorted(c for c in raw.columns
                     if c.startswith(start) and c[len(start):] not in leave_out)

    def label(row_index) -> str:
        given = [(c[len(start):], raw.at[row_index, c]) for c in columns]
        given = [f"{PARAM_ALIASES.get(key, key)}={value}" for key, value in given
                 if isinstance(value, str) and value not in ("", "None")]
        name = names[row_index]
        return f"{name} ({', '.join(given)})" if given else name

    return pd.Series([label(i) for i in raw.index], index=raw.index, dtype=object)


def latest_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep the most recent run of each cell and seed, so that a re-run does not count twice."""
    order = runs.sort_values("start_time")
    return order.drop_duplicates(list(CELL_KEYS) + ["seed"], keep="last").sort_index()


# Aggregation ----------------------------------------------------------------------------------
def aggregate(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per cell (``CELL_KEYS``): columns ``(metric, "mean" | "std" | "count")`` for every metric,
    std being the sample standard deviation over seeds (ddof=1, NaN for one seed), plus
    ``("runs", "n")``.  A metric no run logged aggregates to NaN."""
    frame = runs.reindex(columns=list(CELL_KEYS) + metrics)
    grouped = frame.groupby(list(CELL_KEYS), dropna=False, sort=True)
    summary = grouped[metrics].agg(["mean", "std", "count"])
    summary[("runs", "n")] = grouped.size()
    return summary


def stage_metrics(columns) -> list[str]:
    """The stage times among ``columns`` (``time/<stage>_s`` less ``NOT_STAGES``): known stages
    in pipeline order, then the others alphabetically."""
    known = list(STAGE_TITLES)

    def rank(metric: str) -> tuple:
        stage = STAGE_TIME.fullmatch(metric)["stage"]
        return (known.index(stage) if stage in known else len(known), stage)

    return sorted((c for c in columns if STAGE_TIME.fullmatch(c) and c not in NOT_STAGES),
                  key=rank)


def stage_title(metric: str) -> str:
    stage = STAGE_TIME.fullmatch(metric)["stage"]
    return STAGE_TITLES.get(stage, stage.replace("_", " ").capitalize())


def with_total_time(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``time/total_s``: the sum of the stage times the run logged (NaN if none)."""
    stages = runs[stage_metrics(runs.columns)]
    return runs.assign(**{TOTAL_TIME: stages.sum(axis=1, min_count=1)})


def score_metrics(gm_form: str) -> dict[str, str]:
    """Column title -> metric of the score tables (FM is macro F1, as in the paper)."""
    return {"BAC": BAC_METRIC, "GM": GM_FORMS[gm_form][0], "FM": F1_METRIC}


def cells_of(summary: pd.DataFrame) -> list[tuple[dict, pd.Series]]:
    """The summary's cells as ``(cell key dict, aggregate row)``."""
    return [(dict(zip(CELL_KEYS, key)), row) for key, row in summary.iterrows()]


@dataclass(frozen=True)
class Orders:
    """How one report sorts each field's values: the names ``listed`` for the field first, in
    that order (a label such as ``eos (K=3)`` ranks as its name), then numbers by value, then
    text."""

    listed: dict[str, tuple[str, ...]]

    def key(self, field: str, value) -> tuple:
        if isinstance(value, float) and math.isnan(value):
            return (1, math.inf, "")
        name = str(value).split(" (")[0]
        order = self.listed.get(field, ())
        rank = order.index(name) if name in order else len(order)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.inf
        return (rank, number, str(value))


def report_orders(methods: tuple[str, ...], groups: tuple[str, ...] = ()) -> Orders:
    """The paper's orders of losses, datasets and backbones, ``methods`` for every method
    field and ``groups`` for the methods' row groups."""
    return Orders({**FIXED_ORDERS, **{f: methods for f in METHOD_FIELDS}, GROUP_FIELD: groups})


def method_order(methods, reference: str) -> tuple[str, ...]:
    """Without a grid to follow: alphabetical, the reference last (where the paper puts EOS)."""
    return tuple(sorted(set(methods), key=lambda name: (name == reference, name)))


def split_cells(cells: list[tuple[dict, pd.Series]], split: tuple[str, ...], orders: Orders):
    """``(values of the split fields, the cells with those values)`` in sorted order."""
    blocks: dict[tuple, list] = {}
    for key, row in cells:
        blocks.setdefault(tuple(key[f] for f in split), []).append((key, row))
    ordered = sorted(blocks, key=lambda values: [orders.key(f, v) for f, v in zip(split, values)])
    return [(dict(zip(split, values)), blocks[values]) for values in ordered]


def distinguishing(keys: list[dict], fields: tuple[str, ...], fixed: tuple[str, ...]):
    """Per key, the ``fields`` outside ``fixed`` on which it differs from another key that
    agrees with it on every ``fixed`` field: what a title must name besides ``fixed``."""
    named = []
    for key in keys:
        siblings = [other for other in keys if other is not key
                    and all(other[f] == key[f] for f in fixed)]
        named.append([f for f in fields if f not in fixed
                      and any(other[f] != key[f] for other in siblings)])
    return named


# Layouts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One level of row labels, or the column groups: a cell field, plus ``folded`` fields that
    join the label (in parentheses) only where cells with the same value of ``field`` differ in
    them."""

    header: str
    field: str
    folded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layout:
    """How score tables are cut: one table per value of the ``split`` fields, rows by ``rows``,
    column groups by ``group`` (None: one column per metric).  Split, rows and groups cover
    every cell key, so a table cell is exactly one aggregated cell.  Titles always name the
    ``named`` fields, other split fields only where two tables differ in them; file names do
    the same when ``stem_kind`` is set, and otherwise name only what tells tables apart.
    ``best``: the best mean is bold per "row" (among column groups), per "column" (among
    rows) or per "block" (per column among the rows of one first-level label, e.g. one
    dataset).  ``times``: stages whose mean seconds join the score columns (with the total
    of every stage and its ratio to the reference method's), for tables that weigh scores
    against runtime.  A row level on the methods' group (``GROUP_FIELD``) is left out when the
    report has no groups."""

    name: str
    heading: str
    split: tuple[str, ...]
    rows: tuple[Level, ...]
    group: Level | None
    named: tuple[str, ...]
    stem_kind: str = ""
    best: str = "row"
    times: tuple[str, ...] = ()

    def without_groups(self) -> "Layout":
        return dataclasses.replace(self, rows=tuple(level for level in self.rows
                                                    if level.field != GROUP_FIELD))


# Where rows or column groups are datasets, each comes with its setting.
DATASET_LEVEL = Level("Dataset", "dataset",
                      folded=("backbone_label", "profile", "ratio") + TRAINING_SETTINGS)
METHOD_LEVEL = Level("Method", "method_label")
GENERIC = Layout("generic", "Scores", split=SETTING_KEYS, rows=(Level("Loss", "loss_label"),),
                 group=METHOD_LEVEL, named=TABLE_KEYS, stem_kind="scores")
# Runtime tables: per setting, rows loss x method (whatever the score layout).
RUNTIME = Layout("runtime", "Runtime", split=SETTING_KEYS,
                 rows=(Level("Loss", "loss_label"), METHOD_LEVEL), group=None,
                 named=TABLE_KEYS, stem_kind="runtime")
# A grid spec named after a paper table gets its layout (``scope_of``).
PAPER_LAYOUTS = {layout.name: layout for layout in (
    # Table I: a row per method, in the spec's row groups (the paper's pre-processing and
    # embedding space), every dataset (with its backbone, ratio and training settings) as a
    # column group; one table per loss (the paper's is cross-entropy); best per column.
    Layout("table1", "Table I: over-sampling in pixel vs embedding space",
           split=("loss_label",), rows=(Level("Group", GROUP_FIELD), METHOD_LEVEL),
           group=DATASET_LEVEL, named=("loss_label",), best="column"),
    # Table II: every dataset (with its backbone, ratio and training settings) x loss in one
    # table, the resamplers as column groups.
    Layout("table2", "Table II: losses and resamplers", split=(),
           rows=(DATASET_LEVEL, Level("Loss", "loss_label")), group=METHOD_LEVEL, named=()),
    # Table III, transposed with respect to the paper (which puts the methods in column
    # groups): per dataset (with its backbone, ratio and training settings) a row per method,
    # in the spec's row groups (GANs, autoencoder, embedding space), BAC / GM / FM beside the
    # generator's seconds, the total of every stage and its ratio to the reference's (EOS):
    # the paper's point is the score each method buys with its runtime.  One table per loss
    # (the paper's has four; studies/paper/table3.yaml runs cross-entropy); best per dataset.
    Layout("table3", "Table III: generative over-samplers vs EOS", split=("loss_label",),
           rows=(DATASET_LEVEL, Level("Group", GROUP_FIELD), METHOD_LEVEL), group=None,
           named=("loss_label",), best="block", times=(schema.GENERATOR_STAGE,)),
    # Table IV, transposed with respect to the paper (which puts K in columns): a row per K,
    # a column per metric; the best K per metric in bold.
    Layout("table4", "Table IV: sensitivity to K", split=SETTING_KEYS + ("loss_label",
                                                                         "method_variant"),
           rows=(Level("K", "K"),), group=None,
           named=TABLE_KEYS + ("loss_label", "method_variant"), best="column"),
    # Table V: a row per backbone, with the training settings that come with it (WideResNet
    # trains fewer epochs), the methods as column groups.
    Layout("table5", "Table V: architectures with and without EOS",
           split=("dataset", "profile", "ratio", "loss_label"),
           rows=(Level("Backbone", "backbone_label", folded=TRAINING_SETTINGS),),
           group=METHOD_LEVEL, named=("dataset", "profile", "ratio", "loss_label")),
)}


# Training settings in words, for titles and captions.
SETTING_WORDS = {"head_epochs": "head epochs", "batch_size": "batch size",
                 "lr": "learning rate", "image_size": "image size", "subset_seed": "subset seed",
                 "val_fraction": "validation fraction", "device_used": "device"}


def field_text(field: str, value) -> str:
    """A field's value as a title names it: ``exp profile``, ``ratio 100``, ``epochs 200``,
    ``learning rate 0.1``."""
    if field == "ratio":
        return "ratio ?" if pd.isna(value) else f"ratio {value:g}"
    if field == "profile":
        return f"{value} profile"
    if field == "loss_label":
        return f"loss {value}"
    if field in ("dataset", "backbone_label", "method_label", "method_variant"):
        return str(value)
    return f"{SETTING_WORDS.get(field, field)} {value}"


def slug_part(field: str, value) -> str:
    if field == "ratio":
        return "r" + ("na" if pd.isna(value) else f"{value:g}")
    if field in TRAINING_SETTINGS:
        return f"{field}{value}"
    return str(value)


def slugify(parts: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(parts)).strip("-")


def label_text(field: str, value) -> str:
    """A field's value as a row label."""
    if field == "K" and value == "":
        return "default"
    if field == "ratio":
        return "?" if pd.isna(value) else f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Piece:
    """One table of a layout: its split values, cells, title and file stem."""

    values: dict
    cells: list
    heading: str
    setting: str  # the split values a title names
    slug: str  # the same for a file name
    stem: str

    @property
    def title(self) -> str:
        return f"{self.heading}: {self.setting}" if self.setting else self.heading


def pieces(cells: list, layout: Layout, prefix: str, orders: Orders) -> list[Piece]:
    blocks = split_cells(cells, layout.split, orders)
    keys = [values for values, _ in blocks]
    in_title = distinguishing(keys, layout.split, layout.named)
    stem_fixed = layout.named if layout.stem_kind else ()
    in_stem = distinguishing(keys, layout.split, stem_fixed)
    made = []
    for (values, block), title_extra, stem_extra in zip(blocks, in_title, in_stem):
        setting = ", ".join(field_text(f, values[f]) for f in list(layout.named) + title_extra)
        slug = slugify([slug_part(f, values[f]) for f in list(stem_fixed) + stem_extra])
        stem = "-".join(part for part in (prefix, layout.stem_kind, slug) if part)
        made.append(Piece(values, block, layout.heading, setting, slug, stem))
    return made


def level_label(block: list, level: Level, key: dict) -> str:
    """The label of ``key`` at ``level``: its value, plus the folded fields in which it differs
    from cells of the table with the same value."""
    peers = [k for k, _ in block if k[level.field] == key[level.field]]
    extra = [f for f in level.folded if len({str(p[f]) for p in peers}) > 1]
    text = label_text(level.field, key[level.field])
    return f"{text} ({', '.join(field_text(f, key[f]) for f in extra)})" if extra else text


def level_order(level: Level, key: dict, orders: Orders) -> list:
    return [orders.key(f, key[f]) for f in (level.field,) + level.folded]


def row_labels(block: list, rows: tuple[Level, ...],
               orders: Orders) -> list[tuple[tuple, dict, pd.Series]]:
    """``(row label tuple, cell key, aggregate row)`` per cell of a table, in row order."""
    ordered = sorted(block, key=lambda cell: [part for level in rows
                                              for part in level_order(level, cell[0], orders)])
    return [(tuple(level_label(block, level, key) for level in rows), key, row)
            for key, row in ordered]


def level_settings_note(block: list, level: Level, orders: Orders) -> list[tuple[str, str]]:
    """``(label, its setting)`` for a level with folded fields: the table-level ones
    (backbone, profile, ratio) always, training settings where labels differ in them."""
    keys = [key for key, _ in block]
    shown = [f for f in level.folded
             if f in TABLE_KEYS or len({str(k[f]) for k in keys}) > 1]
    if not shown:
        return []
    notes = {}
    for labels, key, _ in row_labels(block, (level,), orders):
        notes.setdefault(labels[0], ", ".join(field_text(f, key[f]) for f in shown))
    return list(notes.items())


# The table model ------------------------------------------------------------------------------
SCORE, COUNT, SECONDS, RATIO = "score", "count", "seconds", "ratio"
# Scores are shown in percent with ``--digits`` decimals; the other kinds have fixed decimals.
DEFAULT_DIGITS = 1
MAX_DIGITS = 6
FIXED_DIGITS = {SECONDS: 2, RATIO: 2}


@dataclass(frozen=True)
class Column:
    group: str | None  # a column group's label (a method, a dataset), or None
    title: str  # BAC, GM, FM, n, Phase 1, ...
    kind: str


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float = math.nan


@dataclass
class Table:
    """One table of numbers, whatever the output format: rows of labels, columns (grouped or
    not), a ``Stat`` per filled cell (scores as fractions) and the cells whose mean is the
    best (bold).  ``digits``: decimals of the scores, which are shown in percent.
    ``constant_n``: the count of every filled cell where it is the same throughout (set by
    ``fold_constant_count``); the text formats then leave the count columns out and the
    caption states it once.  ``caption`` gives the caption after the title."""

    stem: str
    title: str
    caption: Callable[["Markup", "Table"], str]
    index: tuple[str, ...]
    rows: list[tuple[str, ...]]
    columns: list[Column]
    values: dict[tuple[tuple[str, ...], Column], Stat]
    best: set[tuple[tuple[str, ...], Column]]
    digits: int = DEFAULT_DIGITS
    constant_n: int | None = None

    @property
    def grouped(self) -> bool:
        return any(column.group is not None for column in self.columns)

    def shown_columns(self) -> list[Column]:
        """The columns the text formats show: the count columns only where counts differ."""
        return [c for c in self.columns if c.kind != COUNT or self.constant_n is None]

    def caption_text(self, markup: "Markup") -> str:
        return f"{markup.escape(self.title)}. {self.caption(markup, self)}"

    def decimals(self, kind: str) -> int:
        return self.digits if kind == SCORE else FIXED_DIGITS[kind]


def fold_constant_count(table: Table) -> Table:
    """Set ``constant_n`` where every filled count column holds the same number."""
    counts = {stat.mean for (_, column), stat in table.values.items() if column.kind == COUNT}
    table.constant_n = int(counts.pop()) if len(counts) == 1 else None
    return table


def mark_best(table: Table, per: str) -> None:
    """Bold the best mean (as shown, so rounding ties count as ties) of every score column
    title per row (among groups), of every score column (among rows) or of every score
    column per first-level row label ("block"); only where two or more values compete."""
    contests: dict[tuple, list] = {}
    for (row, column), stat in table.values.items():
        if column.kind != SCORE or pd.isna(stat.mean):
            continue
        contest = {"row": (row, column.title), "column": column,
                   "block": (row[0], column)}[per]
        shown = round(percent(stat.mean), table.digits)
        contests.setdefault(contest, []).append((shown, row, column))
    for entries in contests.values():
        if len(entries) > 1:
            top = max(value for value, _, _ in entries)
            table.best.update((row, column) for value, row, column in entries if value == top)


def empty_table(piece: Piece, rows: tuple[Level, ...], columns: list[Column], caption,
                orders: Orders, digits: int):
    labelled = row_labels(piece.cells, rows, orders)
    table = Table(piece.stem, piece.title, caption, tuple(level.header for level in rows),
                  list(dict.fromkeys(labels for labels, _, _ in labelled)), columns, {}, set(),
                  digits)
    return table, labelled


def score_table(piece: Piece, layout: Layout, metrics: dict[str, str], caption,
                orders: Orders, digits: int = DEFAULT_DIGITS,
                reference: str = DEFAULT_REFERENCE) -> Table:
    """Mean and std of every metric, and the number of seeds, per row and column group; with
    the layout's ``times``, their mean seconds, the total and the total divided by that of
    the ``reference`` method's cell that differs only in the method (a dash without one)."""
    def group_of(key: dict) -> str | None:
        return None if layout.group is None else level_label(piece.cells, layout.group, key)

    groups = [None] if layout.group is None else list(dict.fromkeys(
        group_of(key) for key, _ in sorted(
            piece.cells, key=lambda cell: level_order(layout.group, cell[0], orders))))
    columns = [c for group in groups for c in
               [Column(group, title, SCORE) for title in metrics] + [Column(group, "n", COUNT)]]
    times = time_columns(layout)
    columns += [Column(None, title, SECONDS) for title in times] + (
        [Column(None, ratio_title(reference), RATIO)] if times else [])
    table, labelled = empty_table(piece, layout.rows, columns, caption, orders, digits)
    for labels, key, row in labelled:
        group = group_of(key)
        count = Column(group, "n", COUNT)
        if (labels, count) in table.values:
            raise AssertionError(f"two cells share row {labels} and column {group}")
        table.values[(labels, count)] = Stat(float(row[("runs", "n")]))
        for title, metric in metrics.items():
            if not pd.isna(row[(metric, "mean")]):
                table.values[(labels, Column(group, title, SCORE))] = Stat(
                    row[(metric, "mean")], row[(metric, "std")])
        for title, metric in times.items():
            if not pd.isna(row[(metric, "mean")]):
                table.values[(labels, Column(None, title, SECONDS))] = Stat(
                    row[(metric, "mean")], row[(metric, "std")])
        if times:
            peers = [(k, r) for k, r in piece.cells
                     if all(k[f] == key[f] for f in CELL_KEYS if f not in METHOD_KEYS)]
            total = reference_total(peers, reference)
            if total is not None and not pd.isna(row[(TOTAL_TIME, "mean")]):
                table.values[(labels, Column(None, ratio_title(reference), RATIO))] = Stat(
                    row[(TOTAL_TIME, "mean")] / total)
    mark_best(table, layout.best)
    return fold_constant_count(table)


def time_columns(layout: Layout) -> dict[str, str]:
    """Column title -> time metric of a layout's ``times`` (seconds), then the total; empty
    for a layout without times."""
    if not layout.times:
        return {}
    stages = {f"{stage_title(schema.time(stage))} (s)": schema.time(stage)
              for stage in layout.times}
    return {**stages, "Total (s)": TOTAL_TIME}


def ratio_title(reference: str) -> str:
    return f"vs {reference}"


def runtime_table(piece: Piece, stages: list[str], reference: str, caption,
                  orders: Orders) -> Table:
    """Rows (loss, method); columns: mean seconds of each of ``stages`` that the table's runs
    logged, their total, the total divided by the reference method's total for the same loss
    (``reference_total``; a dash without one) and the number of runs."""
    logged = [m for m in stages if any(not pd.isna(row[(m, "mean")]) for _, row in piece.cells)]
    times = [(stage_title(m), m) for m in logged] + [("Total", TOTAL_TIME)]
    ratio = Column(None, ratio_title(reference), RATIO)
    columns = [Column(None, title, SECONDS) for title, _ in times] + [ratio,
                                                                      Column(None, "n", COUNT)]
    table, labelled = empty_table(piece, RUNTIME.rows, columns, caption, orders,
                                  DEFAULT_DIGITS)
    references = {loss: reference_total([(k, r) for k, r in piece.cells
                                         if k["loss_label"] == loss], reference)
                  for loss in {key["loss_label"] for key, _ in piece.cells}}
    for labels, key, row in labelled:
        for title, metric in times:
            if not pd.isna(row[(metric, "mean")]):
                table.values[(labels, Column(None, title, SECONDS))] = Stat(
                    row[(metric, "mean")], row[(metric, "std")])
        total = references[key["loss_label"]]
        if total is not None and not pd.isna(row[(TOTAL_TIME, "mean")]):
            table.values[(labels, ratio)] = Stat(row[(TOTAL_TIME, "mean")] / total)
        table.values[(labels, Column(None, "n", COUNT))] = Stat(float(row[("runs", "n")]))
    return fold_constant_count(table)


def reference_total(cells: list, reference: str) -> float | None:
    """Mean total time of the ``reference`` method among one loss's cells: the cell with its
    default parameters (label = name), else its only variant; None when there is no such
    single cell (a table without the method, say)."""
    named = [(key, row) for key, row in cells if key["method"] == reference]
    plain = [(key, row) for key, row in named if key["method_label"] == reference]
    chosen = plain or named
    if len(chosen) != 1:
        return None
    total = chosen[0][1][(TOTAL_TIME, "mean")]
    return None if pd.isna(total) or total <= 0 else float(total)


# Rendering ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Markup:
    """How one output format writes emphasis, the plus-minus sign, a dash and plain text."""

    bold: Callable[[str], str]
    plus_minus: str
    dash: str
    escape: Callable[[str], str]
    seeds_header: str


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: LATEX_SPECIALS[m.group()], str(text))


LATEX = Markup(bold=lambda s: rf"\textbf{{{s}}}", plus_minus=r" $\pm$ ", dash="--",
               escape=latex_escape, seeds_header="$n$")
MARKDOWN = Markup(bold=lambda s: f"**{s}**", plus_minus=" ± ", dash="-", escape=str,
                  seeds_header="n")


def format_number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def percent(fraction: float) -> float:
    return 100.0 * fraction


def cell_text(table: Table, row: tuple[str, ...], column: Column, markup: Markup) -> str:
    """Scores in percent, ``mean ± std`` (the mean alone for a single seed); the mean for
    seconds, a plain number otherwise; a dash for an empty cell."""
    stat = table.values.get((row, column))
    if stat is None or pd.isna(stat.mean):
        return markup.dash
    if column.kind == COUNT:
        return str(int(stat.mean))
    digits = table.decimals(column.kind)
    if column.kind != SCORE:
        return format_number(stat.mean, digits)
    text = format_number(percent(stat.mean), digits)
    if (row, column) in table.best:
        text = markup.bold(text)
    if pd.isna(stat.std):
        return text
    return f"{text}{markup.plus_minus}{format_number(percent(stat.std), digits)}"


def column_title(column: Column, markup: Markup) -> str:
    return markup.seeds_header if column.kind == COUNT else markup.escape(column.title)


def text_frame(table: Table, markup: Markup) -> pd.DataFrame:
    """The table as text in one markup: grouped columns as a two-level header."""
    index = pd.MultiIndex.from_tuples(
        [tuple(markup.escape(label) for label in row) for row in table.rows],
        names=list(table.index)) if len(table.index) > 1 else pd.Index(
        [markup.escape(row[0]) for row in table.rows], name=table.index[0])
    shown = table.shown_columns()
    titles = [column_title(c, markup) for c in shown]
    columns = pd.MultiIndex.from_tuples([(markup.escape(c.group or ""), title) for c, title
                                         in zip(shown, titles)]) if table.grouped \
        else pd.Index(titles)
    data = [[cell_text(table, row, column, markup) for column in shown] for row in table.rows]
    return pd.DataFrame(data, index=index, columns=columns)


def number_frame(table: Table) -> pd.DataFrame:
    """The table as numbers (for CSV), in full precision and scores as fractions, counts
    included even where constant: a score column becomes ``<title> mean`` and ``<title> std``,
    the rest keep their title; grouped columns are prefixed with the group."""
    records = []
    for row in table.rows:
        record = dict(zip(table.index, row))
        for column in table.columns:
            name = f"{column.group} {column.title}" if column.group is not None else column.title
            stat = table.values.get((row, column), Stat(math.nan))
            if column.kind == SCORE:
                record[f"{name} mean"], record[f"{name} std"] = stat.mean, stat.std
            elif column.kind == COUNT:
                record[name] = None if pd.isna(stat.mean) else int(stat.mean)
            else:
                record[name] = stat.mean
        records.append(record)
    return pd.DataFrame(records)


# A LaTeX table shows at most this many value columns (about 480 pt at 10 pt type: two methods'
# BAC, GM, FM and n); a wider grouped table is split into tables of whole column groups
# (methods, or Table I's datasets) rather than shrunk (``latex_parts``).
LATEX_MAX_VALUE_COLUMNS = 8


def latex_parts(table: Table) -> list[Table]:
    """The table as LaTeX shows it: itself, or where it is grouped and has more than
    ``LATEX_MAX_VALUE_COLUMNS`` columns to show, one table per run of consecutive column
    groups that fits, titled "(part i of k)"; rows and bold marks stay those of the whole."""
    shown = table.shown_columns()
    if not table.grouped or len(shown) <= LATEX_MAX_VALUE_COLUMNS:
        return [table]
    groups = list(dict.fromkeys(column.group for column in shown))
    per_part = max(1, LATEX_MAX_VALUE_COLUMNS // (len(shown) // len(groups)))
    chunks = [groups[i:i + per_part] for i in range(0, len(groups), per_part)]
    return [dataclasses.replace(table, stem=f"{table.stem}-{number}",
                                title=f"{table.title} (part {number} of {len(chunks)})",
                                columns=[c for c in table.columns if c.group in chunk])
            for number, chunk in enumerate(chunks, start=1)]


def latex_text(table: Table) -> str:
    """A table's ``.tex``: one float per part (``latex_parts``)."""
    return "\n".join(latex_table(text_frame(part, LATEX), part.caption_text(LATEX),
                                  f"tab:{part.stem}") for part in latex_parts(table))


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` float of already formatted and escaped cells, ready to ``\\input``
    (needs ``\\usepackage{booktabs}``).  Two-level columns (groups of equal width) get a
    spanning header per group; with two-level rows, the outer label is written once per block
    and blocks are ruled apart."""
    index_names = [n or "" for n in frame.index.names]
    grouped = isinstance(frame.columns, pd.MultiIndex)
    sub_titles = list(frame.columns.get_level_values(-1))
    lines = ["% Generated by python -m benchmark.report; regenerate rather than edit.",
             r"\begin{table}[htbp]", r"\centering", rf"\caption{{{caption}}}",
             rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{'l' * len(index_names)}{'c' * len(sub_titles)}}}",
             r"\toprule"]
    if grouped:
        groups = list(dict.fromkeys(frame.columns.get_level_values(0)))
        width = len(sub_titles) // len(groups)
        lines.append(" & " * len(index_names) + " & ".join(
            rf"\multicolumn{{{width}}}{{c}}{{{g}}}" for g in groups) + r" \\")
        first = len(index_names) + 1
        lines.append(" ".join(rf"\cmidrule(lr){{{first + i * width}-{first + (i + 1) * width - 1}}}"
                              for i in range(len(groups))))
    lines.append(" & ".join(index_names + sub_titles) + r" \\")
    lines.append(r"\midrule")
    previous = None
    for keys, row in frame.iterrows():
        keys = list(keys) if isinstance(keys, tuple) else [keys]
        if len(keys) > 1:
            if previous is not None and keys[0] != previous:
                lines.append(r"\midrule")
            shown = [""] + keys[1:] if keys[0] == previous else keys
            previous = keys[0]
        else:
            shown = keys
        lines.append(" & ".join([str(k) for k in shown] + [str(v) for v in row]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame, title: str, caption: str) -> str:
    """A heading, the caption and a GitHub-style table (grouped columns as ``method BAC``)."""
    flat = frame.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [f"{group} {sub}" for group, sub in flat.columns]
    flat = flat.reset_index()
    body = tabulate(flat, headers="keys", tablefmt="github", showindex=False,
                    disable_numparse=True)
    return f"### {title}\n\n{caption}\n\n{body}\n"


# Captions -------------------------------------------------------------------------------------
def score_caption(gm_form: str, experiments: list[str], best: str,
                  notes: list[tuple[str, list[tuple[str, str]]]], block: str = "",
                  times: dict[str, str] | None = None, reference: str = DEFAULT_REFERENCE
                  ) -> Callable[[Markup, Table], str]:
    def caption(markup: Markup, table: Table) -> str:
        esc = markup.escape
        where = {"row": "row and metric", "column": "column",
                 "block": f"{block} and column"}[best]
        runtime = ""
        if times:
            stages = "; ".join(f"{esc(title)}: mean seconds of the stage "
                               f"{esc(schema.stage_of(metric))}"
                               for title, metric in times.items() if metric != TOTAL_TIME)
            runtime = (f" {stages} (a dash: the method has none); Total (s): the sum of the "
                       f"stages each run logged, as if computed from scratch (a reused stage "
                       f"counts the time of the run that computed it); "
                       f"{esc(ratio_title(reference))}: that total divided by "
                       f"{esc(reference)}'s for the same {block or 'setting'} and loss.")
        settings = "".join(f" Settings per {esc(header)}: " + "; ".join(
            f"{esc(label)}: {esc(text)}" for label, text in entries) + "."
            for header, entries in notes)
        n = table.constant_n
        if n == 1:
            spread = "Scores in percent, from one seed per cell."
        elif n:
            spread = (f"Scores in percent: mean{markup.plus_minus}standard deviation over the "
                      f"{n} seeds of each cell.")
        else:
            spread = (f"Scores in percent: mean{markup.plus_minus}standard deviation over "
                      f"seeds (the mean alone for a single seed); {markup.seeds_header}: "
                      f"number of seeds.")
        return (f"{spread} BAC: balanced accuracy; GM: {esc(GM_FORMS[gm_form][1])}; FM: macro "
                f"F1. Best mean per {where} in bold; a dash: no finished run.{runtime}"
                f"{settings} {experiments_text(experiments, markup)}")
    return caption


def runtime_caption(experiments: list[str], reference: str) -> Callable[[Markup, Table], str]:
    def caption(markup: Markup, table: Table) -> str:
        esc = markup.escape
        n = table.constant_n
        runs = (f"{markup.seeds_header}: number of runs" if n is None else
                f"each row averages {n} run{'s' if n > 1 else ''}")
        return (f"Mean seconds per stage the runs logged; Total: the sum of the stages each "
                f"run logged, as if computed from scratch (a reused phase 1 counts the time of "
                f"the run that trained it, not its loading); {esc(ratio_title(reference))}: "
                f"the method's total divided by {esc(reference)}'s total for the same loss "
                f"(above 1: slower than {esc(reference)}; a dash where there is no single "
                f"{esc(reference)} cell to compare with); {runs}. "
                f"{experiments_text(experiments, markup)}")
    return caption


def experiments_text(experiments: list[str], markup: Markup) -> str:
    plural = "s" if len(experiments) > 1 else ""
    return f"MLflow experiment{plural}: {markup.escape(', '.join(experiments))}."


# The report -----------------------------------------------------------------------------------
@dataclass
class Report:
    """Aggregated runs of one report, ready to render.

    How runs are grouped (``GROUPING_NOTE`` says it to the user): a cell per setting, that is
    ``TABLE_KEYS`` (dataset, backbone with its ``backbone.*`` parameters, profile, ratio) plus
    ``TRAINING_SETTINGS`` (epochs, learning rate, device, ...), x loss label x method label,
    labels carrying every ``loss.*`` / ``method.*`` parameter logged, so eos with K=3 is a
    cell of its own.  Seeds are what a cell averages over; a seed run twice counts once (its
    latest run, ``latest_per_seed``).  The ``layout`` decides how cells make score tables;
    runtime tables and figures are per setting.  ``prefix`` starts every file name.  Runtime
    tables divide every total by the ``reference`` method's; ``stages`` are the stage times
    the runs logged, in pipeline order; ``orders`` sorts rows and columns; ``digits``: the
    decimals of the scores (shown in percent).
    """

    runs: pd.DataFrame
    scores: pd.DataFrame
    runtimes: pd.DataFrame
    experiments: list[str]
    gm_form: str
    layout: Layout
    prefix: str
    reference: str
    stages: list[str]
    orders: Orders
    digits: int = DEFAULT_DIGITS

    @classmethod
    def build(cls, runs: pd.DataFrame, experiments: list[str], gm_form: str,
              layout: Layout = GENERIC, prefix: str = "", reference: str = DEFAULT_REFERENCE,
              methods: tuple[str, ...] | None = None,
              groups: dict[str, tuple[str, ...]] | None = None,
              digits: int = DEFAULT_DIGITS) -> "Report":
        """``methods``: their order (a grid's), else ``method_order``; ``groups``: row group
        name -> its methods, for layouts with a group level (without, that level is left
        out); a method in no group gets the group ""."""
        group_of = {method: name for name, members in (groups or {}).items()
                    for method in members}
        runs = runs.assign(**{GROUP_FIELD: runs["method"].map(lambda m: group_of.get(m, ""))})
        runs = with_total_time(latest_per_seed(runs))
        stages = stage_metrics(runs.columns)
        # A paper table's file is named after it even without a grid to name the report.
        prefix = prefix or ("" if layout.name == GENERIC.name else layout.name)
        orders = report_orders(methods or method_order(runs["method"], reference),
                               tuple(groups or ()))
        times = list(time_columns(layout).values())
        return cls(runs, aggregate(runs, list(score_metrics(gm_form).values()) + times),
                   aggregate(runs, stages + [TOTAL_TIME]), experiments, gm_form,
                   layout if groups else layout.without_groups(), prefix, reference, stages,
                   orders, digits)

    def score_tables(self) -> list[Table]:
        tables = []
        levels = self.layout.rows + ((self.layout.group,) if self.layout.group else ())
        for piece in pieces(cells_of(self.scores), self.layout, self.prefix, self.orders):
            notes = [(level.header.lower(), level_settings_note(piece.cells, level, self.orders))
                     for level in levels if level.folded]
            caption = score_caption(self.gm_form, self.experiments, self.layout.best,
                                    [n for n in notes if n[1]],
                                    self.layout.rows[0].header.lower(),
                                    time_columns(self.layout), self.reference)
            tables.append(score_table(piece, self.layout, score_metrics(self.gm_form), caption,
                                      self.orders, self.digits, self.reference))
        return tables

    def runtime_tables(self) -> list[Table]:
        return [runtime_table(piece, self.stages, self.reference,
                              runtime_caption(self.experiments, self.reference), self.orders)
                for piece in pieces(cells_of(self.runtimes), RUNTIME, self.prefix, self.orders)]

    def tables(self) -> list[Table]:
        return self.score_tables() + self.runtime_tables()

    def settings(self) -> list[Piece]:
        """The report's settings (one per runtime table), for the figures."""
        return pieces(cells_of(self.scores), RUNTIME, self.prefix, self.orders)


# Figures --------------------------------------------------------------------------------------
FIGURE_FORMATS = ("png", "pdf")


@dataclass(frozen=True)
class Figure:
    """One figure of a report, written as ``<name>.png`` and ``<name>.pdf`` in ``folder``."""

    title: str
    folder: Path
    name: str

    @property
    def paths(self) -> list[Path]:
        return [self.folder / f"{self.name}.{suffix}" for suffix in FIGURE_FORMATS]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, figure: Figure) -> None:
    for path in figure.paths:
        fig.savefig(path, dpi=120)
    pyplot().close(fig)


def fitted_limits(low, high, bounds: tuple[float, float] = (0.0, 100.0)) -> tuple[float, float]:
    """Axis limits around values reaching from ``low`` to ``high`` (means less and plus their
    error bars, NaN ignored), clipped to ``bounds``, with a margin of 5% of the span (at least
    half a unit): recalls between 60 and 100% get an axis from about 58 to 102, not 0 to 100."""
    lows = [v for v in low if not math.isnan(v)] or [bounds[0]]
    highs = [v for v in high if not math.isnan(v)] or [bounds[1]]
    bottom, top = max(bounds[0], min(lows)), min(bounds[1], max(highs))
    margin = max(0.05 * (top - bottom), 0.5)
    return bottom - margin, top + margin


def error_bars(stats: list[Stat]) -> tuple[list[float], list[float]]:
    """Means and standard deviations in percent; a single seed's missing deviation is 0."""
    return ([percent(s.mean) for s in stats],
            [0.0 if pd.isna(s.std) else percent(s.std) for s in stats])


def k_curves(piece: Piece, metrics: dict[str, str]) -> dict[str, dict[str, list]]:
    """Per ``loss, method`` label with two or more logged K values: ``(K, Stat)`` per metric
    title, as ``{label: {title: [(K, Stat), ...]}}``."""
    curves: dict[str, dict] = {}
    for key, row in piece.cells:
        if key["K"] == "":
            continue  # the method's default K: no value to place on the axis
        label = f"{key['loss_label']}, {key['method_variant']}"
        curve = curves.setdefault(label, {title: [] for title in metrics})
        for title, metric in metrics.items():
            curve[title].append((float(key["K"]), Stat(row[(metric, "mean")],
                                                       row[(metric, "std")])))
    return {label: {title: sorted(points, key=lambda p: p[0]) for title, points in curve.items()}
            for label, curve in curves.items() if len(next(iter(curve.values()))) > 1}


def k_figure(curves: dict, title: str):
    """A panel per metric: the metric (percent) against K, a line per loss and method, error
    bars over seeds, the y axis fitted to the data."""
    plt = pyplot()
    titles = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles), 3.8), squeeze=False,
                             layout="constrained")
    for ax, metric_title in zip(axes[0], titles):
        lows, highs = [], []
        for label, curve in curves.items():
            points = curve[metric_title]
            means, errors = error_bars([s for _, s in points])
            ax.errorbar([k for k, _ in points], means, yerr=errors, marker="o", capsize=3,
                        label=label)
            lows += [m - e for m, e in zip(means, errors)]
            highs += [m + e for m, e in zip(means, errors)]
        ks = sorted({k for curve in curves.values() for k, _ in curve[metric_title]})
        if ks[-1] >= 10 * ks[0]:  # the paper's K run from 10 to 300
            ax.set_xscale("log")
        ax.set_xticks(ks, [f"{k:g}" for k in ks])
        ax.minorticks_off()
        ax.set_ylim(*fitted_limits(lows, highs))
        ax.set_title(metric_title, fontsize=10)
        ax.set_xlabel("K (nearest neighbours)")
        ax.set_ylabel(f"test {metric_title} (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8,
               ncol=max(1, min(len(labels), len(titles) * 3)))
    fig.suptitle(f"{title}\nmean over seeds; error bars: standard deviation over seeds",
                 fontsize=10)
    return fig


def recall_by_class(runs: pd.DataFrame, piece: Piece, orders: Orders):
    """``(classes, their training counts, {loss: {method: [Stat per class]}})`` for one
    setting, classes sorted by training size (largest first), mean and standard deviation of
    the recall over seeds; None when its runs logged no per-class recall."""
    mine = runs
    for field, value in piece.values.items():
        mine = mine[mine[field].isna()] if pd.isna(value) else mine[mine[field] == value]
    # Other settings' datasets may have more classes: keep the columns this one logged.
    classes = sorted(int(c[len(RECALL_PREFIX):]) for c in mine.columns
                     if c.startswith(RECALL_PREFIX) and mine[c].notna().any())
    if not classes:
        return None
    counts_text = mine["train_class_counts"].dropna()
    logged = json.loads(counts_text.iloc[0]) if len(counts_text) else []
    counts = {c: logged[c] if c < len(logged) else 0 for c in classes}
    order = sorted(classes, key=lambda c: (-counts[c], c))
    columns = [f"{RECALL_PREFIX}{c}" for c in order]
    grouped = mine.groupby(["loss_label", "method_label"])[columns]
    means, stds = grouped.mean(), grouped.std(ddof=1)
    by_loss: dict[str, dict[str, list[Stat]]] = {}
    for (loss, method), row in sorted(means.iterrows(), key=lambda item: (
            orders.key("loss_label", item[0][0]), orders.key("method_label", item[0][1]))):
        spread = stds.loc[(loss, method)]
        by_loss.setdefault(loss, {})[method] = [Stat(row[c], spread[c]) for c in columns]
    return order, [counts[c] for c in order], by_loss


def recall_figure(order: list[int], counts: list[int], by_loss: dict, title: str):
    """A panel per loss: test recall (percent) per class, a line per method, side by side so
    that error bars over seeds do not hide each other; one y axis fitted to all panels."""
    plt = pyplot()
    width = min(16.0, max(6.0, 0.3 * len(order)))
    fig, axes = plt.subplots(len(by_loss), 1, figsize=(width, 1.0 + 3.0 * len(by_loss)),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    # One colour per method in every panel, and one legend for them all.
    colours = {method: f"C{number % 10}" for number, method in enumerate(
        dict.fromkeys(method for methods in by_loss.values() for method in methods))}
    lows, highs, handles = [], [], {}
    for ax, (loss, methods) in zip(axes[:, 0], by_loss.items()):
        spread = 0.5 / len(methods)
        for number, (method, stats) in enumerate(methods.items()):
            means, errors = error_bars(stats)
            shift = (number - (len(methods) - 1) / 2) * spread
            handles[method] = ax.errorbar(
                [i + shift for i in range(len(order))], means, yerr=errors, marker="o",
                markersize=3, capsize=2, linewidth=1, color=colours[method], label=method)
            lows += [m - e for m, e in zip(means, errors)]
            highs += [m + e for m, e in zip(means, errors)]
        ax.set_title(f"loss {loss}", fontsize=9)
        ax.set_ylabel("test recall (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(*fitted_limits(lows, highs))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=8,
               ncol=max(1, min(len(handles), int(width // 1.5))))
    step = max(1, len(order) // 25)  # CIFAR-100's 100 classes stay legible
    axes[-1, 0].set_xticks(range(len(order))[::step],
                           [f"{c}\n({n})" for c, n in zip(order, counts)][::step], fontsize=7)
    axes[-1, 0].set_xlabel("class (training images), largest class first")
    fig.suptitle(f"{title}\nmean over seeds; error bars: standard deviation over seeds",
                 fontsize=10)
    return fig


def write_figures(report: Report, out: Path) -> list[Figure]:
    """K sensitivity (where runs differ in K) and per-class recall, per setting, each as PNG
    and PDF."""
    written = []
    metrics = score_metrics(report.gm_form)
    for piece in report.settings():
        curves = k_curves(piece, metrics)
        if curves:
            figure = Figure(f"Sensitivity to K: {piece.setting}", out,
                            figure_stem(report, "k-sensitivity", piece.slug))
            save_figure(k_figure(curves, figure.title), figure)
            written.append(figure)
        recall = recall_by_class(report.runs, piece, report.orders)
        if recall is not None:
            figure = Figure(f"Per-class test recall: {piece.setting}", out,
                            figure_stem(report, "recall", piece.slug))
            save_figure(recall_figure(*recall, figure.title), figure)
            written.append(figure)
    return written


def figure_stem(report: Report, kind: str, slug: str) -> str:
    return "-".join(part for part in (report.prefix, kind, slug) if part)


# The PDF of all tables ------------------------------------------------------------------------
# A page with 2 cm margins and 4 pt column padding holds a table of LATEX_MAX_VALUE_COLUMNS
# columns with long row labels; a document of tables alone lets floats fill whole pages, and
# is flushed every few floats (LaTeX holds at most 18 pending).
PDF_PREAMBLE = r"""\documentclass[a4paper,10pt]{article}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\setlength{\tabcolsep}{4pt}
\setcounter{totalnumber}{8}\setcounter{topnumber}{8}\setcounter{bottomnumber}{8}
\renewcommand{\topfraction}{1}\renewcommand{\bottomfraction}{1}
\renewcommand{\textfraction}{0}\renewcommand{\floatpagefraction}{0.6}
"""
PDF_FLOATS_PER_FLUSH = 6
PDFLATEX_SECONDS = 120


def tables_pdf(tex_files: list[Path], title: str, path: Path) -> Path | None:
    """Every table of ``tex_files`` in one document, compiled with pdflatex to ``path``;
    None, with a one-line note on stderr, where pdflatex is missing or fails (the ``.tex``
    files stand either way)."""
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        print("note: pdflatex not found: the tables are not compiled into a PDF (the .tex "
              "files are written)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        body, pending = [rf"\section*{{{latex_escape(title)}}}"], 0
        for number, source in enumerate(tex_files):
            # Plain names: \input stumbles over the dots that ratios put in file names.
            shutil.copy(source, Path(tmp, f"table{number}.tex"))
            body.append(rf"\input{{table{number}.tex}}")
            pending += source.read_text().count(r"\begin{table}")
            if pending >= PDF_FLOATS_PER_FLUSH:
                body.append(r"\clearpage")
                pending = 0
        Path(tmp, "tables.tex").write_text(
            PDF_PREAMBLE + "\\begin{document}\n" + "\n".join(body) + "\n\\end{document}\n")
        try:
            result = subprocess.run(
                [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape",
                 "tables.tex"], cwd=tmp, capture_output=True, text=True,
                timeout=PDFLATEX_SECONDS)
            failure = None if result.returncode == 0 else next(
                (line for line in result.stdout.splitlines() if line.startswith("!")),
                f"exit status {result.returncode}")
        except subprocess.TimeoutExpired:
            failure = f"no result within {PDFLATEX_SECONDS} s"
        if failure is not None:
            print(f"note: pdflatex could not compile the tables ({failure}); no PDF written",
                  file=sys.stderr)
            return None
        shutil.copy(Path(tmp, "tables.pdf"), path)
    return path


# Output ---------------------------------------------------------------------------------------
def markdown_text(tables: list[Table], figures: list[Figure],
                  files: list[tuple[str, Path]]) -> str:
    """Every table, every figure (its PNG) and links to ``files`` (``(what, path)``), all
    linked by bare file name: the markdown lies next to them on disk and in MLflow."""
    parts = [markdown_table(text_frame(t, MARKDOWN), t.title, t.caption_text(MARKDOWN))
             for t in tables]
    parts += [f"### {figure.title}\n\n![{figure.title}]({figure.paths[0].name})\n"
              for figure in figures]
    if files:
        parts.append("### Files\n\n" + "\n".join(f"- {what}: [{path.name}]({path.name})"
                                                 for what, path in files) + "\n")
    return "\n".join(parts)


def write_aggregates(report: Report, out: Path) -> list[Path]:
    """Every cell's aggregates, one row per cell, columns ``<metric>_<mean|std|count>`` and
    ``runs_n``: ``scores.csv`` and ``runtime.csv``."""
    written = []
    for name, summary in (("scores", report.scores), ("runtime", report.runtimes)):
        flat = summary.copy()
        flat.columns = [f"{metric}_{stat}" for metric, stat in flat.columns]
        path = out / f"{report_file(report, name)}.csv"
        flat.reset_index().to_csv(path, index=False)
        written.append(path)
    return written


def report_file(report: Report, name: str) -> str:
    return "-".join(part for part in (report.prefix, name) if part)


def run_list(report: Report) -> list[dict]:
    """The runs a report summarised (the latest of each cell and seed): id, experiment, the
    cell (its ``cell`` tag, or its labels for runs logged without one) and seed."""
    runs = report.runs.sort_values(["experiment", "run_id"])
    labels = (runs["dataset"] + "/" + runs["profile"] + runs["ratio"].map("{:g}".format) + "/"
              + runs["backbone_label"] + "/" + runs["loss_label"] + "/" + runs["method_label"])
    return [{"run_id": run_id, "experiment": experiment, "cell": cell,
             "seed": None if pd.isna(seed) else int(seed)}
            for run_id, experiment, cell, seed in zip(
                runs["run_id"], runs["experiment"],
                runs.get("cell", pd.Series(None, index=runs.index, dtype=object)).fillna(labels),
                runs["seed"])]


def write_run_list(report: Report, out: Path) -> Path:
    """``runs.json``: ``{"count": n, "runs": run_list(report)}``."""
    path = out / f"{report_file(report, 'runs')}.json"
    entries = run_list(report)
    path.write_text(json.dumps({"count": len(entries), "runs": entries}, indent=1) + "\n")
    return path


def report_title(report: Report) -> str:
    what = f"Report {report.prefix}" if report.prefix else "Report"
    return f"{what}: {experiments_text(report.experiments, MARKDOWN)[:-1]}"


def write_report(report: Report, out: Path, formats: tuple[str, ...],
                 analysis: bool = False) -> tuple[list[Path], str]:
    """Write under ``out`` the figures, every table in ``formats`` (with LaTeX, also the PDF
    of them all where pdflatex exists) and ``runs.json``; returns the files (tables first,
    then the markdown, the PDF, the run list and the figures) and the markdown text ('' unless
    asked for).  Every file lies flat in ``out``, which is how the report run logs them, so
    that the markdown's links work on disk and in MLflow alike."""
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(report, out)
    if analysis:
        from benchmark.analysis import analysis_figures

        figures += [Figure(title, path.parent, path.stem)
                    for title, path in analysis_figures(report.runs, out, report.prefix)]
    tables = report.tables()
    written: list[Path] = []
    tex_files: list[Path] = []
    for table in tables:
        if "latex" in formats:
            path = out / f"{table.stem}.tex"
            path.write_text(latex_text(table))
            tex_files.append(path)
        if "csv" in formats:
            path = out / f"{table.stem}.csv"
            number_frame(table).to_csv(path, index=False)
            written.append(path)
    written = tex_files + written
    if "csv" in formats:
        written += write_aggregates(report, out)
    extras = [("the runs summarised (MLflow run ids)", write_run_list(report, out))]
    if tex_files:
        pdf = tables_pdf(tex_files, report_title(report),
                         out / f"{report_file(report, 'tables')}.pdf")
        if pdf is not None:
            extras.insert(0, ("every table as a PDF", pdf))
    markdown = ""
    if "markdown" in formats:
        markdown = markdown_text(tables, figures, extras)
        path = out / f"{report.prefix or 'report'}.md"
        path.write_text(markdown)
        written.append(path)
    return written + [path for _, path in extras] + [
        path for figure in figures for path in figure.paths], markdown


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} '{value}'; valid: {', '.join(choices)}")
    return value


GROUPING_NOTE = (
    "Runs are never averaged across settings: each dataset x backbone (with its parameters) x "
    "profile x ratio x training setting (epochs, lr, device, ...) x loss x method (each with "
    "the parameters its runs logged: eos and 'eos (K=3)' are separate) is a cell, averaged over "
    "seeds; only the latest run of a cell and seed counts, and runs of several experiments "
    "with one setting share cells; without --experiment or --grid, every experiment of the "
    "store that holds cells is reported.  Generic layout: a table per setting, rows loss, columns "
    "method.  --grid with a spec named table1 / table2 / table3 / table4 / table5 (or "
    "table3-smoke and the like) picks the paper's layout; methods then come in the spec's "
    "order (else alphabetically, the reference last), Tables I and III group their rows by "
    "the spec's `groups:`, and Table III shows the generator's and total seconds beside the "
    "scores.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.report", epilog=GROUPING_NOTE,
        description="Tables and figures of the finished runs in the MLflow store "
                    "(MLFLOW_TRACKING_URI): BAC / GM / FM by loss x method (or a paper "
                    "table's layout), runtime per stage, K sensitivity and per-class recall; "
                    f"the files are also logged to a run of the experiment "
                    f"'{REPORT_EXPERIMENT}'.")
    parser.add_argument("--experiment", action="append", dest="experiments", metavar="NAME",
                        help="experiment to report; repeat for several; default: the grid's "
                             "experiment with --grid, else every experiment that holds "
                             "finished benchmark cells")
    parser.add_argument("--grid", metavar="SPEC",
                        help="grid spec (YAML): report only its cells (runs tagged with one "
                             "of its cell keys), from its experiment, methods in its order; "
                             "specs named table1 to table5 (or table3-smoke and the like) get "
                             "the paper's layout")
    parser.add_argument("--analysis", action="store_true",
                        help="add the diagnostics' figures across the runs (gap against "
                             "imbalance ratio, top-K coverage by class size, weight norms); a "
                             "grid spec turns them on with `analysis: true`")
    parser.add_argument("--reference", metavar="METHOD",
                        help="method whose total time the runtime tables divide each total "
                             "by (column 'vs METHOD'; a dash in a table without it); default: "
                             f"the grid spec's `reference:` with --grid, else "
                             f"{DEFAULT_REFERENCE}")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the files; default {DEFAULT_OUT}/")
    parser.add_argument("--format", default=DEFAULT_FORMAT,
                        help="all (default: .tex, .md and .csv), latex (one .tex per table, "
                             "and tables.pdf of them all where pdflatex exists), markdown "
                             "(printed, and written as one .md) or csv (one .csv per table "
                             "plus every cell's aggregates); figures (PNG and PDF) and "
                             "runs.json always")
    parser.add_argument("--digits", default=str(DEFAULT_DIGITS),
                        help=f"decimals of the scores, which the LaTeX and markdown tables "
                             f"show in percent; default {DEFAULT_DIGITS} (89.8); the CSV "
                             f"files keep full precision")
    parser.add_argument("--gm", default="macro",
                        help="GM shown: macro (test/gm_macro, the EOS paper's) or multiclass "
                             "(test/gm, per-class geometric mean); default macro")
    parser.add_argument("--no-log", action="store_true",
                        help=f"do not log the report as a run of the experiment "
                             f"'{REPORT_EXPERIMENT}'")
    return parser


@dataclass
class Scope:
    """Which runs a report covers (``experiments`` None: every experiment holding cells) and
    how it lays them out."""

    experiments: list[str] | None
    cell_keys: set[str] | None = None
    grid: str | None = None
    layout: Layout = GENERIC
    reference: str = DEFAULT_REFERENCE
    methods: tuple[str, ...] | None = None  # their order; None: ``method_order``
    groups: dict[str, tuple[str, ...]] | None = None  # row group -> its methods
    analysis: bool = False  # the diagnostics' figures across the runs (benchmark.analysis)


def scope_of(args: argparse.Namespace) -> Scope:
    """The runs and layout of a report: an experiment's runs, or a grid's cells with its
    layout (after its name), its order of methods and its ``reference`` and ``groups`` keys;
    ``--reference`` overrides the spec's."""
    experiments = [e for e in dict.fromkeys(args.experiments or []) if e != UNSET]
    reference = None if args.reference in (None, "", UNSET) else args.reference
    if args.grid in (None, "", UNSET):
        return Scope(experiments or None, reference=reference or DEFAULT_REFERENCE)
    from benchmark.studies import Grid, cell_key, read_spec

    grid = Grid.from_spec(args.grid)
    spec = read_spec(args.grid)
    keys = {cell_key(cfg) for cfg in grid.cells}
    methods = tuple(dict.fromkeys(cfg.method for cfg in grid.cells))
    return Scope(experiments or [grid.experiment], keys, grid.name, layout_of(grid.name),
                 reference or spec_reference(spec, methods, args.grid), methods,
                 spec_groups(spec, methods, args.grid), bool(spec.get("analysis", False)))


def layout_of(grid_name: str) -> Layout:
    """A grid named after a paper table (``table3``), or a smaller version of one named
    ``<table>-<anything>`` (``table3-smoke``), gets that table's layout; others the generic."""
    return PAPER_LAYOUTS.get(grid_name) or PAPER_LAYOUTS.get(grid_name.split("-")[0], GENERIC)


def spec_reference(spec: dict, methods: tuple[str, ...], where: str) -> str:
    """A grid spec's ``reference:`` (one of its methods), else ``DEFAULT_REFERENCE``."""
    reference = spec.get("reference", DEFAULT_REFERENCE)
    if "reference" in spec and reference not in methods:
        raise UserError(f"{where}: reference '{reference}' is none of the grid's methods "
                        f"({', '.join(methods)})")
    return reference


def spec_groups(spec: dict, methods: tuple[str, ...], where: str) -> dict | None:
    """A grid spec's ``groups:``, row group name -> its methods, in the spec's order; every
    method of the grid in exactly one group.  None without the key."""
    groups = spec.get("groups")
    if groups is None:
        return None
    if not isinstance(groups, dict) or not groups or not all(
            isinstance(members, list) and all(isinstance(m, str) for m in members)
            for members in groups.values()):
        raise UserError(f"{where}: groups must map each row group's name to a list of methods")
    listed = [m for members in groups.values() for m in members]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    if twice:
        raise UserError(f"{where}: groups list {', '.join(twice)} in more than one group")
    stray = [m for m in listed if m not in methods]
    if stray:
        raise UserError(f"{where}: groups name {', '.join(stray)}, which the grid does not run "
                        f"(its methods: {', '.join(methods)})")
    missing = [m for m in methods if m not in listed]
    if missing:
        raise UserError(f"{where}: method(s) {', '.join(missing)} of the grid are in no group "
                        f"of groups")
    return {str(name): tuple(members) for name, members in groups.items()}


def check_digits(text: str) -> int:
    if text in (UNSET, ""):
        return DEFAULT_DIGITS
    if not text.isdigit() or int(text) > MAX_DIGITS:
        raise UserError(f"--digits must be a whole number from 0 to {MAX_DIGITS}, not '{text}'")
    return int(text)


def make_report(args: argparse.Namespace) -> int:
    output_format = check_choice(DEFAULT_FORMAT if args.format == UNSET else args.format,
                                 tuple(FORMATS), "format")
    gm_form = check_choice(args.gm, tuple(GM_FORMS), "GM form")
    digits = check_digits(args.digits)
    tracking.prepare_store(write=not args.no_log)  # one clear line if the store is unusable
    scope = scope_of(args)
    runs = gather_runs(scope.experiments, scope.cell_keys, scope.grid)
    experiments = scope.experiments or sorted(set(runs["experiment"]))
    report = Report.build(runs, experiments, gm_form, scope.layout, scope.grid or "",
                          scope.reference, scope.methods, scope.groups, digits)
    # With markdown on stdout, everything else goes to stderr so that it can be piped.
    notes = sys.stderr if output_format == "markdown" else sys.stdout
    if len(report.runs) < len(runs):
        print(f"note: {len(runs) - len(report.runs)} older run(s) repeat a cell and seed and "
              f"are left out", file=sys.stderr)
    if scope.reference not in set(report.runs["method"]):
        print(f"note: no run of the reference method '{scope.reference}': the runtime tables' "
              f"'{ratio_title(scope.reference)}' column is a dash (choose one with --reference)",
              file=sys.stderr)
    written, markdown = write_report(report, Path(args.out), FORMATS[output_format],
                                     analysis=args.analysis or scope.analysis)
    if output_format == "markdown":
        print(markdown, end="")
    for path in written:
        print(f"wrote {path}", file=notes)
    if not args.no_log:
        name = f"report {scope.grid or ', '.join(experiments)}"
        run_id = tracking.log_report(
            REPORT_EXPERIMENT, {"": written},  # flat, as on disk: the markdown's links hold
            params={"experiments": ",".join(experiments)[:MAX_PARAM_CHARS],
                    "grid_spec": "" if args.grid in (None, UNSET) else args.grid,
                    "grid_name": scope.grid or "", "layout": scope.layout.name, "gm": gm_form,
                    "format": output_format, "digits": digits, "runs": len(report.runs),
                    "reference": scope.reference},
            # No `grid` tag: that one marks a grid's cells.
            tags={TAG_ROLE: REPORT_ROLE}, run_name=name[:MAX_PARAM_CHARS],
            description=report_description(report, written),
            experiment_description=REPORTS_DESCRIPTION)
        print(f"logged the report as run {run_id} in experiment {REPORT_EXPERIMENT}",
              file=notes)
    return 0


# MLflow keeps at most 6000 characters of a parameter.
MAX_PARAM_CHARS = 6000


def report_description(report: Report, files: list[Path]) -> str:
    """The report run's note (markdown): what it summarised and where to look."""
    names = [path.name for path in files]
    look = [f"`{name}`" for name in names if name.endswith((".md", "tables.pdf"))]
    return (f"**{report_title(report)}**\n\n{len(report.runs)} runs summarised "
            f"({len(report.scores)} cells), their ids in "
            f"`{report_file(report, 'runs')}.json`. "
            + (f"Start with {' and '.join(look)}." if look else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return make_report(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
