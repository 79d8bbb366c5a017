"""`make demo` runs end to end and picks up where it stopped."""

from stablemdm.demo import RUNS, run_demo


def test_demo_trains_evaluates_and_skips_finished_runs(tmp_path, capsys):
    results = run_demo(tmp_path, steps=3, limit=5)
    assert set(results) == set(RUNS)
    for name, result in results.items():
        assert result["n"] == 5 and 0 <= result["accuracy"] <= 1
        assert (tmp_path / name / "eval-test.jsonl").is_file()
    assert "test accuracy" in capsys.readouterr().out
    assert run_demo(tmp_path, steps=3, limit=5) == results
    assert capsys.readouterr().out.count("already done") == len(RUNS)
