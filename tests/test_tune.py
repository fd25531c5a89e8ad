"""Tuning: the plan, the pick and its statistics, the oracle's order and resume, and on tiny
data the whole search: one row per execution, the report, the hand-off to training, a
search repeated with one seed, resume mid-execution, and chief/worker tuning."""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import rounds, tune
from pipeline import train as train_mod
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.tune_pick import (
    FULL,
    SCREEN,
    Execution,
    check_tunable,
    compare,
    kept_sizes,
    pick,
    planned,
    sentence,
    summarize,
)
from pipeline.tune_report import EXECUTIONS_DIR, _screen_rows
from pipeline.tuned import TuneError, apply_tuned, output_dir
from tests.helpers import StopAt, add_unlabelled, tiny_overrides, write_aclimdb

ROOT = Path(__file__).resolve().parents[1]
DIMS = [4, 8, 12]


def _tune_overrides(imdb: Path, out: Path, dims: list[int] = DIMS) -> list[str]:
    # model.embedding_dim=6 is in no candidate list, so a model of dim 6 was not tuned.
    # One direction and one batch shape keep each execution small: these tests are about the
    # search, not the model. The served teacher and the n-gram branch, as the default ships.
    return tiny_overrides(imdb, out) + [
        f"tune.embedding_dims=[{','.join(map(str, dims))}]", "tune.keep=2", "tune.executions=2",
        "tune.screen_epochs=1", "train.epochs=2", "model.embedding_dim=6", "model.bidirectional=false",
        "train.bucket_by_length=false", "ngrams.enabled=true", "distill.enabled=true",
        "distill.teacher=served", f"pretrain.directory={out / 'pretrained'}"]


def _set_args(overrides: list[str]) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _in_this_process(target, args, what):
    """`rounds.run_in_child` without the child: the same call, faster, and patchable."""
    return target(*args)


@pytest.fixture(scope="module")
def unlabelled_imdb(tmp_path_factory) -> Path:
    return add_unlabelled(write_aclimdb(tmp_path_factory.mktemp("aclImdb_tune")))


# --- the plan and the pick, on figures made up to sit either side of the rule ---------------------


def _cfg(tmp_path, *extra):
    return load_config(None, [f"tune.directory={tmp_path}", *extra])


def test_the_screen_comes_first_and_decides_the_full_executions(tmp_path):
    tune_cfg = _cfg(tmp_path, "tune.embedding_dims=[16,32,64]", "tune.keep=2", "tune.executions=2").tune
    screen = [Execution(d, 0, SCREEN) for d in (16, 32, 64)]
    assert planned(tune_cfg, {}) == screen
    assert planned(tune_cfg, {16: 0.8, 32: 0.9}) == screen  # 64 not screened yet: no full stage
    plan = planned(tune_cfg, {16: 0.85, 32: 0.80, 64: 0.85})  # a tie goes to the smaller size
    assert plan[3:] == [Execution(16, 0, FULL), Execution(64, 0, FULL),
                        Execution(16, 1, FULL), Execution(64, 1, FULL)]
    # No screen when it would drop nothing, or when it is switched off.
    for extra in ("tune.keep=3", "tune.screen_epochs=null"):
        no_screen = _cfg(tmp_path, "tune.embedding_dims=[16,32,64]", extra).tune
        assert {e.stage for e in planned(no_screen, {})} == {FULL} and len(planned(no_screen, {})) == 6


def test_a_size_whose_screen_failed_is_not_kept(tmp_path):
    tune_cfg = _cfg(tmp_path, "tune.embedding_dims=[16,32,64]", "tune.keep=2").tune
    scores = {16: 0.7, 32: None, 64: 0.6}
    assert kept_sizes(tune_cfg, scores) == [16, 64]
    assert {e.dim for e in planned(tune_cfg, scores) if e.stage == FULL} == {16, 64}


def _near_and_apart(n: int = 2500):
    """A best screen, one that differs from it on 60 reviews both ways (within noise) and one
    wrong on 10% more (apart)."""
    rng = np.random.default_rng(0)
    best = rng.random(n) < 0.88
    near = best.copy()
    near[np.flatnonzero(best)[:32]] = False
    near[np.flatnonzero(~best)[:28]] = True
    return best, near, best & (rng.random(n) > 0.1)


