"""The seed repository's remaining switches: loss.cl_weight, trainer.test_first, checkpoint_every, training panels,
positive/negative panel counts, steps_per_epoch (docs/seed.md)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from fixtures_data import make_mask_folder

from gain_exp.run import train
from gain_exp.tracking import JsonTracker

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cl_weight_scales_the_classification_term_and_zero_leaves_it_out_of_the_gradient():
    import timm

    from gain_exp.core.gain import GAIN
    from gain_exp.core.losses import GAINLoss

    torch.manual_seed(0)
    gain = GAIN(timm.create_model("test_resnet", pretrained=False, num_classes=3))
    images, targets = torch.randn(4, 3, 32, 32), torch.eye(3)[[0, 1, 2, 0]]
    out = gain(images, targets)
    one = GAINLoss(multi_label=False, am_weight=1.0, ex_weight=0.0)(out, targets)
    half = GAINLoss(multi_label=False, am_weight=1.0, ex_weight=0.0, cl_weight=0.5)(out, targets)
    none = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=0.0, cl_weight=0.0)(out, targets)
    torch.testing.assert_close(half.total, one.total - 0.5 * one.cl)
    assert float(none.total.detach()) == 0.0 and float(none.cl.detach()) > 0  # still reported, not trained on
    none.total.backward()
    assert all(p.grad is None or not p.grad.any() for p in gain.parameters())
    with pytest.raises(ValueError, match=r"^cl_weight=-1"):
        GAINLoss(multi_label=False, cl_weight=-1)


@pytest.mark.slow
def test_test_first_logs_every_split_before_the_first_step_once(tmp_path, tiny):
    out = tmp_path / "r"
    summary = train(compose(tiny + ["trainer.test_first=true", "trainer.epochs=1"]), out_dir=out)
    first = _records(out)[0]
    assert first["epoch"] == -1 and first["step"] == 0
    assert {"val/acc", "test_biased/acc", "test_unbiased/acc"} <= set(first)
    assert summary["before_training"]["val/acc"] == first["val/acc"]
    assert (out / "attention" / "val_epoch-01.png").is_file()
    again = train(compose(tiny + ["trainer.test_first=true", "trainer.epochs=2", "trainer.resume=auto"]), out_dir=out)
    assert again["before_training"] is None  # a resumed run has trained already
    assert [r["epoch"] for r in _records(out) if r.get("epoch") == -1] == [-1]


@pytest.mark.slow
def test_checkpoint_every_keeps_those_epochs_and_a_run_resumes_from_one(tmp_path, tiny):
    whole = train(compose(tiny + ["trainer.epochs=3", "trainer.checkpoint_every=2"]), out_dir=tmp_path / "whole")
    kept = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert kept == ["best.ckpt", "epoch_002.ckpt", "last.ckpt"]
    saved = torch.load(tmp_path / "whole" / "checkpoints" / "epoch_002.ckpt", weights_only=True)
    assert (saved["epoch"], saved["batch_in_epoch"], len(saved["history"])) == (2, 0, 2)
    again = train(
        compose(tiny + ["trainer.epochs=3", f"trainer.resume={tmp_path / 'whole/checkpoints/epoch_002.ckpt'}"]),
        out_dir=tmp_path / "again",
    )
    assert again["final"]["val/loss_cl"] == whole["final"]["val/loss_cl"]


@pytest.mark.slow
def test_training_panels_appear_at_the_asked_steps_for_every_loss(tmp_path, tiny):
    for loss in ("baseline", "gain_ext"):
        out = tmp_path / loss
        train(compose(tiny + [f"loss={loss}", "trainer.train_panels_every=4", "trainer.train_panels=3"]), out_dir=out)
        steps = sorted(p.name for p in (out / "attention").glob("train_step*.png"))
        assert steps == ["train_step000004.png", "train_step000008.png", "train_step000012.png"], loss  # 12 steps


@pytest.mark.slow
def test_steps_per_epoch_sets_the_epoch_length_for_any_dataset(tmp_path, tiny):
    for steps in (4, 10):  # fewer than one pass (6 batches), and more (a second pass in a fresh order)
        out = tmp_path / str(steps)
        summary = train(compose(tiny + [f"trainer.steps_per_epoch={steps}"]), out_dir=out)
        logged = [r["step"] for r in _records(out) if "train/loss" in r]
        assert logged == list(range(1, 2 * steps + 1)) and summary["epochs_completed"] == 2


def test_positive_and_negative_panel_counts_on_binary_data(tmp_path, tiny, monkeypatch):
    shown = {}
    original = JsonTracker.log_panels

    def keep(self, split, panels, epoch, step=None):
        shown[split] = [p.true_classes for p in panels]
        return original(self, split, panels, epoch, step)

    monkeypatch.setattr(JsonTracker, "log_panels", keep)
    root = make_mask_folder(tmp_path / "folder", n_per_class=6, size=48)
    train(
        compose(
            [
                "backbone.name=test_resnet",
                "dataset=mask_folder",
                f"dataset.root={root}",
                "dataset.negative_class=negative",
                "dataset.image_size=32",
                "trainer.epochs=1",
                "trainer.batch_size=4",
                "trainer.eval_batch_size=4",
                "logger=json",
                "loss=baseline",
                "trainer.panel_positives=1",
                "trainer.panel_negatives=3",
            ]
        ),
        out_dir=tmp_path / "run",
    )
    assert sorted(shown["val"]) == [["lesion"], ["negative"], ["negative"], ["negative"]]
    with pytest.raises(ValueError, match=r"^trainer\.panel_positives / panel_negatives need binary data"):
        train(compose(tiny + ["trainer.panel_positives=2"]), out_dir=tmp_path / "shapes")


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("trainer.checkpoint_every=0", "trainer.checkpoint_every=0 must be >= 1 or null."),
        ("trainer.steps_per_epoch=0", "trainer.steps_per_epoch=0 must be >= 1 or null."),
        ("trainer.train_panels_every=0", "trainer.train_panels_every=0 must be >= 1 or null."),
        ("trainer.train_panels=0", "trainer.train_panels=0 must be >= 1."),
        ("trainer.panel_positives=-1", "trainer.panel_positives=-1 must be >= 0 or null."),
        ("loss.cl_weight=-1", "loss.cl_weight=-1"),
    ],
)
def test_the_new_keys_out_of_range_are_one_sentence(override, phrase):
    from gain_exp.config.checks import check_config

    with pytest.raises(ValueError) as err:
        check_config(compose([override]))
    assert str(err.value).startswith(phrase) and "\n" not in str(err.value)
