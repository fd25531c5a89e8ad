import pytest

import pipeline.evaluate_report


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    def broken(result, path):
        path.write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.evaluate_report, "plot_calibration", broken)
    with pytest.raises(OSError):
        pipeline.evaluate_report.write({"model": "m"}, tmp_path / "evaluation")
    assert not (tmp_path / "evaluation").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        pipeline.evaluate_report.write({"model": "m"}, tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())
