"""The report generator on real runs: aggregates, paper layouts, formats, figures, report run."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import textwrap
from types import SimpleNamespace

import pandas as pd
import pytest

from benchmark import report

# An underscore, so that the LaTeX captions must escape the name.
EXPERIMENT = "report_tests"
K_EXPERIMENT = "grid_k"
TABLE2_EXPERIMENT = "grid_table2"
SCORE_METRICS = {"BAC": "test/bac", "GM": "test/gm_macro", "FM": "test/f1_macro"}
SETTING = "digits-resnet32-exp-r10"
SETTING_TITLE = "digits, resnet32, exp profile, ratio 10"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF"
HAS_PDFLATEX = shutil.which("pdflatex") is not None
# Runs that look like cells (phase-1 key, test scores) but are parents or reports.
NOT_A_CELL = "not-a-cell"
NOT_CELL_TAGS = ({"grid_role": "parent"}, {"study_role": "study"}, {"study_role": "report"})

# Tiny grids named after the paper tables, so that they get the paper layouts.  Every cell
# shares its phase 1 with the runs made before (same data, backbone, loss, epochs, seed), but
# the focal rows, which train one more phase 1.
TABLE4_SPEC = f"""
    name: table4
    experiment: {K_EXPERIMENT}
    datasets: [digits]
    losses: [ce]
    methods: [eos]
    seeds: [0, 1]
    method_params: {{k_neighbors: [3, 5]}}
    settings: {{epochs: 1, head_epochs: 1}}
