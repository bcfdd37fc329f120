"""Composition errors as one sentence (gain_exp/config/errors.py) and the app's exit status 2 for them (run.main)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose

from gain_exp import run as app
from gain_exp.config.errors import explain


def _sentence(overrides: list[str]) -> str:
    """The explanation of the error composing these overrides raises (the test fails if none is raised)."""
    with pytest.raises(Exception) as caught:
        compose(overrides)
    sentence = explain(caught.value)
    assert sentence is not None, f"not explained: {caught.value!r}"
    assert "\n" not in sentence and sentence.endswith("."), sentence
    return sentence


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "trainer.epochs=two",
            "trainer.epochs=two: 'two' is not an integer (trainer.epochs is int); e.g. trainer.epochs=24.",
        ),
        (
            "trainer.epochs=1.5",
            "trainer.epochs=1.5: 1.5 is not an integer (trainer.epochs is int); e.g. trainer.epochs=24.",
        ),
        ("gain.sigma=abc", "gain.sigma=abc: 'abc' is not a number (gain.sigma is float); e.g. gain.sigma=0.5."),
        (
            "trainer.optimizer.lr=fast",
            "trainer.optimizer.lr=fast: 'fast' is not a number (trainer.optimizer.lr is float); e.g. trainer.optimizer.lr=0.001.",
        ),
        (
            "loss.am_weight=[1,2]",
            "loss.am_weight=[1,2]: [1,2] is not a number (loss.am_weight is float); e.g. loss.am_weight=0.3.",
        ),
        (
            "trainer.batch_size=true",
            "trainer.batch_size=true: true is not an integer (trainer.batch_size is int); e.g. trainer.batch_size=32.",
        ),
        (
            "dataset.n_train=many",
            "dataset.n_train=many: 'many' is not an integer (dataset.n_train is int); e.g. dataset.n_train=2000.",
        ),
        (
            "backbone.pretrained=maybe",
            "backbone.pretrained=maybe: 'maybe' is not true or false (backbone.pretrained is bool); e.g. backbone.pretrained=false.",
        ),
        ("seed=abc", "seed=abc: 'abc' is not an integer (seed is int); e.g. seed=0."),
        (
            "dataset.masks_to_use=true",
            "dataset.masks_to_use=true: true is not an int or a float (dataset.masks_to_use is int | float); "
            "e.g. dataset.masks_to_use=0.1.",
        ),
        (
            "trainer.grad_clip=off",
            "trainer.grad_clip=off: 'off' is not a number or null (trainer.grad_clip is float | null).",
        ),
        (
            "logger.wandb.panel_every=often",
            "logger.wandb.panel_every=often: 'often' is not an integer "
            "(logger.wandb.panel_every is int); e.g. logger.wandb.panel_every=1.",
        ),
    ],
)
def test_wrong_type_is_one_sentence_with_the_type_and_an_example(override, expected):
    assert _sentence([override]) == expected


def test_unknown_group_option_lists_the_options_and_the_closest():
    assert _sentence(["loss=gian"]) == (
        "loss=gian: group loss has no option 'gian' (did you mean gain or gradia or "
        "gain_ext?); choose one of baseline, energy, gain, gain_ext, gradia, haics, "
        "rrr."
    )
    assert "choose one of decoy_rrr_ross, endoscopy_seed, grads_off" in _sentence(["experiment=voc_papr"])


def test_unknown_key_suggests_close_keys_and_plus_for_new_ones():
    assert _sentence(["trainer.epoch=3"]) == (
        "trainer.epoch=3: trainer has no key 'epoch' (did you mean trainer.epochs?); "
        "fix the name, or write +trainer.epoch=3 to add a new key."
    )
    assert _sentence(["lss=gain"]).startswith("lss=gain: the config has no key 'lss' (did you mean loss?)")


def test_malformed_override_names_it_and_the_grammar():
    sentence = _sentence(["trainer.epochs=[1,"])
    assert sentence.startswith("trainer.epochs=[1,: not a valid override (") and "key=value" in sentence
    assert "missing EQUAL" in _sentence(["trainer.epochs"])


def test_other_composition_errors_become_one_line_and_non_hydra_errors_are_left_alone():
    assert _sentence(["~trainer.nope"]) == "Could not delete from config. 'trainer.nope' does not exist."
    assert explain(ValueError("x")) is None and explain(KeyError("x")) is None


def test_main_exits_2_with_one_line_and_restores_the_environment(monkeypatch, capsys):
    seen = []

    def hydra_main():  # stands in for the @hydra.main app: raises what Hydra raises when HYDRA_FULL_ERROR=1
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))
        compose(["trainer.epochs=two"])

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(app, "_hydra_main", hydra_main)
    with pytest.raises(SystemExit) as stop:
        app.main()
    assert stop.value.code == 2 and seen == ["1"]
    assert capsys.readouterr().err.splitlines() == [
        "error: trainer.epochs=two: 'two' is not an integer (trainer.epochs is int); e.g. trainer.epochs=24."
    ]
    assert "HYDRA_FULL_ERROR" not in os.environ  # a later call must not mistake it for the user's own setting

    monkeypatch.setattr(app, "_hydra_main", lambda: 0.5)
    assert app.main() == 0.5 and "HYDRA_FULL_ERROR" not in os.environ


def _app(args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_app_and_cfg_job_and_multirun_stop_with_one_line_and_exit_2(tmp_path):
    for args in (
        ["--cfg", "job", "trainer.batch_size=true"],
        ["-m", "trainer.epochs=1,two", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
    ):
        proc = _app(args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: trainer."), proc.stderr
    assert not list(tmp_path.rglob("summary.json"))  # the sweep stopped before its first job


@pytest.mark.slow
def test_hydra_full_error_set_by_the_user_gives_the_full_trace(tmp_path):
    proc = _app(["seed=abc"], cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


@pytest.mark.parametrize(
    "recipe, group, option, plugin",
    [
        ("+launcher=joblib", "launcher", "joblib", "hydra-joblib-launcher"),
        ("+launcher=slurm", "launcher", "submitit_slurm", "hydra-submitit-launcher"),
        ("+sweep=optuna", "sweeper", "optuna", "hydra-optuna-sweeper"),
    ],
)
def test_a_recipe_whose_hydra_plugin_is_not_installed_names_the_extra(monkeypatch, recipe, group, option, plugin):
    # a plain `pip install gain-exp` has no sweep plugins: Hydra then only knows the basic launcher / sweeper
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the installed plugins register their configs: take this one away again
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"][group], f"{option}.yaml")
    with pytest.raises(Exception) as caught:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            hydra_compose(
                config_name="config",
                overrides=[f"hydra.searchpath=[file://{ROOT / 'sweeps'}]", recipe],
                return_hydra_config=True,
            )
    assert explain(caught.value) == (
        f"hydra/{group}={option} needs the Hydra plugin {plugin}, which is not installed; install the sweep extras "
        f"with pip install 'gain-exp[sweeps]' (or pip install {plugin})."
    )


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["dataset=mask_folder"], "dataset.root has"),
        (["dataset=waterbirds"], "dataset.root, dataset.segmentations have"),
    ],
)
def test_a_value_only_the_user_knows_left_at_question_marks_is_one_sentence(overrides, keys):
    """A dataset folder left at ??? (conf/dataset/mask_folder.yaml) was OmegaConf's MissingMandatoryValue traceback."""
    from gain_exp.config.checks import check_config

    with pytest.raises(ValueError) as caught:
        check_config(compose(overrides))
    assert str(caught.value).startswith(
        f"{keys} no value (??? in the config: a value only you know); add dataset.root="
    )
    assert "\n" not in str(caught.value)
