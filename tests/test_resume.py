"""Run directories survive kills and mistakes: resume equals uninterrupted, finished runs are never overwritten
silently, unfinished ones are never read as results; and the loop itself equals a plain per-epoch host loop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ctrl_c_after_epoch, run_cli
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.datasets import read_dataset
from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference
from fastcoop.prompts import PromptLearner
from fastcoop.schedule import lr_at
from fastcoop.text_encoder import encode_prompts
from fastcoop.config import Recipe, Runtime
from fastcoop.training import TrainStep, batches_per_epoch, train


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("cache") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=4, seeds=[1], views=8, batch_size=64,
                            workers=0, progress=False)


def _ctx(run_dir):
    return load_file(run_dir / "prompt.safetensors")["ctx"]


def _state(run_dir):
    return json.loads((run_dir / "config.json").read_text())["state"]


TRAIN = ["--shots", "4", "--seed", "1", "--n-ctx", "2", "--batch-size", "16", "--epochs", "8", "--device", "cpu"]


def test_the_loop_equals_a_plain_per_epoch_host_loop(cache_path, tiny_vit, monkeypatch):
    """The reference: per epoch a permutation from one seeded generator, the epoch's view, torch.optim.SGD with
    the published schedule, the published text computation and cross-entropy, step by step on the host."""
    import fastcoop.training

    config = dict(shots=4, seed=1, n_ctx=2, epochs=6, batch_size=16, lr=0.02)
    contexts = []
    for report_seconds in (0.0, 1e9):  # read back after every epoch, or only after the first and the last
        monkeypatch.setattr(fastcoop.training, "REPORT_SECONDS", report_seconds)
        with FeatureCache(cache_path) as cache:
            contexts.append(train(cache, tiny_vit, Recipe(**config), progress=False).learner.ctx.detach())
    assert torch.equal(contexts[0], contexts[1])
    with FeatureCache(cache_path) as cache:  # the loop with the published text computation, against the plain one
        ours = train(cache, tiny_vit, Recipe(**config), Runtime(impl="reference"), progress=False).learner.ctx

    with FeatureCache(cache_path) as cache:
        rows = cache.rows("train", 4, 1)
        views, labels = cache.features("train", rows).float(), cache.labels("train", rows)
        torch.manual_seed(1)
        learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, cache.classnames, n_ctx=2)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.02, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    scale = tiny_vit.model.logit_scale.exp().detach()
    for epoch in range(6):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, 6, 0.02)
        order = torch.randperm(len(labels), generator=generator)
        for step in range(batches_per_epoch(len(labels), 16)):
            batch = order[step * 16:(step + 1) * 16]
            loss = cosine_ce_reference(views[1 + epoch][batch], encode_prompts(tiny_vit.model, learner, "reference"),
                                       scale, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    theirs = learner.ctx.detach()
    assert (ours.detach() - theirs).norm() <= 1e-5 * theirs.norm()


@pytest.mark.parametrize("method", ["cocoop", "coop"])
def test_ctrl_c_inside_an_epoch_saves_there_and_resumes_bit_for_bit(tmp_path, capsys, cache_path, monkeypatch,
                                                                    method):
    """A look, and so a checkpoint, is due every REPORT_SECONDS even inside an epoch (CoCoOp's batch-1 epochs are
    thousands of steps, minutes under load): Ctrl-C is answered at the next look, inside the epoch, and the same
    command resumes from that step and ends bit for bit where the uninterrupted run ends."""
    import fastcoop.training as train_module

    args = ["--method", method, "--shots", "4", "--seed", "1", "--batch-size", "4", "--epochs", "2", "--lr", "0.05",
            "--device", "cpu"] + (["--n-ctx", "2"] if method == "coop" else [])
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(capsys, "train", cache_path, "--out", whole, *args)[0] == 0
    calls, real_call = [0], TrainStep.__call__

    def ctrl_c_at_step_17(self):  # 48 images, batches of 4: step 5 of the second epoch
        real_call(self)
        calls[0] += 1
        if calls[0] == 17:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "REPORT_SECONDS", 0.0)  # a look after every step
        patch.setattr(TrainStep, "__call__", ctrl_c_at_step_17)
        code, _, err = run_cli(capsys, "train", cache_path, "--out", resumed, *args, "--save-every", "1000")
    assert code == 130 and "saved at step 5 of epoch 2 of 2 in " in err
    checkpoint = load_file(resumed / "checkpoint.safetensors")
    assert (int(checkpoint["epochs_done"]), int(checkpoint["steps_into_epoch"])) == (1, 5)
    code, out, err = run_cli(capsys, "train", cache_path, "--out", resumed, *args)
    assert code == 0 and "resuming" in out and "trained 7 steps" in out, err
    for name, theirs in load_file(whole / "prompt.safetensors").items():
        assert torch.equal(load_file(resumed / "prompt.safetensors")[name], theirs), name
    metrics = [[json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (whole, resumed) for key in ("loss", "train_acc")]
    assert metrics[0] == metrics[2] and metrics[1] == metrics[3]  # the split epoch's loss and accuracy too


def test_ctrl_c_saves_and_the_same_command_resumes_to_the_uninterrupted_context(tmp_path, capsys, cache_path,
                                                                               monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(capsys, "train", cache_path, "--out", whole, *TRAIN)[0] == 0
    with monkeypatch.context() as patch:
        ctrl_c_after_epoch(patch, 6)
        code, _, err = run_cli(capsys, "train", cache_path, "--out", resumed, *TRAIN, "--save-every", "1000")
    config = json.loads((resumed / "config.json").read_text())
    assert code == 130 and config["state"] == "interrupted" and config["epochs_done"] == 6  # saved on the way out
    assert "saved after epoch 6 of 8 in " in err and "; run the same command again to resume" in err
    assert not (resumed / "results.json").exists() and (resumed / "checkpoint.safetensors").exists()
    for command in (["eval", resumed, cache_path], ["interpret", resumed], ["report", resumed]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "unfinished run (interrupted after epoch" in err and "again to finish it" in err
    code, out, _ = run_cli(capsys, "train", cache_path, "--out", resumed, *TRAIN)
    assert code == 0 and "resuming" in out and _state(resumed) == "complete"
    assert "(epochs 7–8)" in out  # what this command trained, not the whole run
    assert torch.equal(_ctx(resumed), _ctx(whole))
    assert not (resumed / "checkpoint.safetensors").exists()
    results = json.loads((resumed / "results.json").read_text())
    assert results["resumed_at_epoch"] == config["epochs_done"]
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--impl-detail", "step=eager"], ["--impl", "reference"]])
def test_an_interrupted_run_resumes_with_another_implementation(tmp_path, capsys, cache_path, monkeypatch, how):
    """What a run computes (its recipe) is its identity; how (graph, kernels, text path: its runtime) is not: an
    interrupted run goes on under another implementation and ends where the uninterrupted one does."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(capsys, "train", cache_path, "--out", whole, *TRAIN)[0] == 0
    with monkeypatch.context() as patch:
        ctrl_c_after_epoch(patch, 3)
        assert run_cli(capsys, "train", cache_path, "--out", resumed, *TRAIN)[0] == 130
    code, out, err = run_cli(capsys, "train", cache_path, "--out", resumed, *TRAIN, *how)
    assert code == 0 and "resuming" in out, err
    theirs = _ctx(whole)
    assert (_ctx(resumed) - theirs).norm() <= 1e-5 * theirs.norm()
    runtime = json.loads((resumed / "config.json").read_text())["runtime"]
    assert (runtime["impl"], runtime["impl_detail"]) == (("reference", []) if "reference" in how else
                                                         ("fast", [["step", "eager"]]))


