"""Step-time benchmark: plain classification vs GAIN (batch, per_label) vs a hook-plus-full-backward GAIN.

    python -m gain_exp.bench                       # resnet18, batch 8, 160 px, CPU
    python -m gain_exp.bench --device cuda --batch 64 --size 224 --amp --channels-last
    python -m gain_exp.bench --compile --modes features --variants plain,batch
    python -m gain_exp.bench --cams gradcam,gradcam++,xgradcam,layercam,hirescam --grad-layer layer3 --modes features
    python -m gain_exp.bench --backbone vit_small_patch16_224 --size 224 --modes features,full

Data-loading throughput (read + decode + resize + normalise through a DataLoader), images/s:

    python -m gain_exp.bench --data /tmp/synth --make-images 64 --size 224 --workers 0,2
    python -m gain_exp.bench --data VOCdevkit/VOC2012/JPEGImages --workers 0,4,8 --decode pil
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Sequence

import timm
import torch
import torch.nn.functional as F

from gain_exp.core.attention import CAM_METHODS
from gain_exp.core.gain import GAIN, GRAD_MODES, compile_model
from gain_exp.core.losses import GAINLoss
from gain_exp.output.files import write_json

VARIANTS = ("plain", "batch", "per_label", "reference")
DECODERS = ("pil", "torchvision")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNTH_SIZE = (500, 375)  # width x height of --make-images (a typical VOC photo)


@contextmanager
def _count_saved(counter: list[int]) -> Iterator[None]:
    """Adds the bytes autograd saves for backward (activation memory, comparable on any device)."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _reference_step(
    model, x, targets, loss_fn: GAINLoss, opt, amp: Callable[[], AbstractContextManager], sigma=0.5, omega=10.0
) -> None:
    """GAIN as public implementations write it: a forward hook and a full .backward() for the gradients."""
    store = {}
    layer = model.layer4 if hasattr(model, "layer4") else model.stages[-1]
    handle = layer.register_forward_hook(lambda _m, _i, out: store.update(f=out))
    try:
        with amp():
            logits = model(x)
    finally:
        handle.remove()
    if "f" not in store:
        raise RuntimeError("the forward hook never ran: a compiled graph does not call hooks added after it was built")
    store["f"].retain_grad()
    (logits * targets).sum().backward(retain_graph=True)
    if store["f"].grad is None:
        raise RuntimeError("retain_grad() on the hooked feature map got no gradient")
    weights = store["f"].grad.mean(dim=(2, 3), keepdim=True)
    opt.zero_grad(set_to_none=True)
    with amp():
        cam = F.relu((weights * store["f"]).sum(1, keepdim=True))
        flat = cam.flatten(1)
        cam = (cam - flat.min(1).values.view(-1, 1, 1, 1)) / (flat.max(1).values - flat.min(1).values + 1e-7).view(
            -1, 1, 1, 1
        )
        mask = torch.sigmoid(omega * (F.interpolate(cam, size=x.shape[-2:], mode="bilinear") - sigma))
        model.eval()  # same frozen-BN AM stream as ours
        try:
            am_logits = model(x - mask * x)
        finally:
            model.train()
        loss = (
            loss_fn.classification(logits, targets) + (am_logits.softmax(1) * targets).sum(1).div(targets.sum(1)).mean()
        )
    loss.backward()
    opt.step()


def _time(step: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> tuple[float, int, int | None]:
    """(median seconds per step, bytes autograd saved for backward in one step, peak CUDA bytes or None).

    The CUDA peak is reset after the warm-up, so each variant's peak is its own (weights, gradients and
    optimiser state that stay allocated count in every row)."""
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
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), saved[0], peak


def _create(backbone: str, classes: int, size: int) -> torch.nn.Module:
    """The timm model; transformers (ViT/DeiT/Swin) are built for ``size`` px, CNNs take any size."""
    try:
        return timm.create_model(backbone, pretrained=False, num_classes=classes, img_size=size)
    except TypeError:  # a CNN: no img_size argument
        return timm.create_model(backbone, pretrained=False, num_classes=classes)


def why_not(error: BaseException) -> str:
    """A short phrase for the table's "n/a (...)" cell; the full message goes under the table."""
    msg = str(error)
    if "double backward" in msg:
        return "torch.compile has no double backward"
    if "donated buffers" in msg:
        return "compiled backward with donated buffers"
    if "Batching rule not implemented" in msg:
        return "no vmap over compiled backward (is_grads_batched)"
    if "hook never ran" in msg:
        return "hook not run by compiled graph"
    if "retain_grad" in msg:
        return "no retain_grad inside compiled graph"
    if "appears to not have been used in the graph" in msg:
        return "map layer inside compiled forward_features"
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"{type(error).__name__}: {first[:50]}" if first else type(error).__name__


