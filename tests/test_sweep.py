"""`fastcoop sweep`: every run of the protocol in one command, equal to separate runs; kept across reruns."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import TINY_VIT, run_cli

SWEEP = ["--shots", "1,2", "--seeds", "1,2", "--n-ctx", "2", "--csc", "no,yes", "--epochs", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory, example_images):
    """train, val and test: the example's train images as a flat folder, split 50/20/30 %; 1- and 2-shot subsets."""
    root = tmp_path_factory.mktemp("sweep")
    for class_dir in (example_images / "train").iterdir():
        shutil.copytree(class_dir, root / "flat" / class_dir.name)
    from fastcoop.cli import main

    for shots, name in (("2", "s2.h5"), ("1,2", "s12.h5")):
        with pytest.raises(SystemExit) as done:
            main(["cache", str(root / "flat"), "--out", str(root / name), "--model", TINY_VIT, "--pretrained",
                  "none", "--shots", shots, "--seeds", "1,2", "--views", "2", "--splits", "train,val,test",
                  "--workers", "0"])
        assert done.value.code == 0
    return root


def test_a_sweep_needs_every_subset_in_its_cache(tmp_path, capsys, split_cache):
    code, _, err = run_cli(capsys, "sweep", split_cache / "s2.h5", "--out", tmp_path / "s", *SWEEP)
    assert code == 2 and "has no 1-shot subset for seed 1" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("option, value, message", [("--csc", "maybe", "--csc takes no, yes"),
                                                     ("--position", "top", "--position takes end, middle, front"),
                                                     ("--seeds", "", "--seeds must be comma-separated"),
                                                     ("--n-ctx", "0", "--shots and --n-ctx take positive integers")])
