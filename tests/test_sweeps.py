"""Sweep recipes in sweeps/: every file composes, and the Optuna, joblib and submitit recipes run at tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, tiny_overrides
from omegaconf import OmegaConf

SWEEPS = ROOT / "sweeps"


def compose_with_sweeps(overrides: list[str], hydra_config: bool = False):
    """The app's config with sweeps/ on the search path, as `--config-dir sweeps` gives it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"hydra.searchpath=[file://{SWEEPS}]", *overrides],
            return_hydra_config=hydra_config,
        )


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (SWEEPS / group).glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", _options("sweep"))
def test_every_sweep_composes_and_each_swept_value_is_a_valid_override(name):
    cfg = compose_with_sweeps([f"+sweep={name}"], hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, f"sweeps/sweep/{name}.yaml sweeps nothing"
    for key, spec in params.items():
        if "interval(" in spec or "choice(" in spec:  # Optuna distributions: the key must exist in the config
            assert OmegaConf.select(cfg, key) is not None, key
            continue
        for value in spec.split(","):
            job = compose_with_sweeps([f"+sweep={name}", f"{key}={value}"])
            assert job.seed is not None


@pytest.mark.parametrize("name", _options("launcher"))
def test_every_launcher_recipe_composes(name):
    cfg = compose_with_sweeps([f"+launcher={name}"], hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and "hydra_plugins" in cfg.hydra.launcher._target_


@pytest.mark.parametrize("selection", _options("selection"))
@pytest.mark.parametrize("data", _options("data"))
def test_every_selection_rule_composes_with_every_study_dataset_and_passes_the_checks(data, selection):
    from gain_exp.config.checks import check_config

    cfg = compose_with_sweeps([f"+data={data}", f"+selection={selection}"])
    settings = check_config(cfg)
    assert settings.monitor == ("auto" if selection == "biased" else "val/worst_group_acc")
    assert cfg.dataset.val_bias == ("balanced" if selection.startswith("balanced") else None)  # None: as bias
    assert cfg.trainer.monitor_tiebreak == ("val/mean_group_acc" if selection == "balanced_tiebreak" else None)


def test_paper_table_settings_differ_only_in_loss_and_mask_budget():
    base = OmegaConf.to_container(compose_with_sweeps([]), resolve=True)
    seen = {}
    for name in _options("setting"):
        cfg = OmegaConf.to_container(compose_with_sweeps([f"+setting={name}"]), resolve=True)
        assert {k for k in cfg if cfg[k] != base[k]} <= {"loss", "dataset"}, name
        seen[name] = (cfg["loss"]["am_weight"], cfg["loss"]["ex_weight"], cfg["dataset"]["masks_to_use"])
    assert seen["baseline"][:2] == (0.0, 0.0) and seen["gain"][:2] == (1.0, 0.0)
    assert [seen[f"gain_ext_{p}pct"][2] for p in (2, 5, 10)] == [0.02, 0.05, 0.1]


@pytest.mark.slow
def test_wandb_sweep_spec_composes_and_sweeps_no_config_section():
    spec = yaml.safe_load((SWEEPS / "wandb_sweep.yaml").read_text())
    command = spec["command"]
    assert command[-1] == "${args_no_hyphens}" and command[command.index("--config-dir") + 1] == "sweeps"
    assert spec["metric"]["goal"] in ("maximize", "minimize") and spec["metric"]["name"].startswith("val/")
    fixed = [arg for arg in command if "=" in arg and not arg.startswith("$")]
    base = compose_with_sweeps(fixed)
    assert "wandb" in base.logger
    for key, param in spec["parameters"].items():
        # The agent also writes each parameter into the W&B config: a section's name would be replaced by a string.
        assert not OmegaConf.is_dict(OmegaConf.select(base, key.lstrip("+"))), f"{key} is a config section"
        for value in param.get("values") or [param.get("value", param.get("min")), param.get("max")]:
            if value is None:
                continue
            cfg = compose_with_sweeps([*fixed, f"{key}={value}"])
            if key.startswith("+"):  # a sweeps/<group> recipe: its file exists and the sections stay whole
                assert (SWEEPS / key[1:] / f"{value}.yaml").is_file() and OmegaConf.is_dict(cfg.loss)
            else:
                assert OmegaConf.select(cfg, key) == pytest.approx(value), key


def _tiny(tmp_path: Path) -> list[str]:
    return tiny_overrides(tmp_path) + ["trainer.epochs=1", "dataset.n_train=16", "logger=json"]


def _sweep(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", "--config-dir", str(SWEEPS), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _jobs(sweep_dir: Path) -> list[tuple[dict, dict]]:
    """(summary, hydra runtime choices) of every job of a sweep."""
    out = []
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        hydra_cfg = yaml.safe_load((summary.parent / ".hydra" / "hydra.yaml").read_text())
        out.append((json.loads(summary.read_text()), hydra_cfg["hydra"]["runtime"]["choices"]))
    return out


@pytest.mark.slow
def test_optuna_recipe_runs_its_trials_in_parallel_with_the_joblib_recipe(tmp_path):
    sweep_dir = tmp_path / "optuna"
    _sweep(
        [
            "+sweep=optuna",
            "+launcher=joblib",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            f"hydra.sweep.dir={sweep_dir}",
            *_tiny(tmp_path),
        ],
        tmp_path,
    )
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2 and all(s["status"] == "completed" for s, _ in jobs)
    assert {c["hydra/sweeper"] for _, c in jobs} == {"optuna"} and {c["hydra/launcher"] for _, c in jobs} == {"joblib"}
    sigmas = [float(o.split("=")[1]) for s, _ in jobs for o in s["overrides"] if o.startswith("gain.sigma=")]
    assert len(set(sigmas)) == 2 and all(0.2 <= x <= 0.8 for x in sigmas)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(s["final"]["val/acc"] for s, _ in jobs)


@pytest.mark.slow
def test_slurm_recipes_local_twin_runs_jobs_through_submitit(tmp_path):
    sweep_dir = tmp_path / "submitit"
    _sweep(["+launcher=submitit_local", "seed=3", f"hydra.sweep.dir={sweep_dir}", *_tiny(tmp_path)], tmp_path)
    [(summary, choices)] = _jobs(sweep_dir)
    assert summary["status"] == "completed" and summary["seed"] == 3
    assert choices["hydra/launcher"] == "submitit_local"
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))
