"""Command line: the only module that defines flags. `imdb-pipeline <command> --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.config import ConfigError, PipelineError, load_config

log = logging.getLogger("pipeline")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.epochs=3 (repeatable; "
                        "space-separated pairs in one argument also work)")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [item for arg in args.overrides for item in arg.split()]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:8000 (got {text!r})")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imdb-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="ingest, vectorize, train, evaluate and export")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run instead of resuming an interrupted one")
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")
    p.add_argument("--tuned", metavar="PATH|latest", default=None,
                   help="train with the best hyperparameters of a tuning: a best_hparams.json, its "
                        "folder, or 'latest' (this config name's); same as --set model.tuned_hparams=...")

    p = sub.add_parser("tune", help="search the embedding size with KerasTuner (resumable)")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="discard the earlier trials of this config name and search again")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--chief", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: serve the search on HOST:PORT (e.g. 0.0.0.0:8000) and hand "
                          "trials to workers; the chief trains nothing and writes the report")
    who.add_argument("--worker", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: run the trials handed out by the chief at HOST:PORT")
    p.add_argument("--tuner-id", metavar="NAME", default=None,
                   help="this worker's name (required with --worker): unique among the workers and "
                        "the same on a restart, which then reruns its unfinished trial (e.g. tuner1)")

    p = sub.add_parser("export", help="export the latest finished run again, without retraining")
    _config_args(p)
    p.add_argument("--run", default=None, help="run directory (default: the latest finished run)")

    p = sub.add_parser("pretrain", help="train word2vec embeddings on the unlabelled reviews (cached)")
    _config_args(p)

    p = sub.add_parser("bench", help="time this pipeline against the tutorial-style baseline")
    _config_args(p)
    p.add_argument("--train-examples", type=int, default=5000, help="training reviews both sides see")
    p.add_argument("--test-examples", type=int, default=2000, help="test reviews for accuracy and serving")
    p.add_argument("--epochs", type=int, default=3, help="epochs each side trains (the first warms up)")
    p.add_argument("--json", default="bench_results/bench.json", help="where the figures go")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="file whose bench table is replaced")

    p = sub.add_parser("train-workers", help="train with N multi-worker processes on this machine "
                                             "(tries out multi_worker; TF_CONFIG is built for each)")
    _config_args(p)
    p.add_argument("--workers", "-n", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--fresh", action="store_true", help="as for train")
    p.add_argument("--no-export", action="store_true", help="as for train")

    p = sub.add_parser("predict", help="score reviews with an exported model (one JSON line each)")
    _config_args(p)
    p.add_argument("--model", "-m", default=None,
                   help="saved_models/<name> (its newest version) or saved_models/<name>/<N> "
                        "(default: the config's export.dir/name)")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="reviews to score (default: one per non-empty line on stdin)")

    p = sub.add_parser("gpu-check", help="on a GPU machine: cuDNN use, seconds per epoch with and "
                                         "without mixed precision, export served with GPUs hidden")
    _config_args(p)
    p.add_argument("--train-examples", type=int, default=10000, help="training reviews timed (real data)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per leg (the first also traces)")
    p.add_argument("--json", default="bench_results/gpu_check.json", help="figures (and the table as .md)")

    p = sub.add_parser("check-config", help="validate a config and print it resolved")
    _config_args(p)
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    # JSON quoting keeps the path a string when read as YAML.
    tuned = [f"model.tuned_hparams={json.dumps(args.tuned)}"] if args.tuned else []
    cfg = load_config(args.config, _overrides(args) + tuned)
    result = train(cfg, fresh=args.fresh, export=not args.no_export)
    if not result.chief:
        print("\nthis worker's part is done; the chief writes the run and the export")
        return 0
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"test accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
          f"recall {m['recall']:.4f}  auc {m['auc']:.4f}  loss {m['loss']:.4f}  "
          f"({m['examples']} reviews)")
    (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_pred"]
    print(f"confusion (true x pred): neg [{tn} {fp}]  pos [{fn} {tp}]")
    if result.export:
        print(f"exported: {result.export.path} (version {result.export.version}; reloaded "
              f"predictions within {result.export.max_abs_diff:.2g})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.train import export_run, latest_finished_run

    cfg = load_config(args.config, _overrides(args))
    run_dir = Path(args.run) if args.run else latest_finished_run(cfg)
    result = export_run(run_dir, export_dir=cfg.export.dir)
    print(f"exported {run_dir} -> {result.path} (version {result.version}; reloaded "
          f"predictions within {result.max_abs_diff:.2g})")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from pipeline.pretrain import train_word2vec

    cfg = load_config(args.config, _overrides(args))
    print(f"word2vec vectors: {train_word2vec(cfg)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench import markdown_table, run_bench, write_report

    cfg = load_config(args.config, _overrides(args))
    result = run_bench(cfg, args.train_examples, args.test_examples, args.epochs)
    write_report(result, Path(args.json), Path(args.markdown))
    print(markdown_table(result))
    print(f"\ntraining throughput (b)/(a) = {result['train_speedup']:.2f}; figures in {args.json}")
    return 0


def _train_workers(args: argparse.Namespace) -> int:
    from pipeline.distribute import run_local_workers

    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {args.workers})")
    load_config(args.config, _overrides(args))  # a bad config fails once, here, not in every worker
    argv = ["train", *(["--config", args.config] if args.config else [])]
    argv += [f"--set={item}" for item in _overrides(args)]
    argv += ["--fresh"] * args.fresh + ["--no-export"] * args.no_export
    return run_local_workers(args.workers, argv)


def _tune(args: argparse.Namespace) -> int:
    from pipeline import tune

    if args.worker and not args.tuner_id:
        raise ConfigError("--tuner-id: required with --worker (a unique name, e.g. tuner1)")
    if args.fresh and args.worker:
        raise ConfigError("--fresh: only the chief (or a single process) starts a search over")
    cfg = load_config(args.config, _overrides(args))
    if args.chief:
        tune.set_role("chief", *args.chief)
    elif args.worker:
        tune.set_role("worker", *args.worker, tuner_id=args.tuner_id)
    try:
        result = tune.run_search(cfg, fresh=args.fresh)
    except KeyboardInterrupt:  # the tuning resume hint differs from training's
        print("\ninterrupted: rerun the same command to resume; finished trials are kept and the "
              "interrupted one is rerun (--fresh starts over)", file=sys.stderr)
        return 130
    print(tune.summary(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import load, predict  # TensorFlow only: no training code

    if args.model:
        model = Path(args.model)
    else:
        cfg = load_config(args.config, _overrides(args))
        model = Path(cfg.export.dir) / cfg.name
    if args.texts:
        texts = args.texts
    elif sys.stdin.isatty():
        print("error: give reviews as arguments, or pipe them one per line on stdin", file=sys.stderr)
        return 2
    else:  # bytes: a line that is not valid UTF-8 is still scored
        texts = (line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip())
    path, serve = load(model)
    log.info("model: %s", path)
    for row in predict(serve, texts):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    for flag, value in (("--train-examples", args.train_examples), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1 (got {value})")
    cfg = load_config(args.config, _overrides(args))
    from pipeline import gpu_check

    devices = gpu_check.visible_devices()
    if not any(d.startswith("GPU") for d in devices):
        print(gpu_check.no_gpu_line(devices))
        return 0
    result = gpu_check.run_gpu_check(cfg, args.train_examples, args.epochs)
    md_path = gpu_check.write_results(result, Path(args.json))
    print(gpu_check.markdown_table(result))
    print(f"figures in {args.json}, table in {md_path}")
    return 0 if gpu_check.passed(result) else 1


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


COMMANDS = {
    "train": _train,
    "train-workers": _train_workers,
    "export": _export,
    "tune": _tune,
    "pretrain": _pretrain,
    "predict": _predict,
    "bench": _bench,
    "check-config": _check_config,
    "gpu-check": _gpu_check,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ log is mostly noise here (no CUDA, op attributes); errors still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # tfds logs every file it opens
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # multi-worker logs every collective
    warnings.filterwarnings("ignore", message=".*(ran out of data|shuffle=True. was passed).*")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, FileNotFoundError) as exc:  # data, export and tuning errors alike
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last completed epoch "
              "(add --fresh to start over)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