def _flags(amp: bool, channels_last: bool, compile: bool, backend: str) -> str:
    used = (
        (["amp bf16"] if amp else [])
        + (["channels_last"] if channels_last else [])
        + ([f"compile ({backend})"] if compile else [])
    )
    return ", ".join(used) if used else "none"


def run(
    backbone: str,
    batch: int,
    size: int,
    classes: int,
    labels: int,
    device: str,
    warmup: int,
    repeats: int,
    modes: Sequence[str],
    variants: Sequence[str] = VARIANTS,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
    cams: Sequence[str] = ("gradcam",),
    grad_layer: str | None = None,
) -> list[dict]:
    """Time every variant and return one row per variant.

    A row is {variant, ms, ratio, saved, peak, graphs, breaks, na, error}: ``ms``/``ratio`` are None and ``na`` a
    short reason when the variant cannot run under --compile (``error`` then holds the full message); ``peak`` is
    None off CUDA; ``graphs``/``breaks`` count the graphs Dynamo compiled and the graph breaks it hit for this row
    (None without --compile).
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _create(backbone, classes, size).to(dev, memory_format=fmt).train()
    if compile:
        compile_model(model, compile_backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
    one = F.one_hot(torch.arange(batch, device=dev) % classes, classes).float()
    multi = torch.zeros(batch, classes, device=dev)
    for j in range(labels):
        multi[torch.arange(batch), (torch.arange(batch, device=dev) + j) % classes] = 1.0
    ce, bce = GAINLoss(multi_label=False), GAINLoss(multi_label=True)

    def autocast() -> AbstractContextManager:
        # as the trainer does: forward passes and loss under bf16 autocast, backward outside
        return torch.autocast(dev.type, dtype=torch.bfloat16) if amp else nullcontext()

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = ce.classification(model(x), one)
        loss.backward()
        opt.step()

    def gain_step(gain: GAIN, targets: torch.Tensor, loss_fn: GAINLoss) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(gain(x, targets), targets).total
            loss.backward()
            opt.step()

        return step

    jobs: list[tuple[str, Callable[[], None]]] = []
    if "plain" in variants:
        jobs.append(("plain classification", plain))
    for mode in modes:
        for cam in cams:
            named = f", {cam}" if list(cams) != ["gradcam"] else ""  # rows name the CAM when more than Grad-CAM runs
            if "batch" in variants:
                g = GAIN(model, grad_layer, formulation="batch", grad_mode=mode, cam=cam).train()
                jobs.append((f"GAIN batch, {mode}{named}", gain_step(g, one, ce)))
            if "per_label" in variants:
                g = GAIN(model, grad_layer, formulation="per_label", grad_mode=mode, cam=cam, multi_label=True).train()
                jobs.append((f"GAIN per_label x{labels}, {mode}{named}", gain_step(g, multi, bce)))
    if "reference" in variants and (hasattr(model, "layer4") or hasattr(model, "stages")):
        jobs.append(("reference: hook + full backward", lambda: _reference_step(model, x, one, ce, opt, autocast)))

    rows: list[dict] = []
    base = None
    with _compile_settings() if compile else nullcontext():
        for name, step in jobs:
            row = dict(
                variant=name, ms=None, ratio=None, saved=None, peak=None, graphs=None, breaks=None, na=None, error=None
            )
            counters = _dynamo_counters() if compile else None
            try:
                t, row["saved"], row["peak"] = _time(step, warmup, repeats, dev)
            except Exception as e:  # noqa: BLE001 - only under --compile; in the table and its message under it
                if not compile:
                    raise
                row["na"], row["error"] = why_not(e), f"{type(e).__name__}: {e}"
                opt.zero_grad(set_to_none=True)
                model.train()
            else:
                row["ms"] = t * 1e3
                if name == "plain classification":
                    base = t
                row["ratio"] = t / base if base else None
            finally:
                if counters is not None:
                    row["graphs"] = counters["stats"]["unique_graphs"]
                    row["breaks"] = sum(counters["graph_break"].values())
            rows.append(row)
    return rows


@contextmanager
def _compile_settings() -> Iterator[None]:
    """Two torch.compile settings GAIN's step needs; both are read when a graph is built, so they span the run.

    - The Grad-CAM ``autograd.grad(retain_graph=True)`` runs backward through the compiled ``forward_head`` before
      the loss's backward does: AOTAutograd's donated buffers (freed by the first backward) refuse that.
    - The reference step adds a forward hook per step: Dynamo skips hook guards by default, so a graph built
      before the hook existed would silently never call it; with guards it recompiles once with the hook.
    """
    import torch._dynamo
    import torch._functorch.config

    with (
        torch._functorch.config.patch(donated_buffer=False),
        torch._dynamo.config.patch(skip_nnmodule_hook_guards=False),
    ):
        yield


def _dynamo_counters():
    """Dynamo's global counters, cleared: what the next variant compiles is counted from here."""
    from torch._dynamo.utils import counters

    counters.clear()
    return counters


