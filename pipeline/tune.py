"""Tuning: which embedding size should the served model have, and does the choice matter?

Each trial of the search is one execution: `make train`'s own training (`train()`) of one
size with one seed, on the same data, teacher and schedule, its test split never read. A
KerasTuner oracle hands the executions out in the order `pipeline.tune_pick.planned` gives
(a short screen of every size, then full executions of the sizes the screen keeps), saves
what finished, and serves them to workers in distributed tuning. Every execution runs in a
process of its own, so that one search holds one model at a time; its run folder lives under
`<tune.directory>/<name>/runs/`, and a kill resumes it there, from its last finished epoch.
Where `make train` has trained an execution's very run already, the search copies it instead.

An execution leaves a record (`executions/<key>.json`) and the per-review validation
probabilities of its model (`<key>.npz`), from which `pipeline.tune_report` writes the report:
mean ± standard error per size, each size paired against the best on the same reviews, the
pick, and what each size costs to serve. `pipeline.tuned` hands the pick to `make train`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import keras_tuner as kt
import numpy as np

from pipeline import data as data_mod
from pipeline.config import Config, from_dict, save_config
from pipeline.errors import ConfigError, PipelineError, stop_signal
from pipeline.fingerprint import data_key, fingerprint, run_fingerprint
from pipeline.pretrain import word2vec_seed
from pipeline.rounds import run_in_child
from pipeline.runs import RUN_FILE, DirLock, adopt_run, finished_run, read_json, taught_by, write_json
from pipeline.tune_pick import RANKED_BY, SCREEN, Execution, check_tunable, planned
from pipeline.tune_report import (
    EXECUTIONS_DIR,
    SERVED,
    TuneResult,
    execution_records,
    screen_correct,
    write_report,
)
from pipeline.tune_roles import describe_role, role
from pipeline.tuned import SEARCH_FILE, TuneError, output_dir

log = logging.getLogger(__name__)

PROJECT = "project"  # the KerasTuner project folder inside the output dir
IDLE_WAIT_S = 1.0  # a worker's pause when the chief has nothing to hand out yet
COMPLETED = kt.engine.trial.TrialStatus.COMPLETED
RUNNING, IDLE, STOPPED = (kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.IDLE,
                          kt.engine.trial.TrialStatus.STOPPED)
SHORT_REVIEW = "A wonderful film."  # the latency probe
TIMED_REVIEWS = 2000  # validation reviews (repeated where there are fewer) timed for throughput


# --- what one execution trains ------------------------------------------------------------------


def execution_config(cfg: Config, ex: Execution) -> Config:
    """The config one execution trains: `make train`'s, at size `ex.dim` and seed `seed + index`.

    A full execution starts from the word2vec vectors `make train` would use at that size (its
    own run of word2vec, unless `pretrain.vector_size` is set), trained with the search's seed
    for every execution, so that seeds vary the model's training alone. A screening execution is
    the cheap, low-fidelity rung of successive halving: `tune.screen_epochs` epochs of the BiLSTM
    alone (the n-gram branch is the same for every size) on make train's data, teacher included,
    from one short run of word2vec at the largest size (`tune.screen_word2vec_epochs` passes)
    reduced per size: its sizes differ in size alone. Without the teacher's reviews, one epoch
    ranked sizes by noise (docs/experiments/tuning.md).
    """
    d = cfg.to_dict()
    d |= {"name": f"{cfg.name}-{ex.dim}d", "runs_dir": str(output_dir(cfg) / "runs"),
          "seed": cfg.seed + ex.index}
    d["model"]["embedding_dim"] = ex.dim
    if cfg.model.embedding_init == "word2vec" and ex.index:
        d["pretrain"]["seed"] = word2vec_seed(cfg)
    if ex.stage == SCREEN:
        d["train"]["epochs"] = cfg.tune.screen_epochs
        d["ngrams"]["enabled"] = False
        if cfg.model.embedding_init == "word2vec":
            d["pretrain"]["vector_size"] = cfg.pretrain.vector_size or max(cfg.tune.embedding_dims)
            d["pretrain"]["seed"] = word2vec_seed(cfg)
            d["pretrain"]["epochs"] = cfg.tune.screen_word2vec_epochs
    return from_dict(d)


def run_execution(cfg_dict: dict, values: dict, teacher_dir: str | None) -> dict:
    """Train (or resume, or find) one execution and record it; in the execution's own process.

    Returns its metrics for the oracle. A finished run of the same config is not trained
    again: the search's own (a search killed after training, before its record), or the run
    `make train` trained already (the configured size, with the configured seed).
    """
    from pipeline.train import train

    cfg, ex = Config.model_validate(cfg_dict), Execution.of(values)
    exec_cfg = execution_config(cfg, ex)
    t0 = time.time()
    identity = data_mod.data_identity(exec_cfg.data)
    fp = run_fingerprint(exec_cfg, identity)
    run_dir = finished_run(exec_cfg, fp)
    if run_dir is None and ex.stage != SCREEN:
        run_dir = trained_by_make_train(cfg, exec_cfg, fp, identity, teacher_dir)
    if run_dir is None:
        run_dir = train(exec_cfg, export=False, test=False,
                        teacher_dir=Path(teacher_dir) if teacher_dir else None).run_dir
    record = score_execution(exec_cfg, ex, run_dir, output_dir(cfg) / EXECUTIONS_DIR)
    record["seconds"] = round(time.time() - t0, 1)
    write_json(output_dir(cfg) / EXECUTIONS_DIR / f"{ex.key}.json", record)
    return {k: float(record[k]) for k in (RANKED_BY, SERVED, "seconds") if record.get(k) is not None}


def trained_by_make_train(cfg: Config, exec_cfg: Config, fp: str, identity: dict,
                          teacher_dir: str | None) -> Path | None:
    """A copy, in the search, of `make train`'s finished run of this very execution (the same
    config under `cfg`'s name, taught by the same teacher), if there is one."""
    as_trained = exec_cfg.model_copy(update={"name": cfg.name, "runs_dir": cfg.runs_dir})
    source = finished_run(as_trained, run_fingerprint(as_trained, identity))
    if source is None or not taught_by(read_json(source / RUN_FILE), teacher_dir):
        return None
    log.info("make train trained this execution already (%s): scoring a copy of it", source)
    return adopt_run(source, exec_cfg, fp, status="finished", adopted_from=str(source))


