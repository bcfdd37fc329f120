"""timm classifiers by name, with clear errors for typos and for missing offline weights."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
from torch import nn


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights_file: str | None = None,
    **kwargs,
) -> nn.Module:
    """A timm model with a ``num_classes`` head; ``weights_file`` loads local backbone weights (head re-initialised)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean one of {close}?" if close else "see timm.list_models() for valid names."
        raise ValueError(f"backbone '{name}' is not a timm model; {hint}")
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone.weights_file={weights_file} does not exist; point it at a local .pth/.safetensors "
                f"file for {name} or set backbone.pretrained=false."
            )
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as err:  # timm raises hub/network errors of many types when offline
        if not pretrained:
            raise
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise RuntimeError(
            f"could not fetch pretrained weights for '{name}'{offline}: {type(err).__name__}; download them "
            f"elsewhere and set backbone.weights_file=<path>, or set backbone.pretrained=false."
        ) from err
