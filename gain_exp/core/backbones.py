"""timm classifiers by name, with one-sentence errors for typos, weights files that are unreadable or do not fit, and
pretrained weights that cannot be downloaded."""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import timm
import torch
from torch import nn

from gain_exp.core.models import OWN_MODELS
from gain_exp.output.files import blocked_global, load_failure

SAVE_HINT = "save the weights with torch.save(model.state_dict(), path) or as .safetensors"


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights_file: str | None = None,
    **kwargs,
) -> nn.Module:
    """A timm model with a ``num_classes`` head; ``weights_file`` loads local weights (tensors only, never code) into
    it, the head re-initialised when its class count differs (timm's models: always, as timm does for pretrained
    weights); ``pretrained`` downloads timm's. Each mistake is one ValueError sentence naming the option."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean one of {close}?" if close else "see timm.list_models() for valid names."
        raise ValueError(f"backbone '{name}' is not a timm model; {hint}")
    if weights_file:
        where = f"backbone.weights_file={weights_file}"
        state = read_weights(weights_file, name)
        if name in OWN_MODELS:
            model = timm.create_model(name, num_classes=num_classes, **kwargs)
            _load_own(model, state, where, name)
            return model
        return _load_timm(name, num_classes, state, where, kwargs)
    if pretrained and name in OWN_MODELS:
        raise ValueError(
            f"backbone.pretrained=true: {name} has no pretrained weights (gain-exp's own model, trained from scratch); "
            "set backbone.pretrained=false, or backbone.weights_file=<local file> to start from weights you saved."
        )
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as err:  # timm raises hub/network errors of many types when offline
        if not pretrained:
            raise
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
            why = "cannot be downloaded offline (HF_HUB_OFFLINE is set) and are not in the local cache"
        else:
            why = f"could not be downloaded ({load_failure(err)})"
        raise ValueError(
            f"backbone.pretrained=true: the weights of {name} {why}; set backbone.weights_file=<local file> or "
            "backbone.pretrained=false."
        ) from None


def read_weights(weights_file: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict in a local .pth/.safetensors file (a training checkpoint's model or EMA weights, as timm reads
    them), loaded without running code; FileNotFoundError or one ValueError sentence naming the file."""
    path, where = Path(weights_file).expanduser(), f"backbone.weights_file={weights_file}"
    if not path.exists():
        raise FileNotFoundError(
            f"{where} does not exist; point it at a local .pth/.safetensors file for {name} or set "
            "backbone.weights_file=null."
        )
    if path.is_dir():
        raise ValueError(f"{where} is a directory, not a weights file; point it at the .pth/.safetensors file in it.")
    if path.stat().st_size == 0:
        raise ValueError(f"{where} is empty (0 bytes); it was not fully written or downloaded, so fetch it again.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            with warnings.catch_warnings():  # a plain pickle's protocol warning would only precede the sentence
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # torch.load fails with many types on a foreign or damaged file (KeyError, IndexError)
        code = blocked_global(err)
        if code:
            raise ValueError(
                f"{where} holds objects other than tensors and plain values (unsupported GLOBAL {code}); gain-exp "
                f"loads only tensors, so {SAVE_HINT}."
            ) from None
        raise ValueError(
            f"{where} is unreadable ({load_failure(err)}); it is truncated or not a weights file, so fetch it "
            f"again or {SAVE_HINT}."
        ) from None
    if isinstance(state, dict):  # a training checkpoint: its (EMA) model weights, in timm's order
        key = next(
            (k for k in ("state_dict_ema", "model_ema", "state_dict", "model") if state.get(k) is not None), None
        )
        state = state[key] if key else state
    odd = _not_tensors(state)
    if odd:
        raise ValueError(f"{where} holds {odd}, not a state dict of tensors; {SAVE_HINT}.")
    return timm.models.clean_state_dict(state)  # without DDP's module. or torch.compile's _orig_mod. prefixes


def _not_tensors(state: object) -> str | None:
    """What ``state`` holds when it is not a non-empty {name: tensor} dict; None when it is one."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if not state:
        return "an empty dict"
    key = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    return None if key is None else f"a {type(state[key]).__name__} at {key!r}"


def _load_timm(name: str, num_classes: int, state: dict, where: str, kwargs: dict) -> nn.Module:
    """A timm model with ``state`` loaded as its pretrained weights (timm adapts the input conv, remaps other layouts
    through the family's filter and re-initialises the head); one sentence when the weights do not fit."""
    fix = f"point it at weights saved from {name} (with the same backbone.kwargs), or set backbone.weights_file=null"
    try:
        with _missing_keys() as missing:
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(state_dict=state), **kwargs
            )
    except (RuntimeError, KeyError, IndexError) as err:
        raise ValueError(f"{where} does not fit {name}: {_torch_misfit(err, name)}; {fix}.") from None
    model.pretrained_cfg.pop("state_dict", None)  # the model's config would keep every tensor of the file alive
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    left = [k for k in missing if not k.startswith(tuple(f"{h}." for h in heads)) and "num_batches_tracked" not in k]
    if left:
        more = f" (nor {len(left) - 1} more of the model's tensors)" if len(left) > 1 else ""
        raise ValueError(f"{where} does not fit {name}: it has no {left[0]}{more}; {fix}.")
    return model


@contextmanager
def _missing_keys() -> Iterator[list[str]]:
    """The model tensors a pretrained load left at their initial values. timm loads non-strictly when it drops the
    head (the class count differs), and only logs what was missing (INFO, "Missing keys (a, b) discovered ...")."""
    logger, found = logging.getLogger("timm.models._builder"), []

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith("Missing keys (") and ") discovered" in text:
                found.extend(text[len("Missing keys (") : text.index(") discovered")].split(", "))

    listener, level = Listener(logging.INFO), logger.level
    logger.addHandler(listener)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(listener)
        logger.setLevel(level)


def _torch_misfit(err: Exception, name: str) -> str:
    """The first problem in load_state_dict's (or a timm filter's) error, in words."""
    text = str(err)
    size = re.search(
        r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
        r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)",
        text,
    )
    if size:
        return f"{size[1]} is {_shape(size[2])} in the file but {_shape(size[3])} in the model"
    missing = re.search(r'Missing key\(s\) in state_dict: "([^"]+)"', text)
    if missing:
        return f"it has no {missing[1]}"
    unexpected = re.search(r'Unexpected key\(s\) in state_dict: "([^"]+)"', text)
    if unexpected:
        return f"it has {unexpected[1]}, which {name} lacks"
    return load_failure(err)


