"""Downsampled ImageNet 32x32 (Chrabaszcz, Loshchilov, Hutter 2017) in its npz release, read without unpickling.

The release holds ``train_data_batch_1..10.npz`` and ``val_data.npz`` (often in ``Imagenet32_train_npz/`` and
``Imagenet32_val_npz/``), each with ``data`` (N, 3072) uint8 in channel-planar order (R, G, B planes of 32x32) and
``labels`` (N,) from 1 to 1000. The ``val`` file is the test split (as in FACIL's ``imagenet_32_reduced``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retain.data.datasets import DATASETS, ImageDataset

__all__ = ["read_imagenet32"]

_N_CLASSES = 1000


def _files(root: Path, split: str) -> list[Path]:
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(root.rglob(pattern), key=lambda p: (len(p.name), p.name))  # batch_2 before batch_10
    if not files:
        hint = ""
        if any(root.rglob("train_data_batch_*")) or any(root.rglob("val_data")):
            hint = " (found the pickled release: download the npz one, which is read without unpickling)"
        raise FileNotFoundError(
            f"no Imagenet32 {pattern} under {root}{hint}; pass data.root=<folder of the npz release> "
            "(Imagenet32_train_npz.zip and Imagenet32_val_npz.zip, unzipped)"
        )
    return files


def read_imagenet32(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) in 0..999) of ``split`` from the npz files under ``root``."""
    images, labels = [], []
    for path in _files(root, split):
        with np.load(path, allow_pickle=False) as f:
            data, lab = f["data"], f["labels"]
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        labels.append(np.asarray(lab, dtype=np.int64).reshape(-1) - 1)
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= _N_CLASSES:
        raise ValueError(f"Imagenet32 labels should lie in 1..1000, found {labels.min() + 1}..{labels.max() + 1}")
    return np.ascontiguousarray(np.concatenate(images)), labels


@DATASETS.register("imagenet32")
def _imagenet32(split: str, root: Path | None, download: bool, cache_dir: Path) -> ImageDataset:
    """Downsampled ImageNet 32x32, 1000 classes (named by their 0-based id); ``download`` is not available."""
    if root is None or not root.exists():
        raise FileNotFoundError(f"imagenet32 needs data.root=<folder of the npz release>, got {root}; the data is "
                                "at image-net.org (Downsampled ImageNet, 32x32, npz)")  # fmt: skip
    images, labels = read_imagenet32(root, split)
    return ImageDataset(labels, [str(i) for i in range(_N_CLASSES)], images=images)
