"""Small CNNs registered with timm, for the built-in dataset and fast experiments on a CPU.

``timm.create_model("gain_cnn4", num_classes=K)`` works once this module is imported (gain_exp does it).
Unlike ImageNet backbones at 64 px, whose last layer sees the whole image, these keep a limited
receptive field (38 px at the Grad-CAM layer) and an 8 x 8 attention map at 64 px.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

NORMS = ("batch", "group", "none")  # SmallCNN's normalisation layers: BatchNorm2d, GroupNorm (8 groups), none


class SmallCNN(nn.Module):
    """Conv-norm-ReLU blocks with 2x2 max-pooling after all but the last, global average pool, linear head.

    ``norm``: ``batch`` (default), ``group`` (GroupNorm, 8 groups: no statistics shared between images, e.g. for input
    gradient losses such as RRR) or ``none``; choose it with ``+backbone.kwargs.norm=group``.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 32, 64, 64),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        norm: str = "batch",
        **_: object,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"backbone.kwargs.norm={norm!r} is unknown for gain_cnn4; choose one of {list(NORMS)}.")
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, bias=norm == "none"),
                _norm(norm, width),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes)
        self.pretrained_cfg = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


def _norm(norm: str, width: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(width)
    return nn.GroupNorm(8, width) if norm == "group" else nn.Identity()


def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set backbone.pretrained=false.")


@register_model
def gain_cnn4(pretrained: bool = False, **kwargs) -> SmallCNN:
    """4 blocks (32, 32, 64, 64): trains on the built-in shapes in about a minute on 2 CPU cores."""
    _no_weights("gain_cnn4", pretrained)
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return SmallCNN((32, 32, 64, 64), **kwargs)


@register_model
def gain_cnn4_wide(pretrained: bool = False, **kwargs) -> SmallCNN:
    """4 blocks (64, 64, 128, 128)."""
    _no_weights("gain_cnn4_wide", pretrained)
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return SmallCNN((64, 64, 128, 128), **kwargs)
