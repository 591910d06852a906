"""`taskvec demo`: the minimal version prints the λ table; the zoo version writes a complete report."""
import re

import pytest

from taskvec.demo import main, run_zoo_demo


def test_minimal_demo_prints_negation_and_finetuned_rows(capsys):
    assert main(["--minimal"]) == 0
    out = capsys.readouterr().out
    rows = {float(m.group(1)): float(m.group(2)) for m in re.finditer(r"([+-]\d\.\d)\s+(\d+\.\d)%", out)}
    assert set(rows) == {-1.0, -0.5, 0.0, 0.5, 1.0}
    assert rows[1.0] > rows[0.0] > rows[-1.0]      # fine-tuning helps, negating it hurts


@pytest.mark.slow
def test_zoo_demo_writes_figures_csvs_and_report(tmp_path):
    out = tmp_path / "demo"
    small = dict(negation=(2.0,), addition=(0.5,), sizes=(1, 8), ties_lambdas=(1.0,), densities=(0.2,), drop=(0.0, 0.9),
                 limit=48, val_limit=24)
    results = run_zoo_demo(out, fast=True, grid=small)
    names = sorted(p.name for p in out.iterdir())
    for stem in ("demo-negation", "demo-addition", "demo-merging", "demo-dare-sweep", "demo-cosine"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names
    for f in ("report.md", "report.html", "negation.csv", "addition.csv", "merging_methods.csv", "dare_sweep.csv",
              "cosine.csv", "zoo_accuracy.csv", "merging_differences.csv", "out_of_distribution.csv"):
        assert f in names
    report = (out / "report.md").read_text()
    assert report.count("![") == 5 and "Negation" in report and "DARE" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    assert results["negation"]["target_drop_points"] > results["negation"]["control_drop_points"]
    assert set(results["merging"]) == {"averaging", "task arithmetic", "TIES"}
    assert "Made by" in report and " s." not in report.split("Made by")[1]   # no wall time: reruns are byte-stable
    lo, hi = results["negation"]["target_drop_interval"]
    assert lo <= results["negation"]["target_drop_points"] <= hi
    assert 0 <= results["cosine_mean_abs_offdiag"] < 0.5


def test_report_folder_is_replaced_whole(tmp_path):
    from taskvec.io.writer import replace_dir

    out, new = tmp_path / "demo", tmp_path / ".new"
    out.mkdir(); (out / "stale.txt").write_text("old")
    new.mkdir(); (new / "report.md").write_text("new")
    replace_dir(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]   # no temp or old folder left


def test_failed_swap_puts_the_old_folder_back(tmp_path):
    from taskvec.io.writer import replace_dir

    out = tmp_path / "demo"
    out.mkdir(); (out / "report.md").write_text("old")
    with pytest.raises(OSError):
        replace_dir(tmp_path / ".missing", out)      # the new folder can't be renamed in
    assert (out / "report.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
