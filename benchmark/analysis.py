"""The papers' embedding analyses across a grid: gap by ratio, top-K coverage, weight norms.

Figures from the metrics the diagnostics log into every cell (``benchmark.diagnostics``), read
back from MLflow through the report's gathering (``benchmark.report.gather_runs``), means
over seeds:

- ``gap-vs-ratio``: the generalization gap (``gap/overall``, ``gap/tp``, ``gap/fp``) against
  the imbalance ratio, a line per loss and method, for every setting that ran two or more
  ratios (EOS paper, Fig. 3 and 4, across ratios);
- ``topk-by-class-size``: per-class top-K coverage of the training set against the class's
  training images, a panel per K (fragility paper, Fig. 3), a line per loss and method;
- ``weight-norms``: per-class weight norms of the final head, classes largest first, a line
  per loss and method (EOS paper's norm analysis; fragility paper RQ5).

``python -m benchmark.analysis --grid studies/smoke-analysis.yaml`` writes them for a grid
(``--experiment NAME`` for all runs of an experiment); the report calls ``analysis_figures``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.diagnostics_measures import COVERAGE_KS
from benchmark.errors import UserError
from benchmark.report import (GROUP_FIELD, SETTING_KEYS, TRAINING_SETTINGS, field_text,
                              latest_per_seed, pyplot, slug_part, slugify)

GAP_METRICS = {"gap/overall": "gap of the head's training set", "gap/tp": "gap of test TP",
               "gap/fp": "gap of test FP"}
COVERAGE_SET = "train"
DEFAULT_OUT = "reports/analysis"


def analysis_figures(runs: pd.DataFrame, out: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Write the analysis figures of ``runs`` (``report.gather_runs``'s tidy frame: one row
    per finished cell run) into ``out`` as PNGs named ``[prefix-]kind-setting.png``; returns
    ``(title, path)`` of each, in the report's figure form.  Runs that logged no diagnostics
    give no figure; the latest run of each cell and seed counts once."""
    out.mkdir(parents=True, exist_ok=True)
    if GROUP_FIELD not in runs:  # the report adds a spec's row groups; none here
        runs = runs.assign(**{GROUP_FIELD: ""})
    runs = latest_per_seed(runs).assign(line=line_labels)
    written: list[tuple[str, Path]] = []
    vary = [f for f in TRAINING_SETTINGS if runs[f].nunique(dropna=False) > 1]
    without_ratio = [k for k in SETTING_KEYS if k != "ratio"]
    for values, group in runs.groupby(without_ratio, dropna=False, sort=True):
        setting = dict(zip(without_ratio, values))
        if group["ratio"].nunique() >= 2 and any(m in group for m in GAP_METRICS):
            title, stem = describe(setting, vary)
            path = out / figure_name(prefix, "gap-vs-ratio", stem)
            if plot_gap_vs_ratio(group, f"Gap against imbalance ratio: {title}", path):
                written.append((f"Gap against imbalance ratio: {title}", path))
    for values, group in runs.groupby(list(SETTING_KEYS), dropna=False, sort=True):
        setting = dict(zip(SETTING_KEYS, values))
        counts = class_counts(group)
        if counts is None:
            continue
        title, stem = describe(setting, vary)
        for kind, heading, plot in (
                ("topk-by-class-size", "Top-K coverage by class size", plot_topk_by_size),
                ("weight-norms", "Weight norms by method", plot_weight_norms)):
            path = out / figure_name(prefix, kind, stem)
            if plot(group, counts, f"{heading}: {title}", path):
                written.append((f"{heading}: {title}", path))
    return written


def line_labels(runs: pd.DataFrame) -> pd.Series:
    """A line per method, prefixed with the loss where the runs hold several losses."""
    if runs["loss_label"].nunique() > 1:
        return runs["loss_label"] + ", " + runs["method_label"]
    return runs["method_label"]


def describe(setting: dict, vary: list[str]) -> tuple[str, str]:
    """A setting's title and file stem: dataset, profile, ratio, backbone, and the training
    settings that differ between the runs."""
    fields = [f for f in ("dataset", "profile", "ratio", "backbone_label") if f in setting]
    fields += [f for f in vary if f in setting]
    title = ", ".join(field_text(f, setting[f]) for f in fields)
    return title, slugify([slug_part(f, setting[f]) for f in fields])


def figure_name(prefix: str, kind: str, stem: str) -> str:
    return "-".join(part for part in (prefix, kind, stem) if part) + ".png"


def class_counts(runs: pd.DataFrame) -> list[int] | None:
    """The training images per class the runs of one setting logged (one list: a setting
    fixes the subset)."""
    logged = runs["train_class_counts"].dropna()
    return json.loads(logged.iloc[0]) if len(logged) else None


