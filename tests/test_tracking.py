"""Tracking backends: W&B offline runs read back from disk, multirun groups, TensorBoard events, failure isolation."""

from __future__ import annotations

import http.server
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose, tiny_overrides
from wandb_offline import offline_runs

from gain_exp import run as app
from gain_exp.tracking import JsonTracker, Tracker, Trackers, build_tracker
from gain_exp.tracking import wandb as wandb_backend
from gain_exp.tracking.wandb import WandbTracker, _probe, _run_name, wandb_mode

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like an API key; must never reach the disk


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path, monkeypatch):
    """Every W&B file of a test under tmp_path, offline, with no credentials from the host."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wandb_backend, "_PROBES", {})  # each test probes the server afresh
    yield
    import wandb

    wandb.teardown()  # flushes the run files before the next test reads its own


def _one_epoch(tmp_path: Path, *extra: str) -> list[str]:
    return tiny_overrides(tmp_path) + ["trainer.epochs=1", "dataset.n_train=16", *extra]


def test_wandb_offline_run_holds_metrics_config_images_table_and_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    out = tmp_path / "run"
    summary = app.train(
        compose(
            _one_epoch(
                tmp_path,
                "logger=wandb",
                "logger.wandb.mode=offline",
                "logger.wandb.log_checkpoint=true",
                "logger.wandb.tags=[paper]",
            )
        ),
        out_dir=out,
    )
    assert "wandb sync " + str(out / "wandb") in capsys.readouterr().out

    [run] = offline_runs(out / "wandb")
    assert run.name == "run" and run.job_type == "train" and run.tags == ["paper"] and run.group == ""
    assert run.config["gain"]["sigma"] == 0.5 and run.config["logger"]["wandb"]["project"] == "gain-exp"
    keys = run.history_keys()
    assert {
        "train/loss",
        "train/loss_cl",
        "train/loss_am",
        "train/lr",
        "val/acc",
        "val/loc_iou",
        "test_unbiased/acc",
        "test_biased/acc",
    } <= keys
    assert {"val/attention/all_masks", "val/panels/filenames", "test_unbiased/results/path"} <= keys
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(steps)  # nothing was dropped for going back in time
    final = summary["final"]
    assert run.metrics["val/acc"].step_metric == "epoch" and run.metrics["test_unbiased/acc"].step_metric == "epoch"
    assert run.summary["test_unbiased/acc"] == {"max": pytest.approx(final["test_unbiased/acc"])}
    assert run.summary["val/acc"] == {"max": pytest.approx(summary["best"]["value"])}  # one epoch: it is the best
    [test_row] = [row for row in run.history if "test_unbiased/acc" in row]
    assert test_row["epoch"] == 0  # the test metrics sit on the epoch axis at the last epoch
    assert not any(k.startswith("best/") for k in run.summary) and run.summary["status"] == "completed"
    assert f"model-{run.run_id}" in run.artifacts
    assert run.config["provenance"]["git"] == summary["git"] and run.config["overrides"] == summary["overrides"]
    assert run.config["provenance"]["command"] == summary["command"] and run.config["choices"] == summary["choices"]

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


@pytest.mark.slow
def test_multirun_in_one_process_gives_one_wandb_run_per_job_in_one_group(
    tmp_path, hydra_sweep_runner, hydra_restore_singletons
):
    sweep_dir = tmp_path / "my_sweep"
    overrides = _one_epoch(tmp_path, "logger=wandb", "seed=0,1")
    runner = hydra_sweep_runner(
        calling_file=str(ROOT / "gain_exp" / "run.py"),
        calling_module=None,
        task_function=app.task,
        config_path="../conf",
        config_name="config",
        overrides=overrides,
        temp_dir=sweep_dir,
    )
    with runner:  # the runner deletes its sweep dir on exit
        runs = offline_runs(sweep_dir)
        assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
        assert {r.group for r in runs} == {"my_sweep"}
        assert sorted(r.name for r in runs) == ["seed=0", "seed=1"]
        for job, wb in zip(("0", "1"), runs):
            summary = json.loads((sweep_dir / job / "summary.json").read_text())
            assert wb.summary["val/acc"] == {"max": pytest.approx(summary["final"]["val/acc"])}
            assert wb.config["seed"] == summary["seed"] and wb.config["choices"]["loss"] == "gain_ext"
            assert len([row for row in wb.history if "val/acc" in row]) == 1  # no metrics merged across jobs


def _epoch_record(epoch: int, acc: float, loss_cl: float) -> dict[str, float]:
    """What the engine logs after an epoch: the epoch, train means and the val metrics."""
    return {
        "epoch": epoch,
        "train/mean_loss": loss_cl + 0.1,
        "val/acc": acc,
        "val/loss_cl": loss_cl,
        "val/loc_iou": acc / 2,
        "val/am_drop": 0.1,
    }


def _read_back(out: Path):
    return offline_runs(out)  # tears W&B down first: flushes the .wandb file


def test_wandb_charts_epoch_metrics_on_epochs_and_summarises_each_by_its_best_epoch(tmp_path):
    tracker = WandbTracker(tmp_path / "run", {"seed": 0}, mode="offline")
    accs, losses = [0.5, 0.8, 0.6], [0.9, 0.4, 0.7]  # the best epoch (1) is neither the first nor the last
    for epoch, (acc, loss) in enumerate(zip(accs, losses)):
        for step in range(2 * epoch + 1, 2 * epoch + 3):
            tracker.log_metrics({"epoch": epoch, "train/loss": float(step), "train/lr": 0.1}, step)
        tracker.log_metrics(_epoch_record(epoch, acc, loss), 2 * epoch + 2)
    tracker.log_metrics({"test_biased/acc": 0.7, "test_biased/loss_cl": 0.5}, 6)
    tracker.finish({"status": "completed", "final": {"val/acc": 0.6}, "best": {"metric": "val/acc", "value": 0.8}})

    [run] = _read_back(tmp_path / "run")
    for key in ("val/acc", "val/loc_iou", "test_biased/acc"):
        assert run.metrics[key].step_metric == "epoch" and run.metrics[key].summary == {"max"}, key
    for key in ("val/loss_cl", "train/mean_loss", "test_biased/loss_cl"):
        assert run.metrics[key].step_metric == "epoch" and run.metrics[key].summary == {"min"}, key
    assert run.metrics["val/am_drop"].summary == set() and "train/loss" not in run.metrics  # last value, global step
    assert run.summary["val/acc"] == {"max": 0.8} and run.summary["val/loss_cl"] == {"min": 0.4}
    assert run.summary["train/mean_loss"] == {"min": pytest.approx(0.5)} and run.summary["train/loss"] == 6
    assert run.summary["val/am_drop"] == 0.1 and run.summary["status"] == "completed"
    assert not any(k.startswith("best/") for k in run.summary)
    [test_row] = [row for row in run.history if "test_biased/acc" in row]
    assert test_row["epoch"] == 2 and test_row["_step"] == 6


def test_nan_and_inf_metrics_are_logged_and_a_diverged_run_keeps_no_stale_finite_summary(tmp_path):
    tracker = WandbTracker(tmp_path / "run", {}, mode="offline")
    tracker.log_metrics({"epoch": 0, "train/loss": 0.5}, 1)
    tracker.log_metrics(_epoch_record(0, 0.7, 0.4), 1)
    tracker.log_metrics({"epoch": 1, "train/loss": math.inf}, 2)
    tracker.log_metrics(_epoch_record(1, math.nan, math.nan), 2)
    tracker.finish({"status": "completed", "final": {}})

    [run] = _read_back(tmp_path / "run")
    last = run.history[-1]
    assert last["train/loss"] == math.inf and math.isnan(last["val/acc"]) and math.isnan(last["val/loss_cl"])
    assert run.summary["train/loss"] == math.inf
    assert math.isnan(run.summary["val/acc"]["max"]) and math.isnan(run.summary["val/loss_cl"]["min"])


def test_a_resumed_job_continues_the_same_wandb_run_without_repeating_steps(tmp_path):
    first = WandbTracker(tmp_path / "run", {"seed": 0}, mode="offline")
    for step in (1, 2):
        first.log_metrics({"epoch": 0, "train/loss": float(step)}, step)
    first.log_metrics(_epoch_record(0, 0.5, 0.9), 2)
    first.log_metrics({"epoch": 1, "train/loss": 3.0}, 3)  # interrupted right after this step
    first.finish({"status": "interrupted", "final": {}})
    state = first.state()
    assert state["step"] == 3 and state["epoch"] == 1 and state["run_id"]

    second = WandbTracker(tmp_path / "run", {"seed": 0}, resume=state, mode="offline")
    second.log_metrics({"epoch": 1, "train/loss": 3.5}, 3)  # step 3 again: W&B already has it
    second.log_metrics(_epoch_record(1, 0.8, 0.4), 3)  # the epoch ended at the interruption point: not yet sent
    for step in (4, 5):
        second.log_metrics({"epoch": 2, "train/loss": float(step)}, step)
    second.log_metrics(_epoch_record(2, 0.6, 0.7), 5)
    second.finish({"status": "completed", "final": {}})
    assert second.state()["run_id"] == state["run_id"]

    before, after = _read_back(tmp_path / "run")
    assert before.run_id == after.run_id == state["run_id"]
    steps = [row["_step"] for run in (before, after) for row in run.history]
    assert steps == sorted(set(steps)) and min(row["_step"] for row in after.history) == 4
    history = before.history + after.history
    assert [row["train/loss"] for row in history if "train/loss" in row] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [(row["epoch"], row["val/acc"]) for row in history if "val/acc" in row] == [(0, 0.5), (1, 0.8), (2, 0.6)]
    assert after.metrics["val/acc"].summary == {"max"}  # the resumed process defines its metrics again


def _agent_env(monkeypatch, tmp_path: Path, params: dict[str, object], run_id: str) -> None:
    """The environment `wandb agent` gives a job: sweep id, run id and its parameters in a config file."""
    path = tmp_path / "wandb" / "sweep-abc123" / f"config-{run_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in params.items()}}, sort_keys=False)
    )
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(path))


def test_a_wandb_sweep_parameter_naming_a_config_section_does_not_clobber_it(tmp_path, monkeypatch, caplog):
    import wandb

    from gain_exp.train.provenance import resolved

    run_config = {**resolved(compose(["loss=gain", "loss.am_weight=2.5"])), "choices": {"loss": "gain"}}
    _agent_env(monkeypatch, tmp_path, {"loss": "gain", "loss.am_weight": 2.5}, "agentrun1")
    with caplog.at_level(logging.WARNING, logger="gain_exp.tracking"):
        tracker = WandbTracker(tmp_path / "bad", run_config, mode="offline")
        tracker.log_metrics({"epoch": 0, "val/acc": 0.5}, 1)
        tracker.finish({"status": "completed"})
    [run] = _read_back(tmp_path / "bad")
    assert run.run_id == "agentrun1" and run.config["loss.am_weight"] == 2.5  # the agent's values arrived
    assert run.config["loss"]["am_weight"] == 2.5 and run.config["loss"] == run_config["loss"]
    assert run.config["choices"]["loss"] == "gain"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "gain_exp.tracking"]
    assert "loss" in warning and "+setting" in warning

    # The shipped sweep spec: its parameters are never sections, so nothing needs restoring.
    wandb.teardown()
    caplog.clear()
    spec = yaml.safe_load((ROOT / "sweeps" / "wandb_sweep.yaml").read_text())
    params = {k: p.get("value", (p.get("values") or [p.get("min")])[0]) for k, p in spec["parameters"].items()}
    _agent_env(monkeypatch, tmp_path, params, "agentrun2")
    with caplog.at_level(logging.WARNING, logger="gain_exp.tracking"):
        tracker = WandbTracker(tmp_path / "good", run_config, mode="offline")
        tracker.finish({"status": "completed"})
    [run] = _read_back(tmp_path / "good")
    assert run.config["loss"] == run_config["loss"] and run.config["+setting"] == params["+setting"]
    assert [r for r in caplog.records if r.name == "gain_exp.tracking"] == []


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


def _counting_probe(monkeypatch, answer: str | None = None) -> list[str]:
    """Replace the server probe by one that gives ``answer``; returns the URLs it was asked about."""
    asked: list[str] = []
    monkeypatch.setattr(wandb_backend, "_probe", lambda url, timeout: asked.append(url) or answer)
    return asked


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    _counting_probe(monkeypatch)  # the server answers
    assert wandb_mode("disabled") == "disabled" and wandb_mode("online") == "online"
    with pytest.raises(
        ValueError, match=r"logger\.wandb\.mode=cloud is unknown; use auto, online, offline or disabled"
    ):
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
    assert tracker.state()["mine"] == {"count": 3}
    tracker.finish({})


class Recording(Tracker):
    """A minimal backend built from a _target_ (what an MLflow backend would look like)."""

    def __init__(self, out_dir, run_config, resume=None, tag=""):
        self.tag, self.resumed, self.seen = tag, resume, []

    def log_metrics(self, metrics, step):
        self.seen.append((metrics, step))

    def state(self):
        return {"count": (self.resumed or {}).get("count", 0) + len(self.seen)}


@pytest.mark.slow
def test_an_interrupted_then_resumed_app_run_is_one_wandb_run_with_a_continuous_history(tmp_path):
    from gain_exp.train.engine import Interrupted

    out = tmp_path / "run"
    args = tiny_overrides(tmp_path) + ["logger=wandb", "logger.wandb.mode=offline"]
    with pytest.raises(Interrupted):
        app.train(compose(args + ["trainer.interrupt_after_steps=8"]), out_dir=out)  # mid-epoch 1
    summary = app.train(compose(args + ["trainer.resume=auto"]), out_dir=out)
    runs = _read_back(out / "wandb")
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1
    assert summary["tracking"]["wandb"]["run_id"] == runs[0].run_id
    steps = [row["_step"] for run in runs for row in run.history]
    assert steps == sorted(set(steps))
    epochs = [row["epoch"] for run in runs for row in run.history if "val/acc" in row]
    assert epochs == [0, 1]


def _closed_port() -> int:
    """A local TCP port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_wandb_server_gives_offline_runs_at_once_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    probes = []
    monkeypatch.setattr(wandb_backend, "_probe", lambda *a: probes.append(a) or _probe(*a))
    with caplog.at_level(logging.WARNING, logger="gain_exp.tracking"):
        start = time.monotonic()
        assert wandb_mode("auto") == "offline"
        assert time.monotonic() - start < 2
        [warning] = [r.getMessage() for r in caplog.records if r.name == "gain_exp.tracking"]
        assert url in warning and "Connection refused" in warning and "`wandb sync <run dir>/wandb`" in warning

        caplog.clear()
        out = tmp_path / "run"
        tracker = WandbTracker(out, {"seed": 0}, mode="auto")
        assert tracker.mode == "offline" and tracker.run is not None
        tracker.log_metrics(_epoch_record(0, 0.5, 0.9), 1)
        tracker.finish({"status": "completed"})
        [warning] = [r.getMessage() for r in caplog.records if r.name == "gain_exp.tracking"]
        assert f"logs offline under {out / 'wandb'}" in warning and f"`wandb sync {out / 'wandb'}`" in warning

        caplog.clear()
        assert wandb_mode("online") == "offline"  # asked for online: falls back too, and says so
        [warning] = [r.getMessage() for r in caplog.records if r.name == "gain_exp.tracking"]
        assert warning.startswith(f"logger.wandb.mode=online but the W&B server {url} is unreachable")
    assert len(probes) == 1 and probes[0][0] == url  # one probe per process, however many runs
    [run] = _read_back(out / "wandb")
    assert run.summary["val/acc"] == {"max": 0.5} and run.summary["status"] == "completed"
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or FAKE_KEY.encode() not in path.read_bytes(), path


