"""CUDA tier (marker ``gpu``): skipped without a device, run by ``make test`` and ``make gpu-check`` on a machine with
one.

The GAIN step is device-agnostic code; these check that CUDA gives the CPU's numbers for every formulation and
gradient mode, that the speed switches (bf16 autocast, channels-last, torch.compile) keep the step's numbers, that the
app trains end to end on CUDA with all of them on, and that an interrupted CUDA run resumes bit for bit.

Tolerances (stated once, used below):

- fp32, CPU vs CUDA, channels-last vs contiguous, torch.compile vs eager: the loss to a relative 1e-4 and every
  gradient element to ``rtol=1e-3, atol=1e-5`` (``torch.allclose``), TF32 off. The kernels differ only in summation
  order (cuDNN's algorithms, NHWC kernels, Inductor's fused reductions).
- bf16 autocast vs fp32: every value finite, the loss to a relative 2e-2, and the flattened parameter gradient's
  cosine similarity to fp32's at least 0.95 (bf16 keeps 8 bits of mantissa; on CPU's bf16 the same steps gave
  relative loss errors of 4e-4 to 1e-3 and cosines of 0.987 to 0.99 for gain_cnn4).
- resume: bit for bit (``torch.equal`` on every weight, ``==`` on every final metric).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, compose

from gain_exp.core.gain import GAIN, compile_gain
from gain_exp.core.losses import GAINLoss

pytestmark = pytest.mark.gpu

DEVICE = "cuda"  # every test's device (a module constant, so the tests' code can be tried on CPU by patching it)
FP32 = dict(loss_rtol=1e-4, rtol=1e-3, atol=1e-5)
BF16 = dict(loss_rtol=2e-2, min_cosine=0.95)
MODES = ("full", "features", "frozen")
FORMULATIONS = ("batch", "per_label")


@pytest.fixture
def strict_fp32():
    """fp32 without TF32 (PyTorch allows TF32 in cuDNN convolutions by default): the references below are fp32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _model(name: str = "gain_cnn4") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3).train()


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 images, multi-label targets over 3 classes (1 or 2 per image), pixel masks (0: background), all masked."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=generator)
    t = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    seg = torch.randint(0, 4, (4, size, size), generator=generator, dtype=torch.uint8)
    return x, t, seg, torch.ones(4, dtype=torch.bool)


def _gain(
    model: torch.nn.Module, device: str, mode: str, formulation: str, channels_last: bool = False
) -> tuple[GAIN, torch.nn.Module]:
    """GAIN around a copy of ``model`` on ``device`` (and its memory format): the same weights for every variant."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    copied = copy.deepcopy(model).to(device, memory_format=fmt)
    return GAIN(copied, grad_mode=mode, formulation=formulation, multi_label=True), copied


def _loss_and_grads(
    gain: GAIN, device: str, size: int = 32, amp: bool = False, channels_last: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One GAIN_ext step's loss and parameter gradients (fp32, on CPU), from zeroed gradients."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, t, seg, has_mask = (v.to(device) for v in _batch(size))
    x = x.contiguous(memory_format=fmt)
    gain.model.zero_grad(set_to_none=True)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else nullcontext()
    with autocast:  # as the trainer does: forward passes and loss under autocast, backward outside
        loss = GAINLoss(multi_label=True)(gain(x, t), t, seg, has_mask).total
    loss.backward()
    grads = [p.grad.detach().float().cpu() for p in gain.model.parameters() if p.grad is not None]
    return loss.detach().float().cpu(), grads


def _assert_close(a: tuple, b: tuple, what: str) -> None:
    """FP32's tolerance: the loss, then every gradient element."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=FP32["loss_rtol"], atol=0), f"{what}: loss {loss_a} vs {loss_b}"
    assert len(grads_a) == len(grads_b) > 0, what
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        err = (ga - gb).abs().max().item()
        assert torch.allclose(ga, gb, rtol=FP32["rtol"], atol=FP32["atol"]), f"{what}: gradient {i}, max |diff| {err}"


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_a_cuda_step_gives_the_cpu_numbers(strict_fp32, mode: str, formulation: str) -> None:
    model = _model("test_resnet")
    cpu = _loss_and_grads(_gain(model, "cpu", mode, formulation)[0], "cpu")
    cuda = _loss_and_grads(_gain(model, DEVICE, mode, formulation)[0], DEVICE)
    _assert_close(cpu, cuda, f"cpu vs {DEVICE}, {formulation}/{mode}")


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_is_finite_and_close_to_fp32(strict_fp32, mode: str, formulation: str) -> None:
    model = _model()
    loss32, grads32 = _loss_and_grads(_gain(model, DEVICE, mode, formulation)[0], DEVICE, size=64)
    loss16, grads16 = _loss_and_grads(_gain(model, DEVICE, mode, formulation)[0], DEVICE, size=64, amp=True)
    assert torch.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads16)
    assert len(grads16) == len(grads32) > 0
    rel = (abs(loss16 - loss32) / abs(loss32)).item()
    assert rel <= BF16["loss_rtol"], f"bf16 loss {loss16.item()} vs fp32 {loss32.item()} (relative {rel:.2e})"
    flat16, flat32 = torch.cat([g.flatten() for g in grads16]), torch.cat([g.flatten() for g in grads32])
    cosine = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0).item()
    assert cosine >= BF16["min_cosine"], f"bf16 gradient's cosine similarity to fp32's is {cosine:.4f}"


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("mode", ["full", "features"])
def test_channels_last_gives_the_contiguous_numbers(strict_fp32, mode: str, formulation: str) -> None:
    model = _model()
    contiguous = _loss_and_grads(_gain(model, DEVICE, mode, formulation)[0], DEVICE, size=64)
    gain, copied = _gain(model, DEVICE, mode, formulation, channels_last=True)
    assert copied.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    last = _loss_and_grads(gain, DEVICE, size=64, channels_last=True)
    _assert_close(contiguous, last, f"channels_last vs contiguous, {formulation}/{mode}")