def test_the_configured_size_is_kept_when_the_screen_cannot_tell_it_from_the_best(tmp_path):
    tune_cfg = _cfg(tmp_path, "tune.embedding_dims=[16,32,64,128]", "tune.keep=2").tune
    best, near, apart = _near_and_apart()
    correct = {128: best, 64: near, 32: apart, 16: apart.copy()}
    scores = {d: float(c.mean()) for d, c in correct.items()}
    scores[16] = scores[64] + 0.001  # ranked second on its score alone

    assert kept_sizes(tune_cfg, scores) == [16, 128]
    assert kept_sizes(tune_cfg, scores, prefer=64, screen_correct=correct) == [64, 128]
    assert {e.dim for e in planned(tune_cfg, scores, 64, correct) if e.stage == FULL} == {64, 128}
    # A configured size apart from the best is not kept; nor without the per-review figures.
    assert kept_sizes(tune_cfg, scores, prefer=32, screen_correct=correct) == [16, 128]
    assert kept_sizes(tune_cfg, scores, prefer=64, screen_correct={}) == [16, 128]
    # The configured size as the best: the next best is kept beside it, as before.
    assert kept_sizes(tune_cfg, scores, prefer=128, screen_correct=correct) == [16, 128]


def _full(scores: dict[int, list[float]]) -> list[dict]:
    return [{"embedding_dim": d, "stage": FULL, "execution": k, "val_accuracy": v}
            for d, vs in scores.items() for k, v in enumerate(vs)]


def test_one_se_picks_the_smaller_of_two_sizes_within_noise():
    # 64-d: mean 0.888, SE 0.004; 16-d's mean 0.885 is within one SE of it.
    summaries = summarize(_full({16: [0.880, 0.890], 64: [0.884, 0.892]}))
    assert [(s.dim, s.n) for s in summaries] == [(16, 2), (64, 2)]
    assert summaries[1].mean == pytest.approx(0.888) and summaries[1].se == pytest.approx(0.004)
    assert pick(summaries, "one_se").dim == 16
    assert pick(summaries, "best").dim == 64


def test_one_se_picks_the_better_of_two_sizes_apart():
    summaries = summarize(_full({16: [0.850, 0.852], 64: [0.890, 0.892]}))
    assert pick(summaries, "one_se").dim == 64 == pick(summaries, "best").dim


def test_a_size_with_one_full_execution_has_no_standard_error_and_is_left_out():
    assert [s.dim for s in summarize(_full({16: [0.85], 64: [0.89, 0.88]}))] == [64]


def test_the_paired_comparison_pairs_executions_of_the_same_seed():
    rng = np.random.default_rng(0)
    best = [rng.random(2000) < 0.9, rng.random(2000) < 0.9]
    # 16-d is wrong wherever the best is, and on 10% more of the reviews besides.
    worse = [b & (rng.random(2000) > 0.1) for b in best]
    c = compare({64: best, 16: worse, 32: [b.copy() for b in best]}, best=64)
    assert set(c) == {16, 32}
    expected = np.mean(np.concatenate(worse)) - np.mean(np.concatenate(best))
    assert c[16]["difference"] == pytest.approx(expected) and c[16]["rows"] == 4000
    assert c[16]["low"] < expected < c[16]["high"] < 0 and c[16]["p"] < 1e-10
    assert (c[32]["low"], c[32]["high"], c[32]["p"]) == (0.0, 0.0, 1.0)  # the same answers: no difference


