"""Published backbones: the files users load, the preprocessing that travels with them, and the
one loader every consumer here uses (``hubconf.py``, ``muscle_hpc.embed``).

One trained trunk, three ways to ship it (``muscle_hpc.export`` writes them):

- ``backbone_torchvision.pth``: a torchvision state dict that ``torchvision.models.resnet50()``
  loads strictly: ``conv1`` as weight/3 on 3 channels (a gray image repeated on 3 channels gives
  the trunk's outputs), and a freshly initialised 1000-class ``fc``, since MoCo's projection
  head is not what transfers. A torch pickle: loaded with ``weights_only=True`` everywhere here.
- ``backbone_torchvision.safetensors``: the same tensors in the format that needs no
  unpickling at all; its header's metadata carries the preprocessing and where the weights
  came from, so a loader never has to guess the input size or the Z-score.
- a hub folder (``--format hub``): ``model.safetensors`` with the trunk as trained (1-channel
  ``conv1``, no ``fc``), timm's ``config.json`` (architecture, ``in_chans`` 1, input size,
  mean/std, ``num_classes`` 0) and a ``README.md`` model card. ``timm.create_model(
  "local-dir:FOLDER", pretrained=True)`` and ``hf-hub:`` load it as it is; timm adapts
  ``conv1`` to ``in_chans=3`` by the same weight/3 rule.

Trade-off: the two files keep torchvision's strict layout (what most code expects of a
``.pth``), while the hub folder keeps the trunk as trained, which is what a hub config
describes; ``read`` accepts all three, and both ``conv1`` layouts give the same features.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from muscle_hpc import checkpoint, registry
from muscle_hpc.models.backbone import ARCHS, build_backbone, load_imagenet_into

SAFETENSORS_SUFFIX = ".safetensors"
HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
HUB_CARD = "README.md"
METADATA_KEY = "muscle_hpc"  # the safetensors header entry: JSON of ``Published``
# A uint8 image spans 256 levels; a batch that spans fewer than this many (once the Z-score is
# undone) is blank, or it is not an 8-bit image Z-scored (0-1 pixels span 1/std of a level).
MIN_LEVELS = 32


class WeightsError(ValueError):
    """A weights file or folder that cannot be used, said in one line."""


def z_score(gray, mean: float, std: float) -> torch.Tensor:
    """A uint8 array (any shape) as a float32 tensor of the same shape, Z-scored with the
    loaders' arithmetic (``augment.py``): ``(x - mean) * (1 / std)`` in float32. A copy: shard
    pages are read-only."""
    x = torch.from_numpy(np.array(gray, dtype=np.float32))
    return (x - np.float32(mean)) * np.float32(1.0 / std)


@dataclass(frozen=True)
class Preprocessing:
    """What the trunk saw in training: one gray channel (uint8, 16-bit images windowed over
    their own range), resized to ``width`` × ``height`` without letterbox (area averaging to
    shrink, bilinear to enlarge), then Z-scored as ``(x - mean) / std`` on the 0-255 scale.

    Calling it on a file path, a PIL image or a NumPy array returns the ``(1, H, W)`` float32
    tensor the loaders give the network. The gray conversion and the resize are the
    converter's own (``data_prep.imaging``), so an image embedded here and the same image
    packed into a shard give the same pixels."""

    width: int = 800
    height: int = 500
    mean: float = registry.PIXEL_MEAN
    std: float = registry.PIXEL_STD

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from data_prep import imaging  # cv2: only where images are decoded

        if isinstance(image, (str, os.PathLike)):
            try:
                image = imaging.open_image(image)
            except imaging.Unusable as e:
                raise WeightsError(f"{image}: {e}") from None
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[..., 0]
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a path, a PIL image or a NumPy array, not "
                            f"{type(image).__name__}")
        gray = imaging.resize(imaging.to_uint8(image), (self.width, self.height))
        return z_score(gray, self.mean, self.std)[None]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            return cls(int(d["width"]), int(d["height"]), float(d["mean"]), float(d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"the preprocessing recorded with the weights is incomplete "
                               f"({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Published:
    """What travels with the weights: the architecture, the preprocessing, and where the
    trunk came from (stage, method, step, code commit), all JSON-able."""

    arch: str
    preprocessing: Preprocessing
    source: dict

    def to_json(self) -> str:
        return json.dumps({"arch": self.arch, "preprocessing": self.preprocessing.as_dict(),
                           "source": self.source}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Published:
        try:
            d = json.loads(text)
            return cls(d["arch"], Preprocessing.from_dict(d["preprocessing"]), d.get("source", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"the weights' {METADATA_KEY} metadata is not readable "
                               f"({type(e).__name__})") from None


@dataclass(frozen=True)
class Weights:
    """A trunk's tensors as read (either ``conv1`` layout, with or without ``fc``), its
    architecture, and what was published with it (``None`` for a plain ``.pth``)."""

    state: dict[str, torch.Tensor]
    arch: str
    published: Published | None

    @property
    def preprocessing(self) -> Preprocessing:
        """The recorded preprocessing; the paper's (800×500, 122.786/18.390) for a file that
        records none (a ``.pth``): what every default config trains with."""
        return self.published.preprocessing if self.published else Preprocessing()


def trunk_arch(state: dict[str, torch.Tensor]) -> str:
    """``resnet18`` or ``resnet50``, from the names and shapes of ``state``'s trunk tensors
    (``fc`` aside: a head of any size may sit there); ``WeightsError`` for anything else."""
    keys = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in keys:
        raise WeightsError("not a ResNet state dict (no conv1.weight)")
    chans = keys["conv1.weight"][1]
    for arch in ARCHS:
        want = {k: tuple(v.shape) for k, v in build_backbone(arch, in_chans=chans).state_dict()
                .items() if not k.startswith("fc.")}
        if want == keys:
            return arch
    raise WeightsError(f"not a torchvision {' or '.join(ARCHS)} trunk ({len(keys)} tensors)")


def safetensors_metadata(published: Published) -> dict[str, str]:
    return {METADATA_KEY: published.to_json(), "format": "pt"}


def save_safetensors(path: Path, state: dict[str, torch.Tensor], published: Published) -> None:
    """``state`` as a ``.safetensors`` file at ``path``, atomically, with ``published`` in its
    header. Shared storage is copied first: safetensors refuses tensors that alias."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                metadata=safetensors_metadata(published))
    checkpoint.save_bytes(Path(path), data)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Published | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None
    return state, Published.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def _download(url: str, progress: bool) -> Path:
    """The file at ``url`` in torch hub's checkpoint cache (downloaded once), as torchvision's
    own weights are kept."""
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsError(f"{url}: the URL names no file")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dest), progress=progress)
        except OSError as e:
            raise WeightsError(f"{url}: download failed ({e})") from None
    return dest


