"""The decode cache: small images of a class folder or a tar(.gz) decoded once and cached as an npz of arrays.

Safe for concurrent runs sharing ``data.cache_dir`` (a sweep's ``--jobs``, the processes of one multi-GPU run): a
cache file is written atomically (a unique temporary file renamed over it), and a process that has to build one
first takes an exclusive ``fcntl.flock`` on ``<npz>.lock``, so one process decodes while the others wait, then read
the finished file. The wait is not bounded: the kernel releases the lock when its holder exits, however it exits
(a crash or a kill included), so a waiter waits only as long as a live process is building; Ctrl-C interrupts it.
Without ``fcntl`` (Windows), or where the file system refuses the lock or the lock file cannot be created (a
read-only cache), concurrent builders each decode and the last rename wins (every file read is whole).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retain.data.datasets import ImageDataset, read_image
from retain.data.folders import is_image, scan_folder, sort_classes

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock (concurrent builders each decode; writes stay atomic)
    fcntl = None

__all__ = ["atomic_write", "build_lock", "cached_archive_arrays", "cached_folder_arrays", "is_archive"]

_NPZ_FORMAT = "retain-folder-npz-v1"
_UMASK = os.umask(0o022)  # read once (setting it is the only way), then restored: what a plain open() would apply
os.umask(_UMASK)


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


def atomic_write(dest: Path, write: Callable[[Any], None], mode: str = "wb", fsync: bool = False) -> None:
    """Write ``dest`` through ``write(file)`` into a temporary file renamed over it: no reader sees half a file.

    The temporary file's name is unique (``mkstemp``), so concurrent writers of one ``dest`` (other processes, other
    hosts on a shared file system, threads) never share one; the last rename wins. ``fsync``: flush the data to the
    disk before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp's file is owner-only: the permissions of a file open() creates instead
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``<path>.lock`` while building ``path``; one line on stderr when
    another process holds it ("waiting for another process building <path>"), then wait for it, unbounded (see the
    module docstring). No lock (and no wait) without ``fcntl``, or when the lock file cannot be opened or locked.

    The lock file stays (empty): removing it could let a later process lock a new file while a waiter holds the old.
    """
    if fcntl is None:
        yield
        return
    lock = path.with_name(f"{path.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # e.g. a read-only shared cache
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {path}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (ENOLCK, EOPNOTSUPP): unlocked, as without fcntl
            pass
        yield
    finally:
        os.close(fd)  # releases the lock (so does the process's exit, however it ends)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _cached_or_build(
    npz: Path, usable: Callable[[ImageDataset], bool], build: Callable[[], ImageDataset]
) -> ImageDataset:
    """``npz`` loaded when it is usable, else built by ``build`` (which saves it) under :func:`build_lock`; a
    process that finds, once it holds the lock, that another replaced the file meanwhile reads that instead."""
    seen = _identity(npz)
    cached = _load_npz(npz) if seen is not None else None
    if cached is not None and usable(cached):
        return cached
    with build_lock(npz):
        now = _identity(npz)
        if now is not None and now != seen:  # another process built it while this one waited (or looked)
            cached = _load_npz(npz)
            if cached is not None and usable(cached):
                return cached
        return build()


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
        warnings.warn(f"ignoring unreadable cache {npz} ({e}); decoding again", stacklevel=5)
        return None


def _save_npz(npz: Path, images: np.ndarray, targets: np.ndarray, classes: list[str]) -> ImageDataset:
    arrays = {"images": images, "targets": targets, "classes": np.asarray(classes, dtype=str)}
    atomic_write(npz, lambda f: np.savez(f, **arrays))
    return ImageDataset(targets, classes, images=images)


def cached_folder_arrays(name: str, folder: Path, cache_dir: Path, classes: list[str]) -> ImageDataset:
    """Load a small-image ``folder/<class>/*`` split, decoding once and caching it as an uncompressed npz.

    The cache key hashes the resolved folder path, the number of image files and the newest mtime of the folder and
    its class folders (adding, removing or renaming a file changes one of these).
    """
    folder = folder.resolve()
    classes, files, targets = scan_folder(folder, classes)
    mtime = max(
        [folder.stat().st_mtime_ns] + [(folder / c).stat().st_mtime_ns for c in classes if (folder / c).is_dir()]
    )
    npz = _npz_path(cache_dir, name, folder.name, folder, len(files), mtime)

    def build() -> ImageDataset:
        images = _decode_all([folder / f for f in files], [str(folder / f) for f in files])
        return _save_npz(npz, images, targets, classes)

    return _cached_or_build(npz, lambda c: c.classes == classes and len(c) == len(files), build)


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a tar file (``.tar``, ``.tar.gz``, ``.tgz``), read by :func:`cached_archive_arrays`."""
    return path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def cached_archive_arrays(name: str, archive: Path, split: str, cache_dir: Path) -> ImageDataset:
    """Load ``split`` of a tar(.gz) of ``[<top>/]<split>/<class>/<image>`` members, decoding once into an npz cache.

    Members are decoded straight from the archive (nothing is extracted to disk); the cache key hashes the resolved
    archive path, its size and mtime. Classes are the class folder names ordered by
    :func:`~retain.data.folders.sort_classes`; files are in class-major order, sorted within a class, as for an
    extracted folder.
    """
    archive = archive.resolve()
    st = archive.stat()
    npz = _npz_path(cache_dir, name, split, archive, st.st_size, st.st_mtime_ns)
    in_order = lambda c: c.classes == sort_classes(c.classes)  # noqa: E731 - else cached in an older order
    return _cached_or_build(npz, in_order, lambda: _decode_archive(archive, split, npz))


def _decode_archive(archive: Path, split: str, npz: Path) -> ImageDataset:
    """Read ``split``'s members of ``archive``, decode them and save them to ``npz``."""
    found: dict[tuple[str, str], bytes] = {}
    classes_of: dict[str, set[str]] = {"train": set(), "test": set()}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in classes_of or not is_image(parts[-1]):
                continue
            classes_of[parts[-3]].add(parts[-2])
            if parts[-3] == split:
                found[(parts[-2], parts[-1])] = tar.extractfile(member).read()
    if not found:
        raise FileNotFoundError(
            f"no {split}/<class>/<image> members in {archive}; expected an archive of the layout "
            "train/<class>/*.jpg and test/<class>/*.jpg"
        )
    classes = sort_classes(classes_of[split])
    if all(classes_of.values()) and classes_of["train"] != classes_of["test"]:
        raise ValueError(f"class folders differ between train/ and test/ in {archive}")
    index = {c: i for i, c in enumerate(classes)}
    keys = sorted(found, key=lambda k: (index[k[0]], k[1]))
    targets = np.asarray([index[c] for c, _ in keys], dtype=np.int64)
    images = _decode_all([found[k] for k in keys], [f"{archive}:{split}/{c}/{f}" for c, f in keys])
    return _save_npz(npz, images, targets, classes)
