"""Labelled image datasets, read from their real on-disk formats and looked up by name.

Every dataset is an :class:`ImageDataset`: uint8 images held in memory as one ``(N, H, W, C)`` array (small images)
or as a list of file paths decoded lazily (large images). ``create_dataset(name, split, root, ...)`` builds one from
the :data:`DATASETS` registry.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retain.registry import Registry

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "UnreadableImageError",
    "check_images",
    "create_dataset",
    "default_cache_dir",
    "read_image",
]

DATASETS = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
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
_SPLITS = ("train", "test")
_NPZ_FORMAT = "retain-folder-npz-v1"
_MANIFEST_FORMAT = "retain-imagefolder-split-v1"
_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_INTEGER_NAME = re.compile(r"[0-9]+")


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
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

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


# --------------------------------------------------------------------------------------------- folder helpers


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _sort_classes(names: Iterable[str]) -> list[str]:
    """Class folder names in label order: by value when every name is an integer (``1``, ``2``, ``10``, as
    Flowers-102 folders named by its labels need), else lexicographically."""
    names = list(names)
    if names and all(_INTEGER_NAME.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _list_classes(folder: Path) -> list[str]:
    try:
        return _sort_classes(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise PermissionError(f"cannot read folder {folder} (permission denied); make it readable "
                              f"(chmod -R u+rX {folder}) or point data.root elsewhere") from None  # fmt: skip


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if _is_image(f):
                found.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(found)


def _scan_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Return (classes, files relative to folder, targets) for a ``folder/<class>/*`` layout: files class-major in
    class order (:func:`_sort_classes` unless ``classes`` is given), sorted within a class."""
    if classes is None:
        classes = _list_classes(folder)
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder}; expected the layout {folder}/<class>/<image files>")
    files: list[str] = []
    targets: list[int] = []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            continue
        names = _list_images(folder / cls)
        files += [f"{cls}/{n}" for n in names]
        targets += [label] * len(names)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return classes, files, np.asarray(targets, dtype=np.int64)


