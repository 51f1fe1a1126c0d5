"""Datasets (real on-disk formats, looked up by name) and image transforms."""

from retain.data import imagenet32 as _imagenet32  # noqa: F401  (registers imagenet32)
from retain.data import samples as _samples  # noqa: F401  (registers cifar10_sample)
from retain.data.datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ImageDataset,
    UnreadableImageError,
    check_images,
    create_dataset,
    default_cache_dir,
    drop_images,
    read_image,
)
from retain.data.readers import FASHION_MNIST_CLASSES  # registers cifar10, imagefolder, fashion_mnist, ...
from retain.data.transforms import AUGMENTS, INTERPOLATIONS, RESIZES, build_transform

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "RESIZES",
    "ImageDataset",
    "UnreadableImageError",
    "build_transform",
    "check_images",
    "drop_images",
    "create_dataset",
    "default_cache_dir",
    "read_image",
]
