"""The training loop: GAIN steps, an evaluation per epoch, best/last checkpoints, resume, signals.

Evaluation (metrics, panels) lives in gain_exp/train/evaluation.py, checkpoint files and RNG state in
gain_exp/train/checkpoints.py, and everything that depends on how many processes run in gain_exp/train/runtime.py.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gain_exp.core.losses import LOSS_NAMES
from gain_exp.core.metrics import HEADLINE
from gain_exp.output.files import load_state
from gain_exp.tracking import Tracker
from gain_exp.train.checkpoints import (
    CheckpointPolicy,
    ParetoFront,
    apply_hyperparameters,
    config_changes,
    read_checkpoint,
    resolve_checkpoint,
    restore_rng,
    rng_state,
)
from gain_exp.train.evaluation import Evaluator
from gain_exp.train.experiment import Experiment
from gain_exp.train.signals import StopSafeLoader, stop_signals

log = logging.getLogger(__name__)


class Diverged(Exception):
    """Training produced a non-finite loss or non-finite weights; nothing non-finite was saved as a checkpoint."""


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; carries its path."""

    def __init__(self, checkpoint: Path, signum: int | None = None) -> None:
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}; continue with trainer.resume={checkpoint}")
        self.checkpoint = checkpoint
        self.signum = signum  # the signal that stopped the run (None: trainer.interrupt_after_steps)


def build_evaluator(experiment: Experiment) -> Evaluator:
    """The Evaluator an experiment's plan describes: eval batch size, workers, precision, memory format, progress and
    explanation metrics. The Trainer's, and gain_exp.evaluate's when it scores a saved run again."""
    t = experiment.plan.trainer
    return Evaluator(
        experiment.gain,
        experiment.loss,
        experiment.data,
        experiment.runtime,
        batch_size=t.eval_batch_size or t.batch_size,
        workers=t.workers,
        amp=t.amp,
        mean=experiment.mean,
        std=experiment.std,
        progress=sys.stderr.isatty() if t.progress is None else t.progress,
        memory_format=torch.channels_last if t.channels_last else torch.contiguous_format,
        eval_metrics=t.eval_metrics,
    )


