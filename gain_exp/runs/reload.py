"""A finished run's experiment again, with its weights: for scoring, figures and CAM export after training."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gain_exp.config.errors import explain
from gain_exp.config.paths import CONF_DIR
from gain_exp.config.plan import make_plan
from gain_exp.runs.rundir import (
    checkpoint_file,
    config_dir,
    diverged,
    local,
    replayed,
    saved_job,
    tested_checkpoint,
)
from gain_exp.runs.trust import check_run_dir
from gain_exp.train.checkpoints import read_checkpoint
from gain_exp.train.experiment import Experiment, build_experiment
from gain_exp.train.runtime import Runtime

CHECKPOINT_INSTEAD = "use best, last or another .ckpt file the run wrote"  # a --checkpoint that cannot be read


def run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = (), trust: bool = False) -> DictConfig:
    """The config a run directory was trained with (its saved overrides and config dirs), then ``overrides``.
    Unless ``trust``, the saved job is checked first (runs.trust: a ``_target_`` the project does not use, a
    hydra callback, ... is refused with one sentence before anything is composed); ``overrides`` are the caller's
    own and are not checked."""
    if not trust:
        check_run_dir(run_dir)
    job = saved_job(run_dir)
    cwd = local(job.cwd) if job.cwd else None
    searchpath = [f"file://{config_dir(d)}" for d in job.config_dirs]
    extra = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name=job.config_name,
            overrides=[*replayed(job.overrides, cwd), *extra, *overrides],
        )


def load_experiment(
    run_dir: str | os.PathLike,
    checkpoint: str | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    trust: bool = False,
) -> Experiment:
    """A run's experiment with the weights of ``checkpoint``: ``best`` (``last`` when the run kept no best),
    ``last``, or a checkpoint file; by default the one the run's own test splits were scored with. ``device``
    defaults to the run's ``trainer.device``; ``overrides`` apply on top of the run's own (e.g.
    ``dataset.root=<another folder>``); ``trust``: skip the check of the saved job (``run_config``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a directory; give a run directory written by "
            f"python -m gain_exp.run (it holds summary.json and checkpoints/)."
        )
    refuse_diverged(run_dir, checkpoint)
    cfg = run_config(run_dir, [*overrides, *([f"trainer.device={device}"] if device else [])], trust=trust)
    plan = make_plan(cfg)
    path = checkpoint_file(run_dir, checkpoint) if checkpoint else tested_checkpoint(run_dir)
    experiment = build_experiment(plan, Runtime(plan.device), training=False)
    state = read_checkpoint(
        path,
        experiment.runtime.device,
        option="--checkpoint" if checkpoint else "the run's tested checkpoint",
        needs=("model",),
        instead=CHECKPOINT_INSTEAD,
    )
    experiment.model.load_state_dict(state["model"])
    experiment.gain.eval()
    experiment.checkpoint = path
    return experiment


def refuse_diverged(run_dir: Path, checkpoint: str | None) -> None:
    """One sentence when the run diverged (summary.json status ``diverged``) and ``checkpoint`` names no file: its
    best or last weights would be scored as if the run had finished."""
    reason = diverged(Path(run_dir)) if checkpoint in (None, "best", "last") else None
    if reason is not None:
        raise ValueError(
            f"{run_dir} diverged in training ({reason.split(';')[0]}), so its numbers would describe broken "
            f"weights; re-run it (e.g. with a lower trainer.optimizer.lr), or pass --checkpoint with one of its "
            f"checkpoint files to use those weights anyway."
        )


def load_checked(
    run_dir: Path, checkpoint: str | None, overrides: Sequence[str], device: str | None, trust: bool = False
) -> Experiment:
    """load_experiment, with Hydra's composition errors and a checkpoint that does not fit the model as one sentence."""

    try:
        return load_experiment(run_dir, checkpoint, overrides, device, trust)
    except (FileNotFoundError, ValueError):  # already one sentence
        raise
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = next(
            (line for line in lines[1:] if line.startswith(("size mismatch", "Missing", "Unexpected"))), lines[0]
        ).rstrip(":. ")
        raise ValueError(
            f"the checkpoint does not fit the model this config builds ({first[:160]}); overrides may "
            f"point at other data with the same classes, not change the backbone or classes."
        ) from None
    except Exception as err:
        sentence = explain(err)
        if sentence is None:
            raise
        raise ValueError(sentence) from None


def choose_splits(experiment: Experiment, wanted: Sequence[str] | None) -> dict[str, Any]:
    """{name: dataset} of the wanted splits (default: the test splits), or one sentence naming the available ones."""
    data = experiment.data
    available = {**data.tests, "val": data.val, "train": data.train}
    if not wanted:
        if not data.tests:
            raise ValueError("this run's dataset has no test split; name one with --split (val or train).")
        return dict(data.tests)
    chosen = {}
    for name in wanted:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(
                f"--split {name}: this run's dataset has no split '{name}'{hint}; choose from {', '.join(available)}."
            )
        chosen[name] = available[name]
    return chosen


def checkpoint_record(path: Path) -> dict[str, Any]:
    """Which weights: the file, its name, the last finished epoch (0-based, as summary.json's ``tested_on``) and the
    optimisation step; ``batch_in_epoch`` > 0 marks weights saved mid-epoch (then ``epoch`` is the unfinished one)."""

    state = read_checkpoint(path, "cpu", mmap=True, option="--checkpoint", needs=("model",), instead=CHECKPOINT_INSTEAD)
    mid = int(state.get("batch_in_epoch") or 0)
    epoch, step = state.get("epoch"), state.get("step")  # a weights-only file (e.g. exported) has neither
    record = {
        "path": str(path.resolve()),
        "name": path.stem,
        "epoch": None if epoch is None else int(epoch) - (0 if mid else 1),
        "step": None if step is None else int(step),
    }
    if mid:
        record["batch_in_epoch"] = mid
    return record