def test_the_opening_sentence_says_what_is_within_noise_what_is_worse_and_what_was_picked():
    summaries = summarize(_full({16: [0.850, 0.852], 64: [0.886, 0.894], 128: [0.889, 0.893]}))
    comparisons = {16: {"low": -0.045, "high": -0.030}, 128: {"low": -0.01, "high": 0.01}}
    text = sentence(summaries, pick(summaries, "one_se"), "one_se", comparisons, dropped={32: 0.85},
                    kept_floor=0.87)
    assert text == ("64-d and 128-d are within one standard error of the best (128-d, 89.1 ± 0.2% BiLSTM "
                    "validation accuracy); 16-d is worse by 4.0 ± 0.2 points (paired 95% interval -4.5 to "
                    "-3.0); 32-d fell behind in the screen. Picked 64-d as the smallest size within one "
                    "standard error of the best.")
    # A size the screen dropped only on a tie with the last kept one did not fall behind.
    text = sentence(summaries, pick(summaries, "one_se"), "one_se", comparisons,
                    dropped={32: 0.85, 256: 0.87, 512: None}, kept_floor=0.87)
    assert text.endswith("; 32-d fell behind in the screen; 256-d ties the last kept size in the screen and "
                         "was dropped as the larger; 512-d failed in the screen. Picked 64-d as the smallest "
                         "size within one standard error of the best.")
    # A size that gave way to the configured size in the screen is named as such, not as behind.
    text = sentence(summaries, pick(summaries, "one_se"), "one_se", comparisons, dropped={32: 0.85},
                    kept_floor=0.87, gave_way=([256], 128, 64))
    assert text.endswith("; in the screen, 256-d and the configured 128-d were both within noise of its "
                         "best, 64-d, and 256-d gave way to 128-d; 32-d fell behind in the screen. Picked "
                         "64-d as the smallest size within one standard error of the best.")
    # A lower mean whose paired interval holds no difference is not called worse; a best alone is the best.
    apart = summarize(_full({16: [0.80, 0.84], 64: [0.86, 0.87]}))
    text = sentence(apart, pick(apart, "one_se"), "best", {16: {"low": -0.05, "high": 0.002}})
    assert text == ("64-d is the best (86.5 ± 0.5% BiLSTM validation accuracy); 16-d is lower by 4.5 ± 2.1 "
                    "points, within noise review by review (paired 95% interval -5.0 to 0.2). Picked 64-d as "
                    "the highest mean.")


def test_an_execution_trains_make_trains_config_at_its_size_and_seed(tmp_path):
    cfg = _cfg(tmp_path, "tune.embedding_dims=[16,64]", "model.embedding_init=word2vec", "seed=7")
    first = tune.execution_config(cfg, Execution(16, 0, FULL))
    assert (first.name, first.runs_dir) == ("imdb_lstm-16d", str(tmp_path / cfg.name / "runs"))
    at_16 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"embedding_dim": 16})})
    # make train's config at 16-d, its start included: its own 16-d word2vec, of its own seed
    assert first.model_copy(update={"name": cfg.name, "runs_dir": cfg.runs_dir}) == at_16
    second = tune.execution_config(cfg, Execution(16, 1, FULL))
    assert (second.seed, second.pretrain.vector_size, second.pretrain.seed) == (8, None, 7)  # the same start
    screen = tune.execution_config(cfg, Execution(16, 0, SCREEN))
    assert screen.train.epochs == cfg.tune.screen_epochs and not screen.ngrams.enabled
    assert screen.distill == cfg.distill  # make train's data: one epoch on the labelled alone ranks by noise
    # the largest size's word2vec, reduced, in fewer passes than make train's
    assert (screen.pretrain.vector_size, screen.pretrain.seed) == (64, 7)
    assert screen.pretrain.epochs == cfg.tune.screen_word2vec_epochs < first.pretrain.epochs


@pytest.mark.parametrize(("extra", "match"), [
    (["model.embedding_init=file", "model.embedding_file=v.txt"], "model.embedding_init"),
    (["model.embedding_init=word2vec", "pretrain.vector_size=32", "tune.embedding_dims=[16,64]"],
     "pretrain.vector_size: 32-d word2vec vectors cannot start the 64-d"),
])
def test_a_start_that_does_not_come_in_every_size_is_refused_up_front(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        check_tunable(_cfg(tmp_path, *extra))


# --- the oracle: the plan's order, and a search cut off and reloaded -------------------------------


def _drive(oracle, tuner_id: str, score) -> Execution:
    trial = oracle.create_trial(tuner_id)
    ex = Execution.of(trial.hyperparameters.values)
    oracle.update_trial(trial.trial_id, {"val_accuracy": score(ex)})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)
    return ex


def test_the_oracle_hands_out_the_plan_and_a_reloaded_one_reruns_the_cut_off_execution(tmp_path):
    cfg = _cfg(tmp_path, "tune.embedding_dims=[4,8,12]", "tune.keep=2", "tune.executions=2")

    def score(ex):
        return {4: 0.6, 8: 0.8, 12: 0.7}[ex.dim]

    oracle = tune.ExecutionOracle(cfg)
    oracle._set_project_dir(str(tmp_path), "project")
    ran = [_drive(oracle, "a", score).key for _ in range(4)]
    assert ran == ["4d-screen-0", "8d-screen-0", "12d-screen-0", "8d-full-0"]
    cut_off = oracle.create_trial("a")  # a kill while it trains: saved as RUNNING
    assert Execution.of(cut_off.hyperparameters.values).key == "12d-full-0"

    reloaded = tune.ExecutionOracle(cfg)
    reloaded._set_project_dir(str(tmp_path), "project")
    reloaded.reload()
    rest = [_drive(reloaded, "a", score).key for _ in range(3)]
    assert rest == ["12d-full-0", "8d-full-1", "12d-full-1"]  # the cut-off one first, the same trial
    assert reloaded.create_trial("a").status == "STOPPED"
    assert sorted(t.status for t in reloaded.trials.values()) == ["COMPLETED"] * 7


