"""Report generator: finished MLflow runs as score and runtime tables (LaTeX, markdown, CSV)."""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from tabulate import tabulate

from benchmark import tracking
from benchmark.errors import UserError

DEFAULT_EXPERIMENT = "eos-benchmark"
DEFAULT_OUT = "reports"
FORMATS = ("latex", "markdown", "csv")

# What a table is about; every combination gets tables of its own.  The backbone counts with
# its parameters (see ``tidy_runs``).
TABLE_KEYS = ("dataset", "backbone_label", "profile", "ratio")
# Training settings that also split tables (runs trained differently are never averaged), but
# are named in titles and file names only where the report's runs disagree on them.  The
# device is one because CPU and GPU timings do not mix (and AMP runs on CUDA only).
TRAINING_SETTINGS = ("epochs", "head_epochs", "batch_size", "lr", "image_size", "subset_seed",
                     "val_fraction", "device_used")
SETTING_KEYS = TABLE_KEYS + TRAINING_SETTINGS
# One cell of a score table: a setting, a loss with its parameters, a method with its parameters.
CELL_KEYS = SETTING_KEYS + ("loss", "loss_label", "method", "method_label")

GM_FORMS = {
    "macro": ("test_gm_macro", "imbalanced-learn's macro geometric mean, "
                               "sqrt(mean recall x mean specificity) (metric test_gm_macro)"),
    "multiclass": ("test_gm", "the geometric mean of the per-class recalls (metric test_gm)"),
}
F1_METRIC = "test_f1_macro"
BAC_METRIC = "test_bac"

PHASE_TIMES = {"Phase 1": "time_phase1_s", "Phase 2": "time_phase2_s",
               "Resampling": "time_resample_s", "Phase 3": "time_phase3_s"}
TOTAL_TIME = "time_total_s"
REFERENCE_METHOD = "eos"

# The paper's column order; methods it does not know follow alphabetically.
METHOD_ORDER = ("none", "smote", "bsmote", "balsvm", "eos-ref", "eos")
# Components whose logged parameters (``params.<group>.<name>``) join their label.
VARIANT_GROUPS = ("backbone", "loss", "method")
PARAM_ALIASES = {"k_neighbors": "K"}


# Gathering ------------------------------------------------------------------------------------
def gather_runs(experiments: list[str]) -> pd.DataFrame:
    """The finished runs of ``experiments`` as a tidy frame (see ``tidy_runs``); ``UserError``
    for an experiment the store lacks or when none of them holds a finished run."""
    known = tracking.experiment_names()
    unknown = sorted(set(experiments) - set(known))
    if unknown:
        raise UserError(f"unknown experiment {', '.join(map(repr, unknown))} in "
                        f"{tracking.tracking_uri()}; experiments there: "
                        f"{', '.join(known) or 'none'}")
    raw = tracking.finished_runs(experiments)
    # Only benchmark cells carry the phase-1 key; a study's or `mlflow run`'s parent run,
    # finished in the same experiment, holds no test scores.
    key = f"tags.{tracking.TAG_PHASE1_KEY}"
    cells = raw[raw[key].notna()] if key in raw else raw.iloc[0:0]
    if cells.empty:
        raise UserError(f"no finished runs in experiment {', '.join(map(repr, experiments))} "
                        f"({tracking.tracking_uri()})")
    return tidy_runs(cells)


