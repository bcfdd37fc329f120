"""Step-time benchmark: plain classification vs GAIN (batch, per_label) vs a hook-plus-full-backward GAIN.

    python -m gain_exp.bench                       # resnet18, batch 8, 160 px, CPU
    python -m gain_exp.bench --device cuda --batch 64 --size 224
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import timm
import torch
import torch.nn.functional as F

from gain_exp.gain import GRAD_MODES, GAIN
from gain_exp.losses import GAINLoss


@contextmanager
def _count_saved(counter: list[int]) -> Iterator[None]:
    """Adds the bytes autograd saves for backward (activation memory, comparable on any device)."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _reference_step(model, x, targets, loss_fn: GAINLoss, opt, sigma=0.5, omega=10.0) -> None:
    """GAIN as public implementations write it: a forward hook and a full .backward() for the gradients."""
    store = {}
    layer = model.layer4 if hasattr(model, "layer4") else model.stages[-1]
    handle = layer.register_forward_hook(lambda _m, _i, out: store.update(f=out))
    logits = model(x)
    handle.remove()
    store["f"].retain_grad()
    (logits * targets).sum().backward(retain_graph=True)
    weights = store["f"].grad.mean(dim=(2, 3), keepdim=True)
    opt.zero_grad(set_to_none=True)
    cam = F.relu((weights * store["f"]).sum(1, keepdim=True))
    flat = cam.flatten(1)
    cam = (cam - flat.min(1).values.view(-1, 1, 1, 1)) / (flat.max(1).values - flat.min(1).values + 1e-7).view(-1, 1, 1, 1)
    mask = torch.sigmoid(omega * (F.interpolate(cam, size=x.shape[-2:], mode="bilinear") - sigma))
    model.eval()  # same frozen-BN AM stream as ours
    am_logits = model(x - mask * x)
    model.train()
    loss = loss_fn.classification(logits, targets) + (am_logits.softmax(1) * targets).sum(1).div(targets.sum(1)).mean()
    loss.backward()
    opt.step()


def _time(step: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> tuple[float, int]:
    for _ in range(warmup):
        step()
    times, saved = [], [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats):
        start = time.perf_counter()
        with _count_saved(saved) if i == 0 else nullcontext():
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved[0]
    return statistics.median(times), peak


def run(backbone: str, batch: int, size: int, classes: int, labels: int, device: str, warmup: int,
        repeats: int, modes: list[str]) -> list[dict]:
    """Time every variant and return one row per variant."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=classes).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev)
    one = F.one_hot(torch.arange(batch, device=dev) % classes, classes).float()
    multi = torch.zeros(batch, classes, device=dev)
    for j in range(labels):
        multi[torch.arange(batch), (torch.arange(batch, device=dev) + j) % classes] = 1.0
    ce, bce = GAINLoss(multi_label=False), GAINLoss(multi_label=True)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        ce.classification(model(x), one).backward()
        opt.step()

    def gain_step(gain: GAIN, targets: torch.Tensor, loss_fn: GAINLoss) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(gain(x, targets), targets).total.backward()
            opt.step()
        return step

    rows = []
    base, base_mem = _time(plain, warmup, repeats, dev)
    rows.append(dict(variant="plain classification", ms=base * 1e3, ratio=1.0, mem=base_mem))
    for mode in modes:
        g = GAIN(model, formulation="batch", grad_mode=mode).train()
        t, mem = _time(gain_step(g, one, ce), warmup, repeats, dev)
        rows.append(dict(variant=f"GAIN batch, {mode}", ms=t * 1e3, ratio=t / base, mem=mem))
        g = GAIN(model, formulation="per_label", grad_mode=mode, multi_label=True).train()
        t, mem = _time(gain_step(g, multi, bce), warmup, repeats, dev)
        rows.append(dict(variant=f"GAIN per_label x{labels}, {mode}", ms=t * 1e3, ratio=t / base, mem=mem))
    if hasattr(model, "layer4") or hasattr(model, "stages"):
        t, mem = _time(lambda: _reference_step(model, x, one, ce, opt), warmup, repeats, dev)
        rows.append(dict(variant="reference: hook + full backward", ms=t * 1e3, ratio=t / base, mem=mem))
    return rows


def format_table(rows: list[dict], device: str) -> str:
    """Markdown table of the rows."""
    mem_name = "peak CUDA MB" if device.startswith("cuda") else "saved activations MB"
    lines = [f"| variant | median ms/step | x plain | {mem_name} |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['mem'] / 2**20:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--labels", type=int, default=3, help="labels per image for per_label")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", default=",".join(GRAD_MODES), help="comma-separated grad modes")
    args = parser.parse_args(argv)
    rows = run(args.backbone, args.batch, args.size, args.classes, args.labels, args.device, args.warmup,
               args.repeats, args.modes.split(","))
    print(f"{args.backbone}, batch {args.batch}, {args.size} px, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(format_table(rows, args.device))


if __name__ == "__main__":
    main()
