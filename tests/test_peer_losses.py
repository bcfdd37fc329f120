"""Peer guidance losses (loss.ex_loss: gradia, haics, energy, rrr) against hand computations, their gradients, the
global normalisation under several processes, and the app: each loss/<name>.yaml composes with every group and trains.

The hand example: two images, 4 x 4, two classes (image 0 of class 0, image 1 of class 1).
  image 0: H = the top-left 2 x 2 block, pixel (3, 3) is an ignore pixel;
           A = [[1, .5, 0, 0], [.5, 0, 0, 0], [0, 0, .5, 0], [0, 0, 0, 1]] (the 1 at (3, 3) must not count)
  image 1: H = the right column, A = 0.25 everywhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import CONF, ROOT, compose, tiny_overrides

from gain_exp.config.checks import check_config
from gain_exp.core.gain import GAIN, GAINOutput
from gain_exp.core.losses import GAINLoss, RightReasonsInputs, check_options
from gain_exp.core.models import MAPLESS_BACKBONES
from gain_exp.data.base import IGNORE_INDEX
from gain_exp.run import train

PEERS = ("gradia", "haics", "energy", "rrr")
MAP_PEERS = ("gradia", "haics", "energy")
LN2, LN10 = math.log(2.0), math.log(10.0)

# Per-image values of the hand example, worked out in the module docstring's terms:
#   gradia: image 0: inside |0|+|.5|+|.5|+|1| = 2, outside .5 -> 2.5 / 15 valid pixels;
#           image 1: 4 * .75 + 12 * .25 = 6 -> 6 / 16
#   haics:  image 0: (-log 1 - 2 log .5 - log 1e-6) / 4 (the 0 is clamped to 1e-6); image 1: -log .25 = 2 ln 2
#   energy: image 0: 1 - 2 / 2.5 (the ignore pixel's 1 is out of both sums); image 1: 1 - 4 * .25 / (16 * .25)
#   mse:    image 0: (0 + .25 + .25 + 1 + .25) / 15; image 1: (4 * .5625 + 12 * .0625) / 16
HAND = {
    "gradia": (2.5 / 15, 6 / 16),
    "haics": ((2 * LN2 + 6 * LN10) / 4, 2 * LN2),
    "energy": (0.2, 0.75),
    "mse": (1.75 / 15, 3 / 16),
}


def _hand_example() -> tuple[GAINOutput, torch.Tensor, torch.Tensor]:
    """(GAIN output with the two maps, targets, seg) of the module docstring's example."""
    a0 = torch.tensor([[1, 0.5, 0, 0], [0.5, 0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1.0]])
    a1 = torch.full((4, 4), 0.25)
    seg = torch.zeros(2, 4, 4, dtype=torch.uint8)
    seg[0, :2, :2] = 1  # class 0 is label 1
    seg[0, 3, 3] = IGNORE_INDEX
    seg[1, :, 3] = 2  # class 1 is label 2
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = GAINOutput(
        logits=torch.zeros(2, 2),
        attention=torch.stack([a0, a1]).requires_grad_(True),
        image_index=torch.arange(2),
        map_targets=targets,
    )
    return out, targets, seg


def _ex(name: str, use_mask=(True, True), count=None, out=None, targets=None, seg=None) -> torch.Tensor:
    if out is None:
        out, targets, seg = _hand_example()
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss=name)
    return loss(out, targets, seg, torch.tensor(use_mask), count=count).ex


@pytest.mark.parametrize("name", [*MAP_PEERS, "mse"])
def test_map_losses_equal_the_hand_computation(name):
    first, second = HAND[name]
    torch.testing.assert_close(_ex(name), torch.tensor((first + second) / 2))
    torch.testing.assert_close(_ex(name, use_mask=(True, False)), torch.tensor(first))  # only annotated images
    torch.testing.assert_close(_ex(name, use_mask=(False, True)), torch.tensor(second))
    assert _ex(name, use_mask=(False, False)).item() == 0.0


