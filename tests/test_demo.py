"""`fastcoop demo` — the README's first command — runs the whole pipeline and leaves its outputs."""

import json

import pytest

from conftest import TINY_VIT, run_cli


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--dir", tmp_path, "--model", TINY_VIT, "--pretrained", "none",
                             "--device", "cpu")
    assert code == 0, err
    assert "zero-shot test accuracy" in out and "CoOp test accuracy" in out and "meaningless" in out
    eight_shot = tmp_path / "sweep" / "coop-M4-unified-end" / "8shot-seed1"
    results = json.loads((eight_shot / "results.json").read_text())
    assert results["steps"] > 0 and f"CoOp test accuracy: {results['test']['top1']:.1%} at 8 shots" in out
    assert (tmp_path / "features.h5").exists() and (eight_shot / "prompt.safetensors").exists()
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())  # the paper's protocol, one seed
    assert [r["shots"] for r in summary["runs"]] == [1, 2, 4, 8] and len(summary["baselines"]["linear probe"]) == 4
    assert (tmp_path / "sweep" / "accuracy.png").stat().st_size > 0 and "| linear probe |" in out
    for method in ("coop", "cocoop"):  # the base-to-new table: both methods, base, new and H
        results = json.loads((tmp_path / f"base-to-new-{method}" / "results.json").read_text())
        assert f"| {method} | base |" in out and f"| {100 * results['test']['top1']:.2f} |" in out
        assert f"| {100 * results['test_new']['top1']:.2f} |" in out
    assert "new top-1 | H |" in out
    stages = out[out.index("stage times:"):].splitlines()[1:]  # each stage named, the probe apart from CoOp's runs
    assert [line.split("  ")[1].split(" (")[0].strip() for line in stages[3:6]] == [
        "CoOp at 4 shot counts", "linear probe at 4 shot counts", "sweep's zero-shot, table, figure"]


def test_demo_refuses_a_file_as_its_folder_and_an_unknown_model(tmp_path, capsys):
    """Answered before anything is made or written."""
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--dir", taken, "--model", TINY_VIT, "--device", "cpu")
    assert code == 2 and "taken" in err and taken.read_text() == "mine"
    code, _, err = run_cli(capsys, "demo", "--dir", tmp_path / "new", "--model", "no-such-model", "--device", "cpu")
    assert code == 2 and "no-such-model" in err and not (tmp_path / "new").exists()
