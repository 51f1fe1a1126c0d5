"""Readers of the on-disk dataset formats: CIFAR-10/100, image folders, Caltech-101, Fashion-MNIST, digits, synthetic.

Each registers itself in :data:`~retain.data.datasets.DATASETS` when :mod:`retain.data` is imported.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from retain.data.cache import atomic_write, build_lock, cached_archive_arrays, cached_folder_arrays, is_archive
from retain.data.datasets import DATASETS, ImageDataset
from retain.data.folders import list_classes, scan_folder, sort_classes

__all__ = ["FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_MANIFEST_FORMAT = "retain-imagefolder-split-v1"
_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------- CIFAR


def _download_lock(root: Path, download: bool) -> contextlib.AbstractContextManager:
    """One downloader per dataset folder among concurrent runs (a sweep's ``--jobs``, the ranks of one run): the
    others wait on ``<root>/.download.lock``, then find the files and skip the download (torchvision checks them)."""
    return build_lock(root / ".download") if download else contextlib.nullcontext()


def _cifar(
    name: str, tv_folder: str, title: str, split: str, root: Path | None, download: bool, cache_dir: Path
) -> ImageDataset:
    from torchvision import datasets as tvd

    root = root if root is not None else cache_dir / name
    if is_archive(root):
        return cached_archive_arrays(name, root, split, cache_dir)
    if root.name == tv_folder and root.is_dir():  # root given as the torchvision folder itself
        root = root.parent
    tv_class = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if (root / tv_folder).is_dir() or (download and not (root / "train").is_dir()):
        # torchvision's own loader: the only place pickles are read (and it checks md5s first).
        with _download_lock(root, download):
            ds = tv_class(str(root), train=split == "train", download=download)
        return ImageDataset(np.asarray(ds.targets), list(ds.classes), images=np.asarray(ds.data, dtype=np.uint8))
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no {title} found at {root}: expected {root / tv_folder} (torchvision format), "
            f"{folder}/<class>/*.jpg (folder layout) or a .tar.gz of that layout; "
            f"pass root=<one of those> or download=True"
        )
    classes = list_classes(folder)
    other = root / ("test" if split == "train" else "train")
    if other.is_dir() and list_classes(other) != classes:
        raise ValueError(f"class folders differ between {folder} and {other}")
    return cached_folder_arrays(name, folder, cache_dir, classes)


@DATASETS.register("cifar10")
def _cifar10(split: str, root: Path | None, download: bool, cache_dir: Path) -> ImageDataset:
    """CIFAR-10 from torchvision's pickles, a ``train/``+``test/`` class-folder layout, or a .tar.gz of it."""
    return _cifar("cifar10", "cifar-10-batches-py", "CIFAR-10", split, root, download, cache_dir)


@DATASETS.register("cifar100")
def _cifar100(split: str, root: Path | None, download: bool, cache_dir: Path) -> ImageDataset:
    """CIFAR-100 (fine labels) from torchvision's pickles, a class-folder layout, or a .tar.gz of it."""
    return _cifar("cifar100", "cifar-100-python", "CIFAR-100", split, root, download, cache_dir)


# --------------------------------------------------------------------------------------------- image folders


def _stratified_split(
    classes: list[str], files: list[str], targets: np.ndarray, seed: int, fraction: float
) -> dict[str, list[str]]:
    """Per class, a seeded shuffle whose first round(n * fraction) files train; each class has its own stream."""
    out: dict[str, list[str]] = {"train": [], "test": []}
    for label, cls in enumerate(classes):
        idx = np.flatnonzero(targets == label)
        perm = np.random.default_rng([seed, zlib.crc32(cls.encode())]).permutation(len(idx))
        n_train = int(np.floor(len(idx) * fraction + 0.5))
        chosen = np.zeros(len(idx), dtype=bool)
        chosen[perm[:n_train]] = True
        out["train"] += [files[i] for i in idx[chosen]]
        out["test"] += [files[i] for i in idx[~chosen]]
    return out


def _require_dir(path: Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"{what}: no root given; {hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist; {hint}")
    return path


@DATASETS.register("imagefolder")
def _imagefolder(
    split: str,
    root: Path | None,
    download: bool,
    cache_dir: Path,
    *,
    split_seed: int = 0,
    train_fraction: float = 0.8,
    manifest: str | None = None,
) -> ImageDataset:
    """Any ``root/<class>/*`` folder (lazy paths).

    Class labels follow :func:`~retain.data.folders.sort_classes`: by value when every class folder name is an
    integer (Flowers-102's ``1..102`` give label = value - 1, as its imagelabels.mat), else lexicographically. If
    ``root/train`` and ``root/test`` exist they are the splits (classes from ``train``; the split options are
    unused). Otherwise each class is split ``train_fraction``/rest with ``split_seed``. With ``manifest``, an
    existing JSON file gives the split (relative paths, seed, fraction) and the class list, whose order is honoured
    so a run's labels never change; an absent one is written.
    """
    root = _require_dir(root, "imagefolder", "pass root=<folder with one sub-folder of images per class>")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = list_classes(root / "train")
        test_classes = list_classes(root / "test")
        if not set(test_classes) <= set(classes):
            raise ValueError(
                f"{root / 'test'} has classes missing from {root / 'train'}: "
                f"{sorted(set(test_classes) - set(classes))}"
            )
        folder = root / split
        _, files, targets = scan_folder(folder, classes)
        return ImageDataset(targets, classes, paths=[str(folder / f) for f in files])
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    manifest_path = Path(manifest).expanduser() if manifest is not None else None
    if manifest_path is not None and manifest_path.is_file():
        data = json.loads(manifest_path.read_text())
        if data.get("format") != _MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a retain imagefolder split manifest")
        if (data["split_seed"], data["train_fraction"]) != (split_seed, train_fraction):
            warnings.warn(
                f"using the split in {manifest_path} (split_seed={data['split_seed']}, "
                f"train_fraction={data['train_fraction']}), not split_seed={split_seed}, "
                f"train_fraction={train_fraction}",
                stacklevel=3,
            )
        classes = list(data["classes"])
        if classes == sorted(classes) != sort_classes(classes):  # integer folders in retain's former text order
            warnings.warn(
                f"{manifest_path} orders its integer class folders as text ('10' before '2'), as retain did before; "
                "kept so this run's labels do not change. For the numeric order (Flowers-102's official labels), "
                "delete it or use a new run name",
                stacklevel=3,
            )
        files = list(data[split])
    else:
        classes, all_files, all_targets = scan_folder(root)
        splits = _stratified_split(classes, all_files, all_targets, split_seed, train_fraction)
        if manifest_path is not None:
            record = {
                "format": _MANIFEST_FORMAT,
                "root": str(root.resolve()),
                "classes": classes,
                "split_seed": split_seed,
                "train_fraction": train_fraction,
                "train": splits["train"],
                "test": splits["test"],
            }
            atomic_write(manifest_path, lambda f: json.dump(record, f, indent=1), mode="w")
        files = splits[split]
    index = {c: i for i, c in enumerate(classes)}
    try:
        targets = np.asarray([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"manifest {manifest_path} lists a file of class {e} not in its classes") from None
    return ImageDataset(targets, classes, paths=[str(root / f) for f in files])


def _caltech_folder(root: Path) -> Path | None:
    for cand in (root / "101_ObjectCategories", root / "caltech101" / "101_ObjectCategories"):
        if cand.is_dir():
            return cand
    if root.is_dir() and (root.name == "101_ObjectCategories" or (root / "BACKGROUND_Google").is_dir()):
        return root
    return None


@DATASETS.register("caltech101")
def _caltech101(
    split: str, root: Path | None, download: bool, cache_dir: Path, *, split_seed: int = 0
) -> ImageDataset:
    """Caltech-101 (101 classes, ``BACKGROUND_Google`` dropped), stratified 80/20 split as in ConFiT (lazy paths).

    ConFiT (github.com/JieShibo/ConFiT, dataset.py, ``get_caltech``) lists the images with
    ``imutils.paths.list_images('.../caltech101/101_ObjectCategories')`` (os.walk order, not sorted), skips
    ``BACKGROUND_Google``, encodes labels with ``LabelEncoder`` (= index in the sorted class names) and calls
    ``train_test_split(data, labels, stratify=labels, test_size=0.2, random_state=0)`` (an earlier revision had
    ``random_state=seed`` with ``seed`` undefined). Since os.walk order depends on the file system, we split the
    class-major sorted file list instead, which is reproducible; the same call on it gives the split below, in the
    order train_test_split returns.
    """
    from sklearn.model_selection import train_test_split

    root = root if root is not None else cache_dir / "caltech101"
    folder = _caltech_folder(root)
    if folder is None and download:
        from torchvision import datasets as tvd

        with _download_lock(root, True):
            tvd.Caltech101(str(root), download=True)
        folder = _caltech_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"no Caltech-101 found at {root}: expected {root / '101_ObjectCategories'}/<class>/*.jpg "
            f"(or {root / 'caltech101' / '101_ObjectCategories'}, torchvision's layout); "
            "pass root=<that folder's parent> or download=True"
        )
    classes = [c for c in list_classes(folder) if c != "BACKGROUND_Google"]
    classes, files, targets = scan_folder(folder, classes)
    index = np.arange(len(files))
    train_idx, test_idx = train_test_split(index, test_size=0.2, stratify=targets, random_state=split_seed)
    chosen = train_idx if split == "train" else test_idx
    return ImageDataset(targets[chosen], classes, paths=[str(folder / files[i]) for i in chosen])


# --------------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (plain or gzip); check its magic number, rank and length."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] != ndim:
        raise ValueError(f"{path} is not an idx file of rank {ndim} (magic bytes {raw[:4].hex()})")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for d in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


@DATASETS.register("fashion_mnist")
def _fashion_mnist(split: str, root: Path | None, download: bool, cache_dir: Path) -> ImageDataset:
    """Fashion-MNIST from its idx files (gzip or plain), images (N, 28, 28, 1)."""
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if root is None:
        root = _FASHION_MNIST_ROOT
        if download and _find_idx(root, stems[0]) is None:
            root = cache_dir / "fashion_mnist"
    found = [_find_idx(root, s) for s in stems]
    if None in found and download:
        from torchvision import datasets as tvd

        with _download_lock(root, True):
            tvd.FashionMNIST(str(root), train=split == "train", download=True)
        found = [_find_idx(root, s) for s in stems]
    if None in found:
        raise FileNotFoundError(
            f"no Fashion-MNIST idx files in {root} (looked for {stems[0]}[.gz] and {stems[1]}[.gz], also under "
            f"FashionMNIST/raw); install them with `apt-get install dataset-fashion-mnist` "
            f"(into {_FASHION_MNIST_ROOT}), pass root=<folder> or download=True"
        )
    images = _read_idx(found[0], ndim=3)
    labels = _read_idx(found[1], ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{found[0]} has {len(images)} images but {found[1]} has {len(labels)} labels")
    return ImageDataset(labels.astype(np.int64), FASHION_MNIST_CLASSES, images=images.astype(np.uint8)[..., None])


# --------------------------------------------------------------------------------------------- small built-ins


@DATASETS.register("digits")
def _digits(split: str, root: Path | None, download: bool, cache_dir: Path, *, split_seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 8, 8, 1); stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    targets = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=targets, random_state=split_seed
    )
    chosen = train_idx if split == "train" else test_idx
    return ImageDataset(targets[chosen], [str(i) for i in range(10)], images=images[chosen])


@DATASETS.register("synthetic")
def _synthetic(
    split: str,
    root: Path | None,
    download: bool,
    cache_dir: Path,
    *,
    n_classes: int = 10,
    n_per_class: int = 20,
    n_test_per_class: int = 10,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    noise_std: float = 30.0,
) -> ImageDataset:
    """Learnable toy images: a fixed low-frequency pattern per class plus gaussian noise, deterministic per seed.

    Train and test share the class patterns and use different noise draws.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    grid = min(4, image_size)
    coarse = np.random.default_rng(seed).normal(0.0, 1.0, size=(n_classes, channels, grid, grid))
    patterns = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(image_size, image_size), mode="bilinear", align_corners=False
    ).numpy()
    patterns = 128.0 + 50.0 * patterns / patterns.std(axis=(1, 2, 3), keepdims=True)
    n = n_per_class if split == "train" else n_test_per_class
    noise_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    targets = np.repeat(np.arange(n_classes, dtype=np.int64), n)
    noisy = patterns[targets] + noise_rng.normal(0.0, noise_std, size=(len(targets), channels, image_size, image_size))
    images = np.round(noisy).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return ImageDataset(targets, [f"class_{i}" for i in range(n_classes)], images=np.ascontiguousarray(images))
