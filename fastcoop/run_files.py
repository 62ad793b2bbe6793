"""What run and sweep directories hold, read without torch: their files' names, a run's config and state, its
recorded evaluations. Reports and the checks that come before a command's work need no more (run.py writes and
loads the tensors)."""

import json
from pathlib import Path

from fastcoop.errors import FastCoopError
from fastcoop.outputs import holder

PROMPT_FILE, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CURVE_FILE, EVALUATIONS_FILE = (
    "prompt.safetensors", "checkpoint.safetensors", "config.json", "metrics.jsonl", "results.json", "curve.png",
    "evaluations.json")
RUN_FILES = (PROMPT_FILE, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CURVE_FILE, EVALUATIONS_FILE)
RESUMABLE = ("running", "interrupted")
SWEEP_FILE, SUMMARY_FILE, TABLE_FILE, FIGURE_FILE = "sweep.json", "summary.json", "summary.md", "accuracy.png"


def read_config(run_dir: Path) -> dict | None:
    """The run's config.json, or None where there is no run; an older run without a state is complete."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FastCoopError(f"{path} is not readable ({exc}); choose another --out or pass --overwrite") from None
    config.setdefault("state", "complete")
    return config


def recorded_threads(run_dirs) -> int | None:
    """The CPU threads the first unfinished run among `run_dirs` trained with: its resume goes on with them, as a
    CPU run's last bits follow the thread count."""
    for run_dir in run_dirs:
        config = read_config(run_dir)
        if config is not None and config["state"] in RESUMABLE:
            return config.get("runtime", {}).get("threads")
    return None


def check_complete(run_dir: Path, config: dict) -> None:
    """Refuse an unfinished run, saying what became of it: a run still 'running' is being trained now if a command
    holds its directory, else it was killed."""
    if config["state"] != "complete":
        epochs, done = config.get("train", {}).get("epochs"), config.get("epochs_done", 0)
        process = holder(run_dir) if config["state"] == "running" else None
        if process:
            raise FastCoopError(f"{run_dir} is being trained now (process {process}; epoch {done} of {epochs} "
                                "saved); wait for it to finish")
        state = "killed" if config["state"] == "running" else config["state"]
        raise FastCoopError(f"{run_dir} holds an unfinished run ({state} after epoch {done} of {epochs}); run its "
                            "`fastcoop train` command again to finish it")


def complete_config(run_dir: Path) -> dict:
    """The config of the complete run in `run_dir`; anything else (no run, a file, an unfinished run) is refused
    with what to do."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config is None or not (run_dir / PROMPT_FILE).is_file():
        what = "a file, not a run directory" if run_dir.is_file() else "not a fastcoop run directory"
        raise FastCoopError(f"{run_dir} is {what} (no {CONFIG_FILE} / {PROMPT_FILE})")
    check_complete(run_dir, config)
    return config


def read_evaluations(run_dir: Path) -> dict:
    """What `fastcoop eval` measured of a finished run, by cache, split and classes."""
    path = Path(run_dir) / EVALUATIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
