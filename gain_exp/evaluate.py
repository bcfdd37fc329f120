"""Evaluate a saved run again without retraining:

    python -m gain_exp.evaluate RUN_DIR [--split NAME ...] [--checkpoint best|last|FILE] [--device D] [--panels N]
                                [--out DIR] [--threads N] [--no-wandb] [--trust] [key=value ...]

Loads the run's config (its own overrides, then the ones given here, e.g. ``dataset.root=/other/folder``) and the
checkpoint its test splits were scored with, scores the named splits (default: the dataset's test splits; ``val`` and
``train`` by name) and writes, under ``RUN_DIR/eval/`` (or ``--out``): ``<split>.json`` (the metrics under the names
the run uses, ``<split>/<metric>``, and which weights, overrides, device and time), ``<split>_images.jsonl`` (one
results row per image) and, with ``--panels N``, ``attention/<split>.png``. A run with a W&B run id gets the metrics
as ``eval/<split>/<metric>`` in that run. With the run's checkpoint, config and thread count the metrics equal the
run's own test metrics in summary.json exactly. A run directory from someone else is checked before its config is
composed (docs/trust.md); ``--trust`` skips the check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import OmegaConf

from gain_exp.core.faithfulness import randomisation_check
from gain_exp.output.files import CannotWrite, atomic_write, jsonable, write_json
from gain_exp.output.panels import save_panels
from gain_exp.runs.reload import checkpoint_record, choose_splits, load_checked
from gain_exp.runs.rundir import run_threads, wandb_state
from gain_exp.runs.trust import TRUST_FLAG, TRUST_HELP
from gain_exp.tracking.wandb import wandb_mode
from gain_exp.train.engine import build_evaluator
from gain_exp.train.evaluation import Evaluation
from gain_exp.train.experiment import Experiment
from gain_exp.train.signals import stop_signals

SHOWN_DIGITS = 4
INTERRUPTED = "interrupted.json"  # in the output folder of an evaluation a stop signal cut short


@dataclass
class SplitResult:
    """One evaluated split: its metrics, per-image rows, the files written and the record in ``<split>.json``."""

    split: str
    evaluation: Evaluation
    record: dict[str, Any]
    files: list[Path]


def evaluate_run(
    run_dir: str | os.PathLike,
    splits: Sequence[str] | None = None,
    checkpoint: str | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    panels: int = 0,
    out: str | os.PathLike | None = None,
    threads: int | None = None,
    wandb: bool = True,
    sanity: int = 0,
    trust: bool = False,
) -> list[SplitResult]:
    """Score ``splits`` of a saved run with one of its checkpoints and write the results under ``out``
    (default ``run_dir/eval``). ``threads``: torch's CPU thread count while scoring; None: on the CPU the run's
    own (CPU results are bit-identical only at one count), 0: as it is. ``sanity`` > 0: also the cascading
    randomisation check on the first ``sanity`` images of the first split, written to ``sanity.json``. ``trust``: compose
    the run's saved job without the trust check (runs.trust)."""
    run_dir = Path(run_dir)
    if panels < 0:
        raise ValueError(f"--panels {panels}: give a number of attention panels >= 0 (0 writes none).")
    if sanity < 0:
        raise ValueError(f"--sanity {sanity}: give a number of images >= 0 (0 skips the randomisation check).")
    experiment = load_checked(run_dir, checkpoint, overrides, device, trust)
    datasets = choose_splits(experiment, splits)
    out_dir = Path(out) if out is not None else run_dir / "eval"
    weights = checkpoint_record(experiment.checkpoint)
    before = torch.get_num_threads()
    if threads is None and experiment.runtime.device.type == "cpu":
        threads = run_threads(run_dir)
    if threads:
        torch.set_num_threads(threads)
    results: list[SplitResult] = []
    try:
        evaluator = build_evaluator(experiment)
        for name, dataset in datasets.items():
            # as in training: val gets the every-epoch explanation metrics, the other splits the test ones too
            evaluation = evaluator.evaluate(
                dataset, name, panels=panels, rows=True, stage="epoch" if name == "val" else "test"
            )
            record = {
                "split": name,
                "images": len(dataset),
                "metrics": {k: jsonable(v) for k, v in evaluation.metrics.items()},
                "checkpoint": weights,
                "run_dir": str(run_dir.resolve()),
                "overrides": list(overrides),
                "dataset": OmegaConf.to_container(experiment.cfg.dataset, resolve=True),
                "device": str(experiment.runtime.device),
                "threads": torch.get_num_threads(),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            results.append(SplitResult(name, evaluation, record, write_split(out_dir, record, evaluation)))
        if sanity:
            name, dataset = next(iter(datasets.items()))
            curve = sanity_check(experiment, dataset, sanity)
            write_json(
                out_dir / "sanity.json",
                {
                    "split": name,
                    "images": min(sanity, len(dataset)),
                    "similarity": "spearman",
                    "checkpoint": weights,
                    "curve": curve,
                },
            )
            results[0].files.append(out_dir / "sanity.json")
    except Stopped as stop:  # what was scored is written; the marker says what was not
        stop.scored, stop.out = [r.split for r in results], out_dir
        missing = [n for n in datasets if n not in stop.scored] + (["sanity"] if sanity else [])
        write_json(
            out_dir / INTERRUPTED,
            {
                "stopped_by": signal.Signals(stop.signum).name,
                "scored": stop.scored,
                "not_scored": missing,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        raise
    finally:
        torch.set_num_threads(before)
    (out_dir / INTERRUPTED).unlink(missing_ok=True)  # an earlier stopped evaluation's marker: this one is whole
    if wandb:
        log_to_run_wandb(run_dir, experiment, results)
    return results


class Stopped(Exception):
    """A stop signal (Ctrl-C, SIGTERM) arrived during the evaluation; ``scored``: the splits written before it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.scored: list[str] = []
        self.out: Path | None = None


@contextmanager
def stops_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise ``Stopped`` in the main thread while the block runs (the DataLoader workers ignore
    them: train.signals)."""

    def handler(signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in stop_signals()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def sanity_check(experiment: Experiment, dataset: Any, images: int) -> list[dict[str, Any]]:
    """Cascading randomisation (faithfulness.randomisation_check) on the first ``images`` images of ``dataset``,
    explaining their true classes: [{"reinitialised": group, "spearman": mean similarity}, ...], top layer first."""
    from torch.utils.data import default_collate

    batch = default_collate([dataset[i] for i in range(min(images, len(dataset)))])
    device = experiment.runtime.device
    curve = randomisation_check(experiment.gain, batch["image"].to(device), batch["target"].to(device))
    return [{"reinitialised": group, "spearman": jsonable(value)} for group, value in curve]


def write_split(out_dir: Path, record: dict[str, Any], evaluation: Evaluation) -> list[Path]:
    """``<split>.json``, ``<split>_images.jsonl`` and (with panels) ``attention/<split>.png``, each atomically."""
    split = record["split"]
    summary, images = out_dir / f"{split}.json", out_dir / f"{split}_images.jsonl"
    with atomic_write(images) as f:
        f.write("".join(json.dumps(row) + "\n" for row in evaluation.rows or []).encode())
    write_json(summary, {**record, "images_file": images.name})
    written = [summary, images]
    if evaluation.panels:
        png = out_dir / "attention" / f"{split}.png"
        save_panels([p.strip for p in evaluation.panels], png)
        written.append(png)
    return written


def log_to_run_wandb(run_dir: Path, experiment: Experiment, results: Sequence[SplitResult]) -> str | None:
    """The metrics as ``eval/<split>/<metric>`` in the run's own W&B run (resumed by id, in the mode its
    ``logger.wandb`` gives, files under the run directory), after the last step it logged; returns the run id, or
    None when the run has no W&B run. W&B trouble is a warning: the JSON files are already written."""
    state = wandb_state(run_dir)
    if not state.get("run_id"):
        return None
    node = (experiment.cfg.get("logger") or {}).get("wandb") or {}
    mode = wandb_mode(node.get("mode", "auto"), run_dir / "wandb")
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(
            id=state["run_id"],
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            project=node.get("project") or "gain-exp",
            entity=node.get("entity"),
            reinit="finish_previous",
        )
        step = max(int(state.get("step", -1)) + 1, int(getattr(run, "starting_step", 0) or 0))
        values = {
            f"eval/{k}": v for r in results for k, v in r.evaluation.metrics.items() if isinstance(v, (int, float))
        }
        run.log(values, step=step)
        for r in results:
            run.summary[f"eval/{r.split}/checkpoint"] = r.record["checkpoint"]["name"]
        run.finish()
    except Exception as err:  # noqa: BLE001 - the evaluation's files are its record; W&B is a copy
        print(
            f"warning: could not log to the run's W&B run {state['run_id']} ({type(err).__name__}: {err}); the "
            f"results are in the JSON files.",
            file=sys.stderr,
        )
        return None
    if mode == "offline":
        print(f"W&B: logged offline to run {state['run_id']}; upload with: wandb sync {Path(run.dir).parent}")
    return state["run_id"]


def metrics_table(results: Sequence[SplitResult]) -> str:
    """The splits' headline metrics (``<split>/<name>`` without per-class ones) as a plain-text table."""
    names: list[str] = []
    for r in results:
        for key in r.evaluation.metrics:
            name = key.split("/", 1)[1]
            if "/" not in name and name not in names:
                names.append(name)
    head = ["metric", *(r.split for r in results)]
    rows = [[name, *(_show(r.evaluation.metrics.get(f"{r.split}/{name}")) for r in results)] for name in names]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [head, *rows]
    )


def _show(value: Any) -> str:
    value = jsonable(value)
    if value is None:
        return "-"
    return f"{value:.{SHOWN_DIGITS}f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status (2: a one-sentence ``error:`` on stderr)."""
    description = __doc__.strip().splitlines()[0].rstrip(":") + "."
    parser = argparse.ArgumentParser(prog="python -m gain_exp.evaluate", description=description)
    parser.add_argument("run_dir", type=Path, help="a run directory written by python -m gain_exp.run")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the run's own (e.g. dataset.root=...)")
    parser.add_argument(
        "--split",
        action="append",
        default=None,
        metavar="NAME",
        help="a split to score (repeat, or comma-separate); default: the dataset's test splits",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="best|last|FILE",
        help="the weights (default: the checkpoint the run's tests used)",
    )
    parser.add_argument(
        "--device", default=None, metavar="D", help="cpu, cuda, cuda:1, ... (default: the run's trainer.device)"
    )
    parser.add_argument("--panels", type=int, default=0, metavar="N", help="attention panels of the first N images")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="where the results go (default: RUN_DIR/eval)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default on the CPU: the run's own count, so the numbers match it; 0: torch's)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    parser.add_argument(
        "--sanity",
        type=int,
        default=0,
        metavar="N",
        help="also the cascading randomisation check (Adebayo et al. 2018) on the first N images of "
        "the first split: Spearman similarity of the maps as layers are re-initialised from the "
        "top (sanity.json)",
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_intermixed_args(argv)
    splits = [s for item in args.split or [] for s in item.split(",") if s] or None
    bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
    try:
        if bad:
            raise ValueError(
                f"{bad[0]}: not an override; give overrides as key=value after the run directory "
                f"(e.g. dataset.root=/other/folder)."
            )
        with stops_raise():
            results = evaluate_run(
                args.run_dir,
                splits,
                args.checkpoint,
                args.overrides,
                args.device,
                args.panels,
                args.out,
                args.threads,
                wandb=not args.no_wandb,
                sanity=args.sanity,
                trust=args.trust,
            )
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the cause quoted
        return 2
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        if stop.out is None:
            print(f"stopped: {name} before anything was scored; nothing was written.", file=sys.stderr)
        else:
            print(
                f"stopped: {name} during the evaluation; {len(stop.scored)} split(s) were scored and written to "
                f"{stop.out} ({', '.join(stop.scored) or 'none'}), the rest were not (listed in "
                f"{stop.out / INTERRUPTED}); run it again to score them.",
                file=sys.stderr,
            )
        return 130
    weights = results[0].record["checkpoint"]
    epoch = "" if weights["epoch"] is None else f" (epoch {weights['epoch']})"
    print(f"{weights['name']} checkpoint{epoch} of {args.run_dir}")
    print(metrics_table(results))
    if args.sanity:
        curve = json.loads((results[0].files[-1]).read_text())["curve"]
        print(
            "randomisation check (Spearman similarity to the trained model's maps, layers re-initialised from the "
            "top): " + ", ".join(f"{c['reinitialised']} {c['spearman']:.3f}" for c in curve)
        )
    print(f"results in {results[0].files[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