def _decode_all(sources: Sequence[Path | bytes], names: Sequence[str]) -> np.ndarray:
    """Decode same-sized images (files or encoded bytes) with PIL into one uint8 (N, H, W, 3) array.

    Uses a thread pool: PIL releases the GIL while decoding.
    """

    def read(i: int) -> np.ndarray:
        return read_image(sources[i], names[i], hint="replace or delete it (array-cached folders cannot skip files)")

    first = read(0)
    out = np.empty((len(sources), *first.shape), dtype=np.uint8)
    out[0] = first

    def fill(chunk: range) -> None:
        for i in chunk:
            a = read(i)
            if a.shape != first.shape:
                raise ValueError(
                    f"{names[i]} is {a.shape[1]}x{a.shape[0]} but {names[0]} is {first.shape[1]}x{first.shape[0]}; "
                    "array-cached folders need same-sized images (use the 'imagefolder' dataset for mixed sizes)"
                )
            out[i] = a

    workers = max(1, min(8, os.cpu_count() or 1))
    step = max(1, -(-(len(sources) - 1) // (workers * 4)))
    chunks = [range(s, min(s + step, len(sources))) for s in range(1, len(sources), step)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, chunks))
    return out


def _atomic_write(dest: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npz_path(cache_dir: Path, name: str, split: str, *key_parts: object) -> Path:
    key = hashlib.sha1("|".join(map(str, (_NPZ_FORMAT, *key_parts))).encode()).hexdigest()[:16]
    return cache_dir / "arrays" / f"{name}-{split}-{key}.npz"


def _load_npz(npz: Path) -> ImageDataset | None:
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as z:
            return ImageDataset(z["targets"], [str(c) for c in z["classes"]], images=z["images"])
    except (OSError, ValueError, KeyError, zlib.error) as e:
        warnings.warn(f"ignoring unreadable cache {npz} ({e}); decoding again", stacklevel=4)
        return None


def _save_npz(npz: Path, images: np.ndarray, targets: np.ndarray, classes: list[str]) -> ImageDataset:
    arrays = {"images": images, "targets": targets, "classes": np.asarray(classes, dtype=str)}
    _atomic_write(npz, lambda f: np.savez(f, **arrays))
    return ImageDataset(targets, classes, images=images)


def _cached_folder_arrays(name: str, folder: Path, cache_dir: Path, classes: list[str]) -> ImageDataset:
    """Load a small-image ``folder/<class>/*`` split, decoding once and caching it as an uncompressed npz.

    The cache key hashes the resolved folder path, the number of image files and the newest mtime of the folder and
    its class folders (adding, removing or renaming a file changes one of these).
    """
    folder = folder.resolve()
    classes, files, targets = _scan_folder(folder, classes)
    mtime = max(
        [folder.stat().st_mtime_ns] + [(folder / c).stat().st_mtime_ns for c in classes if (folder / c).is_dir()]
    )
    npz = _npz_path(cache_dir, name, folder.name, folder, len(files), mtime)
    cached = _load_npz(npz)
    if cached is not None and cached.classes == classes and len(cached) == len(files):
        return cached
    images = _decode_all([folder / f for f in files], [str(folder / f) for f in files])
    return _save_npz(npz, images, targets, classes)


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _cached_archive_arrays(name: str, archive: Path, split: str, cache_dir: Path) -> ImageDataset:
    """Load ``split`` of a tar(.gz) of ``[<top>/]<split>/<class>/<image>`` members, decoding once into an npz cache.

    Members are decoded straight from the archive (nothing is extracted to disk); the cache key hashes the resolved
    archive path, its size and mtime. Classes are the class folder names ordered by :func:`_sort_classes`; files are
    in class-major order, sorted within a class, as for an extracted folder.
    """
    archive = archive.resolve()
    st = archive.stat()
    npz = _npz_path(cache_dir, name, split, archive, st.st_size, st.st_mtime_ns)
    cached = _load_npz(npz)
    if cached is not None and cached.classes == _sort_classes(cached.classes):  # else cached in an older order
        return cached
    found: dict[tuple[str, str], bytes] = {}
    classes_of: dict[str, set[str]] = {"train": set(), "test": set()}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in classes_of or not _is_image(parts[-1]):
                continue
            classes_of[parts[-3]].add(parts[-2])
            if parts[-3] == split:
                found[(parts[-2], parts[-1])] = tar.extractfile(member).read()
    if not found:
        raise FileNotFoundError(
            f"no {split}/<class>/<image> members in {archive}; expected an archive of the layout "
            "train/<class>/*.jpg and test/<class>/*.jpg"
        )
    classes = _sort_classes(classes_of[split])
    if all(classes_of.values()) and classes_of["train"] != classes_of["test"]:
        raise ValueError(f"class folders differ between train/ and test/ in {archive}")
    index = {c: i for i, c in enumerate(classes)}
    keys = sorted(found, key=lambda k: (index[k[0]], k[1]))
    targets = np.asarray([index[c] for c, _ in keys], dtype=np.int64)
    images = _decode_all([found[k] for k in keys], [f"{archive}:{split}/{c}/{f}" for c, f in keys])
    return _save_npz(npz, images, targets, classes)


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar(
    name: str, tv_folder: str, title: str, split: str, root: Path | None, download: bool, cache_dir: Path
) -> ImageDataset:
    from torchvision import datasets as tvd

    root = root if root is not None else cache_dir / name
    if _is_archive(root):
        return _cached_archive_arrays(name, root, split, cache_dir)
    if root.name == tv_folder and root.is_dir():  # root given as the torchvision folder itself
        root = root.parent
    tv_class = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if (root / tv_folder).is_dir() or (download and not (root / "train").is_dir()):
        # torchvision's own loader: the only place pickles are read (and it checks md5s first).
        ds = tv_class(str(root), train=split == "train", download=download)
        return ImageDataset(np.asarray(ds.targets), list(ds.classes), images=np.asarray(ds.data, dtype=np.uint8))
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no {title} found at {root}: expected {root / tv_folder} (torchvision format), "
            f"{folder}/<class>/*.jpg (folder layout) or a .tar.gz of that layout; "
            f"pass root=<one of those> or download=True"
        )
    classes = _list_classes(folder)
    other = root / ("test" if split == "train" else "train")
    if other.is_dir() and _list_classes(other) != classes:
        raise ValueError(f"class folders differ between {folder} and {other}")
    return _cached_folder_arrays(name, folder, cache_dir, classes)


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

    Class labels follow :func:`_sort_classes`: by value when every class folder name is an integer (Flowers-102's
    ``1..102`` give label = value - 1, as its imagelabels.mat), else lexicographically. If ``root/train`` and
    ``root/test`` exist they are the splits (classes from ``train``; the split options are unused). Otherwise each
    class is split ``train_fraction``/rest with ``split_seed``. With ``manifest``, an existing JSON file gives the
    split (relative paths, seed, fraction) and the class list, whose order is honoured so a run's labels never
    change; an absent one is written.
    """
    root = _require_dir(root, "imagefolder", "pass root=<folder with one sub-folder of images per class>")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _list_classes(root / "train")
        test_classes = _list_classes(root / "test")
        if not set(test_classes) <= set(classes):
            raise ValueError(
                f"{root / 'test'} has classes missing from {root / 'train'}: "
                f"{sorted(set(test_classes) - set(classes))}"
            )
        folder = root / split
        _, files, targets = _scan_folder(folder, classes)
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
        if classes == sorted(classes) != _sort_classes(classes):  # integer folders in retain's former text order
            warnings.warn(
                f"{manifest_path} orders its integer class folders as text ('10' before '2'), as retain did before; "
                "kept so this run's labels do not change. For the numeric order (Flowers-102's official labels), "
                "delete it or use a new run name",
                stacklevel=3,
            )
        files = list(data[split])
    else:
        classes, all_files, all_targets = _scan_folder(root)
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
            _atomic_write(manifest_path, lambda f: json.dump(record, f, indent=1), mode="w")
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

        tvd.Caltech101(str(root), download=True)
        folder = _caltech_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"no Caltech-101 found at {root}: expected {root / '101_ObjectCategories'}/<class>/*.jpg "
            f"(or {root / 'caltech101' / '101_ObjectCategories'}, torchvision's layout); "
            "pass root=<that folder's parent> or download=True"
        )
    classes = [c for c in _list_classes(folder) if c != "BACKGROUND_Google"]
    classes, files, targets = _scan_folder(folder, classes)
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
