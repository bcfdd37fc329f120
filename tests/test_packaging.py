"""Install anywhere: the wheel carries conf/ and sweeps/, the console script dispatches, Hydra completion works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_pyproject_ships_every_subpackage_and_the_config_trees():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gain_exp").rglob("__init__.py")}
    assert found <= set(setup["packages"]), f"add {found - set(setup['packages'])} to pyproject.toml"
    assert setup["package-dir"] == {"gain_exp.conf": "conf", "gain_exp.sweeps": "sweeps"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A non-editable install of this tree (pip install . into a fresh target, dependencies from the venv)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = tmp.glob("gain_exp-*.whl")
    target = tmp / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def _gain_exp(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    return subprocess.run(
        [sys.executable, str(target / "bin" / "gain-exp"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_non_editable_install_runs_one_epoch_from_another_directory(installed, tmp_path):
    where = _gain_exp(installed, ["run", "--cfg", "job", "+setting=gain"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    assert "am_weight: 1.0" in where.stdout  # a sweep recipe (sweeps/setting) found with no --config-dir
    args = ["run", *tiny_overrides(Path("data")), "trainer.epochs=1", "hydra.run.dir=outputs/one"]
    proc = _gain_exp(installed, args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "one" / "summary.json").is_file()
    assert str(installed) in (tmp_path / "outputs" / "one" / ".hydra" / "hydra.yaml").read_text()  # its own conf/


@pytest.mark.slow
def test_the_console_script_dispatches_and_completes(tmp_path):
    cli = [sys.executable, "-m", "gain_exp.cli"]
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    unknown = subprocess.run(cli + ["train"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "use one of run, table, reproduce, bench" in unknown.stderr
    query = subprocess.run(
        cli + ["-sc", "query=bash"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "COMP_LINE": "gain-exp run los", "COMP_POINT": "16"},
    )
    assert query.returncode == 0, query.stderr[-2000:]
    assert "loss=" in query.stdout.split()
    commands = subprocess.run(
        cli + ["-sc", "query=bash"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "COMP_LINE": "gain-exp re", "COMP_POINT": "11"},
    )
    assert commands.stdout.split() == ["reproduce"]
    install = subprocess.run(
        cli + ["run", "-sc", "install=bash"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert "complete -o nospace -o default -F hydra_bash_completion" in install.stdout


@pytest.mark.slow
def test_reproduce_works_for_an_installed_package_from_another_directory(installed, tmp_path):
    # a spec that ships inside the wheel, by name: its jobs compose from the installed sweeps/, not site-packages/sweeps
    dry = _gain_exp(installed, ["reproduce", "readme_shapes", "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = [line for line in dry.stdout.splitlines() if "gain_exp.run" in line]
    assert len(jobs) == 12 and all(f"--config-dir {installed / 'gain_exp' / 'sweeps'}" in job for job in jobs)

    # a tiny spec made from a checkout, its job launched with --config-dir sweeps (a sweep recipe), re-run installed
    original = tmp_path / "orig"
    args = ["--config-dir", "sweeps", "+setting=gain", *tiny_overrides(tmp_path), "trainer.epochs=1"]
    made = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args, f"hydra.run.dir={original}"],
        cwd=ROOT,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    spec = tmp_path / "tiny.yaml"
    saved = _gain_exp(installed, ["table", str(original), "--metrics", "val/acc", "--save-spec", str(spec)], tmp_path)
    assert saved.returncode == 0, saved.stderr[-3000:]
    # its --config-dir is the checkout's sweeps/, outside the installed package: refused unless trusted (docs/trust.md)
    refused = _gain_exp(installed, ["reproduce", str(spec), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    assert refused.returncode == 2 and "is outside the project's conf/ and sweeps/" in refused.stderr
    assert "pass --trust" in refused.stderr and not (tmp_path / "rep").exists()
    again = _gain_exp(installed, ["reproduce", str(spec), "--out", str(tmp_path / "rep"), "--trust"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 of 1 cells identical" in again.stdout

    # a job that does not finish is reported as failed, not as a number that differs
    broken = tmp_path / "broken.yaml"
    broken.write_text(spec.read_text().replace("trainer.epochs=1", "trainer.epochs=0"))
    failed = _gain_exp(
        installed, ["reproduce", str(broken), "--out", str(tmp_path / "rep_broken"), "--trust"], cwd=tmp_path
    )
    assert failed.returncode == 1
    assert "failed jobs" in failed.stdout and "| failed |" in failed.stdout and "0 differ, 1 failed" in failed.stdout