@pytest.mark.slow
def test_a_resumed_run_goes_on_with_the_threads_it_recorded(tmp_path, capsys, cache_path, monkeypatch):
    """A CPU run's last bits follow its thread count, and the default count follows the machine's load: a run
    interrupted beside other work (one thread) and resumed on an idle machine goes on with the one thread it
    recorded, ending where an uninterrupted one-thread run ends; --threads, given, still decides."""
    whole, resumed, asked = tmp_path / "whole", tmp_path / "resumed", tmp_path / "asked"
    monkeypatch.setattr("fastcoop.machine.usable_cores", lambda: 2)
    monkeypatch.setattr("fastcoop.machine.others_running", lambda: 5)  # busy: one thread
    assert run_cli(capsys, "train", cache_path, "--out", whole, *TRAIN)[0] == 0
    for run_dir in (resumed, asked):
        with monkeypatch.context() as patch:
            ctrl_c_after_epoch(patch, 3)
            assert run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)[0] == 130
    monkeypatch.setattr("fastcoop.machine.others_running", lambda: 0)  # idle: two threads for a new run
    code, out, err = run_cli(capsys, "train", cache_path, "--out", resumed, *TRAIN)
    assert code == 0 and "resuming" in out, err
    assert json.loads((resumed / "config.json").read_text())["runtime"]["threads"] == 1
    assert torch.equal(_ctx(resumed), _ctx(whole))
    assert run_cli(capsys, "train", cache_path, "--out", asked, *TRAIN, "--threads", "2")[0] == 0
    assert json.loads((asked / "config.json").read_text())["runtime"]["threads"] == 2


