"""Datasets (real on-disk formats, looked up by name) and image transforms."""

from retain.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    ImageDataset,
    create_dataset,
    default_cache_dir,
)
from retain.data.transforms import AUGMENTS, INTERPOLATIONS, RESIZES, build_transform

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "RESIZES",
    "ImageDataset",
    "build_transform",
    "create_dataset",
    "default_cache_dir",
]