"""
TABLE2_SPEC = f"""
    name: table2
    experiment: {TABLE2_EXPERIMENT}
    datasets: [digits]
    methods: [none, eos]
    reference: none
    seeds: [0, 1]
    settings: {{epochs: 1, head_epochs: 1}}
    blocks:
      - {{losses: [ce]}}
      - {{losses: [focal], seeds: [0]}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: none and eos on digits, seeds 0 and 1, plus eos with K=3 on
    seed 0 under a study's parent run (phase 1 is trained once per seed and reused), a
    tuning trial with K=4 and three runs with the phase-1 key and a test score but the tags
    of a grid's parent, a study's parent and a report, which are no cells; the grids
    table4 (eos with K 3 and 5, two seeds) plus a stray K=7 run that is no cell of it, and
    table2 (none and eos; ce on two seeds, focal on one; runtimes against none)."""
    import mlflow

    from benchmark.config import RunConfig
    from benchmark.pipeline import run_cell
    from benchmark.studies import run_grid

    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)  # the default artifact root is relative to the working dir
        mlflow.set_tracking_uri(uri)

        def run(method: str, seed: int, experiment: str = EXPERIMENT, trial: bool = False,
                **method_params) -> None:
            run_cell(RunConfig(dataset="digits", method=method, seed=seed, epochs=1,
                               head_epochs=1, method_params=method_params,
                               experiment=experiment, log_model=False,
                               system_metrics=False), progress=False,
                     evaluate_test=not trial, tags={"study_role": "trial"} if trial else None)

        for seed in (0, 1):
            run("none", seed)
            run("eos", seed)
        experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        with mlflow.start_run(experiment_id=experiment_id, run_name="study"):  # not a cell
            mlflow.log_params({"method": "eos", "dataset": "digits"})
            run("eos", 0, k_neighbors=3)
        run("eos", 0, trial=True, k_neighbors=4)  # a tuning trial: no test scores, no cell
        for tags in NOT_CELL_TAGS:
            with mlflow.start_run(experiment_id=experiment_id, run_name=NOT_A_CELL,
                                  tags={"phase1_key": "x", **tags}):
                mlflow.log_params({"method": "eos", "dataset": "digits", "seed": 0})
                mlflow.log_metric("test/bac", 0.99)
        specs = {}
        for name, text in (("table4", TABLE4_SPEC), ("table2", TABLE2_SPEC)):
            specs[name] = folder / f"{name}.yaml"
            specs[name].write_text(textwrap.dedent(text))
            assert run_grid(specs[name], progress=False)["failed"] == 0
        run("eos", 0, experiment=K_EXPERIMENT, k_neighbors=7)
        mlflow.create_experiment("empty")
        yield SimpleNamespace(uri=uri, folder=folder, specs=specs)
        mlflow.set_tracking_uri("")


def search(experiment: str, filter_string: str = "") -> pd.DataFrame:
    import mlflow

    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string)


@pytest.fixture(scope="module")
def direct_runs(store):
    """The cells straight from mlflow.search_runs, labelled by method column."""
    runs = search(EXPERIMENT)
    runs = runs[runs["metrics.test/bac"].notna()
                & (runs["tags.mlflow.runName"] != NOT_A_CELL)].copy()
    k = runs["params.method.k_neighbors"]
    runs["label"] = runs["params.method"].where(k.isna(), runs["params.method"] + " (K=" + k + ")")
    return runs


@pytest.fixture(scope="module")
def built(store):
    return report.Report.build(report.gather_runs([EXPERIMENT]), [EXPERIMENT], "macro")


@pytest.fixture(scope="module")
def loss_label(built):
    """The loss is ce, labelled with whatever parameters it logs."""
    (label,) = set(built.runs["loss_label"])
    assert label.startswith("ce")
    return label


def grid_report(store, tmp_path_factory, name: str, *extra: str):
    out = tmp_path_factory.mktemp(f"report-{name}")
    assert report.main(["--grid", str(store.specs[name]), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def table4_out(store, tmp_path_factory):
    """The table4 grid's report, in every format, logged as a run (the only report run of its
    experiment)."""
    return grid_report(store, tmp_path_factory, "table4")


@pytest.fixture(scope="module")
def table2_out(store, tmp_path_factory):
    return grid_report(store, tmp_path_factory, "table2", "--no-log")


def stage_times(runs: pd.DataFrame) -> list[str]:
    """The ``metrics.time/<stage>_s`` columns some run logged, but for the wall clock and the
    loading of a cached phase 1."""
    return [c for c in runs.columns if re.fullmatch(r"metrics\.time/\w+_s", c)
            and c not in ("metrics.time/wall_s", "metrics.time/phase1_load_s")
            and runs[c].notna().any()]


def runtime_titles(header: list[str], reference: str = "eos") -> None:
    """A runtime header: loss, method, a title per stage (the pipeline's phases in order,
    whatever else), total, ratio, count."""
    assert header[:2] == ["Loss", "Method"] and header[-3:] == ["Total", f"vs {reference}", "n"]
    phases = [t for t in header if t in ("Phase 1", "Phase 2", "Resampling", "Phase 3")]
    assert phases == ["Phase 1", "Phase 2", "Resampling", "Phase 3"]


def shown(fraction: float, digits: int = 1) -> str:
    """A score as the tables show it: in percent."""
    return f"{100 * fraction:.{digits}f}"


def expected_best(direct_runs, metric: str) -> str:
    means = direct_runs.groupby("label")[f"metrics.{metric}"].mean()
    return f"{(100 * means).round(1).max():.1f}"


def test_aggregates_match_mlflow(built, loss_label, direct_runs):
    # Neither the study's parent run, the tuning trial, nor the runs tagged as a grid's or
    # study's parent or a report are cells.
    assert len(direct_runs) == 5 and len(built.runs) == 5
    assert set(built.runs["run_id"]) == set(direct_runs["run_id"])
    cells = built.scores.droplevel([k for k in report.CELL_KEYS
                                    if k not in ("loss_label", "method_label")])
    assert set(cells.index) == {(loss_label, m) for m in ("none", "eos", "eos (K=3)")}
    for label, runs in direct_runs.groupby("label"):
        cell = cells.loc[(loss_label, label)]
        assert cell[("runs", "n")] == len(runs)
        for metric in SCORE_METRICS.values():
            values = runs[f"metrics.{metric}"]
            assert cell[(metric, "mean")] == pytest.approx(values.mean())
            if len(runs) > 1:
                assert cell[(metric, "std")] == pytest.approx(values.std(ddof=1))
            else:  # the K=3 variant ran once and must not be averaged into eos
                assert math.isnan(cell[(metric, "std")])


def test_latex_tables_and_default_outputs(store, direct_runs, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path), "--no-log"]) == 0
    scores = (tmp_path / f"scores-{SETTING}.tex").read_text()
    for text in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule", "report\\_tests",
                 "{none}", "{eos}", "{eos (K=3)}", "\nce", "macro geometric mean",
                 "Scores in percent"):
        assert text in scores
    # Nothing shrunk, and captions in words: no raw metric or parameter names.
    for text in ("resizebox", "test/", "gm\\_macro", "k\\_neighbors", "device\\_used"):
        assert text not in scores
    for metric in SCORE_METRICS.values():
        assert rf"\textbf{{{expected_best(direct_runs, metric)}}}" in scores
    runtime = (tmp_path / f"runtime-{SETTING}.tex").read_text()
    assert r"\toprule" in runtime and r"\bottomrule" in runtime
    header = next(line for line in runtime.splitlines() if line.startswith("Loss & "))
    runtime_titles([t.strip() for t in header.rstrip("\\ ").split("&")][:-1] + ["n"])
    assert "& eos & " in runtime and "& none & " in runtime
    # The default format is all: markdown and CSV copies too, the recall figure, and a K
    # figure: every eos run logs the K in force, so K=3 and the default K=10 make a curve.
    # Figures as PNG and PDF, the summarised runs, and the PDF of the tables with pdflatex.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f"scores-{SETTING}.tex", f"scores-{SETTING}.csv", f"runtime-{SETTING}.tex",
        f"runtime-{SETTING}.csv", "scores.csv", "runtime.csv", "report.md", "runs.json",
        f"recall-{SETTING}.png", f"k-sensitivity-{SETTING}.png", f"recall-{SETTING}.pdf",
        f"k-sensitivity-{SETTING}.pdf"] + (["tables.pdf"] if HAS_PDFLATEX else []))
    listed = json.loads((tmp_path / "runs.json").read_text())
    assert listed["count"] == 5
    assert {run["run_id"] for run in listed["runs"]} == set(direct_runs["run_id"])
    assert {run["experiment"] for run in listed["runs"]} == {EXPERIMENT}


def test_mlproject_default_means_not_given(store, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--grid", "default", "--format", "default",
                        "--out", str(tmp_path), "--no-log"]) == 0
    assert (tmp_path / f"scores-{SETTING}.tex").exists() and (tmp_path / "report.md").exists()


def test_markdown_prints_the_same_numbers_and_writes_them(store, direct_runs, capsys, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown", "--out",
                        str(tmp_path), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "report.md").read_text() == out
    (row,) = markdown_rows(out, f"Scores: {SETTING_TITLE}")
    header = markdown_header(out, f"Scores: {SETTING_TITLE}")
    cells = dict(zip(header, row))
    for label, runs in direct_runs.groupby("label"):
        for title, metric in SCORE_METRICS.items():
            mean = shown(runs[f"metrics.{metric}"].mean())
            if len(runs) > 1:
                std = shown(runs[f"metrics.{metric}"].std(ddof=1))
                assert cells[f"{label} {title}"] == f"{mean} ± {std}"
            else:  # a single seed: the mean alone
                assert cells[f"{label} {title}"] == mean
    assert f"**{expected_best(direct_runs, 'test/bac')}**" in out
    runtime_header = next(line for line in out.splitlines() if "Method" in line)
    runtime_titles([c.strip() for c in runtime_header.strip("|").split("|")])
    assert not list(tmp_path.glob("*.tex")) and not list(tmp_path.glob("*.csv"))


def test_gm_form_selects_the_metric(store, direct_runs, capsys, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown", "--gm",
                        "multiclass", "--out", str(tmp_path), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "the geometric mean of the per-class recalls" in out
    for _, runs in direct_runs.groupby("label"):
        assert shown(runs['metrics.test/gm'].mean()) in out


def test_runtime_table(built, loss_label, direct_runs):
    (table,) = built.runtime_tables()
    frame = report.text_frame(table, report.MARKDOWN)
    runtime_titles(["Loss", "Method"] + list(frame.columns))
    assert len(frame.columns) == len(stage_times(direct_runs)) + 3
    # Methods alphabetically, the reference (eos) last.
    assert list(frame.index) == [(loss_label, m) for m in ("none", "eos", "eos (K=3)")]
    assert frame.loc[(loss_label, "eos"), "vs eos"] == "1.00"
    assert frame.loc[(loss_label, "eos (K=3)"), "n"] == "1"
    # Every run logged phase 1's time, also those that reused it from the cache.
    assert direct_runs["metrics.time/phase1_s"].gt(0).all()
    totals = {label: runs[stage_times(direct_runs)].sum(axis=1).mean()
              for label, runs in direct_runs.groupby("label")}
    assert frame.loc[(loss_label, "eos"), "Total"] == f"{totals['eos']:.2f}"
    assert frame.loc[(loss_label, "none"), "vs eos"] == f"{totals['none'] / totals['eos']:.2f}"


def test_reference_option_names_the_ratio_column(store, direct_runs, capsys, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown", "--reference",
                        "none", "--out", str(tmp_path), "--no-log"]) == 0
    out = capsys.readouterr().out
    totals = {label: runs[stage_times(direct_runs)].sum(axis=1).mean()
              for label, runs in direct_runs.groupby("label")}
    rows = {row[1]: row for row in markdown_rows(out, f"Runtime: {SETTING_TITLE}")}
    assert list(rows) == ["eos", "eos (K=3)", "none"]  # the reference last
    assert rows["none"][-2] == "1.00"
    assert rows["eos"][-2] == f"{totals['eos'] / totals['none']:.2f}"
    header = next(line for line in out.splitlines() if "Method" in line)
    runtime_titles([c.strip() for c in header.strip("|").split("|")], "none")


def test_absent_reference_is_a_dash(store, capsys, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown", "--reference",
                        "smote", "--out", str(tmp_path), "--no-log"]) == 0
    captured = capsys.readouterr()
    rows = markdown_rows(captured.out, f"Runtime: {SETTING_TITLE}")
    assert len(rows) == 3 and all(row[-2] == "-" for row in rows)
    assert "note: no run of the reference method 'smote'" in captured.err


def test_csv_copies_hold_the_numbers(store, direct_runs, loss_label, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "csv", "--out",
                        str(tmp_path), "--no-log"]) == 0
    header = (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert "test/bac_mean" in header and "test/bac_std" in header and "runs_n" in header
    assert (tmp_path / "runtime.csv").exists()
    table = pd.read_csv(tmp_path / f"scores-{SETTING}.csv").set_index("Loss")
    for label, runs in direct_runs.groupby("label"):
        assert table.at[loss_label, f"{label} n"] == len(runs)
        for title, metric in SCORE_METRICS.items():
            assert table.at[loss_label, f"{label} {title} mean"] == pytest.approx(
                runs[f"metrics.{metric}"].mean())
    runtime = pd.read_csv(tmp_path / f"runtime-{SETTING}.csv")
    runtime_titles(list(runtime.columns))


def grid_cell_runs(store, name: str) -> pd.DataFrame:
    """The grid's cells as MLflow holds them (runs tagged with the grid's name)."""
    from benchmark.studies import Grid, cell_key

    experiment = {"table4": K_EXPERIMENT, "table2": TABLE2_EXPERIMENT}[name]
    runs = search(experiment, f"tags.grid = '{name}' and attributes.status = 'FINISHED'")
    runs = runs[runs["tags.cell_key"].notna()]  # not the grid's parent run
    keys = {cell_key(cfg.resolved()) for cfg in Grid.from_spec(store.specs[name]).cells}
    assert set(runs["tags.cell_key"]) == keys
    return runs


def test_grid_restricts_to_the_spec_cells(store):
    from benchmark.studies import Grid, cell_key

    everything = report.gather_runs([K_EXPERIMENT])
    assert set(everything["K"]) == {"3", "5", "7"}  # the stray run is in the experiment
    keys = {cell_key(cfg.resolved()) for cfg in Grid.from_spec(store.specs["table4"]).cells}
    restricted = report.gather_runs([K_EXPERIMENT], keys, "table4")
    assert set(restricted["run_id"]) == set(grid_cell_runs(store, "table4")["run_id"])
    assert set(restricted["K"]) == {"3", "5"}


def test_table4_layout_rows_are_k(store, table4_out):
    runs = grid_cell_runs(store, "table4")
    table = pd.read_csv(table4_out / "table4.csv")
    assert list(table.columns) == ["K", "BAC mean", "BAC std", "GM mean", "GM std", "FM mean",
                                   "FM std", "n"]
    assert table["K"].tolist() == [3, 5]  # the stray K=7 run is no cell of the grid
    for _, row in table.iterrows():
        of_k = runs[runs["params.method.k_neighbors"] == str(int(row["K"]))]
        assert row["n"] == len(of_k) == 2
        for title, metric in SCORE_METRICS.items():
            assert row[f"{title} mean"] == pytest.approx(of_k[f"metrics.{metric}"].mean())
            assert row[f"{title} std"] == pytest.approx(of_k[f"metrics.{metric}"].std(ddof=1))
    tex = (table4_out / "table4.tex").read_text()
    # Every row has two seeds: n goes to the caption, once.
    assert "K & BAC & GM & FM \\\\" in tex and "$n$" not in tex and "Table IV" in tex
    assert "over the 2 seeds of each cell" in tex
    assert "\n3 & " in tex and "\n5 & " in tex and "\n7 & " not in tex


def test_table2_layout_rows_are_dataset_and_loss(store, table2_out):
    runs = grid_cell_runs(store, "table2")
    table = pd.read_csv(table2_out / "table2.csv")
    assert table["Dataset"].tolist() == ["digits", "digits"]
    assert [label.split(" ")[0] for label in table["Loss"]] == ["ce", "focal"]
    assert list(table.columns) == ["Dataset", "Loss"] + [
        f"{method} {column}" for method in ("none", "eos") for column in
        ("BAC mean", "BAC std", "GM mean", "GM std", "FM mean", "FM std", "n")]
    for _, row in table.iterrows():
        for method in ("none", "eos"):
            cell = runs[(runs["params.method"] == method)
                        & (runs["params.loss"] == row["Loss"].split(" ")[0])]
            assert row[f"{method} n"] == len(cell)
            assert row[f"{method} BAC mean"] == pytest.approx(cell["metrics.test/bac"].mean())
    assert table["eos n"].tolist() == [2, 1]
    tex = (table2_out / "table2.tex").read_text()
    assert r"\multicolumn{4}{c}{none} & \multicolumn{4}{c}{eos}" in tex
    assert "Dataset & Loss & BAC & GM & FM & $n$ & BAC & GM & FM & $n$" in tex
    assert "\ndigits & ce" in tex and "\n & focal" in tex  # the dataset named once per block
    assert "Settings per dataset: digits: resnet32, exp profile, ratio 10." in tex
    # The spec's reference, `none`, is what the runtime tables divide by.
    runtime = (table2_out / f"table2-runtime-{SETTING}.tex").read_text()
    assert "& Total & vs none & $n$" in runtime and "vs eos" not in runtime


def markdown_lines(text: str, heading: str) -> list[list[str]]:
    block = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("|")]


def markdown_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the markdown table under ``heading``, cells without bold marks."""
    return [[cell.replace("**", "") for cell in row] for row in markdown_lines(text, heading)[2:]]


