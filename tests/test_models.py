"""gain_exp.core.models: the small CNNs' normalisation choice (backbone.kwargs.norm)."""

from __future__ import annotations

import pytest
import timm
import torch

import gain_exp.core.models  # noqa: F401 - registers gain_cnn4 with timm


@pytest.mark.parametrize("norm,shared", [("batch", True), ("group", False), ("none", False)])
def test_only_batch_norm_lets_one_image_change_another_images_output_in_training(norm, shared):
    """What RRR's input gradient needs: under group or no normalisation, an image's logits are its own."""
    torch.manual_seed(0)
    model = timm.create_model("gain_cnn4", num_classes=3, norm=norm).train()
    images = torch.randn(2, 3, 32, 32)
    other = images.clone()
    other[1] = other[1] * 3 + 1
    first, again = model(images)[0], model(other)[0]
    assert first.shape == (3,) and bool((first - again).abs().max() > 1e-4) == shared
    norms = {type(m).__name__ for m in model.features}
    assert {"batch": "BatchNorm2d", "group": "GroupNorm", "none": "Identity"}[norm] in norms


def test_unknown_norm_is_one_sentence():
    with pytest.raises(
        ValueError,
        match=r"^backbone\.kwargs\.norm='layer' is unknown for gain_cnn4; choose one of "
        r"\['batch', 'group', 'none'\]\.$",
    ):
        timm.create_model("gain_cnn4", norm="layer")