class Trainer:
    """Fits a GAIN model on a DataSplits and evaluates it; everything it writes goes under ``out_dir``."""

    def __init__(
        self,
        experiment: Experiment,
        out_dir: str | os.PathLike,
        tracker: Tracker,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.experiment, self.plan = experiment, experiment.plan
        self.runtime = experiment.runtime
        self.device = self.runtime.device
        self.gain, self.loss = experiment.gain, experiment.loss
        self.optimizer, self.scheduler = experiment.optimizer, experiment.scheduler
        self.data, self.tracker = experiment.data, tracker
        self.cfg, self.seed = self.plan.trainer, self.plan.seed  # the typed trainer settings (config.schema)
        cfg, data, gain = self.cfg, self.data, self.gain
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.mean, self.std = experiment.mean, experiment.std
        self.val_metric_names = self.plan.val_metric_names()  # config key -> metric name
        self.record = record or {}  # provenance + resolved config, saved in every checkpoint
        self.tested_on: dict[str, Any] = {}  # which weights the test splits saw: {"checkpoint", "epoch", "rule"}
        # every selection scored on the test splits (test_on and test_also): {name: {"checkpoint", "epoch", "rule",
        # "metrics"}}; under pareto each front member's test metrics are in self.checkpoints.pareto.members
        self.selections: dict[str, dict[str, Any]] = {}
        self.resumed: dict[str, Any] | None = None  # {"from": checkpoint, "changed": {key: [old, new]}} on resume
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        # which checkpoint files each epoch gets (last, best, every N) and the best epoch so far
        pareto = None
        if "pareto" in cfg.selections:
            pareto = ParetoFront(list(cfg.pareto.metrics), list(cfg.pareto.modes))  # auto resolved by the plan
        self.checkpoints = CheckpointPolicy(
            self.ckpt_dir,
            cfg.monitor,
            cfg.monitor_mode,
            cfg.checkpoint_every,
            pareto=pareto,
            tiebreak=cfg.monitor_tiebreak,
        )
        self.history: list[dict[str, float]] = []
        self.speed: dict[str, float] = {}  # the last epoch's training images/s (global) and data-wait share
        self.before_training: dict[str, float] | None = None  # trainer.test_first's metrics
        self._memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self._stop_signal: int | None = None
        self.started = False  # set once a resume checkpoint has loaded: from then on summary.json is this run's
        self._nonfinite: torch.Tensor | None = None  # any non-finite loss since the last check (kept on device)
        self._epoch_sums: tuple[torch.Tensor | None, int] = (None, 0)
        self._resume_rng: dict[str, Any] | None = None  # RNG state to restore at a mid-epoch resume
        self._progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
        self._amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
        world = self.runtime.world_size
        if cfg.batch_size % world:
            raise ValueError(
                f"trainer.batch_size={cfg.batch_size} is the global batch and must split evenly over "
                f"{world} processes; use a multiple of {world}."
            )
        if len(data.train) < world:
            raise ValueError(
                f"the train split has {len(data.train)} images, fewer than the {world} processes; "
                f"use fewer processes or a larger split."
            )
        # the module each training step calls: under several processes DDP wraps the whole GAIN module (both
        # streams and the Grad-CAM autograd.grad), so one backward reduces the gradients of both passes
        self.step_module: torch.nn.Module = gain
        self._count = None  # losses.CountReducer under several processes
        if self.runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                gain, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            self._count = self.runtime.mean_count
        self.evaluator = build_evaluator(experiment)

    # ----------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        """Train for cfg.epochs (resuming if asked), then evaluate every test split; returns final metrics."""
        if self.cfg.resume:
            self.load_checkpoint(self.cfg.resume)
        self.started = True
        with self._signals():
            if self.cfg.test_first and self.step == 0:  # not again when a run resumes
                self.before_training = self._evaluate_before_training()
            while self.epoch < self.cfg.epochs:
                train_stats = self.train_epoch(self.epoch)
                val = self.evaluate(self.data.val, "val", self.epoch)
                self._check_names(val)
                if not math.isfinite(val.get("val/loss_cl", 0.0)):
                    raise Diverged(
                        f"the weights are no longer finite after epoch {self.epoch} (val/loss_cl is "
                        f"{val['val/loss_cl']}); {_DIVERGED_FIX}"
                    )
                if self.scheduler is not None:
                    self.scheduler.step()
                record = {"epoch": self.epoch, **train_stats, **val}
                self.history.append(record)
                self.tracker.log_metrics(record, self.step)
                finished, self.epoch, self.batch_in_epoch = self.epoch, self.epoch + 1, 0
                saved = self.checkpoints.after_epoch(finished, val, self._state)  # each resumes at the next epoch
                if "best" in saved:
                    self.tracker.log_checkpoint(saved["best"], "best")
                log.info("epoch %d/%d  %s", self.epoch, self.cfg.epochs, _brief(record))
            tests = self._test() if self.data.tests else {}
        if tests:
            self.tracker.log_metrics(tests, self.step)
        return {**(self.history[-1] if self.history else {}), **tests}

    def _evaluate_before_training(self) -> dict[str, float]:
        """trainer.test_first: val and every test split with the initial weights, logged as epoch -1 at step 0."""
        metrics: dict[str, float] = {}
        for name, split in {"val": self.data.val, **self.data.tests}.items():
            metrics.update(self.evaluate(split, name, -1))
        self.tracker.log_metrics({"epoch": -1, **metrics}, 0)
        log.info("before training  %s", _brief({**metrics, "train/mean_loss": math.nan}))
        return metrics

    def _stopping(self) -> bool:
        """A stop signal reached this process, or (under several processes) any of them: all stop at one step.

        The decision is the collective's answer alone: a signal that lands after it counts at the next step on every
        process (reading the flag again here would let one process stop while another goes on, a deadlock).
        """
        stop = self._stop_signal is not None
        if self.runtime.distributed:
            stop = self.runtime.any(stop)
        if stop:
            if self._stop_signal is None:
                self._stop_signal = signal.SIGTERM  # another process was signalled
            log.warning("signal %d received: saving a checkpoint and stopping", self._stop_signal)
        return stop

    def _check_names(self, val: dict[str, float]) -> None:
        """Metric names the run depends on (the monitor, a val optimize_metric) exist, checked after the first val."""
        for key, name in self.val_metric_names.items():
            if name not in val:
                close = difflib.get_close_matches(name, val, n=3)
                hint = (
                    f"did you mean {', '.join(close)}?" if close else f"its val metrics are {', '.join(sorted(val))}."
                )
                raise ValueError(f"{key}={name} is not a metric of this run; {hint}")

    def _check_finite(self, epoch: int) -> None:
        if self._nonfinite is not None and bool(self._nonfinite):
            raise Diverged(
                f"the training loss became non-finite in epoch {epoch} (step {self.step + 1}); {_DIVERGED_FIX}"
            )

    def _test(self) -> dict[str, float]:
        """Score every test split with the weights ``test_on`` chooses (the headline, with panels and tables), then
        with each selection of ``test_also`` and each Pareto member (metrics only); returns the headline's metrics."""
        self.runtime.barrier()  # the main process has written every checkpoint
        rules = self.cfg.selections
        front = self.checkpoints.pareto
        headline: dict[str, float] = {}
        for rule in rules:
            chosen = self._selection(rule)
            metrics = self._score_tests(chosen, panels=rule == self.cfg.test_on)
            self.selections[rule] = {**chosen, "metrics": metrics}
            if rule == self.cfg.test_on:
                self.tested_on, headline = chosen, metrics
        if front is not None:  # every member's test metrics (the picked one's are already known)
            for member in front.members:
                known = next((s for s in self.selections.values() if s["checkpoint"] == member["checkpoint"]), None)
                weights = {"checkpoint": member["checkpoint"], "epoch": member["epoch"]}
                member["tests"] = known["metrics"] if known else self._score_tests(weights, panels=False)
        return headline

    def _selection(self, rule: str) -> dict[str, Any]:
        """{"checkpoint", "epoch", "rule"} of the weights ``rule`` (best | last | pareto) chooses, loaded into the model."""
        if rule == "pareto":
            front = self.checkpoints.pareto
            metric = self.cfg.pareto.pick  # resolved by the plan
            member = front.pick(metric)
            if member is not None and self.checkpoints.path(member["checkpoint"]).is_file():
                self._load_weights(member["checkpoint"])
                size = len(front.members)
                described = (
                    f"pareto: the best {metric} of the {size} epochs on the front of {' and '.join(front.metrics)}"
                )
                return {"checkpoint": member["checkpoint"], "epoch": member["epoch"], "rule": described}
            log.warning("trainer.test_on=pareto but no epoch is on the front (NaN metrics?); testing the last epoch")
        elif rule == "best":
            best = self.checkpoints.path("best")
            if self.best.get("epoch") is not None and best.is_file():
                self._load_weights("best")
                monitor = f"{self.cfg.monitor_mode} {self.cfg.monitor}"
                if self.cfg.monitor_tiebreak is not None:
                    monitor += f" (ties: the {self.cfg.monitor_mode} {self.cfg.monitor_tiebreak})"
                return {
                    "checkpoint": "best",
                    "epoch": self.best["epoch"],
                    "rule": f"best: the epoch with the {monitor}",
                }
            if self.best.get("epoch") is None:
                log.warning(
                    "trainer.test_on=best but no epoch had a finite %s; testing the last epoch", self.cfg.monitor
                )
            else:
                log.warning(
                    "trainer.test_on=best but the best epoch (%d) was saved by the run this one resumed from, "
                    "not in %s; testing the last epoch's weights",
                    self.best["epoch"],
                    self.ckpt_dir,
                )
        if self.selections or rule != "last":  # the model may hold other weights by now
            last = self.checkpoints.path("last")
            if last.is_file():
                self._load_weights("last")
        return {"checkpoint": "last", "epoch": self.epoch - 1, "rule": "last: the final epoch"}

    def _load_weights(self, name: str) -> None:
        self.gain.model.load_state_dict(load_state(self.checkpoints.path(name), map_location=self.device)["model"])

    def _score_tests(self, weights: dict[str, Any], panels: bool) -> dict[str, float]:
        """Every test split scored with the model's current weights, named ``weights`` ({"checkpoint", "epoch"}): with
        panels and the per-image table (``panels``), else metrics alone."""
        metrics: dict[str, float] = {}
        for name, split in self.data.tests.items():
            if self._stopping():  # last.ckpt already holds the finished training: resume only tests
                raise Interrupted(self.ckpt_dir / "last.ckpt", self._stop_signal)
            if panels:  # named by the epoch of the weights that drew them (the best epoch's, under test_on=best)
                metrics.update(self.evaluate(split, name, weights["epoch"], table=True))
            else:
                metrics.update(self.evaluator.evaluate(split, name, stage="test").metrics)
        return metrics

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split (from ``batch_in_epoch`` when resuming mid-epoch)."""
        self.gain.train()
        _seed_epoch(self.seed, epoch, self.runtime.rank)
        loader = self._train_loader(epoch)
        needs = self.loss.step_needs(epoch)  # which GAIN streams each step runs, and what else the loss takes
        self.loss.prepare(self.gain.model, epoch)
        # loss sums over every step of the epoch (kept on device: no sync per step); they are saved in
        # checkpoints so the epoch means of a resumed run match an uninterrupted one
        sums, n = self._epoch_sums if self.batch_in_epoch else (None, 0)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self._progress, leave=False)
        started = fetch = time.perf_counter()
        waited, steps = 0.0, 0
        for batch in bar:
            waited += time.perf_counter() - fetch  # the loop blocked on the DataLoader
            steps += 1
            images = batch["image"].to(self.device, memory_format=self._memory_format)
            targets = batch["target"].to(self.device)
            # host tensor: no device sync; under several processes every one runs the same streams (L_e's global
            # mean is a collective even on a process whose share has no mask)
            has_masks = self.runtime.distributed or bool(batch["use_mask"].any())
            use_mask = batch["use_mask"].to(self.device)
            inputs = self.loss.step_inputs(self.gain.model, images, use_mask, epoch, has_masks)  # as the loss needs
            with self._amp:
                with inputs:
                    out = self.step_module(
                        inputs.images, targets, attention=needs.attention(has_masks), mining=needs.mining
                    )
                terms = self.loss(
                    out,
                    targets,
                    batch["seg"].to(self.device),
                    use_mask,
                    epoch,
                    count=self._count,
                    **inputs.loss_inputs(),
                )
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            parts = self.runtime.mean(terms.stacked())  # the global batch's loss terms, the same on every process
            bad = ~torch.isfinite(parts[0])
            if self.cfg.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.gain.parameters(), self.cfg.grad_clip)
                bad = bad | ~torch.isfinite(norm)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            # On the CPU the check costs nothing, so a non-finite step never reaches the weights; on a GPU it waits
            # for the logging steps, which synchronise anyway, and the epoch's validation check catches the rest.
            if self.device.type == "cpu" or (self.step + 1) % self.cfg.log_every_n_steps == 0:
                self._check_finite(epoch)
            self.optimizer.step()
            self.step += 1
            every = self.cfg.train_panels_every
            if every and self.step % every == 0 and self.runtime.is_main:
                self.tracker.log_panels(
                    "train", self.evaluator.batch_panels(batch, self.cfg.train_panels), epoch, step=self.step
                )
            self.batch_in_epoch += 1
            sums, n = (parts if sums is None else sums + parts), n + 1
            self._epoch_sums = (sums, n)
            if self.step % self.cfg.log_every_n_steps == 0 or n == 1:
                logged = {f"train/{k}": v for k, v in zip(LOSS_NAMES, parts.tolist())}
                logged["train/lr"] = self.optimizer.param_groups[0]["lr"]
                self.tracker.log_metrics({"epoch": epoch, **logged}, self.step)
                bar.set_postfix(loss=f"{logged['train/loss']:.3f}")
            if self.cfg.interrupt_after_steps is not None and self.step >= self.cfg.interrupt_after_steps:
                self._stop_signal = 0  # acts as a Ctrl-C at this step (used to test resume)
            fetch = time.perf_counter()
            if self._stopping():
                path = self.save_checkpoint("last")
                self.runtime.barrier()  # no process exits while the main one still writes
                raise Interrupted(path, self._stop_signal)
        self._check_finite(epoch)  # waits for the device: the epoch's time below is real
        elapsed = time.perf_counter() - started
        if steps:
            self.speed = {
                "images_per_s": round(steps * self.cfg.batch_size / elapsed, 2),
                "data_wait_share": round(waited / elapsed, 4),
                "epoch": epoch,
            }
            log.info(
                "epoch %d: %.1f images/s, %.0f%% of the time waiting for data",
                epoch + 1,
                self.speed["images_per_s"],
                100 * self.speed["data_wait_share"],
            )
        means = (sums / n).tolist() if n else [math.nan] * len(LOSS_NAMES)
        return {f"train/mean_{k}": v for k, v in zip(LOSS_NAMES, means)}

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self, dataset: Dataset, split: str, epoch: int, table: bool = False) -> dict[str, float]:
        """One split's metrics (``split/`` keys); its panels go to the trackers (``table``: the per-image table too).
        Test splits (all but val) get the ``test`` explanation metrics too (trainer.eval_metrics)."""
        wanted = max(self.cfg.num_panels, self.cfg.table_images if table else 0)
        quota = None
        if self.cfg.panel_positives is not None or self.cfg.panel_negatives is not None:
            quota = (self.cfg.panel_positives or 0, self.cfg.panel_negatives or 0)
        result = self.evaluator.evaluate(
            dataset, split, panels=wanted, quota=quota, stage="epoch" if split == "val" else "test"
        )
        shown = result.chosen if result.chosen is not None else result.panels[: self.cfg.num_panels]
        self.tracker.log_panels(split, shown, epoch)
        if table:
            self.tracker.log_table(split, result.panels)
        return result.metrics

    # --------------------------------------------------------------------------- checkpoints
    @property
    def best(self) -> dict[str, Any]:
        """The best epoch so far, {"metric", "value", "epoch"}: the checkpoint policy's (saved, resumed, summarised)."""
        return self.checkpoints.best

    @best.setter
    def best(self, value: dict[str, Any]) -> None:
        self.checkpoints.best = value

    def save_checkpoint(self, name: str) -> Path:
        """Write ``checkpoints/<name>.ckpt`` atomically (main process only; every process calls it); returns its path."""
        return self.checkpoints.write([name], self._state)[name]

    def _state(self) -> dict[str, Any] | None:
        """What a checkpoint holds; None on processes other than the main one (every process calls it: a collective)."""
        self._check_weights()
        rngs = self.runtime.gather(rng_state())  # every process's streams, so a mid-epoch resume continues each
        if not self.runtime.is_main:
            return None
        return {
            "model": self.gain.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best": self.best,
            "pareto": self.checkpoints.pareto.members if self.checkpoints.pareto is not None else None,
            "history": self.history,
            "epoch_sums": {"sums": self._epoch_sums[0], "n": self._epoch_sums[1]},
            "rng": rngs[0],
            "rng_ranks": rngs,
            "tracking": self.tracker.state(),  # e.g. the W&B run id, so a resumed run continues the same record
            "run": self.record,  # config, choices, overrides, git commit, versions: the checkpoint explains itself
        }

    def _check_weights(self) -> None:
        """Diverged unless every floating parameter and buffer is finite: batch-norm running statistics can overflow
        while the loss stays finite (eval mode then divides by an infinite variance), and no checkpoint may hold them.
        Every process calls it (a collective under several processes)."""
        bad = next(
            (
                k
                for k, v in self.gain.model.state_dict().items()
                if v.is_floating_point() and not torch.isfinite(v).all()
            ),
            None,
        )
        if self.runtime.any(bad is not None):
            where = bad or "a tensor of another process"
            raise Diverged(f"the weights are no longer finite at step {self.step} ({where} is not); {_DIVERGED_FIX}")

    def load_checkpoint(self, where: str | os.PathLike) -> None:
        """Restore model, optimiser, scheduler, position and RNG from a checkpoint file or run directory."""
        path = resolve_checkpoint(where, self.out_dir)
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return
        state = read_checkpoint(path, self.device)
        new_cfg = self.record.get("config")
        saved_cfg = (state.get("run") or {}).get("config")
        if new_cfg and saved_cfg:
            self.resumed = {"from": str(path), "changed": config_changes(saved_cfg, new_cfg, path)}
            old_bs = saved_cfg["trainer"]["batch_size"]
            if state["batch_in_epoch"] and old_bs != self.cfg.batch_size:
                raise ValueError(
                    f"trainer.resume: {path} stopped mid-epoch (batch {state['batch_in_epoch']} of "
                    f"epoch {state['epoch']}) with trainer.batch_size={old_bs}; resume with that batch "
                    f"size, or from a checkpoint at an epoch boundary, to change it."
                )
        self.gain.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if new_cfg:
            length = (new_cfg["trainer"].get("scheduler") or {}).get("T_max", self.cfg.epochs)  # cosine's length
            apply_hyperparameters(self.optimizer, self.scheduler, new_cfg["trainer"]["optimizer"], length)
        for key, (old, new) in (self.resumed or {}).get("changed", {}).items():
            log.warning("resume: %s changed from %s to %s (applied)", key, old, new)
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best, self.history = state["best"], state["history"]
        if self.checkpoints.pareto is not None and state.get("pareto"):  # a front kept by the interrupted run
            self.checkpoints.pareto.members = [
                m for m in state["pareto"] if self.checkpoints.path(m["checkpoint"]).is_file()
            ]
        self._epoch_sums = (state["epoch_sums"]["sums"], state["epoch_sums"]["n"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        self._resume_rng = ranks[self.runtime.rank] if len(ranks) == self.runtime.world_size else state["rng"]
        log.info("resumed from %s at epoch %d, batch %d", path, self.epoch, self.batch_in_epoch)

    # ------------------------------------------------------------------------------- helpers
    def _train_loader(self, epoch: int) -> DataLoader:
        data = self.data.train
        sampler = self.data.train_sampler
        order = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        bs = self.cfg.batch_size  # the global batch: each of W processes takes a contiguous 1/W of it
        wanted = self.cfg.steps_per_epoch * bs if self.cfg.steps_per_epoch else 0
        indices: list[int] = []
        while not indices or len(indices) < wanted:  # trainer.steps_per_epoch: further passes, in fresh orders
            if sampler is not None:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                indices += list(iter(sampler))
            else:
                indices += torch.randperm(len(data), generator=order).tolist()
        if wanted:
            indices = indices[:wanted]
        stop = len(indices) - len(indices) % bs if len(indices) > bs else len(indices)  # a batch of one breaks BN
        batches = [indices[i : i + bs] for i in range(0, stop, bs)]
        if self.batch_in_epoch:  # mid-epoch resume: skip what was done, continue the saved RNG stream
            batches = batches[self.batch_in_epoch :]
            if self._resume_rng is not None:
                restore_rng(self._resume_rng)
                self._resume_rng = None
        rt = self.runtime
        shards = [_shard(batch, rt.rank, rt.world_size) for batch in batches]
        return StopSafeLoader(
            data,
            batch_sampler=shards,
            num_workers=self.cfg.workers,
            generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch)),
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM (and submitit's preemption signal) finish the current step, save a checkpoint and stop."""

        def handler(signum, _frame):
            # only a flag: writing a log line here would re-enter the stream's I/O if the signal lands mid-write
            self._stop_signal = signum

        old = {s: signal.getsignal(s) for s in stop_signals()}
        try:
            for s in old:
                signal.signal(s, handler)
        except ValueError:  # not the main thread (e.g. some launchers): keep default handling
            old = {}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


_DIVERGED_FIX = "lower trainer.optimizer.lr or set trainer.grad_clip (e.g. 1.0); no non-finite weights were saved"


def _shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (shares differ by at most one image)."""
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Every epoch's randomness (augmentation, dropout) is a pure function of (seed, epoch, process rank)."""
    torch.manual_seed(_epoch_seed(seed, epoch) + 1_000_003 * rank)
    random.seed(_epoch_seed(seed, epoch) + 1_000_003 * rank)


def _brief(record: dict[str, float]) -> str:
    """The epoch's console line: the training loss and what a GAIN user watches on val (HEADLINE)."""
    keys = ["train/mean_loss", *(f"val/{m}" for m in HEADLINE)]
    return "  ".join(f"{k}={record[k]:.4f}" for k in keys if isinstance(record.get(k), float))