def markdown_header(text: str, heading: str) -> list[str]:
    return markdown_lines(text, heading)[0]


def test_markdown_and_csv_copies_show_the_same_numbers(table2_out):
    table = pd.read_csv(table2_out / "table2.csv")
    rows = markdown_rows((table2_out / "table2.md").read_text(), "Table II: losses and resamplers")
    assert len(rows) == len(table)
    for cells, (_, row) in zip(rows, table.iterrows()):
        expected = [row["Dataset"], row["Loss"]]
        for method in ("none", "eos"):
            for title in SCORE_METRICS:
                std = row[f"{method} {title} std"]
                mean = shown(row[f"{method} {title} mean"])
                expected.append(mean if math.isnan(std) else f"{mean} ± {shown(std)}")
            expected.append(str(row[f"{method} n"]))
        assert cells == expected


def test_report_run_is_apart_and_holds_the_files_flat(store, table4_out):
    import mlflow

    stems = (f"table4-k-sensitivity-{SETTING}", f"table4-recall-{SETTING}")
    for stem in stems:
        assert (table4_out / f"{stem}.png").read_bytes().startswith(PNG_MAGIC)
        assert (table4_out / f"{stem}.pdf").read_bytes().startswith(PDF_MAGIC)
    # The report run has an experiment of its own, never among the cells.
    assert search(K_EXPERIMENT, "tags.study_role = 'report'").empty
    experiment = mlflow.get_experiment_by_name(report.REPORT_EXPERIMENT)
    assert experiment.tags["mlflow.note.content"] == report.REPORTS_DESCRIPTION
    (run_id,) = search(report.REPORT_EXPERIMENT)["run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "report table4"
    assert run.data.params["layout"] == "table4" and run.data.params["digits"] == "1"
    assert run.data.tags["study_role"] == "report" and "grid" not in run.data.tags
    assert "table4.md" in run.data.tags["mlflow.note.content"]
    # Every file of the report, flat at the artifact root as on disk.
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert logged == {p.name for p in table4_out.iterdir()}
    assert {"table4.tex", "table4.csv", "table4.md", "table4-runs.json",
            f"table4-runtime-{SETTING}.tex"} <= logged
    if HAS_PDFLATEX:
        assert "table4-tables.pdf" in logged
    # The markdown's links (figures, PDF, run list) name files next to it, there and here.
    markdown = (table4_out / "table4.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", markdown)
    assert f"{stems[1]}.png" in links and "table4-runs.json" in links
    assert set(links) <= logged
    # The ids of the runs it summarised: the grid's cells, as many as the `runs` parameter.
    listed = json.loads((table4_out / "table4-runs.json").read_text())
    cells = grid_cell_runs(store, "table4")
    assert {r["run_id"] for r in listed["runs"]} == set(cells["run_id"])
    assert listed["count"] == len(cells) == int(run.data.params["runs"])
    assert {(r["cell"], r["seed"]) for r in listed["runs"]} == set(
        zip(cells["tags.cell"], cells["params.seed"].astype(int)))
    # The report run is never a cell, in this report or the next.
    assert run_id not in set(report.gather_runs(None)["run_id"])


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "empty"], "error: no finished runs in experiment 'empty'"),
    (["--experiment", "missing"], "error: unknown experiment 'missing'"),
    (["--experiment", EXPERIMENT, "--format", "pdf"], "error: unknown format 'pdf'"),
    (["--experiment", EXPERIMENT, "--gm", "mean"], "error: unknown GM form 'mean'"),
    (["--experiment", EXPERIMENT, "--digits", "1.5"],
     "error: --digits must be a whole number from 0 to 6, not '1.5'"),
    (["--grid", "no-such-spec.yaml"], "error: spec file not found: no-such-spec.yaml"),
    (["--grid", "{table2}", "--experiment", EXPERIMENT],
     "error: no finished run of grid 'table2' (6 cells) in experiment 'report_tests'"),
])
def test_errors_are_one_line(store, capsys, tmp_path, argv, message):
    argv = [arg.format(**store.specs) for arg in argv]
    assert report.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_no_option_reports_every_experiment_with_cells(store, tmp_path, capsys):
    assert report.main(["--out", str(tmp_path), "--format", "markdown", "--no-log"]) == 0
    out = capsys.readouterr().out
    # Not `empty`, nor the reports' own experiment.
    assert "MLflow experiments: grid_k, grid_table2, report_tests." in out
    cells = pd.concat([search(name) for name in (EXPERIMENT, K_EXPERIMENT, TABLE2_EXPERIMENT)])
    cells = cells[cells["metrics.test/bac"].notna() & (cells["tags.mlflow.runName"] != NOT_A_CELL)]
    # Experiments with one setting share cells: the latest run of each cell and seed counts.
    latest = cells.sort_values("start_time").drop_duplicates(["tags.cell", "params.seed"],
                                                             keep="last")
    assert len(latest) < len(cells)
    listed = json.loads((tmp_path / "runs.json").read_text())
    assert {run["run_id"] for run in listed["runs"]} == set(latest["run_id"])


