"""Diagnostics: callbacks that log analyses (metrics and figures) into every cell's run.

The built-in ones (``python -m benchmark list``; the measures are in
``benchmark.diagnostics_measures``), with what they log:

| name | default | metrics | files under ``diagnostics/`` |
| --- | --- | --- | --- |
| ``longtail`` | yes | ``longtail/{many,medium,few}_acc``, ``longtail/{many,medium,few}_classes``, ``longtail/many_above``, ``longtail/few_below``, ``longtail/top1_error`` | |
| ``gap`` | yes | ``gap/tp``, ``gap/fp``, ``gap/real``; ``class/gap_tp_<c>``, ``class/gap_fp_<c>``, ``class/gap_real_<c>`` | ``gap_by_class_size.png``, ``gap_tp_fp.png`` |
| ``topk`` | yes | ``diag/topk_coverage_{train,tp,fp}_k{2,3,5,7}``; ``class/topk_coverage_{set}_k{K}_<c>`` | |
| ``topk-figure`` | no | as ``topk`` | ``topk_coverage.png`` |
| ``weights`` | yes | ``diag/fe_frobenius_{tp,fp}``, ``diag/weight_norm_ratio``; ``class/weight_norm_<c>``, ``class/fe_mean_diff_{tp,fp}_<c>``, ``class/fe_top_mean_<c>``, ``class/ce_top_mean_<c>`` | ``weight_norms.png``, ``class_means.npz`` |
| ``overlap`` | yes | ``diag/{fe,ce}_overlap_{tp,fp}``; ``class/{fe,ce}_overlap_{tp,fp}_<c>`` | |
| ``eos-record`` | yes (EOS cells only) | ``eos/synthetic``, ``eos/enemy_share``, ``eos/step_mean``, ``eos/fallback_classes``; ``class/eos_enemy_share_<c>``, ``class/eos_step_mean_<c>`` | ``eos_record.csv`` |
| ``eos-figure`` | no | as ``eos-record`` | ``eos_record.csv``, ``eos_record.png`` |
| ``tsne`` | no | | ``embedding_map.png`` |

Sets: ``train`` is the real long-tailed training subset (by true class); ``tp`` and ``fp`` are
the test set's true and false positives of each *predicted* class (the paper's reference
class).  Gaps are measured against the embeddings the head was trained on (real plus added,
as ``gap/overall``); ``gap/real`` against the real subset alone, so the two show what the
added points did to the footprint.  A range gap grows with the number of test points, so a
class's few false positives may show a smaller gap than its many true positives.  Weight norms
are those of the final head's class weights as its linear form has them (a wrapped or
rescaled head included; a cosine head's raw weight rows, which it normalises) and of phase
1's head.  Long-tail groups: more than 100 / fewer than 20 training images, both scaled by
n_max / 500 where the largest class has fewer than 500 (``longtail_thresholds``).  A mean
over classes leaves out classes without members; such a class logs no per-class value.

Cost: the measures take milliseconds; figures cost most (matplotlib, a quarter to half a
second each).  The defaults draw three; a ``-figure`` variant draws its diagnostic's own
(name it instead of the plain one), and ``tsne`` takes seconds (a sample of at most
``EmbeddingMap.max_points`` points).
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmark import diagnostics_measures as measures
from benchmark.errors import one_line
from benchmark.metrics import generalization_gap
from benchmark.registry import DIAGNOSTICS

if TYPE_CHECKING:
    from benchmark.cell import Cell


class Diagnostic:
    """Base of every registered diagnostic.  ``default`` ones run unless the user names others;
    expensive ones are opt-in (``--diagnostics NAME``).

    ``on_epoch_end(cell, phase, epoch, record)`` sees every epoch of phases 1 and 3;
    ``on_cell_end(cell, results, folder)`` runs after the test evaluation with ``results``
    (``phase1``: embeddings and weights, ``head``, ``train_x``/``train_y``: the embeddings the
    head was trained on, ``metrics``, ``confusion``, ``resampler``: the fitted sampler or None),
    writes figures into ``folder`` (logged under ``diagnostics/``) and returns metrics to log.
    """

    default: bool = False
    name: str = ""  # the registered name, set by ``chosen``

    def on_epoch_end(self, cell: "Cell", phase: str, epoch: int, record: dict) -> None:
        pass

    def on_cell_end(self, cell: "Cell", results: dict, folder: Path) -> dict[str, float]:
        return {}


def default_names() -> list[str]:
    return [name for name in DIAGNOSTICS.names() if DIAGNOSTICS.get(name).default]


def chosen(names: list[str] | None) -> list[Diagnostic]:
    """The diagnostics a cell runs: ``names`` (unknown names fail in one line), or the defaults
    when ``None``."""
    made = []
    for name in default_names() if names is None else names:
        diagnostic = DIAGNOSTICS.create(name)
        diagnostic.name = name
        made.append(diagnostic)
    return made


def run_diagnostics(cell: "Cell", results: dict, diagnostics: list[Diagnostic]) -> None:
    """Every diagnostic's end-of-cell analysis, logged into the cell's run.  A diagnostic
    that fails costs only its own output (a warning line, and its name in the run's tag
    ``diagnostics_failed``): the cell's scores are already computed and still get logged."""
    if not diagnostics:
        return
    metrics: dict[str, float] = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for diagnostic in diagnostics:
            try:
                metrics.update(diagnostic.on_cell_end(cell, results, Path(tmp)))
            except Exception as err:  # an analysis must not cost the run it analyses
                name = diagnostic.name or type(diagnostic).__name__
                failed.append(name)
                print(f"warning: diagnostic {name} failed and is left out: "
                      f"{type(err).__name__}: {one_line(err)}", file=sys.stderr)
        if any(Path(tmp).iterdir()):
            cell.run.log_artifacts(tmp, "diagnostics")
    if failed:
        cell.run.set_tags({"diagnostics_failed": ", ".join(failed)})
    cell.log_metrics(metrics)


