"""Explanation faithfulness and sanity metrics: deletion/insertion AUC, spurious-region energy, randomisation check.

All functions are pure (the caller's model and tensors are never modified) and batched. Sources:
deletion/insertion from Petsiuk et al., "RISE", BMVC 2018; the cascading model-parameter randomisation check
from Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (Quantus calls it MPRT).
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

BASELINES = ("blur", "mean", "zero")
SIMILARITIES = ("spearman", "pearson", "ssim")
BLUR_KERNEL = 11  # RISE's blur: an 11 x 11 Gaussian kernel with sigma 5 (their gkern(11, 5))
BLUR_SIGMA = 5.0


# ------------------------------------------------------------------------------------------- deletion / insertion


def deletion_insertion(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int = 16,
    baseline: str = "blur",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC per map (Petsiuk et al. 2018): two tensors of N floats in [0, 1].

    AUC = trapezoid rule over the curve of the explained class's probability against x = fraction of pixels
    replaced (deletion; lower is better) or put back (insertion; higher is better), x from 0 to 1 in ``steps``
    steps. The arguments and keyword ``options`` are ``deletion_insertion_curves``'.
    """
    deletion, insertion, x = deletion_insertion_curves(model_fn, images, maps, classes, steps, baseline, **options)
    return torch.trapezoid(deletion, x, dim=1), torch.trapezoid(insertion, x, dim=1)


