"""The experiment app: ``python -m gain_exp.run [group=option ...] [key=value ...]``.

Reads top to bottom as one experiment: check the config, seed, build data, model, GAIN, loss and
optimiser from config, train and evaluate, write summary.json, return the swept metric.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from gain_exp.config.checks import (check_config, check_data, check_metric_names, check_panels,
                             resolve_device, resolve_monitor)
from gain_exp.train.checkpoints import saved_tracking
from gain_exp.train.engine import Diverged, FitConfig, Interrupted, Trainer
from gain_exp.config.errors import explain
from gain_exp.train.experiment import USER_ERRORS, build_experiment
from gain_exp.output.files import jsonable, remove_stale_temps, write_json
from gain_exp.config.paths import CONF_DIR
from gain_exp.train.provenance import resolved, run_record
from gain_exp.train.runtime import Runtime, close_runtime, init_runtime, launched_processes, share_start_time
from gain_exp.tracking import Trackers, build_tracker

log = logging.getLogger("gain_exp")



def train(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the summary that is also written to summary.json.

    summary.json only ever moves forward: "completed", "interrupted" (checkpoint saved), "diverged" or "failed" (with
    the reason), and a run that fails before training starts (e.g. an unreadable resume checkpoint) leaves an
    existing summary.json as it was.
    """
    started = time.time()
    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    summary: dict[str, Any] | None = None
    trainer: Trainer | None = None
    tracker = None
    record: dict[str, Any] = {}
    try:
        check_config(cfg)
        runtime = init_runtime(resolve_device(cfg.trainer.device))
        device = runtime.device
        if not runtime.is_main:  # progress is the main process's to report; warnings and errors still show
            log.setLevel(logging.WARNING)
        if runtime.is_main:
            for stale in remove_stale_temps(out_dir / "checkpoints"):
                log.info("removed %s, a partial checkpoint from a killed run", stale)
        seed_everything(cfg.seed)

        experiment = build_experiment(cfg, runtime, lambda m: sync_batch_norm(m, cfg.trainer.sync_bn, runtime))
        data, gain, loss, mean, std = (experiment.data, experiment.gain, experiment.loss, experiment.mean,
                                       experiment.std)
        model = gain.model
        optimizer = instantiate(cfg.trainer.optimizer)(params=model.parameters())
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.trainer.epochs)
                     if cfg.trainer.scheduler == "cosine" else None)

        check_data(cfg, data)
        check_panels(cfg, data)
        monitor = resolve_monitor(cfg.trainer.monitor, data.multi_label)
        check_metric_names(cfg, monitor, data)
        fit_cfg = FitConfig.from_config(cfg, monitor, device)
        record = run_record(cfg)
        run_config = {**resolved(cfg), "choices": record["choices"], "overrides": record["overrides"],
                      "provenance": {k: record[k] for k in ("git", "versions", "threads", "command")}}
        tracker = (build_tracker(cfg.logger, out_dir, run_config, resume=saved_tracking(cfg.trainer.resume, out_dir))
                   if runtime.is_main else Trackers([]))  # one record of the run, by the main process
        trainer = Trainer(gain, loss, optimizer, scheduler, data, fit_cfg, out_dir, tracker, runtime, mean, std,
                          record={**record, "config": resolved(cfg)}, val_metric_names=val_metric_names(cfg, monitor))
        final = trainer.fit()
        summary = _summary(cfg, record, final, trainer, monitor, started, "completed")
        return summary
    except Interrupted:
        summary = _summary(cfg, record, trainer.history[-1] if trainer.history else {}, trainer, monitor, started,
                           "interrupted")
        raise
    except BaseException as err:
        status = "diverged" if isinstance(err, Diverged) else "failed"
        reason = str(err) if isinstance(err, (Diverged, *USER_ERRORS)) else f"{type(err).__name__}: {err}"
        if trainer is not None:
            summary = _summary(cfg, record, trainer.history[-1] if trainer.history else {}, trainer, monitor,
                               started, status)
        else:
            summary = {"status": status, **record}
        summary["error"] = reason.splitlines()[0] if reason else type(err).__name__
        raise
    finally:
        path = out_dir / "summary.json"
        main = trainer is None or trainer.runtime.is_main
        if main and summary is not None and (trainer is not None and trainer.started or not path.exists()):
            write_json(path, summary)
        if tracker is not None:
            tracker.finish(summary or {"status": "failed"})