def _shape(dims: str | torch.Size) -> str:
    """A shape as ``64 x 3 x 7 x 7`` (``a scalar`` for none)."""
    parts = [str(d).strip() for d in (dims.split(",") if isinstance(dims, str) else dims) if str(d).strip()]
    return " x ".join(parts) or "a scalar"


def _load_own(model: nn.Module, state: dict, where: str, name: str) -> None:
    """Load ``state`` into one of gain-exp's models strictly, its head (``fc``) re-initialised when the class count
    differs; one sentence naming the first tensor that is missing, extra or of another shape."""
    own = model.state_dict()
    head = [k for k in own if k.startswith("fc.")]
    if any(k in state and state[k].shape != own[k].shape for k in head):  # other classes: the model's new head
        state = {**{k: v for k, v in state.items() if k not in head}, **{k: own[k] for k in head}}
    problem = _misfit(state, own, name)
    if problem:
        raise ValueError(
            f"{where} does not fit {name}: {problem}; point it at weights saved from {name} (with the same "
            "backbone.kwargs), or set backbone.weights_file=null."
        )
    model.load_state_dict(state)


def _misfit(state: dict, own: dict, name: str) -> str | None:
    """The first model tensor that ``state`` lacks or holds in another shape, else its first extra one; None if none."""
    for key, value in own.items():
        if key not in state:
            return f"it has no {key}"
        if state[key].shape != value.shape:
            return f"{key} is {_shape(state[key].shape)} in the file but {_shape(value.shape)} in the model"
    extra = next((k for k in state if k not in own), None)
    return None if extra is None else f"it has {extra}, which {name} lacks"
