"""End-to-end in a real browser: `mlflow ui` over a small grid's store, driven through headless
Chromium with Playwright, shows the grid's parent with its nested cells, a cell's headline
metrics, per-epoch curve and confusion matrix, and the report run's PDF of all tables.

Playwright's own browser download does not work here: the test drives Debian's Chromium
(`apt-get install chromium`, as .ci/run does) and is skipped, with the reason, without it.
Screenshots of every view go to the test's tmp_path and, where the environment variable
UI_SCREENSHOTS names a folder, there too."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

import pytest

from benchmark import report, schema

pytestmark = pytest.mark.ui

GRID_NAME = "ui-grid"
GRID_SPEC = f"""\
name: {GRID_NAME}
experiment: ui-test
datasets: [digits]
methods: [none, eos]
seeds: [0]
settings: {{epochs: 2, head_epochs: 1}}
"""
# The names the UI is checked against (grid parent and cells: benchmark.studies; metrics:
# benchmark.schema; the confusion matrix: benchmark.pipeline).
PARENT_TAG, PARENT_ROLE = "grid_role", "parent"
NESTED_UNDER = "mlflow.parentRunId"
CURVE = schema.phase(1, "val_bac")
HEADLINE = (schema.test("bac"), schema.test("gm"))
CONFUSION_MATRIX = "results/confusion_matrix.png"

SERVER_START_S = 60  # bound on the wait for `mlflow ui` to answer, once the store is made
STEP_TIMEOUT_MS = 20_000  # bound on each wait for a page element
# The server with neither telemetry nor the job runner (its worker pool takes ~20 s to start
# on two busy cores and serves nothing these pages use).
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Keeps the assistant panel from covering a third of every screenshot.
CLOSED_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'); "
                    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', "
                    "'true');")


@pytest.fixture
def chromium() -> str:
    """The system Chromium's path; the test is skipped, saying why, where it or Playwright is
    missing (checked before the store is made, which takes most of the test's time)."""
    pytest.importorskip("playwright.sync_api",
                        reason="the playwright package is not installed (pip install -e '.[test]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it): "
                    "the MLflow UI cannot be tested in a browser")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store_uri: str, folder: Path):
    """`mlflow ui` on 127.0.0.1 over ``store_uri``, started now (it answers some seconds
    later: see ``wait_until_up``); yields its base URL and process, and stops it, with every
    process it started, on the way out."""
    port = free_port()
    log = open(folder / "mlflow-ui.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env={**os.environ, **SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: stopped whole below
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def wait_until_up(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow ui exited with {process.returncode}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(f"mlflow ui did not answer within {SERVER_START_S} s:\n"
                f"{log.read_text(errors='replace')[-3000:]}")


@dataclass
class GridStore:
    """A small grid's store, its report, and the `mlflow ui` serving them."""

    base_url: str
    spec: Path
    client: object  # mlflow.MlflowClient

    def runs(self, filter_string: str = ""):
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(ids, filter_string)


@pytest.fixture
def grid_store(chromium, mlflow_store, tmp_path, monkeypatch) -> Iterator[GridStore]:
    """Two cells (digits; methods none and eos; one seed; 2 + 1 epochs) run as a grid, its
    report logged, and `mlflow ui` over the store (started first: it boots while the cells
    train)."""
    import mlflow

    from benchmark.studies import grid_summary, run_grid

    for name, value in SERVER_ENV.items():
        monkeypatch.setenv(name, value)
    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID_SPEC)
    with mlflow_ui(mlflow_store, tmp_path) as (base_url, process):
        counts = run_grid(spec, progress=False)
        assert counts["failed"] == 0 and counts["ran"] == 2, grid_summary(counts)
        assert report.main(["--grid", str(spec), "--out", str(tmp_path / "reports")]) == 0
        wait_until_up(base_url, process, tmp_path / "mlflow-ui.log")
        yield GridStore(base_url, spec, mlflow.MlflowClient(mlflow_store))


class Browser:
    """One headless Chromium page on the UI; every request to any other address is refused."""

    def __init__(self, page, base_url: str, shots: Path):
        self.page, self.base_url, self.shots = page, base_url, shots
        self.refused: list[str] = []

    def open(self, route: str) -> None:
        """A page of the UI by its hash route, e.g. ``/experiments/1/runs``."""
        self.page.goto(f"{self.base_url}/#{route}")

    def shot(self, name: str) -> Path:
        """A screenshot, kept in tmp_path and copied to $UI_SCREENSHOTS where set."""
        self.page.wait_for_timeout(300)  # lets charts and previews finish drawing
        path = self.shots / f"{len(list(self.shots.glob('*.png'))) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        if os.environ.get("UI_SCREENSHOTS"):
            target = Path(os.environ["UI_SCREENSHOTS"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
        return path


@pytest.fixture
def browser(chromium, grid_store, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which CI is.
        chrome = playwright.chromium.launch(executable_path=chromium, headless=True,
                                            args=["--no-sandbox"])
        try:
            context = chrome.new_context(viewport={"width": 1600, "height": 1000})
            context.add_init_script(CLOSED_ASSISTANT)
            view = Browser(context.new_page(), grid_store.base_url, shots)
            view.page.set_default_timeout(STEP_TIMEOUT_MS)

            def only_this_server(route):
                url = route.request.url
                if url.startswith((grid_store.base_url + "/", "data:", "blob:")):
                    route.continue_()
                else:
                    view.refused.append(url)
                    route.abort()

            context.route("**/*", only_this_server)
            yield view
        finally:
            chrome.close()


def artifact_paths(client, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, folder):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


def shown_number(text: str) -> float:
    match = re.search(r"-?\d+(\.\d+)?(e-?\d+)?", text)
    assert match, f"no number in {text!r}"
    return float(match.group())


def test_mlflow_ui_shows_grid_cells_curves_and_report(grid_store, browser, subtests):
    client, page = grid_store.client, browser.page
    cells = [run for run in grid_store.runs() if HEADLINE[0] in run.data.metrics]
    assert len(cells) == 2, f"expected the grid's 2 cells (runs with {HEADLINE[0]})"
    experiment_id = cells[0].info.experiment_id
    # The cell that trained phase 1 (the other one reuses it) has the per-epoch curves.
    trained = [run for run in cells if len(client.get_metric_history(run.info.run_id, CURVE)) >= 2]
    assert trained, f"no cell has a per-epoch {CURVE} curve (2 epochs)"
    cell = trained[0]
    cell_route = f"/experiments/{experiment_id}/runs/{cell.info.run_id}"

    with subtests.test("the grid's parent run with its cells nested under it"):
        parents = grid_store.runs(f"tags.{PARENT_TAG} = '{PARENT_ROLE}'")
        assert [run.info.run_name for run in parents] == [GRID_NAME], \
            f"expected one run tagged {PARENT_TAG}={PARENT_ROLE} named {GRID_NAME!r}"
        parent = parents[0]
        assert parent.info.experiment_id == experiment_id
        for run in cells:
            assert run.data.tags.get(NESTED_UNDER) == parent.info.run_id, \
                f"cell {run.info.run_name} is not nested under the grid's parent run"
        browser.open(f"/experiments/{experiment_id}/runs")
        # The run-name column is pinned left: its part of each row holds the name.
        rows = page.locator(".ag-pinned-left-cols-container")
        parent_name = rows.locator(f'[role="row"][row-id="{parent.info.run_id}"]').get_by_text(
            GRID_NAME, exact=True)
        parent_name.wait_for()
        cell_names = [rows.locator(f'[role="row"][row-id="{run.info.run_id}"]').get_by_text(
            run.info.run_name, exact=True) for run in cells]
        browser.shot("runs-collapsed")
        if not cell_names[0].is_visible():  # the UI shows a parent's children collapsed
            rows.locator(f'[role="row"][row-id="{parent.info.run_id}"] '
                         f'[col-id*="Run Name"] button').first.click()
        for name, run in zip(cell_names, cells):
            name.wait_for()
            # Nested: listed below the parent, the name indented under the parent's.
            assert name.bounding_box()["y"] > parent_name.bounding_box()["y"]
            assert name.bounding_box()["x"] > parent_name.bounding_box()["x"], \
                f"{run.info.run_name} is listed, but not indented under {GRID_NAME}"
        browser.shot("runs-parent-expanded")
        browser.open(cell_route)
        page.get_by_role("link", name=GRID_NAME, exact=True).wait_for()  # "Parent run: ui-grid"

    with subtests.test("a cell's page shows its headline metrics"):
        browser.open(cell_route)
        search = page.get_by_placeholder("Search metrics")
        for metric in HEADLINE:
            search.fill(metric)
            row = page.get_by_role("row").filter(
                has=page.get_by_role("link", name=metric, exact=True))
            row.wait_for()
            value = shown_number(row.get_by_role("cell").nth(1).inner_text())
            assert value == pytest.approx(cell.data.metrics[metric], rel=1e-3, abs=1e-6), metric
        search.fill(schema.test(""))
        browser.shot("cell-overview-headline-metrics")

    with subtests.test("a cell's model-metric charts show its per-epoch curve"):
        browser.open(cell_route)
        page.get_by_role("tab", name="Model metrics").click()
        page.get_by_placeholder("Search metric charts").fill(CURVE)
        chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has_text=f"({CURVE})")  # the legend: run name (metric)
        chart.first.wait_for()
        assert chart.first.get_by_text("Step", exact=True).is_visible(), \
            f"the {CURVE} chart is no line over steps (epochs)"
        lines = chart.first.locator("path.js-line").evaluate_all(
            "paths => paths.map(path => path.getAttribute('d') || '')")
        assert any("L" in line for line in lines), f"the {CURVE} line joins no two epochs"
        browser.shot("cell-model-metrics-curve")

    with subtests.test("a cell's artifacts preview the confusion matrix"):
        assert CONFUSION_MATRIX in artifact_paths(client, cell.info.run_id)
        with page.expect_response(lambda answer: "get-artifact" in answer.url
                                  and CONFUSION_MATRIX in unquote(answer.url)) as fetched:
            browser.open(f"{cell_route}/artifacts/{CONFUSION_MATRIX}")
        assert fetched.value.status == 200
        image = page.locator('img[src^="blob:"]').first
        image.wait_for()
        page.wait_for_function("image => image.complete && image.naturalWidth > 100",
                               arg=image.element_handle())
        browser.shot("cell-artifacts-confusion-matrix")

    with subtests.test("the report run shows its PDF of all tables"):
        reports = grid_store.runs(f"tags.{report.TAG_ROLE} = '{report.REPORT_ROLE}'")
        assert len(reports) == 1, f"expected one run tagged {report.TAG_ROLE}={report.REPORT_ROLE}"
        report_run = reports[0]
        files = artifact_paths(client, report_run.info.run_id)
        pdfs = [f for f in files if f.endswith(".pdf") and "tables" in Path(f).name]
        if not pdfs:
            assert any(f.endswith(".tex") for f in files), f"no .tex table in {files}"
            if shutil.which("pdflatex") is None:
                pytest.skip("pdflatex is not installed: the report run holds the .tex tables "
                            "but no PDF to preview (apt-get install texlive-latex-recommended)")
            pytest.fail(f"pdflatex is installed but the report run holds no PDF of the "
                        f"tables; its artifacts: {files}")
        browser.open(f"/experiments/{report_run.info.experiment_id}/runs/"
                     f"{report_run.info.run_id}/artifacts/{pdfs[0]}")
        canvas = page.locator("canvas.react-pdf__Page__canvas").first
        canvas.wait_for()
        # Drawn: some dark pixels (the tables' text and rules) on the white page.
        page.wait_for_function(
            """canvas => {
                const pixels = canvas.getContext('2d')
                    .getImageData(0, 0, canvas.width, canvas.height).data;
                let dark = 0;
                for (let i = 0; i < pixels.length; i += 4) if (pixels[i] < 128) dark++;
                return dark > 200;
            }""", arg=canvas.element_handle())
        browser.shot("report-artifacts-pdf")
