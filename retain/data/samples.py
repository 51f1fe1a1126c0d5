"""Small samples of real datasets shipped inside the package, so that a probe runs offline.

``cifar10_sample``: a stratified sample of CIFAR-10 (Krizhevsky, 2009) as decoded from the project's JPEG copy
(``../shared/data/cifar10-jpg.tar.gz``): 50 train images per class (the k-NN memory) and 50 test images per class
(the queries), uint8 (N, 32, 32, 3) in a compressed npz read without unpickling, with a JSON card (source, indices,
sha256, licence note, the command that built it). It is the demo's retention probe of the shipped CIFAR-10
backbones (``data.retention.name=cifar10_sample``). Rebuild it with::

    python benchmarks/build_cifar10_sample.py --root ../shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from retain.data.datasets import DATASETS, ImageDataset, create_dataset

__all__ = ["CIFAR10_SAMPLE", "build_cifar10_sample", "load_sample"]

SAMPLES_DIR = Path(__file__).resolve().parent
CIFAR10_SAMPLE = SAMPLES_DIR / "cifar10_sample.npz"
_SPLITS = ("train", "test")
_LICENCE = (
    "CIFAR-10 (Alex Krizhevsky, 'Learning Multiple Layers of Features from Tiny Images', 2009; "
    "https://www.cs.toronto.edu/~kriz/cifar.html), a labelled subset of the 80 Million Tiny Images collection. "
    "The dataset page states no licence terms; it asks users to cite the technical report. A few hundred images are "
    "redistributed here for research use."
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes: equal for equal content (a zip's is not)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_sample(path: Path = CIFAR10_SAMPLE) -> dict[str, np.ndarray]:
    """The arrays of a sample npz (``{split}_images``, ``{split}_targets``, ``classes``); checked against its card."""
    raw = path.read_bytes()
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        expected = json.loads(card_path.read_text())["sha256"]
        if _sha256(raw) != expected:
            raise ValueError(f"{path} does not match the sha256 in {card_path} (corrupt or replaced?); rebuild it "
                             "with `python benchmarks/build_cifar10_sample.py --root <cifar10 tar.gz>`")  # fmt: skip
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@DATASETS.register("cifar10_sample")
def _cifar10_sample(
    split: str, root: Path | None, download: bool, cache_dir: Path, *, per_class: int | None = None
) -> ImageDataset:
    """500 CIFAR-10 images per split (50 per class) shipped with the package; ``root``: another such npz;
    ``per_class``: only the first ``per_class`` images of each class (a cheaper probe)."""
    arrays = load_sample(root if root is not None else CIFAR10_SAMPLE)
    classes = [str(c) for c in arrays["classes"]]
    images, targets = arrays[f"{split}_images"], arrays[f"{split}_targets"]
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in range(len(classes))])
        images, targets = images[keep], targets[keep]
    return ImageDataset(targets, classes, images=images)


def _stratified_indices(targets: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class drawn without replacement, sorted (class-major)."""
    picks = [np.sort(rng.choice(np.flatnonzero(targets == c), per_class, replace=False)) for c in np.unique(targets)]
    return np.concatenate(picks)


def _build_command(root: str | Path, per_class: int, seed: int) -> str:
    seed_flag = f" --seed {seed}" if seed else ""
    return f"python benchmarks/build_cifar10_sample.py --root {root} --per-class {per_class}{seed_flag}"


def build_cifar10_sample(root: str | Path, out: str | Path = CIFAR10_SAMPLE, per_class: int = 50,
                         seed: int = 0, command: str | None = None) -> Path:  # fmt: skip
    """Draw ``per_class`` images per class from each split of CIFAR-10 at ``root`` and write the npz and its card.

    Indices are positions in ``create_dataset("cifar10", split, root)`` (class-major, file names sorted within a
    class), drawn per split and class with ``numpy.random.default_rng([seed, split index])``.
    """
    out = Path(out)
    arrays: dict[str, np.ndarray] = {}
    indices: dict[str, list[int]] = {}
    classes: list[str] = []
    for s, split in enumerate(_SPLITS):
        data = create_dataset("cifar10", split, root=root)
        if data.images is None:
            raise ValueError(f"{root}: expected CIFAR-10 decoded to arrays (a .tar.gz, folders or pickles)")
        idx = _stratified_indices(data.targets, per_class, np.random.default_rng([seed, s]))
        arrays[f"{split}_images"] = np.ascontiguousarray(data.images[idx])  # (N, 32, 32, 3) uint8
        arrays[f"{split}_targets"] = data.targets[idx].astype(np.int64)
        indices[split] = idx.tolist()
        classes = data.classes
    arrays["classes"] = np.asarray(classes)  # fixed-width unicode: loads with allow_pickle=False
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    card = {
        "name": "cifar10_sample",
        "file": out.name,
        "sha256": _sha256(buffer.getvalue()),
        "content_sha256": _content_sha256(arrays),
        "bytes": len(buffer.getvalue()),
        "source": f"CIFAR-10 JPEG copy {Path(root).name} (quality-75 JPEGs of the original images, decoded by PIL)",
        "source_sha256": _sha256(Path(root).read_bytes()) if Path(root).is_file() else None,
        "licence": _LICENCE,
        "classes": classes,
        "splits": {split: {"images": len(indices[split]), "per_class": per_class} for split in _SPLITS},
        "selection": (
            f"per split and class, {per_class} indices drawn without replacement by "
            f"numpy.random.default_rng([{seed}, split index (train 0, test 1)]).choice, sorted; indices "
            "are positions in create_dataset('cifar10', split, root): class-major, file names sorted "
            "within each class"
        ),  # fmt: skip
        "use": "retention k-NN probe of the shipped CIFAR-10 backbones: train = memory, test = queries",
        "command": command or _build_command(root, per_class, seed),
    }
    lists = ",\n".join(f"  {json.dumps(split)}: {json.dumps(indices[split])}" for split in _SPLITS)
    text = json.dumps(card, indent=1)[:-2] + f',\n "indices": {{\n{lists}\n }}\n}}\n'  # one line per index list
    out.with_suffix(".json").write_text(text)
    return out