def to_json(rows: list[dict], args: argparse.Namespace) -> dict:
    """``--json``: the settings, the machine and every row, each with ``images_s`` (batch / median step time; for
    ``per_label`` the batch's images, not its (image, label) pairs)."""
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    return dict(
        backbone=args.backbone,
        batch=args.batch,
        size=args.size,
        classes=args.classes,
        labels=args.labels,
        device=args.device,
        device_name=torch.cuda.get_device_name(dev) if cuda else "cpu",
        threads=torch.get_num_threads(),
        warmup=args.warmup,
        repeats=args.repeats,
        flags=dict(
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            compile_backend=args.compile_backend if args.compile else None,
            label=_flags(args.amp, args.channels_last, args.compile, args.compile_backend),
        ),
        tf32=dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32),
        torch=torch.__version__,
        rows=[{**r, "images_s": None if r["ms"] is None else args.batch * 1e3 / r["ms"]} for r in rows],
    )


def format_table(rows: list[dict], device: str) -> str:
    """Markdown table of the rows; a variant that could not run shows "n/a (reason)", its error under the table."""
    cuda = device.startswith("cuda")
    compiled = any(r.get("graphs") is not None for r in rows)
    head = "| variant | median ms/step | x plain | saved activations MB |" + (" peak CUDA MB |" if cuda else "")
    head += " graphs (breaks) |" if compiled else ""
    lines = [head, "|---|---:|---:|---:|" + ("---:|" if cuda else "") + ("---:|" if compiled else "")]

    def mb(v: int | None) -> str:
        return "–" if v is None else f"{v / 2**20:.0f}"

    notes = []
    for r in rows:
        if r["na"] is not None:
            cells = [f"n/a ({r['na']})", "–", "–"] + (["–"] if cuda else [])
            notes.append(f"- {r['variant']}: {r['error'].strip().splitlines()[0][:300]}")
        else:
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
            cells = [f"{r['ms']:.1f}", ratio, mb(r["saved"])] + ([mb(r["peak"])] if cuda else [])
        if compiled:
            cells.append(f"{r['graphs']} ({r['breaks']})")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


# ------------------------------------------------------------------------------------------ data loading
def find_images(folder: Path) -> list[Path]:
    """Every JPEG/PNG under ``folder`` (recursively, by suffix, any case), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` synthetic 500 x 375 JPEGs (smooth colour fields plus noise, so they compress like photos)."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    w, h = SYNTH_SIZE
    paths = []
    for i in range(n):
        field = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(h, w), mode="bicubic", align_corners=False)
        pixels = (field[0] + 0.08 * torch.randn(3, h, w, generator=gen)).clamp(0, 1).mul(255).to(torch.uint8)
        path = folder / f"synthetic_{i:05d}.jpg"
        PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, quality=90)
        paths.append(path)
    return paths


class ImageFolderLoad(torch.utils.data.Dataset):
    """Read + decode + resize to size x size + normalise (ImageNet mean/std), with PIL or torchvision.io."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, paths: Sequence[Path], size: int, decode: str) -> None:
        if decode not in DECODERS:
            raise ValueError(f"decode='{decode}' is unknown; choose one of {list(DECODERS)}.")
        self.paths, self.size, self.decode = list(paths), size, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        path = self.paths[i]
        if self.decode == "pil":
            import PIL.Image

            with PIL.Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), PIL.Image.BILINEAR)
            img = TF.pil_to_tensor(im)
        else:
            from torchvision.io import ImageReadMode, decode_image, read_file

            img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            img = TF.resize(img, [self.size, self.size], antialias=True)
        return TF.normalize(TF.to_dtype(img, torch.float32, scale=True), mean=self.MEAN, std=self.STD)


