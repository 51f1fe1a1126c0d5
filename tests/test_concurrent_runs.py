"""Concurrent runs on one machine (issue #23 item 3): what they share is safe to share.

The decode cache (``data.cache_dir``): two processes building the same cache at once decode once (one builds, the
other waits, then reads), a builder that dies releases its lock; the retention cache under a shared ``out_dir``:
concurrent writers of one key end with a whole file; Block Expansion's prefix cache file: a new, unique name each
time. Every wait below is on an event (a file, a line), never on time; the deadlines only stop a broken test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from retain.data import cache as decode_cache
from retain.engine import retention

DEADLINE = 120.0  # seconds before a test that is stuck fails (never an assertion on how long something took)
CLASSES = ["a", "b"]

# A child process: load the folder's decode cache with ``_decode_all`` wrapped so that it leaves a marker (one file
# per decode), then waits for the file ``go`` (and, if asked, dies there holding the lock) before decoding.
CHILD = """
import os, sys, time
from pathlib import Path
import numpy as np
from retain.data import cache

folder, cache_dir, markers, go, out, crash = sys.argv[1:]
real = cache._decode_all

def decode(sources, names):
    (Path(markers) / str(os.getpid())).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    if crash == "1":
        os._exit(3)  # dies holding the lock, as a crash or a kill would
    return real(sources, names)

cache._decode_all = decode
ds = cache.cached_folder_arrays("tiny", Path(folder), Path(cache_dir), ["a", "b"])
np.savez(out, images=ds.images, targets=ds.targets)
"""


def _png_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(3):
            PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _until(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def _start(tmp_path: Path, folder: Path, tag: str, crash: bool = False) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [folder, tmp_path / "cache", tmp_path / "markers", tmp_path / "go", tmp_path / f"{tag}.npz", int(crash)]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)], env=env, stderr=subprocess.PIPE, text=True, bufsize=1
    )


def _wait_line(proc: subprocess.Popen, needle: str) -> list[str]:
    """The child's stderr lines up to the first that holds ``needle`` (or to its end: then the caller's assert)."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if needle in line:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(DEADLINE):
        raise AssertionError(f"gave up waiting for {needle!r} from the child; it wrote {lines}")
    return lines


def _finish(*procs: subprocess.Popen) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(DEADLINE))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "markers").mkdir()
    return _png_folder(tmp_path / "data" / "train")


def _concurrent_builders(tmp_path: Path, folder: Path, crash_first: bool) -> tuple[list[int], list[str]]:
    """Start A, let it reach its decode (holding the lock), start B, let B say it waits, then let A go on."""
    a = _start(tmp_path, folder, "a", crash=crash_first)
    b = None
    try:
        _until(lambda: any((tmp_path / "markers").iterdir()), "the first process to start decoding")
        b = _start(tmp_path, folder, "b")
        lines = _wait_line(b, "waiting for another process building")
        assert lines and "waiting for another process building" in lines[-1], lines
        assert "tiny-train-" in lines[-1] and ".npz" in lines[-1]
        (tmp_path / "go").touch()
        return _finish(a, b), lines
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.skipif(decode_cache.fcntl is None, reason="the decode cache's lock needs fcntl (POSIX)")
def test_two_processes_building_one_cache_decode_once(tmp_path: Path, folder: Path) -> None:
    codes, _ = _concurrent_builders(tmp_path, folder, crash_first=False)
    assert codes == [0, 0]
    assert len(list((tmp_path / "markers").iterdir())) == 1  # one decode: B read what A built
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["targets"], b["targets"])
        assert a["images"].shape == (6, 8, 8, 3)
    cache_files = sorted(p.name for p in (tmp_path / "cache" / "arrays").iterdir())
    assert len(cache_files) == 2 and cache_files[1] == cache_files[0] + ".lock"  # the npz and its (empty) lock
    # a third, later process reads the cache without decoding (and without waiting)
    ds = decode_cache.cached_folder_arrays("tiny", folder, tmp_path / "cache", CLASSES)
    with np.load(tmp_path / "a.npz") as a:
        assert np.array_equal(ds.images, a["images"])


@pytest.mark.skipif(decode_cache.fcntl is None, reason="the decode cache's lock needs fcntl (POSIX)")
def test_a_builder_that_dies_releases_the_lock(tmp_path: Path, folder: Path) -> None:
    codes, _ = _concurrent_builders(tmp_path, folder, crash_first=True)
    assert codes == [3, 0]  # A died holding the lock; B then got it, found no cache and built it
    assert len(list((tmp_path / "markers").iterdir())) == 2
    with np.load(tmp_path / "b.npz") as b:
        expected = decode_cache._decode_all(
            [folder / c / f"{i}.png" for c in CLASSES for i in range(3)], ["x"] * 6
        )  # fmt: skip
        assert np.array_equal(b["images"], expected)
    assert not [p for p in (tmp_path / "cache" / "arrays").iterdir() if p.name.endswith(".tmp")]


