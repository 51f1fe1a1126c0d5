"""Image transforms for uint8 (3, H, W) tensors, built with torchvision.transforms.v2."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

__all__ = ["AUGMENTS", "INTERPOLATIONS", "RESIZES", "build_transform"]

AUGMENTS = ("none", "crop_flip", "rrc", "pad_rrc", "resize_pad_rrc")
RESIZES = ("direct", "crop")
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_CROP_PCT = 0.875


def _choose(kind: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"invalid {kind} {value!r}; valid values: {', '.join(valid)}")


def build_transform(
    train: bool,
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    augment: str = "none",
    rrc_scale: tuple[float, float] = (0.08, 1.0),
    resize: str = "direct",
    interpolation: str = "bilinear",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build a transform from a uint8 (3, H, W) tensor to a float32 (3, image_size, image_size) tensor.

    Args:
        train: whether to apply ``augment`` (evaluation never augments).
        image_size: output side length.
        mean: per-channel mean for Normalize after scaling to [0, 1]; None keeps inputs in [0, 1].
        std: per-channel std (required when ``mean`` is given).
        augment: "none"; "crop_flip" (resize, RandomCrop with padding 4, horizontal flip);
            "rrc" (RandomResizedCrop with ``rrc_scale``, horizontal flip); "pad_rrc" (zero padding 4, then
            RandomResizedCrop, horizontal flip: FACIL's ``pad`` + ``crop`` + ``flip`` for 32-px data);
            "resize_pad_rrc" (resize to image_size, zero padding 4, RandomResizedCrop, horizontal flip: FACIL's
            ``resize`` + ``pad`` + ``crop`` + ``flip``, its ``cifar100_224``).
        rrc_scale: area range of RandomResizedCrop.
        resize: without augmentation, "direct" resizes to (image_size, image_size) (a no-op at that size);
            "crop" resizes the short side to int(image_size / 0.875) then centre-crops (timm's eval transform).
        interpolation: "bilinear" or "bicubic".

    Returns:
        A callable transform (a ``torchvision.transforms.v2.Compose``).
    """
    _choose("augment", augment, AUGMENTS)
    _choose("resize", resize, RESIZES)
    _choose("interpolation", interpolation, tuple(INTERPOLATIONS))
    if mean is not None and std is None:
        raise ValueError("std is required when mean is given")
    interp = INTERPOLATIONS[interpolation]
    size = (image_size, image_size)
    steps: list[Callable] = []
    if train and augment == "crop_flip":
        steps += [
            v2.Resize(size, interpolation=interp, antialias=True),
            v2.RandomCrop(image_size, padding=4),
            v2.RandomHorizontalFlip(),
        ]
    elif train and augment in ("rrc", "pad_rrc", "resize_pad_rrc"):
        steps += [v2.Resize(size, interpolation=interp, antialias=True)] if augment == "resize_pad_rrc" else []
        steps += [v2.Pad(4)] if augment != "rrc" else []
        steps += [
            v2.RandomResizedCrop(image_size, scale=tuple(rrc_scale), interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    elif resize == "direct":
        # v2.Resize returns the input unchanged when it already has the target size.
        steps.append(v2.Resize(size, interpolation=interp, antialias=True))
    else:
        steps += [
            v2.Resize(int(image_size / _CROP_PCT), interpolation=interp, antialias=True),
            v2.CenterCrop(image_size),
        ]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)
