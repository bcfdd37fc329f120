"""load_experiment: a finished run's config and weights back from its directory, with new overrides on top."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides

from gain_exp.runs.reload import load_experiment, run_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 1-epoch tiny run made by the app with a relative dataset root, from a directory outside the repo."""
    root = tmp_path_factory.mktemp("runs")
    args = [o for o in tiny_overrides(Path("unused")) if not o.startswith("dataset.root=")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gain_exp.run",
            *args,
            "dataset.root=shapes",
            "trainer.epochs=1",
            "gain.sigma=0.4",
            "hydra.run.dir=run",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_the_saved_config_comes_back_with_new_overrides_on_top(finished):
    cfg = run_config(finished)
    assert (cfg.backbone.name, cfg.gain.sigma, cfg.trainer.epochs) == ("test_resnet", 0.4, 1)
    assert Path(cfg.dataset.root) == finished.parent / "shapes"  # relative to where the run was launched
    assert run_config(finished, ["gain.sigma=0.6"]).gain.sigma == 0.6


@pytest.mark.slow
def test_the_weights_are_the_checkpoint_the_run_tested_with(finished):
    experiment = load_experiment(finished)
    assert experiment.checkpoint == finished / "checkpoints" / "best.ckpt"
    saved = torch.load(experiment.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in experiment.model.state_dict().items())
    assert not experiment.gain.training
    assert load_experiment(finished, "last").checkpoint == finished / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "where,checkpoint,phrase",
    [
        ("nowhere", None, "is not a directory; give a run directory"),
        (".", "nope.ckpt", "--checkpoint nope.ckpt: no checkpoint there"),
    ],
)
@pytest.mark.slow
def test_bad_run_dir_or_checkpoint_is_one_sentence(finished, where, checkpoint, phrase):
    with pytest.raises(FileNotFoundError, match=phrase):
        load_experiment(finished / where if where != "." else finished, checkpoint)