def test_without_fcntl_or_a_lockable_folder_the_cache_still_builds(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_cache, "fcntl", None)  # e.g. Windows: the behaviour before the lock
    first = decode_cache.cached_folder_arrays("tiny", folder, tmp_path / "c1", CLASSES)
    assert not list((tmp_path / "c1" / "arrays").glob("*.lock"))
    monkeypatch.undo()
    if decode_cache.fcntl is not None:  # a file system that refuses flock: built unlocked
        monkeypatch.setattr(decode_cache.fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(37, "ENOLCK")))
    second = decode_cache.cached_folder_arrays("tiny", folder, tmp_path / "c2", CLASSES)
    assert np.array_equal(first.images, second.images)


def test_a_cache_built_while_waiting_is_read_not_rebuilt(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process: the cache appears between the first look and the lock (another process built it)."""
    built = decode_cache.cached_folder_arrays("tiny", folder, tmp_path / "other", CLASSES)
    npz = next((tmp_path / "other" / "arrays").glob("*.npz"))
    real_lock = decode_cache.build_lock

    def lock_after_another_built(path: Path):
        target = tmp_path / "cache" / "arrays" / npz.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(npz.read_bytes())  # the other process's finished file
        return real_lock(path)

    monkeypatch.setattr(decode_cache, "build_lock", lock_after_another_built)
    monkeypatch.setattr(decode_cache, "_decode_all", lambda *a: pytest.fail("decoded although the cache was built"))
    ds = decode_cache.cached_folder_arrays("tiny", folder, tmp_path / "cache", CLASSES)
    assert np.array_equal(ds.images, built.images)


# --------------------------------------------------------------------------------------------- retention cache


def test_concurrent_writers_of_one_retention_key_leave_a_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers that share a pid (processes of two containers or hosts on one ``out_dir``) and write one key at
    once: each through its own temporary file, the last rename wins, nothing is left behind."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    path = tmp_path / "runs" / retention.CACHE_FOLDER / ("0" * 64 + ".json")
    record = {"retention_knn": 42.5, "key": {"model": {"sha256": "x" * 64}, "padding": "y" * 200_000}}
    start, errors = threading.Barrier(8), []

    def write() -> None:
        start.wait()
        try:
            for _ in range(5):
                retention._write(path, record)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert retention._read(path) == 42.5 and json.loads(path.read_text()) == record
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_failed_retention_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / retention.CACHE_FOLDER / "k.json"

    def refuse(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError):
        retention._write(path, {"retention_knn": 1.0})
    assert list(path.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------- prefix cache file


def test_prefix_cache_files_are_new_and_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run's group creates its own file (pid and a random token, O_EXCL, owner-only): another concurrent run
    (another model) can neither pick it up nor be handed it; the path reaches only the group's own processes."""
    from retain.methods import block_expansion as be

    monkeypatch.setattr(be, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(be, "HEADROOM", 0)
    paths = [be._create_cache_file(4096) for _ in range(2)]
    try:
        assert all(paths) and paths[0] != paths[1] and all(Path(p).parent == tmp_path for p in paths)
        assert all(Path(p).stat().st_mode & 0o777 == 0o600 and Path(p).stat().st_size == 4096 for p in paths)
        assert not be._reserve(paths[0], 4096)  # an existing name is never reused (O_EXCL)
    finally:
        for p in paths:
            Path(p).unlink(missing_ok=True)


def test_a_torchvision_download_holds_the_dataset_folders_lock(tmp_path, monkeypatch):
    """Two runs with ``data.download=true`` on one folder: torchvision's download runs under ``<root>/.download.lock``
    (another process would wait there, then find the files)."""
    fcntl = pytest.importorskip("fcntl")
    from torchvision import datasets as tvd

    from retain.data import readers

    held = []

    def fake_download(root, train, download):
        fd = os.open(Path(root) / ".download.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's attempt
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(readers, "_FASHION_MNIST_ROOT", tmp_path / "absent")
    monkeypatch.setattr(tvd, "FashionMNIST", fake_download)
    with pytest.raises(RuntimeError, match="stop after the check"):
        readers._fashion_mnist("train", tmp_path / "fm", True, tmp_path / "cache")
    assert held == [True]