def score_execution(cfg: Config, ex: Execution, run_dir: Path, folder: Path) -> dict:
    """Score the run's model on the validation reviews, per review, as the report pairs them:
    the BiLSTM alone and served (with the run's n-gram branch, where it has one)."""
    from pipeline import atomic
    from pipeline.embeddings import nearest_neighbours
    from pipeline.resume import best_epoch_of
    from pipeline.run_files import load_run
    from pipeline.runs import HISTORY_FILE
    from pipeline.scoring import score_texts, served_probabilities, sigmoid

    _, vectorizer, model, branch = load_run(run_dir)
    texts, labels = data_mod.decoded(data_mod.load_raw(cfg.data, cfg.seed).validation)
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, cfg.vectorize.max_length, branch)
    p_lstm = sigmoid(z_lstm)
    p_served = served_probabilities(z_lstm, z_ngram, branch) if branch is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(folder / f"{ex.key}.npz", suffix=".npz") as tmp:
        np.savez(tmp, labels=labels, lstm=p_lstm, **({} if p_served is None else {"served": p_served}))
    vocabulary = vectorizer.get_vocabulary()
    write_json(folder / f"{ex.key}.neighbours.json",
               nearest_neighbours(model.get_layer("embedding").get_weights()[0], vocabulary))
    run = read_json(run_dir / RUN_FILE)
    epochs_run, best_epoch = best_epoch_of(run_dir / HISTORY_FILE, cfg.train.monitor)
    return {"key": ex.key, "embedding_dim": ex.dim, "execution": ex.index, "seed": cfg.seed,
            "stage": ex.stage, "epochs": cfg.train.epochs, "run_dir": str(run_dir),
            RANKED_BY: float(np.mean((p_lstm > 0.5) == labels)),
            SERVED: None if p_served is None else float(np.mean((p_served > 0.5) == labels)),
            "validation_reviews": len(labels), "trainable_params": run.get("trainable_params"),
            "epochs_run": epochs_run, "best_epoch": best_epoch}