def tidy_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``run_id``, ``experiment``, ``start_time``, the setting (``TABLE_KEYS``
    and ``TRAINING_SETTINGS``, as logged), ``backbone``, ``loss``, ``method``, ``seed``, the
    labels ``backbone_label`` / ``loss_label`` / ``method_label`` (the name plus every
    ``backbone.*`` / ``loss.*`` / ``method.*`` parameter the run logged, e.g. ``eos (K=3)``:
    variants of one method become separate columns), and every metric under its own name
    (``test_bac``, ``time_phase1_s``, ...)."""
    def param(name: str) -> pd.Series:
        column = f"params.{name}"
        return raw[column] if column in raw else pd.Series(None, index=raw.index, dtype=object)

    tidy = pd.DataFrame({"run_id": raw["run_id"], "experiment": raw["experiment"],
                         "start_time": raw["start_time"]})
    for name in ("dataset", "profile", "ratio") + TRAINING_SETTINGS + VARIANT_GROUPS:
        tidy[name] = param(name).fillna("").astype(str)
    tidy["ratio"] = pd.to_numeric(tidy["ratio"], errors="coerce")
    tidy["seed"] = pd.to_numeric(param("seed"), errors="coerce")
    for group in VARIANT_GROUPS:
        tidy[f"{group}_label"] = variant_labels(raw, tidy[group], group)
    metrics = raw[[c for c in raw.columns if c.startswith("metrics.")]]
    return pd.concat([tidy, metrics.rename(columns=lambda c: c[len("metrics."):])], axis=1)


def variant_labels(raw: pd.DataFrame, names: pd.Series, prefix: str) -> pd.Series:
    """``name (key=value, ...)`` from the run's ``params.{prefix}.*``; the bare name when the
    run logged none (the component's defaults)."""
    start = f"params.{prefix}."
    columns = sorted(c for c in raw.columns if c.startswith(start))

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


def with_total_time(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``time_total_s`` = phase 1 + phase 2 + resampling + phase 3 (NaN if one is missing)."""
    phases = runs.reindex(columns=list(PHASE_TIMES.values()))
    return runs.assign(**{TOTAL_TIME: phases.sum(axis=1, min_count=len(PHASE_TIMES))})


def score_metrics(gm_form: str) -> dict[str, str]:
    """Column title -> metric of the score tables (FM is macro F1, as in the paper)."""
    return {"BAC": BAC_METRIC, "GM": GM_FORMS[gm_form][0], "FM": F1_METRIC}


def runtime_metrics() -> list[str]:
    return list(PHASE_TIMES.values()) + [TOTAL_TIME]


def settings(summary: pd.DataFrame):
    """``(setting dict, the summary's rows of that setting)`` in sorted order."""
    for values, block in summary.groupby(level=list(SETTING_KEYS), dropna=False, sort=True):
        yield dict(zip(SETTING_KEYS, values)), block


def varying_settings(runs: pd.DataFrame) -> list[str]:
    return [name for name in TRAINING_SETTINGS if runs[name].nunique(dropna=False) > 1]


def method_sort_key(method_label_pair: tuple[str, str]) -> tuple:
    method, label = method_label_pair
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, label


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


def setting_title(setting: dict, varying: list[str]) -> str:
    ratio = setting["ratio"]
    ratio_text = "?" if pd.isna(ratio) else f"{ratio:g}"
    extras = "".join(f", {name} {setting[name]}" for name in varying)
    return (f"{setting['dataset']}, {setting['backbone_label']}, {setting['profile']} profile, "
            f"ratio {ratio_text}{extras}")


def setting_slug(setting: dict, varying: list[str]) -> str:
    ratio = setting["ratio"]
    parts = [setting["dataset"], setting["backbone_label"], setting["profile"],
             "r" + ("na" if pd.isna(ratio) else f"{ratio:g}")]
    parts += [f"{name}{setting[name]}" for name in varying]
    return re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(str(p) for p in parts)).strip("-")


def score_frame(block: pd.DataFrame, metrics: dict[str, str], markup: Markup,
                digits: int = 4) -> pd.DataFrame:
    """Rows: loss; columns: (method, BAC | GM | FM | n).  Each cell is ``mean ± std`` as text,
    the best mean per row and metric in bold (ties all bold; only where two or more methods
    compete), a dash for a missing cell or the std of a single seed."""
    losses = sorted(block.index.get_level_values("loss_label").unique())
    methods = sorted(set(zip(block.index.get_level_values("method"),
                             block.index.get_level_values("method_label"))), key=method_sort_key)
    by_cell = block.droplevel(list(SETTING_KEYS) + ["loss", "method"])
    columns = pd.MultiIndex.from_tuples(
        [(markup.escape(label), title) for _, label in methods
         for title in list(metrics) + [markup.seeds_header]])
    frame = pd.DataFrame(markup.dash, index=pd.Index([markup.escape(x) for x in losses],
                                                     name="Loss"), columns=columns)
    for loss in losses:
        for title, metric in metrics.items():
            means = {label: by_cell.at[(loss, label), (metric, "mean")]
                     for _, label in methods if (loss, label) in by_cell.index}
            shown = {label: round(m, digits) for label, m in means.items() if not pd.isna(m)}
            best = max(shown.values()) if len(shown) > 1 else None
            for label, mean in means.items():
                if pd.isna(mean):
                    continue
                std = by_cell.at[(loss, label), (metric, "std")]
                mean_text = format_number(mean, digits)
                if best is not None and shown[label] == best:
                    mean_text = markup.bold(mean_text)
                std_text = markup.dash if pd.isna(std) else format_number(std, digits)
                frame.at[markup.escape(loss), (markup.escape(label), title)] = (
                    f"{mean_text}{markup.plus_minus}{std_text}")
        for _, label in methods:
            if (loss, label) in by_cell.index:
                frame.at[markup.escape(loss), (markup.escape(label), markup.seeds_header)] = (
                    str(int(by_cell.at[(loss, label), ("runs", "n")])))
    return frame


def runtime_frame(block: pd.DataFrame, markup: Markup, digits: int = 2) -> pd.DataFrame:
    """Rows: (loss, method); columns: mean seconds per phase, their total, the total relative
    to eos of the same loss (see ``reference_total``), and the number of runs."""
    rows = []
    ratio_title = f"Total/{REFERENCE_METHOD}"
    for loss in sorted(block.index.get_level_values("loss_label").unique()):
        of_loss = block.xs(loss, level="loss_label", drop_level=False)
        reference = reference_total(of_loss)
        keyed = {(k[CELL_KEYS.index("method")], k[CELL_KEYS.index("method_label")]): row
                 for k, row in of_loss.iterrows()}
        for method, label in sorted(keyed, key=method_sort_key):
            row = keyed[(method, label)]
            values = {title: row[(metric, "mean")] for title, metric in PHASE_TIMES.items()}
            values["Total"] = row[(TOTAL_TIME, "mean")]
            texts = {title: markup.dash if pd.isna(v) else format_number(v, digits)
                     for title, v in values.items()}
            ratio = values["Total"] / reference if reference else math.nan
            texts[ratio_title] = markup.dash if pd.isna(ratio) else format_number(ratio, 2)
            texts[markup.seeds_header] = str(int(row[("runs", "n")]))
            rows.append({"Loss": markup.escape(loss), "Method": markup.escape(label), **texts})
    return pd.DataFrame(rows).set_index(["Loss", "Method"])


def reference_total(of_loss: pd.DataFrame) -> float | None:
    """Mean total time of eos for one loss: the run with eos's default parameters (label
    ``eos``), else the only eos variant; None when there is no such single reference."""
    eos = of_loss[of_loss.index.get_level_values("method") == REFERENCE_METHOD]
    labels = eos.index.get_level_values("method_label")
    chosen = eos[labels == REFERENCE_METHOD] if REFERENCE_METHOD in set(labels) else eos
    if len(chosen) != 1:
        return None
    total = chosen[(TOTAL_TIME, "mean")].iloc[0]
    return None if pd.isna(total) or total <= 0 else float(total)


def score_caption(title: str, gm_form: str, experiments: list[str], markup: Markup) -> str:
    esc = markup.escape
    return (f"{esc(title)}. Mean{markup.plus_minus}sample standard deviation (ddof=1) over "
            f"seeds (a dash for a single seed); {markup.seeds_header}: number of seeds. "
            f"BAC: balanced accuracy; GM: {esc(GM_FORMS[gm_form][1])}; FM: macro F1. "
            f"Best mean per row and metric in bold; a dash alone: no finished run. "
            f"{experiments_text(experiments, markup)}")


def runtime_caption(title: str, experiments: list[str], markup: Markup) -> str:
    esc = markup.escape
    return (f"{esc(title)}. Mean seconds over runs per stage; Total = phase 1 + phase 2 + "
            f"resampling + phase 3 (a reused phase 1 counts the time of the run that trained "
            f"it); Total/{REFERENCE_METHOD}: total relative to {REFERENCE_METHOD}'s; "
            f"{markup.seeds_header}: number of runs. {experiments_text(experiments, markup)}")


def experiments_text(experiments: list[str], markup: Markup) -> str:
    plural = "s" if len(experiments) > 1 else ""
    return f"MLflow experiment{plural}: {markup.escape(', '.join(experiments))}."


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` float of already formatted and escaped cells, ready to ``\\input``
    (needs ``\\usepackage{booktabs}``).  Two-level columns (groups of equal width) get a
    spanning header per group."""
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
    for keys, row in frame.iterrows():
        keys = list(keys) if isinstance(keys, tuple) else [keys]
        lines.append(" & ".join([str(k) for k in keys] + [str(v) for v in row]) + r" \\")
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


# The report -----------------------------------------------------------------------------------
@dataclass
class Report:
    """Aggregated runs of one report, ready to render.

    How runs are grouped (``GROUPING_NOTE`` says it to the user): a table per setting, that is
    ``TABLE_KEYS`` (dataset, backbone with its ``backbone.*`` parameters, profile, ratio) plus
    ``TRAINING_SETTINGS`` (epochs, learning rate, device, ...; named in titles only where the
    runs disagree); a cell per loss label x method label, labels carrying every ``loss.*`` /
    ``method.*`` parameter logged, so eos with K=3 is a column of its own.  Seeds are what a
    cell averages over; a seed run twice counts once (its latest run, ``latest_per_seed``).
    """

    runs: pd.DataFrame
    scores: pd.DataFrame
    runtimes: pd.DataFrame
    experiments: list[str]
    gm_form: str

    @classmethod
    def build(cls, runs: pd.DataFrame, experiments: list[str], gm_form: str) -> "Report":
        runs = with_total_time(latest_per_seed(runs))
        return cls(runs, aggregate(runs, list(score_metrics(gm_form).values())),
                   aggregate(runs, runtime_metrics()), experiments, gm_form)

    def tables(self, markup: Markup):
        """``(kind, slug, title, caption, frame)`` per setting: a score and a runtime table."""
        varying = varying_settings(self.runs)
        # Both summaries group the same runs by the same keys, so their settings pair up.
        for (setting, block), (_, times) in zip(settings(self.scores), settings(self.runtimes)):
            title, slug = setting_title(setting, varying), setting_slug(setting, varying)
            yield ("scores", slug, f"Scores: {title}",
                   score_caption(title, self.gm_form, self.experiments, markup),
                   score_frame(block, score_metrics(self.gm_form), markup))
            yield ("runtime", slug, f"Runtime: {title}",
                   runtime_caption(title, self.experiments, markup),
                   runtime_frame(times, markup))


def write_latex(report: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, slug, _, caption, frame in report.tables(LATEX):
        path = out / f"{kind}-{slug}.tex"
        path.write_text(latex_table(frame, caption, f"tab:{kind}-{slug}"))
        written.append(path)
    return written


def markdown_text(report: Report) -> str:
    return "\n".join(markdown_table(frame, title, caption)
                     for _, _, title, caption, frame in report.tables(MARKDOWN))


def write_csv(report: Report, out: Path) -> list[Path]:
    """The aggregates, one row per cell, columns ``<metric>_<mean|std|count>`` and ``runs_n``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, summary in (("scores", report.scores), ("runtime", report.runtimes)):
        flat = summary.copy()
        flat.columns = [f"{metric}_{stat}" for metric, stat in flat.columns]
        path = out / f"{name}.csv"
        flat.reset_index().to_csv(path, index=False)
        written.append(path)
    return written


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} '{value}'; valid: {', '.join(choices)}")
    return value


GROUPING_NOTE = (
    "Runs are never averaged across settings: each dataset x backbone (with its parameters) x "
    "profile x ratio, and each value of a training setting or device on which the runs "
    "disagree, gets its own tables; within a table, rows are the loss and columns the method, "
    "each with the parameters its runs logged (eos and 'eos (K=3)' are separate columns). "
    "Runs of several experiments with one setting share cells; only the latest run of a cell "
    "and seed counts.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.report", epilog=GROUPING_NOTE,
        description="Tables of the finished runs in the MLflow store (MLFLOW_TRACKING_URI): "
                    "BAC / GM / FM by loss x method, and runtime per stage.")
    parser.add_argument("--experiment", action="append", dest="experiments", metavar="NAME",
                        help=f"experiment to report; repeat for several; default "
                             f"{DEFAULT_EXPERIMENT}")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for latex and csv files; default {DEFAULT_OUT}/")
    parser.add_argument("--format", default="latex",
                        help="latex (one .tex per table), markdown (printed) or csv; "
                             "default latex")
    parser.add_argument("--gm", default="macro",
                        help="GM shown: macro (test_gm_macro, the EOS paper's) or multiclass "
                             "(test_gm, per-class geometric mean); default macro")
    return parser


def make_report(args: argparse.Namespace) -> int:
    output_format = check_choice(args.format, FORMATS, "format")
    gm_form = check_choice(args.gm, tuple(GM_FORMS), "GM form")
    experiments = list(dict.fromkeys(args.experiments or [DEFAULT_EXPERIMENT]))
    runs = gather_runs(experiments)
    report = Report.build(runs, experiments, gm_form)
    if len(report.runs) < len(runs):
        print(f"note: {len(runs) - len(report.runs)} older run(s) repeat a cell and seed and "
              f"are left out", file=sys.stderr)
    if output_format == "markdown":
        print(markdown_text(report), end="")
        return 0
    writer = write_latex if output_format == "latex" else write_csv
    for path in writer(report, Path(args.out)):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return make_report(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