@torch.no_grad()
def deletion_insertion_curves(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int = 16,
    baseline: str = "blur",
    *,
    multi_label: bool = False,
    batch_size: int = 256,
    blur_kernel: int = BLUR_KERNEL,
    blur_sigma: float = BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves: (N x (steps+1), N x (steps+1), x of steps+1 fractions from 0 to 1).

    Pixels are ranked by decreasing map value (ties: raster order, a stable sort). At step k the first
    n_k = round(k * H * W / steps) pixels (x_k = n_k / (H W)) are, across all channels together, replaced by the
    baseline image (deletion) or taken from the image with the rest from the baseline (insertion); the curve is
    the explained class's softmax probability (sigmoid if ``multi_label``). Step 0 of deletion is the clean
    image, its last step the baseline; insertion runs the other way.

    Args:
        model_fn: images -> B x K logits; put the model in eval mode first (this runs under no_grad).
        images: N x C x H x W, as the model takes them (normalised); for per-label maps pass
            ``images[out.image_index]``.
        maps: N x h x w attention maps at any scale (resized bilinearly to H x W; only their order matters).
        classes: N class indices, the class each map explains.
        baseline: ``blur`` (Gaussian blur of the image, ``blur_kernel`` x ``blur_kernel`` with sigma
            ``blur_sigma``, reflect padding; RISE's choice), ``mean`` (each image's mean colour per channel) or
            ``zero`` (0 in the model's input space: the dataset mean colour for normalised inputs).
        batch_size: perturbed images per ``model_fn`` call (2 * ``steps`` per map in all); results do not depend on
            it (up to float rounding of the model's batched kernels). Memory beyond one call: the pixel ranks
            (N x H x W int64) and the baseline (N x C x H x W), so call it per evaluation batch for large splits.
    """
    _check_curve_inputs(images, maps, classes, steps, baseline, batch_size, blur_kernel, blur_sigma)
    n, _, h, w = images.shape
    pixels = h * w
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps.unsqueeze(1).float(), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    order = maps.reshape(n, pixels).float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=order.device).expand(n, -1))
    counts = (torch.arange(steps + 1, device=images.device) * pixels + steps // 2) // steps  # round(k HW / steps)
    base = _baseline(images, baseline, blur_kernel, blur_sigma)
    classes = classes.to(images.device)

    # Deletion's first and last images are insertion's last and first (clean, baseline): 2 * steps forwards
    # per map instead of 2 * (steps + 1). Rows: every deletion step, then insertion's inner steps.
    device, inner = images.device, max(steps - 1, 0)
    row_image = torch.cat(
        [
            torch.arange(n, device=device).repeat_interleave(steps + 1),
            torch.arange(n, device=device).repeat_interleave(inner),
        ]
    )
    row_step = torch.cat(
        [torch.arange(steps + 1, device=device).repeat(n), torch.arange(1, steps, device=device).repeat(n)]
    )
    row_inserts = torch.arange(len(row_image), device=device) >= n * (steps + 1)
    probs = torch.empty(len(row_image), device=device)
    for start in range(0, len(row_image), batch_size):
        rows = slice(start, start + batch_size)
        idx = row_image[rows]
        chosen = rank[idx] < counts[row_step[rows]].unsqueeze(1)  # the first n_k pixels of each map
        from_baseline = (chosen ^ row_inserts[rows].unsqueeze(1)).view(-1, 1, h, w)
        perturbed = torch.where(from_baseline, base[idx], images[idx])
        probs[rows] = _class_probability(model_fn(perturbed), classes[idx], multi_label)
    deletion = probs[: n * (steps + 1)].view(n, steps + 1)
    insertion = torch.empty_like(deletion)
    insertion[:, 1:-1] = probs[n * (steps + 1) :].view(n, inner)
    insertion[:, 0], insertion[:, -1] = deletion[:, -1], deletion[:, 0]
    x = counts.float() / pixels
    return deletion, insertion, x


def _baseline(images: torch.Tensor, baseline: str, kernel: int, sigma: float) -> torch.Tensor:
    """The image that deleted pixels are taken from (N x C x H x W)."""
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _class_probability(logits: torch.Tensor, classes: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probability of each row's class: sigmoid of its logit (multi-label) or its softmax share."""
    if logits.ndim != 2 or len(logits) != len(classes):
        raise ValueError(
            f"model_fn must return B x K logits for B = {len(classes)} images; got shape "
            f"{tuple(logits.shape)}; wrap the model so it returns logits (e.g. lambda x: gain(x, "
            f"attention=False).logits)."
        )
    if bool((classes >= logits.shape[1]).any()):
        raise ValueError(
            f"classes holds index {int(classes.max())} but the model has {logits.shape[1]} classes; "
            f"pass class indices in 0..{logits.shape[1] - 1}."
        )
    logits = logits.float()
    probs = logits.sigmoid() if multi_label else logits.softmax(dim=1)
    return probs.gather(1, classes.view(-1, 1)).squeeze(1)


def _check_curve_inputs(images, maps, classes, steps, baseline, batch_size, blur_kernel, blur_sigma) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float N x C x H x W tensor; got {_describe(images)}.")
    n = images.shape[0]
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != n:
        raise ValueError(
            f"maps must be an N x h x w tensor with N = {n} (one per image); got {_describe(maps)}; "
            f"for per-label maps pass images[out.image_index] as the images."
        )
    if (
        not isinstance(classes, torch.Tensor)
        or classes.shape != (n,)
        or classes.is_floating_point()
        or bool((classes < 0).any())
    ):
        raise ValueError(
            f"classes must be {n} non-negative integer class indices (one per map); got "
            f"{_describe(classes)}; for one-hot targets use targets.argmax(dim=1)."
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (the curve has steps + 1 points); got {steps!r}.")
    if baseline not in BASELINES:
        raise ValueError(f"baseline '{baseline}' is not one of {BASELINES}; pick one of them.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if baseline == "blur" and (blur_kernel < 1 or blur_kernel % 2 == 0 or not blur_sigma > 0):
        raise ValueError(
            f"the blur baseline needs an odd positive blur_kernel and a positive blur_sigma; got "
            f"{blur_kernel} and {blur_sigma}."
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------- spurious energy


@torch.no_grad()
def spurious_energy(maps: torch.Tensor, region: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Share of each map's mass inside ``region``: sum(M * R * V) / sum(M * V), N floats in [0, 1].

    ``region`` (N x H x W boolean) marks where the dataset's spurious cue lives (for the built-in shapes, the
    background); ``valid`` optionally drops pixels from both sums. An all-zero map gives 0 (it puts no mass
    there); a row whose region has no valid pixel gives NaN (undefined). Maps must be non-negative (e.g.
    Grad-CAM after its ReLU, or min-max normalised). The same quantity as the energy-based pointing game
    (Wang et al., Score-CAM 2020) with the cue's region in place of the object mask.
    """
    shapes = [maps.shape, region.shape] + ([] if valid is None else [valid.shape])
    if maps.ndim != 3 or any(s != maps.shape for s in shapes):
        raise ValueError(
            "spurious_energy expects maps, region and valid of the same shape N x H x W, got "
            f"{', '.join(str(tuple(s)) for s in shapes)}."
        )
    maps = maps.detach().float()
    if bool((maps < 0).any()):
        raise ValueError(
            f"spurious_energy needs non-negative maps; got a minimum of {float(maps.min()):g}; "
            f"apply a ReLU or min-max normalise the maps first."
        )
    valid = torch.ones_like(maps, dtype=torch.bool) if valid is None else valid.bool()
    inside = region.bool() & valid
    masses = (maps * valid).flatten(1).sum(dim=1)
    in_region = (maps * inside).flatten(1).sum(dim=1)
    share = torch.where(masses > 0, in_region / masses.clamp(min=1e-12), 0.0)
    return torch.where(inside.flatten(1).any(dim=1), share, math.nan)


# --------------------------------------------------------------------------------------------------- accumulator


class FaithfulnessMetrics:
    """Epoch-level means of per-map deletion AUC, insertion AUC and spurious-region energy.

    ``faith_n`` maps had deletion/insertion scored; ``deletion_auc`` and ``insertion_auc`` are their means,
    in the dict only once a map was scored. ``spurious_n`` maps had a defined spurious energy (NaN rows, whose
    region is empty, are counted in ``spurious_skipped`` instead); ``spurious_energy`` is their mean, likewise
    only present once defined. Sums and counts only, so ``add`` merges batches or processes exactly.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen since the last reset."""
        self._deletion = 0.0
        self._insertion = 0.0
        self._n = 0
        self._spurious = 0.0
        self._spurious_n = 0
        self._spurious_skipped = 0

    def update(self, deletion: torch.Tensor, insertion: torch.Tensor) -> None:
        """Add N deletion and N insertion AUCs (from ``deletion_insertion``)."""
        if deletion.ndim != 1 or deletion.shape != insertion.shape:
            raise ValueError(
                f"update expects deletion and insertion AUCs as two tensors of N values; got shapes "
                f"{tuple(deletion.shape)} and {tuple(insertion.shape)}."
            )
        if bool(deletion.isnan().any() | insertion.isnan().any()):
            raise ValueError("update got a NaN deletion or insertion AUC; check the model's logits for NaN.")
        self._deletion += float(deletion.double().sum())
        self._insertion += float(insertion.double().sum())
        self._n += len(deletion)

    def update_spurious(self, energy: torch.Tensor) -> None:
        """Add N spurious energies (from ``spurious_energy``); NaN rows are counted as skipped."""
        if energy.ndim != 1:
            raise ValueError(f"update_spurious expects a tensor of N values; got shape {tuple(energy.shape)}.")
        defined = ~energy.isnan()
        self._spurious += float(energy[defined].double().sum())
        self._spurious_n += int(defined.sum())
        self._spurious_skipped += int((~defined).sum())

    def add(self, other: FaithfulnessMetrics) -> None:
        """Fold in what ``other`` has seen (one batch, or another process's share) as if seen here."""
        self._deletion += other._deletion
        self._insertion += other._insertion
        self._n += other._n
        self._spurious += other._spurious
        self._spurious_n += other._spurious_n
        self._spurious_skipped += other._spurious_skipped

    def compute(self) -> dict[str, float]:
        """Means over everything seen since the last reset; counts always, means once defined."""
        out = {
            "faith_n": float(self._n),
            "spurious_n": float(self._spurious_n),
            "spurious_skipped": float(self._spurious_skipped),
        }
        if self._n:
            out |= {"deletion_auc": self._deletion / self._n, "insertion_auc": self._insertion / self._n}
        if self._spurious_n:
            out["spurious_energy"] = self._spurious / self._spurious_n
        return out


# ---------------------------------------------------------------------------------------- randomisation check


def randomisation_check(
    gain: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    order: Sequence[str] | None = None,
    similarity: str = "spearman",
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018): [(layer, mean similarity to the original)].

    A deep copy of ``gain`` (the caller's model is never touched) is put in eval mode; its attention maps for
    ``images`` explaining ``targets`` (B x K 0/1; default: the original model's predicted classes, then held
    fixed) are the originals. Then, from the top (the head) down, one layer group after another is
    re-initialised and stays so (cascading); after each, the maps are recomputed and compared map by map.
    Similarities near 1 after the head or the top blocks are re-initialised mean the maps do not depend on the
    learnt weights (they fail the check).

    Groups (``order`` None, ``randomisation_groups``): the backbone's top-level children that hold parameters,
    with ``nn.Sequential``/``nn.ModuleList`` children split into their own children (timm ResNets: fc, layer4.1,
    layer4.0, ..., layer1.0, bn1, conv1; ViTs: head, norm, blocks.11, ..., patch_embed), cascading in reverse
    registration order, which is the forward order in timm models. ``order`` may instead list module names of
    the backbone (``gain.model``), top first. Each module in a group is re-initialised with its
    ``reset_parameters()`` (BatchNorm also resets its running statistics); parameters of modules without one are
    redrawn from a normal with the tensor's own mean and std. Parameters held directly by the backbone itself
    (a ViT's ``pos_embed``, ``cls_token``) are not in any group. Randomness comes from ``torch.manual_seed(seed)``
    inside a forked RNG, so the results are deterministic and the caller's RNG state is left as it was.

    similarity: per map pair, ``spearman`` (rank correlation, ties get average ranks), ``pearson`` or ``ssim``
    (torchmetrics' SSIM, Gaussian 11 x 11, sigma 1.5, data range 1), the last two on min-max normalised maps.
    A pair with a flat map has no Spearman/Pearson correlation (NaN) and is left out of the mean, which is NaN
    when every pair is flat.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity '{similarity}' is not one of {SIMILARITIES}; pick one of them.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if not hasattr(gain, "model"):
        raise ValueError(
            f"randomisation_check needs a GAIN module (with .model, the backbone); got {type(gain).__name__}."
        )
    copied = copy.deepcopy(gain).eval()
    backbone = copied.model
    groups = list(order) if order is not None else randomisation_groups(backbone)
    modules = _resolve_groups(backbone, groups)
    if targets is None:
        with torch.no_grad():
            targets = torch.cat(
                [copied.predicted_classes(copied(chunk, attention=False).logits) for chunk in images.split(batch_size)]
            )
    original = _attention_maps(copied, images, targets, batch_size)
    results = []
    device = next(backbone.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, module in zip(groups, modules):
            _reinitialise(module)
            maps = _attention_maps(copied, images, targets, batch_size)
            results.append((name, _mean_similarity(original, maps, similarity)))
    return results


def randomisation_groups(model: nn.Module) -> list[str]:
    """The default cascade of ``randomisation_check``: module names, top (head) first."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{sub}" for sub, grand in child.named_children() if _has_parameters(grand)]
        elif _has_parameters(child):
            names.append(name)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no child module with parameters to re-initialise; pass "
            f"order= with module names."
        )
    return names[::-1]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _resolve_groups(model: nn.Module, names: list[str]) -> list[nn.Module]:
    named = dict(model.named_modules())
    modules = []
    for name in names:
        if name not in named or not _has_parameters(named[name]):
            with_params = [n for n, m in named.items() if n and _has_parameters(m)]
            close = difflib.get_close_matches(name, with_params, n=5, cutoff=0.4)
            hint = f"close matches: {close}" if close else f"e.g. {randomisation_groups(model)[:5]}"
            raise ValueError(
                f"order names '{name}', which is not a module with parameters in {type(model).__name__}; {hint}."
            )
        modules.append(named[name])
    return modules


@torch.no_grad()
def _reinitialise(module: nn.Module) -> None:
    """Re-initialise every parameter under ``module``: reset_parameters() where a module has it, else a redraw."""
    covered: set[int] = set()
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if own and callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
            covered |= {id(p) for p in own}
    for p in module.parameters():
        if id(p) not in covered:
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.normal_(float(p.mean()), std)


def _attention_maps(gain: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    maps = [
        gain(images[i : i + batch_size], targets[i : i + batch_size], mining=False).attention.detach().float()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(maps)


def _mean_similarity(a: torch.Tensor, b: torch.Tensor, similarity: str) -> float:
    """Mean over map pairs of the chosen similarity, leaving out undefined (NaN) pairs."""
    if similarity == "ssim":
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        values = ssim(_minmax(b).unsqueeze(1), _minmax(a).unsqueeze(1), data_range=1.0, reduction="none")
    elif similarity == "pearson":
        values = pearson(_minmax(a).flatten(1), _minmax(b).flatten(1))
    else:
        values = spearman(a.flatten(1), b.flatten(1))
    values = values[~values.isnan()]
    return float(values.mean()) if len(values) else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of N x P tensors (average ranks for ties; NaN for a constant row)."""
    return pearson(average_ranks(a), average_ranks(b))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of N x P tensors; NaN where a row is constant."""
    a = a.double() - a.double().mean(dim=1, keepdim=True)
    b = b.double() - b.double().mean(dim=1, keepdim=True)
    denom = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    corr = (a * b).sum(dim=1) / denom
    return torch.where(denom > 0, corr, math.nan).float()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks 1..P of an N x P tensor, tied values sharing their mean rank (scipy's rankdata 'average')."""
    n, p = values.shape
    sorted_values, order = values.sort(dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.long)
    new_group[:, 1:] = (sorted_values[:, 1:] != sorted_values[:, :-1]).long()
    group = new_group.cumsum(dim=1) - 1 + torch.arange(n, device=values.device).unsqueeze(1) * p  # unique per row
    positions = torch.arange(1, p + 1, device=values.device, dtype=torch.float64).expand(n, p)
    total = torch.zeros(n * p, dtype=torch.float64, device=values.device).index_add_(
        0, group.flatten(), positions.flatten()
    )
    count = torch.zeros(n * p, dtype=torch.float64, device=values.device).index_add_(
        0, group.flatten(), torch.ones(n * p, dtype=torch.float64, device=values.device)
    )
    mean_rank = (total / count.clamp(min=1))[group]
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1]; a flat map becomes all zeros."""
    low = maps.flatten(1).amin(dim=1).view(-1, 1, 1)
    span = maps.flatten(1).amax(dim=1).view(-1, 1, 1) - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=1e-12), 0.0)