def sync_batch_norm(model: torch.nn.Module, wanted: bool, runtime: Runtime) -> torch.nn.Module:
    """trainer.sync_bn: batch-norm statistics over every process's share of the batch (CUDA only)."""
    if not wanted or not runtime.distributed:
        return model
    if runtime.device.type != "cuda":
        log.warning("trainer.sync_bn=true needs CUDA (SyncBatchNorm refuses CPU tensors); on %s each process keeps "
                    "batch-norm statistics over its own share of the batch", runtime.device)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def val_metric_names(cfg: DictConfig, monitor: str) -> dict[str, str]:
    """Config keys that name a validation metric, checked against the real names after the first epoch."""
    names = {"trainer.monitor": monitor}
    if str(cfg.optimize_metric).startswith("val/"):
        names["optimize_metric"] = cfg.optimize_metric
    return names


def seed_everything(seed: int) -> None:
    """Python, NumPy (if present) and torch RNGs from one seed."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _summary(cfg: DictConfig, record: dict, final: dict, trainer: Trainer, monitor: str, started: float,
             status: str) -> dict:
    """summary.json: status and metrics first, then everything needed to re-run the job (run_record, config)."""
    metric = monitor if cfg.optimize_metric == "auto" else cfg.optimize_metric
    git = record["git"]
    return {
        "status": status,
        "final": {k: jsonable(v) for k, v in final.items()},
        "best": trainer.best,
        "tested_on": trainer.tested_on,
        "before_training": trainer.before_training,  # trainer.test_first: metrics of the initial weights
        "speed": trainer.speed,  # the last epoch's training images/s over all processes and data-wait share
        "resumed": trainer.resumed,  # {"checkpoint": best|last, "epoch"}: the weights behind the test metrics
        "optimize_metric": metric,
        "epochs_completed": trainer.epoch,
        "wall_time_s": round(time.time() - started, 2),
        "device": str(trainer.device),
        "git_commit": None if git["commit"] is None else git["commit"] + ("+dirty" if git["dirty"] else ""),
        **record,
        "tracking": trainer.tracker.state(),
        "data": trainer.data.extras,  # e.g. masks in the L_e budget, files skipped as unreadable
        "config": resolved(cfg),
    }


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: runs one job and returns its optimisation metric (for sweepers)."""
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        if stop.signum not in (None, 0, signal.SIGINT, signal.SIGTERM):
            # submitit's preemption / time-out signal: its own handler (restored by now) requeues this job, which
            # then continues from the checkpoint just saved (the launcher recipes set trainer.resume=auto)
            requeue = signal.getsignal(stop.signum)
            if callable(requeue):
                requeue(stop.signum, None)
        sys.exit(130)
    except Diverged as err:
        log.error("diverged: %s", err)
        print(f"error: training diverged: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return math.nan  # the other jobs of the sweep go on; sweepers read NaN as a failed trial
        sys.exit(3)
    value = summary["final"].get(summary["optimize_metric"])
    if (launched_processes() or (0,))[0] == 0:  # the main process reports
        print(f"done: {summary['optimize_metric']}={value}  results in {out_dir}")
    return value


_hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)


def main() -> float | None:
    """Command-line entry: the Hydra app, with composition errors printed as one ``error:`` sentence (exit 2)."""
    if launched_processes() is not None:  # torchrun: every process names the run dir with rank 0's ${now:...}
        share_start_time()
    try:
        return _main()
    finally:
        close_runtime()


def _main() -> float | None:
    full_trace = os.environ.get("HYDRA_FULL_ERROR")
    if full_trace == "1":  # the user asked Hydra for complete stack traces: leave its reporting alone
        return _hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises composition errors here instead of printing them
    try:
        return _hydra_main()
    except Exception as err:
        sentence = explain(err)
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_trace is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_trace


if __name__ == "__main__":
    from gain_exp.cli import run

    run(sys.argv[1:])  # the same command-line fixes as `gain-exp run` (relative --config-path, sweep recipes)