def _screen_files(cfg, correct: dict[int, np.ndarray]) -> None:
    """Screen predictions as `tune.score_execution` writes them: right where `correct` says."""
    folder = output_dir(cfg) / EXECUTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(len(next(iter(correct.values())))) % 2 == 0
    for dim, right in correct.items():
        np.savez(folder / f"{Execution(dim, 0, SCREEN).key}.npz", labels=labels,
                 lstm=np.where(right == labels, 0.9, 0.1))


def test_the_oracle_keeps_the_configured_size_the_screen_cannot_tell_from_the_best(tmp_path):
    cfg = _cfg(tmp_path, "tune.embedding_dims=[4,8,12,16]", "tune.keep=2", "model.embedding_dim=12")
    best, near, apart = _near_and_apart()
    _screen_files(cfg, {4: apart, 8: best, 12: near, 16: best.copy()})

    def score(ex):  # 16-d ranks second on its score alone
        return {4: 0.6, 8: 0.8, 12: 0.74, 16: 0.75}[ex.dim]

    oracle = tune.ExecutionOracle(cfg)
    oracle._set_project_dir(str(tmp_path), "project")
    ran = [_drive(oracle, "a", score).key for _ in range(6)]
    assert ran[4:] == ["8d-full-0", "12d-full-0"]
    assert _screen_rows(cfg, output_dir(cfg), [], {}, {}) == []  # no finished screens yet: no rows

    records = [{"embedding_dim": d, "stage": SCREEN, "val_accuracy": score(Execution(d, 0, SCREEN))}
               for d in (4, 8, 12, 16)]
    rows = _screen_rows(cfg, output_dir(cfg), records, {}, {d: {} for d in (4, 8, 12, 16)})
    assert [(r["embedding_dim"], r["kept"], r["preferred"], r["gave_way"]) for r in rows] == [
        (4, False, False, False), (8, True, False, False), (12, True, True, False), (16, False, False, True)]


# --- the hand-off ----------------------------------------------------------------------------------


def test_apply_tuned_sets_the_size_and_says_where_it_came_from(tmp_path):
    best = tmp_path / "best_hparams.json"
    best.write_text(json.dumps({"values": {"embedding_dim": 64}, "rule": "one_se", "mean": 0.9, "se": 0.002,
                                "executions": 2}))
    cfg = load_config(None, [f"model.tuned_hparams={tmp_path}", "model.embedding_init=word2vec"])
    tuned, provenance = apply_tuned(cfg)
    assert tuned.model.embedding_dim == 64 and tuned.pretrain == cfg.pretrain
    assert provenance["values"] == {"embedding_dim": 64} and provenance["file"] == str(best)
    assert provenance["search"]["rule"] == "one_se" and provenance["search"]["executions"] == 2


def test_apply_tuned_without_a_result_or_with_a_foreign_file_says_so(tmp_path):
    with pytest.raises(TuneError, match="no tuning result at"):
        apply_tuned(load_config(None, [f"model.tuned_hparams={tmp_path / 'none.json'}"]))
    (tmp_path / "x.json").write_text('{"space": []}')
    with pytest.raises(ConfigError, match="is not a best_hparams.json"):
        apply_tuned(load_config(None, [f"model.tuned_hparams={tmp_path / 'x.json'}"]))


def test_tuned_latest_without_a_tuning_is_an_error(imdb_dir, tmp_path, capsys):
    overrides = tiny_overrides(imdb_dir, tmp_path) + ["model.tuned_hparams=latest"]
    assert main(["train", "--no-export"] + _set_args(overrides)) == 1
    assert "no tuning result" in capsys.readouterr().err


