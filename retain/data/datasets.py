"""Labelled image datasets: the :class:`ImageDataset` container, its file checks and the registry they are built from.

Every dataset is an :class:`ImageDataset`: uint8 images held in memory as one ``(N, H, W, C)`` array (small images)
or as a list of file paths decoded lazily (large images). ``create_dataset(name, split, root, ...)`` builds one from
the :data:`DATASETS` registry; the readers of the on-disk formats (:mod:`retain.data.readers`,
:mod:`retain.data.imagenet32`, :mod:`retain.data.samples`) register themselves when :mod:`retain.data` is imported.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retain.registry import Registry

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "UnreadableImageError",
    "check_images",
    "drop_images",
    "create_dataset",
    "default_cache_dir",
    "read_image",
]

DATASETS = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_SPLITS = ("train", "test")


class UnreadableImageError(ValueError):
    """An image file that PIL cannot decode (not an image, truncated, corrupt); the message names it."""


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(source: str | Path | bytes, name: str | None = None, hint: str = "replace or delete it") -> np.ndarray:
    """Decode one image (a file or its bytes) to a uint8 (H, W, 3) RGB array; UnreadableImageError naming it."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return np.asarray(img.convert("RGB"))
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(f"cannot read image {name or source} ({e}); {hint}") from None


def _probe(path: str, decode: bool) -> None:
    """Open ``path`` as an image (its header only, or the whole decode); UnreadableImageError if that fails."""
    if not os.path.exists(path):
        raise UnreadableImageError(f"image file {path} is missing; restore it or set data.bad_images=skip "
                                   "(imagefolder runs list their files in split_manifest.json)")  # fmt: skip
    if decode:
        read_image(path)
        return
    try:
        with Image.open(path):
            pass
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(f"cannot read image {path} ({e}); replace or delete it, or set "
                                   "data.bad_images=skip") from None  # fmt: skip


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image set held either as a uint8 array (N, H, W, C) (C = 1 or 3) or as a list of file paths.

    Args:
        targets: (N,) class indices into ``classes``.
        classes: class names.
        images: uint8 array (N, H, W, C) with C = 1 or 3 (a (N, H, W) array is taken as C = 1).
        paths: image file paths, decoded with PIL on access.
        transform: applied to the uint8 (3, H, W) tensor returned by :meth:`load`.
    """

    def __init__(
        self,
        targets: np.ndarray,
        classes: list[str],
        images: np.ndarray | None = None,
        paths: list[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset needs exactly one of images= (uint8 array) or paths= (list of files)")
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.classes = list(classes)
        if images is not None:
            images = np.asarray(images)
            if images.ndim == 3:
                images = images[..., None]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
                raise ValueError(
                    f"images must be a uint8 array (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}"
                )
            n = len(images)
        else:
            paths = [str(p) for p in paths]
            n = len(paths)
        if n != len(self.targets):
            raise ValueError(f"{n} images but {len(self.targets)} targets")
        if n and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise ValueError(
                f"targets must lie in [0, {len(self.classes)}), got [{self.targets.min()}, {self.targets.max()}]"
            )
        self.images = images
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> torch.Tensor:
        """Return image ``i`` as a uint8 (3, H, W) tensor, untransformed."""
        if self.images is not None:
            image = torch.from_numpy(np.array(self.images[i].transpose(2, 0, 1)))
            return image.repeat(3, 1, 1) if image.shape[0] == 1 else image
        array = read_image(self.paths[i], hint="replace or delete it, or set data.bad_images=skip")
        # a (3, H, W) view of the decoded (H, W, 3) pixels, not a copy: torchvision's uint8 resize is fastest on this
        # layout (up to 1.25x the images/s on ImageNet-R-sized JPEGs; benchmarks/input_pipeline.py), same output
        array = array if array.flags.writeable else array.copy()  # PIL's pixels are read-only; a plain memcpy
        return torch.from_numpy(array).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """Return a shallow copy sharing images/paths and targets, with a new transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __repr__(self) -> str:
        source = f"images={tuple(self.images.shape)}" if self.images is not None else f"paths={len(self.paths)}"
        return f"ImageDataset(n={len(self)}, classes={len(self.classes)}, {source}, transform={self.transform!r})"


def check_images(dataset: ImageDataset, skip: bool = False, warn: Callable[[str], None] | None = None) -> ImageDataset:
    """Check the files of a path-based dataset before training (array datasets were decoded when built).

    ``skip=False``: every file's header is read; the first unreadable file raises UnreadableImageError naming it
    (a file corrupt past its header stops training when first read, naming it the same way). ``skip=True``: every
    file is fully decoded and the unreadable ones are dropped, with one warning counting and naming them.
    """
    if dataset.paths is None:
        return dataset
    bad = []
    for i, path in enumerate(dataset.paths):
        try:
            _probe(path, decode=skip)
        except UnreadableImageError:
            if not skip:
                raise
            bad.append(i)
    return drop_images(dataset, bad, warn or (lambda m: warnings.warn(m, stacklevel=4)))


def drop_images(dataset: ImageDataset, bad: list[int], warn: Callable[[str], None] | None = None) -> ImageDataset:
    """``dataset`` without the files at indices ``bad`` (ascending), with one warning counting and naming them
    (``warn``, default :func:`warnings.warn`); ``dataset`` itself when ``bad`` is empty."""
    if not bad:
        return dataset
    names = ", ".join(dataset.paths[i] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    (warn or (lambda m: warnings.warn(m, stacklevel=3)))(f"skipped {len(bad)} unreadable image file(s): {names}")
    keep = np.setdiff1d(np.arange(len(dataset)), bad)
    paths = [dataset.paths[i] for i in keep]
    return ImageDataset(dataset.targets[keep], dataset.classes, paths=paths, transform=dataset.transform)


def default_cache_dir() -> Path:
    """Cache folder: ``$RETAIN_CACHE`` if set, else ``~/.cache/retain``."""
    env = os.environ.get("RETAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "retain"


def create_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> ImageDataset:
    """Build a registered dataset.

    Args:
        name: a name in :data:`DATASETS` (``DATASETS.names()``).
        split: "train" or "test".
        root: where the data lies (format depends on the dataset); None uses the dataset's default.
        download: fetch the data through torchvision when it is absent.
        cache_dir: folder for downloads, extracted archives and decoded caches; None uses :func:`default_cache_dir`.
        **options: dataset-specific options (an unknown key raises ValueError naming the valid ones).

    Returns:
        The dataset, without a transform.
    """
    builder = DATASETS.get(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    _check_options(name, builder, options)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root_path = Path(root).expanduser() if root is not None else None
    return builder(split, root_path, download, cache, **options)


def _check_options(name: str, builder: Callable, options: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"valid options: {', '.join(valid) if valid else '(none)'}"
        )
