"""The command line: list, one-line errors with non-zero exits, and a run's closing summary."""
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from benchmark.__main__ import main


def test_list_shows_every_registry_with_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for heading in ("datasets:", "backbones:", "losses:", "methods:"):
        assert heading in out
    for name in ("digits", "mnist5k", "resnet32", "ce", "eos", "eos-ref", "smote"):
        assert f"  {name} " in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "eso"], "unknown method 'eso'"),
    (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--loss", "hinge"], "unknown loss 'hinge'"),
    (["run", "--ratio", "0.5"], "at least 1"),
    (["run", "--ratio", "1000"], "empty"),
])
def test_user_mistakes_exit_2_with_one_line(mlflow_store, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("argv, message", [
    (["grid", "studies/smoke.yaml", "--jobs", "0"], "must be positive"),
    (["grid", "studies/smoke.yaml", "--cpus-per-task", "-1"], "expected a number above 0"),
    (["grid", "studies/smoke.yaml", "--cpus-per-task", "nan"], "expected a number above 0"),
    (["grid", "studies/smoke.yaml", "--gpus-per-task", "1.5"], "expected a fraction in [0, 1]"),
    (["tune", "studies/tune-k.yaml", "--gpus-per-task", "x"], "expected a number"),
])
def test_engine_option_mistakes_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_study_on_a_cluster_needs_a_server_storage_before_anything(mlflow_store, capsys):
    spec = Path(__file__).parents[1] / "studies" / "tune-k.yaml"
    assert main(["tune", str(spec), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "give --storage postgresql://" in err and err.count("\n") == 1
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_non_positive_numbers_are_refused_by_the_parser(capsys):
    for argv in (["run", "--head-epochs", "0"], ["run", "--epochs", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "must be positive" in capsys.readouterr().err


def test_process_exit_code_and_message(mlflow_store):
    result = subprocess.run([sys.executable, "-m", "benchmark", "run", "--method", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown method 'nope'; valid methods:")


def test_run_prints_a_summary_per_seed(mlflow_store, capsys):
    argv = ["run", "--method", "smote", "--epochs", "1", "--head-epochs", "1",
            "--seeds", "0,1", "--quiet", "--experiment", "cli"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert all("BAC" in line and "GM" in line and "F1" in line for line in lines[:2])
    assert "seed 0" in lines[0] and "seed 1" in lines[1]
    assert "mlflow ui" in lines[2] and "'cli'" in lines[2]


# Every user mistake: one line, exit 2, no traceback, no run, before any training.
MISTAKES = [
    (["--ratio", "nan"], "ratio must be a finite float"),
    (["--lr", "inf"], "lr must be a finite float"),
    (["--subset-seed", "-1"], "subset_seed must lie in [0, 2**32 - 1]"),
    (["--seeds", "-1"], "seed must lie in [0, 2**32 - 1]"),
    (["--seeds", str(2**32)], "seed must lie in [0, 2**32 - 1]"),
    (["--method-param", "k_neighbors=abc"], "k_neighbors' parameter of EOS must be an int"),
    (["--method-param", "k_neighbors=1.5"], "k_neighbors' parameter of EOS must be an int"),
    (["--method-param", "k_neighbors=0"], "k_neighbors' parameter of EOS must be an int"),
    (["--method-param", "max_step=abc"], "max_step' parameter of EOS must be"),
    (["--method-params", "k_neighbors=5 max_step=2"], "max_step' parameter of EOS must be"),
    (["--method", "bsmote", "--method-param", "kind=x"], "kind' parameter of BorderlineSMOTE"),
    (["--method", "smote", "--method-param", "k_neighbors=-1"], "k_neighbors' parameter of SMOTE"),
    (["--method", "none", "--method-param", "k_neighbors=5"], "takes no parameter k_neighbors"),
    (["--backbone-param", "image_size=4"], "backbone parameter image_size is set by the suite"),
    (["--backbone-param", "in_channels=1"], "backbone parameter in_channels is set by the suite"),
    (["--loss", "focal", "--loss-param", "gamma=abc"], "parameter gamma must be float"),
    (["--loss", "focal", "--loss-param", "class_counts=[1]"], "loss parameter class_counts is set"),
    (["--loss", "focal", "--loss-param", "gama=1"], "takes no parameter 'gama'"),
    (["--method", "smote", "--ratio", "100"], "needs at least 2 training images in every class"),
    (["--validation", "balanced", "--val-per-class", "200"], "too few for 200 validation"),
]


@pytest.mark.parametrize("options, message", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_every_mistake_is_one_line_before_any_run(mlflow_store, capsys, options, message):
    assert main(["run", "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_neighbourhood_larger_than_a_class_is_clamped_and_logged(mlflow_store, capsys):
    argv = ["run", "--method", "smote", "--ratio", "50", "--epochs", "1", "--head-epochs", "1",
            "--quiet", "--method-param", "k_neighbors=5"]
    assert main(argv) == 0
    assert "k_neighbors clamped from 5 to 1" in capsys.readouterr().err
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["method_hparam.k_neighbors"] == "1"
    assert "clamped" in run.data.tags["notes"]


def test_a_dataset_with_one_class_is_refused_before_training(mlflow_store, capsys, tmp_path):
    from PIL import Image

    (tmp_path / "tree" / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "tree" / "only" / f"{i}.png")
    argv = ["run", "--dataset", "folder", "--data-root", str(tmp_path / "tree"), "--method",
            "none", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "classification needs at least 2" in err and err.count("\n") == 1
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
