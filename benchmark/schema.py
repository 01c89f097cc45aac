"""Metric and tag names of every run: the one schema the pipeline, studies, report and tests share.

Metric names are grouped with "/" so that MLflow's chart view shows them in sections:

| name | what |
| --- | --- |
| ``test/bac``, ``test/gm``, ``test/gm_macro``, ``test/f1_macro``, ``test/accuracy`` | the final model on the balanced test set |
| ``val/bac`` | the validation score the final model was selected on |
| ``phase1/train_loss``, ``phase1/val_bac``, ``phase1/lr`` (per epoch), ``phase1/best_epoch``, ``phase1/best_val_bac`` | phase 1 |
| ``phase3/train_loss``, ``phase3/val_bac`` (per epoch), ``phase3/best_epoch``, ``phase3/best_val_bac`` | phase 3 |
| ``time/<stage>_s`` | seconds per stage (``training_set``, ``phase1``, ``phase2``, ``resample``, ``phase3``; ``phase1_load`` and ``wall`` besides); a training-set hook may time sub-stages of its own, e.g. ``time/generator_s`` (a generator's training and sampling), which ``time/training_set_s`` then leaves out, so that the sum of the stages counts each second once; a reused stage logs the seconds of the run that computed it |
| ``generator/<loss>`` (per epoch), ``generator/frechet_mean``, ``class/frechet_<c>`` | a generative over-sampler's losses and its Frechet figure (the ``none`` model's embedding, not Inception) |
| ``gap/overall`` | the EOS paper's generalization gap of the embeddings the head was trained on |
| ``class/recall_<c>``, ``class/gap_<c>`` | per class c (also as the table ``per_class.json``) |
| ``longtail/many_acc``, ``longtail/medium_acc``, ``longtail/few_acc``, ``longtail/top1_error`` | long-tail splits by training images (diagnostic ``longtail``) |
| ``gap/tp``, ``gap/fp``, ``gap/real``, ``diag/*``, ``eos/*``, more ``class/*_<c>`` | the diagnostics' analyses (``benchmark/diagnostics.py``) |
| ``grid/cells_done``, ``grid/cells_failed``, ``grid/cells_total`` | a grid's parent run |
| ``study/best_val_bac``, ``study/completed_trials``, ``final/test/*`` | a study's parent run |

Runs logged before this schema used ``test_bac``, ``time_phase1_s``, ... ; their phase-1 code
version is older, so no cached stage mixes the two, and the report reads only these names.
"""
from __future__ import annotations

TEST_SCORES = ("bac", "gm", "gm_macro", "f1_macro", "accuracy")
VAL_BAC = "val/bac"
GAP = "gap/overall"
TIME_PREFIX, TIME_SUFFIX = "time/", "_s"
WALL_TIME = "time/wall_s"
LOAD_TIME = "time/phase1_load_s"
GENERATOR_STAGE = "generator"  # a generative over-sampler's sub-stage of the training set
FRECHET_MEAN = "generator/frechet_mean"

# Tags every cell run carries.
TAG_CELL = "cell"  # readable identity, e.g. digits/resnet32/ce/eos: group by it to average seeds
TAG_SEED = "seed"


def test(score: str) -> str:
    """``test/<score>`` for one of ``TEST_SCORES``."""
    return f"test/{score}"


def phase(number: int, name: str) -> str:
    """``phase1/val_bac`` and the like."""
    return f"phase{number}/{name}"


def time(stage: str) -> str:
    """Seconds of one stage: ``time/phase1_s``."""
    return f"{TIME_PREFIX}{stage}{TIME_SUFFIX}"


def stage_of(metric: str) -> str | None:
    """The stage a ``time/<stage>_s`` metric times, else ``None``."""
    if metric.startswith(TIME_PREFIX) and metric.endswith(TIME_SUFFIX):
        return metric[len(TIME_PREFIX):-len(TIME_SUFFIX)]
    return None


def generator_metric(name: str) -> str:
    """A generator's per-epoch loss: ``generator/g_loss``."""
    return f"generator/{name}"


def class_frechet(c: int) -> str:
    """Frechet distance between class c's real and generated images: ``class/frechet_3``."""
    return f"class/frechet_{c}"


def recall(c: int) -> str:
    return f"class/recall_{c}"


def class_gap(c: int) -> str:
    return f"class/gap_{c}"


def cell_label(dataset: str, profile: str, ratio: float, backbone: str, loss: str, method: str,
               settings: dict | None = None) -> str:
    """The ``cell`` tag, everything but the seed: ``digits/exp10/resnet32/ce/eos``, with the
    component parameters a user set after it (``... eos k_neighbors=50``)."""
    label = f"{dataset}/{profile}{ratio:g}/{backbone}/{loss}/{method}"
    extras = " ".join(f"{k}={v}" for k, v in sorted((settings or {}).items()))
    return f"{label} {extras}" if extras else label
