"""`fastcoop demo` — the README's first command — runs the whole pipeline and leaves its outputs."""

import json

from conftest import TINY_VIT, run_cli


def test_demo_runs_the_pipeline_end_to_end(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--dir", tmp_path, "--model", TINY_VIT, "--pretrained", "none",
                             "--device", "cpu")
    assert code == 0, err
    assert "zero-shot test accuracy" in out and "CoOp test accuracy" in out and "meaningless" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] > 0 and 0.0 <= results["test"]["top1"] <= 1.0
    assert (tmp_path / "features.h5").exists() and (tmp_path / "run" / "prompt.safetensors").exists()
    for method in ("coop", "cocoop"):  # the base-to-new table: both methods, base, new and H
        results = json.loads((tmp_path / f"base-to-new-{method}" / "results.json").read_text())
        assert f"| {method} | base |" in out and f"| {100 * results['test']['top1']:.2f} |" in out
        assert f"| {100 * results['test_new']['top1']:.2f} |" in out
    assert "new top-1 | H |" in out