# What the diagnostics share ------------------------------------------------------------------
SETS = ("train", "tp", "fp")
SET_TITLES = {"train": "train", "tp": "test true positives", "fp": "test false positives"}


def per_class(name: str, c: int) -> str:
    """``class/<name>_<c>``, the per-class section of ``benchmark.schema``."""
    return f"class/{name}_{c}"


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The entries with a number: a class without members logs nothing rather than NaN."""
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}


@dataclass
class CellEmbeddings:
    """One cell's embeddings and head as the diagnostics see them (computed once per cell).

    ``train_*``: the real training subset; ``head_*``: what the head was trained on (the real
    subset first, then what the method added); ``test_pred``: the final model's predictions;
    ``form``: the head's linear form (None for a head that has none: CE diagnostics skip)."""

    classes: list[str]
    counts: np.ndarray  # real training images per class
    train_x: np.ndarray
    train_y: np.ndarray
    head_x: np.ndarray
    head_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_pred: np.ndarray
    form: measures.LinearForm | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def order(self) -> list[int]:
        """Classes by training size, largest first (ties by index)."""
        return sorted(range(self.num_classes), key=lambda c: (-self.counts[c], c))

    def subset(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings, class)`` of a set: train by true class, tp / fp by prediction."""
        if name == "train":
            return self.train_x, self.train_y
        hit = self.test_pred == self.test_y
        rows = hit if name == "tp" else ~hit
        return self.test_x[rows], self.test_pred[rows]


def cell_embeddings(cell: "Cell", results: dict) -> CellEmbeddings:
    """The shared view, made on first use and kept in ``results`` for the other diagnostics."""
    if "diagnostics_view" in results:
        return results["diagnostics_view"]
    import torch

    from benchmark.train import predict

    emb, head = results["phase1"].embeddings, results["head"]
    device = next(head.parameters()).device
    test_x = emb["test_x"]
    test_pred = predict(head, torch.as_tensor(test_x, dtype=torch.float32, device=device)
                        ).argmax(1).numpy()
    view = CellEmbeddings(
        classes=list(cell.data.train.classes), counts=np.asarray(cell.data.class_counts),
        train_x=emb["train_x"], train_y=emb["train_y"],
        head_x=np.asarray(results["train_x"]), head_y=np.asarray(results["train_y"]),
        test_x=test_x, test_y=emb["test_y"], test_pred=test_pred,
        form=measures.head_linear_form(head, test_x[:512]))
    results["diagnostics_view"] = view
    return view


def added_label(cell: "Cell") -> str:
    """What a method's rows beyond the real subset are ("synthetic" unless it says)."""
    return getattr(cell.method, "added_points", "synthetic")