def seed_means(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per line: mean and sample std over seeds of ``columns`` (those the runs logged)."""
    present = [c for c in columns if c in runs and runs[c].notna().any()]
    if not present:
        return pd.DataFrame()
    return runs.groupby("line", sort=True)[present].agg(["mean", "std"])


def plot_gap_vs_ratio(runs: pd.DataFrame, title: str, path: Path) -> bool:
    present = [m for m in GAP_METRICS if m in runs and runs[m].notna().any()]
    if not present:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], present):
        stats = runs.groupby(["line", "ratio"], sort=True)[metric].agg(["mean", "std"])
        for line, curve in stats.groupby(level="line", sort=True):
            ratios = curve.index.get_level_values("ratio")
            ax.errorbar(ratios, curve["mean"], yerr=curve["std"].fillna(0.0), marker="o",
                        capsize=3, label=line)
        ratios = sorted(runs["ratio"].dropna().unique())
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("imbalance ratio")
        ax.set_ylabel(GAP_METRICS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}\nmean over seeds, error bars: sample standard deviation", fontsize=9)
    save(fig, path)
    return True


def plot_topk_by_size(runs: pd.DataFrame, counts: list[int], title: str, path: Path) -> bool:
    classes = range(len(counts))
    panels = {k: seed_means(runs, [f"class/topk_coverage_{COVERAGE_SET}_k{k}_{c}"
                                   for c in classes]) for k in COVERAGE_KS}
    panels = {k: frame for k, frame in panels.items() if not frame.empty}
    if not panels:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False,
                             sharey=True)
    for ax, (k, frame) in zip(axes[0], panels.items()):
        for line, row in frame.iterrows():
            points = sorted((counts[int(col.rsplit("_", 1)[1])], row[(col, "mean")])
                            for col in frame.columns.get_level_values(0).unique()
                            if np.isfinite(row[(col, "mean")]))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=line)
        if max(counts) >= 5 * max(1, min(counts)):
            ax.set_xscale("log")
        ax.set_title(f"K = {k}", fontsize=9)
        ax.set_xlabel("training images of the class")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-K coverage of the training set")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}\nper class, mean over seeds", fontsize=9)
    save(fig, path)
    return True


def plot_weight_norms(runs: pd.DataFrame, counts: list[int], title: str, path: Path) -> bool:
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    frame = seed_means(runs, [f"class/weight_norm_{c}" for c in order])
    if frame.empty:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.4 * len(order))), 3.8))
    logged = set(frame.columns.get_level_values(0))
    for line, row in frame.iterrows():
        positions = [i for i, c in enumerate(order) if f"class/weight_norm_{c}" in logged]
        values = [row[(f"class/weight_norm_{order[i]}", "mean")] for i in positions]
        ax.plot(positions, values, marker="o", markersize=3, label=line)
    step = max(1, len(order) // 25)
    ax.set_xticks(range(len(order))[::step],
                  [f"{c}\n({counts[c]})" for c in order][::step], fontsize=7)
    ax.set_xlabel("class (training images), largest first")
    ax.set_ylabel("norm of the class's weight row")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}\nfinal head, mean over seeds", fontsize=9)
    save(fig, path)
    return True


def save(fig, path: Path) -> None:
    """PNG at ``path`` and a PDF beside it (the report logs both)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".pdf"))
    pyplot().close(fig)


# Command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.analysis",
        description="The papers' embedding-analysis figures across a grid's (or experiments') "
                    "runs: gap against imbalance ratio, top-K coverage by class size, weight "
                    "norms by method.")
    parser.add_argument("--grid", help="a grid spec: its cells' runs in its experiment")
    parser.add_argument("--experiment", action="append", dest="experiments", default=[],
                        help="an experiment's runs (repeatable); with --grid: where to look")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    from benchmark import tracking
    from benchmark.report import gather_runs

    try:
        tracking.prepare_store(write=False)
        experiments, keys, name = args.experiments or None, None, None
        if args.grid:
            from benchmark.studies import Grid, cell_key

            grid = Grid.from_spec(args.grid)
            experiments = args.experiments or [grid.experiment]
            keys, name = {cell_key(cfg) for cfg in grid.cells}, grid.name
        elif not experiments:
            raise UserError("name a grid spec (--grid) or an experiment (--experiment)")
        written = analysis_figures(gather_runs(experiments, keys, name), Path(args.out),
                                   prefix=name or "")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print("note: the runs logged no diagnostics to draw (run them with the default "
              "--diagnostics)", file=sys.stderr)
    for _, path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
