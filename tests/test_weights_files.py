"""Weights files, checkpoints, pretrained weights offline and images through the Python API: every bad input is one
sentence (what, where, how to fix), never a traceback and never the advice to load with weights_only=False."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from gain_exp.core.backbones import create_backbone
from gain_exp.gain import GAIN
from gain_exp.train.checkpoints import read_checkpoint


class _Code:
    """Unpickling it would run a shell command: what a malicious weights file holds."""

    def __reduce__(self):
        return (os.system, ("echo never",))


def _net(name: str = "test_resnet", k: int = 1000, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=k, **kwargs)


def _bad_file(kind: str, folder: Path) -> Path:
    """A file that is not a usable state dict, of the given kind."""
    path = folder / f"{kind}.pth"
    good = folder / "good.pth"
    torch.save(_net().state_dict(), good)
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint at all\n")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 20)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "a zip archive, but not one torch wrote")
    elif kind == "code":
        torch.save({"model": _Code()}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))
    elif kind == "safetensors":
        path = folder / "half.safetensors"
        save_file(_net().state_dict(), folder / "full.safetensors")
        path.write_bytes((folder / "full.safetensors").read_bytes()[:3000])
    return path


KINDS = ["directory", "empty", "text", "random", "truncated", "zip", "code", "pickle", "safetensors"]


def _one_sentence(message: str, path: Path | str) -> None:
    assert "\n" not in message and str(path) in message and message.endswith(".")
    assert "weights_only" not in message and "Traceback" not in message


def _no_chain(err: BaseException) -> None:
    """No 'During handling of the above exception' traceback above the sentence."""
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


# --- backbone.weights_file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_weights_file_is_one_sentence(kind, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ValueError) as info:
        create_backbone("test_resnet", num_classes=3, weights_file=str(path))
    message = str(info.value)
    _one_sentence(message, path)
    assert message.startswith(f"backbone.weights_file={path} ")
    _no_chain(info.value)


@pytest.mark.parametrize(
    "kind,phrase",
    [
        ("directory", "is a directory, not a weights file"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is unreadable (RuntimeError: PytorchStreamReader"),
        ("text", "is unreadable ("),
        ("safetensors", "is unreadable (SafetensorError"),
        ("code", "holds objects other than tensors and plain values (unsupported GLOBAL posix.system"),
    ],
)
def test_the_weights_file_sentence_says_what_is_wrong(kind, phrase, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ValueError, match=None) as info:
        create_backbone("test_resnet", num_classes=3, weights_file=str(path))
    assert phrase in str(info.value)


def test_a_weights_file_that_holds_no_state_dict_says_what_it_holds(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError) as info:
        create_backbone("test_resnet", num_classes=3, weights_file=str(tmp_path / "tensor.pth"))
    _one_sentence(str(info.value), tmp_path / "tensor.pth")
    assert "holds a Tensor, not a state dict of tensors" in str(info.value)


def test_weights_of_another_model_name_the_first_missing_tensor(tmp_path):
    """Before: loaded without a word (the head is re-initialised, so timm loads non-strictly): a random backbone."""
    torch.save(_net("gain_cnn4", k=4).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(ValueError) as info:
        create_backbone("test_resnet", num_classes=3, weights_file=str(tmp_path / "cnn.pth"))
    _one_sentence(str(info.value), tmp_path / "cnn.pth")
    assert "does not fit test_resnet: it has no conv1.0.weight" in str(info.value)


def test_weights_missing_one_tensor_name_it(tmp_path):
    state = _net().state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"does not fit test_resnet: it has no layer2\.0\.conv1\.weight"):
        create_backbone("test_resnet", num_classes=3, weights_file=str(tmp_path / "partial.pth"))


def test_weights_of_the_wrong_shape_name_the_tensor_and_both_shapes(tmp_path):
    state = _net().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(8, 24, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError) as info:
        create_backbone("test_resnet", num_classes=3, weights_file=str(tmp_path / "shape.pth"))
    _one_sentence(str(info.value), tmp_path / "shape.pth")
    assert "layer1.0.conv1.weight is 8 x 24 x 1 x 1 in the file but " in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_good_weights_still_load_with_a_new_head(suffix, tmp_path):
    src = _net()
    path = tmp_path / f"w{suffix}"
    save_file(src.state_dict(), path) if suffix == ".safetensors" else torch.save(src.state_dict(), path)
    model = create_backbone("test_resnet", num_classes=3, weights_file=str(path))
    torch.testing.assert_close(model.conv1[0].weight, src.conv1[0].weight)
    assert model.fc.out_features == 3
    assert "state_dict" not in model.pretrained_cfg  # the file's tensors are not kept alive by the model


@pytest.mark.parametrize("name", ["gain_cnn4", "mlp"])
def test_gain_exp_models_take_a_weights_file(name, tmp_path):
    """Documented in conf/backbone/{gain_cnn4,mlp}.yaml; before, refused as 'has no pretrained weights'."""
    kwargs = {"img_size": 16} if name == "mlp" else {}
    src = _net(name, k=4, seed=1, **kwargs)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(2)
    same = create_backbone(name, num_classes=4, weights_file=str(tmp_path / "w.pth"), **kwargs)
    for key, value in src.state_dict().items():  # the same classes: every tensor, the head included
        torch.testing.assert_close(same.state_dict()[key], value)
    torch.manual_seed(2)
    other = create_backbone(name, num_classes=3, weights_file=str(tmp_path / "w.pth"), **kwargs)
    torch.manual_seed(2)
    fresh = _net(name, k=3, seed=2, **kwargs)
    for key, value in other.state_dict().items():  # other classes: the body loaded, the head re-initialised
        expected = fresh.state_dict()[key] if key.startswith("fc.") else src.state_dict()[key]
        torch.testing.assert_close(value, expected)


def test_a_gain_exp_checkpoint_is_a_weights_file_for_its_backbone(tmp_path):
    src = _net("gain_cnn4", k=4)
    torch.save({"model": src.state_dict(), "epoch": 3, "step": 30}, tmp_path / "best.ckpt")
    model = create_backbone("gain_cnn4", num_classes=4, weights_file=str(tmp_path / "best.ckpt"))
    torch.testing.assert_close(model.features[0].weight, src.features[0].weight)


def test_gain_cnn4_weights_of_another_width_name_the_tensor_and_shapes(tmp_path):
    torch.save(_net("gain_cnn4_wide", k=4).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError) as info:
        create_backbone("gain_cnn4", num_classes=4, weights_file=str(tmp_path / "wide.pth"))
    _one_sentence(str(info.value), tmp_path / "wide.pth")
    assert "does not fit gain_cnn4: features.0.weight is 64 x 3 x 3 x 3 in the file but 32 x 3 x 3 x 3" in str(
        info.value
    )


def test_gain_cnn4_weights_with_another_norm_name_the_first_missing_tensor(tmp_path):
    torch.save(_net("gain_cnn4", k=4).state_dict(), tmp_path / "bn.pth")
    with pytest.raises(ValueError, match=r"does not fit gain_cnn4: it has no features\.0\.bias"):
        create_backbone("gain_cnn4", num_classes=4, weights_file=str(tmp_path / "bn.pth"), norm="none")


# --- backbone.pretrained=true offline -------------------------------------------------------------------------------


def test_pretrained_weights_offline_are_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached either
    with pytest.raises(ValueError) as info:
        create_backbone("test_resnet", num_classes=3, pretrained=True)
    message = str(info.value)
    assert message == (
        "backbone.pretrained=true: the weights of test_resnet cannot be downloaded offline (HF_HUB_OFFLINE is set) "
        "and are not in the local cache; set backbone.weights_file=<local file> or backbone.pretrained=false."
    )
    _no_chain(info.value)


@pytest.mark.parametrize("name", ["gain_cnn4", "gain_cnn4_wide", "mlp"])
def test_pretrained_weights_of_gain_exp_models_do_not_exist(name):
    with pytest.raises(ValueError) as info:
        create_backbone(name, num_classes=3, pretrained=True)
    assert str(info.value) == (
        f"backbone.pretrained=true: {name} has no pretrained weights (gain-exp's own model, trained from scratch); "
        "set backbone.pretrained=false, or backbone.weights_file=<local file> to start from weights you saved."
    )
    _no_chain(info.value)


# --- --checkpoint FILE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])  # load_experiment reads without mmap, checkpoint_record with it
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_checkpoint_file_is_one_sentence(kind, mmap, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path, "cpu", mmap=mmap, option="--checkpoint", needs=("model",), instead="use best or last")
    message = str(info.value)
    _one_sentence(message, path)
    assert message.startswith(f"--checkpoint: checkpoint {path} ") and message.endswith("; use best or last.")
    _no_chain(info.value)


def test_a_checkpoint_with_code_names_what_it_would_import(tmp_path):
    path = _bad_file("code", tmp_path)
    with pytest.raises(ValueError, match=r"\(unsupported GLOBAL posix\.system"):
        read_checkpoint(path, "cpu", option="--checkpoint", needs=("model",), instead="use best or last")


def test_a_checkpoint_whose_model_is_no_state_dict_is_refused(tmp_path):
    torch.save({"model": [1, 2, 3]}, tmp_path / "list.ckpt")
    with pytest.raises(ValueError) as info:
        read_checkpoint(tmp_path / "list.ckpt", "cpu", option="--checkpoint", needs=("model",), instead="use best")
    _one_sentence(str(info.value), tmp_path / "list.ckpt")
    assert "is not a gain-exp checkpoint (its model is a list, not a state dict)" in str(info.value)


# --- images through the Python API ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gain() -> GAIN:
    return GAIN(_net(k=4)).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.uint8, torch.int64])
def test_images_of_another_dtype_are_one_sentence(gain, dtype):
    images = torch.zeros(2, 3, 32, 32, dtype=dtype)
    with pytest.raises(ValueError) as info:
        gain(images)
    message = str(info.value)
    assert "\n" not in message and f"images are {dtype}" in message and "torch.float32" in message
    assert "images.float()" in message


def test_integer_images_are_told_to_normalise(gain):
    with pytest.raises(ValueError, match=r"normalise"):
        gain(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_float32_images_of_a_float64_model_are_one_sentence():
    gain = GAIN(_net(k=4).double()).eval()
    with pytest.raises(ValueError, match=r"images are torch\.float32 but the backbone's weights are torch\.float64"):
        gain(torch.zeros(2, 3, 32, 32))
    assert gain(torch.zeros(2, 3, 32, 32, dtype=torch.float64)).logits.dtype == torch.float64


def test_an_image_without_batch_dimension_is_one_sentence(gain):
    with pytest.raises(ValueError) as info:
        gain(torch.zeros(3, 32, 32))
    assert str(info.value) == (
        "images must be a B x C x H x W tensor but have shape (3, 32, 32); add the batch dimension with "
        "images.unsqueeze(0)."
    )


@pytest.mark.parametrize("name", ["test_resnet", "gain_cnn4"])
def test_images_with_the_wrong_channel_count_are_one_sentence(name):
    gain = GAIN(_net(name, k=4)).eval()
    layer = "conv1.0" if name == "test_resnet" else "features.0"
    with pytest.raises(ValueError) as info:
        gain(torch.zeros(2, 1, 32, 32))
    assert str(info.value) == (
        f"images have 1 channel but the backbone's first layer ({layer}) takes 3; pass B x 3 x H x W images "
        "(grey ones as images.expand(-1, 3, -1, -1))."
    )


def test_mlp_images_with_the_wrong_channel_count_are_one_sentence():
    gain = GAIN(_net("mlp", k=4, img_size=8)).eval()
    with pytest.raises(ValueError, match=r"backbone mlp was built for 3-channel images but got 1"):
        gain(torch.zeros(2, 1, 8, 8), attention=False)
