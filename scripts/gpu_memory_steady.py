"""Is memory steady over many GAIN steps? Peak memory at step N must be within a tolerance of step K.

    python scripts/gpu_memory_steady.py --device cuda --backbone resnet18 --size 224 --batch 32 --steps 300
    python scripts/gpu_memory_steady.py --device cpu --backbone gain_cnn4 --size 64 --batch 4 --steps 30 --check-at 10

Each step is a full GAIN_ext training step (the classification and attention-mining streams, L_cl + L_am + L_e,
backward, optimiser step) of ``--formulation`` (default per_label, ``--labels`` labels per image) under
``--grad-mode`` (default full, which keeps the Grad-CAM graph for a double backward: the mode most likely to hold on
to memory) on one fixed random batch. Recorded after every step:

- CUDA: the step's own peak allocated bytes (the peak counter is reset before each step), the peak allocated since
  the first step, the bytes still allocated after the step and the bytes the caching allocator reserves.
- CPU (a dry run of the script; no per-step peak exists there): the process's resident set after the step and its
  peak so far (``ru_maxrss``).

The check: the step's peak and the peak so far at step ``--steps`` are each within ``--tolerance`` (relative) of
step ``--check-at``, and every loss is finite. The result goes to ``--json`` (and a line to stdout); exit 0 when
the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

import gain_exp  # noqa: F401  registers gain_cnn4 & co. with timm
from gain_exp.core.backbones import create_backbone
from gain_exp.core.gain import FORMULATIONS, GAIN, GRAD_MODES
from gain_exp.core.losses import GAINLoss
from gain_exp.output.files import write_json


def _rss_bytes() -> int:
    """The resident set of this process now (Linux /proc; 0 where it is not readable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def _model(backbone: str, classes: int, size: int) -> torch.nn.Module:
    """The timm model; transformers are built for ``size`` px, CNNs take any size (as gain_exp.bench does)."""
    try:
        return create_backbone(backbone, num_classes=classes, img_size=size)
    except TypeError:  # a CNN: no img_size argument
        return create_backbone(backbone, num_classes=classes)


def measure(
    backbone: str,
    size: int,
    batch: int,
    classes: int,
    labels: int,
    steps: int,
    device: str,
    formulation: str = "per_label",
    grad_mode: str = "full",
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Run ``steps`` GAIN_ext steps; return per-step memory records (lists indexed by step - 1) and settings."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    model = _model(backbone, classes, size).to(dev).train()
    gain = GAIN(model, formulation=formulation, grad_mode=grad_mode, multi_label=True).train()
    loss_fn = GAINLoss(multi_label=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator).to(dev)
    targets = torch.zeros(batch, classes)
    for j in range(labels):  # image i has labels i, i+1, ..., i+labels-1 (mod classes)
        targets[torch.arange(batch), (torch.arange(batch) + j) % classes] = 1.0
    targets = targets.to(dev)
    seg = torch.randint(0, classes + 1, (batch, size, size), generator=generator, dtype=torch.uint8).to(dev)
    has_mask = torch.ones(batch, dtype=torch.bool, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)

    records = dict(step_peak=[], peak_so_far=[], allocated=[], reserved=[], loss=[])
    start = time.perf_counter()
    for _ in range(steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(gain(x, targets), targets, seg, has_mask).total
        loss.backward()
        opt.step()
        records["loss"].append(loss.item())  # .item() also waits for the step on CUDA
        if cuda:
            step_peak = torch.cuda.max_memory_allocated(dev)
            so_far = max(step_peak, records["peak_so_far"][-1] if records["peak_so_far"] else 0)
            records["step_peak"].append(step_peak)
            records["peak_so_far"].append(so_far)
            records["allocated"].append(torch.cuda.memory_allocated(dev))
            records["reserved"].append(torch.cuda.memory_reserved(dev))
        else:
            rss = _rss_bytes()
            records["step_peak"].append(rss)
            records["peak_so_far"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            records["allocated"].append(rss)
            records["reserved"].append(None)
    seconds = time.perf_counter() - start
    return dict(
        backbone=backbone,
        size=size,
        batch=batch,
        classes=classes,
        labels=labels,
        steps=steps,
        formulation=formulation,
        grad_mode=grad_mode,
        amp=amp,
        device=device,
        device_name=torch.cuda.get_device_name(dev) if cuda else "cpu",
        memory="cuda allocated bytes" if cuda else "cpu process resident bytes (a dry-run stand-in)",
        torch=torch.__version__,
        seconds=seconds,
        steps_per_s=steps / seconds if seconds > 0 else None,
        records=records,
    )


def check(result: dict, check_at: int, tolerance: float) -> dict:
    """Compare step ``check_at`` with the last step; adds ``checks`` and ``passed`` to ``result``."""
    records, last = result["records"], result["steps"]
    checks = {}
    for key in ("step_peak", "peak_so_far"):
        early, late = records[key][check_at - 1], records[key][last - 1]
        change = (late - early) / early if early else math.inf
        checks[key] = dict(at_check=early, at_end=late, relative_change=change, passed=bool(abs(change) <= tolerance))
    finite = all(math.isfinite(v) for v in records["loss"])
    checks["losses_finite"] = dict(passed=finite)
    result.update(
        check_at=check_at,
        tolerance=tolerance,
        checks=checks,
        passed=all(c["passed"] for c in checks.values()),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--labels", type=int, default=3, help="labels per image (per_label: one map per label)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--check-at", type=int, default=50, help="the early step the last one is compared with")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative (0.01 = 1%%)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formulation", choices=FORMULATIONS, default="per_label")
    parser.add_argument("--grad-mode", choices=GRAD_MODES, default="full")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast around forward passes and loss")
    parser.add_argument("--json", type=Path, help="write the records and the check here")
    args = parser.parse_args(argv)
    if not 1 <= args.check_at <= args.steps:
        parser.error(f"--check-at {args.check_at} must lie between 1 and --steps {args.steps}")
    if min(args.size, args.batch, args.classes) < 1 or not 1 <= args.labels <= args.classes:
        parser.error("--size, --batch and --classes must be >= 1 and --labels between 1 and --classes")

    result = measure(
        args.backbone,
        args.size,
        args.batch,
        args.classes,
        args.labels,
        args.steps,
        args.device,
        args.formulation,
        args.grad_mode,
        args.amp,
    )
    check(result, args.check_at, args.tolerance)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
    c = result["checks"]
    print(
        f"{'PASS' if result['passed'] else 'FAIL'}: {args.backbone} {args.formulation}/{args.grad_mode}, batch "
        f"{args.batch}, {args.size} px, {args.device}: step peak {c['step_peak']['at_check'] / 2**20:.1f} -> "
        f"{c['step_peak']['at_end'] / 2**20:.1f} MB, peak so far {c['peak_so_far']['at_check'] / 2**20:.1f} -> "
        f"{c['peak_so_far']['at_end'] / 2**20:.1f} MB (steps {args.check_at} -> {args.steps}, tolerance "
        f"{args.tolerance:.1%}), losses finite: {c['losses_finite']['passed']}, {result['steps_per_s']:.2f} steps/s"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