def run_data(
    paths: Sequence[Path], size: int, batch: int, workers: Sequence[int], decoders: Sequence[str], passes: int
) -> list[dict]:
    """images/s of full passes over ``paths`` through a DataLoader, median of ``passes`` (worker start included)."""
    rows = []
    for decode in decoders:
        data = ImageFolderLoad(paths, size, decode)
        for n in workers:
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                for _batch in torch.utils.data.DataLoader(data, batch_size=batch, num_workers=n):
                    pass
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            rows.append(dict(decode=decode, workers=n, images_s=len(paths) / t, ms_image=t * 1e3 / len(paths)))
    return rows


def format_data_table(rows: list[dict]) -> str:
    lines = ["| decode | workers | images/s | ms/image |", "|---|---:|---:|---:|"]
    lines += [f"| {r['decode']} | {r['workers']} | {r['images_s']:.0f} | {r['ms_image']:.2f} |" for r in rows]
    return "\n".join(lines)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of integers, e.g. 0,2,4") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must list worker counts >= 0, e.g. 0,2,4")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of {', '.join(allowed)}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--labels", type=int, default=3, help="labels per image for per_label")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--modes", type=_choices(GRAD_MODES), default=list(GRAD_MODES), help="comma-separated grad modes (default: all)"
    )
    parser.add_argument(
        "--cams",
        type=_choices(tuple(CAM_METHODS)),
        default=["gradcam"],
        help=f"comma-separated gain.cam methods, of {','.join(CAM_METHODS)} (default: gradcam)",
    )
    parser.add_argument("--grad-layer", help="the map layer (backbone.grad_layer); default: the family's")
    parser.add_argument(
        "--variants",
        type=_choices(VARIANTS),
        default=list(VARIANTS),
        help=f"comma-separated rows to time, of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast around forward passes and loss")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile forward_features and forward_head")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the settings and rows (+ images/s) here")
    data = parser.add_argument_group("data loading (--data)")
    data.add_argument("--data", type=Path, help="time reading + decoding this folder of JPEG/PNG images instead")
    data.add_argument("--workers", type=_int_list, default=[0], help="DataLoader workers, a comma list (e.g. 0,2,4)")
    data.add_argument(
        "--decode",
        type=_choices(DECODERS),
        default=list(DECODERS),
        help="pil, torchvision or both as a comma list (default: both)",
    )
    data.add_argument("--passes", type=int, default=3, help="passes over the folder, median reported")
    data.add_argument("--limit", type=int, help="use only the first N images (sorted by path)")
    data.add_argument(
        "--make-images",
        type=int,
        metavar="N",
        help="first write N synthetic 500x375 JPEGs (synthetic_00000.jpg, ...) into --data",
    )
    args = parser.parse_args(argv)

    if args.data is None:
        if args.make_images is not None:
            return _fail("--make-images N writes into the folder given by --data; add --data <folder>.")
        rows = run(
            args.backbone,
            args.batch,
            args.size,
            args.classes,
            args.labels,
            args.device,
            args.warmup,
            args.repeats,
            args.modes,
            args.variants,
            args.amp,
            args.channels_last,
            args.compile,
            args.compile_backend,
            args.cams,
            args.grad_layer,
        )
        print(
            f"{args.backbone}, batch {args.batch}, {args.size} px, {args.device}, "
            f"{torch.get_num_threads()} threads, median of {args.repeats}, "
            f"flags: {_flags(args.amp, args.channels_last, args.compile, args.compile_backend)}"
        )
        print(format_table(rows, args.device))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, to_json(rows, args))
        return 0

    if args.amp or args.channels_last or args.compile or args.json is not None:
        return _fail("--amp, --channels-last, --compile and --json apply to the step benchmark, not to --data.")
    if args.passes < 1 or args.batch < 1 or args.size < 1:
        return _fail("--passes, --batch and --size must be at least 1.")
    if args.make_images is not None:
        if args.make_images < 1:
            return _fail(f"--make-images {args.make_images} must be at least 1.")
        make_images(args.data, args.make_images)
    if not args.data.is_dir():
        return _fail(
            f"{args.data} is not a folder; give a folder of JPEG/PNG images "
            f"(or add --make-images N to write synthetic ones there)."
        )
    paths = find_images(args.data)[: args.limit]
    if not paths:
        return _fail(
            f"{args.data} holds no JPEG or PNG image (searched recursively for "
            f"{', '.join(IMAGE_SUFFIXES)}); add --make-images N to write synthetic ones there."
        )
    rows = run_data(paths, args.size, args.batch, args.workers, args.decode, args.passes)
    print(
        f"data: {args.data}, {len(paths)} images, batch {args.batch}, {args.size} px, "
        f"{torch.get_num_threads()} threads, median of {args.passes} passes (worker start included)"
    )
    print(format_data_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
