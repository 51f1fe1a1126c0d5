"""Class-folder layouts (``folder/<class>/<image files>``): their class names in label order and their image files."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retain.data.datasets import IMAGE_EXTENSIONS

__all__ = ["is_image", "list_classes", "scan_folder", "sort_classes"]

_INTEGER_NAME = re.compile(r"[0-9]+")


def is_image(name: str) -> bool:
    """Whether a file name is an image's (by extension; hidden files are not)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def sort_classes(names: Iterable[str]) -> list[str]:
    """Class folder names in label order: by value when every name is an integer (``1``, ``2``, ``10``, as
    Flowers-102 folders named by its labels need), else lexicographically."""
    names = list(names)
    if names and all(_INTEGER_NAME.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def list_classes(folder: Path) -> list[str]:
    """The class folders of ``folder`` (hidden ones left out), in :func:`sort_classes` order."""
    try:
        return sort_classes(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
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
            if is_image(f):
                found.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(found)


def scan_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Return (classes, files relative to folder, targets) for a ``folder/<class>/*`` layout: files class-major in
    class order (:func:`sort_classes` unless ``classes`` is given), sorted within a class."""
    if classes is None:
        classes = list_classes(folder)
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
