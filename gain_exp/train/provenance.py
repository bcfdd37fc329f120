"""What a run records about where it came from: composed config, Hydra choices and overrides, code version, thread
count. summary.json, checkpoints and the W&B config all carry the same record, so any of them can re-run the job."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gain_exp import __version__

SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_state(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the source tree (None outside a git checkout)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return {"commit": sha, "dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def git_commit() -> str | None:
    """The source tree's commit with ``+dirty`` when modified, or None outside git."""
    state = git_state()
    return None if state["commit"] is None else state["commit"] + ("+dirty" if state["dirty"] else "")


def hydra_context() -> dict[str, Any]:
    """Choices, task overrides, extra config dirs and run-dir layout of the current Hydra job ({} outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    config_dirs = [
        s.path for s in hc.runtime.config_sources if s.provider == "command-line" and s.schema == "file"
    ]  # --config-dir (e.g. sweeps/)
    return {
        "choices": choices,
        "overrides": [str(o) for o in hc.overrides.task],
        "config_dirs": config_dirs,
        "config_name": hc.job.config_name,
        "job_num": hc.job.get("num"),
        "sweep_dir": hc.sweep.dir if hc.job.get("num") is not None else None,
        "output_dir": hc.runtime.output_dir,
    }


def versions() -> dict[str, str]:
    """Versions of the interpreter and of the libraries that change numbers."""
    import timm
    import torch

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "gain_exp": __version__,
    }


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The provenance of this job: Hydra choices/overrides, seed, git state, versions, torch threads, command."""
    import torch

    hydra = hydra_context()
    return {
        "choices": hydra.get("choices", {}),
        "overrides": hydra.get("overrides", []),
        "seed": cfg.get("seed"),
        "git": git_state(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "hydra": {k: v for k, v in hydra.items() if k not in ("choices", "overrides")},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (for JSON, checkpoints and trackers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
