"""Tracking backends: W&B offline runs read back from disk, multirun groups, TensorBoard events, failure isolation."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import ROOT, compose, tiny_overrides
from gain_exp import run as app
from gain_exp.tracking import JsonTracker, Tracker, Trackers, build_tracker
from gain_exp.tracking.wandb import WandbTracker, _run_name, wandb_mode
from wandb_offline import offline_runs

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like an API key; must never reach the disk


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path, monkeypatch):
    """Every W&B file of a test under tmp_path, offline, with no credentials from the host."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb

    wandb.teardown()  # flushes the run files before the next test reads its own


def _one_epoch(tmp_path: Path, *extra: str) -> list[str]:
    return tiny_overrides(tmp_path) + ["trainer.epochs=1", "dataset.n_train=16", *extra]


def test_wandb_offline_run_holds_metrics_config_images_table_and_checkpoint(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    out = tmp_path / "run"
    summary = app.train(compose(_one_epoch(tmp_path, "logger=wandb", "logger.wandb.mode=offline",
                                           "logger.wandb.log_checkpoint=true", "logger.wandb.tags=[paper]")), out_dir=out)
    wandb.teardown()
    assert "wandb sync " + str(out / "wandb") in capsys.readouterr().out

    [run] = offline_runs(out / "wandb")
    assert run.name == "run" and run.job_type == "train" and run.tags == ["paper"] and run.group == ""
    assert run.config["gain"]["sigma"] == 0.5 and run.config["logger"]["wandb"]["project"] == "gain-exp"
    keys = run.history_keys()
    assert {"train/loss", "train/loss_cl", "train/loss_am", "train/lr", "val/acc", "val/loc_iou",
            "test_unbiased/acc", "test_biased/acc"} <= keys
    assert {"val/attention/all_masks", "val/panels/filenames", "test_unbiased/results/path"} <= keys
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(steps)  # nothing was dropped for going back in time
    final = summary["final"]
    assert run.summary["test_unbiased/acc"] == pytest.approx(final["test_unbiased/acc"])
    assert run.summary["best/value"] == summary["best"]["value"] and run.summary["status"] == "completed"
    assert f"model-{run.run_id}" in run.artifacts

    masks = next(row["val/attention/all_masks"] for row in run.history if "val/attention/all_masks" in row)
    assert len(masks) == 2 and {"attention", "ground_truth"} <= set(masks[0])
    images = list((run.files / "media" / "images").rglob("*.png"))
    assert len([p for p in images if p.name.endswith(".mask.png")]) >= 4 and len(images) >= 10
    tables = list((run.files / "media" / "table").rglob("*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["index", "image", "true", "pred", "explained", "score", "am_drop", "iou"]
    assert len(table["data"]) == 16  # every test image (table_images >= n_test)

    rows = [json.loads(line) for line in (out / "results" / "test_unbiased.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]) == {"index", "true", "pred", "explained", "score", "am_drop", "iou"}
    assert [r["index"] for r in rows] == list(range(16))
    for path in out.rglob("*"):
        assert not path.is_file() or FAKE_KEY.encode() not in path.read_bytes(), path


def test_multirun_in_one_process_gives_one_wandb_run_per_job_in_one_group(tmp_path, hydra_sweep_runner,
                                                                          hydra_restore_singletons):
    import wandb

    sweep_dir = tmp_path / "my_sweep"
    overrides = _one_epoch(tmp_path, "logger=wandb", "seed=0,1")
    runner = hydra_sweep_runner(calling_file=str(ROOT / "gain_exp" / "run.py"), calling_module=None,
                                task_function=app.task, config_path="../conf", config_name="config",
                                overrides=overrides, temp_dir=sweep_dir)
    with runner:  # the runner deletes its sweep dir on exit
        wandb.teardown()
        runs = offline_runs(sweep_dir)
        assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
        assert {r.group for r in runs} == {"my_sweep"}
        assert sorted(r.name for r in runs) == ["seed=0", "seed=1"]
        for job, wb in zip(("0", "1"), runs):
            summary = json.loads((sweep_dir / job / "summary.json").read_text())
            assert wb.summary["val/acc"] == pytest.approx(summary["final"]["val/acc"])
            assert wb.config["seed"] == summary["seed"] and wb.config["choices"]["loss"] == "gain_ext"
            assert len([row for row in wb.history if "val/acc" in row]) == 1  # no metrics merged across jobs


class Exploding(Tracker):
    """A backend that fails on every call."""

    def log_metrics(self, metrics, step):
        raise RuntimeError("backend down")

    def finish(self, summary):
        raise RuntimeError("backend down")


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """One tiny run logging to TensorBoard with an extra backend that raises on every call."""
    tmp = tmp_path_factory.mktemp("tb")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("gain_exp.tracking").addHandler(handler)
    real = app.build_tracker
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "build_tracker", lambda *a, **k: Trackers([*real(*a, **k).backends, Exploding()]))
        summary = app.train(compose(_one_epoch(tmp, "logger=tensorboard")), out_dir=tmp / "run")
    logging.getLogger("gain_exp.tracking").removeHandler(handler)
    return tmp / "run", summary, [r.getMessage() for r in records]


def test_tensorboard_writes_scalars_and_panel_images(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tensorboard_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_am", "train/lr", "val/acc", "val/loc_iou", "test_unbiased/acc"} <= scalars
    assert {"val/panel_0", "val/panel_1", "test_unbiased/panel_0"} <= set(events.Tags()["images"])
    image = events.Images("val/panel_0")[0]
    assert image.width > 5 * 32 and image.height >= 32


def test_a_raising_backend_is_dropped_with_one_warning_and_training_completes(tensorboard_run):
    out, summary, messages = tensorboard_run
    assert summary["status"] == "completed" and (out / "summary.json").is_file()
    dropped = [m for m in messages if "Exploding failed" in m]
    assert len(dropped) == 1 and "backend down" in dropped[0]
    assert (out / "results" / "test_biased.jsonl").is_file()


def test_trackers_raise_a_required_backends_error_after_closing_the_others(tmp_path):
    closed = []

    class Closing(Tracker):
        def finish(self, summary):
            closed.append(True)

    class BrokenJson(JsonTracker):
        def finish(self, summary):
            super().finish(summary)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        Trackers([BrokenJson(tmp_path), Closing()]).finish({})
    assert closed == [True]


def test_wandb_that_cannot_start_warns_once_and_turns_itself_off(tmp_path, monkeypatch, caplog):
    import wandb

    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose(["logger=wandb"]).logger
    with caplog.at_level(logging.WARNING, logger="gain_exp.tracking"):
        tracker = build_tracker(cfg, tmp_path, {"seed": 0})
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.log_table("test", [])
        tracker.finish({"status": "completed", "final": {}})
    [backend] = [b for b in tracker.backends if isinstance(b, WandbTracker)]
    assert backend.run is None
    assert len(caplog.records) == 1 and "api.wandb.ai unreachable" in caplog.records[0].getMessage()


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    assert wandb_mode("disabled") == "disabled" and wandb_mode("online") == "online"
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode=cloud is unknown; use auto, online, offline or disabled"):
        wandb_mode("cloud")
    assert wandb_mode("auto") == "offline"  # WANDB_MODE=offline from the sandbox
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"  # no key anywhere
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    (tmp_path / "no_netrc").write_text(f"machine wandb.example.org login user password {FAKE_KEY}\n")
    assert wandb_mode("auto") == "online"


def test_run_names_come_from_the_swept_overrides():
    overrides = ["+sweep=paper_table", "+setting=gain", "seed=1", "dataset.root=/tmp/x", "hydra.verbose=true"]
    assert _run_name(overrides, {"setting", "seed"}) == "setting=gain,seed=1"
    assert _run_name(overrides, None) == "setting=gain,seed=1,dataset.root=/tmp/x"
    assert _run_name([], None) is None


def test_a_backend_without_target_and_a_bad_panel_interval_are_one_sentence_errors(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match=r"logger\.mlflow has no _target_"):
        build_tracker(OmegaConf.create({"mlflow": {"uri": "x"}}), tmp_path, {})
    cfg = compose(["logger=tensorboard", "logger.tensorboard.panel_every=0"]).logger
    with pytest.raises(ValueError, match=r"logger\.tensorboard\.panel_every=0 must be >= 1"):
        build_tracker(cfg, tmp_path, {})


def test_a_new_backend_is_one_class_named_by_target_and_backends_compose(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose(["logger=[tensorboard,json]"]).logger
    assert list(cfg) == ["tensorboard"]
    node = OmegaConf.create({"mine": {"_target_": f"{__name__}.Recording", "tag": "x"}})
    tracker = build_tracker(node, tmp_path, {"seed": 3}, resume={"mine": {"count": 2}})
    [_, mine] = tracker.backends
    tracker.log_metrics({"val/acc": 0.5}, 1)
    assert mine.seen == [({"val/acc": 0.5}, 1)] and mine.tag == "x" and mine.resumed == {"count": 2}
    assert tracker.state() == {"mine": {"count": 3}}
    tracker.finish({})


class Recording(Tracker):
    """A minimal backend built from a _target_ (what an MLflow backend would look like)."""

    def __init__(self, out_dir, run_config, resume=None, tag=""):
        self.tag, self.resumed, self.seen = tag, resume, []

    def log_metrics(self, metrics, step):
        self.seen.append((metrics, step))

    def state(self):
        return {"count": (self.resumed or {}).get("count", 0) + len(self.seen)}