# Where trainer.compile is allowed (compile_gain; see test_compile_refuses_what_it_cannot_run): grad_mode features
# or frozen with a map at forward_features' output; per_label only under aot_eager.
COMPILABLE = [
    ("batch", "features", "inductor"),
    ("batch", "frozen", "inductor"),
    ("per_label", "features", "aot_eager"),
]


@pytest.mark.parametrize("formulation,mode,backend", COMPILABLE)
def test_compile_gives_the_eager_numbers(strict_fp32, formulation: str, mode: str, backend: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    model = _model()
    eager, _ = _gain(model, DEVICE, mode, formulation)
    compiled = compile_gain(_gain(model, DEVICE, mode, formulation)[0], backend)
    # call by call: each call updates batch-norm's running statistics, which the attention-mining stream reads
    for call in ("first call (compiles)", "second call (cached graphs)"):
        want = _loss_and_grads(eager, DEVICE, size=64)
        _assert_close(want, _loss_and_grads(compiled, DEVICE, size=64), f"{backend}, {formulation}/{mode}, {call}")
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "formulation,mode,backend,phrase",
    [
        ("batch", "full", "inductor", "no double backward"),
        ("per_label", "features", "inductor", "inductor cannot batch per_label"),
    ],
)
def test_compile_refuses_what_it_cannot_run(formulation: str, mode: str, backend: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        compile_gain(_gain(_model(), DEVICE, mode, formulation)[0], backend)


def _finite_floats(values: dict) -> list[str]:
    return [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]


def test_the_app_trains_one_epoch_with_amp_channels_last_and_workers(tmp_path, tiny) -> None:
    """`python -m gain_exp.run` end to end: 1 epoch, GAIN_ext with L_am from the start, every speed switch on."""
    import json

    out = tmp_path / "run"
    args = tiny + [
        "trainer.epochs=1",
        "loss.am_start_epoch=0",
        f"trainer.device={DEVICE}",
        "trainer.amp=true",
        "trainer.channels_last=true",
        "trainer.workers=auto",
        f"hydra.run.dir={out}",
    ]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert summary["device"].startswith(DEVICE)
    assert summary["final"] and not _finite_floats(summary["final"]), summary["final"]
    assert summary["speed"]["images_per_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert steps and all(math.isfinite(r["train/loss"]) for r in steps)
    assert any(r["train/loss_am"] > 0 for r in steps)  # the attention-mining stream ran under bf16
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms (the app leaves cuDNN's choice alone); what no switch makes deterministic
    on CUDA (bilinear upsampling's backward uses atomic adds) is told apart below by a second uninterrupted run."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["baseline", "gain_ext"])
def test_a_resumed_cuda_run_ends_bit_for_bit_where_an_uninterrupted_one_does(
    tmp_path, tiny, deterministic_cudnn, loss: str
) -> None:
    """Interrupted mid epoch 1 (step 9 of 12, after an epoch boundary), resumed: the same final weights and metrics.

    ``baseline`` trains through kernels cuDNN can make deterministic, so it should match bit for bit. GAIN's maps are
    upsampled bilinearly, whose CUDA backward has no deterministic kernel (atomic adds), so ``gain_ext`` may not. When
    the resumed run differs, a second uninterrupted run tells resume from CUDA apart: if the two uninterrupted runs
    agree bit for bit, resume is at fault (fail); if they differ too, CUDA itself is not reproducible run to run and
    the test xfails with both differences.
    """
    from gain_exp.run import train
    from gain_exp.train.engine import Interrupted

    run = tiny + [
        f"loss={loss}",
        f"trainer.device={DEVICE}",
        "trainer.workers=0",
        "trainer.eval_metrics.deletion_insertion=off",
    ]
    full = train(compose(run), out_dir=tmp_path / "full")
    with pytest.raises(Interrupted):
        train(compose(run + ["trainer.interrupt_after_steps=9"]), out_dir=tmp_path / "cut")
    resumed = train(compose(run + [f"trainer.resume={tmp_path / 'cut'}"]), out_dir=tmp_path / "resumed")
    assert resumed["status"] == "completed" and resumed["resumed"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    if _identical(a, b) and resumed["final"] == full["final"]:
        return
    resume_diff = _max_diff(a, b)
    train(compose(run), out_dir=tmp_path / "again")
    again = _weights(tmp_path / "again")
    if _identical(a, again):
        pytest.fail(
            f"two uninterrupted CUDA runs agree bit for bit, but the resumed one differs (max |weight diff| "
            f"{resume_diff:.3e}): a resume bug"
        )
    pytest.xfail(
        f"CUDA itself is not bit-reproducible here: two uninterrupted runs differ by max |weight diff| "
        f"{_max_diff(a, again):.3e}, resumed vs uninterrupted by {resume_diff:.3e}"
    )
