"""Image + label-map transforms shared by the file-backed datasets (torchvision transforms v2).

Train: RandomResizedCrop to image_size x image_size (scale 0.7-1, so objects are rarely cut out of
the crop while their label stays), an optional horizontal flip, and optional AutoAugment with the
CIFAR10 policy (the seed's choice). Eval: the whole image resized to image_size x image_size (no
crop, so no labelled object leaves the evaluated image; the aspect ratio changes mildly).

Geometric steps move the label map with the image (`tv_tensors.Mask`, always nearest interpolation,
so class ids and the 255 ignore label survive). torchvision's AutoAugment refuses masks, so
`JointAutoAugment` runs the same policy with its geometric ops (shear, translate, rotate) applied
to image and mask alike and its photometric ops to the image only. Areas that a geometric op moves
in from outside the frame are black in the image and background (0) in the label map.
"""

from __future__ import annotations

from typing import Sequence

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from gain_exp.data.images import to_rgb

TRAIN_CROP_SCALE = (0.7, 1.0)  # mild: the crop keeps >= 70% of the image area
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
NUM_MAGNITUDE_BINS = 10  # AutoAugment's policies index magnitudes out of 10 bins


class JointAutoAugment(v2.AutoAugment):
    """AutoAugment whose geometric ops also move an optional label map; photometric ops touch the image only."""

    # Reuses v2.AutoAugment's policy tables and op kernels (private names, unchanged since torchvision 0.15)
    # so the policy is exactly torchvision's; tests/test_transforms.py fails loudly if they move.

    def forward(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None):  # type: ignore[override]
        """Apply one randomly drawn sub-policy to (image, mask); returns (image, mask)."""
        height, width = image.shape[-2:]
        sub_policy = self._policies[int(torch.randint(len(self._policies), ()))]
        for op, probability, magnitude_bin in sub_policy:
            if not torch.rand(()) <= probability:
                continue
            magnitudes_fn, signed = self._AUGMENTATION_SPACE[op]
            magnitudes = magnitudes_fn(NUM_MAGNITUDE_BINS, height, width)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_bin])
            if magnitudes is not None and signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            image = self._apply_image_or_video_transform(
                image, op, magnitude, interpolation=self.interpolation, fill=self._fill
            )
            if mask is not None and op in GEOMETRIC_OPS:
                # Mask kernels always interpolate nearest; fill None gives 0 (background).
                mask = self._apply_image_or_video_transform(
                    mask, op, magnitude, interpolation="nearest", fill={"others": None}
                )
        return image, mask


class ImageMaskTransform:
    """Callable (PIL image, H x W label map or None) -> (3 x S x S normalised float image, S x S long label map)."""

    def __init__(
        self,
        geometric: v2.Transform,
        autoaugment: JointAutoAugment | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.geometric = geometric
        self.autoaugment = autoaugment
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, image: PIL.Image.Image, seg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(F.pil_to_tensor(to_rgb(image)))  # convert("RGB") would saturate 16-bit images
        if seg is not None and seg.shape != img.shape[-2:]:
            raise ValueError(
                f"label map of shape {tuple(seg.shape)} does not match the image's {tuple(img.shape[-2:])};"
                " give a label map of the image's size."
            )
        # uint8 keeps every label value (0..254 classes, 255 ignore) and is what mask kernels handle best.
        mask = tv_tensors.Mask(seg.to(torch.uint8).unsqueeze(0)) if seg is not None else None
        if mask is None:
            img = self.geometric(img)
        else:
            img, mask = self.geometric(img, mask)
        if self.autoaugment is not None:
            img, mask = self.autoaugment(img, mask)
        out = F.normalize(F.to_dtype(img, torch.float32, scale=True), mean=self.mean, std=self.std)
        out_seg = (
            mask.as_subclass(torch.Tensor)[0].long()
            if mask is not None
            else torch.zeros(out.shape[-2:], dtype=torch.long)
        )
        return out.as_subclass(torch.Tensor), out_seg


def build_transforms(
    train: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    autoaugment: bool = True,
    hflip: bool = True,
) -> ImageMaskTransform:
    """The train (random) or eval (deterministic) transform of one split."""
    if image_size < 8:
        raise ValueError(f"image_size={image_size} is too small for a CNN input; set it to 8 or more (224 is usual).")
    if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
        raise ValueError(f"mean={list(mean)} and std={list(std)} must each have 3 values with std > 0; fix them.")
    if not train:
        return ImageMaskTransform(v2.Resize((image_size, image_size)), None, mean, std)
    steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    policy = JointAutoAugment(v2.AutoAugmentPolicy.CIFAR10) if autoaugment else None
    return ImageMaskTransform(v2.Compose(steps), policy, mean, std)
