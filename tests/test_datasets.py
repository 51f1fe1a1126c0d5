"""Tests for retain.data: every dataset is built from tiny files written in its real on-disk format."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.model_selection import train_test_split

from retain.data import DATASETS, FASHION_MNIST_CLASSES, ImageDataset, build_transform, create_dataset, readers
from retain.data import cache as decode_cache
from retain.data.datasets import default_cache_dir

CIFAR_CLASSES = ["airplane", "automobile", "bird"]


def _write_jpegs(folder: Path, n: int, size: tuple[int, int] = (32, 32), seed: int = 0, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i:04d}.jpg")


def _cifar_folder(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    for k, cls in enumerate(CIFAR_CLASSES):
        _write_jpegs(root / "train" / cls, n_train, seed=k)
        _write_jpegs(root / "test" / cls, n_test, seed=100 + k)
    return root


def _refuse(*args, **kwargs):
    raise AssertionError("called although a cache should have been used")


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PIL.Image, "open", _refuse)


# --------------------------------------------------------------------------------------------- ImageDataset


def test_image_dataset_array_grey_and_with_transform() -> None:
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5, 1)
    ds = ImageDataset(np.array([0, 1]), ["a", "b"], images=images)
    x = ds.load(1)
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 5)
    assert torch.equal(x[0], x[2]) and torch.equal(x[0], torch.from_numpy(images[1, :, :, 0]))
    image, target = ds[1]
    assert type(target) is int and target == 1
    doubled = ds.with_transform(lambda t: t.float() * 2)
    assert doubled.images is ds.images and doubled.targets is ds.targets and ds.transform is None
    assert torch.equal(doubled[1][0], x.float() * 2)
    batch = next(iter(torch.utils.data.DataLoader(doubled, batch_size=2)))
    assert batch[0].shape == (2, 3, 4, 5) and batch[1].tolist() == [0, 1]


def test_image_dataset_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageDataset(np.array([0]), ["a"])
    with pytest.raises(ValueError, match="targets"):
        ImageDataset(np.array([0, 0]), ["a"], images=np.zeros((3, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(np.array([0]), ["a"], images=np.zeros((1, 2, 2, 3), np.float32))


def test_registry_and_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("cifar10", "cifar100", "imagefolder", "caltech101", "fashion_mnist", "digits", "synthetic"):
        assert name in DATASETS
    monkeypatch.setenv("RETAIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RETAIN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "retain"


# --------------------------------------------------------------------------------------------- CIFAR


def _pickle(path: Path, obj: dict) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar_batch(rng: np.random.Generator, n: int, n_classes: int, label_key: str) -> tuple[dict, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, size=n).tolist()
    # torchvision's layout: rows of 3072 bytes, channel-major (R plane, G plane, B plane).
    batch = {"batch_label": "fake", label_key: labels, "data": images.transpose(0, 3, 1, 2).reshape(n, -1)}
    batch["filenames"] = [f"img_{i}.png" for i in range(n)]
    return batch, images


def test_cifar10_torchvision_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_list, train_images = [], []
    for b in range(1, 6):
        batch, images = _cifar_batch(rng, 2, 10, "labels")
        train_list.append([f"data_batch_{b}", _pickle(folder / f"data_batch_{b}", batch)])
        train_images.append(images)
    test_batch, test_images = _cifar_batch(rng, 3, 10, "labels")
    test_md5 = _pickle(folder / "test_batch", test_batch)
    names = [f"name{i}" for i in range(10)]
    meta_md5 = _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    # torchvision checks every file against hard-coded md5s; point its lists at our files' real md5s.
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": meta_md5})

    train = create_dataset("cifar10", "train", root=tmp_path, cache_dir=tmp_path / "cache")
    assert train.images.shape == (10, 32, 32, 3) and train.classes == names
    np.testing.assert_array_equal(train.images, np.concatenate(train_images))
    test = create_dataset("cifar10", "test", root=folder, cache_dir=tmp_path / "cache")  # the folder itself works
    np.testing.assert_array_equal(test.images, test_images)
    assert test.targets.tolist() == test_batch["labels"] and test.targets.dtype == np.int64
    assert torch.equal(test.load(0), torch.from_numpy(test_images[0]).permute(2, 0, 1))


def test_cifar100_torchvision_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train_batch, train_images = _cifar_batch(rng, 4, 100, "fine_labels")
    test_batch, _ = _cifar_batch(rng, 2, 100, "fine_labels")
    names = [f"fine{i}" for i in range(100)]
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _pickle(folder / "train", train_batch)]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _pickle(folder / "test", test_batch)]])
    meta_md5 = _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"]})
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": meta_md5})
    train = create_dataset("cifar100", root=tmp_path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(train.images, train_images)
    assert train.targets.tolist() == train_batch["fine_labels"] and len(train.classes) == 100


def test_cifar_folder_layout_decodes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _cifar_folder(tmp_path / "cifar")
    cache = tmp_path / "cache"
    train = create_dataset("cifar10", "train", root=root, cache_dir=cache)
    test = create_dataset("cifar10", "test", root=root, cache_dir=cache)
    assert train.classes == sorted(CIFAR_CLASSES) and train.images.shape == (12, 32, 32, 3)
    assert train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(test) == 6
    with PIL.Image.open(root / "train" / "bird" / "0002.jpg") as img:
        np.testing.assert_array_equal(train.images[10], np.asarray(img.convert("RGB")))
    assert len(list((cache / "arrays").glob("*.npz"))) == 2
    _no_decoding(monkeypatch)
    again = create_dataset("cifar10", "train", root=root, cache_dir=cache)
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.targets, train.targets)
    assert again.classes == train.classes
    monkeypatch.undo()
    # Adding a file changes the key: the folder is decoded again.
    _write_jpegs(root / "train" / "bird" / "extra", 1)
    assert len(create_dataset("cifar10", "train", root=root, cache_dir=cache)) == 13


def test_cifar_targz_matches_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _cifar_folder(tmp_path / "cifar")
    archive = tmp_path / "cifar-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("train", "test"):
            tar.add(root / sub, arcname=sub)
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        from_tar = create_dataset("cifar10", split, root=archive, cache_dir=cache)
        from_dir = create_dataset("cifar10", split, root=root, cache_dir=cache)
        np.testing.assert_array_equal(from_tar.images, from_dir.images)
        np.testing.assert_array_equal(from_tar.targets, from_dir.targets)
        assert from_tar.classes == from_dir.classes
    _no_decoding(monkeypatch)
    monkeypatch.setattr(tarfile, "open", _refuse)  # not even reopened
    assert len(create_dataset("cifar10", "train", root=str(archive), cache_dir=cache)) == 12


def test_cifar_missing_root_is_clear(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        create_dataset("cifar10", root=missing, cache_dir=tmp_path)
    assert str(missing) in str(err.value)


# --------------------------------------------------------------------------------------------- image folders


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    for k, (cls, n) in enumerate(counts.items()):
        _write_jpegs(root / cls, n, size=(20 + k, 16), seed=k)
    return root


def test_imagefolder_stratified_split_and_manifest(tmp_path: Path) -> None:
    root = _class_tree(tmp_path / "imgs", {"cat": 10, "dog": 5, "emu": 7})
    train = create_dataset("imagefolder", "train", root=root)
    test = create_dataset("imagefolder", "test", root=root)
    assert train.classes == ["cat", "dog", "emu"] and train.images is None
    assert np.bincount(train.targets).tolist() == [8, 4, 6] and np.bincount(test.targets).tolist() == [2, 1, 1]
    assert not set(train.paths) & set(test.paths) and len(set(train.paths) | set(test.paths)) == 22
    assert train.load(0).shape == (3, 16, 20)
    assert create_dataset("imagefolder", "train", root=root).paths == train.paths  # deterministic
    other = create_dataset("imagefolder", "train", root=root, split_seed=1)
    assert other.paths != train.paths and np.bincount(other.targets).tolist() == [8, 4, 6]

    manifest = tmp_path / "run" / "split.json"
    written = create_dataset("imagefolder", "train", root=root, manifest=str(manifest))
    assert written.paths == train.paths and manifest.is_file()
    record = json.loads(manifest.read_text())
    assert record["classes"] == ["cat", "dog", "emu"] and record["split_seed"] == 0
    assert record["train_fraction"] == 0.8 and len(record["train"]) == 18 and len(record["test"]) == 4
    _write_jpegs(root / "cat" / "new", 3)  # new files: a fresh split changes, the manifest's does not
    assert len(create_dataset("imagefolder", "train", root=root)) > 18
    for split, expected in (("train", train), ("test", test)):
        reread = create_dataset("imagefolder", split, root=root, manifest=manifest)
        assert reread.paths == expected.paths and reread.targets.tolist() == expected.targets.tolist()


def test_imagefolder_presplit_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _class_tree(root / "train", {"a": 2, "b": 3})
    _class_tree(root / "test", {"a": 1, "b": 1})
    train = create_dataset("imagefolder", "train", root=root)
    test = create_dataset("imagefolder", "test", root=root)
    assert len(train) == 5 and len(test) == 2 and test.targets.tolist() == [0, 1]
    with pytest.raises(ValueError, match="valid options: split_seed, train_fraction, manifest"):
        create_dataset("imagefolder", root=root, seed=3)
    with pytest.raises(FileNotFoundError, match="no root given"):
        create_dataset("imagefolder")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        create_dataset("imagefolder", root=tmp_path / "absent")


def _flowers_tree(root: Path, labels: dict[str, int], ext: str = ".jpg") -> Path:
    """Flowers-102 style: one folder per imagelabels.mat label, image_NNNNN files, JPEG or PNG (written by PIL)."""
    rng = np.random.default_rng(0)
    n = 0
    for label, count in labels.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            n += 1
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / label / f"image_{n:05d}{ext}")
    return root


def _folder_labels(ds: ImageDataset) -> list[str]:
    return [ds.classes[t] for t in ds.targets]


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_imagefolder_integer_class_folders_sort_by_value(tmp_path: Path, ext: str) -> None:
    root = _flowers_tree(tmp_path / "flowers", {"1": 5, "10": 5, "2": 5}, ext)
    train = create_dataset("imagefolder", "train", root=root)
    test = create_dataset("imagefolder", "test", root=root)
    assert train.classes == test.classes == ["1", "2", "10"]  # not "1", "10", "2"
    for ds in (train, test):
        assert ds.targets.tolist() == [{"1": 0, "2": 1, "10": 2}[Path(f).parent.name] for f in ds.paths]
    assert np.bincount(train.targets).tolist() == [4, 4, 4] and train.load(0).shape == (3, 12, 10)
    manifest = tmp_path / "run" / "split_manifest.json"
    written = create_dataset("imagefolder", "train", root=root, manifest=str(manifest))
    assert json.loads(manifest.read_text())["classes"] == ["1", "2", "10"] and written.paths == train.paths
    reread = create_dataset("imagefolder", "train", root=root, manifest=str(manifest))
    assert reread.classes == ["1", "2", "10"] and reread.targets.tolist() == train.targets.tolist()
    # All of 1..12 (pre-split layout): label = folder value - 1, the paper code's imagelabels.mat - 1.
    _flowers_tree(tmp_path / "presplit" / "train", {str(k): 1 for k in range(12, 0, -1)}, ext)
    _flowers_tree(tmp_path / "presplit" / "test", {str(k): 1 for k in (2, 11, 10)}, ext)
    pre_train = create_dataset("imagefolder", "train", root=tmp_path / "presplit")
    pre_test = create_dataset("imagefolder", "test", root=tmp_path / "presplit")
    assert pre_train.classes == [str(k) for k in range(1, 13)] and pre_train.targets.tolist() == list(range(12))
    assert [int(Path(f).parent.name) - 1 for f in pre_test.paths] == pre_test.targets.tolist() == [1, 9, 10]
    padded = create_dataset(
        "imagefolder", "train", root=_flowers_tree(tmp_path / "pad", {"001": 2, "010": 2, "002": 2})
    )
    assert padded.classes == ["001", "002", "010"] and padded.targets.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_non_integer_class_folders_stay_lexicographic(tmp_path: Path) -> None:
    root = _flowers_tree(tmp_path / "mixed", {"2": 3, "10": 3, "1": 3, "b": 3, "1a": 3})
    train = create_dataset("imagefolder", "train", root=root)
    assert train.classes == ["1", "10", "1a", "2", "b"]
    assert _folder_labels(train) == [Path(f).parent.name for f in train.paths]
    named = create_dataset("imagefolder", "train", root=_flowers_tree(tmp_path / "named", {"rose": 2, "daisy": 2}))
    assert named.classes == ["daisy", "rose"] and named.targets.tolist() == [0, 0, 1, 1]


def test_imagefolder_manifest_in_the_old_text_order_keeps_its_labels(tmp_path: Path) -> None:
    root = _flowers_tree(tmp_path / "flowers", {"1": 5, "2": 5, "10": 5})
    manifest = tmp_path / "run" / "split_manifest.json"
    fresh = create_dataset("imagefolder", "train", root=root, manifest=str(manifest))
    assert fresh.classes == ["1", "2", "10"]
    record = json.loads(manifest.read_text())
    record["classes"] = ["1", "10", "2"]  # what retain wrote before integer class folders were sorted by value
    manifest.write_text(json.dumps(record))
    for split in ("train", "test"):
        with pytest.warns(UserWarning, match="delete it or use a new run name"):
            old = create_dataset("imagefolder", split, root=root, manifest=str(manifest))
        assert old.classes == ["1", "10", "2"]  # honoured: the old run's labels do not change ("10" stays 1)
        assert old.targets.tolist() == [{"1": 0, "10": 1, "2": 2}[Path(f).parent.name] for f in old.paths]
        assert old.paths == create_dataset("imagefolder", split, root=root).paths  # the same split


def test_integer_class_folders_in_cifar_folders_and_archives(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    for k, cls in enumerate(["1", "10", "2"]):
        _write_jpegs(root / "train" / cls, 2, seed=k)
        _write_jpegs(root / "test" / cls, 1, seed=10 + k)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("train", "test"):
            tar.add(root / sub, arcname=sub)
    cache = tmp_path / "cache"
    from_dir = create_dataset("cifar10", "train", root=root, cache_dir=cache)
    from_tar = create_dataset("cifar10", "train", root=archive, cache_dir=cache)
    assert from_dir.classes == from_tar.classes == ["1", "2", "10"]
    assert from_tar.targets.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(from_tar.images, from_dir.images)
    with PIL.Image.open(root / "train" / "10" / "0001.jpg") as img:
        np.testing.assert_array_equal(from_tar.images[5], np.asarray(img.convert("RGB")))
    # An archive cache written in the old text order is decoded again, not trusted.
    st = archive.stat()
    npz = decode_cache._npz_path(cache, "cifar10", "train", archive.resolve(), st.st_size, st.st_mtime_ns)
    assert npz.is_file()
    old_order = [0, 1, 4, 5, 2, 3]  # classes "1", "10", "2"
    decode_cache._save_npz(npz, from_tar.images[old_order], np.array([0, 0, 1, 1, 2, 2]), ["1", "10", "2"])
    again = create_dataset("cifar10", "train", root=archive, cache_dir=cache)
    assert again.classes == ["1", "2", "10"]
    np.testing.assert_array_equal(again.images, from_tar.images)


def test_caltech101_layouts_background_dropped(tmp_path: Path) -> None:
    cats = tmp_path / "caltech" / "101_ObjectCategories"
    _class_tree(cats, {"BACKGROUND_Google": 6, "Faces": 10, "accordion": 5, "airplanes": 10})
    _write_jpegs(cats / "accordion", 1, size=(21, 16), mode="L", seed=9)  # a grey image, replaces 0000.jpg
    train = create_dataset("caltech101", "train", root=tmp_path / "caltech")
    test = create_dataset("caltech101", "test", root=tmp_path / "caltech")
    assert train.classes == ["Faces", "accordion", "airplanes"]
    assert not any("BACKGROUND_Google" in p for p in train.paths + test.paths)
    assert np.bincount(test.targets).tolist() == [2, 1, 2] and len(train) == 20
    # The split is ConFiT's call over the class-major sorted file list.
    files = sorted(str(p) for p in cats.glob("*/*.jpg") if "BACKGROUND" not in str(p))
    labels = [train.classes.index(Path(f).parent.name) for f in files]
    x_train, x_test = train_test_split(files, test_size=0.2, stratify=labels, random_state=0)[:2]
    assert train.paths == x_train and test.paths == x_test
    grey = str(cats / "accordion" / "0000.jpg")
    holder = train if grey in train.paths else test
    loaded = holder.load(holder.paths.index(grey))
    assert loaded.shape == (3, 16, 21) and loaded.dtype == torch.uint8 and torch.equal(loaded[0], loaded[1])
    # torchvision's layout and the category folder itself are accepted too.
    tv_root = tmp_path / "tv"
    (tv_root / "caltech101").mkdir(parents=True)
    (tv_root / "caltech101" / "101_ObjectCategories").symlink_to(cats)
    assert len(create_dataset("caltech101", "test", root=tv_root)) == 5
    assert create_dataset("caltech101", "test", root=cats).paths == test.paths
    with pytest.raises(FileNotFoundError, match="download=True"):
        create_dataset("caltech101", root=tmp_path / "none")


# --------------------------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        (tmp_path / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    test = create_dataset("fashion_mnist", "test", root=tmp_path)
    assert test.images.shape == (5, 28, 28, 1) and test.classes == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(test.images[..., 0], images)
    assert test.targets.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        create_dataset("fashion_mnist", "train", root=tmp_path)


def test_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(ValueError, match="not an idx file"):
        readers._read_idx(bad, ndim=3)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        readers._read_idx(short, ndim=3)


def test_fashion_mnist_real_files() -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "train-images-idx3-ubyte.gz").is_file() and not (root / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {root} (apt-get install dataset-fashion-mnist)")
    train = create_dataset("fashion_mnist", "train")
    test = create_dataset("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and len(test) == 10000
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------- built-ins


def test_digits() -> None:
    train = create_dataset("digits", "train")
    test = create_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8 and train.images.max() == 255
    assert train.classes == [str(i) for i in range(10)]
    ratio = np.bincount(test.targets) / (np.bincount(train.targets) + np.bincount(test.targets))
    assert np.all(np.abs(ratio - 0.2) < 0.02)  # stratified
    assert train.load(0).shape == (3, 8, 8)


def test_synthetic_deterministic_and_learnable() -> None:
    train = create_dataset("synthetic", "train", seed=3)
    test = create_dataset("synthetic", "test", seed=3)
    assert train.images.shape == (200, 32, 32, 3) and len(test) == 100 and len(train.classes) == 10
    np.testing.assert_array_equal(train.images, create_dataset("synthetic", "train", seed=3).images)
    assert not np.array_equal(train.images, create_dataset("synthetic", "train", seed=4).images)
    assert not np.array_equal(train.images[:10], test.images[:10])  # different noise draws
    x_train = train.images.reshape(len(train), -1).astype(np.float64)
    x_test = test.images.reshape(len(test), -1).astype(np.float64)
    means = np.stack([x_train[train.targets == c].mean(0) for c in range(10)])
    predicted = ((x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test.targets).mean() > 0.9
    grey = create_dataset("synthetic", n_classes=3, n_per_class=2, image_size=8, channels=1)
    assert grey.images.shape == (6, 8, 8, 1) and grey.load(0).shape == (3, 8, 8)


def test_create_dataset_errors() -> None:
    with pytest.raises(ValueError, match="valid options: .*n_classes"):
        create_dataset("synthetic", n_class=3)
    with pytest.raises(ValueError, match=r"valid options: \(none\)"):
        create_dataset("cifar10", foo=1)
    with pytest.raises(ValueError, match="split"):
        create_dataset("synthetic", "val")
    with pytest.raises(KeyError, match="synthetic"):
        create_dataset("not_a_dataset")


# --------------------------------------------------------------------------------------------- transforms


def _image(h: int = 32, w: int = 32, value: int | None = None) -> torch.Tensor:
    if value is not None:
        return torch.full((3, h, w), value, dtype=torch.uint8)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("train", "augment", "resize"),
    [(False, "none", "direct"), (False, "rrc", "crop"), (True, "none", "direct"), (True, "crop_flip", "direct")]
    + [(True, "rrc", "direct"), (True, "none", "crop")],
)
@pytest.mark.parametrize("size", [32, 48])
def test_transform_shapes(train: bool, augment: str, resize: str, size: int) -> None:
    tf = build_transform(train, size, None, None, augment=augment, resize=resize, interpolation="bicubic")
    out = tf(_image(30, 40))
    assert out.dtype == torch.float32 and out.shape == (3, size, size)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_transform_values() -> None:
    image = _image()
    identity = build_transform(False, 32, None, None)
    torch.testing.assert_close(identity(image), image.float() / 255)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = build_transform(True, 16, mean, std, augment="crop_flip")(_image(value=128))
    interior = out[:, 4:-4, 4:-4]  # padding may bring zeros to the border
    for c in range(3):
        torch.testing.assert_close(interior[c], torch.full_like(interior[c], (128 / 255 - mean[c]) / std[c]))
    cropped = build_transform(False, 32, mean, std, resize="crop")(_image(value=255))
    torch.testing.assert_close(cropped[2], torch.full((32, 32), (1 - 0.3) / 0.5))


def test_transform_invalid_values() -> None:
    with pytest.raises(ValueError, match="none, crop_flip, rrc"):
        build_transform(True, 32, None, None, augment="mixup")
    with pytest.raises(ValueError, match="direct, crop"):
        build_transform(False, 32, None, None, resize="pad")
    with pytest.raises(ValueError, match="bilinear, bicubic"):
        build_transform(False, 32, None, None, interpolation="nearest")
    with pytest.raises(ValueError, match="std"):
        build_transform(False, 32, (0.5, 0.5, 0.5), None)


def test_facil_pad_order_resizes_first_for_cifar100_224() -> None:
    """FACIL's ``cifar100_224``: Resize(224), Pad(4), RandomResizedCrop(224), flip (``resize_pad_rrc``: a 4-px zero
    border on the 224-px image, 4/232 of it); ``pad_rrc`` pads the native image (ImageNet32 at 32 px: 4/40)."""
    from torchvision.transforms import v2

    steps = build_transform(True, 224, None, None, augment="resize_pad_rrc").transforms
    assert [type(t) for t in steps[:4]] == [v2.Resize, v2.Pad, v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert [type(t) for t in build_transform(True, 32, None, None, augment="pad_rrc").transforms[:3]] == [
        v2.Pad, v2.RandomResizedCrop, v2.RandomHorizontalFlip]  # fmt: skip
    image = _image(value=200)  # (3, 32, 32)
    torch.manual_seed(0)
    by_hand = v2.Compose([v2.Resize((224, 224), antialias=True), v2.Pad(4),
                          v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])(image)  # fmt: skip
    torch.manual_seed(0)
    out = build_transform(True, 224, None, None, augment="resize_pad_rrc")(image)
    torch.testing.assert_close(out, by_hand.float() / 255)
    from retain.config import load_config

    assert load_config("pad/cifar100_lwf", []).data.augment == "resize_pad_rrc"
    assert load_config("pad/imagenet32_lwf", []).data.augment == "pad_rrc"