@pytest.mark.parametrize("override,key", [
    ("tune.embedding_dims=[]", "tune.embedding_dims"),
    ("tune.embedding_dims=[16,32.5]", "tune.embedding_dims"),
    ("tune.embedding_dims=[16,16]", "tune.embedding_dims"),
    ("tune.executions=1", "tune.executions"),
    ("tune.pick=worst", "tune.pick"),
    ("tune.keep=0", "tune.keep"),
])
def test_bad_tuning_config_exits_2_naming_the_key(override, key, tmp_path, capsys):
    assert main(["tune", "--set", f"tune.directory={tmp_path / 'tuning'}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tuning").exists()


def test_worker_needs_a_tuner_id(capsys):
    assert main(["tune", "--worker", "127.0.0.1:8000"]) == 2
    assert "--tuner-id" in capsys.readouterr().err


# --- the whole search on tiny data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(unlabelled_imdb, tmp_path_factory):
    """One finished search as `make tune` runs it: every execution in a process of its own."""
    out = tmp_path_factory.mktemp("tune")
    overrides = _tune_overrides(unlabelled_imdb, out)
    assert main(["tune"] + _set_args(overrides)) == 0
    cfg = load_config(None, overrides)
    return cfg, out


@pytest.mark.slow
def test_every_execution_is_a_row_and_the_report_follows_from_them(searched, capsys):
    cfg, out = searched
    folder = out / "tuning" / cfg.name
    rows = _rows(folder)
    (teacher,) = (out / "runs" / f"{cfg.name}-teacher").iterdir()  # one, make train's own, for all
    assert [(int(r["embedding_dim"]), r["stage"], int(r["execution"]), int(r["seed"])) for r in rows] == [
        (4, "screen", 0, 42), (8, "screen", 0, 42), (12, "screen", 0, 42),
        *[(d, "full", k, 42 + k) for d in kept(rows) for k in (0, 1)]]
    for r in rows:  # each row is its run's: trained at that size and seed, the test split never read
        run = Path(r["run_dir"])
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["model"]["embedding_dim"], saved["seed"]) == (int(r["embedding_dim"]), int(r["seed"]))
        assert saved["train"]["epochs"] == (1 if r["stage"] == "screen" else 2)
        assert not (run / "metrics.json").exists()
        assert json.loads((run / "run.json").read_text())["distill"]["from"] == str(teacher)
        key = f"{int(r['embedding_dim'])}d-{r['stage']}-{r['execution']}"
        with np.load(folder / "executions" / f"{key}.npz") as z:
            assert float(r["val_accuracy"]) == pytest.approx(np.mean((z["lstm"] > 0.5) == z["labels"]))
            assert ("served" in z) == (r["stage"] == "full")
    search = json.loads((folder / "search.json").read_text())
    for size in search["sizes"]:
        scores = [float(r["val_accuracy"]) for r in rows
                  if r["stage"] == "full" and int(r["embedding_dim"]) == size["dim"]]
        assert size["mean"] == pytest.approx(np.mean(scores)) and size["se"] == pytest.approx(
            np.std(scores, ddof=1) / np.sqrt(2))
        assert size["reviews_per_s"] > 0 and size["export_mb"] > 0 and size["latency_ms_p50"] > 0
    best = json.loads((folder / "best_hparams.json").read_text())
    assert best["values"]["embedding_dim"] == search["pick"]["embedding_dim"] in kept(rows)
    md = (folder / "results.md").read_text()
    assert md.splitlines()[2] == search["pick"]["sentence"]
    assert (folder / "results.png").read_bytes()[:4] == b"\x89PNG"


def kept(rows: list[dict]) -> list[int]:
    return sorted({int(r["embedding_dim"]) for r in rows if r["stage"] == "full"})


