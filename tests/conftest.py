import os

import torch

if not torch.cuda.is_available():  # without a GPU the Triton kernels run interpreted on CPU tensors; on a GPU the
    os.environ.setdefault("TRITON_INTERPRET", "1")  # suite runs them compiled (read when Triton is imported)

import logging
from pathlib import Path

import pytest
import threadpoolctl

from fastcoop import kernels
from fastcoop import machine
from fastcoop.cli import main
from fastcoop.example import make_example_images
from fastcoop.models import load_model

CONFIGS = Path(__file__).parent / "configs"
TINY_VIT = str(CONFIGS / "tiny-vit.json")
TINY_RN = str(CONFIGS / "tiny-rn.json")

# the Triton kernels' tests run on a GPU, or on CPU tensors under the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not kernels.INTERPRET,
                                  reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning for every random-init model


@pytest.fixture(autouse=True)
def threads_restored():
    """What a command run in this process sets for its CPU threads (torch's, BLAS's, the variables libraries
    read when they load) is undone after each test, so that no test runs with another's threads."""
    variables = {name: os.environ.get(name) for name in machine.THREAD_VARIABLES}
    torch_threads, libraries = torch.get_num_threads(), threadpoolctl.threadpool_info()
    yield
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    torch.set_num_threads(torch_threads)
    threadpoolctl.threadpool_limits(libraries)


@pytest.fixture(scope="session")
def tiny_vit():
    return load_model(TINY_VIT, "none")


@pytest.fixture(scope="session")
def tiny_rn():
    return load_model(TINY_RN, "none")


@pytest.fixture(scope="session")
def example_images(tmp_path_factory):
    """12 classes, 6 train and 3 test JPEGs each."""
    return make_example_images(tmp_path_factory.mktemp("example"), train_per_class=6, test_per_class=3, size=48)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process like the console script; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ctrl_c_after_epoch(monkeypatch, epochs: int) -> None:
    """Make training press Ctrl-C at the end of its `epochs`-th epoch (as a user would), until monkeypatch undoes
    it."""
    import signal

    from fastcoop.step import TrainStep

    end_epoch = TrainStep.end_epoch

    def end_epoch_then_ctrl_c(self, run, epoch):
        end_epoch(self, run, epoch)
        if epoch + 1 == epochs:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainStep, "end_epoch", end_epoch_then_ctrl_c)


def trained_whole_and_resumed(capsys, monkeypatch, folder: Path, args: list, tensor: str):
    """`fastcoop ARGS --out folder/whole`, and the same interrupted after its 2nd epoch and run again into
    folder/resumed; the learned `tensor` of each (the resumed run recorded as resumed at epoch 2)."""
    import json

    from safetensors.torch import load_file

    code, _, err = run_cli(capsys, *args, "--out", folder / "whole")
    assert code == 0, err
    with monkeypatch.context() as patched:
        ctrl_c_after_epoch(patched, 2)
        code, _, err = run_cli(capsys, *args, "--out", folder / "resumed")
    assert code == 130, err
    code, _, err = run_cli(capsys, *args, "--out", folder / "resumed")
    assert code == 0, err
    assert json.loads((folder / "resumed" / "results.json").read_text())["resumed_at_epoch"] == 2
    return [load_file(folder / run / "prompt.safetensors")[tensor] for run in ("whole", "resumed")]


def pytest_collection_modifyitems(config, items):
    """A parametrized test's first case is quick; its other cases (more shapes, dtypes, layouts of what the first
    already runs) are `slow`, so that `-m "not slow"` still runs every test function once."""
    seen = set()
    for item in items:
        if getattr(item, "callspec", None) is None:
            continue
        function = (item.path, item.originalname)
        if function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)