def test_bad_values_are_one_line_exit_2(tmp_path, capsys, split_cache, option, value, message):
    args = [a if a != "no,yes" or option != "--csc" else value for a in SWEEP]
    if option != "--csc":
        args += [option, value]
    code, _, err = run_cli(capsys, "sweep", split_cache / "s2.h5", "--out", tmp_path / "s", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sweep_runs_equal_separate_runs_and_survive_reruns(tmp_path, capsys, split_cache, tiny_vit):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, *SWEEP)
    assert code == 0, err
    runs = sorted(out.glob("*/*shot-seed*"))
    assert [r.relative_to(out).as_posix() for r in runs] == [f"coop-M2-{c}-end/{s}shot-seed{r}" for c in ("csc", "unified")
                                                             for s in (1, 2) for r in (1, 2)]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 8 and len(summary["baselines"]["linear probe"]) == 4
    assert summary["zero_shot"] is not None
    table = (out / "summary.md").read_text()
    assert "| CoOp M2-csc-end |" in table and "| linear probe |" in table and (out / "accuracy.png").stat().st_size > 0
    assert "| CoOp M2-unified-end |" in stdout
    assert "CoOp M2-unified-end, M2-csc-end: 8 runs stacked (1, 2 shots, seeds 1, 2)" in stdout  # both variants
    for variant, csc in (("coop-M2-unified-end", []), ("coop-M2-csc-end", ["--csc"])):  # each equals a separate run
        alone = tmp_path / f"alone-{variant}"
        code, _, err = run_cli(capsys, "train", split_cache / "s12.h5", "--out", alone, "--shots", "2", "--seed", "2",
                               "--n-ctx", "2", "--epochs", "2", "--device", "cpu", *csc)
        assert code == 0, err
        theirs = load_file(alone / "prompt.safetensors")["ctx"]  # stacked with seed 1 in the sweep, alone here
        assert (load_file(out / variant / "2shot-seed2" / "prompt.safetensors")["ctx"] - theirs).norm() <= \
            1e-5 * theirs.norm()
    kept = {r: (r / "results.json").stat().st_mtime_ns for r in runs}
    redo = out / "coop-M2-csc-end" / "2shot-seed1"
    (redo / "results.json").unlink()  # as if it had been killed before finishing
    config = json.loads((redo / "config.json").read_text())
    (redo / "config.json").write_text(json.dumps(config | {"state": "running"}))
    code, stdout, _ = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, *SWEEP)
    assert code == 0 and stdout.count("shots, seed") == 1  # only the unfinished run trained again
    assert all((r / "results.json").stat().st_mtime_ns == t for r, t in kept.items() if r != redo)
    assert (redo / "results.json").exists()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, *SWEEP[:-4], "--epochs", "3",
                           "--device", "cpu")
    assert code == 2 and "holds a different sweep" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    shutil.copytree(out, tmp_path / "again")  # a second "dataset": report averages the two
    code, stdout, _ = run_cli(capsys, "report", out, tmp_path / "again")
    assert code == 0 and "| average of 2 | CoOp M2-csc-end |" in stdout
    # a report reads JSON alone: in a fresh process it never imports torch, for a sweep or for runs
    code = ("import sys\nfrom fastcoop.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\nassert 'torch' not in sys.modules\n")
    for folder, row in ((out, f"| {out.name} | CoOp M2-csc-end |"), (out / "coop-M2-csc-end" / "1shot-seed1", "| s12.h5 |")):
        done = subprocess.run([sys.executable, "-c", code, "report", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0 and row in done.stdout, (done.stdout, done.stderr)


@pytest.mark.slow
def test_torchrun_shares_the_runs_and_writes_the_same_directories(tmp_path, split_cache):
    """Two gloo processes on CPU: each trains every other run; the contexts equal a one-process sweep's."""
    import os
    import subprocess
    import sys

    args = ["sweep", str(split_cache / "s12.h5"), *SWEEP[:-4], "--epochs", "2", "--device", "cpu",
            "--csc", "no"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "fastcoop", *args, "--out", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastcoop", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("summary, table and figure") == 1
    runs = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").glob("*/*shot-seed*"))
    assert len(runs) == 4 and runs == sorted(p.relative_to(tmp_path / "two")
                                             for p in (tmp_path / "two").glob("*/*shot-seed*"))
    for run in runs:  # one process stacks each shot count's two seeds; here each rank trains one of them
        ours = load_file(tmp_path / "two" / run / "prompt.safetensors")["ctx"]
        theirs = load_file(tmp_path / "one" / run / "prompt.safetensors")["ctx"]
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()


def test_a_cocoop_base_to_new_sweep_stacks_seeds_and_reports_base_new_and_h(tmp_path, capsys, split_cache):
    """CoCoOp's protocol in one command: seeds 1 and 2 stacked, each equal to its own `fastcoop train` (context
    and Meta-Net), the table's base, new and H rows, zero-shot CLIP on each half, and the average over datasets."""
    out = tmp_path / "b2n"
    args = ["--method", "cocoop", "--classes", "base", "--shots", "2", "--seeds", "1,2", "--epochs", "2",
            "--device", "cpu"]
    code, stdout, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, *args)
    assert code == 0, err
    alone = tmp_path / "alone"
    assert run_cli(capsys, "train", split_cache / "s12.h5", "--out", alone, "--method", "cocoop", "--classes", "base",
                   "--shots", "2", "--seed", "2", "--epochs", "2", "--device", "cpu")[0] == 0
    ours, theirs = (load_file(d / "prompt.safetensors") for d in (out / "cocoop-M4-unified-end" / "2shot-seed2", alone))
    assert set(ours) == set(theirs) and "meta_net.linear1.weight" in ours
    for name in theirs:
        assert (ours[name] - theirs[name]).norm() <= 1e-5 * theirs[name].norm(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["cocoop"] and "baselines" not in summary and summary["zero_shot_new"] is not None
    base = [r["test"] for r in summary["runs"]]
    new = [r["test_new"] for r in summary["runs"]]
    mean_base, mean_new = sum(base) / 2, sum(new) / 2
    harmonic = 2 * mean_base * mean_new / (mean_base + mean_new) if mean_base + mean_new else 0.0
    zero, zero_new = summary["zero_shot"], summary["zero_shot_new"]
    zero_h = 2 * zero * zero_new / (zero + zero_new) if zero + zero_new else 0.0
    assert "| CoCoOp M4-unified-end base |" in stdout and "| CoCoOp M4-unified-end new |" in stdout
    assert f"| CoCoOp M4-unified-end H | {100 * zero_h:.2f} | {100 * harmonic:.2f} |" in stdout
    shutil.copytree(out, tmp_path / "again")
    code, stdout, _ = run_cli(capsys, "report", out, tmp_path / "again")
    assert code == 0 and f"| average of 2 | CoCoOp M4-unified-end H | {100 * zero_h:.2f} | {100 * harmonic:.2f} |" in stdout
    code, _, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", tmp_path / "x", "--method", "cocoop",
                           "--csc", "yes", "--shots", "2", "--device", "cpu")
    assert code == 2 and "CoCoOp has no --csc" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_stack_too_big_for_the_device_is_split_and_says_so(tmp_path, capsys, split_cache, monkeypatch):
    """Out of device memory, a method's stack trains as halves (down to stacks that fit), each run as it would
    have in the one stack."""
    import torch

    import fastcoop.sweep

    train_to_run_dirs, stacks = fastcoop.sweep.train_to_run_dirs, []

    def fits_two(cache, loaded, recipes, run_dirs, **options):
        if len(recipes) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        stacks.append(len(recipes))
        return train_to_run_dirs(cache, loaded, recipes, run_dirs, **options)

    monkeypatch.setattr(fastcoop.sweep, "train_to_run_dirs", fits_two)
    args = [a if a != "no,yes" else "no" for a in SWEEP]
    code, stdout, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", tmp_path / "split", *args)
    assert code == 0, err
    assert "4 runs stacked do not fit in the device's memory: training them as 2 and 2" in stdout and stacks == [2, 2]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", tmp_path / "whole", *args)
    assert code == 0, err
    runs = sorted(run.relative_to(tmp_path / "whole") for run in (tmp_path / "whole").glob("*/*shot-seed*"))
    assert len(runs) == 4
    for run in runs:
        assert torch.equal(*(load_file(tmp_path / sweep / run / "prompt.safetensors")["ctx"]
                             for sweep in ("whole", "split")))


def test_several_methods_sweep_side_by_side_each_with_its_published_context(tmp_path, capsys, split_cache):
    """`--method coop,kgcoop,cocoop`: each method's runs with its own published context (CoOp's random M, KgCoOp's
    and CoCoOp's M = 4 from "a photo of a"; -o kg_weight reaching KgCoOp only), each run equal to its own `train`,
    all in one table; a method option given without its method is refused."""
    import torch

    out = tmp_path / "methods"
    args = ["--shots", "1", "--seeds", "1", "--epochs", "1", "--device", "cpu"]
    code, stdout, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, *args,
                                "--method", "coop,kgcoop,cocoop", "-o", "kg_weight=2")
    assert code == 0, err
    for label in ("CoOp M16-unified-end", "KgCoOp M4-unified-end", "CoCoOp M4-unified-end", "linear probe"):
        assert f"| {label} |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["cocoop", "coop", "kgcoop"] and len(summary["runs"]) == 3
    for folder, method, extra in (("kgcoop-M4-unified-end", "kgcoop", ["-o", "kg_weight=2"]),
                                  ("cocoop-M4-unified-end", "cocoop", [])):
        trained = json.loads((out / folder / "1shot-seed1" / "config.json").read_text())["train"]
        assert (trained["method"], trained["n_ctx"], trained["init"]) == (method, 4, "a photo of a")
        alone = tmp_path / f"alone-{method}"
        code, _, err = run_cli(capsys, "train", split_cache / "s12.h5", "--out", alone, "--method", method,
                               "--shots", "1", "--epochs", "1", "--device", "cpu", *extra)
        assert code == 0, err
        ours, theirs = (load_file(d / "prompt.safetensors") for d in (out / folder / "1shot-seed1", alone))
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert "kg_weight" not in json.loads((out / "coop-M16-unified-end" / "1shot-seed1" / "config.json").read_text())[
        "train"]
    code, _, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", tmp_path / "refused", *args,
                           "--method", "coop,cocoop", "-o", "kg_weight=2")
    assert code == 2 and "-o kg_weight is not an option of CoOp or CoCoOp" in err
    assert not (tmp_path / "refused").exists()


