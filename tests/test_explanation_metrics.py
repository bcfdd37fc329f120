"""trainer.eval_metrics: spurious-region energy and deletion / insertion AUC in the split metrics, where configured."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose, tiny_overrides
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from gain_exp.config.plan import make_plan
from gain_exp.core.attention import normalise
from gain_exp.core.faithfulness import deletion_insertion
from gain_exp.core.losses import map_masks
from gain_exp.run import train
from gain_exp.train.evaluation import Evaluator
from gain_exp.train.experiment import build_experiment
from gain_exp.train.runtime import Runtime


def test_spurious_energy_every_epoch_deletion_insertion_at_test(tmp_path, tiny):
    summary = train(
        compose(tiny + ["backbone.name=gain_cnn4", "trainer.epochs=1", "trainer.eval_metrics.images=5"]),
        out_dir=tmp_path / "r",
    )
    final = summary["final"]
    for split in ("val", "test_biased", "test_unbiased"):
        assert 0 <= final[f"{split}/spurious_energy"] <= 1
        assert final[f"{split}/spurious_n"] + final[f"{split}/spurious_skipped"] == final[f"{split}/loc_n"]
    assert "val/deletion_auc" not in final  # test-only by default
    for split in ("test_biased", "test_unbiased"):
        assert final[f"{split}/faith_n"] == 5  # the split's first 5 images
        assert 0 <= final[f"{split}/deletion_auc"] <= 1 and 0 <= final[f"{split}/insertion_auc"] <= 1


def test_the_evaluator_scores_the_maps_it_shows(tmp_path):
    # shapes mark their background as the spurious region; the split's number is the mean over its maps, and
    # deletion / insertion is the mean over the first `images` maps, each computed here by hand from the same maps
    cfg = compose(
        tiny_overrides(tmp_path)
        + ["backbone.name=gain_cnn4", "trainer.eval_metrics.images=3", "trainer.eval_metrics.steps=4"]
    )
    exp = build_experiment(make_plan(cfg), Runtime(torch.device("cpu")))
    settings = OmegaConf.to_object(cfg.trainer.eval_metrics)
    evaluator = Evaluator(
        exp.gain,
        exp.loss,
        exp.data,
        exp.runtime,
        batch_size=8,
        workers=0,
        amp=False,
        mean=exp.mean,
        std=exp.std,
        progress=False,
        eval_metrics=settings,
    )
    split = exp.data.tests["test_unbiased"]
    metrics = evaluator.evaluate(split, "t", stage="test").metrics
    batch = default_collate([split[i] for i in range(len(split))])
    exp.gain.eval()
    out = exp.gain(batch["image"], batch["target"])
    _, valid = map_masks(out, batch["seg"])
    maps = normalise(out.attention.float(), "minmax")
    region = batch["seg"] == 0
    mine = (maps * region * valid).flatten(1).sum(1) / (maps * valid).flatten(1).sum(1)  # NaN: a map without mass
    assert metrics["t/spurious_energy"] == pytest.approx(float(mine.nanmean()), abs=1e-6)
    assert metrics["t/spurious_skipped"] == int(mine.isnan().sum()) and metrics["t/spurious_n"] == len(split) - int(
        mine.isnan().sum()
    )
    deletion, insertion = deletion_insertion(
        lambda x: exp.gain(x, attention=False).logits,
        batch["image"][:3],
        maps[:3],
        batch["target"][:3].argmax(1),
        steps=4,
    )
    assert metrics["t/deletion_auc"] == pytest.approx(float(deletion.mean()), abs=1e-6)
    assert metrics["t/insertion_auc"] == pytest.approx(float(insertion.mean()), abs=1e-6)


def test_each_metric_can_move_or_go(tmp_path, tiny):
    summary = train(
        compose(
            tiny
            + [
                "trainer.epochs=1",
                "trainer.eval_metrics.spurious_energy=off",
                "trainer.eval_metrics.deletion_insertion=epoch",
                "trainer.eval_metrics.steps=4",
                "trainer.eval_metrics.images=null",
                "trainer.eval_metrics.baseline=mean",
            ]
        ),
        out_dir=tmp_path / "r",
    )
    final = summary["final"]
    assert not any("spurious" in k for k in final)
    assert final["val/faith_n"] == 16 and not math.isnan(final["val/deletion_auc"])  # every val image


@pytest.mark.parametrize(
    "override,phrase",
    [
        (
            "trainer.eval_metrics.deletion_insertion=always",
            r"trainer\.eval_metrics\.deletion_insertion=always is unknown",
        ),
        ("trainer.eval_metrics.steps=0", r"trainer\.eval_metrics\.steps=0 must be >= 1"),
        ("trainer.eval_metrics.baseline=noise", r"trainer\.eval_metrics\.baseline=noise is unknown"),
        ("trainer.eval_metrics.images=0", r"trainer\.eval_metrics\.images=0 must be >= 1 or null"),
    ],
)
def test_bad_values_are_one_sentence(tmp_path, tiny, override, phrase):
    with pytest.raises(ValueError, match=phrase):
        train(compose(tiny + [override]), out_dir=tmp_path / "r")
