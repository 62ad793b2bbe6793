"""Every subcommand against bad input: exit code 2, one line naming the real cause, no traceback, and nothing
already written changed (no file touched, none added)."""

import json
import os
import shutil

import pytest

from conftest import TINY_VIT, run_cli
from fastcoop.cache import extract_features
from fastcoop.datasets import read_dataset


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_vit, example_images):
    """A finished cache and a finished run, which no bad command may change."""
    folder = tmp_path_factory.mktemp("written")
    extract_features(read_dataset(example_images), folder / "f.h5", tiny_vit, shots=2, seeds=[1], views=1,
                     batch_size=32, workers=0, progress=False)
    (folder / "notes.txt").write_text("a file where a folder is expected")
    (folder / "bad.json").write_text("{not json")
    (folder / "sweep").mkdir()
    (folder / "sweep" / "sweep.json").write_text("{}")  # a sweep's folder, which no run may be written into
    for name in ("a_class", "b_class"):
        (folder / "flat" / name).mkdir(parents=True)
        (folder / "flat" / name / "x.jpg").write_bytes((example_images / "train" / "red_circle" / "000.jpg")
                                                       .read_bytes())
    (folder / "eurosat" / "2750").mkdir(parents=True)  # CoOp's EuroSAT folder, with its split file
    rows = [["x.jpg", 0, "Forest"], ["x.jpg", 1, "River"]]
    (folder / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": rows, "val": [], "test": rows}))
    shutil.copy(folder / "flat" / "a_class" / "x.jpg", folder / "eurosat" / "2750" / "x.jpg")
    (folder / "dtd" / "images").mkdir(parents=True)  # CoOp's DTD folder without its split file
    return folder


def _run(written, example_images):
    from fastcoop.cli import main

    try:
        main(["train", str(written / "f.h5"), "--out", str(written / "run"), "--shots", "2", "--n-ctx", "2",
              "--epochs", "1", "--device", "cpu"])
    except SystemExit as exc:
        assert exc.code == 0


CASES = [  # (command line, what the one error line must say)
    ("cache {w}/nope --out {w}/g.h5", "dataset path {w}/nope does not exist"),
    ("cache {w}/notes.txt --out {w}/g.h5", "is neither a CoOp split .json, a .csv nor a folder"),
    ("cache {images} --out {w}/g.h5 --views -1", "--views must be a non-negative integer or 'auto', not '-1'"),
    ("cache {images} --out {w}/g.h5 --seeds ,", "--seeds must be comma-separated integers such as 1,2,3, not ','"),
    ("sweep {w}/f.h5 --out {w}/s --seeds 1,,2", "--seeds must be comma-separated integers such as 1,2,3, not '1,,2'"),
    ("cache {images} --out {w}/g.h5 --shots 0", "shots must be a positive integer or 'all', not '0'"),
    ("cache {images} --out {w}/g.h5 --device tpu", "unknown --device 'tpu'"),
    ("cache {images} --out {w}/g.h5 --model ViT-X-99", "unknown model 'ViT-X-99'"),
    ("cache {images} --out {w}/notes.txt/g.h5", "cannot write feature cache {w}/notes.txt/g.h5: {w}/notes.txt is a file"),
    ("cache {w}/flat --out {w}/g.h5 --split-ratios half", "--split-ratios must be 'train,val' fractions"),
    ("cache {images} --out {w}/g.h5 --model {w}/bad.json", "model config {w}/bad.json is not a JSON file"),
    ("train {w}/f.h5 --out /proc/fastcoop-run --shots 2", "cannot write run directory /proc/fastcoop-run: /proc"),
    ("cache {images} --out {w}/g.h5 --splits train,validation", "--splits takes train, val and test (comma-separated), "
                                                                "not validation"),
    ("cache {w}/flat --out {w}/g.h5 --layout csv", "--layout csv reads a .csv file; {w}/flat is a folder"),
    ("cache {images}/train --out {w}/g.h5 --model ViT-X-99", "unknown model 'ViT-X-99'"),  # no g.split.json left
    ("cache {w}/flat --out {w}/g.h5 --split-ratios 0.5,0.2", "class 'a class' has 1 images: too few to split"),
    ("cache {images} --out {w}/f.h5 --model " + TINY_VIT + " --pretrained none --shots 2 --seeds 1 --views 3",
     "exists and was made with other settings (views: 1 → 3)"),
    ("train {w}/missing.h5 --out {w}/r", "feature cache {w}/missing.h5 does not exist"),
    ("train {w}/notes.txt --out {w}/r", "is not a readable HDF5 feature cache"),
    ("train {w} --out {w}/r", "is a folder, not a feature cache file"),
    ("train {w}/f.h5 --out {w}/r --shots 2 --device tpu", "unknown --device 'tpu'"),
    ("train {w}/f.h5 --out {w}/r --shots 2 --n-ctx 0", "Invalid value for '--n-ctx'"),
    ("train {w}/f.h5 --out {w}/r --shots 8", "has no 8-shot subset for seed 1"),
    ("train {w}/f.h5 --out {w}/r --shots all", "holds only the train images of its few-shot subsets"),
    ("train {w}/f.h5 --out {w}/notes.txt/r --shots 2", "{w}/notes.txt is a file"),
    ("train {w}/f.h5 --out {w}/run --shots 2 --n-ctx 2 --epochs 2 --device cpu",
     "holds a finished run made with other settings (epochs: 1 → 2)"),
    ("eval {w}/f.h5 {w}/run", "the arguments are swapped"),
    ("eval {w}/nope {w}/f.h5", "{w}/nope is not a fastcoop run directory"),
    ("eval {w}/run {w}/missing.h5", "feature cache {w}/missing.h5 does not exist"),
    ("eval {w}/run {w}/f.h5 --device tpu", "unknown --device 'tpu'"),
    ("zeroshot {w}/missing.h5", "does not exist"),
    ("zeroshot {w}/f.h5 --template nothing", "must contain '{{}}'"),
    ("predict {w}/run {w}/nope.jpg", "cannot read image"),
    ("predict {w}/nope {w}/nope.jpg", "is not a fastcoop run directory"),
    ("report {w}/nope", "{w}/nope does not exist"),
    ("report {w}/flat", "{w}/flat is neither a fastcoop run nor a sweep (no config.json or sweep.json)"),
    ("report {w}/notes.txt", "{w}/notes.txt is a file, not a run directory"),
    ("cache {w}/eurosat --out {w}/g.h5 --splits train,vall", "--splits takes train, val and test (comma-separated), "
                                                              "not vall"),
    ("cache {w}/eurosat --out {w}/notes.txt", "{w}/notes.txt exists and is not a fastcoop feature cache"),
    ("cache {w} --dataset stanford_cars --out {w}/g.h5", "{w} has no stanford_cars/ folder, where CoOp's "
                                                          "DATASETS.md puts stanford_cars"),
    ("cache {w} --dataset dtd --out {w}/g.h5", "no split_zhou_DescribableTextures.json, which holds dtd's splits "
                                               "(CoOp's DATASETS.md says where to get it); CoOp's code would split "
                                               "each class's images 50/20/30 % itself, at random"),
    ("cache {images} --out {w}/g.h5 --model " + TINY_VIT + " --pretrained {w}/bad.json",
     "could not read checkpoint {w}/bad.json for tiny-vit: not a file of weights torch loads safely ("),
    ("interpret {w}/nope", "is not a fastcoop run directory"),
    ("interpret {w}/run --class zebra", "no class 'zebra'"),
    ("demo --dir {w}/notes.txt/demo --model " + TINY_VIT, "{w}/notes.txt is a file"),
    ("demo --dir {w}/demo --model ViT-X-99", "unknown model 'ViT-X-99'"),
    ("train {w}/f.h5 --out {w}/r --shots 2 --lr -1", "Invalid value for '--lr'"),
    ("train {w}/f.h5 --out {w}/r --shots 2 --init", "requires an argument"),
    # outputs that are something else already: never written into, never replaced
    ("train {w}/f.h5 --out {w}/notes.txt --shots 2", "cannot write run directory {w}/notes.txt: it is a file"),
    ("train {w}/f.h5 --out {w}/f.h5 --shots 2", "cannot write run directory {w}/f.h5: it is a file"),
    ("train {w}/f.h5 --out {w}/sweep --shots 2", "{w}/sweep holds a sweep, not a run"),
    ("sweep {w}/f.h5 --out {w}/run --shots 2 --seeds 1", "{w}/run holds a run, not a sweep"),
    ("sweep {w}/f.h5 --out {w}/notes.txt --shots 2 --seeds 1", "cannot write sweep folder {w}/notes.txt: it is a file"),
    ("cache {images} --out {w}/flat", "cannot write feature cache {w}/flat: it is a folder"),
    ("cache {images} --out {w}/notes.txt --overwrite --model " + TINY_VIT + " --pretrained none --shots 2 --seeds 1",
     "{w}/notes.txt exists and is not a fastcoop feature cache; it is never replaced"),
    ("demo --dir {w}/notes.txt --model " + TINY_VIT, "cannot write demo folder {w}/notes.txt: it is a file"),
]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command, message", CASES, ids=[c[0].split()[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(capsys, written, example_images, command, message):
    if not (written / "run").exists():
        _run(written, example_images)
        capsys.readouterr()
    before = _tree(written)
    code, out, err = run_cli(capsys, *command.format(w=written, images=example_images).split())
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.format(w=written) in lines[0] and "Traceback" not in err and "weights_only" not in err
    assert not out  # nothing said before the error (e.g. a dataset's summary, or weights taken as unavailable)
    assert _tree(written) == before


def test_a_wrong_path_or_subset_is_answered_before_torch_is_imported(written, tmp_path):
    """The commonest mistakes cost a fraction of a second: the answer comes before torch or open_clip load (and
    `report`, which reads JSON alone, never loads them)."""
    import subprocess
    import sys

    code = ("import sys\nfrom fastcoop.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    assert exc.code == 2, exc.code\nprint(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    missing, out = str(tmp_path / "missing.h5"), str(tmp_path / "out")
    for args, said in ((["train", missing, "--out", out], "does not exist"),
                       (["train", str(written / "f.h5"), "--out", out, "--shots", "3"], "has no 3-shot subset"),
                       (["eval", out, missing], "does not exist"), (["zeroshot", missing], "does not exist"),
                       (["linear-probe", str(written / "f.h5"), "--shots", "3"], "has no 3-shot subset"),
                       (["sweep", missing, "--out", out], "does not exist"),
                       (["cache", str(tmp_path / "no-images"), "--out", missing], "does not exist"),
                       (["eval", out, str(written / "f.h5")], "not a fastcoop run directory"),
                       (["predict", out, "x.jpg"], "not a fastcoop run directory"),
                       (["interpret", out], "not a fastcoop run directory"),
                       (["report", out], "does not exist")):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert done.stdout.strip() == "[]" and said in done.stderr, (args, done.stdout, done.stderr)


@pytest.mark.parametrize("command", ["train", "cache", "sweep", "demo"])
def test_an_output_another_command_is_writing_is_refused(tmp_path, capsys, written, example_images, command):
    """Two commands never write one output: the second is refused at once, naming the first's process, and
    writes nothing (the first holds an OS lock beside the output until it ends, however it ends)."""
    import subprocess
    import sys

    out = tmp_path / ("c.h5" if command == "cache" else "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fastcoop.outputs import held\n"
                               f"with held({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = {"train": ["train", written / "f.h5", "--out", out, "--shots", "2", "--device", "cpu"],
                "cache": ["cache", example_images, "--out", out, "--model", TINY_VIT, "--pretrained", "none"],
                "sweep": ["sweep", written / "f.h5", "--out", out, "--shots", "2", "--seeds", "1", "--device", "cpu"],
                "demo": ["demo", "--dir", out, "--model", TINY_VIT, "--device", "cpu"]}
        code, _, err = run_cli(capsys, *args[command])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and err.strip() == (f"error: {out} is being written by another fastcoop command (process "
                                         f"{holder.pid}); wait for it to end, or choose another "
                                         f"{'--dir' if command == 'demo' else '--out'}")
    assert not out.exists()


@pytest.mark.parametrize("preset, load, expected", [(None, 0, "ACTIVE"), (None, 2, "PASSIVE"),
                                                   ("ACTIVE", 2, "ACTIVE"), ("PASSIVE", 0, "PASSIVE")])
def test_cpu_threads_spin_only_on_an_idle_machine_unless_asked(tmp_path, capsys, monkeypatch, preset, load,
                                                               expected):
    """On a shared machine a CPU run must get its share: before torch loads (the policy is read then), the CLI
    makes OpenMP's waiting threads sleep when the machine is busy (spinning, they wait on each other while
    descheduled) and spin when it is idle; the user's own OMP_WAIT_POLICY stands."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if preset:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr("fastcoop.machine.others_running", lambda: load)
    assert run_cli(capsys, "datasets", tmp_path)[0] == 0
    assert os.environ["OMP_WAIT_POLICY"] == expected


def test_busy_processes_are_seen_as_load():
    import subprocess
    import sys
    import time

    from fastcoop.machine import others_running

    busy = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert others_running() >= 1
    finally:
        for process in busy:
            process.kill()
            process.wait()


def test_cpu_threads_take_the_cores_left_by_other_work(monkeypatch, tmp_path):
    """A thread per usable core on an idle machine, one fewer per other busy thread, never none; the cores are the
    affinity's, capped by a container's CPU quota."""
    from fastcoop import machine

    assert [machine.cpu_threads(others, 2) for others in (0, 0.4, 1, 3)] == [2, 2, 1, 1]
    assert [machine.cpu_threads(others, 16) for others in (0, 2, 15, 40)] == [16, 14, 1, 1]
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    real_path = machine.Path
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(machine, "Path", lambda p: quota if p == "/sys/fs/cgroup/cpu.max" else real_path(p))
    quota.write_text("150000 100000\n")
    assert machine.usable_cores() == 2
    quota.write_text("max 100000\n")
    assert machine.usable_cores() == 4



@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sweep", "cache"])
def test_two_real_commands_on_one_output_one_finishes_the_other_is_refused(tmp_path, written, example_images,
                                                                           command):
    """Two real `fastcoop` processes given one output: the second exits 2 at once (before it loads torch) naming
    the first's process; the first finishes, and its output equals the same command's run alone."""
    import subprocess
    import sys
    import time

    import h5py
    import numpy as np
    from safetensors.torch import load_file

    from fastcoop.outputs import holder

    args = {"train": ["train", written / "f.h5", "--shots", "2", "--n-ctx", "2", "--epochs", "50"],
            "sweep": ["sweep", written / "f.h5", "--shots", "2", "--seeds", "1", "--n-ctx", "2", "--epochs", "50",
                      "--baselines", "none"],
            "cache": ["cache", example_images, "--model", TINY_VIT, "--pretrained", "none", "--shots", "2",
                      "--seeds", "1", "--views", "40", "--workers", "0"]}[command]
    command_line = [sys.executable, "-m", "fastcoop", *map(str, args), "--device", "cpu", "--out"]
    out, alone = (tmp_path / "c.h5", tmp_path / "alone.h5") if command == "cache" else (tmp_path / "out",
                                                                                          tmp_path / "alone")
    first = subprocess.Popen(command_line + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while holder(out) is None:  # the first holds its output once its checks are done
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    started = time.monotonic()
    second = subprocess.run(command_line + [str(out)], capture_output=True, text=True)
    assert time.monotonic() - started < 2.0  # refused before torch loads
    assert first.poll() is None, "the first ended before the second was refused: give it more work"
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: {out} is being written by another fastcoop command (process {first.pid}); wait for it to end, or "
        "choose another --out"]
    assert first.wait(timeout=300) == 0, first.stderr.read()
    subprocess.run(command_line + [str(alone)], check=True, capture_output=True)
    if command == "cache":
        with h5py.File(out) as ours, h5py.File(alone) as theirs:
            assert np.array_equal(ours["train/features"][()], theirs["train/features"][()])
    else:
        prompt = "prompt.safetensors" if command == "train" else "coop-M2-unified-end/2shot-seed1/prompt.safetensors"
        assert all(load_file(out / prompt)[name].equal(tensor) for name, tensor in load_file(alone / prompt).items())


def test_fp16_on_a_cpu_is_said_to_be_slow():
    """fp16 has no fast CPU kernels (about 14× slower than fp32 there): asked for, it runs, with a warning; auto and
    the fast choices say nothing."""
    import warnings

    from fastcoop.config import resolve_precision

    with pytest.warns(UserWarning, match="fp16 on a CPU has no fast kernels"):
        assert resolve_precision("fp16", "cpu", "fp16") == "fp16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [resolve_precision(p, d, "fp16") for p, d in (("auto", "cpu"), ("bf16", "cpu"), ("fp16", "cuda"))] \
            == ["fp32", "bf16", "fp16"]