def test_tip_adapter_on_fewer_views_than_published_warns_and_records_them(tmp_path, capsys, split_cache):
    """As CoOp runs do: Tip-Adapter's keys average the 2 views this cache holds (10 published), and -F cycles them;
    one warning says so and the result records it."""
    with pytest.warns(UserWarning, match="Tip-Adapter averages 10 augmented views per key.* holds 2, so its keys "
                      "average 2"):
        code, _, err = run_cli(capsys, "tip-adapter", split_cache / "s2.h5", "--shots", "2", "--finetune",
                               "--device", "cpu", "--out", tmp_path / "tip.json")
    assert code == 0, err
    augmentation = json.loads((tmp_path / "tip.json").read_text())["augmentation"]
    assert augmentation == {"cached_views": 2, "key_views": 2, "published_key_views": 10, "finetune_views": 2}
    with pytest.warns(UserWarning) as said:  # in a sweep too, each warning once
        code, _, err = run_cli(capsys, "sweep", split_cache / "s2.h5", "--out", tmp_path / "s", "--shots", "2",
                               "--seeds", "1", "--n-ctx", "2", "--epochs", "1", "--baselines", "tip-adapter",
                               "--device", "cpu")
    assert code == 0, err
    tip = [str(w.message) for w in said if "Tip-Adapter" in str(w.message)]
    assert len(tip) == len(set(tip)) == 2, tip  # the views it averages, and their crop scale