def test_latex_escape():
    assert report.latex_escape("a_b & 50% {x}") == r"a\_b \& 50\% \{x\}"


@pytest.mark.skipif(not HAS_PDFLATEX, reason="pdflatex is not installed")
def test_latex_compiles(store, table2_out, table4_out, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path), "--format",
                        "latex", "--no-log"]) == 0
    assert (tmp_path / "tables.pdf").read_bytes().startswith(PDF_MAGIC)
    for folder in (table2_out, table4_out):
        for path in folder.glob("*.tex"):
            shutil.copy(path, tmp_path)
    inputs = "\n".join(rf"\input{{{path.name}}}" for path in sorted(tmp_path.glob("*.tex")))
    assert inputs.count(r"\input") == 6
    # Booktabs is all a paper needs.
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n"
        f"\\begin{{document}}\n{inputs}\n\\end{{document}}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]


# Layouts on synthetic runs: no training, and methods that need not exist yet -----------------
SETTING_FIELDS = {"experiment": "synthetic", "profile": "exp", "backbone": "resnet32",
                  "loss": "ce", "epochs": "10", "head_epochs": "5", "batch_size": "64",
                  "lr": "0.1", "image_size": "32", "subset_seed": "0", "val_fraction": "0.2",
                  "device_used": "cpu", "K": "", "train_class_counts": None, "ratio": 100.0}