# Figures -------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_ticks(ax, view: CellEmbeddings) -> None:
    """Classes along x, largest first, labelled with their training images."""
    labels = [f"{view.classes[c]}\n({view.counts[c]})" for c in view.order]
    step = max(1, len(labels) // 25)  # 100 classes stay legible
    ax.set_xticks(range(len(labels))[::step], labels[::step], fontsize=7)
    ax.set_xlabel("class (real training images), largest first")


# Margins (inches: left, right, bottom, top) of the default figures: a fixed layout costs a
# third less than matplotlib's tight layout, which every cell would pay.
DEFAULT_MARGINS = (0.95, 0.15, 0.75, 0.55)


def save(fig, path: Path, margins: tuple[float, float, float, float] | None = None) -> None:
    """Write a PNG; ``margins`` fix the layout (inches), else it is laid out tightly."""
    if margins is None:
        fig.tight_layout()
    else:
        width, height = fig.get_size_inches()
        left, right, bottom, top = margins
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def title_of(cell: "Cell") -> str:
    from benchmark.pipeline import cell_tag

    return f"{cell_tag(cell.cfg)}, seed {cell.cfg.seed}"


# Long-tail groups ----------------------------------------------------------------------------
@DIAGNOSTICS.register("longtail")
class LongTail(Diagnostic):
    """Many/medium/few-shot accuracy (thresholds 100/20 scaled by n_max/500 below 500) and top-1 error."""

    default = True

    def on_cell_end(self, cell, results, folder):
        counts = cell.data.class_counts
        many_above, few_below = measures.longtail_thresholds(counts)
        groups = measures.longtail_groups(counts)
        metrics = {f"longtail/{g}_acc": a
                   for g, a in measures.group_accuracy(results["confusion"], groups).items()}
        metrics.update({f"longtail/{g}_classes": int((groups == g).sum())
                        for g in measures.GROUPS})
        cm = np.asarray(results["confusion"])
        metrics.update({"longtail/many_above": many_above, "longtail/few_below": few_below,
                        "longtail/top1_error": 1.0 - np.trace(cm) / max(cm.sum(), 1)})
        return metrics


# Generalization gap --------------------------------------------------------------------------
@DIAGNOSTICS.register("gap")
class GapDiagnostic(Diagnostic):
    """The EOS paper's gap per class against class size, and for test true versus false positives."""

    default = True

    def on_cell_end(self, cell, results, folder):
        view = cell_embeddings(cell, results)
        c_all = view.num_classes
        gaps = {"head": generalization_gap(view.head_x, view.head_y, view.test_x, view.test_y,
                                           c_all)[1],
                "real": generalization_gap(view.train_x, view.train_y, view.test_x,
                                           view.test_y, c_all)[1]}
        for name in ("tp", "fp"):
            x, by = view.subset(name)
            gaps[name] = generalization_gap(view.head_x, view.head_y, x, by, c_all)[1] \
                if len(x) else np.full(c_all, np.nan)
        metrics = {}
        for name in ("real", "tp", "fp"):
            values = gaps[name]
            if np.isfinite(values).any():
                metrics[f"gap/{name}"] = float(np.nanmean(values))
            metrics.update({per_class(f"gap_{name}", c): v for c, v in enumerate(values)})
        self.plot_by_size(cell, view, gaps, folder / "gap_by_class_size.png")
        self.plot_tp_fp(cell, view, gaps, folder / "gap_tp_fp.png")
        return finite(metrics)

    @staticmethod
    def plot_by_size(cell, view: CellEmbeddings, gaps: dict, path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        added = len(view.head_x) > len(view.train_x)
        series = [("real", "real training subset", "o")]
        if added:
            series.insert(0, ("head", f"head's training set (real + {added_label(cell)})", "s"))
        for key, label, marker in series:
            ax.plot(view.counts, gaps[key], marker, label=label, alpha=0.8)
        for c in range(view.num_classes):
            if np.isfinite(gaps["real"][c]) and view.num_classes <= 20:
                ax.annotate(view.classes[c], (view.counts[c], gaps["real"][c]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        if max(view.counts) >= 5 * max(1, min(view.counts)):
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("real training images of the class")
        ax.set_ylabel("generalization gap (Manhattan, floored)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Gap per class against class size\n{title_of(cell)}", fontsize=9)
        save(fig, path, DEFAULT_MARGINS)

    @staticmethod
    def plot_tp_fp(cell, view: CellEmbeddings, gaps: dict, path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.45 * view.num_classes)), 3.8))
        for offset, name, colour in ((-0.2, "tp", "tab:green"), (0.2, "fp", "tab:red")):
            values = gaps[name][view.order]
            members = np.bincount(view.subset(name)[1], minlength=view.num_classes)[view.order]
            shown = np.flatnonzero(np.isfinite(values))  # no bar: the class has no such point
            bars = ax.bar(shown + offset, values[shown], width=0.4, color=colour,
                          label=f"{SET_TITLES[name]} (mean {np.nanmean(values):.3g})"
                          if len(shown) else SET_TITLES[name])
            ax.bar_label(bars, [f"{n}" for n in members[shown]], fontsize=6)
        class_ticks(ax, view)
        ax.set_ylabel("gap to the class's training range\n(number over a bar: its points)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"Gap of test true vs false positives per predicted class\n"
                     f"{title_of(cell)}", fontsize=9)
        save(fig, path, DEFAULT_MARGINS)


# Top-K coverage -------------------------------------------------------------------------------
@DIAGNOSTICS.register("topk")
class TopKCoverage(Diagnostic):
    """Top-K coverage (K = 2, 3, 5, 7) of the class embeddings, per class and overall, for train, test TP and FP."""

    default = True
    draws = False  # its figure: ``topk-figure``

    def on_cell_end(self, cell, results, folder):
        view = cell_embeddings(cell, results)
        if view.form is None:
            return {}
        metrics, shares = {}, {}
        for name in SETS:
            x, by = view.subset(name)
            if not len(x):
                continue
            covered = measures.topk_covered(view.form.features(x), view.form.weight,
                                            view.form.bias, predicted=by)
            shares[name] = measures.coverage_by_class(covered, by, view.num_classes)
            for i, k in enumerate(measures.COVERAGE_KS):
                metrics[f"diag/topk_coverage_{name}_k{k}"] = float(covered[:, i].mean())
                metrics.update({per_class(f"topk_coverage_{name}_k{k}", c): shares[name][c, i]
                                for c in range(view.num_classes)})
        if self.draws:
            self.plot(cell, view, shares, folder / "topk_coverage.png")
        return finite(metrics)

    @staticmethod
    def plot(cell, view: CellEmbeddings, shares: dict, path: Path) -> None:
        plt = pyplot()
        width = min(16.0, max(4.0, 0.35 * view.num_classes))
        fig, axes = plt.subplots(1, len(shares), figsize=(width * len(shares), 3.8),
                                 squeeze=False, sharey=True)
        positions = np.arange(view.num_classes)
        for ax, (name, share) in zip(axes[0], shares.items()):
            for i, k in enumerate(measures.COVERAGE_KS):
                ax.plot(positions, share[view.order, i], marker="o", markersize=3,
                        label=f"K = {k}")
            class_ticks(ax, view)
            ax.set_title(SET_TITLES[name], fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("share of instances covered by the top-K CE")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Top-K coverage per predicted class: {title_of(cell)}", fontsize=9)
        save(fig, path)


@DIAGNOSTICS.register("topk-figure")
class TopKCoverageFigure(TopKCoverage):
    """The topk diagnostic with its per-class figure (opt-in: the figure costs about half a second)."""

    default = False
    draws = True


# Weights and mean magnitudes -------------------------------------------------------------------
@DIAGNOSTICS.register("weights")
class WeightsAndMagnitudes(Diagnostic):
    """Per-class weight norms (figure), class-mean FE and CE magnitudes, Frobenius of train-vs-test TP/FP FE means."""

    default = True

    def on_cell_end(self, cell, results, folder):
        view = cell_embeddings(cell, results)
        c_all = view.num_classes
        metrics, norms = {}, {}
        head_weight = getattr(results["head"], "weight", None)
        if view.form is not None and not view.form.normalise:
            norms["final head"] = measures.weight_norms(view.form.weight)
        elif head_weight is not None:  # a cosine head: the rows it normalises
            norms["final head"] = measures.weight_norms(head_weight.detach().cpu().numpy())
        phase1_weight = results["phase1"].state_dict.get("head.weight")
        if phase1_weight is not None:
            norms["phase-1 head"] = measures.weight_norms(phase1_weight.float().numpy())
        if "final head" in norms:
            final = norms["final head"]
            metrics.update({per_class("weight_norm", c): v for c, v in enumerate(final)})
            metrics["diag/weight_norm_ratio"] = float(final.max() / max(final.min(), 1e-12))
        means = {name: measures.class_means(*view.subset(name), c_all) for name in SETS}
        for name in ("tp", "fp"):
            metrics[f"diag/fe_frobenius_{name}"] = measures.frobenius_of_difference(
                means["train"], means[name])
            metrics.update({per_class(f"fe_mean_diff_{name}", c): d for c, d in
                            enumerate(measures.row_distances(means["train"], means[name]))})
        metrics.update({per_class("fe_top_mean", c): v for c, v in enumerate(
            np.max(np.where(np.isfinite(means["train"]), means["train"], -np.inf), axis=1))})
        if view.form is not None:
            ce = view.form.features(view.train_x) * view.form.weight[view.train_y]
            ce_means = measures.class_means(ce, view.train_y, c_all)
            metrics.update({per_class("ce_top_mean", c): v for c, v in enumerate(
                np.max(np.where(np.isfinite(ce_means), ce_means, -np.inf), axis=1))})
        np.savez_compressed(folder / "class_means.npz",
                            **{f"fe_{name}": m for name, m in means.items()},
                            **{f"weight_norms_{k.split()[0]}": v for k, v in norms.items()})
        if norms:
            self.plot(cell, view, norms, folder / "weight_norms.png")
        return finite(metrics)

    @staticmethod
    def plot(cell, view: CellEmbeddings, norms: dict, path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.45 * view.num_classes)), 3.8))
        positions = np.arange(view.num_classes)
        for name, values in norms.items():
            ax.plot(positions, values[view.order], marker="o", label=name)
        class_ticks(ax, view)
        ax.set_ylabel("norm of the class's weight row")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Classifier weight norms per class\n{title_of(cell)}", fontsize=9)
        save(fig, path, DEFAULT_MARGINS)