def test_outputs_never_mix_a_users_files_and_a_sweep_grows_or_is_replaced_by_name(tmp_path, capsys, split_cache):
    """`train --out` and `sweep --out` refuse a folder holding a user's own files (even with --overwrite: they are
    not the tool's to remove); a sweep rerun with more shot counts or seeds trains only the new runs; another
    setting is refused naming what differs, and --overwrite replaces the sweep (its runs) and keeps the rest."""
    cache = split_cache / "s12.h5"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    quick = ["--n-ctx", "2", "--epochs", "1", "--device", "cpu"]
    for command in (["train", cache, "--out", mine, "--shots", "1", *quick],
                    ["train", cache, "--out", mine, "--shots", "1", *quick, "--overwrite"],
                    ["sweep", cache, "--out", mine, "--shots", "1", "--seeds", "1", *quick]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "holds files that are not a fastcoop" in err and "(notes.txt)" in err, err
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    out, sweep = tmp_path / "sweep", ["sweep", cache, "--baselines", "none", *quick]
    assert run_cli(capsys, *sweep, "--out", out, "--shots", "1", "--seeds", "1")[0] == 0
    first = out / "coop-M2-unified-end" / "1shot-seed1" / "results.json"
    kept = first.stat().st_mtime_ns
    code, stdout, err = run_cli(capsys, *sweep, "--out", out, "--shots", "1,2", "--seeds", "1")
    assert code == 0 and stdout.count("shots, seed") == 1 and "2 shots, seed 1" in stdout, err  # the new run only
    assert first.stat().st_mtime_ns == kept and len(json.loads((out / "summary.json").read_text())["runs"]) == 2
    code, _, err = run_cli(capsys, *sweep, "--epochs", "2", "--out", out, "--shots", "1", "--seeds", "1")
    assert code == 2 and "holds a different sweep (epochs: 1 → 2); pass --overwrite" in err, err
    (out / "notes.txt").write_text("mine too")
    code, _, err = run_cli(capsys, *sweep, "--epochs", "2", "--out", out, "--shots", "1", "--seeds", "1",
                           "--overwrite")
    assert code == 0, err
    assert json.loads(first.read_text())["epochs"] == 2 and (out / "notes.txt").read_text() == "mine too"
    assert not (out / "coop-M2-unified-end" / "2shot-seed1").exists()  # the replaced sweep's runs are gone


def test_the_figure_gives_every_curve_its_colour_and_keeps_the_legend_off_the_points():
    """Each variant and baseline its own colour, none zero-shot's red; a base-to-new variant's new curve in its base
    colour but dotted; zero-shot CLIP on the new classes too; the legend outside the axes."""
    import matplotlib.colors

    from fastcoop.sweep import accuracy_figure

    runs = [{"variant": v, "shots": s, "seed": 1, "test": 0.5, "test_new": 0.4} for v in ("CoOp M4", "CoCoOp M4")
            for s in (1, 2)]
    tip = {name: [{"shots": s, "test": test} for s in (1, 2)] for name, test in (("Tip-Adapter", 0.6),
                                                                                   ("Tip-Adapter-F", 0.65))}
    summary = {"runs": runs, "trained_on": "base", "zero_shot": 0.55, "zero_shot_new": 0.45,
               "baselines": {"linear probe": [{"shots": s, "test": 0.3} for s in (1, 2)], **tip}}
    fig = accuracy_figure(summary, "t")
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # the curves (error bars), then the stars
    lines |= {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    colour = {name: matplotlib.colors.to_hex(line.get_color()) for name, line in lines.items()}
    curves = ["CoOp M4 base", "CoCoOp M4 base", "linear probe", "Tip-Adapter", "Tip-Adapter-F"]
    assert len({colour[c] for c in curves} | {colour["zero-shot CLIP base"]}) == len(curves) + 1
    assert colour["CoOp M4 new"] == colour["CoOp M4 base"] and lines["CoOp M4 new"].get_linestyle() == ":"
    assert lines["zero-shot CLIP new"].get_markerfacecolor() == "none"
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, over no point


@pytest.mark.slow
def test_every_method_side_by_side_in_one_sweep_table_and_figure(tmp_path, capsys, split_cache):
    """Every registered method and every baseline on one cache of JPEGs (the example's, split with val), its
    few-shot images and views: one table with a row each, the figure with a curve each."""
    from fastcoop import methods

    out = tmp_path / "all"
    with pytest.warns(UserWarning):  # the cache's 2 views, fewer than the methods' epochs and pools
        code, stdout, err = run_cli(capsys, "sweep", split_cache / "s12.h5", "--out", out, "--method",
                                    ",".join(methods.BUILT_IN), "--baselines", ",".join(methods.BASELINES),
                                    "--shots", "1,2", "--seeds", "1", "--epochs", "2", "--device", "cpu")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    labels = {run["variant"] for run in summary["runs"]} | set(summary["baselines"])
    assert len(labels) == len(methods.BUILT_IN) + len(methods.BASELINES)
    for label in labels:
        assert f"| all | {label} |" in stdout, label
    assert (out / "accuracy.png").is_file() and summary["methods"] == sorted(
        methods.get(name).name for name in methods.BUILT_IN)


def test_a_baseline_the_cache_cannot_serve_is_refused_before_any_run_trains(tmp_path, capsys):
    """The linear probe needs each subset's few-shot val images: a cache with val and test but not those is
    refused at the start, not after every run has trained."""
    import h5py

    from benchmarks.full_run import write_synthetic_cache

    cache = tmp_path / "eurosat.h5"
    write_synthetic_cache(cache, "eurosat", shots=[1], seeds=[1],
                          eval_per_class={"val": 4, "test": 4})
    with h5py.File(cache, "a") as f:
        del f["val/subsets"]
    code, _, err = run_cli(capsys, "sweep", cache, "--out", tmp_path / "s", "--shots", "1", "--seeds", "1",
                           "--device", "cpu", "--baselines", "linear-probe")
    assert code == 2 and "has no few-shot val subset for 1 shots, seed 1" in err and not (tmp_path / "s").exists()