@pytest.mark.slow
def test_a_rerun_trains_nothing_again_and_training_takes_the_pick(searched, unlabelled_imdb, monkeypatch,
                                                                   capsys):
    cfg, out = searched
    folder = out / "tuning" / cfg.name
    before = {f: f.stat().st_mtime_ns for f in (folder / "runs").rglob("run.json")}
    monkeypatch.setattr(tune, "run_in_child", _in_this_process)
    monkeypatch.setattr(tune, "run_execution", lambda *a: pytest.fail("an execution trained again"))
    assert main(["tune"] + _set_args(_tune_overrides(unlabelled_imdb, out))) == 0
    assert {f: f.stat().st_mtime_ns for f in (folder / "runs").rglob("run.json")} == before
    picked = json.loads((folder / "best_hparams.json").read_text())["values"]["embedding_dim"]

    overrides = _tune_overrides(unlabelled_imdb, out)
    teachers = sorted((out / "runs" / f"{cfg.name}-teacher").iterdir())
    # The search trained the pick with this seed already: make train evaluates that run, and
    # fits nothing.
    monkeypatch.setattr(train_mod, "fit", lambda *a: pytest.fail("the searched run trained again"))
    assert main(["train", "--no-export", "--tuned", "latest"] + _set_args(overrides)) == 0
    assert sorted((out / "runs" / f"{cfg.name}-teacher").iterdir()) == teachers  # the search's teacher
    (run,) = (out / "runs" / cfg.name).iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["embedding_dim"] == picked != 6
    record = json.loads((run / "run.json").read_text())
    source = record["hyperparameters_from"]
    assert source["source"] == "tuning" and source["values"] == {"embedding_dim": picked}
    searched_run = json.loads((folder / "executions" / f"{picked}d-full-0.json").read_text())["run_dir"]
    assert (record["adopted_from"], record["status"]) == (searched_run, "finished")
    assert (run / "history.csv").read_text() == (Path(searched_run) / "history.csv").read_text()
    assert (run / "metrics.json").is_file()  # evaluated on the test split, which the search never read

    monkeypatch.undo()
    assert main(["train", "--no-export", "--fresh", "--tuned", "latest"] + _set_args(overrides)) == 0
    fresh = max((out / "runs" / cfg.name).iterdir())
    assert "adopted_from" not in json.loads((fresh / "run.json").read_text())


@pytest.mark.slow
def test_two_searches_with_one_seed_give_identical_results(searched, unlabelled_imdb, tmp_path,
                                                             monkeypatch):
    cfg, out = searched
    monkeypatch.setattr(tune, "run_in_child", _in_this_process)
    monkeypatch.setattr(rounds, "run_in_child", _in_this_process)
    monkeypatch.setattr(tune, "costs_of", lambda run_dirs: {})  # what serving costs is timed, not repeated
    assert main(["tune"] + _set_args(_tune_overrides(unlabelled_imdb, tmp_path))) == 0
    first, again = _rows(out / "tuning" / cfg.name), _rows(tmp_path / "tuning" / cfg.name)
    columns = ("embedding_dim", "stage", "execution", "seed", "val_accuracy", "val_served_accuracy",
               "best_epoch", "trainable_params")
    assert [[r[c] for c in columns] for r in again] == [[r[c] for c in columns] for r in first]
    for f in sorted((out / "tuning" / cfg.name / "executions").glob("*.npz")):
        with np.load(f) as a, np.load(tmp_path / "tuning" / cfg.name / "executions" / f.name) as b:
            assert np.array_equal(a["lstm"], b["lstm"])


@pytest.mark.slow
def test_a_search_cut_off_mid_execution_resumes_it_from_its_last_epoch(unlabelled_imdb, tmp_path,
                                                                      monkeypatch, capsys):
    overrides = _tune_overrides(unlabelled_imdb, tmp_path, dims=[4, 8]) + ["tune.keep=2", "train.epochs=3"]
    monkeypatch.setattr(tune, "run_in_child", _in_this_process)
    monkeypatch.setattr(rounds, "run_in_child", _in_this_process)
    monkeypatch.setattr(tune, "costs_of", lambda run_dirs: {})
    callbacks = train_mod.make_callbacks

    def ctrl_c_in_the_second_epoch_of_8d_seed_43(cfg, run_dir):
        stop = [StopAt(1)] if cfg.model.embedding_dim == 8 and cfg.seed == 43 else []
        return callbacks(cfg, run_dir) + stop

    monkeypatch.setattr(train_mod, "make_callbacks", ctrl_c_in_the_second_epoch_of_8d_seed_43)
    assert main(["tune"] + _set_args(overrides)) == 130
    folder = tmp_path / "tuning" / "tiny"
    assert "rerun the same command to resume" in capsys.readouterr().err
    done = {f: f.stat().st_mtime_ns for f in (folder / "executions").glob("*-?.json")}
    assert sorted(f.stem for f in done) == ["4d-full-0", "4d-full-1", "8d-full-0"]

    monkeypatch.setattr(train_mod, "make_callbacks", callbacks)
    assert main(["tune"] + _set_args(overrides)) == 0
    assert {f: f.stat().st_mtime_ns for f in done} == done  # the finished ones were not trained again
    (resumed,) = (folder / "runs" / "tiny-8d").glob(f"*-{_fingerprint_of(folder, '8d-full-1')}")
    assert json.loads((resumed / "run.json").read_text())["started_at_epoch"] == 2
    assert len(_rows(folder)) == 4