def test_the_server_probe_is_bounded_and_any_http_answer_counts_as_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (the backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        assert _probe(f"http://127.0.0.1:{server.server_port}", 5.0) is None
        start = time.monotonic()
        problem = _probe(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert problem is not None and ("timed out" in problem or "no answer" in problem)
        assert time.monotonic() - start < 1.5
        assert _probe("http://no-such-host.invalid", 2.0) is not None
    finally:
        server.shutdown()
        silent.close()


@pytest.mark.slow
def test_an_online_start_that_fails_after_the_probe_logs_offline_within_the_init_timeout(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    _counting_probe(monkeypatch)  # the probe passes, but run creation cannot reach the server
    monkeypatch.setattr(wandb_backend, "INIT_TIMEOUT_S", 2.0)
    monkeypatch.setenv("WANDB__DISABLE_VIEWER", "true")  # skips W&B's two 5 s account look-ups: a faster test
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="gain_exp.tracking"):
        start = time.monotonic()
        tracker = WandbTracker(out, {"seed": 0}, mode="online")
        elapsed = time.monotonic() - start
        tracker.log_metrics(_epoch_record(0, 0.5, 0.9), 1)
        tracker.finish({"status": "completed"})
    assert elapsed < 45  # W&B's own init_timeout is 90 s
    assert tracker.mode == "offline"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "gain_exp.tracking"]
    assert warning.startswith(f"W&B could not start an online run at {url}") and "\n" not in warning
    assert f"`wandb sync {out / 'wandb'}`" in warning
    [run] = _read_back(out / "wandb")
    assert run.summary["val/acc"] == {"max": 0.5}
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or FAKE_KEY.encode() not in path.read_bytes(), path


def test_metrics_jsonl_starts_afresh_on_a_fresh_start_and_only_at_the_first_record(tmp_path, caplog):
    # what a run killed before its first checkpoint leaves, then `trainer.resume=auto` starting fresh in the same dir
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 9.0}\n')
    fresh = JsonTracker(tmp_path, resume=None)
    assert path.read_text().count("\n") == 2 and fresh.state()["bytes"] == 0  # nothing dropped before a record
    fresh.log_metrics({"train/loss": 1.0}, 1)
    fresh.finish({})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 1, "train/loss": 1.0}]
    assert "dropping the 2 line(s) of an earlier start" in caplog.text