def synthetic_runs(cells: list[dict]) -> pd.DataFrame:
    """Runs as ``gather_runs`` returns them: each dict names at least the dataset, method and
    seed, and its metrics; the rest is one fixed setting."""
    rows = []
    for number, cell in enumerate(cells):
        row = {**SETTING_FIELDS, "run_id": f"run{number}", "start_time": number, **cell}
        row.update(backbone_label=row["backbone"], loss_label=row["loss"],
                   method_label=row["method"], method_variant=row["method"])
        rows.append(row)
    return pd.DataFrame(rows)


TABLE1_DATASETS = {"cifar10": {}, "svhn": {}, "cifar100": {"ratio": 10.0},
                   "celeba": {"ratio": 40.0, "backbone": "resnet56", "epochs": "50"}}
TABLE1_GROUPS = {"pixel space": ("pre-smote", "remix"), "embedding space": ("smote", "eos")}
TABLE1_METHODS = ("pre-smote", "remix", "smote", "eos")


def table1_runs() -> pd.DataFrame:
    """Every dataset x method x seed 0 and 1; BAC = 0.5 + 0.1 * method rank + 0.01 * seed
    (+0.3 for remix on celeba, the best there)."""
    return synthetic_runs([
        {"dataset": dataset, "method": method, "seed": seed, **fields,
         "test/bac": 0.5 + 0.1 * rank + 0.01 * seed + (0.3 if (dataset, method) == (
             "celeba", "remix") else 0), "test/gm_macro": 0.7, "test/f1_macro": 0.6}
        for dataset, fields in TABLE1_DATASETS.items()
        for rank, method in enumerate(TABLE1_METHODS) for seed in (0, 1)])


def test_table1_layout_groups_rows_and_puts_datasets_in_columns(tmp_path):
    built = report.Report.build(table1_runs(), ["synthetic"], "macro",
                                report.PAPER_LAYOUTS["table1"], "table1", "eos",
                                TABLE1_METHODS, TABLE1_GROUPS)
    (table,) = built.score_tables()
    frame = report.text_frame(table, report.MARKDOWN)
    assert list(frame.index) == [("pixel space", "pre-smote"), ("pixel space", "remix"),
                                 ("embedding space", "smote"), ("embedding space", "eos")]
    assert list(dict.fromkeys(frame.columns.get_level_values(0))) == [
        "cifar10", "svhn", "cifar100", "celeba"]
    # Every cell has two seeds: no n column, the caption says it once.
    assert list(frame.columns.get_level_values(1)[:4]) == ["BAC", "GM", "FM", "BAC"]
    assert table.constant_n == 2
    std = shown(pd.Series([0.8, 0.81]).std(ddof=1))
    assert std == "0.7"
    # The best mean per column (among methods) in bold: eos, but remix on celeba.
    assert frame.loc[("embedding space", "eos"), ("cifar10", "BAC")] == f"**80.5** ± {std}"
    assert frame.loc[("pixel space", "remix"), ("celeba", "BAC")] == f"**90.5** ± {std}"
    assert frame.loc[("embedding space", "eos"), ("celeba", "BAC")] == f"80.5 ± {std}"
    caption = table.caption_text(report.MARKDOWN)
    assert "Scores in percent: mean ± standard deviation over the 2 seeds of each cell." in caption
    assert table.title == "Table I: over-sampling in pixel vs embedding space: loss ce"
    # Backbone, profile and ratio always; a training setting where datasets differ in it.
    assert ("Settings per dataset: cifar10: resnet32, exp profile, ratio 100, epochs 10; svhn: "
            "resnet32, exp profile, ratio 100, epochs 10; cifar100: resnet32, exp profile, "
            "ratio 10, epochs 10; celeba: resnet56, exp profile, ratio 40, epochs 50.") in caption
    assert "Best mean per column in bold" in caption
    written, _ = report.write_report(built, tmp_path, ("latex",))
    tex = (tmp_path / "table1.tex").read_text()
    # Four datasets x three scores do not fit a page: two tables of two datasets each, in
    # one file, the bold marks of the whole.
    assert tex.count(r"\begin{table}") == 2 and "resizebox" not in tex
    first, second = tex.split(r"\end{table}")[:2]
    assert r"\multicolumn{3}{c}{cifar10} & \multicolumn{3}{c}{svhn}" in first
    assert r"\multicolumn{3}{c}{cifar100} & \multicolumn{3}{c}{celeba}" in second
    assert "loss ce (part 1 of 2)." in first and r"\label{tab:table1-2}" in second
    assert r"\textbf{90.5} $\pm$ 0.7" in second and r"\textbf{90.5}" not in first
    assert "Group & Method & BAC & GM & FM & BAC & GM & FM \\\\" in tex
    assert "\npixel space & pre-smote & " in tex and "\n & remix & " in tex
    assert "\\midrule\nembedding space & smote & " in tex
    # One runtime table per setting, every method's total against eos's; the run list, and
    # the tables' PDF where pdflatex exists.
    assert sorted(p.name for p in written) == sorted(
        ["table1.tex", "table1-runs.json"] + (["table1-tables.pdf"] if HAS_PDFLATEX else [])
        + [f"table1-runtime-{d}-{'resnet56' if d == 'celeba' else 'resnet32'}"
           f"-exp-r{r}.tex" for d, r in (("cifar10", 100), ("svhn", 100),
                                         ("cifar100", 10), ("celeba", 40))])


