"""Diagnostics: callbacks that log analyses (metrics and figures) into every cell's run."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from benchmark.registry import DIAGNOSTICS

if TYPE_CHECKING:
    from benchmark.cell import Cell


class Diagnostic:
    """Base of every registered diagnostic.  ``default`` ones run unless the user names others;
    expensive ones are opt-in (``--diagnostics NAME``).

    ``on_epoch_end(cell, phase, epoch, record)`` sees every epoch of phases 1 and 3;
    ``on_cell_end(cell, results, folder)`` runs after the test evaluation with ``results``
    (``phase1``: embeddings and weights, ``head``, ``train_x``/``train_y``: the embeddings the
    head was trained on, ``metrics``, ``confusion``), writes figures into ``folder`` (logged
    under ``diagnostics/``) and returns metrics to log.
    """

    default: bool = False

    def on_epoch_end(self, cell: "Cell", phase: str, epoch: int, record: dict) -> None:
        pass

    def on_cell_end(self, cell: "Cell", results: dict, folder: Path) -> dict[str, float]:
        return {}


def default_names() -> list[str]:
    return [name for name in DIAGNOSTICS.names() if DIAGNOSTICS.get(name).default]


def chosen(names: list[str] | None) -> list[Diagnostic]:
    """The diagnostics a cell runs: ``names`` (unknown names fail in one line), or the defaults
    when ``None``."""
    return [DIAGNOSTICS.create(name) for name in (default_names() if names is None else names)]


def run_diagnostics(cell: "Cell", results: dict, diagnostics: list[Diagnostic]) -> None:
    """Every diagnostic's end-of-cell analysis, logged into the cell's run."""
    if not diagnostics:
        return
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for diagnostic in diagnostics:
            metrics.update(diagnostic.on_cell_end(cell, results, Path(tmp)))
        if any(Path(tmp).iterdir()):
            cell.run.log_artifacts(tmp, "diagnostics")
    cell.log_metrics(metrics)