def test_a_start_that_logs_nothing_leaves_metrics_jsonl_as_it_was(tmp_path):
    # e.g. a resume refused after the tracker is built (a changed backbone): the finished run's record stays whole
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 2, "test/acc": 1.0}\n')
    for resume in (None, {"path": str(path.resolve()), "bytes": len('{"step": 1}\n{"step": 2}\n')}):
        tracker = JsonTracker(tmp_path, resume=resume)
        tracker.finish({"status": "failed"})
        assert path.read_text().count("\n") == 3, resume
    resumed = JsonTracker(tmp_path, resume={"path": str(path.resolve()), "bytes": len('{"step": 1}\n')})
    resumed.log_metrics({"x": 1.0}, 2)
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2, "x": 1.0}']
    assert resumed.state()["bytes"] == path.stat().st_size


def test_a_reproduced_job_gets_its_own_wandb_group_apart_from_the_originals(tmp_path, monkeypatch):
    monkeypatch.setenv("GAIN_EXP_REPRODUCING", "readme_shapes")  # what gain_exp.reproduce sets for its re-runs
    out = tmp_path / "run"
    cfg = compose(_one_epoch(tmp_path, "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.tags=[paper]"))
    app.train(cfg, out_dir=out)
    [run] = offline_runs(out / "wandb")
    assert run.group == "reproduce/readme_shapes" and run.job_type == "reproduce"
    assert run.tags == ["paper", "reproduce"]
