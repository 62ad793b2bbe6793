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
