"""Command line: ``python -m benchmark list`` and ``python -m benchmark run``."""
from __future__ import annotations

import argparse
import sys

from benchmark.errors import DivergenceError, UserError
from benchmark.methods import DEFAULT_METHOD

DESCRIPTION = "Benchmark EOS and its rivals on imbalanced image data; every run is logged to MLflow."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _optional_positive_int(text: str) -> int | None:
    """MLproject passes every parameter; 'default' (or empty) leaves the method's default."""
    return None if text in ("", "default", "none", "None") else _positive_int(text)


def _optional_float(text: str) -> float | None:
    if text in ("", "default", "none", "None"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _seeds(text: str) -> list[int]:
    """One or more integer seeds, separated by commas or spaces ("0,1,2" or "0 1 2")."""
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer seeds, got '{text}'") from None


def _optional_text(text: str) -> str | None:
    return None if text in ("", "default", "none", "None") else text


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    import yaml

    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads "1e30" as text; a number is meant
        try:
            parsed = float(parsed) if "e" in parsed.lower() else parsed
        except ValueError:
            pass
    return key.replace("-", "_"), parsed


def _key_values(text: str) -> list[tuple[str, object]]:
    """'KEY=VALUE KEY=VALUE' (MLproject's one parameter); empty or 'default': none."""
    if text in ("", "default", "none", "None"):
        return []
    return [_key_value(part) for part in text.replace(",", " ").split()]


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of one benchmark cell (shared by ``run`` and the MLproject entry point)."""
    p = parser
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"method name (see `list`); default {DEFAULT_METHOD}")
    p.add_argument("--dataset", default="digits", help="dataset name; default digits")
    p.add_argument("--loss", default="ce", help="phase-1 loss; default ce")
    p.add_argument("--backbone", default="resnet32", help="backbone; default resnet32")
    p.add_argument("--epochs", type=_optional_positive_int, default=None,
                   help="phase-1 epochs (default: the dataset's)")
    p.add_argument("--batch-size", type=_optional_positive_int, default=None)
    p.add_argument("--lr", type=float, default=0.1, help="phase-1 learning rate; default 0.1")
    p.add_argument("--image-size", type=_optional_positive_int, default=None)
    p.add_argument("--seeds", type=_seeds, nargs="+", default=[[0]],
                   help="training seeds (e.g. 0 1 2 or 0,1,2); one run per seed; default 0")
    p.add_argument("--subset-seed", type=int, default=0,
                   help="seed of the long-tailed subset draw (kept apart from training seeds)")
    p.add_argument("--profile", type=_optional_text, default=None,
                   help="imbalance profile: exp, step or natural (default: the dataset's)")
    p.add_argument("--ratio", type=_optional_float, default=None,
                   help="imbalance ratio n_max / n_min (default: the dataset's)")
    p.add_argument("--validation", default="auto", choices=("auto", "balanced", "fraction"),
                   help="validation set: balanced (--val-per-class images of every class from "
                        "the pool's unused images), fraction (--val-fraction of the training "
                        "subset, stratified) or auto (balanced where the pool has images to "
                        "spare); default auto")
    p.add_argument("--val-per-class", type=_positive_int, default=20,
                   help="validation images per class (balanced validation); default 20")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training subset held out (fraction validation); "
                        "default 0.2")
    p.add_argument("--head-epochs", type=_positive_int, default=10,
                   help="phase-3 epochs of head retraining; default 10")
    p.add_argument("--head-recipe", default="continue", choices=("continue", "reference"),
                   help="phase 3: continue from the phase-1 head at a constant lr (default), "
                        "or the EOS reference's fresh head with a 5-epoch warm-up; both "
                        "select the epoch on validation")
    p.add_argument("--method-param", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="a method parameter (repeatable); each method declares and checks "
                        "its own (`list` names the methods)")
    p.add_argument("--method-params", type=_key_values, default=[], metavar="'K=V K=V'",
                   help="several method parameters in one string (as MLproject passes them)")
    p.add_argument("--loss-param", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="a loss parameter, e.g. gamma=2")
    p.add_argument("--backbone-param", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="a backbone parameter, e.g. widen_factor=4")
    p.add_argument("--data-root", type=_optional_text, default=None,
                   help="folder holding downloaded data sets (default ./data or "
                        "$BENCHMARK_DATA_ROOT)")
    p.add_argument("--download", action="store_true", help="download missing data (online)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the phase-1 model (faster epochs after a slow start)")
    p.add_argument("--experiment", default="eos-benchmark", help="MLflow experiment name")
    p.add_argument("--no-cache", action="store_true",
                   help="train phase 1 even when a finished run already holds it")
    p.add_argument("--diagnostics", nargs="+", default=None, metavar="NAME",
                   help="analyses logged into each run (`list` names them; 'none' for none); "
                        "default: the cheap ones")
    p.add_argument("--no-model", action="store_true",
                   help="do not log the final model as an MLflow model (saves a few seconds "
                        "and the model's size per run)")
    p.add_argument("--register", type=_optional_text, default=None, metavar="NAME",
                   help="register the final model in MLflow's model registry under NAME")
    p.add_argument("--no-system-metrics", action="store_true",
                   help="no CPU / memory / GPU sampling into the run (on by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def configs_from_args(args: argparse.Namespace):
    from benchmark.config import RunConfig

    method_params = {**dict(args.method_params), **dict(args.method_param)}
    for seed in [s for group in args.seeds for s in group]:
        yield RunConfig(
            dataset=args.dataset, method=args.method, loss=args.loss, backbone=args.backbone,
            epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size,
            lr=args.lr, image_size=args.image_size, profile=args.profile, ratio=args.ratio,
            subset_seed=args.subset_seed, seed=seed, validation=args.validation,
            val_per_class=args.val_per_class, val_fraction=args.val_fraction,
            head_recipe=args.head_recipe,
            method_params=method_params, loss_params=dict(args.loss_param),
            backbone_params=dict(args.backbone_param),
            data_root=args.data_root, download=args.download, device=args.device,
            compile=args.compile, experiment=args.experiment, log_model=not args.no_model,
            register=args.register, system_metrics=not args.no_system_metrics,
            diagnostics=None if args.diagnostics is None else
            [name for name in args.diagnostics if name != "none"])


def summary_line(result: dict) -> str:
    from benchmark.schema import WALL_TIME, test

    m = result["metrics"]
    reused = (f"; phase 1 reused from run {result['phase1_run_id']}"
              if result["phase1_reused"] else "")
    return (f"run {result['run_id']} ({result['config'].method}, {result['config'].dataset}, "
            f"seed {result['config'].seed}): BAC {m[test('bac')]:.4f}  GM {m[test('gm')]:.4f} "
            f"(macro {m[test('gm_macro')]:.4f})  F1 {m[test('f1_macro')]:.4f}  "
            f"in {m[WALL_TIME]:.1f} s{reused}")


def check_run(args: argparse.Namespace) -> None:
    for cfg in configs_from_args(args):  # every mistake is reported before the first run starts
        cfg.resolved()


def command_run(args: argparse.Namespace) -> int:
    from benchmark import tracking
    from benchmark.pipeline import run_cell

    configs = list(configs_from_args(args))
    for cfg in configs:
        result = run_cell(cfg, reuse_phase1=not args.no_cache, progress=not args.quiet)
        print(summary_line(result), flush=True)
    uri = tracking.tracking_uri()
    print(f"MLflow: experiment '{result['experiment']}' in {uri}; "
          f"browse with `mlflow ui --backend-store-uri {uri}`")
    return 0


def command_list(args: argparse.Namespace) -> int:
    from benchmark.registry import BACKBONES, DATASETS, DIAGNOSTICS, LOSSES, METHODS

    for title, registry in (("datasets", DATASETS), ("backbones", BACKBONES),
                            ("losses", LOSSES), ("methods", METHODS),
                            ("diagnostics", DIAGNOSTICS)):
        print(f"{title}:")
        entries = registry.describe()
        width = max((len(name) for name, _ in entries), default=0)
        for name, text in entries:
            print(f"  {name:<{width}}  {text}")
    return 0


def grid_overrides(args: argparse.Namespace) -> dict:
    return {"device": args.device, **({"data_root": args.data_root} if args.data_root else {}),
            **({"download": True} if args.download else {})}


def check_engine(args: argparse.Namespace) -> None:
    """Ray, when the command asks for it, is installed (said before anything starts)."""
    import importlib.util

    if (args.address or (args.jobs or 1) > 1) and importlib.util.find_spec("ray") is None:
        raise UserError("--jobs and --address run tasks on Ray, which is not installed: "
                        "pip install -e '.[cluster]'")


def check_grid(args: argparse.Namespace) -> None:
    from benchmark.studies import Grid

    check_engine(args)
    Grid.from_spec(args.spec, grid_overrides(args))


def check_tune(args: argparse.Namespace) -> None:
    from benchmark.studies import StudySpec

    from benchmark.studies import check_shared_storage

    check_engine(args)
    spec = StudySpec.from_file(args.spec)
    spec.check()
    check_shared_storage(args.storage or spec.storage, args.address)


def command_grid(args: argparse.Namespace) -> int:
    from benchmark.studies import grid_summary, run_grid

    counts = run_grid(args.spec, grid_overrides(args), progress=not args.quiet,
                      jobs=args.jobs, address=args.address, cpus_per_cell=args.cpus_per_task,
                      gpus_per_cell=args.gpus_per_task)
    print(grid_summary(counts))
    return 1 if counts["failed"] else 0


def command_tune(args: argparse.Namespace) -> int:
    from benchmark.schema import test
    from benchmark.studies import run_study

    result = run_study(args.spec, storage=args.storage, trials=args.trials,
                       progress=not args.quiet, jobs=args.jobs, address=args.address,
                       cpus_per_trial=args.cpus_per_task, gpus_per_trial=args.gpus_per_task)
    params = ", ".join(f"{k}={v}" for k, v in result["best_params"].items())
    final = result["final_metrics"]
    print(f"study '{result['study']}': {result['completed']} completed trials "
          f"({result['trials']} in all); best validation BAC {result['best_val_bac']:.4f} with "
          f"{params}; on test: BAC {final[test('bac')]:.4f} GM {final[test('gm_macro')]:.4f} "
          f"F1 {final[test('f1_macro')]:.4f} (run {result['final_run_id']}); "
          f"MLflow experiment '{result['experiment']}'")
    return 0


def command_clean(args: argparse.Namespace) -> int:
    from benchmark import tracking

    marked, left = tracking.mark_dead_runs()
    for run in marked:
        print(run.describe())
    print(f"clean: {len(marked)} run(s) marked KILLED, {left} still running in "
          f"{tracking.tracking_uri()}")
    return 0


# The commands that write to the tracking store, which is checked before they start.
STORE_COMMANDS = ("run", "grid", "tune", "clean")


def _checked_float(check):
    """An argparse type: a number that ``check`` (raising ``UserError``) accepts."""
    def parse(text: str) -> float:
        try:
            return check(float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_engine_options(parser: argparse.ArgumentParser, unit: str) -> None:
    """Where the command's tasks (a grid's cells, a study's trials) run: Ray, when asked."""
    parser.add_argument("--jobs", type=_positive_int, default=None,
                        help=f"run up to N {unit}s at once on a Ray cluster started here "
                             f"(pip install -e '.[cluster]'); default: one after another in "
                             f"this process")
    parser.add_argument("--address", type=_optional_text, default=None,
                        help="a running Ray cluster's address (ray start --head prints it), "
                             "e.g. 10.0.0.5:6379")
    from benchmark.engine import check_cpus, check_gpus

    parser.add_argument("--cpus-per-task", type=_checked_float(check_cpus), default=None,
                        help=f"CPU threads each {unit} holds on Ray; default 1")
    parser.add_argument("--gpus-per-task", type=_checked_float(check_gpus), default=None,
                        help=f"GPUs (a fraction shares one) each {unit} holds on Ray; default: "
                             f"the local GPUs shared by the --jobs {unit}s, on a cluster with "
                             f"GPUs 0.25")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmark", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list datasets, backbones, losses and methods").set_defaults(
        handler=command_list)
    run = sub.add_parser("run", help="run benchmark cells (one per seed) and log them to MLflow")
    add_run_options(run)
    run.set_defaults(handler=command_run, precheck=check_run)
    grid = sub.add_parser("grid", help="run the cells of a grid spec that have no finished run")
    grid.add_argument("spec", help="grid spec (YAML), e.g. studies/smoke.yaml")
    grid.add_argument("--data-root", type=_optional_text, default=None)
    grid.add_argument("--download", action="store_true")
    grid.add_argument("--device", default="auto")
    grid.add_argument("--quiet", action="store_true")
    add_engine_options(grid, "cell")
    grid.set_defaults(handler=command_grid, precheck=check_grid)
    tune = sub.add_parser("tune", help="run or continue an Optuna study (spec in YAML)")
    tune.add_argument("spec", help="study spec (YAML), e.g. studies/tune-eos.yaml")
    tune.add_argument("--storage", type=_optional_text, default=None,
                      help="Optuna storage: a journal file path (default: the spec's, else "
                           "./optuna-studies.log) or a URL such as postgresql://...")
    tune.add_argument("--trials", type=_positive_int, default=None,
                      help="completed trials to reach (default: the spec's)")
    tune.add_argument("--quiet", action="store_true")
    add_engine_options(tune, "trial")
    tune.set_defaults(handler=command_tune, precheck=check_tune)
    clean = sub.add_parser("clean", help="mark KILLED the runs left RUNNING by a process that "
                                         "was killed (every run/grid/tune does this first)")
    clean.set_defaults(handler=command_clean)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "precheck", None) is not None:
            args.precheck(args)  # a mistake in the command itself leaves no store behind
        if args.command in STORE_COMMANDS:
            from benchmark import tracking

            tracking.prepare_store(mark_dead=args.command != "clean")
        return args.handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(f"error: {err}; a run it had started is marked FAILED in MLflow (a lower "
              f"learning rate usually helps)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the run is marked KILLED in MLflow", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
