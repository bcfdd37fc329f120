"""Shared test setup: offline everything, tiny configs composed from the real conf/ tree."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import gain_exp  # noqa: F401  registers the config schemas (gain_exp/config/schema.py) that conf/ refers to

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
_WANDB_HOME = tempfile.mkdtemp(prefix="gain_exp_wandb_")  # W&B never writes under ~ during tests
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(_var, _WANDB_HOME)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """A run that trains in seconds: timm's test_resnet on 32 px shapes, 2 epochs."""
    return [
        "backbone.name=test_resnet",
        f"dataset.root={tmp_path / 'shapes'}",
        "dataset.image_size=32",
        "dataset.n_train=48",
        "dataset.n_val=16",
        "dataset.n_test=16",
        "dataset.masks_to_use=0.5",
        "trainer.epochs=2",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=16",
        "trainer.num_panels=2",
        "trainer.log_every_n_steps=1",
        "loss.am_start_epoch=1",
        "logger=json",
    ]


def compose(overrides: list[str]):
    """The app's config for these overrides, exactly as `python -m gain_exp.run` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny(tmp_path):
    """(composer, overrides) for a tiny run writing under tmp_path."""
    return tiny_overrides(tmp_path)


@pytest.fixture
def one_thread():
    """Per-sample transforms on tiny tensors run ~10x faster single-threaded (as in DataLoader workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: without one they are skipped, and say so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
