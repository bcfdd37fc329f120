"""Where a run's numbers and pictures go: one small interface (base), the always-on local JSON record (json), and
optional backends chosen by ``_target_`` in ``conf/logger/*.yaml`` (wandb, tensorboard). A new backend is one module
here with a ``Tracker`` subclass and one YAML file naming it."""
from gain_exp.tracking.base import PanelSchedule, Tracker, Trackers, build_tracker
from gain_exp.tracking.json import JsonTracker

__all__ = ["JsonTracker", "PanelSchedule", "Tracker", "Trackers", "build_tracker"]
