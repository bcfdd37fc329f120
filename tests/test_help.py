"""``gain-exp run --help``: a short page of the app's own (conf/config.yaml's hydra.help), not Hydra's stock one.

The groups and their options are written by hand there (Hydra's list would add the sweeps/ recipe groups, e.g.
``tables``); the drift test holds the hand-written list to the conf/ tree so it cannot go stale.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GROUPS = ("backbone", "dataset", "loss", "grad_mode", "formulation", "trainer", "logger", "experiment")


@pytest.fixture(scope="module")
def help_page(tmp_path_factory) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "gain_exp.run", "--help"],
        cwd=tmp_path_factory.mktemp("help"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def listed_groups(page: str) -> dict[str, list[str]]:
    """group -> its options (in the page's order, a default keeps its ``*``) from the 'Config groups' section."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Config groups"))
    groups: dict[str, list[str]] = {}
    current = None
    for line in lines[start + 1 :]:
        head = re.match(r"^  (\w+)\s{2,}\S", line)
        if head:
            current = head.group(1)
            groups[current] = []
        elif current is not None and line.startswith(" " * 4):
            groups[current] += [o.strip() for o in line.split(",") if o.strip()]
        else:
            break
    return groups


@pytest.mark.slow
def test_help_is_the_apps_own_short_page(help_page):
    assert help_page.returncode == 0, help_page.stderr
    page = help_page.stdout
    assert "is powered by Hydra" not in page and "== Config ==" not in page  # not the stock page
    assert page.splitlines()[0].startswith("gain-exp run (= python -m gain_exp.run): train and evaluate")
    assert list(listed_groups(page)) == list(GROUPS)
    assert "tables" not in page  # the sweeps/ recipe group stays out
    assert "gain-exp run loss=gain formulation=per_label seed=1" in page  # a single run
    assert "gain-exp run -m loss=baseline,gain,gain_ext seed=0,1,2" in page  # a sweep
    assert "gain-exp run --config-path outputs/runs/<run>/.hydra --config-name config" in page  # a saved run again
    assert "docs/configuration.md" in page and "--cfg job" in page
    assert len(page.splitlines()) < 80


@pytest.mark.slow
def test_help_groups_match_the_conf_tree(help_page):
    """Every group directory of conf/ is listed with exactly its option files, the default marked as in config.yaml."""
    assert help_page.returncode == 0, help_page.stderr
    groups = listed_groups(help_page.stdout)
    assert sorted(groups) == sorted(d.name for d in CONF.iterdir() if d.is_dir())
    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    for group, options in groups.items():
        files = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert sorted(o.rstrip("*") for o in options) == files, group
        marked = [o.rstrip("*") for o in options if o.endswith("*")]
        assert marked == ([defaults[group]] if defaults[group] is not None else []), group
