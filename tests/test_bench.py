import json
import sys

import pytest

from pipeline.bench import MARK_END, MARK_START, peer_table, run_bench, run_peer, write_peer, write_report
from pipeline.runs import code_commit


@pytest.mark.slow
def test_bench_runs_both_sides_and_rewrites_its_table(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"ngrams": tiny_cfg.ngrams.model_copy(update={"enabled": True})})
    result = run_bench(cfg, train_examples=60, test_examples=40, epochs=2)
    for side in ("baseline", "pipeline"):
        m = result[side]
        assert len(m["seconds_per_epoch"]) == 2
        # the headline rate is the second (steady) epoch's: the first also traces and caches
        assert m["best_steady_seconds_per_epoch"] == pytest.approx(m["seconds_per_epoch"][1], abs=0.01)
        steady = m["best_steady_seconds_per_epoch"]  # rounded to 0.01 s, of epochs this short
        assert 60 / (steady + 0.005) <= m["train_examples_per_s"] <= 60 / max(steady - 0.005, 1e-3)
        assert m["test_accuracy"] == 1.0, side  # all 40 test reviews: the tiny data is separable
    assert result["train_speedup"] == pytest.approx(
        result["pipeline"]["train_examples_per_s"] / result["baseline"]["train_examples_per_s"], abs=0.01)
    serving = result["serving"]
    assert serving["savedmodel_vs_keras"] == pytest.approx(
        serving["savedmodel_examples_per_s"] / serving["keras_examples_per_s"], abs=0.01)
    assert result["train_examples"] == 60 and result["test_examples"] == 40
    assert result["peer"]["test_accuracy"] == 1.0  # separable tiny data: the peer gets it
    # the served model: the LSTM with its n-gram branch, trained a little longer than the LSTM alone
    served = result["served"]
    assert served["test_accuracy"] == 1.0 and served["test_auc"] == 1.0
    assert served["train_seconds"] >= sum(result["pipeline"]["seconds_per_epoch"])

    md = tmp_path / "speed.md"
    md.write_text(f"# Speed\n\nnotes above\n\n{MARK_START}\nold\n{MARK_END}\n\nnotes below\n")
    write_report(result, tmp_path / "out" / "bench.json", md)
    write_report(result, tmp_path / "out" / "bench.json", md)
    text = md.read_text()
    assert text.count(MARK_START) == 1 and "old" not in text
    assert "notes above" in text and "notes below" in text
    assert f"**{result['train_speedup']}x**" in text
    assert f"| {result['peer']['test_accuracy']:.4f} | {result['peer']['test_auc']:.4f} |" in text
    assert f"served), 2 epochs | {served['test_accuracy']:.4f} | {served['test_auc']:.4f} |" in text
    assert (tmp_path / "out" / "bench.json").is_file()


def test_peer_alone_uses_the_same_splits_and_keeps_its_record(tiny_cfg, tmp_path):
    result = run_peer(tiny_cfg, None, None)
    assert result["train_examples"] == 90 and result["test_examples"] == 40  # train[:75%] of 120
    # separable tiny data: the peer calls all 40 test reviews right and ranks them all
    assert result["peer"]["test_accuracy"] == 1.0 and result["peer"]["test_auc"] == 1.0
    # what `make results` reads: the code's commit, the command, the time and memory it took
    assert result["commit"] == code_commit() and result["command"] == sys.argv[1:]
    assert result["total_seconds"] >= result["peer"]["train_seconds"] and result["peak_rss_mib"] > 0
    write_peer(result, tmp_path / "out" / "peer.json")
    assert json.loads((tmp_path / "out" / "peer.json").read_text()) == result
    table = peer_table(result, "")
    assert "(c) linear peer" in table and "(a)" not in table