def test_haics_and_energy_leave_out_maps_with_an_empty_mask_and_gradia_keeps_them():
    out, targets, seg = _hand_example()
    seg[1] = 0  # image 1's object is gone: nothing to point at
    assert _ex("energy", out=out, targets=targets, seg=seg).item() == pytest.approx(HAND["energy"][0])
    assert _ex("haics", out=out, targets=targets, seg=seg).item() == pytest.approx(HAND["haics"][0])
    assert _ex("gradia", out=out, targets=targets, seg=seg).item() == pytest.approx((HAND["gradia"][0] + 0.25) / 2)


def _linear_rrr(multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RRR of a linear classifier at x = 0 on the hand example's masks, with two input channels; (penalty, images).

    z = W x + b. Multi-label, b = 0: d(sum_k log sigmoid z_k)/dx = sum_k (1 - 1/2) w_k = (w_0 + w_1) / 2.
    Single-label, b = (0, ln 3), so p = (1/4, 3/4): d(z_0 + z_1 - 2 lse z)/dx = (1 - 2 p_0) w_0 + (1 - 2 p_1) w_1
    = (w_0 - w_1) / 2. With w_0 = 2 on channel 0 and w_1 = 4 (multi-label) or -4 (single-label) on channel 1's pixel
    (0, 0), the input gradient is 1 on every pixel of channel 0 and 2 at channel 1's (0, 0), for both images.
    Image 0: channel 0 outside H on 16 - 4 - 1 (ignore) = 11 pixels -> 11; (0, 0) is inside H -> 0. Total 11.
    Image 1: channel 0 outside the right column on 12 pixels -> 12; (0, 0) is outside -> 2^2 = 4. Total 16.
    """
    _, targets, seg = _hand_example()
    w = torch.zeros(2, 2, 4, 4)
    w[0, 0] = 2.0
    w[1, 1, 0, 0] = 4.0 if multi_label else -4.0
    b = torch.tensor([0.0, 0.0 if multi_label else math.log(3.0)])
    images = torch.zeros(2, 2, 4, 4, requires_grad=True)
    logits = images.flatten(1) @ w.flatten(1).T + b
    loss = GAINLoss(multi_label=multi_label, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    terms = loss(GAINOutput(logits=logits), targets, seg, torch.tensor([True, True]), images=images)
    return terms.ex, images


@pytest.mark.parametrize("multi_label", [True, False])
def test_rrr_equals_the_hand_computation(multi_label):
    penalty, _ = _linear_rrr(multi_label)
    torch.testing.assert_close(penalty, torch.tensor((11.0 + 16.0) / 2))


def _tiny_gain(grad_mode: str = "features", formulation: str = "batch", seed: int = 0) -> GAIN:
    torch.manual_seed(seed)
    model = timm.create_model("gain_cnn4", pretrained=False, num_classes=2)  # 4 x 4 maps at 32 px
    return GAIN(model, grad_mode=grad_mode, formulation=formulation, normalisation="max", freeze_am_bn=False)


def _tiny_batch(size: int = 32):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=gen)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    seg = torch.zeros(2, size, size, dtype=torch.uint8)
    seg[0, 4:16, 4:16] = 1
    seg[1, 12:28, 8:24] = 2
    return images, targets, seg


def _rrr_on_model(seg: torch.Tensor) -> torch.Tensor:
    gain = _tiny_gain().train()
    images, targets, _ = _tiny_batch()
    images.requires_grad_(True)
    out = gain(images, targets, attention=False, mining=False)
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    return loss(out, targets, seg, torch.tensor([True, True]), images=images).ex


def test_rrr_is_exactly_zero_when_the_mask_covers_the_image_and_positive_when_gradients_fall_outside(one_thread):
    _, _, seg = _tiny_batch()
    whole = torch.stack([torch.full_like(seg[0], 1), torch.full_like(seg[1], 2)])
    assert _rrr_on_model(whole).item() == 0.0
    assert _rrr_on_model(seg).item() > 0.0


def test_rrr_without_images_that_require_grad_is_one_sentence():
    out, targets, seg = _hand_example()
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    with pytest.raises(ValueError, match=r"^loss\.ex_loss=rrr differentiates .* pass images= to the loss\.$"):
        loss(out, targets, seg, torch.tensor([True, True]))


def _first_image_gradient(use_mask: torch.Tensor, held: bool) -> torch.Tensor:
    """Input gradient, at image 0, of the summed log-probabilities of the images ``use_mask`` marks, batch norm in
    training mode: from RightReasonsInputs (``held``), or from the training forward itself (``through``)."""
    gain = _tiny_gain(seed=1).train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=gen)
    targets = torch.eye(2)[[0, 1, 0, 1]]
    if held:
        inputs = RightReasonsInputs(gain.model)
        with inputs:
            out = gain(images, targets, attention=False, mining=False)
        logits, rows = inputs(images, use_mask)
        assert torch.allclose(logits, out.logits[use_mask], atol=1e-5)  # the training forward's function
        (grads,) = torch.autograd.grad(logits.log_softmax(1).sum(), rows)
        return grads[0]
    images.requires_grad_(True)
    out = gain(images, targets, attention=False, mining=False)
    (grads,) = torch.autograd.grad(out.logits.log_softmax(1)[use_mask].sum(), images)
    return grads[0]


def test_held_batch_statistics_give_each_image_its_own_input_gradient(one_thread):
    """``through``: the other images' log-probabilities reach image 0's input gradient via the batch mean and
    variance (where a model trained on decoy digits cancels its gradient on the patch, docs/results/methods-table.md). ``held``: annotating
    the other images changes nothing at image 0."""
    alone, every = torch.tensor([True, False, False, False]), torch.ones(4, dtype=torch.bool)
    through = _first_image_gradient(alone, held=False), _first_image_gradient(every, held=False)
    assert (through[0] - through[1]).abs().max() > 1e-3 * through[0].abs().max()
    torch.testing.assert_close(_first_image_gradient(every, held=True), _first_image_gradient(alone, held=True))


def test_rrr_inputs_leave_batch_norm_training_with_this_batch_in_its_running_statistics(one_thread):
    gain = _tiny_gain().train()
    images, targets, seg = _tiny_batch()
    reference = _tiny_gain().train()
    reference(images, targets, attention=False, mining=False)  # one training forward: running statistics updated once
    inputs = RightReasonsInputs(gain.model)
    with inputs:
        gain(images, targets, attention=False, mining=False)
    logits, rows = inputs(images, torch.tensor([False, True]))
    assert rows.shape[0] == 1 and rows.requires_grad and logits.shape == (1, 2)
    norms = [m for m in gain.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.training for m in norms) and not inputs._handles
    for mine, theirs in zip(gain.model.state_dict().values(), reference.model.state_dict().values()):
        torch.testing.assert_close(mine, theirs)
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    out = gain(images, targets, attention=False, mining=False)
    terms = loss(out, targets, seg, torch.tensor([False, True]), images=rows, input_logits=logits)
    assert terms.ex.item() > 0  # image 1's mask leaves most of its pixels outside
    # a batch without an annotated image: no penalty and nothing to differentiate
    assert loss(out, targets, seg, torch.tensor([False, False])).ex.item() == 0.0


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("formulation", ["batch", "per_label"])
def test_each_loss_alone_sends_gradients_to_the_model(name, formulation, one_thread):
    """cl_weight 0: only L_e; under grad_mode=full the map losses also reach the classifier through the CAM weights."""
    images, targets, seg = _tiny_batch()
    for grad_mode in ("features", "full"):
        gain = _tiny_gain(grad_mode, formulation).train()
        rrr = name == "rrr"
        if rrr:
            images = images.detach().requires_grad_(True)
        out = gain(images, targets, attention=not rrr, mining=False)
        loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss=name, cl_weight=0.0)
        terms = loss(out, targets, seg, torch.tensor([True, True]), images=images if rrr else None)
        assert terms.ex.item() > 0 and terms.total.item() == pytest.approx(terms.ex.item())
        terms.total.backward()
        grads = {n: p.grad for n, p in gain.model.named_parameters()}
        assert grads["features.0.weight"] is not None and grads["features.0.weight"].abs().sum() > 0
        head = grads["fc.weight"]
        reached_head = head is not None and bool(head.abs().sum() > 0)
        # features: the CAM weights are constants, so the map losses leave the head alone; RRR always reaches it
        assert reached_head == (rrr or grad_mode == "full"), (grad_mode, reached_head)


@pytest.mark.parametrize("name", PEERS)
def test_each_loss_runs_under_bf16_autocast_as_trainer_amp_does(name, one_thread):
    images, targets, seg = _tiny_batch()
    gain, rrr = _tiny_gain().train(), name == "rrr"
    images.requires_grad_(rrr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gain(images, targets, attention=not rrr, mining=False)
        loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss=name)
        terms = loss(out, targets, seg, torch.tensor([True, True]), images=images if rrr else None)
    terms.total.backward()
    assert terms.ex.dtype == torch.float32 and terms.ex.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in gain.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", [*PEERS, "mse"])
def test_two_processes_with_the_global_count_average_to_one_process(name):
    """DDP averages the processes' losses: with the global count they average to the loss on the whole batch."""
    if name == "rrr":
        whole, _ = _linear_rrr(multi_label=True)
        halves = []
        for i in range(2):
            _, targets, seg = _hand_example()
            w = torch.zeros(2, 2, 4, 4)
            w[0, 0], w[1, 1, 0, 0] = 2.0, 4.0
            images = torch.zeros(1, 2, 4, 4, requires_grad=True)
            logits = images.flatten(1) @ w.flatten(1).T
            loss = GAINLoss(multi_label=True, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
            halves.append(
                loss(
                    GAINOutput(logits=logits),
                    targets[i : i + 1],
                    seg[i : i + 1],
                    torch.tensor([True]),
                    count=lambda n: (n + 1) / 2,
                    images=images,
                ).ex
            )
    else:
        whole = _ex(name)
        out, targets, seg = _hand_example()
        halves = []
        for i in range(2):
            half = GAINOutput(
                logits=out.logits[i : i + 1],
                attention=out.attention[i : i + 1],
                image_index=torch.zeros(1, dtype=torch.long),
                map_targets=targets[i : i + 1],
            )
            # the other process also has one annotated map: global count 2, world size 2
            halves.append(_ex(name, (True,), lambda n: (n + 1) / 2, half, targets[i : i + 1], seg[i : i + 1]))
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)


def test_unknown_ex_loss_is_one_sentence_listing_the_choices():
    with pytest.raises(
        ValueError,
        match=r"^loss\.ex_loss='grandia' is unknown; choose one of "
        r"\['mse', 'gradia', 'haics', 'energy', 'rrr'\]",
    ):
        check_options(1.0, 1.0, "softmax", "attention", 0, 0, prefix="loss.", ex_loss="grandia")
    with pytest.raises(ValueError, match=r"ex_loss='x' is unknown"):
        GAINLoss(multi_label=False, ex_loss="x")


GROUP_OPTIONS = [
    (g, p.stem) for g in ("backbone", "dataset", "formulation", "grad_mode") for p in sorted((CONF / g).glob("*.yaml"))
]


@pytest.mark.slow
def test_every_option_of_the_other_groups_composes_with_a_peer_and_passes_the_checks(tmp_path):
    """Each backbone, dataset, formulation and grad mode once, the peers in turn (a compose costs ~0.7 s; the loss
    group sets only loss.* keys, so its composition does not depend on the other groups' choices)."""
    for i, (group, option) in enumerate(GROUP_OPTIONS):
        name, extra = PEERS[i % len(PEERS)], []
        if group == "backbone" and option in MAPLESS_BACKBONES:  # no Grad-CAM: of the peers only rrr, no deletion AUC
            name, extra = "rrr", ["trainer.eval_metrics.deletion_insertion=off"]
        if group == "dataset" and option == "waterbirds":  # its second folder only the user knows (??? in conf/)
            extra = [f"dataset.segmentations={tmp_path}"]
        cfg = compose([f"loss={name}", f"{group}={option}", f"dataset.root={tmp_path}", *extra])
        assert cfg.loss.ex_loss == name and cfg.loss.am_weight == 0 and cfg.loss.ex_weight > 0, (group, option)
        check_config(cfg)  # the pre-flight checks accept it


def test_rrr_refuses_compile_in_one_sentence(tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["loss=rrr", "trainer.compile=true"])
    with pytest.raises(
        ValueError,
        match=r"^trainer\.compile: torch\.compile has no double backward, which "
        r"loss\.ex_loss=rrr needs",
    ):
        check_config(cfg)


SMALLER = [
    "backbone.name=gain_cnn4",
    "trainer.epochs=1",
    "dataset.n_train=16",
    "dataset.n_val=8",
    "dataset.n_test=8",
    "trainer.num_panels=0",
]  # gain_cnn4: 4 x 4 maps at 32 px (test_resnet's are 1 x 1)


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_trains_through_the_app(name, tmp_path, one_thread):
    out = tmp_path / "run"
    summary = train(compose(tiny_overrides(tmp_path) + [f"loss={name}", *SMALLER]), out_dir=out)
    assert summary["status"] == "completed" and summary["config"]["loss"]["ex_loss"] == name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss_e" in r]
    assert steps and any(r["train/loss_e"] > 0 for r in steps) and all(r["train/loss_am"] == 0 for r in steps)
    assert all(math.isfinite(r["train/loss"]) for r in steps)


def test_rrr_with_the_batch_statistics_held_trains_through_the_app(tmp_path, one_thread):
    summary = train(
        compose(
            tiny_overrides(tmp_path) + ["loss=rrr", "loss.rrr_norm_stats=held", "dataset.masks_to_use=0.5", *SMALLER]
        ),
        out_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed" and summary["final"]["train/mean_loss_e"] > 0


def test_unknown_rrr_norm_stats_is_one_sentence(tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["loss=rrr", "loss.rrr_norm_stats=frozen"])
    with pytest.raises(
        ValueError,
        match=r"^loss\.rrr_norm_stats='frozen' is unknown; choose one of "
        r"\['through', 'held'\]\.$",
    ):
        check_config(cfg)


def test_rrr_trains_a_vit_whose_fused_attention_has_no_double_backward(tmp_path, one_thread):
    """The step switches timm attention to its unfused path: RRR's double backward runs through every block."""
    summary = train(
        compose(
            [
                "experiment=shapes_vit",
                "loss=rrr",
                f"dataset.root={tmp_path / 'shapes'}",
                "dataset.image_size=32",
                "dataset.masks_to_use=0.5",
                "+backbone.kwargs.depth=1",
                "backbone.kwargs.img_size=32",
                "trainer.batch_size=8",
                "trainer.eval_batch_size=8",
                "logger=json",
                *SMALLER[1:],
            ]
        ),
        out_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed" and summary["final"]["train/mean_loss_e"] > 0


@pytest.mark.slow
def test_a_sweep_over_the_peers_runs_each_as_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tmp_path) + [*SMALLER, f"hydra.sweep.dir={sweep}"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }  # tiny tensors: one thread is several times faster on a shared machine
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", "-m", f"loss={','.join(PEERS)}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert sorted(s["choices"]["loss"] for s in summaries) == sorted(PEERS)
    assert all(s["status"] == "completed" for s in summaries)
