"""The report generator against real runs: aggregates, LaTeX and markdown tables, errors."""
from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from benchmark import report

# An underscore, so that the LaTeX captions must escape the name.
EXPERIMENT = "report_tests"
SCORE_METRICS = {"BAC": "test_bac", "GM": "test_gm_macro", "FM": "test_f1_macro"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: none and eos on digits, seeds 0 and 1, plus eos with K=3 on
    seed 0 under a study's parent run (phase 1 is trained once per seed and reused)."""
    import mlflow

    from benchmark.config import RunConfig
    from benchmark.pipeline import run_cell

    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)  # the default artifact root is relative to the working dir
        mlflow.set_tracking_uri(uri)
        def run(method: str, seed: int, **method_params) -> None:
            run_cell(RunConfig(dataset="digits", method=method, seed=seed, epochs=1,
                               head_epochs=1, method_params=method_params,
                               experiment=EXPERIMENT), progress=False)

        for seed in (0, 1):
            run("none", seed)
            run("eos", seed)
        experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        with mlflow.start_run(experiment_id=experiment_id, run_name="study"):  # not a cell
            mlflow.log_params({"method": "eos", "dataset": "digits"})
            run("eos", 0, k_neighbors=3)
        mlflow.create_experiment("empty")
        yield uri
        mlflow.set_tracking_uri("")


@pytest.fixture(scope="module")
def direct_runs(store):
    """The cells straight from mlflow.search_runs, labelled by method column."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    runs = runs[runs["metrics.test_bac"].notna()].copy()
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


def expected_best(direct_runs, metric: str) -> str:
    means = direct_runs.groupby("label")[f"metrics.{metric}"].mean().round(4)
    return f"{means.max():.4f}"


def test_aggregates_match_mlflow(built, loss_label, direct_runs):
    assert len(direct_runs) == 5 and len(built.runs) == 5  # the study's parent run is no cell
    cells = built.scores.droplevel(list(report.SETTING_KEYS) + ["loss", "method"])
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


def test_latex_tables(store, direct_runs, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path)]) == 0
    scores = (tmp_path / "scores-digits-resnet32-exp-r10.tex").read_text()
    for text in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule", "report\\_tests",
                 "{none}", "{eos}", "{eos (K=3)}", "\nce", "test\\_gm\\_macro"):
        assert text in scores
    for metric in SCORE_METRICS.values():
        assert rf"\textbf{{{expected_best(direct_runs, metric)}}}" in scores
    runtime = (tmp_path / "runtime-digits-resnet32-exp-r10.tex").read_text()
    assert r"\toprule" in runtime and r"\bottomrule" in runtime
    assert "Phase 1 & Phase 2 & Resampling & Phase 3 & Total & Total/eos" in runtime
    assert "& eos & " in runtime and "& none & " in runtime


def test_markdown_prints_the_same_numbers(store, direct_runs, capsys):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    for label, runs in direct_runs.groupby("label"):
        for metric in SCORE_METRICS.values():
            assert f"{runs[f'metrics.{metric}'].mean():.4f}" in out
        if len(runs) > 1:
            assert f"{runs['metrics.test_bac'].std(ddof=1):.4f}" in out
    assert f"**{expected_best(direct_runs, 'test_bac')}**" in out
    runtime_header = next(line for line in out.splitlines() if "Method" in line)
    assert [c.strip() for c in runtime_header.strip("|").split("|")] == [
        "Loss", "Method", "Phase 1", "Phase 2", "Resampling", "Phase 3", "Total", "Total/eos", "n"]


def test_gm_form_selects_the_metric(store, direct_runs, capsys):
    assert report.main(["--experiment", EXPERIMENT, "--format", "markdown", "--gm",
                        "multiclass"]) == 0
    out = capsys.readouterr().out
    assert "(metric test_gm)" in out
    for _, runs in direct_runs.groupby("label"):
        assert f"{runs['metrics.test_gm'].mean():.4f}" in out


def test_runtime_table(built, loss_label, direct_runs):
    (_, block), = report.settings(built.runtimes)
    frame = report.runtime_frame(block, report.MARKDOWN)
    assert list(frame.columns) == ["Phase 1", "Phase 2", "Resampling", "Phase 3", "Total",
                                   "Total/eos", "n"]
    assert frame.loc[(loss_label, "eos"), "Total/eos"] == "1.00"
    assert frame.loc[(loss_label, "eos (K=3)"), "n"] == "1"
    eos = direct_runs[direct_runs["label"] == "eos"]
    total = sum(eos[f"metrics.{m}"] for m in report.PHASE_TIMES.values()).mean()
    assert frame.loc[(loss_label, "eos"), "Total"] == f"{total:.2f}"


def test_csv_copies(store, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--format", "csv", "--out",
                        str(tmp_path)]) == 0
    header = (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert "test_bac_mean" in header and "test_bac_std" in header and "runs_n" in header
    assert (tmp_path / "runtime.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "empty"], "error: no finished runs in experiment 'empty'"),
    (["--experiment", "missing"], "error: unknown experiment 'missing'"),
    (["--experiment", EXPERIMENT, "--format", "pdf"], "error: unknown format 'pdf'"),
    (["--experiment", EXPERIMENT, "--gm", "mean"], "error: unknown GM form 'mean'"),
])
def test_errors_are_one_line(store, capsys, argv, message):
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_latex_escape():
    assert report.latex_escape("a_b & 50% {x}") == r"a\_b \& 50\% \{x\}"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles(store, tmp_path):
    assert report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path)]) == 0
    inputs = "\n".join(rf"\input{{{path.name}}}" for path in sorted(tmp_path.glob("*.tex")))
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        f"{inputs}\n\\end{{document}}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