def test_table1_without_groups_has_a_row_per_method():
    runs = table1_runs()
    runs = runs[runs["dataset"] == "cifar10"]
    built = report.Report.build(runs, ["synthetic"], "macro", report.PAPER_LAYOUTS["table1"],
                                "table1", "eos", ("smote", "eos", "remix", "pre-smote"))
    frame = report.text_frame(built.score_tables()[0], report.MARKDOWN)
    assert frame.index.name == "Method"
    assert list(frame.index) == ["smote", "eos", "remix", "pre-smote"]  # the given order


def test_column_groups_name_what_tells_two_settings_apart():
    runs = table1_runs()
    runs = pd.concat([runs[runs["dataset"] == "cifar10"],
                      runs[runs["dataset"] == "cifar10"].assign(backbone="resnet56",
                                                                backbone_label="resnet56")])
    built = report.Report.build(runs, ["synthetic"], "macro", report.PAPER_LAYOUTS["table1"],
                                "table1", "eos", TABLE1_METHODS, TABLE1_GROUPS)
    frame = report.text_frame(built.score_tables()[0], report.MARKDOWN)
    assert list(dict.fromkeys(frame.columns.get_level_values(0))) == [
        "cifar10 (resnet32)", "cifar10 (resnet56)"]


def test_runtime_columns_are_the_stages_the_runs_logged():
    pixel = {"time/pixel_resample_s": 2.0, "time/phase1_s": 10.0, "time/phase2_s": 1.0}
    post = {"time/phase1_s": 10.0, "time/phase2_s": 1.0, "time/resample_s": 0.5,
            "time/phase3_s": 0.5}
    # Neither the wall clock nor the loading of a cached phase 1 is a stage.
    not_stages = {"time/wall_s": 100.0, "time/phase1_load_s": 7.0}
    runs = synthetic_runs([
        {"dataset": "a", "method": "pre-smote", "seed": 0, **pixel, "time/zeta_s": 1.0},
        {"dataset": "a", "method": "gan", "seed": 0, **pixel, "time/generator_s": 30.0,
         "time/cam_s": 1.0},
        {"dataset": "a", "method": "eos", "seed": 0, **post, **not_stages},
        {"dataset": "a", "method": "eos", "seed": 1, **post, "time/phase3_s": 1.5},
        {"dataset": "b", "method": "pre-smote", "seed": 0, **pixel},
        {"dataset": "b", "method": "smote", "seed": 0, **post},
    ])
    built = report.Report.build(runs, ["synthetic"], "macro")
    tables = built.runtime_tables()
    first, second = (report.text_frame(t, report.MARKDOWN) for t in tables)
    # Known stages in pipeline order, then the others alphabetically.
    assert list(first.columns) == ["Generator", "Pixel resampling", "Phase 1", "Phase 2",
                                   "Resampling", "Phase 3", "Cam", "Zeta", "Total", "vs eos",
                                   "n"]
    assert list(first.index.get_level_values(1)) == ["gan", "pre-smote", "eos"]
    totals = {"gan": 2 + 10 + 1 + 30 + 1, "pre-smote": 2 + 10 + 1 + 1, "eos": 12.5}
    for method, total in totals.items():
        assert first.loc[("ce", method), "Total"] == f"{total:.2f}"
        assert first.loc[("ce", method), "vs eos"] == f"{total / totals['eos']:.2f}"
    assert first.loc[("ce", "pre-smote"), "Resampling"] == "-"
    assert first.loc[("ce", "eos"), "Phase 3"] == "1.00"
    assert list(first["n"]) == ["1", "1", "2"]
    # The second table logged fewer stages, has no eos to compare with, and one run per row
    # (said once, in the caption).
    assert list(second.columns) == ["Pixel resampling", "Phase 1", "Phase 2", "Resampling",
                                    "Phase 3", "Total", "vs eos"]
    assert "; each row averages 1 run." in tables[1].caption_text(report.MARKDOWN)
    assert list(second["vs eos"]) == ["-", "-"]
    assert list(second["Total"]) == ["13.00", "12.00"]


SCORES = {"test/gm_macro": 0.7, "test/f1_macro": 0.6}


