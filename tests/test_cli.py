"""The command line: list, one-line errors with non-zero exits, and a run's closing summary."""
import subprocess
import sys

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


def test_non_positive_numbers_are_refused_by_the_parser(capsys):
    for argv in (["run", "--k-neighbors", "0"], ["run", "--epochs", "-1"]):
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
