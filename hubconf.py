"""torch.hub entry points: muscle-hpc's X-ray backbones and the preprocessing they expect.

    import torch
    model = torch.hub.load("path/to/muscle-hpc", "muscle_resnet50", source="local",
                           weights="runs/continual_r50/backbone_torchvision.safetensors")
    features = model(model.preprocessing("chest.png")[None])   # (1, 2048)

``weights`` is a ``.safetensors`` or ``.pth`` file, a hub folder (``muscle_hpc.export
--format hub``), a run directory, or an ``https://`` / ``file://`` URL of a file (downloaded
once into torch hub's cache). A ``.pth`` is loaded with ``weights_only=True``; a
``.safetensors`` file is never unpickled. Only torch, torchvision, NumPy, Pillow, OpenCV and
safetensors are needed (the training stack is not).
"""

dependencies = ["torch", "torchvision", "numpy", "PIL", "cv2", "safetensors"]

from muscle_hpc import weights as _weights  # noqa: E402 - torch.hub reads `dependencies` first


def _backbone(arch, weights, in_chans, num_classes, check_inputs, progress):
    found = _weights.read(weights, progress=progress)
    if found.arch != arch:
        raise ValueError(f"{weights} holds a {found.arch} backbone, not a {arch}: load it with "
                         f"muscle_{found.arch}")
    return _weights.backbone(found, in_chans=in_chans, num_classes=num_classes,
                             check_inputs=check_inputs)


def muscle_resnet18(weights, in_chans=1, num_classes=0, check_inputs=True, progress=True):
    """A torchvision ResNet-18 holding a muscle-hpc backbone, in eval mode.

    Args:
        weights: the file, folder or URL to read (see the module docstring).
        in_chans: 1 (gray, as trained) or 3 (the gray image repeated on three channels).
        num_classes: 0: the model returns the pooled 512 features; N: a fresh N-way ``fc``.
        check_inputs: warn once when a batch is not preprocessed as in training.
        progress: show a download's progress.

    ``model.preprocessing`` turns a path, PIL image or NumPy array into the input tensor.
    """
    return _backbone("resnet18", weights, in_chans, num_classes, check_inputs, progress)


def muscle_resnet50(weights, in_chans=1, num_classes=0, check_inputs=True, progress=True):
    """A torchvision ResNet-50 holding a muscle-hpc backbone, in eval mode; the arguments are
    ``muscle_resnet18``'s (its pooled features are 2048)."""
    return _backbone("resnet50", weights, in_chans, num_classes, check_inputs, progress)


def transforms(weights=None, progress=True):
    """The preprocessing as a callable (path, PIL image or NumPy array -> a ``(1, H, W)``
    float tensor): gray, resized, Z-scored. With ``weights``, the one recorded with them;
    without, the paper's (800x500, 122.786/18.390), as for a ``.pth`` that records none."""
    if weights is None:
        return _weights.Preprocessing()
    return _weights.read(weights, progress=progress).preprocessing