def read(source: str | os.PathLike, progress: bool = True) -> Weights:
    """The weights at ``source``: a ``.safetensors`` file, a ``.pth`` torchvision state dict,
    a hub folder, a run directory (its exports), or an ``http(s)://``/``file://`` URL of a
    file. A ``.safetensors`` file is never unpickled; a ``.pth`` is unpickled with
    ``weights_only=True`` and refused if it holds anything but tensors. Raises
    ``WeightsError`` in one line."""
    text = os.fspath(source)
    if urlparse(text).scheme in ("http", "https", "file"):
        path = _download(text, progress)
    else:
        path = Path(text)
    if path.is_dir():
        for inside in (path / HUB_WEIGHTS,
                       registry.exported_backbone(path).with_suffix(SAFETENSORS_SUFFIX),
                       registry.exported_backbone(path)):
            if inside.is_file():
                return read(inside)
        raise WeightsError(f"{path}: no {HUB_WEIGHTS} (a hub folder) or "
                           f"{registry.EXPORTED_BACKBONE} (a run directory) in it")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == SAFETENSORS_SUFFIX:
        state, published = _read_safetensors(path)
    else:
        try:
            state = checkpoint.load(path)
        except checkpoint.UnsafeFileError as e:
            raise WeightsError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - any unreadable file, in one line
            raise WeightsError(f"{path} is not a readable torch file "
                               f"({type(e).__name__})") from None
        published = None
        if isinstance(state, dict) and "model" in state and "config" in state:
            raise WeightsError(f"{path} is a stage checkpoint, not a backbone: export it first "
                               f"(python -m muscle_hpc.export {path})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    arch = trunk_arch(state)
    if published is not None and published.arch != arch:
        raise WeightsError(f"{path}: its metadata says {published.arch}, its tensors are {arch}")
    return Weights(state, arch, published)


class InputCheck:
    """A forward pre-hook that warns once when a batch cannot be Z-scored 8-bit X-rays:
    values outside what ``(x - mean) / std`` of 0-255 pixels can take (raw 0-255 pixels,
    HU), or a batch spanning fewer than ``MIN_LEVELS`` gray levels (0-1 pixels, a constant).
    The bounds follow from the Z-score alone, not from any dataset's statistics, so a correct
    input never trips it. It costs one min/max per batch (a GPU sync) until it has warned."""

    def __init__(self, preprocessing: Preprocessing):
        p = preprocessing
        slack = 0.5 / p.std  # half a gray level: rounding, resampling
        self.low, self.high = (0 - p.mean) / p.std - slack, (255 - p.mean) / p.std + slack
        self.min_span = MIN_LEVELS / p.std
        self.preprocessing = p
        self.warned = False

    def problem(self, x: torch.Tensor) -> str | None:
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return "it holds NaN or Inf"
        if lo < self.low or hi > self.high:
            return (f"its values span [{lo:.3g}, {hi:.3g}], outside [{self.low:.2f}, "
                    f"{self.high:.2f}], all a Z-scored 8-bit image can take (raw 0-255 pixels?)")
        if hi - lo < self.min_span:
            return (f"its values span only {hi - lo:.3g}, fewer than {MIN_LEVELS} gray levels "
                    f"once Z-scored (0-1 pixels, or a blank image?)")
        return None

    def __call__(self, module: nn.Module, args) -> None:
        if self.warned or torch.compiler.is_compiling() or not args:
            return
        found = self.problem(args[0])
        if found is not None:
            self.warned = True
            p = self.preprocessing
            warnings.warn(f"this input does not look like the backbone's: {found}. It expects "
                          f"gray images resized to {p.width}x{p.height} and Z-scored as "
                          f"(x - {p.mean}) / {p.std} on 0-255 pixels: use the preprocessing "
                          f"shipped with the weights (hubconf transforms(), "
                          f"muscle_hpc.weights.Preprocessing). Said once.", stacklevel=3)


def backbone(weights: Weights, in_chans: int = 1, num_classes: int = 0,
             check_inputs: bool = True) -> nn.Module:
    """A torchvision ResNet holding ``weights``' trunk, ready for inference or fine-tuning.

    Args:
        weights: from ``read``.
        in_chans: 1 (the gray image, as trained) or 3 (the gray image repeated on three
            channels, for code that feeds RGB: ``conv1`` is weight/3 on each).
        num_classes: 0 gives ``fc = Identity``, so the model returns the pooled features
            (512 or 2048); otherwise a freshly initialised ``Linear`` of that many outputs.
        check_inputs: warn once (``InputCheck``) when a batch is not preprocessed as in
            training.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, not {in_chans}")
    model = build_backbone(weights.arch, in_chans=1)
    load_imagenet_into(model, weights.state)  # sums a 3-channel conv1, drops any fc
    if in_chans == 3:
        w = model.conv1.weight.detach()
        model.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        model.conv1.weight.data.copy_((w / 3).repeat(1, 3, 1, 1))
    model.fc = nn.Linear(model.fc.in_features, num_classes) if num_classes else nn.Identity()
    model.preprocessing = weights.preprocessing
    if check_inputs:
        model.register_forward_pre_hook(InputCheck(weights.preprocessing))
    return model.eval()
