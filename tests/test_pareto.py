"""Pareto checkpointing (Rao et al. 2023) and the test-time selections: the front by hand (dominated epochs dropped,
ties kept, NaN never on it), its files cleaned as it moves, a run scored under best / last / pareto, resume, tables."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose

from gain_exp.run import train
from gain_exp.runs.rundir import read_run
from gain_exp.train.checkpoints import CheckpointPolicy, ParetoFront, pareto_front
from gain_exp.train.engine import Interrupted

NAN = math.nan


def test_front_by_hand_dominated_points_go_ties_stay_nan_never_joins():
    points = [(0.5, 0.5), (0.6, 0.4), (0.6, 0.4), (0.4, 0.4), (0.7, 0.1), (NAN, 0.9), (0.6, 0.5)]
    # (0.6, 0.5) dominates (0.5, 0.5) and both (0.6, 0.4); (0.4, 0.4) is dominated; (0.7, 0.1) is best in acc
    assert pareto_front(points, ("max", "max")) == [4, 6]
    assert pareto_front([(0.6, 0.4), (0.6, 0.4)], ("max", "max")) == [0, 1]  # equal points: both kept
    # min mode (e.g. spurious energy): lower is better
    assert pareto_front([(0.9, 0.2), (0.9, 0.3), (0.8, 0.1)], ("max", "min")) == [0, 2]


def _policy(tmp_path, metrics=("val/acc", "val/energy_pg"), modes=("max", "max")):
    front = ParetoFront(list(metrics), list(modes))
    return CheckpointPolicy(tmp_path, "val/acc", "max", pareto=front), front


def test_front_files_follow_the_front_and_picks_prefer_the_earlier_epoch(tmp_path):
    policy, front = _policy(tmp_path)
    state = {"w": torch.zeros(2)}
    epochs = [(0.5, 0.2), (0.5, 0.3), (0.7, 0.1), (0.6, 0.3), (0.7, 0.1)]
    for epoch, (acc, energy) in enumerate(epochs):
        policy.after_epoch(epoch, {"val/acc": acc, "val/energy_pg": energy}, lambda: state)
    # epoch 0 fell to epoch 1 (same acc, more energy), epoch 1 to epoch 3; epochs 2 and 4 tie and both stay
    assert [m["epoch"] for m in front.members] == [2, 3, 4]
    on_disk = sorted(p.name for p in tmp_path.glob("pareto_*.ckpt"))
    assert on_disk == ["pareto_epoch_003.ckpt", "pareto_epoch_004.ckpt", "pareto_epoch_005.ckpt"]
    assert front.pick("val/acc")["epoch"] == 2  # 2 and 4 tie: the earlier, as trainer.test_on=best would
    assert front.pick("val/energy_pg")["epoch"] == 3


def test_front_under_min_mode_and_nan_epochs(tmp_path):
    policy, front = _policy(tmp_path, ("val/acc", "val/spurious_energy"), ("max", "min"))
    for epoch, (acc, spurious) in enumerate([(0.9, 0.8), (NAN, 0.0), (0.8, 0.2), (0.9, 0.9)]):
        policy.after_epoch(epoch, {"val/acc": acc, "val/spurious_energy": spurious}, lambda: {"w": 1})
    assert [m["epoch"] for m in front.members] == [0, 2]  # NaN never joins; epoch 3 is dominated by epoch 0
    assert sorted(p.name for p in tmp_path.glob("pareto_*")) == ["pareto_epoch_001.ckpt", "pareto_epoch_003.ckpt"]


SELECT = ["trainer.epochs=4", "trainer.test_on=pareto", "trainer.test_also=[best,last]"]


def test_a_run_scores_each_selection_and_records_the_front(tmp_path, tiny):
    out = tmp_path / "run"
    summary = train(compose([*tiny, *SELECT]), out_dir=out)
    front = summary["pareto"]
    assert front["metrics"] == ["val/acc", "val/energy_pg"] and front["modes"] == ["max", "max"]
    kept = {m["checkpoint"] for m in front["members"]}
    assert kept == {p.stem for p in (out / "checkpoints").glob("pareto_*.ckpt")}  # dropped members' files are gone
    points = [tuple(m["val"][k] for k in front["metrics"]) for m in front["members"]]
    assert pareto_front(points, ("max", "max")) == list(range(len(points)))  # every member is on the front
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["epoch"]: (r["val/acc"], r["val/energy_pg"]) for r in history if "val/acc" in r}
    on_front = pareto_front(list(vals.values()), ("max", "max"))
    assert sorted(m["epoch"] for m in front["members"]) == sorted(list(vals)[i] for i in on_front)
    assert set(summary["selections"]) == {"pareto", "best", "last"}
    picked = summary["selections"]["pareto"]
    assert summary["tested_on"] == {k: picked[k] for k in ("checkpoint", "epoch", "rule")}
    assert picked["rule"].startswith("pareto: the best val/acc of the")
    assert summary["selections"]["last"]["epoch"] == 3 and summary["selections"]["best"]["checkpoint"] == "best"
    for key in ("test_unbiased/acc", "test_biased/worst_group_acc"):
        assert summary["final"][key] == picked["metrics"][key]  # the headline is the pick's
        for member in front["members"]:
            assert key in member["tests"]
    # the table reads every selection and every pick
    metrics = read_run(out).metrics
    assert metrics["test_unbiased/acc@last"] == summary["selections"]["last"]["metrics"]["test_unbiased/acc"]
    assert "test_unbiased/acc@pareto:val/energy_pg" in metrics and "test_unbiased/acc@best" in metrics


@pytest.mark.slow
def test_the_same_weights_score_the_same_under_any_rule(tmp_path, tiny):
    summary = train(compose([*tiny, "trainer.test_also=[last]"]), out_dir=tmp_path / "run")
    best, last = summary["selections"]["best"], summary["selections"]["last"]
    if best["epoch"] == last["epoch"]:
        assert best["metrics"] == last["metrics"]
    assert summary["pareto"] is None and not list((tmp_path / "run" / "checkpoints").glob("pareto_*"))


@pytest.mark.slow
def test_a_resumed_run_keeps_its_front(tmp_path, tiny):
    full = train(compose([*tiny, *SELECT]), out_dir=tmp_path / "full")
    with pytest.raises(Interrupted):
        train(compose([*tiny, *SELECT, "trainer.interrupt_after_steps=14"]), out_dir=tmp_path / "cut")
    resumed = train(compose([*tiny, *SELECT, f"trainer.resume={tmp_path / 'cut'}"]), out_dir=tmp_path / "cut")
    assert resumed["pareto"] == full["pareto"] and resumed["final"] == full["final"]


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("trainer.test_on=middle", r"test_on / test_also has middle, an unknown selection"),
        ("trainer.test_also=[worst]", r"test_on / test_also has worst"),
        ("trainer.pareto.modes=[max,up]", r"trainer\.pareto\.modes has up"),
        ("trainer.pareto.metrics=[val/acc]", r"must each name two"),
        ("trainer.pareto.pick=val/loc_iou", r"trainer\.pareto\.pick=val/loc_iou must be auto or one of"),
    ],
)
def test_bad_selection_settings_are_one_sentence(tmp_path, tiny, override, phrase):
    with pytest.raises(ValueError, match=phrase):
        train(compose([*tiny, override]), out_dir=tmp_path / "run")


def test_a_pareto_metric_the_run_does_not_have_is_named_after_the_first_epoch(tmp_path, tiny):
    cfg = compose([*tiny, "trainer.test_on=pareto", "trainer.pareto.metrics=[auto,val/energy]"])
    with pytest.raises(ValueError, match=r"trainer\.pareto\.metrics\[1\]=val/energy is not a metric of this run"):
        train(cfg, out_dir=tmp_path / "run")
