"""Differentiable Grad-CAM for timm classifiers: feature-map resolution and the CAM itself."""
from __future__ import annotations

import difflib
import torch
import torch.nn.functional as F
from torch import nn

NORMALISATIONS = ("minmax", "max", "none")


class FeatureExtractor:
    """Runs a classifier and returns (feature map, logits) with the feature map still in the graph.

    Default: the model's own ``forward_features`` / ``forward_head`` split (timm), so the class-score
    gradient w.r.t. the feature map costs only the head's backward. With ``layer`` set, a forward hook
    captures that module's output instead (the gradient then also runs through the layers after it).
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer or None
        if self.layer is None:
            if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                raise ValueError(
                    f"{type(model).__name__} has no forward_features/forward_head split; "
                    f"set grad_layer to one of its conv layers, e.g. {_suggest_layers(model)[-3:]}."
                )
            self.module = None
        else:
            modules = dict(model.named_modules())
            if self.layer not in modules:
                close = difflib.get_close_matches(self.layer, modules, n=5, cutoff=0.4)
                hint = f"close matches: {close}" if close else f"valid layers include {_suggest_layers(model)}"
                raise ValueError(
                    f"grad_layer '{self.layer}' does not exist in {type(model).__name__}; {hint}."
                )
            self.module = modules[self.layer]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features B x C x h x w, logits B x K)."""
        if self.module is None:
            features = _check_map(self.model.forward_features(images), "forward_features")
            return features, self.model.forward_head(features)
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            captured.append(out)
            # The model goes on with a copy: a later in-place op (ResNet's `x += shortcut`, VGG's ReLU(inplace))
            # would otherwise rewrite the captured map, or fail on the leaf GAIN uses at evaluation.
            return out.clone() if isinstance(out, torch.Tensor) else None

        handle = self.module.register_forward_hook(capture)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return _check_map(captured[-1], self.layer), logits

    def logits(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Class scores only (the attention-mining stream needs no feature map)."""
        if params is None:
            return self.model(images)
        return torch.func.functional_call(self.model, params, (images,))


def _check_map(features: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"Grad-CAM needs a B x C x h x w feature map but {where} gives {shape}; "
            "set grad_layer to a convolutional layer."
        )
    return features


def _suggest_layers(model: nn.Module, limit: int = 12) -> list[str]:
    """Names of modules that are plausible Grad-CAM layers (top-level blocks, last ones first matter)."""
    names = [n for n, m in model.named_modules() if n and n.count(".") <= 1 and any(True for _ in m.parameters())]
    return names[-limit:]


def grad_cam(
    features: torch.Tensor,
    logits: torch.Tensor,
    score_weights: torch.Tensor,
    create_graph: bool,
) -> torch.Tensor:
    """Grad-CAM maps A = ReLU(sum_k GAP(dS/df)_k f_k) for one or several score definitions.

    ``score_weights`` is B x K (one map per image for S = sum_c w_bc logit_bc) or M x B x K (M maps per
    image, computed in one batched backward through the head). Returns B x h x w or M x B x h x w.
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
    weights = grads.mean(dim=(-2, -1), keepdim=True)  # Eq. 1: GAP of the gradient
    if not create_graph:
        weights = weights.detach()
    return F.relu((weights * features).sum(dim=-3))  # Eq. 2


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