def _train_process(cache_path, run_dir, *extra):
    command = [sys.executable, "-m", "fastcoop", "train", str(cache_path), "--out", str(run_dir), *TRAIN[:-4],
               "--epochs", "60", "--device", "cpu", *extra]
    return command


def _wait_for_checkpoint(process, run_dir, epochs: int):
    checkpoint = run_dir / "checkpoint.safetensors"
    while process.poll() is None:
        time.sleep(0.05)
        try:
            if int(load_file(checkpoint)["epochs_done"]) >= epochs:
                return
        except Exception:  # not written yet
            pass
    raise AssertionError(f"the run ended before a checkpoint: {process.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_train_resumes_to_the_uninterrupted_context(tmp_path, cache_path, how):
    """A real kill -9 (the last checkpoint stays) or SIGTERM (saved before exit), then the same command."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = _train_process(cache_path, killed, "--save-every", "0")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(process, killed, epochs=10)
    process.send_signal(how)
    code = process.wait()
    if how == signal.SIGTERM:
        assert code == 130 and "run the same command again to resume" in process.stderr.read()
        assert _state(killed) == "interrupted"
    else:
        assert code == -signal.SIGKILL and _state(killed) == "running"
    # the checkpoint is the resume's source of truth (a kill can land before config.json catches up with it)
    epochs_done = int(load_file(killed / "checkpoint.safetensors")["epochs_done"])
    assert 10 <= epochs_done < 60 and not (killed / "results.json").exists()
    subprocess.run(command, check=True, capture_output=True)
    subprocess.run(_train_process(cache_path, whole), check=True, capture_output=True)
    assert torch.equal(_ctx(killed), _ctx(whole))
    assert json.loads((killed / "results.json").read_text())["resumed_at_epoch"] >= epochs_done


def test_a_finished_run_is_kept_unless_overwrite_and_then_nothing_old_remains(tmp_path, capsys, cache_path):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, out, _ = run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)  # a rerun, e.g. of a script
    assert code == 0 and f"{run_dir} holds this run, finished: nothing to do" in out
    code, _, err = run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN[:-4], "--epochs", "3")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {run_dir} holds a finished run made with other settings (epochs: 8 → 3); pass --overwrite to "
        "replace it, or choose another --out"]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    code, _, _ = run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN[:-4], "--epochs", "3",
                         "--overwrite")
    assert code == 0 and json.loads((run_dir / "results.json").read_text())["epochs"] == 3
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 3


def test_an_unfinished_run_with_other_settings_is_refused_naming_them(tmp_path, capsys, cache_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(TrainStep, "end_epoch", lambda self, run, epoch: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)[0] == 130
    assert not (run_dir / "config.json").exists()  # interrupted before any epoch was seen: nothing to keep
    monkeypatch.undo()
    monkeypatch.setattr("fastcoop.training.REPORT_SECONDS", 0.0)
    end_epoch = TrainStep.end_epoch
    monkeypatch.setattr(TrainStep, "end_epoch", lambda self, run, epoch: end_epoch(self, run, epoch) if epoch < 3 else
                        (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)[0] == 130
    code, _, err = run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN[:-4], "--epochs", "9", "--lr",
                           "0.01")
    assert code == 2 and "unfinished run made with other settings (epochs: 8 → 9; lr: 0.002 → 0.01)" in err
    assert _state(run_dir) == "interrupted"


def test_output_location_problems_fail_before_any_work(tmp_path, capsys, cache_path, monkeypatch):
    (tmp_path / "file").write_text("")
    code, out, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "file" / "run", *TRAIN)
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot write run directory {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file"]
    assert out == ""  # refused before the model was loaded (it would say which weights)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else
                        real_access(path, mode))
    code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "run", *TRAIN)
    assert code == 2 and f"{tmp_path} is not writable" in err


def test_readers_tell_a_run_in_training_from_a_killed_one(tmp_path, capsys, cache_path, monkeypatch):
    """A run whose config still says 'running' is being trained if a command holds its directory (the readers say
    by which process), and was killed if none does."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        ctrl_c_after_epoch(patch, 2)
        assert run_cli(capsys, "train", cache_path, "--out", run_dir, *TRAIN)[0] == 130
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | {"state": "running"}))  # as kill -9 leaves it
    code, _, err = run_cli(capsys, "eval", run_dir, cache_path)
    assert code == 2 and "holds an unfinished run (killed after epoch 2 of 8)" in err
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom fastcoop.outputs import held\n"
                               f"with held({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "report", run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"is being trained now (process {holder.pid}; epoch 2 of 8 saved)" in err
