"""The experiment app: ``python -m gain_exp.run [group=option ...] [key=value ...]``.

Reads top to bottom as one experiment: check the config, seed, build data, model, GAIN, loss and
optimiser from config, train and evaluate, write summary.json, return the swept metric.

A single run first claims its directory (``claim_run_dir``): a finished run there is refused unless this one
continues it or ``--overwrite`` is given, and a run directory another process writes to is refused (docs/errors.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gain_exp.config.errors import explain
from gain_exp.config.paths import CONF_DIR, SWEEPS_DIR
from gain_exp.config.plan import make_plan
from gain_exp.output.files import cannot_write, remove_stale_temps, write_error
from gain_exp.runs.rundir import saved_job
from gain_exp.runs.trust import TRUST_FLAG, Untrusted, check_run_dir
from gain_exp.tracking import Trackers, build_tracker
from gain_exp.train.checkpoints import saved_tracking
from gain_exp.train.engine import Diverged, Interrupted, Trainer
from gain_exp.train.experiment import USER_ERRORS, build_experiment
from gain_exp.train.provenance import resolved, run_record
from gain_exp.train.runtime import Runtime, close_runtime, init_runtime, launched_processes, share_start_time
from gain_exp.train.summary import RunSummary, final_report

log = logging.getLogger("gain_exp")

OVERWRITE_FLAG = "--overwrite"  # replace the run already in hydra.run.dir (its outputs are removed first)
LOCK_FILE = ".lock"  # in the run directory: flock-ed by the run writing there, released by the OS however it ends
# what a run writes into its directory, removed by --overwrite so that nothing of the old run mixes with the new one
# (.hydra/ is rewritten by Hydra; wandb/ keeps the old run's offline W&B data under its own run id)
RUN_OUTPUTS = ("attention", "results", "checkpoints", "eval", "tensorboard", "metrics.jsonl", "summary.json", "run.log")
_overwrite = False  # --overwrite was given (run_command strips it before Hydra parses the command line)
_lock: IO[str] | None = None  # this process's hold on its run directory (claim_run_dir)


class RunDirTaken(ValueError):
    """The run directory holds a finished run, or another process is writing there (one sentence)."""


def run_command(argv: Sequence[str]) -> None:
    """The Hydra app with ``argv`` as its command line (after the fixes in ``app_argv``): ``gain-exp run`` and
    ``python -m gain_exp.run``. ``--overwrite`` (anywhere) lets a single run replace a finished one in its run
    directory."""
    global _overwrite
    _overwrite = OVERWRITE_FLAG in argv
    sys.argv = [sys.argv[0], *app_argv([a for a in argv if a != OVERWRITE_FLAG])]
    main()


def claim_run_dir(out_dir: Path, resume: Any = None, overwrite: bool = False, writer: bool = True) -> IO[str] | None:
    """Make ``out_dir`` this run's before anything is written there; returns the held lock (None: ``writer`` False).

    A finished run (summary.json: status completed) is refused unless this run continues it (``trainer.resume`` is
    ``auto`` or points inside ``out_dir``) or ``overwrite``; another process writing there (its ``.lock`` held) is
    refused always. With ``overwrite`` the old run's outputs (RUN_OUTPUTS) are removed once the lock is held.
    ``writer``: the process that writes the run (rank 0 under torchrun); the others only check, so none waits.
    """
    out_dir = Path(out_dir)
    if not overwrite and _finished(out_dir) and not _continues(resume, out_dir):
        raise RunDirTaken(
            f"{out_dir} already holds a finished run (summary.json: status completed), and nothing was written "
            f"there; continue that run with trainer.resume=auto, pick a new hydra.run.dir, or pass {OVERWRITE_FLAG} "
            f"to replace it."
        )
    if not writer:
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as err:  # a read-only place (or a full disk): one sentence before anything is written
        cause = write_error(err)
        if cause is None:
            raise
        raise RunDirTaken(
            f"cannot write the run directory {out_dir}: {cannot_write(out_dir / LOCK_FILE, cause).reason}, and nothing "
            f"was written there; pick a writable hydra.run.dir."
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not named itself yet"
        handle.close()
        raise RunDirTaken(
            f"{out_dir} is in use by another run ({holder}), and nothing was written there; wait for it to end, "
            f"or pick another hydra.run.dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    if overwrite:
        removed = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        for name in removed:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if removed:
            print(
                f"note: {OVERWRITE_FLAG}: removed the earlier run's {', '.join(removed)} in {out_dir}", file=sys.stderr
            )
    return handle


def _finished(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _continues(resume: Any, out_dir: Path) -> bool:
    """trainer.resume continues the run in ``out_dir`` (auto, or a checkpoint or directory inside it)."""
    if not resume:
        return False
    if str(resume) == "auto":
        return True
    try:
        Path(str(resume)).expanduser().resolve().relative_to(out_dir.resolve())
    except ValueError:
        return False
    return True


@contextmanager
def _run_dir_guard(overwrite: bool) -> Iterator[None]:
    """While the app runs, a single run (not a sweep's jobs) claims its directory (``claim_run_dir``) after Hydra has
    composed the config and before Hydra writes anything there (.hydra/, run.log): Hydra's run_job is wrapped."""
    import hydra._internal.hydra as hydra_internal

    global _lock
    real = hydra_internal.run_job

    def run_job(*args: Any, **kwargs: Any) -> Any:
        global _lock
        config = kwargs.get("config")
        if config is not None and kwargs.get("job_dir_key") and kwargs.get("job_subdir_key") is None:
            HydraConfig.instance().set_config(config)  # for ${hydra:...} in the dir's name; ${now:...} is cached
            out_dir = Path(os.path.abspath(str(OmegaConf.select(config, kwargs["job_dir_key"]))))
            resume = OmegaConf.select(config, "trainer.resume", default=None)
            writer = (launched_processes() or (0,))[0] == 0
            try:
                _lock = claim_run_dir(out_dir, resume, overwrite, writer)
            except RunDirTaken as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
        return real(*args, **kwargs)

    hydra_internal.run_job = run_job
    try:
        yield
    finally:
        hydra_internal.run_job = real
        if _lock is not None:
            _lock.close()  # releases the flock
            _lock = None


def app_argv(argv: Sequence[str]) -> list[str]:
    """The command line Hydra should see.

    - ``--config-path`` relative to the working directory (Hydra resolves it against the package otherwise).
    - The sweep recipes (``+sweep=``, ``+launcher=``, ``+setting=``) are found from any directory: without a
      ``--config-dir`` the package's ``sweeps/`` is added (``--config-dir sweeps`` as in the docs still works).
    """
    args = _saved_run(list(argv))
    for flag in ("--config-path", "-cp"):
        for i, arg in enumerate(args):
            value = None
            if arg == flag and i + 1 < len(args):
                value, at = args[i + 1], i + 1
            elif arg.startswith(flag + "="):
                value, at = arg.split("=", 1)[1], i
            if value is not None and not os.path.isabs(value) and not value.startswith("pkg://"):
                absolute = str(Path(value).resolve())
                args[at] = absolute if at != i else f"{flag}={absolute}"
    has_dir = any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")) for a in args)
    if not has_dir and SWEEPS_DIR.is_dir():
        args = ["--config-dir", str(SWEEPS_DIR), *args]
    return args


def _saved_run(args: list[str]) -> list[str]:
    """``--config-path <run>/.hydra --config-name config [overrides]`` -> that run's saved job plus the overrides.

    Hydra would compose the saved config.yaml on its own, losing the group choices (run names, summary, W&B) and the
    hydra: block; the saved overrides recompose the job exactly (what ``gain-exp reproduce`` runs too). The saved job
    is checked first (runs.trust, docs/trust.md: exit 2 with one sentence); ``--trust`` skips the check.
    """
    value, drop = None, set()
    for i, arg in enumerate(args):
        for flag in ("--config-path", "-cp", "--config-name", "-cn"):
            if arg == flag and i + 1 < len(args):
                drop |= {i, i + 1}
                if flag in ("--config-path", "-cp"):
                    value = args[i + 1]
            elif arg.startswith(flag + "="):
                drop.add(i)
                if flag in ("--config-path", "-cp"):
                    value = arg.split("=", 1)[1]
    saved = Path(value) if value else None
    if saved is None or not (saved / "hydra.yaml").is_file() or not (saved / "overrides.yaml").is_file():
        return args
    if TRUST_FLAG not in args:
        try:
            check_run_dir(saved.resolve().parent)
        except Untrusted as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    drop |= {i for i, arg in enumerate(args) if arg == TRUST_FLAG}
    job = saved_job(saved.resolve().parent)
    print(
        f"note: re-running the job saved in {saved.parent} with its overrides (`gain-exp reproduce "
        f"{saved.parent}` also compares the numbers)",
        file=sys.stderr,
    )
    if job.threads and job.threads != torch.get_num_threads():
        # CPU results are bit-identical only at one thread count: use the saved one, as gain-exp reproduce does
        print(
            f"note: using the run's {job.threads} torch thread(s), not this machine's {torch.get_num_threads()}, so "
            f"its numbers come out the same",
            file=sys.stderr,
        )
        torch.set_num_threads(job.threads)
    return job.app_args([a for i, a in enumerate(args) if i not in drop])


def train(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the summary that is also written to summary.json
    (``RunSummary`` keeps it right whichever way the run ends)."""
    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    with RunSummary(out_dir, cfg) as run:
        plan = make_plan(cfg)  # every check that needs no data, every auto resolved: one sentence if anything is off
        runtime = init_runtime(plan.device)
        if not runtime.is_main:  # progress is the main process's to report; warnings and errors still show
            log.setLevel(logging.WARNING)
        if runtime.is_main:
            for stale in remove_stale_temps(out_dir / "checkpoints"):
                log.info("removed %s, a partial checkpoint from a killed run", stale)
        seed_everything(plan.seed)
        experiment = build_experiment(plan, runtime, lambda m: sync_batch_norm(m, plan.trainer.sync_bn, runtime))
        run.record = record = run_record(cfg)
        run_config = {
            **resolved(cfg),
            "choices": record["choices"],
            "overrides": record["overrides"],
            "provenance": {k: record[k] for k in ("git", "versions", "threads", "command")},
        }
        run.tracker = (
            build_tracker(cfg.logger, out_dir, run_config, resume=saved_tracking(plan.trainer.resume, out_dir))
            if runtime.is_main
            else Trackers([])
        )  # one record of the run, by the main process
        run.trainer = Trainer(experiment, out_dir, run.tracker, record={**record, "config": resolved(cfg)})
        return run.completed(run.trainer.fit())


def sync_batch_norm(model: torch.nn.Module, wanted: bool, runtime: Runtime) -> torch.nn.Module:
    """trainer.sync_bn: batch-norm statistics over every process's share of the batch (CUDA only)."""
    if not wanted or not runtime.distributed:
        return model
    if runtime.device.type != "cuda":
        log.warning(
            "trainer.sync_bn=true needs CUDA (SyncBatchNorm refuses CPU tensors); on %s each process keeps "
            "batch-norm statistics over its own share of the batch",
            runtime.device,
        )
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def seed_everything(seed: int) -> None:
    """Python, NumPy (if present) and torch RNGs from one seed."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: runs one job and returns its optimisation metric (for sweepers)."""
    out_dir = HydraConfig.get().runtime.output_dir
    _quiet_log_files()
    try:
        summary = train(cfg)
    except USER_ERRORS as err:
        _fail(f"error: {err}", 2)
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
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _fail(f"error: training diverged: {err}", None)
            return math.nan  # the other jobs of the sweep go on; sweepers read NaN as a failed trial
        _fail(f"error: training diverged: {err}", 3)
    value = summary["final"].get(summary["optimize_metric"])
    if (launched_processes() or (0,))[0] == 0:  # the main process reports
        print(final_report(summary, Path(out_dir)))
    return value


def _quiet_log_files() -> None:
    """run.log that cannot be written (a full disk): one warning, then the log goes on on the console only, instead of
    logging's traceback for every record."""

    def failed(handler: logging.Handler, record: logging.LogRecord) -> None:
        cause = write_error(sys.exc_info()[1])
        if cause is None:
            return logging.Handler.handleError(handler, record)
        logging.getLogger().removeHandler(handler)
        where = getattr(handler, "baseFilename", "the log file")
        print(
            f"warning: {where} is no longer written ({os.strerror(cause.errno).lower()}); the log goes on here only",
            file=sys.stderr,
        )

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = lambda record, handler=handler: failed(handler, record)  # type: ignore[method-assign]


def _fail(sentence: str, status: int | None) -> None:
    """``sentence`` once on the console (stderr) and once in the run's log file, then exit with ``status``."""
    print(sentence, file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (sentence,), None)
    for handler in logging.getLogger().handlers:  # Hydra's job logging: a console handler and run.log
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    if status is not None:
        sys.exit(status)


_hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)


def main() -> float | None:
    """Command-line entry: the Hydra app, with composition errors printed as one ``error:`` sentence (exit 2)."""
    if launched_processes() is not None:  # torchrun: every process names the run dir with rank 0's ${now:...}
        share_start_time()
    try:
        with _run_dir_guard(_overwrite):
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
        cause = write_error(err) if sentence is None else None
        if cause is not None:  # Hydra creating a sweep's folder or a job's .hydra/ in a read-only place, a full disk
            where = cause.filename or "the output folder"
            sentence = f"cannot write {where} ({os.strerror(cause.errno).lower()}); pick a writable hydra.run.dir (hydra.sweep.dir with -m)."
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
    run_command(sys.argv[1:])  # the same command-line fixes as `gain-exp run` (relative --config-path, sweep recipes)
