"""The benchmark runner's own contract: what it writes, and where."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


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
