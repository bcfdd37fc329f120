"""Tests for the shared image + label-map transforms (gain_exp/data/transforms.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from gain_exp.data.transforms import JointAutoAugment, build_transforms

LABEL = 3
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # keeps transformed pixels in [0, 1]
OBJECT_RGB = (200, 60, 60)


pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(h: int = 60, w: int = 80) -> tuple[Image.Image, torch.Tensor]:
    """Black image with an off-centre object (so flips and shifts show) and its label map with a 255 border."""
    seg = np.zeros((h, w), np.uint8)
    seg[8:40, 6:34] = 255
    seg[9:39, 7:33] = LABEL
    seg[45:55, 50:75] = LABEL
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[seg > 0] = OBJECT_RGB
    return Image.fromarray(rgb), torch.from_numpy(seg)


def _interior(seg: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds one label: interpolation blurs only the others (and the frame)."""
    s = torch.nn.functional.pad(seg.float()[None, None], (1, 1, 1, 1), value=-1.0)
    pool = torch.nn.functional.max_pool2d
    return (pool(s, 3, 1) == -pool(-s, 3, 1))[0, 0]


def _agreement(image: torch.Tensor, seg: torch.Tensor) -> float:
    """Share of interior labelled pixels where 'looks like object' agrees with 'labelled object'."""
    valid = (seg != 255) & _interior(seg)
    is_obj = seg == LABEL
    obj_colour = image[:, is_obj].median(dim=1).values.view(3, 1, 1)
    bg_colour = image[:, valid & ~is_obj].median(dim=1).values.view(3, 1, 1)
    looks_obj = (image - obj_colour).norm(dim=0) < (image - bg_colour).norm(dim=0)
    return (looks_obj == is_obj)[valid].float().mean().item()


def test_eval_resizes_whole_image_and_normalises():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    image = Image.new("RGB", (80, 60), (51, 102, 153))
    x, seg = build_transforms(False, 32, mean, std, autoaugment=True, hflip=True)(image, None)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    expected = (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x[:, 16, 16], expected, atol=1e-5, rtol=0)
    assert seg.shape == (32, 32) and seg.dtype == torch.long and not seg.any()


def test_eval_is_deterministic_and_keeps_the_whole_mask():
    image, seg = _scene()
    t = build_transforms(False, 40, **PLAIN, autoaugment=True, hflip=True)
    x1, s1 = t(image, seg)
    x2, s2 = t(image, seg)
    assert torch.equal(x1, x2) and torch.equal(s1, s2)
    # No crop: both objects (one near the right edge) survive, with their label and border.
    assert set(s1.unique().tolist()) == {0, LABEL, 255}
    assert (s1[:, 30:] == LABEL).any()
    assert _agreement(x1, s1) > 0.98


def test_train_geometric_transforms_keep_mask_aligned():
    image, seg = _scene()
    t = build_transforms(True, 32, **PLAIN, autoaugment=False, hflip=True)
    outputs = []
    for i in range(40):
        torch.manual_seed(i)
        x, s = t(image, seg)
        assert set(s.unique().tolist()) <= {0, LABEL, 255}
        # The red channel is the object: after crops and flips red pixels must still be the labelled ones.
        obj, valid = s == LABEL, (s != 255) & _interior(s)
        assert ((x[0] > 0.5) == obj)[valid].float().mean() > 0.99
        outputs.append(s)
    assert len({tuple(s.flatten().tolist()) for s in outputs}) > 30  # the crops really vary
    # The big object sits on the left; some flips must have moved it to the right half.
    assert any((s[:, 16:] == LABEL).sum() > (s[:, :16] == LABEL).sum() for s in outputs)


def test_train_with_autoaugment_keeps_mask_aligned_and_labels_intact():
    image, seg = _scene()
    t = build_transforms(True, 32, **PLAIN, autoaugment=True, hflip=True)
    border_seen = 0
    for i in range(60):
        torch.manual_seed(i)
        x, s = t(image, seg)
        assert set(s.unique().tolist()) <= {0, LABEL, 255}
        border_seen += int((s == 255).any())
        assert _agreement(x, s) > 0.98, f"seed {i}"
    assert border_seen > 40


def test_joint_autoaugment_moves_mask_with_image():
    image, seg = _scene()
    img = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous())
    mask = tv_tensors.Mask(seg.unsqueeze(0))
    aa = JointAutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    moved = 0
    for i in range(80):
        torch.manual_seed(i)
        out_img, out_mask = aa(img, mask)
        assert isinstance(out_mask, tv_tensors.Mask)
        if torch.equal(out_mask, mask):
            continue
        moved += 1
        assert set(out_mask.unique().tolist()) <= {0, LABEL, 255}
        assert _agreement(out_img.float() / 255, out_mask[0]) > 0.98, f"seed {i}"
    assert moved > 10  # the CIFAR10 policy's shears, translations and rotations reached the mask
    torch.manual_seed(0)
    out_img, out_mask = aa(img, None)
    assert out_mask is None and out_img.shape == img.shape


def test_mask_size_must_match_image():
    image, seg = _scene()
    with pytest.raises(ValueError, match="does not match the image"):
        build_transforms(True, 32, **PLAIN)(image, seg[:, :40])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="image_size"):
        build_transforms(True, 4, **PLAIN)
    with pytest.raises(ValueError, match="std"):
        build_transforms(True, 32, mean=(0, 0, 0), std=(1, 0, 1))


def test_16_bit_grey_image_is_transformed_like_its_8_bit_version():
    grey = np.arange(60 * 80, dtype=np.int64).reshape(60, 80) % 256
    eight, sixteen = Image.fromarray(grey.astype(np.uint8)), Image.fromarray((grey * 257).astype(np.uint16))
    transform = build_transforms(False, 32, **PLAIN)
    assert torch.equal(transform(sixteen)[0], transform(eight)[0])  # convert("RGB") would saturate most pixels
