"""Where a run's numbers and pictures go: one small interface (base), the always-on local JSON record (json), and
optional backends chosen by ``_target_`` in ``conf/logger/*.yaml`` (wandb, tensorboard). A new backend is one module
here with a ``Tracker`` subclass and one YAML file naming it; ``build_tracker`` composes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from gain_exp.tracking.base import PanelSchedule, Tracker, Trackers
from gain_exp.tracking.json import JsonTracker

__all__ = ["JsonTracker", "PanelSchedule", "Tracker", "Trackers", "build_tracker"]


def build_tracker(
    logger_cfg: Any, out_dir: str | os.PathLike, run_config: dict[str, Any], resume: dict[str, Any] | None = None
) -> Trackers:
    """The local JSON tracker plus one backend per ``logger.<name>`` node, each built from its ``_target_``.

    ``resume``: the ``Trackers.state()`` saved with the checkpoint a resumed run continues from.
    """
    backends: list[Tracker] = [JsonTracker(out_dir, resume=(resume or {}).get("json"))]
    names = ["json"]
    for name, node in (logger_cfg or {}).items():
        if node is None:  # logger.<name>=null switches a composed backend off
            continue
        if not hasattr(node, "get") or not node.get("_target_"):
            raise ValueError(
                f"logger.{name} has no _target_; each logger.<name> entry is a backend config such as "
                f"conf/logger/wandb.yaml (pick one with logger=wandb, logger=tensorboard or logger=json)."
            )
        try:
            # partial first: instantiate would also try to build the _target_ nodes inside run_config
            make = instantiate(node, _partial_=True, _convert_="all")
        except InstantiationException as err:
            if isinstance(err.__cause__, (ValueError, ImportError)):
                raise err.__cause__ from None
            raise
        backends.append(make(out_dir=Path(out_dir), run_config=run_config, resume=(resume or {}).get(name)))
        names.append(name)
    return Trackers(backends, names)
