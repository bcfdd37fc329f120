"""Differentiable CAMs (Grad-CAM and variants) for timm classifiers: feature-map resolution and the maps."""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import nn

NORMALISATIONS = ("minmax", "max", "none")


class FeatureExtractor:
    """Runs a classifier and returns (feature map, logits) with the feature map still in the graph.

    Default layer, resolved per family (``default_layer``): CNNs use the model's own ``forward_features`` /
    ``forward_head`` split (timm), so the class-score gradient w.r.t. the map costs only the head's backward.
    ViT/DeiT (``blocks`` + ``num_prefix_tokens``) use the last block's ``norm1`` tokens: the head reads only the class
    token, so the final patch tokens get no gradient and the gradient must run through the last block. Swin uses
    the last stage's last block (NHWC), so the gradient runs through the final LayerNorm and the head only. With
    ``layer`` set, a forward hook captures that module's output instead.

    Maps are always B x C x h x w: NHWC outputs (timm models with ``output_fmt == "NHWC"``, except conv/BN layers)
    are permuted, and B x N x C tokens lose their prefix tokens and are laid on the patch grid (the patch embed's
    grid for the input size or, in later stages, that grid halved k times; without a patch embed, the h x w grid with
    the image's aspect ratio). The model goes on with tokens
    rebuilt from that map, so the map is what the logits depend on.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer or default_layer(model)
        if self.layer is None:
            if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                raise ValueError(
                    f"{type(model).__name__} has no forward_features/forward_head split; "
                    f"set grad_layer to one of its conv layers, e.g. {_suggest_layers(model)[-3:]}."
                )
            self.module = None
            self.nhwc = _is_nhwc_model(model)
        else:
            modules = dict(model.named_modules())
            if self.layer not in modules:
                close = difflib.get_close_matches(self.layer, modules, n=5, cutoff=0.4)
                hint = f"close matches: {close}" if close else f"valid layers include {_suggest_layers(model)}"
                raise ValueError(f"grad_layer '{self.layer}' does not exist in {type(model).__name__}; {hint}.")
            self.module = modules[self.layer]
            if hasattr(self.module, "output_fmt"):  # timm PatchEmbed says its own layout
                self.nhwc = _is_nhwc_model(self.module)
            else:
                self.nhwc = _is_nhwc_model(model) and not isinstance(
                    self.module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)
                )

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features B x C x h x w, logits B x K)."""
        size = tuple(images.shape[-2:])
        if self.module is None:
            return self.head(self.model.forward_features(images))
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor):
                captured.append(out)
                return None
            grid, rebuild = self._to_grid(out, size)
            captured.append(grid)
            # The model goes on with a copy: a later in-place op (ResNet's `x += shortcut`, VGG's ReLU(inplace))
            # would otherwise rewrite the captured map, or fail on the leaf GAIN uses at evaluation.
            return rebuild(grid).clone()

        handle = self.module.register_forward_hook(capture)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return _check_map(captured[-1], self.layer), logits

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x C x h x w map, logits) from ``forward_features``' output (default layer of a CNN)."""
        if self.nhwc and isinstance(features, torch.Tensor) and features.dim() == 4:
            # the head must read the permuted map (not the original) so that the map is in the logits' graph
            grid = features.permute(0, 3, 1, 2)
            return _check_map(grid, "forward_features"), self.model.forward_head(grid.permute(0, 2, 3, 1))
        features = _check_map(features, "forward_features", self._token_hint())
        return features, self.model.forward_head(features)

    def logits(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Class scores only (the attention-mining stream needs no feature map)."""
        if params is None:
            return self.model(images)
        return torch.func.functional_call(self.model, params, (images,))

    def _to_grid(self, out: torch.Tensor, size: tuple[int, int]):
        """(B x C x h x w map, function rebuilding the layer's own layout from it) for one hooked output."""
        if out.dim() == 4 and self.nhwc:
            return out.permute(0, 3, 1, 2), lambda grid: grid.permute(0, 2, 3, 1)
        if out.dim() != 3:
            return out, lambda grid: grid
        prefix, (h, w) = self._token_grid(out.shape[1], size)
        patches = out[:, prefix:]
        grid = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        if prefix == 0:
            return grid, lambda g: g.flatten(2).transpose(1, 2)
        return grid, lambda g: torch.cat([out[:, :prefix], g.flatten(2).transpose(1, 2)], dim=1)

    def _token_grid(self, n: int, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """(prefix tokens to drop, (h, w)) that lay ``n`` tokens on the patch grid of an image of ``size``."""
        prefixes = sorted({int(getattr(self.model, "num_prefix_tokens", 0) or 0), 0}, reverse=True)
        embed = getattr(self.model, "patch_embed", None)
        grids = []
        if embed is not None and hasattr(embed, "dynamic_feat_size"):
            grids.append(tuple(embed.dynamic_feat_size(size)))  # the grid the model uses for this input size
        for p in prefixes:
            for gh, gw in grids:
                # the patch grid, or a later stage's grid (Swin halves it per stage, rounding up)
                for scale in (2**i for i in range(max(gh, gw).bit_length())):
                    if -(-gh // scale) * -(-gw // scale) == n - p:
                        return p, (-(-gh // scale), -(-gw // scale))
        if not grids:  # no patch embedding to ask: the grid with the image's aspect ratio
            for p in prefixes:
                h = max(1, round(math.sqrt(max(n - p, 0) * size[0] / size[1])))
                if (
                    n - p > 0
                    and (n - p) % h == 0
                    and abs((n - p) // h / h - size[1] / size[0]) < 0.5 * size[1] / size[0]
                ):
                    return p, (h, (n - p) // h)
        expected = f"the {grids[0][0]} x {grids[0][1]} patch grid" if grids else "an h x w grid"
        raise ValueError(
            f"grad_layer '{self.layer}' gives {n} tokens ({prefixes[0]} prefix) that do not fill {expected} of a "
            f"{size[0]} x {size[1]} image; set backbone.grad_layer to a layer that keeps one token per patch, "
            f"e.g. '{self._token_hint(exclude=self.layer)}'."
        )

    def _token_hint(self, exclude: str | None = None) -> str:
        """A layer name to suggest for a token model: its family default, else its patch embedding."""
        default = default_layer(self.model)
        if default and default != exclude:
            return default
        if hasattr(self.model, "patch_embed") and exclude != "patch_embed":
            return "patch_embed"
        return "a convolutional layer"


def unfuse_attention_after(model: nn.Module, layer: str | None) -> list[str]:
    """Switch timm attention modules registered after ``layer`` to the unfused path; returns their names.

    grad_mode=full differentiates the map's gradient again, and the fused CPU/flash attention kernels
    (F.scaled_dot_product_attention) have no double backward; the unfused path computes the same attention with
    plain ops. Only modules after the map layer (in registration order, which is execution order in timm's ViT and
    Swin) are on that second-order path, so the rest keep the fused kernels.
    """
    if layer is None:
        return []
    names = [name for name, _ in model.named_modules()]
    after = names[names.index(layer) + 1 :] if layer in names else []
    switched = []
    for name in after:
        module = model.get_submodule(name)
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
            switched.append(name)
    return switched


def default_layer(model: nn.Module) -> str | None:
    """The map layer a transformer family needs (ViT/DeiT: last block's norm1; Swin: last block); None for CNNs."""
    blocks = getattr(model, "blocks", None)
    if (
        hasattr(model, "num_prefix_tokens")
        and isinstance(blocks, (nn.Sequential, nn.ModuleList))
        and len(blocks)
        and hasattr(blocks[-1], "norm1")
    ):
        return f"blocks.{len(blocks) - 1}.norm1"
    layers = getattr(model, "layers", None)
    if (
        _is_nhwc_model(model)
        and isinstance(layers, (nn.Sequential, nn.ModuleList))
        and len(layers)
        and len(getattr(layers[-1], "blocks", ()))
    ):
        return f"layers.{len(layers) - 1}.blocks.{len(layers[-1].blocks) - 1}"
    return None


def _is_nhwc_model(model: nn.Module) -> bool:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"  # a str, or timm's Format enum


def _check_map(features: torch.Tensor, where: str, token_hint: str = "a convolutional layer") -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        hint = (
            token_hint
            if token_hint == "a convolutional layer"
            else f"a layer with one token per patch, e.g. '{token_hint}'"
        )
        raise ValueError(
            f"Grad-CAM needs a B x C x h x w feature map but {where} gives {shape}; set grad_layer to {hint}."
        )
    return features


def _suggest_layers(model: nn.Module, limit: int = 12) -> list[str]:
    """Names of modules that are plausible Grad-CAM layers (top-level blocks, last ones first matter)."""
    names = [n for n, m in model.named_modules() if n and n.count(".") <= 1 and any(True for _ in m.parameters())]
    return names[-limit:]


# CAM methods: each maps (feature map A, gradient g = dS/dA), both ... x C x h x w, to the weights w that form the map
# ReLU(sum_k w_k * A_k); w is ... x C x 1 x 1 (channel weights) or ... x C x h x w (element-wise weights). The
# formulas and constants follow pytorch-grad-cam 1.5 (see docs/methods.md, "CAM methods"); all are plain torch ops, so with
# grad_mode=full (create_graph) the loss differentiates through g (second order through the layers after A) and
# through every use of A inside the weights.


def gradcam_weights(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju 2017, Eq. 1): w_k = mean_ij g_kij. Full: d/dtheta through g only."""
    return grads.mean(dim=(-2, -1), keepdim=True)


def gradcampp_weights(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay 2018, Eq. 19): w_k = sum_ij a_kij ReLU(g_kij), a = g^2 / (2 g^2 + sum_ab A_kab g^3).

    The second and third derivatives of exp(S) are replaced by g^2 and g^3 (closed form for an exponential score, as
    pytorch-grad-cam does); a = 0 where g = 0. Full: the loss differentiates through g, g^2, g^3 and sum_ab A_kab as
    written (this approximation), not through true higher derivatives of S.
    """
    g2 = grads.pow(2)
    g3 = g2 * grads
    alpha = g2 / (2 * g2 + features.sum(dim=(-2, -1), keepdim=True) * g3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(grads) * alpha).sum(dim=(-2, -1), keepdim=True)


def xgradcam_weights(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu 2020): w_k = sum_ij g_kij A_kij / (sum_ab A_kab + eps). Full: through g and both uses of A."""
    return (grads * features / (features.sum(dim=(-2, -1), keepdim=True) + 1e-7)).sum(dim=(-2, -1), keepdim=True)


def layercam_weights(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang 2021): element-wise w_kij = ReLU(g_kij). Full: through g where g > 0."""
    return F.relu(grads)


def hirescam_weights(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos 2020): element-wise w_kij = g_kij. Full: through g everywhere."""
    return grads


CAM_METHODS = {
    "gradcam": gradcam_weights,
    "gradcam++": gradcampp_weights,
    "xgradcam": xgradcam_weights,
    "layercam": layercam_weights,
    "hirescam": hirescam_weights,
}


def cam_map(
    features: torch.Tensor, grads: torch.Tensor, method: str = "gradcam", detach_weights: bool = False
) -> torch.Tensor:
    """The map sum_k w_k A_k of ``method`` before ReLU (... x h x w); ``detach_weights`` treats w as constants."""
    weights = CAM_METHODS[method](features, grads)
    if detach_weights:
        weights = weights.detach()
    return (weights * features).sum(dim=-3)


def class_activation_maps(
    features: torch.Tensor,
    logits: torch.Tensor,
    score_weights: torch.Tensor,
    create_graph: bool,
    method: str = "gradcam",
) -> torch.Tensor:
    """CAM maps ReLU(sum_k w_k A_k) of ``method`` (``CAM_METHODS``) for one or several score definitions.

    ``score_weights`` is B x K (one map per image for S = sum_c w_bc logit_bc) or M x B x K (M maps per
    image, computed in one batched backward through the layers after the map). Returns B x h x w or M x B x h x w.
    Without ``create_graph`` the weights are constants (grad_mode features/frozen): the loss reaches the network
    only through A in the weighted sum.
    """
    batched = score_weights.dim() == 3
    (grads,) = torch.autograd.grad(
        logits,
        features,
        grad_outputs=score_weights.to(logits.dtype),
        retain_graph=True,
        create_graph=create_graph,
        is_grads_batched=batched,
    )
    return F.relu(cam_map(features, grads, method, detach_weights=not create_graph))


grad_cam = class_activation_maps  # the name before the CAM choice (Grad-CAM is the default method)


def normalise(maps: torch.Tensor, how: str = "minmax", eps: float = 1e-7) -> torch.Tensor:
    """Per-map normalisation of N x h x w attention maps."""
    if how == "none":
        return maps
    flat = maps.flatten(1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    if how == "max":
        return maps / (high + eps)
    if how == "minmax":
        low = flat.min(dim=1).values.view(-1, 1, 1)
        return (maps - low) / (high - low + eps)
    raise ValueError(f"attention normalisation '{how}' is unknown; use one of {NORMALISATIONS}.")