def test_scores_in_percent_with_digits_and_a_single_seed_shows_its_mean():
    runs = synthetic_runs([
        {"dataset": "cifar10", "method": "smote", "seed": 0, "test/bac": 0.80, **SCORES},
        {"dataset": "cifar10", "method": "smote", "seed": 1, "test/bac": 0.81, **SCORES},
        {"dataset": "cifar10", "method": "eos", "seed": 0, "test/bac": 0.90, **SCORES}])
    for digits, smote, eos in ((1, "80.5 ± 0.7", "**90.0**"), (2, "80.50 ± 0.71", "**90.00**")):
        built = report.Report.build(runs, ["synthetic"], "macro", digits=digits)
        (table,) = built.score_tables()
        frame = report.text_frame(table, report.MARKDOWN)
        assert frame.loc["ce", ("smote", "BAC")] == smote
        assert frame.loc["ce", ("eos", "BAC")] == eos
        # The counts differ, so each cell shows its own.
        assert frame.loc["ce", ("smote", "n")] == "2" and frame.loc["ce", ("eos", "n")] == "1"
    assert "(the mean alone for a single seed); n: number of seeds" in table.caption_text(
        report.MARKDOWN)
    latex = report.latex_text(table)
    assert r"\textbf{90.00} & " in latex and r"80.50 $\pm$ 0.71" in latex


def test_wide_tables_split_by_column_group_in_latex_only():
    methods = ("adasyn", "bsmote", "none", "smote", "eos")
    runs = synthetic_runs([{"dataset": "cifar10", "method": method, "seed": seed,
                            "test/bac": 0.5 + 0.1 * rank, **SCORES}
                           for rank, method in enumerate(methods) for seed in (0, 1)])
    (table,) = report.Report.build(runs, ["synthetic"], "macro").score_tables()
    # Five methods x three scores (n is constant): parts of at most eight columns.
    parts = report.latex_parts(table)
    assert [list(dict.fromkeys(c.group for c in part.shown_columns())) for part in parts] == [
        ["adasyn", "bsmote"], ["none", "smote"], ["eos"]]
    tex = report.latex_text(table)
    assert tex.count(r"\begin{table}") == 3 and "resizebox" not in tex
    specs = re.findall(r"\\begin\{tabular\}\{(\w+)\}", tex)
    assert specs == ["lcccccc", "lcccccc", "lccc"]
    assert r"\textbf{90.0}" in tex.split(r"\end{table}")[2]  # eos, best of the whole row
    # Markdown has no page to fit: one table.
    frame = report.text_frame(table, report.MARKDOWN)
    assert list(dict.fromkeys(frame.columns.get_level_values(0))) == list(methods)


def test_recall_figure_has_error_bars_and_an_axis_fitted_to_the_data():
    from matplotlib.container import ErrorbarContainer

    runs = synthetic_runs([
        {"dataset": "cifar10", "method": method, "seed": seed, "test/bac": 0.8, **SCORES,
         "train_class_counts": "[10, 50, 100]", "class/recall_0": 0.60 + 0.05 * seed,
         "class/recall_1": 0.80, "class/recall_2": 0.95 + 0.01 * seed}
        for method in ("smote", "eos") for seed in (0, 1)])
    built = report.Report.build(runs, ["synthetic"], "macro")
    (piece,) = built.settings()
    order, counts, by_loss = report.recall_by_class(built.runs, piece, built.orders)
    assert order == [2, 1, 0] and counts == [100, 50, 10]  # the largest class first
    smallest = by_loss["ce"]["eos"][-1]
    assert smallest.mean == pytest.approx(0.625) and smallest.std == pytest.approx(
        pd.Series([0.60, 0.65]).std(ddof=1))
    fig = report.recall_figure(order, counts, by_loss, "Per-class test recall: cifar10")
    try:
        (ax,) = fig.axes
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 2 and all(c.has_yerr for c in bars)
        # Percent, from the lowest mean less its deviation to the highest plus its own.
        low = 62.5 - 100 * smallest.std
        high = 95.5 + 100 * pd.Series([0.95, 0.96]).std(ddof=1)
        margin = 0.05 * (high - low)
        assert ax.get_ylim() == pytest.approx((low - margin, high + margin))
        assert fig.get_suptitle().startswith("Per-class test recall: cifar10\n")
    finally:
        report.pyplot().close(fig)
    assert report.fitted_limits([90.0], [104.0]) == (89.5, 100.5)  # never past 100%


def test_without_pdflatex_the_pdf_is_left_out_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    built = report.Report.build(table1_runs(), ["synthetic"], "macro")
    written, _ = report.write_report(built, tmp_path, ("latex",))
    assert capsys.readouterr().err == (
        "note: pdflatex not found: the tables are not compiled into a PDF (the .tex files "
        "are written)\n")
    assert not list(tmp_path.glob("*.pdf")) and len(list(tmp_path.glob("*.tex"))) == 8


def write_spec(folder, text: str):
    path = folder / "table1.yaml"
    path.write_text(textwrap.dedent(text))
    return path


TABLE1_SPEC = """
    name: table1
    experiment: synthetic-table1
    datasets: [digits]
    methods: [smote, none, eos]
    seeds: [0]
    {extra}
"""
GROUPS = "groups: {'pixel space': [none], 'embedding space': [smote, eos]}"


def test_grid_spec_gives_layout_order_groups_and_reference(tmp_path):
    path = write_spec(tmp_path, TABLE1_SPEC.format(extra=f"reference: smote\n    {GROUPS}"))
    scope = report.scope_of(report.build_parser().parse_args(["--grid", str(path)]))
    assert scope.layout.name == "table1" and scope.methods == ("smote", "none", "eos")
    assert scope.groups == {"pixel space": ("none",), "embedding space": ("smote", "eos")}
    assert scope.reference == "smote"
    scope = report.scope_of(report.build_parser().parse_args(
        ["--grid", str(path), "--reference", "none"]))
    assert scope.reference == "none"
    path = write_spec(tmp_path, TABLE1_SPEC.format(extra=""))
    scope = report.scope_of(report.build_parser().parse_args(["--grid", str(path)]))
    assert scope.reference == "eos" and scope.groups is None


