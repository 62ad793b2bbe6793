"""The benchmark runner's own contract: what it writes, and where."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_out_writes_only_inside_the_folder_it_names(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(ROOT / "benchmarks" / "results" / "cpu.json", out)
    (tmp_path / "README.md").write_text("someone else's")
    subprocess.run([sys.executable, "-m", "benchmarks", "--report-only", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"]
    assert (tmp_path / "README.md").read_text() == "someone else's"
    report = (out / "README.md").read_text()
    assert "Raw numbers in `./cpu.json`" in report
    assert all((out / line.split("(")[1].rstrip(")")).is_file() for line in report.splitlines()
               if line.startswith("!["))


def test_the_interpreter_time_leaves_out_the_parts_of_the_loop():
    """The first epoch and its kernels and capture lie inside the loop: the interpreter's own time is the wall
    time less the stages alone."""
    from benchmarks.full_run import derived_times

    timings = {"imports_s": 2.0, "model_s": 0.5, "setup_s": 0.25, "first_epoch_s": 1.5, "kernels_s": 1.0,
               "capture_s": 0.25, "loop_s": 4.0, "save_and_test_s": 0.25}
    derived = derived_times(10.0, timings, steps=1000, epochs=200)
    assert derived["interpreter_seconds"] == 10.0 - 7.0 and derived["start_to_loop_seconds"] == 10.0 - 4.25
    assert abs(derived["loop_ms_per_step"] - 1000 * 2.5 / 995) < 1e-9


@pytest.mark.slow
def test_the_protocol_section_runs_both_commands_quick(capsys):
    """The protocol section (quick, with the tiny model): a cache of generated JPEGs for every (shots, seed) and
    a sweep of its runs, each a whole `fastcoop` process, beside the published estimate's parts."""
    from benchmarks.protocol import run_protocol_section
    from conftest import TINY_VIT

    row = run_protocol_section("eurosat", "cpu", published_step_ms=10.0, startup_seconds=1.0, quick=True,
                               model=TINY_VIT)
    assert row["runs"] == 4 and row["classes"] == 10 and row["model"] == "tiny-vit"
    assert row["cache_output"].startswith("wrote ") and "subsets 1-shot seed 1, 1-shot seed 2, 2-shot" in \
        row["cache_output"]
    assert row["protocol_seconds"] == row["cache_seconds"] + row["sweep_seconds"] > 0
    assert row["published_estimate_seconds"] == 10.0 * row["steps"] / 1000 + 4 * 1.0