def serving_cost(run_dir: str) -> dict:
    """What the run's model costs to serve, exported as `make train` exports it: SavedModel
    size, reviews/s at batch 256 over the validation reviews, and one short review's latency."""
    import tensorflow as tf

    from pipeline.bench import latency_ms, throughput
    from pipeline.constants import INPUT_NAME, OUTPUT_NAME, SIGNATURE
    from pipeline.export import serving_archive
    from pipeline.run_files import load_run

    cfg, vectorizer, model, branch = load_run(Path(run_dir))
    texts, _ = data_mod.decoded(data_mod.load_raw(cfg.data, cfg.seed).validation)
    with tempfile.TemporaryDirectory(prefix="tune-cost-", dir=Path(run_dir)) as tmp:
        path = Path(tmp) / "export"
        serving_archive(vectorizer, model, cfg, branch).write_out(str(path), verbose=False)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]

        def predict(xs):
            return serve(**{INPUT_NAME: tf.constant(xs)})[OUTPUT_NAME].numpy()

        timed = (texts * (TIMED_REVIEWS // len(texts) + 1))[:TIMED_REVIEWS]  # a steady rate, even on few
        rate = throughput(predict, timed, 256)
        latency = latency_ms(predict, SHORT_REVIEW, 100)
    return {"export_mb": round(size / 2**20, 2), "reviews_per_s": round(rate, 1),
            "latency_ms_p50": latency["p50"], "run_dir": run_dir}


# --- the oracle and the tuner ------------------------------------------------------------------


def search_space(cfg: Config) -> kt.HyperParameters:
    hp = kt.HyperParameters()
    hp.Choice("embedding_dim", list(cfg.tune.embedding_dims))
    hp.Int("execution", 0, max(cfg.tune.executions - 1, 1))
    hp.Boolean("full")
    return hp


class ExecutionOracle(kt.Oracle):
    """Hands out the next planned execution that has neither finished nor failed nor is running.

    The plan follows from the finished trials, which the oracle saves with its state: a rerun
    goes on where the last one stopped, a trial cut off by a kill is rerun first (KerasTuner's
    retry queue), and a longer candidate list or more executions extend the search.
    """

    def __init__(self, cfg: Config, **kwargs):
        self.tune, self.prefer, self.out = cfg.tune, cfg.model.embedding_dim, output_dir(cfg)
        super().__init__(objective=kt.Objective(RANKED_BY, "max"), hyperparameters=search_space(cfg),
                         seed=cfg.seed, **kwargs)

    def _state(self) -> tuple[set[str], dict[int, float | None]]:
        """Keys tried (finished or failed) and the screening scores (None: the screen failed)."""
        tried, scores = set(), {}
        for trial in self.trials.values():
            if trial.status not in (COMPLETED, "FAILED", "INVALID"):
                continue
            ex = Execution.of(trial.hyperparameters.values)
            tried.add(ex.key)
            if ex.stage == SCREEN:
                ok = trial.status == COMPLETED and trial.metrics.exists(RANKED_BY)
                scores[ex.dim] = trial.metrics.get_last_value(RANKED_BY) if ok else None
        return tried, scores

    def remaining(self) -> list[Execution]:
        """The executions still to train, as far as the plan is known now."""
        tried, scores = self._state()
        running = {Execution.of(t.hyperparameters.values).key for t in self.ongoing_trials.values()}
        correct = screen_correct(self.out, scores) if len(scores) == len(self.tune.embedding_dims) else None
        plan = planned(self.tune, scores, self.prefer, correct)
        return [ex for ex in plan if ex.key not in tried | running]

    def populate_space(self, trial_id: str) -> dict:
        todo = self.remaining()
        if todo:
            return {"status": RUNNING, "values": todo[0].values}
        # While others' executions run (the screen decides what comes next), idle workers wait.
        return {"status": IDLE if self.ongoing_trials else STOPPED, "values": None}


class ExecutionTuner(kt.engine.base_tuner.BaseTuner):
    """Runs each execution in a process of its own and returns its metrics to the oracle."""

    def __init__(self, oracle: ExecutionOracle, cfg: Config, teacher_dir: Path | None, **kwargs):
        self.cfg, self.teacher_dir = cfg, teacher_dir
        self.session: list[dict] = []  # what this process ran: key and status
        self._asked = False
        super().__init__(oracle=oracle, hypermodel=None, **kwargs)

    def pre_create_trial(self):
        if self._asked:  # the last answer was IDLE: no trial began since
            time.sleep(IDLE_WAIT_S)
        self._asked = True

    def on_trial_begin(self, trial):
        self._asked = False
        ex = Execution.of(trial.hyperparameters.values)
        log.info("execution %s: %d-d, seed %d, %s", ex.key, ex.dim, self.cfg.seed + ex.index,
                 f"{self.cfg.tune.screen_epochs} screening epoch(s), the BiLSTM alone"
                 if ex.stage == SCREEN else f"up to {self.cfg.train.epochs} epochs, as make train")
        super().on_trial_begin(trial)

    def run_trial(self, trial, *args, **kwargs) -> dict:
        ex = Execution.of(trial.hyperparameters.values)
        teacher = str(self.teacher_dir) if self.teacher_dir else None
        try:
            return run_in_child(run_execution, (self.cfg.to_dict(), ex.values, teacher),
                                f"execution {ex.key}")
        except PipelineError as exc:  # the data or the config: every execution would fail alike
            raise kt.errors.FatalError(exc) from exc
        except Exception as exc:
            if stop_signal() is not None:  # Ctrl-C that TensorFlow re-raised as another error
                raise KeyboardInterrupt from exc
            raise

    def on_trial_end(self, trial):
        key = Execution.of(trial.hyperparameters.values).key
        self.session.append({"key": key, "status": str(trial.status)})
        if trial.status != COMPLETED:  # KerasTuner goes on to the next trial without a word
            lines = (trial.message or "").strip().splitlines()
            log.warning("execution %s failed: %s", key, lines[-1] if lines else "?")
        super().on_trial_end(trial)


# --- the search ---------------------------------------------------------------------------------


def search_fingerprint(cfg: Config) -> str:
    """What shapes an execution's score. The candidates, executions, keep and pick stay out, so
    that a rerun with more of them extends the search rather than starting it over."""
    d = cfg.to_dict()
    for key in ("runs_dir", "export", "distribute", "tune"):
        d.pop(key)
    d["data"] = data_key(d["data"])
    if cfg.data.source == "files":  # files are edited in place: a search on older rows is stale
        d["data_identity"] = data_mod.data_identity(cfg.data)
    d["train"].pop("verbose")
    d["model"] = {k: v for k, v in d["model"].items() if k not in ("embedding_dim", "tuned_hparams")}
    d["pretrain"] = {k: v for k, v in d["pretrain"].items() if k not in ("directory", "workers")}
    d["screen"] = {"epochs": cfg.tune.screen_epochs, "word2vec_epochs": cfg.tune.screen_word2vec_epochs}
    return fingerprint(d)


def prepare_output(cfg: Config, out: Path, fresh: bool) -> None:
    """Start over (`fresh`), or check that an existing search was made with the same settings."""
    fp = search_fingerprint(cfg)
    if fresh and out.exists():
        log.info("--fresh: removing the earlier search in %s", out)
        shutil.rmtree(out)
    if (out / PROJECT).exists() and read_json(out / SEARCH_FILE).get("fingerprint") != fp:
        raise ConfigError(
            f"tune: {out} holds a search made with other settings (data, vectorize, model, train, "
            "seed, pretrain or tune.screen_* differ): rerun with --fresh to start over, or set "
            "another tune.directory")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_json(out / SEARCH_FILE, read_json(out / SEARCH_FILE) | {
        "name": cfg.name, "fingerprint": fp, "ranked_by": RANKED_BY, "status": "running",
        "session_started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run_search(cfg: Config, fresh: bool = False, teacher_dir: Path | None = None) -> TuneResult:
    """Run (or resume) the search of `cfg.tune`; on a chief or single process, write the report.

    `teacher_dir`: the finished teacher run that `make train` uses (`rounds.teacher_round`),
    for a config that distills from a served teacher. One live process owns a tuning folder
    (its workers aside); the lock sits beside the folder, so that --fresh can remove it.
    """
    check_tunable(cfg)
    out = output_dir(cfg)
    if role() == "worker":
        return _run_search(cfg, out, fresh, teacher_dir)
    with DirLock(out.parent / f".{out.name}.lock", f"tuning folder {out}"):
        return _run_search(cfg, out, fresh, teacher_dir)


def _run_search(cfg: Config, out: Path, fresh: bool, teacher_dir: Path | None) -> TuneResult:
    who = role()
    if who != "worker":
        prepare_output(cfg, out, fresh)
    oracle = ExecutionOracle(cfg)
    tuner = ExecutionTuner(oracle, cfg, teacher_dir, directory=str(out), project_name=PROJECT,
                           overwrite=False)
    if who == "chief":
        log.info("chief: serving the search on %s until the workers have run every execution",
                 describe_role())
    elif who == "worker":
        log.info("%s: asking the chief for executions", describe_role())
    else:
        todo = tuner.oracle.remaining()
        log.info("search in %s: %d execution(s) finished, %d to run next%s", out,
                 len(execution_records(out)), len(todo),
                 " (then the sizes the screen keeps)" if any(e.stage == SCREEN for e in todo) else "")
    # KerasTuner's own display would rank screens and full executions as one: the log says more.
    tuner.search(verbose=0)  # on the chief, blocks in KerasTuner's oracle server
    if who == "worker":
        (out / "workers").mkdir(parents=True, exist_ok=True)
        write_json(out / "workers" / f"{os.environ['KERASTUNER_TUNER_ID']}.json",
                   {"ran": tuner.session, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return TuneResult(out, who, tuner.session, None)

    failed = [t.hyperparameters.values for t in oracle.trials.values() if t.status in ("FAILED", "INVALID")]
    result = write_report(cfg, out, tuner.session, failed, costs_of, who)
    if result.pick is None:
        raise TuneError(f"no size has two finished full executions in {out}: see {out / SEARCH_FILE}")
    return result


def costs_of(run_dirs: dict[int, str]) -> dict[int, dict]:
    """Each size's serving cost, measured on its given run in a process of its own; cached in
    the run's folder, so a rerun of the report measures nothing twice."""
    costs = {}
    for dim, run_dir in sorted(run_dirs.items()):
        cached = read_json(Path(run_dir) / "serving_cost.json")
        if not cached:
            log.info("serving cost of %d-d: export, throughput and latency", dim)
            cached = run_in_child(serving_cost, (run_dir,), f"serving cost of {dim}-d")
            write_json(Path(run_dir) / "serving_cost.json", cached)
        costs[dim] = cached
    return costs