@pytest.mark.parametrize("extra, message", [
    ("reference: bsmote", "reference 'bsmote' is none of the grid's methods (smote, none, eos)"),
    ("groups: [none, smote]", "groups must map each row group's name to a list of methods"),
    ("groups: {a: [none, smote], b: [smote, eos]}", "groups list smote in more than one group"),
    ("groups: {a: [none, smote], b: [eos, remix]}",
     "groups name remix, which the grid does not run (its methods: smote, none, eos)"),
    ("groups: {a: [none], b: [eos]}", "method(s) smote of the grid are in no group of groups"),
])
def test_bad_reference_or_groups_are_one_line_errors(mlflow_store, tmp_path, capsys, extra,
                                                     message):
    path = write_spec(tmp_path, TABLE1_SPEC.format(extra=extra))
    assert report.main(["--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_no_option_on_a_store_without_cells_is_a_one_line_error(mlflow_store, tmp_path,
                                                               capsys):
    import mlflow

    mlflow.create_experiment("empty")
    assert report.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no finished runs in any experiment of {mlflow_store} "
                          f"(Default, empty)") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_shipped_table1_spec_groups_every_method_once():
    from pathlib import Path

    from benchmark.studies import read_spec

    path = Path(__file__).parent.parent / "studies" / "paper" / "table1.yaml"
    spec = read_spec(path)
    methods = tuple(spec["methods"])
    assert report.spec_reference(spec, methods, str(path)) == "eos"
    groups = report.spec_groups(spec, methods, str(path))
    assert list(groups) == ["pixel space", "embedding space"]
    assert sorted(m for members in groups.values() for m in members) == sorted(methods)


def test_analysis_figures_join_the_report_when_asked(store, tmp_path, monkeypatch):
    import mlflow

    # Tests with their own store before this one reset the tracking URI: use the module's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    mlflow.set_tracking_uri(store.uri)
    assert report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path), "--no-log",
                        "--analysis"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    weight_figures = {n for n in names if n.startswith("weight-norms")}
    assert weight_figures and {n.replace(".png", ".pdf") for n in weight_figures
                               if n.endswith(".png")} <= names
    assert any(n.startswith("weight-norms") for n in
               (tmp_path / "report.md").read_text().replace("(", " ").split())


TABLE3_GROUPS = {"GAN over-sampling": ("cgan", "gamo"), "embedding space": ("eos",)}


def table3_runs() -> pd.DataFrame:
    """Two datasets x cgan, gamo, eos x seeds 0 and 1: the GANs log a generator stage (and
    the training set's remainder), eos a phase 3; cgan is the best on cifar10, eos on svhn."""
    best = {("cifar10", "cgan"), ("svhn", "eos")}
    cells = []
    for dataset in ("cifar10", "svhn"):
        for method in ("cgan", "gamo", "eos"):
            for seed in (0, 1):
                times = {"time/phase1_s": 100.0, "time/phase2_s": 10.0}
                times.update({"time/generator_s": 60.0 + 20 * seed, "time/training_set_s": 1.0}
                             if method != "eos" else {"time/phase3_s": 5.0})
                cells.append({"dataset": dataset, "method": method, "seed": seed, **times,
                              "test/bac": 0.8 if (dataset, method) in best else 0.6,
                              "test/gm_macro": 0.7, "test/f1_macro": 0.6})
    return synthetic_runs(cells)


def test_table3_layout_puts_runtimes_beside_the_scores(tmp_path):
    built = report.Report.build(table3_runs(), ["synthetic"], "macro",
                                report.PAPER_LAYOUTS["table3"], "table3", "eos",
                                ("cgan", "gamo", "eos"), TABLE3_GROUPS)
    (table,) = built.score_tables()
    frame = report.text_frame(table, report.MARKDOWN)
    assert list(frame.index) == [(d, g, m) for d in ("cifar10", "svhn") for g, m in (
        ("GAN over-sampling", "cgan"), ("GAN over-sampling", "gamo"), ("embedding space", "eos"))]
    assert list(frame.columns) == ["BAC", "GM", "FM", "Generator (s)", "Total (s)", "vs eos"]
    # The generator's seconds once: the total adds the training set's remainder to them.
    gan_total, eos_total = 70 + 1 + 110, 115
    row = frame.loc[("cifar10", "GAN over-sampling", "cgan")]
    assert (row["Generator (s)"], row["Total (s)"]) == ("70.00", f"{gan_total:.2f}")
    assert row["vs eos"] == f"{gan_total / eos_total:.2f}"
    eos = frame.loc[("svhn", "embedding space", "eos")]
    assert (eos["Generator (s)"], eos["Total (s)"], eos["vs eos"]) == ("-", "115.00", "1.00")
    # The best per dataset, not over the whole column.
    assert row["BAC"].startswith("**80.0**") and eos["BAC"].startswith("**80.0**")
    assert not frame.loc[("svhn", "GAN over-sampling", "cgan"), "BAC"].startswith("**")
    caption = table.caption_text(report.MARKDOWN)
    assert "Best mean per dataset and column in bold" in caption
    assert "Generator (s): mean seconds of the stage generator" in caption
    assert "vs eos: that total divided by eos's for the same dataset and loss." in caption
    assert table.title == "Table III: generative over-samplers vs EOS: loss ce"
    report.write_report(built, tmp_path, ("latex",))
    tex = (tmp_path / "table3.tex").read_text()
    assert tex.count(r"\begin{table}") == 1  # six value columns fit a page
    assert "Dataset & Group & Method & BAC & GM & FM & Generator (s) & Total (s) & vs eos" in tex
    # The runtime table per dataset has the generator's own column beside the training set's.
    runtime = report.text_frame(built.runtime_tables()[0], report.MARKDOWN)
    assert list(runtime.columns[:3]) == ["Generator", "Training set", "Phase 1"]
    assert runtime.loc[("ce", "cgan"), "Total"] == f"{gan_total:.2f}"


def test_a_smaller_version_of_a_paper_table_gets_its_layout():
    from pathlib import Path

    assert report.layout_of("table3-smoke").name == "table3"
    assert report.layout_of("table3").name == "table3"
    assert report.layout_of("smoke-generative").name == "generic"
    spec = Path(__file__).parent.parent / "studies" / "smoke-generative.yaml"
    scope = report.scope_of(SimpleNamespace(experiments=None, reference=None, grid=str(spec)))
    assert scope.layout.name == "table3" and scope.reference == "eos"
    assert scope.groups["GAN over-sampling"] == ("cgan", "bagan", "gamo")
