"""Small models registered with timm, for the built-in datasets and fast experiments on a CPU.

``timm.create_model("gain_cnn4", num_classes=K)`` works once this module is imported (gain_exp does it).
Unlike ImageNet backbones at 64 px, whose last layer sees the whole image, the CNNs keep a limited
receptive field (38 px at the Grad-CAM layer) and an 8 x 8 attention map at 64 px. ``mlp`` is Ross et al.'s
plain multilayer perceptron (IJCAI 2017), which has no spatial feature map: only losses without Grad-CAM run on
it (MAPLESS_BACKBONES).
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

NORMS = ("batch", "group", "none")  # SmallCNN's normalisation layers: BatchNorm2d, GroupNorm (8 groups), none
# Backbones without a spatial feature map: no Grad-CAM, so no GAIN stream, map loss or attention metric on them.
MAPLESS_BACKBONES = frozenset({"mlp"})
# The models registered here: none has pretrained weights; backbone.weights_file loads weights saved from one.
OWN_MODELS = frozenset({"gain_cnn4", "gain_cnn4_wide", "mlp"})
# Pretrained configs (timm reads ``default_cfgs`` when @register_model runs): the input normalisation the app gives
# the data. mlp: Ross et al.'s input, raw grey levels 0..255 (dtak/rrr fits on MNIST's uint8 cast to float32), so
# their lambda applies to input gradients of the same scale.
default_cfgs = {"mlp": {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}}


class _TimmClassifier(nn.Module):
    """timm's classifier interface for the models here: forward = forward_head(forward_features(x)), head ``fc``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


class SmallCNN(_TimmClassifier):
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
        # as timm's: input normalisation, the first conv (GAIN checks the images' channels) and the head
        self.pretrained_cfg = {
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "features.0",
            "classifier": "fc",
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)


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


class MLP(_TimmClassifier):
    """Ross et al.'s multilayer perceptron (IJCAI 2017; dtak/rrr ``rrr/multilayer_perceptron.py``): the image
    flattened, fully connected ReLU layers of ``hidden`` units (no normalisation, no dropout), a linear head.

    ``img_size`` (side, or (height, width)) fixes the input size (conf/backbone/mlp.yaml takes the dataset's).
    ``grey_input``: read only the first channel, for grey images stored as RGB (the decoy digits), so the model and
    its input gradient see each pixel once, as Ross et al.'s MLP on MNIST does. ``init_std``: every weight and bias
    drawn from N(0, init_std^2) (dtak/rrr ``init_random_params(0.1, ...)``); None: PyTorch's default init.

    It has no spatial map: ``forward_features`` gives the last hidden layer as a B x C x 1 x 1 tensor so that the
    framework's classifier interface holds, and ``spatial_map = False`` tells GAIN that no Grad-CAM exists (its
    attention is NaN, which the localisation metrics skip).
    """

    spatial_map = False

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 28,
        hidden: tuple[int, ...] = (50, 30),
        grey_input: bool = False,
        init_std: float | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h < 1 or w < 1 or not hidden or any(int(n) < 1 for n in hidden):
            raise ValueError(
                f"backbone mlp: img_size={img_size} and hidden={list(hidden)} must be positive (hidden: at least one "
                "layer); set backbone.kwargs.img_size to the dataset's image size."
            )
        self.img_size, self.grey_input, self.in_chans = (h, w), bool(grey_input), in_chans
        self.in_features = (1 if grey_input else in_chans) * h * w
        layers: list[nn.Module] = []
        prev = self.in_features
        for n in hidden:
            layers += [nn.Linear(prev, int(n)), nn.ReLU()]
            prev = int(n)
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.num_classes = num_classes
        self.fc = nn.Linear(prev, num_classes)
        self.init_std = init_std
        if init_std is not None:
            for p in self.parameters():
                nn.init.normal_(p, std=float(init_std))
        self.pretrained_cfg = dict(default_cfgs["mlp"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"backbone mlp was built for {self.img_size[0]} x {self.img_size[1]} images but got "
                f"{x.shape[-2]} x {x.shape[-1]}; set backbone.kwargs.img_size to the dataset's image size."
            )
        if not self.grey_input and x.shape[1] != self.in_chans:
            raise ValueError(
                f"backbone mlp was built for {self.in_chans}-channel images but got {x.shape[1]}; pass "
                f"{self.in_chans}-channel images, or grey ones with backbone.kwargs.grey_input=true."
            )
        x = x[:, :1] if self.grey_input else x
        return self.features(x.flatten(1))[:, :, None, None]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)


@register_model
def mlp(pretrained: bool = False, **kwargs) -> MLP:
    """Ross et al.'s MLP (hidden layers 50 and 30 by default); no spatial map, so no Grad-CAM."""
    _no_weights("mlp", pretrained)
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return MLP(**kwargs)
