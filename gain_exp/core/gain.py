"""GAIN: a classifier whose Grad-CAM attention is trained through an attention-mining stream."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gain_exp.core.attention import (
    CAM_METHODS,
    NORMALISATIONS,
    FeatureExtractor,
    class_activation_maps,
    normalise,
    unfuse_attention_after,
)

FORMULATIONS = ("batch", "per_label")
GRAD_MODES = ("full", "features", "frozen")


@dataclass
class GAINOutput:
    """What one GAIN forward produces; N = B for ``batch``, N = number of (image, label) pairs for ``per_label``."""

    logits: torch.Tensor  # B x K classification-stream scores
    attention: torch.Tensor | None = None  # N x H x W Grad-CAM at image size, normalised
    mask: torch.Tensor | None = None  # N x H x W soft mask T(A)
    masked_images: torch.Tensor | None = None  # N x 3 x H x W, I* = I - T(A) * I
    am_logits: torch.Tensor | None = None  # N x K scores of I* (attention-mining stream)
    image_index: torch.Tensor | None = None  # N: the image each map belongs to
    class_index: torch.Tensor | None = None  # N: the class each map explains (per_label only)
    map_targets: torch.Tensor | None = None  # N x K: the classes each map explains (0/1)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient flowing back by a constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class GAIN(nn.Module):
    """Wraps a timm classifier with a differentiable CAM (Grad-CAM by default), soft masking and attention mining.

    Args:
        model: a classifier with ``forward_features``/``forward_head`` (any timm CNN), a timm ViT/DeiT or Swin,
            or any model together with ``grad_layer``.
        grad_layer: module name whose output is the CAM feature map. Default per family: forward_features (CNNs,
            gradient through the head only), the last block's ``norm1`` (ViT/DeiT: prefix tokens dropped, patch
            tokens on the patch grid; the gradient runs through the last block, since the head reads only the
            class token), the last stage's last block (Swin, NHWC; gradient through the final norm and head).
        cam: how the map is formed from the feature map A and g = dS/dA (``attention.CAM_METHODS``): ``gradcam``,
            ``gradcam++``, ``xgradcam``, ``layercam`` or ``hirescam``. Under ``grad_mode=full`` the loss
            differentiates through each formula as written: through g (second order, through the layers after A)
            in all; also through sum_ab A in XGrad-CAM's and Grad-CAM++'s weights; Grad-CAM++'s higher-order terms
            are pytorch-grad-cam's g^2 and g^3 (the closed form for exp(S)), differentiated as such. Under
            ``features``/``frozen`` the weights are constants. With ``full``, timm attention modules after the map
            layer (ViT's last block) use the unfused attention path: the fused kernels have no double backward.
        formulation: ``batch`` (one map per image from the sum of its target classes' logits) or
            ``per_label`` (one map and one masked image per (image, target class) pair; Eq. 5).
        grad_mode: ``full`` (keep the graph through the CAM weights), ``features`` (weights
            detached) or ``frozen`` (weights detached and the AM stream's parameters get no gradient).
        sigma, omega: threshold and scale of the soft mask T(A) = sigmoid(omega (A - sigma)).
        normalisation: ``minmax`` (public implementations), ``max`` or ``none``, applied per map before
            thresholding and L_e. Min-max hides a uniform rise of the map (a cue spread over the image) from
            L_e; on the built-in shapes ``max`` lifted GAIN_ext's unbiased accuracy 0.50 -> 0.76 (docs/results/shapes.md).
        fill: what erased pixels become: ``zero`` (I - T I on the input tensor, the paper's formula),
            ``mean`` (each image's mean colour) or an RGB triple in [0, 1] pixel units.
        am_grad_scale: factor on the gradient flowing back through the AM stream's input.
        freeze_am_bn: run the AM stream with batch-norm in eval mode (no running-stat update).
        multi_label: at evaluation, explain every class with sigmoid > 0.5 instead of the argmax.
        pixel_mean, pixel_std: input normalisation (for RGB fills); default: the model's pretrained_cfg.
    """

    def __init__(
        self,
        model: nn.Module,
        grad_layer: str | None = None,
        formulation: str = "batch",
        grad_mode: str = "features",
        cam: str = "gradcam",
        sigma: float = 0.5,
        omega: float = 10.0,
        normalisation: str = "minmax",
        fill: str | Sequence[float] = "zero",
        am_grad_scale: float = 1.0,
        freeze_am_bn: bool = True,
        multi_label: bool = False,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_options(sigma, omega, formulation, grad_mode, normalisation, fill, am_grad_scale, cam=cam)
        self._targets_checked = False
        self.model = model
        self.extractor = FeatureExtractor(model, grad_layer)
        if grad_mode == "full":  # fused attention kernels have no double backward
            unfuse_attention_after(model, self.extractor.layer)
        self.formulation = formulation
        self.grad_mode = grad_mode
        self.cam = cam
        self.sigma = float(sigma)
        self.omega = float(omega)
        self.normalisation = normalisation
        self.am_grad_scale = float(am_grad_scale)
        self.freeze_am_bn = freeze_am_bn
        self.multi_label = multi_label
        # A backbone without a spatial feature map (e.g. the mlp) has no Grad-CAM: its maps are NaN, never a flat
        # map passed off as attention (the localisation metrics skip NaN maps; configs refuse the map losses).
        self.spatial_map = bool(getattr(model, "spatial_map", True))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(pixel_mean or cfg.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)
        std = torch.tensor(pixel_std or cfg.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)
        self.fill = _parse_fill(fill)
        if isinstance(self.fill, torch.Tensor):
            self.register_buffer("fill_value", ((self.fill - mean) / std).view(1, 3, 1, 1), persistent=False)
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._first_conv = _first_conv(model)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention: bool = True,
        mining: bool = True,
        formulation: str | None = None,
    ) -> GAINOutput:
        """Classify ``images`` and, unless switched off, compute attention, masks and the AM stream.

        ``targets`` (B x K, 0/1 float) are the classes to explain; without them (or in eval mode with
        none given) the predicted classes are explained. ``attention=False`` is plain classification;
        ``mining=False`` skips the attention-mining stream (e.g. L_e only). ``formulation``: this call's, instead
        of the module's (the evaluator explains each label of multi-label data on its own, whatever the training).
        """
        self._check_inputs(images, targets)
        formulation = formulation or self.formulation
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation={formulation!r}: choose one of {', '.join(FORMULATIONS)}.")
        if not attention:
            return GAINOutput(logits=self.model(images))
        # Outside training (or under no_grad) attention is still computed, from a detached feature
        # leaf, so no parameter, gradient or BN statistic is touched.
        track = self.training and torch.is_grad_enabled()
        with torch.enable_grad():
            features, logits = self._features_and_logits(images, leaf=not track)
            if targets is None:
                targets = self.predicted_classes(logits.detach())
            targets = targets.to(logits.dtype)
            out = self._attention(
                images, features, logits, targets, formulation, create_graph=track and self.grad_mode == "full"
            )
        if not track:
            out.logits, out.attention, out.mask = out.logits.detach(), out.attention.detach(), out.mask.detach()
            out.masked_images = out.masked_images.detach()
        if mining:
            with torch.set_grad_enabled(track):
                out.am_logits = self._mine(out.masked_images)
        return out

    def predicted_classes(self, logits: torch.Tensor) -> torch.Tensor:
        """B x K 0/1 matrix of predicted classes: the argmax, or sigmoid > 0.5 (at least one) if multi-label."""
        top = F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
        if not self.multi_label:
            return top
        return torch.maximum((logits > 0).to(logits.dtype), top)

    def _features_and_logits(self, images: torch.Tensor, leaf: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not leaf:
            return self.extractor(images)
        if self.extractor.module is None:
            with torch.no_grad():
                features = self.model.forward_features(images)
            return self.extractor.head(features.detach().requires_grad_(True))
        handle = self.extractor.module.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
        try:
            return self.extractor(images)
        finally:
            handle.remove()

    def _attention(self, images, features, logits, targets, formulation: str, create_graph: bool) -> GAINOutput:
        if formulation == "batch":
            cams = class_activation_maps(features, logits, targets, create_graph, self.cam)
            image_index = torch.arange(images.shape[0], device=images.device)
            class_index, map_targets = None, targets
        else:
            image_index, class_index = targets.nonzero(as_tuple=True)
            # rank of each pair within its image: maps for the r-th label of every image share one
            # batched backward, so the cost grows with the most labels on one image, not their sum.
            first = torch.searchsorted(image_index, image_index, right=False)
            rank = torch.arange(image_index.numel(), device=images.device) - first
            weights = torch.zeros(
                (int(rank.max()) + 1 if rank.numel() else 1, *targets.shape), dtype=logits.dtype, device=logits.device
            )
            weights[rank, image_index, class_index] = 1.0
            cams = class_activation_maps(features, logits, weights, create_graph, self.cam)[rank, image_index]
            map_targets = F.one_hot(class_index, targets.shape[1]).to(logits.dtype)
        attention = F.interpolate(
            normalise(cams, self.normalisation).unsqueeze(1),
            size=images.shape[-2:],
            mode="bilinear",
            align_corners=False,
        ).squeeze(1)
        if not self.spatial_map:
            attention = attention + math.nan  # still in the graph: a loss that reads it gets NaN, not a silent zero
        mask = torch.sigmoid(self.omega * (attention - self.sigma))  # Eq. 4
        source = images[image_index] if formulation == "per_label" else images
        masked = source - mask.unsqueeze(1) * (source - self._fill_like(source))  # Eq. 3
        return GAINOutput(
            logits=logits,
            attention=attention,
            mask=mask,
            masked_images=masked,
            image_index=image_index,
            class_index=class_index,
            map_targets=map_targets,
        )

    def _fill_like(self, source: torch.Tensor) -> torch.Tensor | float:
        if self.fill == "zero":
            return 0.0
        if self.fill == "mean":
            return source.mean(dim=(-2, -1), keepdim=True)
        return self.fill_value.to(source.dtype)

    def _mine(self, masked: torch.Tensor) -> torch.Tensor:
        """Score I* with the shared network (the attention-mining stream)."""
        if masked.requires_grad and self.am_grad_scale != 1.0:
            masked = _ScaleGrad.apply(masked, self.am_grad_scale)
        with self._am_batch_norm():
            if self.grad_mode == "frozen" and torch.is_grad_enabled():
                params = {name: p.detach() for name, p in self.model.named_parameters()}
                return torch.func.functional_call(self.model, params, (masked,))
            return self.model(masked)

    @contextmanager
    def _am_batch_norm(self) -> Iterator[None]:
        switched = [m for m in self._batch_norms if m.training] if self.freeze_am_bn else []
        for m in switched:
            m.train(False)
        try:
            yield
        finally:
            for m in switched:
                m.train(True)

    def _check_inputs(self, images: torch.Tensor, targets: torch.Tensor | None) -> None:
        """One sentence for images or targets the model cannot take: they are never converted silently (integer
        pixels would need the model's normalisation, and a cast would change the dtype the caller gets back)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            if not isinstance(images, torch.Tensor):
                got, fix = f"are a {type(images).__name__}", "stack them with torch.stack(images)"
            else:
                got = f"have shape {tuple(images.shape)}"
                fix = "add the batch dimension with images.unsqueeze(0)" if images.dim() == 3 else "pass a batch"
            raise ValueError(f"images must be a B x C x H x W tensor but {got}; {fix}.")
        _check_dtype(images, self.model)
        if self._first_conv is not None and images.shape[1] != self._first_conv[1]:
            (layer, want), got = self._first_conv, images.shape[1]
            grey = f" (grey ones as images.expand(-1, {want}, -1, -1))" if got == 1 else ""
            raise ValueError(
                f"images have {got} channel{'s' if got != 1 else ''} but the backbone's first layer ({layer}) takes "
                f"{want}; pass B x {want} x H x W images{grey}."
            )
        if targets is None:
            return
        k = self.num_classes
        shape_ok = targets.dim() == 2 and targets.shape[0] == images.shape[0] and (k is None or targets.shape[1] == k)
        if not shape_ok or not targets.is_floating_point():
            want = f"{images.shape[0]} x {k if k is not None else 'K'}"
            raise ValueError(
                f"targets must be a float {want} multi-hot (or one-hot) tensor; got {targets.dtype} "
                f"{tuple(targets.shape)}; convert class indices with F.one_hot(y, num_classes).float()."
            )
        # Values are checked on the CPU always, on a device once (a per-step check would synchronise every step):
        # soft or signed targets would silently turn Grad-CAM's class weights into something else.
        if targets.device.type == "cpu" or not self._targets_checked:
            self._targets_checked = True
            bad = ~((targets == 0) | (targets == 1))
            if bool(bad.any()):
                value = targets[bad][0].item()
                raise ValueError(
                    f"targets must be 0/1 (multi-hot or one-hot); got {value}; GAIN explains the "
                    f"classes marked 1, so pass hard labels (e.g. (soft > 0.5).float())."
                )


CAST = {torch.float32: "images.float()", torch.float64: "images.double()", torch.float16: "images.half()"}


def _check_dtype(images: torch.Tensor, model: nn.Module) -> None:
    """Images of the weights' floating dtype (any floating dtype under autocast, which casts them), else one sentence."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights is None or images.dtype == weights:
        return
    if images.is_floating_point() and torch.is_autocast_enabled(images.device.type):
        return
    cast = CAST.get(weights, f"images.to({weights})")
    if images.is_floating_point():
        raise ValueError(
            f"images are {images.dtype} but the backbone's weights are {weights}; pass {weights} images ({cast})."
        )
    raise ValueError(
        f"images are {images.dtype} but the backbone takes normalised {weights} images; convert them as its training "
        f"data was, e.g. ({cast} / 255 - mean) / std with the model's mean and std."
    )


def _first_conv(model: nn.Module) -> tuple[str, int] | None:
    """(name, input channels) of the model's first conv, as its pretrained config names it; None when unknown."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    name = name[0] if isinstance(name, (list, tuple)) and name else name
    try:
        layer = model.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:
        return None
    return (name, layer.in_channels) if isinstance(layer, nn.Conv2d) else None


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile the model in place, GAIN's entry points included.

    GAIN calls ``forward_features`` and ``forward_head`` itself (to take the Grad-CAM gradient on the feature map),
    so compiling ``forward`` alone (``torch.compile(model)``) would leave GAIN's classification stream uncompiled.
    Each half is compiled on its own; timm's ``forward`` calls both, so ``model(x)`` runs compiled too. The
    Grad-CAM ``autograd.grad`` runs between them, outside any compiled graph. The state dict is unchanged (no
    ``_orig_mod.`` prefix), so checkpoints load with or without compiling.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        model.forward_features = torch.compile(model.forward_features, backend=backend)
        model.forward_head = torch.compile(model.forward_head, backend=backend)
    else:
        model.forward = torch.compile(model.forward, backend=backend)
    return model


def compile_gain(gain: GAIN, backend: str = "inductor") -> GAIN:
    """``trainer.compile``: torch.compile GAIN's backbone (see ``compile_model``), or one sentence on why not.

    What torch.compile cannot run (PyTorch 2.x): ``grad_mode=full`` (AOTAutograd has no double backward),
    ``per_label`` under inductor (its batched Grad-CAM backward is a vmap, and inductor's compiled backward has no
    batching rule), and a map taken inside ``forward_features`` (``backbone.grad_layer`` set, and the default for
    ViT/DeiT/Swin): a compiled graph hides its intermediate tensors from ``autograd.grad``. One process-wide setting
    changes: AOTAutograd's donated buffers are switched off, because the Grad-CAM backward runs through the compiled
    head before the loss's backward runs through it again.
    """
    fix = "or set trainer.compile=false"
    if gain.grad_mode == "full":
        raise ValueError(
            "trainer.compile: torch.compile has no double backward, which gain.grad_mode=full needs; "
            f"use grad_mode=features or frozen, {fix}."
        )
    if gain.formulation == "per_label" and backend == "inductor":
        raise ValueError(
            "trainer.compile: inductor cannot batch per_label's Grad-CAM backward (vmap over a compiled "
            f"graph); use formulation=batch or trainer.compile_backend=aot_eager, {fix}."
        )
    if gain.extractor.module is not None:
        raise ValueError(
            f"trainer.compile: the map layer {gain.extractor.layer} lies inside the compiled "
            "forward_features, where autograd.grad cannot reach it; compile needs the map at "
            f"forward_features' output (backbone.grad_layer=null on a CNN), {fix}."
        )
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    compile_model(gain.model, backend)
    return gain


def check_options(
    sigma: float,
    omega: float,
    formulation: str,
    grad_mode: str,
    normalisation: str,
    fill: str | Sequence[float],
    am_grad_scale: float,
    prefix: str = "",
    cam: str = "gradcam",
) -> None:
    """Raise ValueError with one sentence for the first invalid GAIN option (``prefix`` names its config node)."""
    _check_choice(f"{prefix}formulation", formulation, FORMULATIONS)
    _check_choice(f"{prefix}cam", cam, tuple(CAM_METHODS))
    _check_choice(f"{prefix}grad_mode", grad_mode, GRAD_MODES)
    _check_choice(f"{prefix}normalisation", normalisation, NORMALISATIONS)
    if not 0.0 < sigma < 1.0:
        raise ValueError(
            f"{prefix}sigma={sigma} is outside (0, 1); pick a threshold strictly between 0 and 1, "
            f"e.g. {prefix}sigma=0.5."
        )
    if omega <= 0:
        raise ValueError(f"{prefix}omega={omega} must be > 0; it is the soft mask's steepness (the seed uses 10).")
    if am_grad_scale < 0:
        raise ValueError(
            f"{prefix}am_grad_scale={am_grad_scale} must be >= 0; it multiplies the AM stream's input gradient."
        )
    _parse_fill(fill, prefix)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}='{value}' is unknown; choose one of {list(choices)}.")


def _parse_fill(fill: str | Sequence[float], prefix: str = "") -> str | torch.Tensor:
    if isinstance(fill, str):
        _check_choice(f"{prefix}fill", fill, ("zero", "mean"))
        return fill
    rgb = [float(v) for v in fill]
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise ValueError(f"{prefix}fill={list(fill)} must be 'zero', 'mean' or three RGB values in [0, 1].")
    return torch.tensor(rgb)
