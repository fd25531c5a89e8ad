"""What each command does, once its flags are parsed (`pipeline.cli` defines the flags).

One function per command, all alike: load and check the config, then import TensorFlow, then
the stage, so that a bad config fails before TensorFlow's start-up. Nothing here imports
TensorFlow at module level.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import shlex
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.process import STDOUT_CLOSED, import_tensorflow, silence_stdout

log = logging.getLogger("pipeline")

_KEY = re.compile(r"[A-Za-z_][\w.]*=")  # where a new key=value pair starts


def overrides(args: argparse.Namespace) -> list[str]:
    """Each --set argument split shell-like into key=value pairs.

    A word that does not start a `key=` continues the previous value, so `--set "name=my model"`
    and `--set "a=1 b=2"` both mean what they say; quotes keep a value's spaces exactly.
    """
    items: list[str] = []
    for arg in args.overrides:
        try:
            words = shlex.split(arg)
        except ValueError as exc:  # e.g. an unmatched quote
            raise ConfigError(f"--set {arg!r}: {exc}") from None
        pairs: list[str] = []
        for word in words:
            if pairs and not _KEY.match(word):
                pairs[-1] += " " + word
            else:
                pairs.append(word)
        items += pairs
    return items


def _train(args: argparse.Namespace) -> int:
    # JSON quoting keeps the path a string when read as YAML.
    tuned = [f"model.tuned_hparams={json.dumps(args.tuned)}"] if args.tuned else []
    cfg = load_config(args.config, overrides(args) + tuned)
    # TensorFlow loads inside train_rounds: after the config, and after a served teacher's
    # round, which trains in a process of its own while this one waits without it.
    from pipeline.rounds import train_rounds

    provenance, teacher_of = None, None
    if cfg.model.tuned_hparams:  # resolved before training and handed over as data
        from pipeline.tuned import apply_tuned

        # The teacher is the untuned config's: the one `make train` caches and the search used.
        teacher_of = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tuned_hparams": None})})
        cfg, provenance = apply_tuned(cfg)
    result = train_rounds(cfg, fresh=args.fresh, export=not args.no_export, provenance=provenance,
                          force=args.force, teacher_of=teacher_of)
    from pipeline.gate import gate_line

    if not result.chief:
        print("\nthis worker's part is done; the chief writes the run and the export")
        return 0
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"test accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
          f"recall {m['recall']:.4f}  auc {_auc(m['auc'])}  loss {m['loss']:.4f}  "
          f"({m['examples']} reviews)")
    (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_pred"]
    negative, positive = m["confusion_matrix"]["labels"]
    print(f"confusion (true x pred): {negative} [{tn} {fp}]  {positive} [{fn} {tp}]")
    if "lstm" in m:  # the served model is a blend: each part alone, the BiLSTM first
        print("alone: " + "  ".join(f"{label} accuracy {m[part]['accuracy']:.4f} auc {_auc(m[part]['auc'])}"
                                    for part, label in (("lstm", "BiLSTM"), ("ngrams", "n-grams"))))
    if m["auc"] is None:
        print("auc: undefined, the test split holds one class (recorded as null)")
    if result.export:
        print(f"exported: {result.export.path} (version {result.export.version}; reloaded "
              f"predictions within {result.export.max_abs_diff:.2g})")
        if result.export.gate:
            print(gate_line(result.export.gate))
    return 0


def _auc(auc: float | None) -> str:
    return "undefined" if auc is None else f"{auc:.4f}"


def _export(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    if args.run and not (Path(args.run) / "config.yaml").is_file():
        raise PipelineError(f"--run {args.run}: not a run directory (no config.yaml); "
                            f"runs are under {cfg.runs_dir}/{cfg.name}/")
    import_tensorflow(args.verbose)
    from pipeline.export import export_run  # not pipeline.train: re-exporting trains nothing
    from pipeline.gate import gate_line
    from pipeline.runs import latest_finished_run

    try:
        run_dir = Path(args.run) if args.run else latest_finished_run(cfg)
    except FileNotFoundError as exc:  # "no finished run": the user's to fix, not a bug
        raise PipelineError(str(exc)) from None
    result = export_run(run_dir, export_dir=cfg.export.dir, force=args.force, gate_on=cfg.export.gate)
    print(f"exported {run_dir} -> {result.path} (version {result.version}; reloaded "
          f"predictions within {result.max_abs_diff:.2g})")
    if result.gate:
        print(gate_line(result.gate))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    import_tensorflow(args.verbose)
    from pipeline.pretrain import train_word2vec

    print(f"word2vec vectors: {train_word2vec(cfg)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    import_tensorflow(args.verbose)
    from pipeline.bench import markdown_table, peer_table, run_bench, run_peer, write_peer, write_report

    if args.peer_only:  # seconds: the reference figures on whole splits (0 = all reviews)
        result = run_peer(cfg, args.train_examples or None, args.test_examples or None)
        write_peer(result, Path(args.peer_json))
        print(peer_table(result, ""))
        print(f"\nfigures in {args.peer_json}")
        return 0
    result = run_bench(cfg, args.train_examples, args.test_examples, args.epochs)
    write_report(result, Path(args.json), Path(args.markdown))
    print(markdown_table(result))
    print(f"\ntraining throughput (b)/(a) = {result['train_speedup']:.2f}; figures in {args.json}")
    return 0


def _bench_tables(args: argparse.Namespace) -> int:
    if args.size_mb <= 0 or args.short_rows < 1:
        raise ConfigError("--size-mb and --short-rows: must be positive")
    from pipeline import bench_tables

    results = bench_tables.run(args.size_mb, args.short_rows, Path(args.dir) if args.dir else None)
    bench_tables.write_results(results, Path(args.json))
    print(bench_tables.markdown_table(results))
    print(f"figures in {args.json}")
    return 0


def _results(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    from pipeline.results import write_results  # run records only: no TensorFlow

    runs = write_results(cfg, Path(args.runs_dir or cfg.runs_dir), Path(args.peer_json), Path(args.out))
    print(Path(args.out).read_text())
    print(f"{len(runs)} run(s) of {cfg.name}; written to {args.out}")
    return 0


def _train_workers(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {args.workers})")
    load_config(args.config, overrides(args))  # a bad config fails once, here, not in every worker
    import_tensorflow(args.verbose)
    from pipeline.distribute import run_local_workers

    argv = ["--verbose"] * bool(getattr(args, "verbose", False))
    argv += ["train", *(["--config", args.config] if args.config else [])]
    argv += [f"--set={shlex.quote(item)}" for item in overrides(args)]  # split again in each worker
    argv += ["--fresh"] * args.fresh + ["--no-export"] * args.no_export
    return run_local_workers(args.workers, argv)


def _tune(args: argparse.Namespace) -> int:
    if args.worker and not args.tuner_id:
        raise ConfigError("--tuner-id: required with --worker (a unique name, e.g. tuner1)")
    if args.fresh and args.worker:
        raise ConfigError("--fresh: only the chief (or a single process) starts a search over")
    cfg = load_config(args.config, overrides(args))
    from pipeline.tune_pick import check_tunable

    check_tunable(cfg)  # before the teacher's round, which can take a while
    teacher_dir = None
    if not args.chief and cfg.distill.enabled and cfg.distill.teacher == "served":
        # `make train`'s own teacher, in a process of its own before this one loads TensorFlow:
        # every execution learns from it, and `make train` reuses it.
        from pipeline.rounds import teacher_round

        teacher_dir = teacher_round(cfg)
    import_tensorflow(args.verbose)
    from pipeline import tune, tune_report
    from pipeline.tune_roles import set_role

    if args.chief:
        set_role("chief", *args.chief)
    elif args.worker:
        set_role("worker", *args.worker, tuner_id=args.tuner_id)
    result = tune.run_search(cfg, fresh=args.fresh, teacher_dir=teacher_dir)
    print(tune_report.summary(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.model:
        model = Path(args.model)
    else:
        cfg = load_config(args.config, overrides(args))
        model = Path(cfg.export.dir) / cfg.name
    if args.texts:
        texts = iter(args.texts)
    elif sys.stdin.isatty():
        print("error: give reviews as arguments, or pipe them one per line on stdin", file=sys.stderr)
        return 2
    else:  # bytes: a line that is not valid UTF-8 is still scored
        lines = (line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip())
        first = next(lines, None)  # before loading the model: no input is an error at once
        if first is None:
            raise PipelineError("no reviews on stdin (it was empty or held only blank lines): "
                                "pipe one review per line, or give them as arguments")
        texts = itertools.chain([first], lines)
    import_tensorflow(args.verbose)
    from pipeline.predict import load, predict  # TensorFlow only: no training code

    path, serve = load(model)
    log.info("model: %s", path)
    try:
        for row in predict(serve, texts):
            print(json.dumps(row, ensure_ascii=False))
    except BrokenPipeError:  # the reader closed the pipe (e.g. `| head -1`): nothing to do
        silence_stdout()
        return STDOUT_CLOSED
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    import_tensorflow(args.verbose)
    from pipeline import evaluate, evaluate_report  # TensorFlow only: no training code

    model = Path(args.model) if args.model else Path(cfg.export.dir) / cfg.name
    result = evaluate.evaluate(model, args.data, cfg.data,
                               Path(args.against) if args.against else None, args.slice_by,
                               args.fit_threshold)
    folder = evaluate_report.write(result, Path(args.out))
    m = result["metrics"]
    low, high = m["accuracy"]["interval"]
    speed = result["speed"][0]["reviews_per_second"]
    print(f"{result['model']} on {result['data']}: {result['rows']} rows, {speed:.0f} reviews/s")
    print(f"accuracy {m['accuracy']['value']:.4f} (95% {low:.4f}-{high:.4f})  auc {m['auc']['value']:.4f}  "
          f"ece {m['ece']['value']:.4f}  log loss {m['log_loss']['value']:.4f}")
    worst = result["slices"][0]
    print(f"worst slice: {worst['slicing']} {worst['slice']}: accuracy {worst['accuracy']:.4f} "
          f"({worst['rows']} rows)")
    for t in result["thresholds"]:
        print(f"threshold for the best {t['metric']} here: {t['threshold']:.4f} ({t['value']:.4f}, "
              f"{t['at_0.5']:.4f} at 0.5; the export is unchanged)")
    if "against" in result:
        print(result["against"]["sentence"])
    print(f"report: {folder / 'report.md'}")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    for flag, value in (("--train-examples", args.train_examples), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1 (got {value})")
    cfg = load_config(args.config, overrides(args))
    import_tensorflow(args.verbose)
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
    cfg = load_config(args.config, overrides(args))
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


COMMANDS = {
    "train": _train,
    "train-workers": _train_workers,
    "export": _export,
    "tune": _tune,
    "pretrain": _pretrain,
    "predict": _predict,
    "evaluate": _evaluate,
    "bench": _bench,
    "bench-tables": _bench_tables,
    "results": _results,
    "check-config": _check_config,
    "gpu-check": _gpu_check,
}