# Feature identities ---------------------------------------------------------------------------
@DIAGNOSTICS.register("overlap")
class IdentityOverlap(Diagnostic):
    """Overlap of the class top-10 FE and CE identities between train and test TP / FP."""

    default = True

    def on_cell_end(self, cell, results, folder):
        view = cell_embeddings(cell, results)
        c_all = view.num_classes
        kinds = {"fe": lambda x, by: x}
        if view.form is not None:
            form = view.form
            kinds["ce"] = lambda x, by: form.features(x) * form.weight[by]
        metrics = {}
        for kind, values in kinds.items():
            members = {name: measures.class_top_members(values(*view.subset(name)),
                                                        view.subset(name)[1], c_all)
                       for name in SETS}
            for name in ("tp", "fp"):
                overlap = measures.identity_overlap(members["train"], members[name])
                if np.isfinite(overlap).any():
                    metrics[f"diag/{kind}_overlap_{name}"] = float(np.nanmean(overlap))
                metrics.update({per_class(f"{kind}_overlap_{name}", c): v
                                for c, v in enumerate(overlap)})
        return finite(metrics)


# EOS's own record -----------------------------------------------------------------------------
@DIAGNOSTICS.register("eos-record")
class EOSRecord(Diagnostic):
    """EOS's record per class: synthetic points, share of enemy partners, step sizes, fallback classes."""

    default = True
    draws = False  # its figure: ``eos-figure``

    def on_cell_end(self, cell, results, folder):
        sampler = fitted_eos(results)
        if sampler is None:
            return {}
        view = cell_embeddings(cell, results)
        record = measures.eos_record(view.train_y, sampler.base_indices_,
                                     sampler.partner_indices_, sampler.steps_,
                                     sampler.fallback_classes_, view.num_classes)
        import pandas as pd

        pd.DataFrame({"class": view.classes, "train_real": view.counts, **record}).to_csv(
            folder / "eos_record.csv", index=False)
        if self.draws:
            self.plot(cell, view, record, sampler.steps_, folder / "eos_record.png")
        metrics = {"eos/synthetic": float(len(sampler.steps_)),
                   "eos/fallback_classes": float(record["fallback"].sum())}
        if len(sampler.steps_):
            partners = np.asarray(view.train_y)[sampler.partner_indices_]
            bases = np.asarray(view.train_y)[sampler.base_indices_]
            metrics["eos/enemy_share"] = float((partners != bases).mean())
            metrics["eos/step_mean"] = float(np.mean(sampler.steps_))
        for name in ("enemy_share", "step_mean"):
            metrics.update({per_class(f"eos_{name}", c): v for c, v in enumerate(record[name])})
        return finite(metrics)

    @staticmethod
    def plot(cell, view: CellEmbeddings, record: dict, steps: np.ndarray, path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        positions = np.arange(view.num_classes)
        order = view.order
        axes[0].bar(positions, view.counts[order], color="tab:blue", label="real")
        axes[0].bar(positions, record["synthetic"][order], bottom=view.counts[order],
                    color="tab:orange", label="synthetic",
                    hatch=["//" if record["fallback"][c] else "" for c in order])
        if record["fallback"].any():
            axes[0].bar([0], [0], color="tab:orange", hatch="//",
                        label="synthetic, fallback rule")
        axes[0].set_ylabel("training embeddings")
        axes[0].legend(fontsize=8)
        axes[1].bar(positions, np.nan_to_num(record["enemy_share"][order]), color="tab:red")
        axes[1].set_ylim(0, 1.02)
        axes[1].set_ylabel("share of partners of another class")
        for ax in axes[:2]:
            class_ticks(ax, view)
        axes[2].hist(steps, bins=20, range=(0, 1), color="tab:gray")
        axes[2].set_xlabel("step toward the partner")
        axes[2].set_ylabel("synthetic points")
        fig.suptitle(f"EOS record: {title_of(cell)}", fontsize=9)
        save(fig, path)


@DIAGNOSTICS.register("eos-figure")
class EOSRecordFigure(EOSRecord):
    """The eos-record diagnostic with its figure (opt-in: the figure costs about half a second)."""

    default = False
    draws = True


def fitted_eos(results: dict):
    """The fitted sampler that made the head's training set (the pipeline's
    ``results["resampler"]``) when it kept EOS's record of every point, else None."""
    sampler = results.get("resampler")
    return sampler if all(hasattr(sampler, name) for name in EOS_RECORD) else None


# What a fitted EOS sampler records of every synthetic point (``benchmark.eos.EOS``).
EOS_RECORD = ("base_indices_", "partner_indices_", "steps_", "fallback_classes_")


# The embedding map ----------------------------------------------------------------------------
@DIAGNOSTICS.register("tsne")
class EmbeddingMap(Diagnostic):
    """A t-SNE map (scikit-learn) of the head's training embeddings, real and synthetic points told apart (opt-in: seconds to minutes)."""

    default = False
    max_points = 3000  # t-SNE's cost grows with the points: a stratified sample beyond this

    def on_cell_end(self, cell, results, folder):
        from sklearn.manifold import TSNE

        from benchmark.cell import stream_seed

        view = cell_embeddings(cell, results)
        rng = np.random.default_rng(stream_seed(cell.cfg.seed, "tsne"))
        rows = np.arange(len(view.head_x))
        if len(rows) > self.max_points:
            rows = np.sort(rng.choice(rows, size=self.max_points, replace=False))
        x = view.head_x[rows]
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                      random_state=int(rng.integers(2**31 - 1))).fit_transform(x)
        self.plot(cell, view, points, view.head_y[rows], rows >= len(view.train_x),
                  len(view.head_x), folder / "embedding_map.png")
        return {}

    @staticmethod
    def plot(cell, view: CellEmbeddings, points: np.ndarray, labels: np.ndarray,
             added: np.ndarray, total: int, path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
        colours = plt.get_cmap("tab10" if view.num_classes <= 10 else "tab20")
        for c in range(view.num_classes):
            colour = colours(c % colours.N)
            real, extra = (labels == c) & ~added, (labels == c) & added
            ax.scatter(points[extra, 0], points[extra, 1], s=9, marker="x", color=colour,
                       alpha=0.45, linewidths=0.7)
            ax.scatter(points[real, 0], points[real, 1], s=12, marker="o", color=colour,
                       edgecolors="black", linewidths=0.3,
                       label=view.classes[c] if view.num_classes <= 20 else None)
        ax.scatter([], [], s=12, marker="o", color="white", edgecolors="black", label="real")
        ax.scatter([], [], s=12, marker="x", color="black", label=added_label(cell))
        ax.legend(fontsize=7, ncol=2, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        shown = f"{len(points)} of {total} points" if len(points) < total else \
            f"{total} points"
        ax.set_title(f"t-SNE of the head's training embeddings ({shown}; x: "
                     f"{added_label(cell)})\n{title_of(cell)}", fontsize=9)
        save(fig, path)