@pytest.mark.slow
def test_a_search_after_make_train_scores_make_trains_own_run_instead_of_training_it(
        unlabelled_imdb, tmp_path, monkeypatch):
    overrides = _tune_overrides(unlabelled_imdb, tmp_path, dims=[4, 8]) + ["model.embedding_dim=8"]
    monkeypatch.setattr(tune, "run_in_child", _in_this_process)
    monkeypatch.setattr(rounds, "run_in_child", _in_this_process)
    monkeypatch.setattr(tune, "costs_of", lambda run_dirs: {})
    assert main(["train", "--no-export"] + _set_args(overrides)) == 0
    (trained,) = (tmp_path / "runs" / "tiny").iterdir()
    real_train, trainings = train_mod.train, []

    def train(cfg, *args, **kwargs):
        trainings.append((cfg.model.embedding_dim, cfg.seed, cfg.train.epochs))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train", train)
    assert main(["tune"] + _set_args(overrides)) == 0
    assert sorted(trainings) == [(4, 42, 2), (4, 43, 2), (8, 43, 2)]  # no screen for two sizes; not (8, 42)
    folder = tmp_path / "tuning" / "tiny"
    run = Path(json.loads((folder / "executions" / "8d-full-0.json").read_text())["run_dir"])
    assert run.parent == folder / "runs" / "tiny-8d"  # a copy in the search, make train's run untouched
    assert json.loads((run / "run.json").read_text())["adopted_from"] == str(trained)
    assert (run / "history.csv").read_text() == (trained / "history.csv").read_text()
    assert not (run / "metrics.json").exists()  # make train's test figures stay behind


def _fingerprint_of(folder: Path, key: str) -> str:
    return json.loads((folder / "executions" / f"{key}.json").read_text())["run_dir"].rsplit("-", 1)[1]


def test_changed_settings_need_fresh(tmp_path):
    cfg = _cfg(tmp_path, "model.embedding_init=random")
    out = tune.output_dir(cfg)
    tune.prepare_output(cfg, out, fresh=False)
    (out / "project").mkdir()
    changed = _cfg(tmp_path, "model.embedding_init=random", "model.lstm_units=9")
    with pytest.raises(ConfigError, match="--fresh"):
        tune.prepare_output(changed, out, fresh=False)
    more = _cfg(tmp_path, "model.embedding_init=random", "tune.executions=3", "tune.embedding_dims=[8,16]")
    tune.prepare_output(more, out, fresh=False)  # more executions or sizes extend the search
    tune.prepare_output(changed, out, fresh=True)
    assert not (out / "project").exists()


# --- chief and workers --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the chief exited before serving"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the chief did not listen on port {port} within {timeout}s")


@pytest.mark.slow
def test_chief_and_two_workers_share_the_executions(imdb_dir, tmp_path):
    """Every execution is trained exactly once across the workers; the chief writes the report."""
    overrides = _tune_overrides(imdb_dir, tmp_path, dims=[4, 8]) + ["distill.enabled=false"]
    port = _free_port()
    args = [sys.executable, "-m", "pipeline", "tune"] + _set_args(overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, extra: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(args + extra, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, text=True)
        return procs[name]

    try:
        chief = start("chief", ["--chief", f"127.0.0.1:{port}"])
        _wait_for_port(port, chief, timeout=120)
        for name in ("tuner1", "tuner2"):
            start(name, ["--worker", f"127.0.0.1:{port}", "--tuner-id", name])
        chief.wait(timeout=400)  # it returns once every worker has been told the search is over
        for name in ("tuner1", "tuner2"):
            procs[name].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-3000:]}"

    out = tmp_path / "tuning" / "tiny"
    ran = [e for name in ("tuner1", "tuner2")
           for e in json.loads((out / "workers" / f"{name}.json").read_text())["ran"]]
    assert sorted(e["key"] for e in ran) == ["4d-full-0", "4d-full-1", "8d-full-0", "8d-full-1"]
    assert all(e["status"] == "COMPLETED" for e in ran)
    assert len(_rows(out)) == 4
    picked = json.loads((out / "best_hparams.json").read_text())["values"]["embedding_dim"]
    assert f"Picked {picked}-d" in logs["chief"]
