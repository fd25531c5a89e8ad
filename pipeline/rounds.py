"""`make train`: distillation's two rounds above the training spine.

With `distill.teacher: served`, a first run of this config, taught by the n-gram regression,
trains under `<name>-teacher` (`distill.teacher_config`); its served model labels the
unlabelled reviews, and then `train()` trains the model that is served, taught by those
labels. Otherwise there is one round: `train()` alone.

The teacher's round runs in a child process of its own, started before this process loads
TensorFlow: the two never hold a model each at once, and the student's process then holds
only the student, not what training and scoring the teacher left in memory. A finished
teacher run is found by its fingerprint and reused, as `train()` resumes its own runs; a
teacher interrupted halfway resumes the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.errors import PipelineError, stop_signal
from pipeline.process import handle_stop_signals, import_tensorflow, is_verbose, setup_logging

if TYPE_CHECKING:
    from pipeline.train import RunResult

log = logging.getLogger(__name__)


def train_rounds(cfg: Config, fresh: bool = False, export: bool = True,
                 provenance: dict | None = None, force: bool = False,
                 teacher_of: Config | None = None) -> RunResult:
    """The teacher's round when `cfg` distills from a served teacher, then `train(cfg)`.

    `teacher_of`: the config whose teacher teaches (default `cfg`); a tuned run passes its
    config before the tuned values, so that it learns from the teacher its search used and
    `make train` caches. This process loads TensorFlow only after the teacher's round: while
    the teacher trains, it holds the config and little else.
    """
    teacher_dir = None
    if cfg.distill.enabled and cfg.distill.teacher == "served":
        teacher_dir = teacher_round(teacher_of or cfg, provenance if teacher_of is None else None)
    import_tensorflow(is_verbose())
    from pipeline.train import train

    if provenance and provenance.get("source") == "tuning" and not fresh:
        from pipeline.tuned import adopt_search_run

        adopt_search_run(cfg, provenance, teacher_dir)  # the pick's own training in the search, if it had it
    return train(cfg, fresh=fresh, export=export, provenance=provenance, force=force,
                 teacher_dir=teacher_dir)


def teacher_round(cfg: Config, provenance: dict | None = None) -> Path:
    """The finished teacher run of `cfg`, its scores of the unlabelled reviews cached in it:
    found, or trained and scored now, in a child process either way."""
    return Path(run_in_child(train_and_score_teacher, (cfg.to_dict(), provenance), "teacher's round"))


def train_and_score_teacher(cfg_dict: dict, provenance: dict | None = None) -> str:
    """Train (or resume, or find) the teacher run of the config, then score the unlabelled
    reviews with its served model, cached in its folder; what the child process does."""
    import numpy as np

    from pipeline import data as data_mod
    from pipeline import distill
    from pipeline.fingerprint import run_fingerprint
    from pipeline.runs import NGRAMS_FILE, finished_run
    from pipeline.train import train

    cfg = Config.model_validate(cfg_dict)
    distill.check_unlabelled(cfg)  # before any training: the student wants them too
    teacher_cfg = distill.teacher_config(cfg)
    reviews = distill.unlabelled_reviews(cfg)
    done = finished_run(teacher_cfg, run_fingerprint(teacher_cfg, data_mod.data_identity(cfg.data)))
    if done is not None and _scores_cached(done / distill.SERVED_SCORES_FILE, distill.texts_digest(reviews)):
        log.info("distill: the teacher is the finished run %s", done)
        return str(done)
    if done is None:
        log.info("distill: the teacher's round first, in a process of its own, as the run under %s/%s",
                 teacher_cfg.runs_dir, teacher_cfg.name)
        done = train(teacher_cfg, export=False, provenance=provenance).run_dir
    from pipeline.ngrams import load
    from pipeline.run_files import load_run  # the served model, only where it is scored
    from pipeline.scoring import blend_logit, score_texts

    def logits_of(texts: list[str]) -> np.ndarray:
        teacher_cfg, vectorizer, model, branch = load_run(done)
        z_lstm, z_ngram = score_texts(vectorizer, model, texts, teacher_cfg.vectorize.max_length, branch)
        return z_lstm if branch is None else blend_logit(z_lstm, z_ngram, branch.blend)

    branch_file = done / NGRAMS_FILE
    distill.served_teacher(done, reviews, load(branch_file) if branch_file.is_file() else None, logits_of)
    return str(done)


def _scores_cached(path: Path, digest: str) -> bool:
    import numpy as np

    if not path.is_file():
        return False
    with np.load(path) as z:
        return str(z["digest"]) == digest


def run_in_child(target: Callable[..., Any], args: tuple, what: str) -> Any:
    """`target(*args)` in a fresh process with TensorFlow loaded; its answer, its error, or an
    interruption comes back here. `target` is a module-level function, its arguments and
    answer plain data (they cross a pipe)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no TensorFlow state shared
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(target, args, is_verbose(), send), name=what)
    child.start()
    send.close()
    try:
        child.join()
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group, the child too; a SIGTERM sent to this process
        # alone is passed on. Either way the child saves its resume point before this stops.
        if stop_signal() != signal.SIGINT:
            child.terminate()
        child.join()
        raise
    if not receive.poll():
        raise PipelineError(f"the {what} ended without an answer (exit code {child.exitcode}); "
                            "rerun to resume it")
    ok, value = receive.recv()
    if not ok:
        raise value
    return value


def _child(target: Callable[..., Any], args: tuple, verbose: bool, send) -> None:
    setup_logging(verbose)
    handle_stop_signals()
    try:
        import_tensorflow(verbose)
        send.send((True, target(*args)))
    except BaseException as error:  # every failure, interruptions included, goes back
        # TensorFlow may re-raise the interrupt as another error: a stop is a stop.
        answer = KeyboardInterrupt() if stop_signal() is not None else error
        try:
            send.send((False, answer))
        except Exception:  # an error that cannot be pickled: its words still go back
            failed = f"the {multiprocessing.current_process().name} failed: {type(answer).__name__}: {answer}"
            send.send((False, PipelineError(failed)))
        if not isinstance(answer, PipelineError | KeyboardInterrupt):
            raise  # its traceback, printed by the child, is what a bug report needs
